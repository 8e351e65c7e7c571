"""The one error type users see: a single line naming the file/field at fault."""


class QnnfabError(Exception):
    """An error in user input or the environment, reported as one line.

    ``where`` names the file, and inside it the layer and field, that is wrong;
    the command line prints ``error: <where>: <message>`` and exits non-zero.
    """

    def __init__(self, message, *, where=None):
        self.where = where
        self.message = message
        super().__init__(f"{where}: {message}" if where else message)


class ToolMissingError(QnnfabError):
    """A tool the flow needs is not installed; says which and how to get it."""

    def __init__(self, tool, how):
        super().__init__(f"required tool '{tool}' not found; install it with: {how}")
