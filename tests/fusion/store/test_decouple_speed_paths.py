"""Decouple's fast paths against the readable reference, bit for bit.

- the rebuild: the native library's one pass and the numpy one, against fusion.reference.rebuild;
- the writer: direct writes (whole blocks from two buffers, the tail carried over, a buffer grown
  for a large chunk, the last block padded and cut back), filled in place or by copy, against the
  page-cache writer, and with a filesystem that refuses O_DIRECT at open or at the first write;
- whole decouples of random stores to a file, to a sharded folder and to memory, at several chunk
  sizes and output dtypes, against theta0 + where(M, u * lambda, 0) computed from the stored files.
"""

import errno
import fcntl
import os
from unittest import mock

import hypothesis.strategies as st
import numpy as np
import xxhash
import pytest
from hypothesis import given, settings
from safetensors.numpy import load_file

from fusion import Store, reference
from fusion.dtypes import BF16, DTYPES, F16, F32, from_float32, parse_dtype, to_float32
from fusion.io import SafetensorsWriter, load
from fusion.io import writer as writer_module
from fusion.io.integrity import block_digest, digest_file
from fusion.kernels import cpu_native, host
from fusion.pipeline import run_stages
from fusion.testing.checkpoints import write_checkpoint

from .helpers import manifest

# float16 and bfloat16 rounding edges: the overflow threshold, subnormals, exact ties, the largest finite values
EDGES = [0.0, -0.0, 1e-45, -1e-45, 3.4e38, float("inf"), 65504.0, 65519.996, 65520.0, -65520.0, 2.0**-24, 2.0**-25,
         3 * 2.0**-26, 5.960464e-08, 6.1035156e-05, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8, 3.3895314e38]
FLOATS32 = st.floats(width=32, allow_nan=False) | st.sampled_from(EDGES)


# ---- the rebuild ---------------------------------------------------------------------------------------


