"""The one error type users see: a single line naming the file/field at fault."""

import json
from pathlib import Path



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


def read_json(path, missing="file not found"):
    """Parse the JSON file at ``path``; a missing or malformed file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise QnnfabError(missing, where=str(path))
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise QnnfabError(f"not valid JSON: {e}", where=str(path)) from None
