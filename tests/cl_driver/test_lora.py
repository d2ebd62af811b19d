"""LoRA as the official variant has it, on the tiny random CLIP: the adapter, its merge, training
only the factors, and the whole loop with `train_part: lora` fused in factor space."""

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

from cl_driver import lora
from cl_driver.config import TrainingConfig, parse_config
from cl_driver.data import TaskSpec, as_dataset, folder_split
from cl_driver.inference import accuracy
from cl_driver.loop import ContinualRun, run
from cl_driver.models import (base_reference, clip_logits, image_features, load_clip, load_weights, state_dict_cpu,
                              text_classifier)
from cl_driver.prototypes import dataset_features
from cl_driver.train import finetune_lora
from fusion import Store

from tests.cl_driver.helpers import SIDE, TASKS, TEMPLATES, tiny_config_dict

RANK = 4
TARGET = re.compile(r"^base_model\.model\.(text|vision)_model\.encoder\.layers\.\d\.mlp\.fc[12]\.lora_[AB]\.weight$")


@pytest.fixture
def clip(tiny_model):
    return load_clip(tiny_model)


@pytest.fixture
def initial(clip, tmp_path):
    return lora.write_initial_adapter(clip.model, RANK, 0.01, seed=0, out=tmp_path / "base-adapter",
                                      base=base_reference(clip))


