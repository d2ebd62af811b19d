"""The mini CLIP's tokenizer, config and processor, and the shipped weights."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cl_driver.mini import captions
from cl_driver.mini.pretrain import (MAX_TEXT_LENGTH, clip_config, contrastive_loss, encode_texts, image_processor,
                                     lr_at, to_pixels, vocabulary_texts)
from cl_driver.mini.tasks import BUILTIN_TASKS, get_task
from cl_driver.mini.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, build_tokenizer

SHIPPED = Path(__file__).resolve().parents[2] / "cl_driver" / "assets" / "mini-clip"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(vocabulary_texts(), max_length=MAX_TEXT_LENGTH)


def test_special_ids_suit_clip_pooling(tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert EOS_ID != 2  # 2 selects the legacy "highest id" pooling in transformers' CLIP
    ids = tokenizer(["A photo of a red circle."])["input_ids"][0]
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID and EOS_ID not in ids[1:-1]


def test_every_prompt_and_caption_is_in_the_vocabulary(tokenizer):
    rng = np.random.default_rng(0)
    texts = [captions.sample_pair(rng, 16)[1] for _ in range(400)]
    texts += [t.format(c) for n in BUILTIN_TASKS for c in get_task(n).class_names for t in get_task(n).templates]
    ids = encode_texts(tokenizer, texts)["input_ids"]
    assert not (ids == UNK_ID).any()
    assert ids.shape[1] <= MAX_TEXT_LENGTH


def test_text_features_pool_at_the_eos_token(tokenizer):
    from transformers import CLIPModel

    torch.manual_seed(0)
    model = CLIPModel(clip_config(len(tokenizer), vision_width=64, vision_layers=1, text_width=64, text_layers=1,
                                  projection_dim=16)).eval()
    tokens = encode_texts(tokenizer, ["the digit one", "a photo of a large red circle in the center"])
    eos = (tokens["input_ids"] == EOS_ID).int().argmax(1)
    with torch.no_grad():
        hidden = model.text_model(**tokens).last_hidden_state
        expected = model.text_projection(hidden[torch.arange(2), eos])
        out = model.get_text_features(**tokens)
    got = out if isinstance(out, torch.Tensor) else out.pooler_output
    assert eos.tolist() == [4, 11]
    torch.testing.assert_close(got, expected)


def test_processor_keeps_the_small_size_and_matches_training_pixels():
    images, _ = get_task("shapes").render("test", 3)
    pixels = image_processor(32)(images=images, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (3, 3, 32, 32)
    torch.testing.assert_close(pixels, to_pixels(images), atol=1e-5, rtol=0)


def test_contrastive_loss_is_chance_for_random_and_low_for_matching():
    torch.manual_seed(0)
    x = torch.randn(32, 8)
    scale = torch.tensor(np.log(100.0))
    assert contrastive_loss(x, x, scale) < 0.1
    assert abs(contrastive_loss(torch.zeros(32, 8), torch.zeros(32, 8), scale) - np.log(32)) < 1e-4


def test_lr_schedule_warms_up_then_decays():
    lrs = [lr_at(s, peak=1.0, warmup=10, total=100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] > lrs[50] > lrs[99] >= 0.05


# The demo's model, and the study's two other widths (benchmarks/mini_mtil_study.py).
@pytest.mark.parametrize("folder", [SHIPPED, SHIPPED.with_name("mini-clip-small"), SHIPPED.with_name("mini-clip-large")],
                         ids=lambda p: p.name)
def test_shipped_model_loads_and_is_recorded(folder):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    proc = AutoImageProcessor.from_pretrained(folder)
    assert model.config.text_config.eos_token_id == tok.eos_token_id == EOS_ID
    assert model.config.text_config.max_position_embeddings == MAX_TEXT_LENGTH
    assert proc.crop_size["height"] == model.config.vision_config.image_size == 32
    record = json.loads((folder / "PRETRAIN.json").read_text())
    assert set(record["zero_shot"]) == set(BUILTIN_TASKS) and record["steps_done"] > 0
    assert record["parameters"] == sum(p.numel() for p in model.parameters())
    assert (folder / "model.safetensors").stat().st_size < 20 * 10**6  # what the project ships stays small
