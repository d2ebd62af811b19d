"""Lazy reads: every slice equals the stored tensor; checked reads return only verified bytes."""

import os

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given
from safetensors.torch import save_file

from fusion.io import IntegrityError, SafetensorsFile
from fusion.io.integrity import digest_file

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8]


def _stored(tmp_path, dtype=torch.float32, numel=5000, name="x.safetensors"):
    gen = torch.Generator().manual_seed(0)
    tensors = {"a": (torch.randn(numel, generator=gen) * 100).to(dtype), "b": torch.arange(7), "c": torch.randn(3, 4)}
    path = tmp_path / name
    save_file(tensors, str(path))
    return path, tensors


def _bits(t: torch.Tensor) -> np.ndarray:
    """A tensor's values as the numpy storage the reader returns (bfloat16 as uint16 bits)."""
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


@given(data=st.data(), dtype=st.sampled_from(DTYPES))
def test_slices_equal_the_stored_tensor(tmp_path_factory, data, dtype):
    path, tensors = _stored(tmp_path_factory.mktemp("r"), dtype, numel=300)
    lo = data.draw(st.integers(0, 300))
    hi = data.draw(st.integers(lo, 300))
    with SafetensorsFile(path) as f:
        assert np.array_equal(f.read_flat("a", lo, hi), _bits(tensors["a"])[lo:hi])
        if dtype.is_floating_point:  # float32 out converts exactly, as torch's .float()
            out = f.read_flat_into("a", lo, hi, np.empty(hi - lo, np.float32))
            assert np.array_equal(out, tensors["a"][lo:hi].float().numpy())
        view = f.view_flat("a", lo, hi)
        assert not view.flags.writeable and np.array_equal(view, _bits(tensors["a"])[lo:hi])


@given(data=st.data(), block=st.sampled_from([64, 1000, 4096]))
def test_checked_reads_equal_unchecked_reads(tmp_path_factory, data, block):
    path, tensors = _stored(tmp_path_factory.mktemp("c"))
    digests = digest_file(path, block=block)
    ranges = data.draw(st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 5000)), min_size=1, max_size=6))
    with SafetensorsFile(path, digests=digests) as checked:
        for a, b in ranges:
            lo, hi = min(a, b), max(a, b)
            assert np.array_equal(checked.view_flat("a", lo, hi), tensors["a"].numpy()[lo:hi])
        assert np.array_equal(checked.read("c"), tensors["c"].numpy())


def test_a_damaged_block_fails_the_reads_that_cover_it_and_only_those(tmp_path):
    path, tensors = _stored(tmp_path)
    digests = digest_file(path, block=1024)
    with SafetensorsFile(path) as f:
        start = f.data_start + f.info("a").begin
    raw = bytearray(path.read_bytes())
    raw[start + 8000] ^= 0x10  # element 2000 of "a", in the block of bytes 8192.. relative to the file
    path.write_bytes(raw)
    block = (start + 8000) // 1024
    first, last = (block * 1024 - start) // 4, ((block + 1) * 1024 - start) // 4
    with SafetensorsFile(path, digests=digests, where="the file (task 3)") as f:
        assert np.array_equal(f.view_flat("a", 0, first - 1), tensors["a"].numpy()[: first - 1])
        with pytest.raises(IntegrityError, match=r"the file \(task 3\): bytes \d+\.\.\d+ do not match"):
            f.view_flat("a", first, first + 1)
        assert np.array_equal(f.view_flat("a", last + 1, 5000), tensors["a"].numpy()[last + 1 :])


def test_a_damaged_header_is_a_checksum_error_not_a_format_error(tmp_path):
    path, _ = _stored(tmp_path)
    digests = digest_file(path, block=64)
    raw = bytearray(path.read_bytes())
    raw[20] ^= 0x01
    path.write_bytes(raw)
    with pytest.raises(IntegrityError, match="do not match their checksum"):
        SafetensorsFile(path, digests=digests)


def test_a_file_of_another_size_is_refused_at_once(tmp_path):
    path, _ = _stored(tmp_path)
    digests = digest_file(path)
    with open(path, "ab") as f:
        f.write(b"\0")
    with pytest.raises(IntegrityError, match="truncated, extended or replaced"):
        SafetensorsFile(path, digests=digests)


def test_a_sequential_scan_reads_each_byte_once(tmp_path, monkeypatch):
    """The block a read ends in is carried over, so a pass does not read it twice."""
    path, _ = _stored(tmp_path, numel=100_000)
    read = []
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, buffers, offset: read.append(sum(len(b) for b in buffers)) or real(fd, buffers, offset))
    with SafetensorsFile(path, digests=digest_file(path, block=4096)) as f:
        for lo in range(0, 100_000, 3000):
            f.view_flat("a", lo, min(lo + 3000, 100_000))
    assert sum(read) <= path.stat().st_size


@given(data=st.data())
def test_recorded_digests_equal_a_whole_file_digest_whatever_was_read(tmp_path_factory, data):
    path, _ = _stored(tmp_path_factory.mktemp("rec"))
    ranges = data.draw(st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 5000)), max_size=4))
    with SafetensorsFile(path, record=True, block=512) as f:
        for a, b in ranges:
            f.view_flat("a", min(a, b), max(a, b))
        assert f.recorded() == digest_file(path, block=512)


def test_a_file_changed_while_it_is_recorded_is_refused(tmp_path):
    path, _ = _stored(tmp_path)
    with SafetensorsFile(path, record=True, block=512) as f:
        f.view_flat("a", 0, 1000)
        raw = bytearray(path.read_bytes())
        raw[f.data_start + f.info("a").begin + 10] ^= 1
        path.write_bytes(raw)
        f.view_flat("a", 4000, 5000)  # another block: loads the window elsewhere
        with pytest.raises(IntegrityError, match="changed while they were being read"):
            f.view_flat("a", 0, 10)
