"""Decouple writes a task in its own dtype: the one its fine-tune had when it was added.

A bf16 fine-tune on an fp32 base comes back in bf16 (file, folder, load_task, the CLI), and in
fp32 with --dtype float32; fine-tunes of mixed dtypes come back tensor by tensor; a factor-space
adapter in the adapter's own dtype; private tensors as they were kept. A store written before the
field existed still loads and decouples in the base's dtypes, as it always did.
"""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from fusion import Store, reference
from fusion.dtypes import BF16, DTYPES, F16, from_float32
from fusion.errors import ManifestError
from fusion.io import SafetensorsWriter, load
from fusion.store.manifest import _checksum
from fusion.testing.checkpoints import tiny_base, tiny_finetune, write_checkpoint

from .helpers import OPTS, manifest, run, stored_unified


def _stores(tmp_path, ft_dtypes, **options):
    """An fp32 base folder and one fine-tune file per dtype ("mixed": float16 embedding, bfloat16 rest)."""
    base = tiny_base()
    base_path = write_checkpoint(base, tmp_path / "base", layout="folder")
    paths = []
    for k, dtype in enumerate(ft_dtypes):
        ft, path = tiny_finetune(base, seed=k), tmp_path / f"ft{k}.safetensors"
        if dtype == "mixed":
            _write_mixed(ft, path)
        else:
            write_checkpoint(ft, path, dtype=dtype)
        paths.append(path)
    store = Store.unify(tmp_path / "s", base_path, paths, names=[f"t{k}" for k in range(len(paths))], **OPTS, **options)
    return store, base


def _write_mixed(tensors: dict, path) -> None:
    def stored(name, array):
        if array.dtype.kind != "f":
            return DTYPES["I64"], array
        dtype = F16 if name == "embed.weight" else BF16
        return dtype, from_float32(array, dtype)

    items = {n: stored(n, a) for n, a in tensors.items()}
    with SafetensorsWriter(path, [(n, d, a.shape) for n, (d, a) in items.items()], checksums=False) as writer:
        for name, (_, array) in items.items():
            writer.write(name, array)


def _rebuilt_f32(store, number: int, base: dict) -> dict[str, np.ndarray]:
    """theta0 + where(M, u * lambda, 0) in float32 from the stored files: the readable rule."""
    entry = next(t for t in manifest(store.path)["tasks"] if t["number"] == number)
    unified, masks = stored_unified(store.path), load_file(store.path / entry["triggers"])
    return {n: reference.rebuild(t.reshape(-1), unified[n].reshape(-1), masks[n], entry["rescaler"]).reshape(t.shape)
            for n, t in base.items() if t.dtype.kind == "f"}


def _bits(array) -> bytes:
    return np.ascontiguousarray(array).tobytes()


def test_a_bf16_finetune_on_an_fp32_base_decouples_to_bf16_by_default_and_fp32_when_asked(tmp_path):
    store, base = _stores(tmp_path, ["bfloat16"])
    assert manifest(store.path)["tasks"][0]["dtype"] == "BF16" and store.task(1).dtype == "bfloat16"
    rebuilt = _rebuilt_f32(store, 1, base)
    file = load(store.decouple(1, tmp_path / "t.safetensors"))
    folder = store.decouple(1, tmp_path / "t")
    in_memory = store.load_task(1)
    for got in (file, load(folder), in_memory):
        for name, want in rebuilt.items():
            assert _bits(got[name]) == _bits(from_float32(want, BF16)), name
        assert np.array_equal(got["position_ids"], base["position_ids"])  # integer buffers as they are
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    assert "| dtype | bfloat16 |" in (folder / "README.md").read_text()
    assert sum(a.nbytes for a in file.values()) == sum(a.nbytes for a in load(tmp_path / "ft0.safetensors").values())

    result = run(["decouple", "--store", store.path, "--task", "t0", "-o", "f32.safetensors", "--dtype", "float32",
                  "-q"], tmp_path)
    assert result.exit_code == 0, result.output
    f32 = load_file(tmp_path / "f32.safetensors")
    for name, want in rebuilt.items():
        assert f32[name].dtype == np.float32 and _bits(f32[name]) == _bits(want), name
    assert run(["decouple", "--store", store.path, "--task", "t0", "-o", "cli.safetensors", "-q"],
               tmp_path).exit_code == 0
    assert (tmp_path / "cli.safetensors").read_bytes() == (tmp_path / "t.safetensors").read_bytes()


def test_info_shows_the_own_dtype_where_it_is_not_the_bases(tmp_path):
    store, _ = _stores(tmp_path, ["bfloat16", "float32"])
    text = run(["info", "--store", store.path], tmp_path).output
    rows = {line.split()[1]: line for line in text.splitlines() if line[:3].strip() in ("1", "2")}
    assert "own dtype bfloat16" in rows["t0"] and "own dtype" not in rows["t1"]
    tasks = json.loads(run(["info", "--store", store.path, "--json"], tmp_path).output)["tasks"]
    assert [t["dtype"] for t in tasks] == ["bfloat16", "float32"]


