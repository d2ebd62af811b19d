"""The compact store: a unified delta stored as int8 or int4 blocks (`--dtype int8|int4`).

What the pass stores is what the reference makes of the same deltas, on every kernel; the
continual step rebuilds every task from the dequantized u and quantizes the new one; the manifest
says so and older manifests load unchanged; and the store's guarantees hold for it as for every
store: a flipped bit anywhere never yields a wrong model with exit status 0, a damaged unified
file refuses every task and every change, and a change killed at any point leaves a whole
generation."""

import json

import hypothesis.strategies as st
import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from safetensors.numpy import load_file

from fusion import Store, reference
from fusion.dtypes import QUANT_FORMS, dequantize_raw
from fusion.errors import InputError, ManifestError
from fusion.store import faults
from fusion.store.manifest import load_manifest
from fusion.testing.checkpoints import snapshot, tiny_base, tiny_finetune, write_checkpoint

from .helpers import (equal_models, flip_a_bit_and_decouple_every_task, flip_byte, killed_at, manifest,
                      one_line_error, run, stored_unified, task_entry)

# Tensors of several quantization blocks (320: five; 200: three, the last one short), shorter than
# one (5), and one of exactly one block.
SHAPES = {"embed.weight": (20, 16), "layer.0.weight": (8, 8), "layer.0.bias": (5,), "head.weight": (8, 25)}
OPTS = dict(kernel="reference", chunk=64)  # tensors span several chunks


def checkpoints(tmp_path, count=3):
    base = tiny_base(shapes=SHAPES)
    base_path = write_checkpoint(base, tmp_path / "base.safetensors")
    fts = [tiny_finetune(base, seed=i) for i in range(count)]
    for ft in fts:  # values off the 1/64 grid too, so that codes round
        ft["embed.weight"] = ft["embed.weight"] * np.float32(1.0 + 1.0 / 3.0)
    paths = [write_checkpoint(ft, tmp_path / f"task{i + 1}.safetensors") for i, ft in enumerate(fts)]
    return base_path, paths, base, fts


def deltas_of(base, fts, name):
    return np.stack([(ft[name] - base[name]).reshape(-1) for ft in fts]).astype(np.float32)  # (T, n)


def stored_values(store_dir, name) -> np.ndarray:
    """u of tensor `name` as the store keeps it, dequantized from its records."""
    m = manifest(store_dir)
    entry = next(t for t in m["tensors"] if t["name"] == name)
    form = QUANT_FORMS[entry["unified_dtype"]]
    return dequantize_raw(stored_unified(store_dir)[name], int(np.prod(entry["shape"])), form)


def bits(x):
    return np.asarray(x, dtype=np.float32).view(np.uint32)


@pytest.fixture(params=["int8", "int4"])
def form(request):
    return request.param


@pytest.fixture
def store(tmp_path, form):
    """Two tasks unified and one added, int8 or int4; their models, decoupled before any damage."""
    base_path, paths, _, _ = checkpoints(tmp_path)
    store = Store.unify(tmp_path / "s", base_path, paths[:2], dtype=form, **OPTS)
    store.add(paths[2])
    store.truth = {t.number: store.load_task(t.number) for t in store.tasks}
    return store


# ---- what the pass stores ------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["reference", "cpu"])
def test_the_store_keeps_what_the_reference_makes_and_the_continual_step_rebuilds_from_it(tmp_path, form, kernel):
    base_path, paths, base, fts = checkpoints(tmp_path)
    store = Store.unify(tmp_path / "s", base_path, paths[:2], dtype=form, kernel=kernel, chunk=64)
    first = {name: stored_values(store.path, name) for name in SHAPES}
    rescalers = [t.rescaler for t in store.tasks]
    masks = {t.name: load_file(store.path / task_entry(store.path, t.name)["triggers"]) for t in store.tasks}
    for name in SHAPES:
        expected = reference.elect(deltas_of(base, fts[:2], name), unified_dtype=form)
        assert np.array_equal(bits(first[name]), bits(expected.unified)), name
        for i, task in enumerate(store.tasks):
            assert np.array_equal(masks[task.name][name], expected.packed_masks[i]), (name, task.name)

    store.add(paths[2])  # decouple both from the dequantized u, unify with the third, quantize again
    for name in SHAPES:
        packed = np.stack([masks[t][name] for t in ("task1", "task2")])
        expected = reference.continual_chunk(first[name], packed, np.array(rescalers), deltas_of(base, fts[2:], name),
                                             unified_dtype=form)
        assert np.array_equal(bits(stored_values(store.path, name)), bits(expected.unified)), name

    for task in store.tasks:  # a decoupled model is theta0 + lambda * M * (code * scale)
        model = store.load_task(task.number)
        triggers = load_file(store.path / task_entry(store.path, task.name)["triggers"])
        for name in SHAPES:
            rebuilt = reference.rebuild(base[name].reshape(-1), stored_values(store.path, name), triggers[name],
                                        task.rescaler)
            assert np.array_equal(bits(model[name].reshape(-1)), bits(rebuilt)), (task.name, name)


