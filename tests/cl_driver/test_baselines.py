import torch
from safetensors.torch import save_file

from cl_driver import baselines


def test_max_magnitude_keeps_the_signed_delta_of_largest_magnitude():
    deltas = torch.tensor([[1.0, -5.0, 2.0, 0.0], [-3.0, 4.0, 2.0, 0.0]])
    assert torch.equal(baselines.max_magnitude(deltas, 1.0), torch.tensor([-3.0, -5.0, 2.0, 0.0]))
    assert torch.equal(baselines.max_magnitude(deltas, 0.5), torch.tensor([-1.5, -2.5, 1.0, 0.0]))


def test_merges_read_checkpoints_and_leave_integer_buffers_alone(tmp_path):
    base = {"w": torch.zeros(2, 2), "ids": torch.arange(3)}
    paths = []
    for i, w in enumerate([torch.tensor([[1.0, -2.0], [0.0, 3.0]]), torch.tensor([[-4.0, 1.0], [2.0, 1.0]])]):
        paths.append(tmp_path / f"{i}.safetensors")
        save_file({"w": w, "ids": torch.arange(3) + 7}, str(paths[-1]))
    ta = baselines.task_arithmetic(base, paths, alpha=0.5)
    assert torch.allclose(ta["w"], torch.tensor([[-1.5, -0.5], [1.0, 2.0]]))
    mm = baselines.magmax(base, paths, scale=1.0)
    assert torch.equal(mm["w"], torch.tensor([[-4.0, -2.0], [2.0, 3.0]]))
    assert torch.equal(ta["ids"], base["ids"]) and torch.equal(mm["ids"], base["ids"])
