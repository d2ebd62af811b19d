"""The folders condu-cl writes name their base as the ecosystem does: a model card's `base_model`,
`_name_or_path` in config.json, `base_model_name_or_path` in adapter_config.json."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from cl_driver import checkpoints, lora
from cl_driver.loop import ContinualRun
from cl_driver.models import Clip, base_reference, load_clip
from fusion import Store, hub
from fusion.cli import main as condu_fuse


def front_matter(folder: Path) -> dict:
    text = (folder / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n"), f"{folder}/README.md opens with no front matter"
    return yaml.safe_load(text.split("---\n")[1])


def fine_tunes(run: Path) -> list[Path]:
    folders = sorted(p for kind in ("individual", "sequential") for p in (run / "checkpoints" / kind).iterdir())
    assert len(folders) == 2 * 3  # three tasks, from theta0 and sequential
    return folders


def test_model_folders_name_theta0_in_their_card_and_config(small_run, tiny_model):
    base = str(tiny_model.resolve())
    for folder in fine_tunes(small_run):
        assert front_matter(folder) == {"base_model": base, "library_name": "transformers", "tags": ["condu"]}
        assert json.loads((folder / "config.json").read_text())["_name_or_path"] == base
        assert hub.recorded_base(folder) == base
        assert [r.file for r in hub.base_records(folder)] == ["README.md", "config.json"]  # both say the same
        assert {r.base for r in hub.base_records(folder)} == {base}


def test_adapter_folders_name_clip_in_their_card_and_adapter_config(small_lora_run, tiny_model):
    base = str(tiny_model.resolve())
    for folder in [small_lora_run / "base-adapter", *fine_tunes(small_lora_run)]:
        assert lora.is_adapter(folder)
        assert front_matter(folder) == {"base_model": base, "library_name": "peft", "tags": ["condu"]}
        assert json.loads((folder / lora.ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == base
        assert hub.recorded_base(folder) == base


def test_condu_fuse_unify_finds_the_base_of_fine_tunes_without_base(small_run, tiny_model, tmp_path):
    a, b = (small_run / "checkpoints" / "individual" / name for name in ("01-colors", "02-stripes"))
    store = tmp_path / "store"
    done = CliRunner().invoke(condu_fuse, ["unify", "--store", str(store), "--quiet", str(a), str(b)])
    assert done.exit_code == 0, done.output
    assert Path(Store.open(store).info()["base"]["path"]).resolve() == tiny_model.resolve()


def test_base_reference_is_the_hub_id_or_an_absolute_path(tiny_model, monkeypatch):
    monkeypatch.chdir(tiny_model.parent)
    clip = load_clip(tiny_model.name)  # a relative path
    assert base_reference(clip) == str(tiny_model.resolve())
    assert clip.model.config._name_or_path == clip.model.name_or_path == str(tiny_model.resolve())
    from_hub = hub.ResolvedCheckpoint(path=tiny_model, hub_id="org/tiny-clip", revision="v1", commit="abc")
    assert base_reference(Clip(clip.model, clip.tokenizer, clip.processor, "org/tiny-clip@v1", from_hub)) == "org/tiny-clip"


@pytest.mark.parametrize("base", ["org/name", "/data/models/clip base", "/data/a: b", "/data/it's", "C:\\models\\clip",
                                  "/data/-x", "no-slash"])
def test_every_base_reads_back_from_the_card(base, tmp_path):
    (tmp_path / "README.md").write_text(checkpoints.model_card("t", base, "text"), encoding="utf-8")
    assert yaml.safe_load((tmp_path / "README.md").read_text().split("---\n")[1])["base_model"] == base
    assert hub.recorded_base(tmp_path) == base


def test_a_run_folder_with_lone_checkpoint_files_keeps_them(tiny_config, tiny_model, tmp_path):
    view = ContinualRun(tiny_config, tmp_path / "run", progress=False, clip=load_clip(tiny_model))
    assert view.folder.checkpoint("individual", 0) == tmp_path / "run" / "checkpoints" / "individual" / "01-colors"
    lone = tmp_path / "run" / "checkpoints" / "individual" / "01-colors.safetensors"
    lone.parent.mkdir(parents=True)
    lone.write_bytes(b"")
    assert view.folder.checkpoint("individual", 0) == lone


def test_the_config_names_the_base_and_the_dtype_the_weights_were_written_in():
    weights = {"position_ids": torch.arange(3), "w": torch.zeros(2, dtype=torch.bfloat16)}
    config = checkpoints.config_naming_base({"dtype": "float32", "torch_dtype": "float32", "model_type": "clip"},
                                            "org/base", weights)
    assert config == {"dtype": "bfloat16", "torch_dtype": "bfloat16", "model_type": "clip", "_name_or_path": "org/base"}
    assert "torch_dtype" not in checkpoints.config_naming_base({"dtype": "float32"}, "org/base", weights)