def test_every_kernel_writes_the_same_store(tmp_path, form):
    base_path, paths, _, _ = checkpoints(tmp_path)
    stores = []
    for kernel in ("reference", "cpu"):
        s = Store.unify(tmp_path / kernel, base_path, paths[:2], dtype=form, kernel=kernel, chunk=128)
        s.add(paths[2])
        stores.append(s)
    for a, b in zip(*(sorted(p for p in s.path.rglob("*.safetensors")) for s in stores)):
        assert a.name == b.name and a.read_bytes() == b.read_bytes()


def test_the_unified_file_takes_the_bits_the_form_says(tmp_path, form):
    base_path, paths, _, _ = checkpoints(tmp_path)
    store = Store.unify(tmp_path / "s", base_path, paths[:2], dtype=form, **OPTS)
    unified = stored_unified(store.path)
    per_block = {"int8": 4 + 64, "int4": 4 + 32}[form]
    assert unified["embed.weight"].dtype == np.uint8 and unified["embed.weight"].size == 5 * per_block
    assert unified["layer.0.bias"].size == 4 + {"int8": 5, "int4": 3}[form]  # one short block
    assert unified["head.weight"].size == 3 * per_block + 4 + {"int8": 8, "int4": 4}[form]  # 200 = 3 * 64 + 8


def test_the_manifest_says_the_mode_and_info_shows_it(store, tmp_path, form):
    m = manifest(store.path)
    assert m["quant_block"] == 64
    assert {t["unified_dtype"] for t in m["tensors"]} == {"Q8" if form == "int8" else "Q4"}
    shown = json.loads(run(["info", "--store", store.path, "--json"], tmp_path).output)
    assert shown["unified_dtypes"] == [form] and shown["quant_block"] == 64
    text = run(["info", "--store", store.path], tmp_path).output
    assert f"unified delta in {form} (blocks of 64 elements, each with a float32 scale)" in text
    assert all(t["fidelity"]["cosine"] is not None for t in shown["tasks"])  # fidelity per task stays reported
    assert store.verify().ok


def test_a_manifest_without_the_field_loads_as_a_float_store(tmp_path):
    base_path, paths, _, _ = checkpoints(tmp_path)
    store = Store.unify(tmp_path / "s", base_path, paths[:2], **OPTS)
    content = manifest(store.path)
    assert content.pop("quant_block") is None
    _write_manifest(store.path, content)  # as a store written before the field existed
    assert load_manifest(store.path).quant_block is None
    assert equal_models(store.load_task(1), Store.open(store.path).load_task(1)) and store.verify().ok


