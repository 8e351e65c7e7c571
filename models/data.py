"""Data sets, read from ``../shared/data`` (or ``$QNNFAB_DATA``); nothing is downloaded.

Images come back as uint8 arrays in the QMD's channels-last layout ``[N, H, W, C]``.
"""

from pathlib import Path

import numpy as np

from qnnfab.errors import QnnfabError
from qnnfab.paths import DATA_DIR

DATASETS = {"mnist": "mnist.npz", "cifar10": "cifar10.npz"}


def load_dataset(name, split="test", data_dir=None):
    """Return ``(images uint8 [N,H,W,C], labels int64 [N])`` of ``split`` ('train'/'test')."""
    if name not in DATASETS:
        raise QnnfabError(f"unknown data set {name!r} (known: {', '.join(DATASETS)})")
    path = Path(data_dir or DATA_DIR) / DATASETS[name]
    if not path.is_file():
        raise QnnfabError(f"data set file not found; place {DATASETS[name]} there or set QNNFAB_DATA",
                          where=str(path))
    with np.load(path) as d:
        try:
            x, y = d[f"x_{split}"], d[f"y_{split}"]
        except KeyError:
            raise QnnfabError(f"has no arrays x_{split}/y_{split}", where=str(path)) from None
    if x.ndim == 3:
        x = x[..., None]
    return np.ascontiguousarray(x, dtype=np.uint8), y.astype(np.int64)
