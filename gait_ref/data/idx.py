"""IDX files (the MNIST family's format), plain or gzip-compressed.

Layout: 2 zero bytes, a type code (0x08 = uint8), the number of dimensions n, then
n big-endian uint32 sizes, then the data in C order.
"""
from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np


class DataFormatError(ValueError):
    """A data file is missing, truncated or not in the expected format."""


def read_idx(path) -> np.ndarray:
    path = Path(path)
    if not path.exists():
        raise DataFormatError(f"{path}: file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataFormatError(f"{path}: cannot read ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataFormatError(f"{path}: not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise DataFormatError(f"{path}: IDX type code {raw[2]:#04x}, only unsigned bytes (0x08) are supported")
    nd = raw[3]
    header = 4 + 4 * nd
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(nd)]
    if len(raw) != header + math.prod(dims):
        raise DataFormatError(f"{path}: header says shape {tuple(dims)} ({math.prod(dims)} bytes) "
                              f"but the file holds {len(raw) - header} data bytes (truncated?)")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def write_idx(path, array: np.ndarray) -> None:
    """Write a uint8 array as IDX (gzip when the name ends in .gz). Used by tests."""
    a = np.ascontiguousarray(array, dtype=np.uint8)
    raw = bytes([0, 0, 0x08, a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape) + a.tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(raw)
