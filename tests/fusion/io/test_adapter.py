"""Reading a PEFT adapter folder: the checkpoint it is, its config's factor fields, its tensors' roles."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from fusion.io import open_checkpoint
from fusion.io.adapter import (FACTOR_FIELDS, config_difference, dense_refusal, factor_config, read_adapter_config,
                               split_adapter_tensors)
from fusion.io.checkpoint import is_adapter_folder

P = "base_model.model."


def _adapter(folder, tensors, config):
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_an_adapter_folder_is_a_checkpoint_of_its_factors(tmp_path):
    a = np.ones((2, 3), np.float32)
    folder = _adapter(tmp_path / "lora", {f"{P}fc.lora_A.weight": a, f"{P}fc.lora_B.weight": a.T.copy()},
                      {"peft_type": "LORA"})
    (folder / "README.md").write_text("card")
    assert is_adapter_folder(folder) and not is_adapter_folder(tmp_path)
    with open_checkpoint(folder) as ckpt:
        assert ckpt.is_adapter and list(ckpt.files) == ["adapter_model.safetensors"]
        assert ckpt.keys() == [f"{P}fc.lora_A.weight", f"{P}fc.lora_B.weight"] and ckpt.name == "lora"
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"holds only pickle weights \(adapter_model.bin\)"):
        open_checkpoint(folder)


def test_factor_config_spells_each_meaning_one_way():
    written_by_new_peft = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["v", "q", "q"],
                           "modules_to_save": ["classifier", "classifier", "score"], "rank_pattern": {},
                           "alpha_pattern": {}, "use_qalora": False, "bias": "none", "lora_dropout": 0.1,
                           "init_lora_weights": "gaussian", "base_model_name_or_path": "org/a", "peft_version": "0.21"}
    written_by_old_peft = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q", "v"],
                           "modules_to_save": ["score", "classifier"], "rank_pattern": None, "lora_dropout": 0.0,
                           "base_model_name_or_path": "/elsewhere"}
    a, b = factor_config(written_by_new_peft), factor_config(written_by_old_peft)
    assert set(a) == set(FACTOR_FIELDS) and a == b and config_difference(a, b) is None
    assert a["target_modules"] == ["q", "v"] and a["rank_pattern"] is None and a["layers_to_transform"] is None
    assert factor_config({"layers_to_transform": 3})["layers_to_transform"] == [3]
    changed = factor_config({**written_by_old_peft, "lora_alpha": 32})
    assert config_difference(a, changed) == ("lora_alpha", 16, 32)
    assert config_difference(a, factor_config({**written_by_old_peft, "target_modules": "q|v"}))[0] == "target_modules"


@pytest.mark.parametrize("config, phrase", [
    ({"peft_type": "IA3"}, "peft_type is 'IA3'"),
    ({"peft_type": "LORA", "use_dora": True}, "use_dora is set"),
    ({"peft_type": "LORA", "lora_bias": True}, "lora_bias is set"),
    ({"peft_type": "LORA", "alora_invocation_tokens": [5]}, "alora_invocation_tokens is set"),
])
def test_variants_that_are_not_plain_lora_have_a_reason(config, phrase):
    assert phrase in dense_refusal(config)


def test_plain_lora_has_no_refusal():
    assert dense_refusal({"peft_type": "LORA", "use_dora": False, "lora_bias": False, "layer_replication": None,
                          "loftq_config": {}, "use_rslora": True, "fan_in_fan_out": True}) is None


def test_tensors_split_into_factor_pairs_and_whole_tensors():
    names = [f"{P}h.0.c_attn.lora_A.weight", f"{P}h.0.c_attn.lora_B.weight", f"{P}wte.lora_embedding_A",
             f"{P}wte.lora_embedding_B", f"{P}classifier.weight", f"{P}classifier.bias"]
    pairs, whole = split_adapter_tensors(names, "lora")
    assert [(p.module, p.embedding) for p in pairs] == [("h.0.c_attn", False), ("wte", True)]
    assert pairs[1].a == f"{P}wte.lora_embedding_A" and pairs[1].b == f"{P}wte.lora_embedding_B"
    assert whole == {"classifier.weight": f"{P}classifier.weight", "classifier.bias": f"{P}classifier.bias"}


@pytest.mark.parametrize("names, phrase", [
    ([f"{P}fc.lora_A.weight", f"{P}fc.lora_B.weight", f"{P}fc.lora_magnitude_vector"], "not an A or B factor"),
    ([f"{P}fc.lora_A.weight", f"{P}fc.lora_B.weight", f"{P}fc.lora_B.bias"], "not an A or B factor"),
    ([f"{P}fc.lora_A.weight"], "module 'fc' has no LoRA B factor"),
    (["fc.lora_A.weight", "fc.lora_B.weight"], "is not named as PEFT names adapter tensors"),
])
def test_tensors_that_are_no_plain_lora_are_refused_by_name(names, phrase):
    with pytest.raises(ValueError, match="^lora: ") as err:
        split_adapter_tensors(names, "lora")
    assert phrase in str(err.value) and "\n" not in str(err.value)


def test_an_unreadable_config_is_one_line(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{broken")
    with pytest.raises(ValueError, match="adapter_config.json: adapter config is not valid JSON"):
        read_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text("[1]")
    with pytest.raises(ValueError, match="not a JSON object"):
        read_adapter_config(tmp_path)
