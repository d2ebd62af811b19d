"""`condu-fuse decouple` of a condu-cl task gives a folder that transformers (or PEFT) loads, with the
weights the store rebuilds for that task."""

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cl_driver import lora
from fusion import Store
from fusion.cli import main as condu_fuse

from tests.cl_driver.helpers import TASKS, TEMPLATES

LOADS_WITH = {"config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"}


def decouple(store: Path, task: str, out: Path) -> Path:
    done = CliRunner().invoke(condu_fuse, ["decouple", "--store", str(store), "--task", task, "-o", str(out), "--quiet"])
    assert done.exit_code == 0, done.output
    return out


def test_every_task_keeps_the_base_config_tokenizer_and_processor_files(small_run, tiny_model):
    for task in Store.open(small_run / "stores" / "model").tasks:
        assert LOADS_WITH <= set(task.files), task.name
        assert all((tiny_model / name).is_file() for name in LOADS_WITH - {"config.json"})


def test_a_decoupled_expert_loads_with_transformers_and_has_the_store_weights(small_run, tiny_model, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    store = Store.open(small_run / "stores" / "model")
    theta0 = CLIPModel.from_pretrained(tiny_model).state_dict()
    for task in TASKS:
        folder = decouple(small_run / "stores" / "model", task, tmp_path / task)
        model = CLIPModel.from_pretrained(folder)
        processor = CLIPProcessor.from_pretrained(folder)
        expected = store.load_task(task, device="cpu")
        loaded = model.state_dict()
        assert set(expected) <= set(loaded)
        for name, tensor in expected.items():
            assert torch.equal(loaded[name], tensor), f"{task}: {name}"
        assert any(not torch.equal(theta0[name], tensor) for name, tensor in expected.items())  # an expert, not theta0
        inputs = processor(text=[TEMPLATES[0].format(c) for c in TASKS[task]],
                           images=[torch.zeros(3, 16, 16, dtype=torch.uint8)], return_tensors="pt", padding=True)
        with torch.no_grad():
            assert model(**inputs).logits_per_image.shape == (1, len(TASKS[task]))


def test_a_decoupled_lora_expert_loads_with_peft_on_the_base_clip(small_lora_run, tiny_model, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import CLIPModel

    store = Store.open(small_lora_run / "stores" / "model")
    for task in TASKS:
        folder = decouple(small_lora_run / "stores" / "model", task, tmp_path / task)
        assert lora.is_adapter(folder)
        model = PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_model), folder)
        loaded = get_peft_model_state_dict(model)
        expected = store.load_task(task, device="cpu")
        assert loaded.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(loaded[name], tensor), f"{task}: {name}"


@pytest.mark.parametrize("kind", ["individual", "sequential"])
def test_the_fine_tune_folders_load_with_transformers_too(small_run, kind):
    from safetensors.torch import load_file
    from transformers import CLIPModel, CLIPProcessor

    for folder in sorted((small_run / "checkpoints" / kind).iterdir()):
        model, _ = CLIPModel.from_pretrained(folder), CLIPProcessor.from_pretrained(folder)
        weights = load_file(str(folder / "model.safetensors"))
        assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in weights.items())