def test_a_finetune_of_mixed_dtypes_comes_back_tensor_by_tensor(tmp_path):
    store, base = _stores(tmp_path, ["mixed"])
    recorded = manifest(store.path)["tasks"][0]["dtype"]
    assert recorded["embed.weight"] == "F16" and set(recorded.values()) == {"F16", "BF16"}
    out = load(store.decouple(1, tmp_path / "t.safetensors"))
    for name, want in _rebuilt_f32(store, 1, base).items():
        dtype = F16 if name == "embed.weight" else BF16
        assert _bits(out[name]) == _bits(from_float32(want, dtype)), name
    assert "own dtype bfloat16/float16" in run(["info", "--store", store.path], tmp_path).output


def test_a_missing_tensor_and_a_private_one_follow_the_task(tmp_path):
    base = tiny_base()
    base_path = write_checkpoint(base, tmp_path / "base.safetensors")
    ft = tiny_finetune(base, seed=1)
    del ft["norm.weight"]  # counted as unchanged: written in the task's dtype all the same
    ft["head.weight"] = np.ones((5, 8), np.float32)  # another shape: kept whole, in its own dtype
    path = write_checkpoint(ft, tmp_path / "ft.safetensors", dtype="bfloat16")
    store = Store.unify(tmp_path / "s", base_path, [path], missing="zero", **OPTS)
    out = load(store.decouple(1, tmp_path / "t.safetensors"))
    assert _bits(out["norm.weight"]) == _bits(from_float32(base["norm.weight"] + np.float32(0), BF16))
    assert _bits(out["head.weight"]) == _bits(from_float32(np.ones((5, 8), np.float32), BF16))
    assert manifest(store.path)["tasks"][0]["dtype"] == "BF16"


def _strip_dtype(store_dir):
    """The manifest as a store made before tasks recorded their dtype wrote it (checksum recomputed)."""
    for name in ("condu.json", "condu.backup.json"):
        path = store_dir / name
        if not path.exists():
            continue
        content = json.loads(path.read_text())
        for task in content["tasks"]:
            task.pop("dtype")
        content["checksum"] = _checksum(content)
        path.write_text(json.dumps(content, separators=(",", ":")) + "\n")


def test_a_store_written_before_the_field_decouples_in_the_bases_dtype_as_before(tmp_path):
    store, base = _stores(tmp_path, ["bfloat16"])
    rebuilt = _rebuilt_f32(store, 1, base)
    _strip_dtype(store.path)
    old = Store.open(store.path)
    assert old.task(1).dtype is None and old.verify().ok
    outputs = (load(old.decouple(1, tmp_path / "old.safetensors")), old.load_task(1), load(old.decouple(1, tmp_path / "o")))
    for got in outputs:
        for name, want in rebuilt.items():
            assert got[name].dtype == np.float32 and _bits(got[name]) == _bits(want), name
    assert json.loads((tmp_path / "o" / "config.json").read_text())["dtype"] == "float32"
    assert "own dtype" not in run(["info", "--store", store.path], tmp_path).output
    # the next generation keeps it unrecorded, and a task added now records its own
    path = write_checkpoint(tiny_finetune(base, seed=9), tmp_path / "new.safetensors", dtype="bfloat16")
    old.add(path, name="new")
    assert [t["dtype"] for t in manifest(store.path)["tasks"]] == [None, "BF16"]


def test_a_recorded_dtype_that_is_not_a_float_or_names_no_fused_tensor_is_refused(tmp_path):
    store, _ = _stores(tmp_path, ["bfloat16"])
    path = store.path / "condu.json"
    for bad, phrase in (("I64", "is not a float dtype"), ({"nope": "F16"}, "names a tensor that is not fused")):
        content = json.loads(path.read_text())
        content["tasks"][0]["dtype"] = bad
        content["checksum"] = _checksum(content)
        broken = tmp_path / f"broken-{phrase.split()[1]}"
        shutil.copytree(store.path, broken)
        (broken / "condu.json").write_text(json.dumps(content))
        with pytest.raises(ManifestError, match=phrase):
            Store.open(broken)


def test_a_factor_space_adapter_decouples_in_its_own_dtype(tmp_path):
    from . import lora_models as lm  # torch, transformers and peft: imported for this test only

    base = lm.tiny_gpt2(tmp_path / "gpt2")
    init = lm.adapter(base, tmp_path / "init", init_seed=0)
    task = lm.adapter(base, tmp_path / "task", init_seed=0, task_seed=1)
    halves = {n: from_float32(t, BF16) for n, t in lm.factors(task).items()}
    _write_bf16(task / "adapter_model.safetensors", halves)
    store = Store.unify(tmp_path / "s", init, [task], **OPTS)
    assert manifest(store.path)["tasks"][0]["dtype"] == "BF16"
    folder = store.decouple(1, tmp_path / "out")
    out = load(folder / "adapter_model.safetensors")
    start, unified = lm.factors(init), stored_unified(store.path)
    masks = load_file(store.path / manifest(store.path)["tasks"][0]["triggers"])
    lam = manifest(store.path)["tasks"][0]["rescaler"]
    for name, theta0 in start.items():
        want = reference.rebuild(theta0.reshape(-1), unified[name].reshape(-1), masks[name], lam).reshape(theta0.shape)
        assert _bits(out[name]) == _bits(from_float32(want, BF16)), name


def _write_bf16(path, bits: dict[str, np.ndarray]) -> None:
    with SafetensorsWriter(path, [(n, BF16, a.shape) for n, a in bits.items()], metadata={"format": "pt"},
                           checksums=False) as writer:
        for name, array in bits.items():
            writer.write(name, array)