@st.composite
def rebuild_cases(draw):
    """float32 base and u with signed zeros, subnormals and extremes; any mask; a rescaler."""
    n = draw(st.integers(0, 70))
    base = np.array(draw(st.lists(FLOATS32, min_size=n, max_size=n)), dtype=np.float32)
    unified = np.array(draw(st.lists(FLOATS32, min_size=n, max_size=n)), dtype=np.float32)
    packed = np.array(draw(st.lists(st.integers(0, 255), min_size=-(-n // 8), max_size=-(-n // 8))), dtype=np.uint8)
    rescaler = draw(st.sampled_from([0.0, 1.0, 1 / 3, 1.37, 2.0**-30]) | st.floats(0.0, 4.0))
    return base, unified, packed, rescaler


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype == np.float32 and np.array_equal(a.view(np.int32), b.view(np.int32))


@given(case=rebuild_cases())
def test_the_native_and_numpy_rebuilds_equal_the_reference(case):
    base, unified, packed, rescaler = case
    with np.errstate(over="ignore", invalid="ignore"):
        expected = reference.rebuild(base, unified, packed, rescaler)  # (n,) float32
        assert _same_bits(host.rebuild_numpy(base, unified, packed, rescaler), expected)
        assert _same_bits(host.rebuild_into(base, unified, packed, rescaler), expected)
        if cpu_native.available():
            into = np.full(unified.shape, np.nan, dtype=np.float32)
            assert cpu_native.rebuild(base, unified, packed, rescaler, into) is into and _same_bits(into, expected)
            in_place = unified.copy()  # out may be u itself
            cpu_native.rebuild(base, in_place, packed, rescaler, in_place)
            assert _same_bits(in_place, expected)


@given(case=rebuild_cases(), dtype=st.sampled_from([F32, BF16, F16]), numpy_only=st.booleans())
def test_the_rebuild_into_a_16_bit_output_rounds_as_from_float32(case, dtype, numpy_only):
    base, unified, packed, rescaler = case
    with np.errstate(over="ignore", invalid="ignore"):
        expected = from_float32(reference.rebuild(base, unified, packed, rescaler), dtype)  # its storage
        out = np.empty(unified.shape, dtype=dtype.storage)
        with mock.patch.dict(os.environ, {"CONDU_CPU_BACKEND": "numba"} if numpy_only else {}):
            assert host.rebuild_as(base, unified, packed, rescaler, out, dtype) is out
    assert _raw(out) == _raw(expected)


def test_rebuild_into_takes_numpy_when_numba_is_asked_for(monkeypatch):
    monkeypatch.setenv("CONDU_CPU_BACKEND", "numba")
    assert host._native() is None
    base, unified = np.ones(9, np.float32), np.full(9, 2.0, np.float32)
    assert host.rebuild_into(base, unified, np.array([0xFF, 0x01], np.uint8), 0.5).tolist() == [2.0] * 9


# ---- the pipeline and the block checks ------------------------------------------------------------------


@pytest.mark.parametrize("threaded", [True, False])
def test_a_pipeline_without_a_finish_stage_computes_every_item_in_order(threaded):
    done = []
    run_stages(range(50), lambda i, slot: i * 2, lambda i, x: done.append((i, x)), None, threaded=threaded)
    assert done == [(i, 2 * i) for i in range(50)]

    def broken(i, x):
        if i == 7:
            raise RuntimeError("compute failed")

    with pytest.raises(RuntimeError, match="compute failed"):
        run_stages(range(50), lambda i, slot: i, broken, None, threaded=threaded)


@given(data=st.binary(max_size=5000))
def test_block_digests_are_xxh3_64_of_the_bytes(data):
    assert block_digest(data) == xxhash.xxh3_64_hexdigest(data) == f"{xxhash.xxh3_64_intdigest(data):016x}"


# ---- the writer ------------------------------------------------------------------------------------------

WRITER_DTYPES = [F32, F16, BF16, DTYPES["U8"], DTYPES["I64"]]


@st.composite
def writer_cases(draw):
    """A layout of a few tensors (sizes around the small buffers below), their data, how each is cut."""
    count = draw(st.integers(1, 4))
    layout, data, cuts = [], {}, {}
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    for k in range(count):
        dtype, n = draw(st.sampled_from(WRITER_DTYPES)), draw(st.integers(0, 5000))
        layout.append((f"t{k}", dtype, (n,)))
        data[f"t{k}"] = rng.integers(0, 256, n * dtype.itemsize, dtype=np.uint8).view(dtype.storage)
        cuts[f"t{k}"] = sorted(set(draw(st.lists(st.integers(0, n), max_size=4))) | {0, n})
    in_place = draw(st.booleans())  # reserve + commit, or write
    metadata = {"format": "pt", "pad": "x" * draw(st.integers(0, 40))}  # moves the data's start
    return layout, data, cuts, in_place, metadata


def _write(path, case, *, direct: bool, checksums: bool = False):
    layout, data, cuts, in_place, metadata = case
    with SafetensorsWriter(path, layout, metadata=metadata, checksums=checksums, direct=direct) as writer:
        for name, _, _ in layout:
            bounds = cuts[name]
            for lo, hi in zip(bounds, bounds[1:]):
                if in_place:
                    writer.reserve(name, hi - lo)[...] = data[name][lo:hi]
                    writer.commit(name, hi - lo)
                else:
                    writer.write(name, data[name][lo:hi])
    return writer


def _small_buffers():
    """Direct-write buffers of three blocks: tensors of a few KiB cross them, and some outgrow them."""
    return mock.patch.object(writer_module, "_STAGE_BYTES", 3 * writer_module._ALIGN)


@settings(max_examples=30)
@given(case=writer_cases())
def test_direct_writes_give_the_bytes_of_page_cache_writes(tmp_path_factory, case):
    folder = tmp_path_factory.mktemp("direct")
    with _small_buffers():
        direct = _write(folder / "direct.safetensors", case, direct=True, checksums=True)
    _write(folder / "buffered.safetensors", case, direct=False)
    assert (folder / "direct.safetensors").read_bytes() == (folder / "buffered.safetensors").read_bytes()
    assert direct.digests == digest_file(folder / "direct.safetensors")
    loaded = load(folder / "direct.safetensors")
    for name, dtype, _ in case[0]:
        assert _raw(loaded[name]) == _raw(case[1][name]), name  # random bytes: NaNs among them
    assert sorted(p.name for p in folder.iterdir()) == ["buffered.safetensors", "direct.safetensors"]


def _refuse_direct_writes():
    """A filesystem that opens files with O_DIRECT but refuses their writes (EINVAL), as some do."""
    real = os.pwrite

    def pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    return mock.patch.object(writer_module.os, "pwrite", pwrite)


def _refuse_direct_opens():
    real = os.open

    def open_(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real(path, flags, *args, **kwargs)

    return mock.patch.object(writer_module.os, "open", open_)


@pytest.mark.parametrize("refuse", [_refuse_direct_writes, _refuse_direct_opens])
def test_a_filesystem_without_direct_io_gets_the_same_file(tmp_path, refuse):
    data = np.arange(7000, dtype=np.float32)
    case = ([("x", F32, (7000,)), ("y", DTYPES["U8"], (5,))], {"x": data, "y": np.arange(5, dtype=np.uint8)},
            {"x": [0, 1000, 7000], "y": [0, 5]}, True, {"format": "pt"})
    with _small_buffers(), refuse():
        writer = _write(tmp_path / "refused.safetensors", case, direct=True)
    if refuse is _refuse_direct_writes:
        assert not writer._sink.direct  # it fell back to the page cache at its first write
    _write(tmp_path / "plain.safetensors", case, direct=False)
    assert (tmp_path / "refused.safetensors").read_bytes() == (tmp_path / "plain.safetensors").read_bytes()


def test_an_error_in_the_writing_thread_reaches_the_caller_and_leaves_nothing(tmp_path):
    def broken(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    for direct in (True, False):
        with _small_buffers(), mock.patch.object(writer_module.os, "pwrite", broken):
            with pytest.raises(OSError, match="x.safetensors.*no space left on the device") as raised:
                with SafetensorsWriter(tmp_path / "x.safetensors", [("x", F32, (50_000,))], direct=direct) as writer:
                    for lo in range(0, 50_000, 1000):
                        writer.write("x", np.zeros(1000, np.float32))
        assert raised.value.errno == errno.ENOSPC and list(tmp_path.iterdir()) == []


def test_other_write_errors_name_the_file(tmp_path):
    def broken(fd, data, offset):
        raise OSError(errno.EIO, "Input/output error")

    with mock.patch.object(writer_module.os, "pwrite", broken):
        with pytest.raises(OSError, match="y.safetensors: Input/output error"):
            with SafetensorsWriter(tmp_path / "y.safetensors", [("x", F32, (10,))], direct=True) as writer:
                writer.write("x", np.zeros(10, np.float32))
    assert list(tmp_path.iterdir()) == []


# ---- whole decouples of random stores ---------------------------------------------------------------------

SHAPES = [(5,), (8,), (13,), (3, 7), (16, 4), (31,)]


@st.composite
def stores(draw):
    """Tensors (odd sizes among them), a base and 1-3 fine-tunes in random dtypes, how the store is cut."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    count = draw(st.integers(1, 4))
    shapes = {f"w{k}": draw(st.sampled_from(SHAPES)) for k in range(count)}
    base = {n: (rng.integers(-64, 65, s) / 64).astype(np.float32) for n, s in shapes.items()}
    base["base.zero"] = np.array([-0.0, 0.0, -0.0], np.float32)  # theta0 + 0 turns -0.0 into +0.0
    base["ids"] = np.arange(5, dtype=np.int64)
    tasks = []
    for t in range(draw(st.integers(1, 3))):
        ft = {n: (a + np.where(rng.random(a.shape) < 0.3, 0, rng.integers(-8, 9, a.shape) / 64)).astype(np.float32)
              if a.dtype.kind == "f" else a for n, a in base.items()}
        tasks.append((ft, draw(st.sampled_from([F32, BF16, F16]))))
    return {"base": base, "tasks": tasks, "unified_dtype": draw(st.sampled_from([None, "bfloat16", "float16"])),
            "rescaler": draw(st.sampled_from(["model", "tensor"])),
            "chunk": draw(st.sampled_from([8, 16, 40, 1 << 20])),
            "out_dtype": draw(st.sampled_from(["float32", "bfloat16", "float16"])), "direct": draw(st.booleans())}


def _expected(store_dir, task_number: int, base: dict, out_dtype) -> dict[str, np.ndarray]:
    """theta0 + where(M, u * float32(lambda), 0) from the stored files, in whole tensors (the readable rule)."""
    m = manifest(store_dir)
    task = next(t for t in m["tasks"] if t["number"] == task_number)
    unified = {}
    for rel in m["unified"]["files"]:
        unified.update(load_file(store_dir / rel))
    masks, fused = load_file(store_dir / task["triggers"]), {t["name"]: t for t in m["tensors"]}
    out = {}
    for name, theta0 in base.items():
        if name not in fused:
            out[name] = theta0
            continue
        u = to_float32(unified[name].reshape(-1), DTYPES[fused[name]["unified_dtype"]])
        lam = task["rescaler"][name] if isinstance(task["rescaler"], dict) else task["rescaler"]
        rebuilt = reference.rebuild(theta0.reshape(-1), u, masks[name], lam).reshape(theta0.shape)
        out[name] = from_float32(rebuilt, out_dtype)
    return out


@settings(max_examples=25)
@given(case=stores())
def test_decouple_to_a_file_a_folder_and_memory_equals_the_reference(tmp_path_factory, case):
    work = tmp_path_factory.mktemp("store")
    base_path = write_checkpoint(case["base"], work / "base.safetensors")
    paths = [write_checkpoint(ft, work / f"ft{k}.safetensors", dtype=dtype)
             for k, (ft, dtype) in enumerate(case["tasks"])]
    Store.unify(work / "s", base_path, paths, names=[f"t{k}" for k in range(len(paths))], dtype=case["unified_dtype"],
                rescaler=case["rescaler"], kernel="reference", chunk=case["chunk"], device="cpu")
    store, out_dtype = Store.open(work / "s", chunk=case["chunk"]), parse_dtype(case["out_dtype"])
    refuse = mock.patch.object(writer_module.os, "open", os.open) if case["direct"] else _refuse_direct_opens()
    for number in range(1, len(paths) + 1):
        expected = _expected(store.path, number, case["base"], out_dtype)
        with _small_buffers(), refuse:
            file = load(store.decouple(number, work / f"d{number}.safetensors", dtype=case["out_dtype"]))
            sharded = load(store.decouple(number, work / f"d{number}", dtype=case["out_dtype"], max_shard_size=200))
        in_memory = store.load_task(number, dtype=case["out_dtype"])
        for name, want in expected.items():
            for got in (file[name], sharded[name], in_memory[name]):
                assert got.shape == want.shape and _raw(got) == _raw(want), name


def _raw(array) -> bytes:
    return np.ascontiguousarray(array).tobytes()
