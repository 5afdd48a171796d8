"""Mask bit packing: one bit per parameter, np.packbits 'big' order (the TALL-masks convention).

Element i of the flattened mask is bit (7 - i % 8) of byte i // 8, i.e. the first element is the
most significant bit. The last byte is zero-padded.
"""

from __future__ import annotations

import numpy as np

from ..errors import FormatError

BIT_ORDER = "big"


def packed_nbytes(numel: int) -> int:
    """Bytes that hold ``numel`` mask bits."""
    return (numel + 7) // 8


def pack_bits(mask: np.ndarray) -> np.ndarray:
    """Pack a boolean array (any shape, C order) into uint8, big bit order.

    >>> pack_bits(np.array([1, 0, 1, 1, 0, 0, 0, 0, 1], dtype=bool)).tolist()
    [176, 128]
    """
    return np.packbits(np.asarray(mask, dtype=bool).reshape(-1), bitorder=BIT_ORDER)


def unpack_bits(packed: np.ndarray, numel: int, name: str = "mask") -> np.ndarray:
    """Unpack ``numel`` booleans; the byte length must be exactly ceil(numel / 8).

    >>> unpack_bits(np.array([176, 128], dtype=np.uint8), 9).astype(int).tolist()
    [1, 0, 1, 1, 0, 0, 0, 0, 1]
    """
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise FormatError(f"{name}: packed mask must be a 1-D uint8 array, got {packed.dtype} {packed.shape}")
    if packed.size != packed_nbytes(numel):
        raise FormatError(
            f"{name}: packed mask has {packed.size} bytes but {numel} elements need {packed_nbytes(numel)}"
        )
    return np.unpackbits(packed, count=numel, bitorder=BIT_ORDER).view(bool)
