"""ZSCL's rule on hand-computed cases: its distillation, the reference loss in both directions, the
L2 pull and weight ensembling, through the training hook on a tiny model; its reference sets."""

import math

import pytest
import torch

from cl_driver import zscl
from cl_driver.config import ZsclReference, ZsclSettings

E = math.e
L = math.log(1 + E)


def test_distillation_is_the_soft_cross_entropy_at_temperature_t_times_t_squared():
    teacher = torch.tensor([[0.0, 0.0]])  # softmax(teacher / 2) = [1/2, 1/2]
    student = torch.tensor([[0.0, 2 * math.log(3)]])  # softmax(student / 2) = [1/4, 3/4]
    # -(1/2 ln 1/4 + 1/2 ln 3/4) * 2^2 = 2 ln(16/3)
    assert zscl.distillation(teacher, student, 2.0).item() == pytest.approx(2 * math.log(16 / 3))
    assert zscl.distillation(teacher, teacher, 1.0).item() == pytest.approx(math.log(2))  # the target's entropy


def test_reference_loss_distils_both_directions():
    current, pretrained, texts = torch.eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.eye(2)
    # student logits I, teacher logits [[0, 1], [1, 0]]: each row costs ln(1 + e) - 1 / (1 + e), and
    # the transposed logits are the same matrices
    one_way = L - 1 / (1 + E)
    assert zscl.reference_loss(current, pretrained, texts, torch.tensor(1.0), 1.0, text_loss=False).item() == \
        pytest.approx(one_way)
    assert zscl.reference_loss(current, pretrained, texts, torch.tensor(1.0), 1.0).item() == pytest.approx(2 * one_way)


def test_l2_is_the_summed_squared_distance_to_the_start():
    params = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    assert zscl.l2_to_start(params, [torch.zeros(2), torch.tensor([[1.0]])]).item() == 9.0


class TinyClip(torch.nn.Module):
    """get_image_features is a linear map of the 2 'pixels'; CLIP's logit scale is exp(0) = 1."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(2, 2, bias=False)
        self.logit_scale = torch.nn.Parameter(torch.tensor(0.0), requires_grad=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(2))

    def get_image_features(self, pixel_values):
        return self.proj(pixel_values)


def hook(reference=None, **settings):
    return zscl.ZsclTraining(reference, ZsclSettings(**settings), batch_size=2, seed=0)


def test_the_hook_distils_on_the_reference_set_and_pulls_to_the_start():
    model = TinyClip()
    reference = zscl.Reference(torch.utils.data.TensorDataset(torch.eye(2), torch.arange(2)),
                               images0=torch.tensor([[0.0, 1.0], [1.0, 0.0]]), texts0=torch.eye(2))
    training = hook(reference, weight=0.5, temperature=1.0, l2=0.25, ensemble_interval=None)
    training.begin(model)
    # the batch holds both reference images (in some order): the case above, at weight 0.5
    assert training.loss(model, 0).item() == pytest.approx(0.5 * 2 * (L - 1 / (1 + E)))
    with torch.no_grad():
        model.proj.weight.add_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))  # moved 1 and 2 from the start
    without_distillation = hook(None, weight=0.0, l2=0.25, ensemble_interval=None)
    without_distillation.start = training.start
    without_distillation.params = training.params
    assert without_distillation.loss(model, 1).item() == pytest.approx(0.25 * 5)
    assert hook(None, weight=0.0, l2=0.0).loss(model, 0) is None


def test_weight_ensembling_averages_the_start_and_every_interval_th_iteration():
    model = TinyClip()
    with torch.no_grad():
        model.proj.weight.zero_()
    training = hook(None, weight=0.0, l2=0.0, ensemble_interval=2)
    training.begin(model)  # the start, 0, is the first member
    for step, value in enumerate([1.0, 2.0, 3.0, 4.0, 5.0]):
        with torch.no_grad():
            model.proj.weight.fill_(value)
        training.after_step(model, step)  # steps 0, 2 and 4 join: 1, 3, 5
    training.end(model)
    assert torch.equal(model.proj.weight, torch.full((2, 2), (0 + 1 + 3 + 5) / 4))
    assert training.ensembled == 3
    assert [zscl.averaged_at(k, 100) for k in (0, 1, 99, 100, 200)] == [True, False, False, True, True]
    last = hook(None, weight=0.0, l2=0.0, ensemble_interval=None)
    last.begin(model)
    with torch.no_grad():
        model.proj.weight.fill_(7.0)
    last.after_step(model, 0)
    last.end(model)
    assert torch.equal(model.proj.weight, torch.full((2, 2), 7.0))  # no ensembling: the last weights


def test_the_mini_reference_set_is_the_pretraining_distribution_the_same_for_a_seed():
    from cl_driver.mini.captions import reference_pairs

    images, texts = reference_pairs(3, image_size=16, seed=0)
    again, texts_again = reference_pairs(3, image_size=16, seed=0)
    assert texts == texts_again and [im.tobytes() for im in images] == [im.tobytes() for im in again]
    assert images[0].size == (16, 16) and reference_pairs(3, image_size=16, seed=1)[1] != texts
    split, chosen = zscl.reference_set(ZsclReference(images=3, texts=2), 16)
    assert len(split) == 3 and split.labels == [0, 1, 2] and len(chosen) == 2 and set(chosen) <= set(texts)


def test_a_folder_reference_set_reads_captions_or_class_folders(tmp_path):
    from PIL import Image

    for folder in ("012_sea_lion", "dog"):
        (tmp_path / "images" / folder).mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (4, 4), (k, 0, 0)).save(tmp_path / "images" / folder / f"{k}.png")
    (tmp_path / "images" / ".hidden").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "images" / ".hidden" / "x.png")
    split, texts = zscl.reference_set(ZsclReference(kind="folder", path=str(tmp_path / "images")), 4)
    assert len(split) == 4 and texts == ["a photo of a sea lion.", "a photo of a dog."]
    (tmp_path / "captions.txt").write_text("a red dog\n\n a blue cat \n")
    (tmp_path / "cc.tsv").write_text("filepath\ttitle\nx.jpg\ta grey seal\ny.jpg\ta boat\n")
    reference = ZsclReference(kind="folder", path=str(tmp_path / "images"), images=3)
    split, texts = zscl.reference_set(reference.replace(captions=str(tmp_path / "captions.txt")), 4)
    assert len(split) == 3 and texts == ["a red dog", "a blue cat"]
    assert zscl.reference_set(reference.replace(captions=str(tmp_path / "cc.tsv")), 4)[1] == ["a grey seal", "a boat"]
    (tmp_path / "bad.tsv").write_text("filepath\tcaption\nx.jpg\ta\n")
    with pytest.raises(ValueError, match="no `title` column"):
        zscl.reference_set(reference.replace(captions=str(tmp_path / "bad.tsv")), 4)
    with pytest.raises(ValueError, match="no such folder"):
        zscl.reference_set(reference.replace(path=str(tmp_path / "nope")), 4)
