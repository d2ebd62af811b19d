"""Block checksums: the same digests however the bytes arrive, and every damaged block found."""

import hypothesis.strategies as st
import pytest
from hypothesis import given

from fusion.io.integrity import BlockHasher, FileDigests, block_digest, digest_file


@given(data=st.binary(max_size=300), block=st.integers(1, 64), cuts=st.lists(st.integers(0, 300), max_size=6))
def test_digests_do_not_depend_on_how_the_stream_is_cut(tmp_path_factory, data, block, cuts):
    hasher = BlockHasher(block)
    bounds = [0, *sorted(c for c in cuts if c <= len(data)), len(data)]
    for lo, hi in zip(bounds, bounds[1:]):
        hasher.update(data[lo:hi])
    digests = hasher.finish()
    expected = "".join(block_digest(data[i : i + block]) for i in range(0, len(data), block))
    assert digests == FileDigests(len(data), block, expected)
    path = tmp_path_factory.mktemp("d") / "f"
    path.write_bytes(data)
    assert digest_file(path, block=block) == digests


@given(data=st.binary(min_size=1, max_size=200), block=st.integers(1, 32), where=st.integers(0, 199), bit=st.integers(0, 7))
def test_a_flipped_bit_is_found_in_its_block(data, block, where, bit):
    where %= len(data)
    damaged = bytearray(data)
    damaged[where] ^= 1 << bit
    a, b = BlockHasher(block), BlockHasher(block)
    a.update(data)
    b.update(bytes(damaged))
    assert a.finish().first_mismatch(b.finish()) == where // block


def test_digests_must_fit_the_size():
    with pytest.raises(ValueError, match="do not fit"):
        FileDigests(10, 4, "0" * 16)  # 10 bytes in blocks of 4 need three digests
