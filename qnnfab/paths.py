"""Where things live: the model zoo, the data sets and the build tree."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ZOO_DIR = REPO_ROOT / "models" / "zoo"
DATA_DIR = Path(os.environ.get("QNNFAB_DATA", REPO_ROOT.parent / "shared" / "data"))
BUILD_DIR = Path(os.environ.get("QNNFAB_BUILD", REPO_ROOT / "build"))


def model_dir(model):
    """Directory of a model: a zoo name (``bnn_mnist``) or a path to a QMD directory."""
    p = Path(model)
    if p.is_dir():
        return p
    return ZOO_DIR / model


def build_dir(model):
    """``build/<model>/``, created on demand."""
    d = BUILD_DIR / Path(model).name
    d.mkdir(parents=True, exist_ok=True)
    return d
