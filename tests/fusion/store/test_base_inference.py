"""`condu-fuse unify ckpt_a ckpt_b` without --base: the base the checkpoints record, and which record.

Checkpoints saved by transformers 5 no longer hold `_name_or_path`; their model card's front
matter (`base_model`) and a PEFT adapter's config do. The card is read by a small, bounded reader
of that one key.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from fusion import Store
from fusion.hub import _CARD_BYTES, BaseRecord, base_records, card_base_model, recorded_base
from fusion.store.inputs import infer_base
from fusion.testing.checkpoints import tiny_base, tiny_finetune, write_checkpoint

from tests.hub_cache import add_to_cache

from .helpers import OPTS, one_line_error, run

GPT2 = "openai-community/gpt2"


def card(folder: Path, front: str | None, body: str = "# A fine-tune\n") -> Path:
    """A model card README.md; `front` is the text between the `---` fences (None: no front matter)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text(body if front is None else f"---\n{front}---\n{body}")
    return folder / "README.md"


@pytest.mark.parametrize("front", [
    f"base_model: {GPT2}\n",
    f"license: mit\nbase_model: '{GPT2}'  # the model it was trained from\ntags:\n- text\n",
    f'base_model: "{GPT2}"\n',
    f"base_model: [{GPT2}]\n",
    f"library_name: peft\nbase_model:\n- {GPT2}\npipeline_tag: text-generation\n",
    f"base_model:\n  - '{GPT2}'   # one\n",
    f"base_model_relation: adapter\nbase_model: {GPT2}\n",
])
def test_the_card_names_its_base_as_a_string_or_a_list_of_one(tmp_path, front):
    assert card_base_model(card(tmp_path, front)) == GPT2


@pytest.mark.parametrize("front, base", [
    ("base_model: \"/data/it's #1\"  # a comment\n", "/data/it's #1"),
    ("base_model: '/data/run #2'\n", "/data/run #2"),
    ("base_model: ['/data/a #b']  # one\n", "/data/a #b"),
    ("base_model: /data/it's  # a comment\n", "/data/it's"),
    ("base_model: org/m#1\n", "org/m#1"),  # a '#' inside a plain scalar starts no comment
])
def test_a_hash_inside_quotes_is_part_of_the_name(tmp_path, front, base):
    assert card_base_model(card(tmp_path, front)) == base


def test_fences_as_the_hub_reads_them(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_bytes(f"\ufeff---\r\nbase_model: {GPT2}\r\n---\r\nbody\r\n".encode())
    assert card_base_model(readme) == GPT2  # a byte-order mark and CRLF lines
    readme.write_text(f"---\nbase_model: {GPT2}\n")
    assert card_base_model(readme) is None  # never closed: no front matter
    readme.write_text(f"# Title\n\n---\nbase_model: {GPT2}\n---\n")
    assert card_base_model(readme) is None  # fences not at the top
    readme.write_text("---\n" + "x: y\n" * (_CARD_BYTES // 5) + f"base_model: {GPT2}\n---\n")
    assert card_base_model(readme) is None  # read no further than the bound


@pytest.mark.parametrize("front, body", [
    (None, f"# Card\nbase_model: {GPT2}\n"),  # no front matter: the body is not metadata
    ("license: mit\ntags: [a, b]\n", ""),  # front matter without base_model
    ("base_model:\nlicense: mit\n", ""),  # null
    ("base_model: ~\n", ""),
    ("base_model: []\n", ""),
    ("  base_model: org/nested\n", ""),  # not a top-level key
])
def test_a_card_without_a_base(tmp_path, front, body):
    assert card_base_model(card(tmp_path, front, body)) is None


@pytest.mark.parametrize("front, phrase", [
    ("base_model:\n- org/a\n- org/b\n", "base_model lists 2 models (a merge); pass --base"),
    ("base_model: [org/a, org/b]\n", "base_model lists 2 models"),
    ("base_model:\n  name: org/a\n", "neither a model id nor a list of one"),
    ("base_model: |\n  org/a\n", "neither a model id nor a list of one"),
    ("base_model: 'org/a\n", "neither a model id nor a list of one"),
])
def test_a_base_model_that_is_not_one_id_is_one_line_naming_the_card(tmp_path, front, phrase):
    readme = card(tmp_path, front)
    with pytest.raises(ValueError) as err:
        card_base_model(readme)
    assert str(err.value).startswith(f"{readme}: ") and phrase in str(err.value) and "\n" not in str(err.value)


def test_the_card_comes_first_then_the_adapter_config_then_the_config(tmp_path):
    folder = tmp_path / "ckpt"
    card(folder, "base_model: org/from-card\n")
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/from-adapter"}))
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "org/from-config"}))
    assert list(base_records(folder)) == [
        BaseRecord("org/from-card", "base_model", "README.md"),
        BaseRecord("org/from-adapter", "base_model_name_or_path", "adapter_config.json"),
        BaseRecord("org/from-config", "_name_or_path", "config.json")]
    assert recorded_base(folder) == "org/from-card"
    (folder / "config.json").write_text("{not json")
    assert recorded_base(folder) == "org/from-card"  # a later record is not read when an earlier one names the base
    card(folder, "license: mit\n")  # a card without base_model: the next record
    assert recorded_base(folder) == "org/from-adapter"
    assert list(base_records(tmp_path / "nowhere")) == [] and list(base_records(folder / "config.json")) == []


