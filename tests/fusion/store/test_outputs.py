"""Outputs never destroy data: nothing is replaced without --force, and the store, the base and the
recorded sources are never written, with or without it."""

import numpy as np
import pytest
from safetensors.numpy import load_file

from fusion import Store
from fusion.testing.checkpoints import snapshot

from .helpers import OPTS, equal_models, models, one_line_error, run


@pytest.fixture
def store(tmp_path):
    base_path, paths, _, _ = models(tmp_path, 2, layout="folder")
    return Store.unify(tmp_path / "s", base_path, paths, **OPTS)


def test_without_an_output_the_task_goes_to_a_folder_named_after_it(store, tmp_path):
    result = run(["decouple", "--store", store.path, "--task", "2", "-q"], tmp_path)
    assert result.exit_code == 0 and f"wrote {tmp_path / 'task2'}" in result.output
    assert equal_models(load_file(tmp_path / "task2" / "model.safetensors"), store.load_task(2))
    one_line_error(run(["decouple", "--store", store.path, "--task", "2", "-q"], tmp_path), "pass --force")


def test_an_existing_file_or_folder_is_replaced_only_with_force(store, tmp_path):
    (tmp_path / "out.safetensors").write_text("mine")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("mine")
    for out in ("out.safetensors", "folder"):
        one_line_error(run(["decouple", "--store", store.path, "--task", "1", "-o", out, "-q"], tmp_path), "--force")
    assert (tmp_path / "out.safetensors").read_text() == "mine" and (tmp_path / "folder" / "notes.txt").exists()
    for out in ("out.safetensors", "folder"):
        assert run(["decouple", "--store", store.path, "--task", "1", "-o", out, "--force", "-q"], tmp_path).exit_code == 0
    assert equal_models(load_file(tmp_path / "out.safetensors"), store.load_task(1))
    assert not (tmp_path / "folder" / "notes.txt").exists() and (tmp_path / "folder" / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporaries left


@pytest.mark.parametrize("target", ["s/unified-g000000.safetensors", "s", "s/triggers", "base",
                                    "base/model.safetensors", "base/sub", "task1.safetensors", "."])
def test_the_store_the_base_and_sources_are_never_written_even_with_force(store, tmp_path, target):
    before = {p: snapshot(tmp_path / p) for p in ("s", "base")}
    before.update({p: (tmp_path / p).read_bytes() for p in ("task1.safetensors", "task2.safetensors")})
    result = run(["decouple", "--store", store.path, "--task", "1", "-o", target, "--force", "-q"], tmp_path)
    one_line_error(result, "choose an output elsewhere")
    after = {p: snapshot(tmp_path / p) for p in ("s", "base")}
    after.update({p: (tmp_path / p).read_bytes() for p in ("task1.safetensors", "task2.safetensors")})
    assert after == before


def test_a_safetensors_output_into_a_folder_path_is_refused(store, tmp_path):
    (tmp_path / "x.safetensors").mkdir()
    one_line_error(run(["decouple", "--store", store.path, "--task", "1", "-o", "x.safetensors", "--force", "-q"],
                       tmp_path), "exists")


def test_pickle_output_names_are_refused(store, tmp_path):
    one_line_error(run(["decouple", "--store", store.path, "--task", "1", "-o", "m.bin"], tmp_path), "safetensors only")


def test_bf16_output_and_shards(store, tmp_path):
    result = run(["decouple", "--store", store.path, "--task", "1", "-o", "sharded", "--dtype", "bfloat16",
                  "--max-shard-size", "200B", "-q"], tmp_path)
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    from fusion.io import load

    loaded = load(tmp_path / "sharded")
    assert loaded["embed.weight"].dtype.name == "bfloat16" and loaded["position_ids"].dtype == np.int64


def test_a_default_output_that_is_a_source_becomes_name_decoupled(tmp_path):
    from fusion.testing.checkpoints import tiny_base, tiny_finetune, write_checkpoint

    base = tiny_base()
    write_checkpoint(base, tmp_path / "base", layout="folder")
    write_checkpoint(tiny_finetune(base, seed=0), tmp_path / "cola", layout="folder")  # named after its task
    assert run(["unify", "--base", "base", "cola", "-q"], tmp_path).exit_code == 0
    before = (tmp_path / "cola" / "model.safetensors").read_bytes()
    result = run(["decouple", "--task", "cola", "-q"], tmp_path)
    assert result.exit_code == 0 and f"wrote {tmp_path / 'cola-decoupled'}" in result.output
    assert (tmp_path / "cola" / "model.safetensors").read_bytes() == before