def _write_manifest(store_dir, content):
    body = {k: v for k, v in content.items() if k != "checksum"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    content["checksum"] = xxhash.xxh3_128_hexdigest(canonical)
    (store_dir / "condu.json").write_text(json.dumps(content))


@pytest.mark.parametrize("block", [None, 32])
def test_a_manifest_whose_block_does_not_fit_its_tensors_is_refused(store, block):
    content = manifest(store.path)
    content["quant_block"] = block
    _write_manifest(store.path, content)
    with pytest.raises(ManifestError, match="quant_block"):
        load_manifest(store.path)


def test_the_command_line_makes_and_changes_a_compact_store(tmp_path, form):
    base_path, paths, _, _ = checkpoints(tmp_path)
    s = tmp_path / "s"
    assert run(["unify", "--store", s, "--base", base_path, "--unified-dtype", form, "--chunk", "64",
                paths[0], paths[1], "-q"], tmp_path).exit_code == 0
    assert run(["add", "--store", s, paths[2], "-q"], tmp_path).exit_code == 0
    assert run(["remove", "--store", s, "--task", "2", "-q"], tmp_path).exit_code == 0
    assert run(["decouple", "--store", s, "--task", "task3", "-o", tmp_path / "t3.safetensors", "-q"],
               tmp_path).exit_code == 0
    assert equal_models(load_file(tmp_path / "t3.safetensors"), Store.open(s).load_task(3))
    assert manifest(s)["quant_block"] == 64 and Store.open(s).verify().ok


def test_chunks_that_cut_blocks_are_refused_in_one_line(store, tmp_path, form):
    base_path, paths = tmp_path / "base.safetensors", [tmp_path / f"task{i}.safetensors" for i in (1, 2, 3)]
    with pytest.raises(InputError, match="multiple of 64"):
        Store.unify(tmp_path / "other", base_path, paths[:2], dtype=form, kernel="reference", chunk=16)
    assert not (tmp_path / "other").exists()
    before = snapshot(store.path)
    with pytest.raises(InputError, match="multiple of 64"):
        Store.open(store.path, kernel="reference", chunk=24).add(paths[2], name="again")
    with pytest.raises(InputError, match="multiple of 64"):
        Store.open(store.path, chunk=24).load_task(1)
    assert snapshot(store.path) == before


def test_fused_gives_the_values_and_a_store_of_them_rebuilds_the_same(store, tmp_path):
    state = store.fused()
    assert all(d.name == "float32" for d in state.dtypes.values())
    for name in SHAPES:
        assert np.array_equal(bits(state.unified[name]), bits(stored_values(store.path, name)))
    again = Store.from_fused(tmp_path / "f32", manifest(store.path)["base"]["path"], state,
                             names=[t.name for t in store.tasks])
    for i, task in enumerate(store.tasks):
        assert equal_models(again.load_task(i + 1), store.truth[task.number])


# ---- damage --------------------------------------------------------------------------------------


def test_a_damaged_block_scale_refuses_every_task_and_every_change(store, tmp_path):
    rel = manifest(store.path)["unified"]["files"][0]
    unified = store.path / rel
    header = int.from_bytes(unified.read_bytes()[:8], "little")
    begin = json.loads(unified.read_bytes()[8 : 8 + header])["embed.weight"]["data_offsets"][0]
    flip_byte(unified, 8 + header + begin + 2, 0x10)  # a bit of the first block's scale
    before = snapshot(store.path)
    for task in ("1", "task3"):
        one_line_error(run(["decouple", "--store", store.path, "--task", task, "-o", tmp_path / "o.safetensors", "-q"],
                           tmp_path), "(the unified delta: every task)")
        assert not (tmp_path / "o.safetensors").exists()
    one_line_error(run(["add", "--store", store.path, tmp_path / "task1.safetensors", "--name", "x", "-q"], tmp_path),
                   "do not match their checksum")
    one_line_error(run(["remove", "--store", store.path, "--task", "2", "-q"], tmp_path), "do not match their checksum")
    assert snapshot(store.path) == before
    result = run(["verify", "--store", store.path], tmp_path)
    assert result.exit_code == 1 and f"every task: {rel}" in result.output


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(data=st.data())
def test_no_flipped_bit_in_any_file_of_a_compact_store_yields_a_wrong_model(store, tmp_path, data):
    flip_a_bit_and_decouple_every_task(store, tmp_path, data)


# ---- crashes --------------------------------------------------------------------------------------

BEFORE_SWAP = ["pass-chunk", "files-written", "backup-written"]


def _fail():
    raise RuntimeError("injected")


@pytest.mark.parametrize("point", BEFORE_SWAP)
def test_a_failure_before_the_swap_leaves_the_compact_store_as_it_was(store, tmp_path, point):
    before = snapshot(store.path)
    with faults.inject(point, _fail), pytest.raises(RuntimeError, match="injected"):
        store.add(tmp_path / "task1.safetensors", name="again")
    assert snapshot(store.path) == before


@pytest.mark.parametrize("point", [*BEFORE_SWAP, "manifest-swapped"])
def test_kill_minus_nine_at_every_point_leaves_a_whole_compact_generation(store, tmp_path, point):
    killed_at(point, tmp_path / "reached", f"from fusion import Store; Store.open({str(store.path)!r}, kernel='reference', "
              f"chunk=64).add({str(tmp_path / 'task1.safetensors')!r}, name='victim')")

    if point == "manifest-swapped":  # the new generation is whole: the victim is in
        assert store.generation == 2 and store.task("victim").number == 4
    else:  # the old generation is whole and reads exactly as before
        assert store.generation == 1
        assert all(equal_models(store.load_task(n), model) for n, model in store.truth.items())
    assert store.verify().ok
    store.add(tmp_path / "task2.safetensors", name="after")  # the next writer clears the leftovers
    assert not [p for p in store.path.rglob("*") if ".tmp-" in p.name] and store.verify().ok


# ---- on a GPU ----------------------------------------------------------------------------------------


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda(), reason="needs CUDA (the Triton kernel compiled)")
def test_a_compact_store_made_on_cuda_is_the_one_made_on_the_cpu(tmp_path, form):
    pytest.importorskip("triton")
    base_path, paths, _, _ = checkpoints(tmp_path)
    files = {}
    for where, opts in (("cuda", dict(device="cuda", chunk=128)), ("cpu", OPTS)):
        s = Store.unify(tmp_path / where, base_path, paths[:2], dtype=form, **opts)
        s.add(paths[2])
        files[where] = {p.relative_to(s.path).as_posix(): p.read_bytes() for p in s.path.rglob("*.safetensors")}
    assert files["cuda"] == files["cpu"]