# ---- unify without --base -------------------------------------------------------------------


@pytest.fixture
def saved_today(tmp_path, monkeypatch):
    """A base folder and two fine-tunes as transformers 5 saves them: a config without
    _name_or_path, and a model card naming the base (here by its path)."""
    monkeypatch.chdir(tmp_path)
    base = tiny_base()
    base_path = write_checkpoint(base, tmp_path / "base", layout="folder")
    for seed, name in enumerate(("ckpt_a", "ckpt_b")):
        folder = write_checkpoint(tiny_finetune(base, seed=seed), tmp_path / name, layout="folder")
        (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
        card(folder, f"base_model: {base_path}\nlibrary_name: transformers\n")
    return base_path


def test_the_design_card_example_with_checkpoints_saved_today(saved_today, tmp_path):
    result = run(["unify", "ckpt_a", "ckpt_b", "--kernel", "reference"], tmp_path)
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [f"condu-fuse: base: {saved_today} (base_model in ckpt_a/README.md, agreed by "
                                          "2 checkpoints)"]
    assert "unified 2 task(s)" in result.stdout and "base:" not in result.stdout
    quiet = run(["unify", "ckpt_a", "ckpt_b", "--store", "quiet", "-q", "--kernel", "reference"], tmp_path)
    assert quiet.exit_code == 0 and quiet.stderr == ""
    assert Store.open(tmp_path / "condu-store").manifest().base.path == str(saved_today.resolve())


def test_the_python_api_says_which_record_it_took(saved_today, tmp_path):
    (tmp_path / "ckpt_b" / "README.md").unlink()
    (tmp_path / "ckpt_b" / "config.json").write_text(json.dumps({"_name_or_path": str(saved_today)}))
    store = Store.unify(tmp_path / "s", None, ["ckpt_a", "ckpt_b"], **OPTS)
    inferred = store.inferred_base
    assert inferred.base == str(saved_today)
    assert [(r.checkpoint, r.key, r.where) for r in inferred.records] == [
        ("ckpt_a", "base_model", os.path.join("ckpt_a", "README.md")),
        ("ckpt_b", "_name_or_path", os.path.join("ckpt_b", "config.json"))]
    assert inferred.said_by == "base_model in ckpt_a/README.md, agreed by 2 checkpoints"
    assert inferred.factor_store_bytes is None  # full fine-tunes: nothing to say about factor space
    assert Store.unify(tmp_path / "given", saved_today, ["ckpt_a"], **OPTS).inferred_base is None
    assert infer_base(["ckpt_a"]).said_by == "base_model in ckpt_a/README.md"


def test_disagreeing_or_missing_records_are_one_line_naming_each(saved_today, tmp_path):
    card(tmp_path / "ckpt_b", "base_model: [org/other]\n")
    line = one_line_error(run(["unify", "-q", "ckpt_a", "ckpt_b"], tmp_path), "the checkpoints record different bases")
    assert (f"ckpt_a '{saved_today}' (base_model in ckpt_a/README.md), ckpt_b 'org/other' (base_model in "
            "ckpt_b/README.md); pass --base with the one they share") in line
    (tmp_path / "ckpt_b" / "README.md").unlink()
    line = one_line_error(run(["unify", "-q", "ckpt_a", "ckpt_b"], tmp_path), "ckpt_b: records no base model")
    assert ("no base_model in README.md, no base_model_name_or_path in adapter_config.json, no _name_or_path in "
            "config.json); pass --base") in line
    card(tmp_path / "ckpt_b", "base_model:\n- org/a\n- org/b\n")
    one_line_error(run(["unify", "-q", "ckpt_a", "ckpt_b"], tmp_path), "README.md: base_model lists 2 models")
    assert not (tmp_path / "condu-store").exists()


def test_a_hub_checkpoint_card_names_its_base(saved_today, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    add_to_cache(tmp_path / "hf-home" / "hub", "org/ckpt-b", "c" * 40, tmp_path / "ckpt_b", refs=("main",))
    inferred = infer_base(["ckpt_a", "org/ckpt-b"])
    assert inferred.base == str(saved_today) and inferred.records[1].where == "README.md of org/ckpt-b"


# ---- adapters fused dense by inference: factor space would be smaller --------------------------


def lora(folder: Path, base: Path, seed: int, *, rank: int = 2) -> Path:
    """A PEFT-layout LoRA adapter of the tiny base's `layer.0` (8 x 8) that records `base`."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    save_file({"base_model.model.layer.0.lora_A.weight": rng.standard_normal((rank, 8)).astype(np.float32),
               "base_model.model.layer.0.lora_B.weight": rng.standard_normal((8, rank)).astype(np.float32)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
                                                            "target_modules": ["layer.0"],
                                                            "base_model_name_or_path": str(base)}))
    return folder


def factor_note(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if "factor space" in line]


def test_adapters_of_one_configuration_hear_of_factor_space(saved_today, tmp_path):
    for k in (1, 2, 3):
        lora(tmp_path / f"lora{k}", saved_today, seed=k)
    result = run(["unify", "--kernel", "reference", "lora1", "lora2", "lora3"], tmp_path)
    assert result.exit_code == 0, result.output
    store = Store.open(tmp_path / "condu-store")
    assert store.manifest().space == "dense"
    # rank 2 on an 8 x 8 weight: 32 float32 factors, and 4 bytes of mask bits per task
    assert infer_base(["lora1", "lora2", "lora3"]).factor_store_bytes == 32 * 4 + 3 * 4
    dense = store.info()["sizes"]["total"]
    (note,) = factor_note(result)
    assert note == (f"condu-fuse: note: every checkpoint is a LoRA adapter of one configuration; if they share an "
                    f"initial adapter, fused in factor space they take about 140 B instead of this dense store's "
                    f"{dense / 1024:.1f} KiB ({dense / 140:.1f}x smaller): unify again with --base <their initial "
                    "adapter folder>")
    assert result.stderr.splitlines()[0].startswith("condu-fuse: base: ")


@pytest.mark.parametrize("case", ["a full fine-tune among them", "another rank", "--base given", "-q"])
def test_the_factor_space_note_only_where_it_can_be_true(saved_today, tmp_path, case):
    lora(tmp_path / "lora1", saved_today, seed=1)
    second = {"a full fine-tune among them": "ckpt_a", "another rank": "lora4"}.get(case, "lora2")
    if second != "ckpt_a":
        lora(tmp_path / second, saved_today, seed=2, rank=4 if second == "lora4" else 2)
    options = {"--base given": ["--base", saved_today], "-q": ["-q"]}.get(case, [])
    result = run(["unify", "--kernel", "reference", *options, "lora1", second], tmp_path)
    assert result.exit_code == 0, result.output
    assert factor_note(result) == []
    if case in ("a full fine-tune among them", "another rank"):
        assert infer_base(["lora1", second]).factor_store_bytes is None