def test_the_initial_adapter_covers_the_mlp_linears_of_both_towers(clip, initial, tmp_path):
    factors = load_file(str(initial / lora.ADAPTER_WEIGHTS))
    assert len(factors) == 2 * 2 * 2 * 2 and all(TARGET.match(k) for k in factors)  # towers x layers x fc x (A, B)
    assert {k.split(".")[2] for k in factors} == {"text_model", "vision_model"}
    config = json.loads((initial / lora.ADAPTER_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (RANK, 1, True)
    assert lora.adapter_scaling(initial) == pytest.approx(1 / math.sqrt(RANK))
    for key, factor in factors.items():  # both factors random and small, none zero
        assert factor.abs().min() > 0 and 0.005 < factor.std() < 0.02, key
    again = load_file(str(lora.write_initial_adapter(clip.model, RANK, 0.01, seed=0, out=tmp_path / "again",
                                                     base=base_reference(clip)) / lora.ADAPTER_WEIGHTS))
    assert all(torch.equal(again[k], factors[k]) for k in factors)  # one init, the same for every task
    assert not any("lora" in name for name, _ in clip.model.named_modules())  # the model is left as it was


def test_merged_factors_are_what_peft_computes(clip, initial):
    from peft import PeftModel, set_peft_model_state_dict

    dense = state_dict_cpu(clip.model)
    factors = {k: v * 30 for k, v in load_file(str(initial / lora.ADAPTER_WEIGHTS)).items()}  # visible deltas
    merged = lora.merge_factors(dense, factors, lora.adapter_scaling(initial))
    changed = {k for k in dense if not torch.equal(dense[k], merged[k])}
    assert changed == {k[len("base_model.model."):-len(".lora_A.weight")] + ".weight"
                       for k in factors if k.endswith("lora_A.weight")}
    pixels = torch.rand(3, 3, SIDE, SIDE)
    with lora.attached(clip.model, initial, trainable=False) as peft_model:  # PEFT's forward with the factors
        assert not set_peft_model_state_dict(peft_model, factors).unexpected_keys
        expected = image_features(clip.model, pixels)
    load_weights(clip.model, merged)
    torch.testing.assert_close(image_features(clip.model, pixels), expected, atol=1e-5, rtol=1e-5)
    reference = PeftModel.from_pretrained(load_clip(clip.source).model, str(initial))  # and PEFT's own merge
    set_peft_model_state_dict(reference, factors)
    merged_by_peft = reference.merge_and_unload().state_dict()
    for key in changed:
        torch.testing.assert_close(merged[key], merged_by_peft[key], atol=1e-6, rtol=1e-6)


def test_finetune_lora_trains_only_the_factors(clip, initial, tmp_path, tiny_data):
    from peft import PeftModel

    dense = state_dict_cpu(clip.model)
    spec = TaskSpec("colors", tuple(TASKS["colors"]), tuple(TEMPLATES), {"kind": "folder"})
    dataset = as_dataset(folder_split(tiny_data / "colors" / "train", TASKS["colors"]), clip.processor, SIDE)
    settings = TrainingConfig(iterations=4, batch_size=4, lr=1e-2, warmup_steps=1, train_part="lora")
    out = finetune_lora(clip, dense, initial, spec, dataset, settings, tmp_path / "01-colors", progress=False)
    assert lora.is_adapter(out)
    start, tuned = load_file(str(initial / lora.ADAPTER_WEIGHTS)), load_file(str(out / lora.ADAPTER_WEIGHTS))
    assert tuned.keys() == start.keys() and all(not torch.equal(tuned[k], start[k]) for k in tuned)
    after = state_dict_cpu(clip.model)  # the adapter is gone again and CLIP's own weights never moved
    assert after.keys() == dense.keys() and all(torch.equal(after[k], dense[k]) for k in dense)
    loaded = PeftModel.from_pretrained(load_clip(clip.source).model, str(out))
    assert sum(1 for name, _ in loaded.named_modules() if name.endswith("lora_A")) == 8


@pytest.fixture(scope="module")
def lora_run(tiny_model, tiny_data, tmp_path_factory):
    methods = ["zero_shot", "individual", "sequential", {"kind": "task_arithmetic", "alpha": 0.5},
               {"kind": "condu", "rescaler": "model"}, {"kind": "condu", "rescaler": "model", "agnostic": True}]
    raw = tiny_config_dict(tiny_data, tiny_model, methods=methods)
    raw["training"].update(train_part="lora", lr=1e-2, lora={"rank": RANK, "init_std": 0.01})
    config = parse_config(raw, where="tiny-lora.yaml")
    out = tmp_path_factory.mktemp("run-lora")
    return config, out, run(config, out, progress=False)


def test_a_lora_run_keeps_adapter_folders_and_a_factor_space_store(lora_run, tiny_model):
    config, out, results = lora_run
    view = ContinualRun(config, out, progress=False)
    assert lora.is_adapter(out / "base-adapter") and not (out / "base.safetensors").exists()
    base = load_file(str(out / "base-adapter" / lora.ADAPTER_WEIGHTS))
    store = Store.open(out / "stores" / "model")
    assert [t.name for t in store.tasks] == list(TASKS)
    for j in range(len(TASKS)):
        checkpoint = view.folder.checkpoint("individual", j)
        assert lora.is_adapter(checkpoint) and lora.is_adapter(view.folder.checkpoint("sequential", j))
        rebuilt = store.load_task(j + 1, device="cpu")
        assert rebuilt.keys() == base.keys()  # the store holds factors, never dense weights
        own = load_file(str(checkpoint / lora.ADAPTER_WEIGHTS))
        assert any(not torch.equal(own[k], base[k]) for k in own)
    own_step = results["fidelity"]["model"][0]["own_step"]  # a lone task's factors are rebuilt exactly ...
    assert own_step["cosine"] == pytest.approx(1.0) and own_step["rel_l2"] == pytest.approx(0.0)
    assert results["matrices"]["condu-model"][0][0] == results["matrices"]["individual"][0][0]  # ... same expert


def test_lora_accuracies_are_those_of_clip_with_the_merged_factors(lora_run, tiny_model):
    config, out, results = lora_run
    view = ContinualRun(config, out, progress=False)
    clip = load_clip(tiny_model)
    dense = state_dict_cpu(clip.model)
    scaling = lora.adapter_scaling(out / "base-adapter")
    store = Store.open(out / "stores" / "model")

    def accuracy_on(j, factors):
        load_weights(clip.model, lora.merge_factors(dense, factors, scaling))
        dataset, labels = view.data.test_set(j)
        feats, _ = dataset_features(clip, dataset)
        spec = view.specs[j]
        return accuracy(clip_logits(clip.model, feats, text_classifier(clip, spec.class_names, spec.templates)), labels)

    theta0 = load_file(str(out / "base-adapter" / lora.ADAPTER_WEIGHTS))
    assert [accuracy_on(j, theta0) for j in range(len(TASKS))] == results["matrices"]["zero_shot"][0]
    for j in range(len(TASKS)):
        assert accuracy_on(j, store.load_task(j + 1, device="cpu")) == results["matrices"]["condu-model"][-1][j]
        own = load_file(str(view.folder.checkpoint("individual", j) / lora.ADAPTER_WEIGHTS))
        assert accuracy_on(j, own) == results["matrices"]["individual"][-1][j]
