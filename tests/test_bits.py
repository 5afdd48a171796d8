import numpy as np
import pytest

from edgemerge.errors import FormatError
from edgemerge.runtime.bits import pack_bits, packed_nbytes, unpack_bits


def test_golden_big_bit_order():
    # first element is the most significant bit of the first byte (np.packbits default)
    assert pack_bits(np.array([1, 0, 0, 0, 0, 0, 0, 1, 1], bool)).tolist() == [0b10000001, 0b10000000]


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 15, 16, 17, 1001])
def test_round_trip_any_length(n):
    rng = np.random.default_rng(n)
    m = rng.random(n) < 0.3
    packed = pack_bits(m)
    assert packed.size == packed_nbytes(n) == (n + 7) // 8
    assert np.array_equal(unpack_bits(packed, n), m)


def test_padding_bits_are_zero():
    assert pack_bits(np.ones(3, bool)).tolist() == [0b11100000]


def test_unpacker_checks_element_count():
    with pytest.raises(FormatError, match=r"m: packed mask has 2 bytes but 17 elements need 3"):
        unpack_bits(np.zeros(2, np.uint8), 17, "m")
    with pytest.raises(FormatError, match="1-D uint8"):
        unpack_bits(np.zeros(2, np.int8), 16)
