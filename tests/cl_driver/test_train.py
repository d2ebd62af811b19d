import pytest
import torch
from safetensors.torch import load_file

from cl_driver.config import TrainingConfig
from cl_driver.data import TaskSpec, as_dataset, folder_split
from cl_driver.models import load_clip, state_dict_cpu
from cl_driver.train import cosine_with_warmup, finetune, select_trainable

from tests.cl_driver.helpers import SIDE, TASKS, TEMPLATES, write_task_folder


def test_cosine_schedule_with_warmup():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = cosine_with_warmup(opt, warmup_steps=4, total_steps=12)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(), sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and lrs[8] == pytest.approx(0.5) and lrs[-1] < 0.05


@pytest.mark.parametrize("part", ["image", "text"])
def test_finetune_changes_only_the_chosen_tower(part, tiny_model, tmp_path):
    clip = load_clip(tiny_model)
    theta0 = state_dict_cpu(clip.model)
    write_task_folder(tmp_path, "colors", n_train=4, n_test=1)
    spec = TaskSpec("colors", tuple(TASKS["colors"]), tuple(TEMPLATES), {"kind": "folder"})
    dataset = as_dataset(folder_split(tmp_path / "colors" / "train", TASKS["colors"]), clip.processor, SIDE)
    settings = TrainingConfig(iterations=3, batch_size=4, lr=1e-2, warmup_steps=1, train_part=part)
    path = finetune(clip, theta0, spec, dataset, settings, tmp_path / "01-colors", progress=False)
    tuned = load_file(str(path / "model.safetensors"))
    assert set(tuned) == set(theta0)
    changed = {name for name in theta0 if not torch.equal(tuned[name], theta0[name])}
    towers = ("vision_model.", "visual_projection.") if part == "image" else ("text_model.", "text_projection.")
    assert changed and all(name.startswith(towers) for name in changed)
    assert torch.equal(tuned["logit_scale"], theta0["logit_scale"])


def test_select_trainable_whole_freezes_only_the_temperature(tiny_model):
    clip = load_clip(tiny_model)
    trainable = select_trainable(clip.model, "whole")
    assert len(trainable) == len(list(clip.model.parameters())) - 1
    assert not clip.model.logit_scale.requires_grad
