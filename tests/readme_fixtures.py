"""Every folder and hub id the README's examples name, as tiny models in one workspace.

    base/ sst2/ mnli/ cola/ qnli/        tiny model folders sharing a base; cola's head has another
                                         shape, so the store keeps it private (README's info output)
    gpt2-small/                          a tiny GPT-2 (GPT2Config), the base of everything below
    lora_init/ lora_a/ lora_b/ lora_c/   PEFT adapters of it: an initial adapter and three tasks from it
    lora_x/ lora_y/ full_ft/             two adapters of other ranks and initialisations, a full fine-tune
    gpt2-cola/ ckpt_a/ ckpt_b/           full fine-tunes; ckpt_a and ckpt_b record openai-community/gpt2
    hf-home/hub/                         an offline hub cache: openai-community/gpt2 (main),
                                         org/gpt2-sst2 (tag v1), org/gpt2-mnli (main)
    hub-sources/                         the two org/ entries' files, before they go into the cache
    myshapes/ mycolors/                  "Your own data": class folders of tiny drawn images; the
                                         section's YAML block as the file its first line names; a
                                         tiny CLIP (CLIPConfig) as openai/clip-vit-base-patch16 in the cache

The Python examples use state dicts and prototypes they leave to the reader: PYTHON_NAMES defines
them, and runs before each Python block.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from fusion.testing.checkpoints import tiny_base, tiny_finetune, write_checkpoint
from tests.fusion.store.lora_models import adapter, record_base, tiny_gpt2
from tests.hub_cache import add_to_cache

HUB_BASE = "openai-community/gpt2"
COMMITS = {HUB_BASE: "1" * 40, "org/gpt2-sst2": "2" * 40, "org/gpt2-mnli": "3" * 40}

# Defined before each Python block: the names its examples leave to the reader.
PYTHON_NAMES = """\
import numpy as np
from safetensors.numpy import load_file
base, ft_a, ft_b, ft_c = (load_file(f"{m}/model.safetensors") for m in ("base", "sst2", "mnli", "qnli"))
protos = np.linspace(-1, 1, 3 * 8, dtype=np.float32).reshape(3, 8)  # a class prototype a row
"""


def build_workspace(root: Path) -> dict[str, str]:
    """Build every input under `root`; the environment the examples need (HF_HOME) to run there."""
    _dense_models(root)
    gpt2 = tiny_gpt2(root / "gpt2-small")
    _adapters(root, gpt2)
    hf_home = root / "hf-home"
    _hub_cache(hf_home / "hub", root, gpt2)
    own_data(root, hf_home / "hub")
    return {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}


def _dense_models(root: Path) -> None:
    """base/ and four fine-tunes of it; cola/ with a 5-class head where the base has 3."""
    base = tiny_base()
    write_checkpoint(base, root / "base", layout="folder")
    for seed, name in enumerate(("sst2", "mnli", "cola", "qnli")):
        tuned = tiny_finetune(base, seed=seed)
        if name == "cola":
            tuned["head.weight"] = np.resize(tuned["head.weight"], (5, 8))
        write_checkpoint(tuned, root / name, layout="folder")


def _adapters(root: Path, gpt2: Path) -> None:
    """Factor space: lora_init/ and three tasks from it. Dense: lora_x/ (its own initialisation),
    lora_y/ (another rank) and full_ft/, all of gpt2-small/."""
    adapter(gpt2, root / "lora_init", init_seed=0)
    for seed, name in enumerate(("lora_a", "lora_b", "lora_c"), start=1):
        adapter(gpt2, root / name, init_seed=0, task_seed=seed)
    adapter(gpt2, root / "lora_x", init_seed=5, task_seed=4)
    adapter(gpt2, root / "lora_y", init_seed=6, task_seed=5, r=8, lora_alpha=8)
    _gpt2_finetune(gpt2, root / "full_ft", seed=0)


def _gpt2_finetune(gpt2: Path, folder: Path, *, seed: int, records: str | None = None) -> Path:
    """A full fine-tune of the tiny GPT-2: its folder with the base's config (recording `records`)."""
    write_checkpoint(tiny_finetune(load_file(gpt2 / "model.safetensors"), seed=seed), folder, layout="folder")
    shutil.copy(gpt2 / "config.json", folder / "config.json")
    if records is not None:
        record_base(folder, records)
    return folder


def _hub_cache(cache: Path, root: Path, gpt2: Path) -> None:
    """The tiny GPT-2 as openai-community/gpt2 and two fine-tunes as org/ ids; the local fine-tunes
    the hub examples name, ckpt_a/ and ckpt_b/ recording the hub base so `unify` finds it."""
    staging = root / "hub-sources"
    add_to_cache(cache, HUB_BASE, COMMITS[HUB_BASE], gpt2, refs=("main",))
    for seed, (repo, ref) in enumerate((("org/gpt2-sst2", "v1"), ("org/gpt2-mnli", "main")), start=10):
        source = _gpt2_finetune(gpt2, staging / repo.split("/")[1], seed=seed, records=HUB_BASE)
        add_to_cache(cache, repo, COMMITS[repo], source, refs=(ref,))
    _gpt2_finetune(gpt2, root / "gpt2-cola", seed=20)
    for seed, name in enumerate(("ckpt_a", "ckpt_b"), start=21):
        _gpt2_finetune(gpt2, root / name, seed=seed, records=HUB_BASE)



# -- "Your own data" ------------------------------------------------------------------------------------

OWN_DATA_SECTION = "Your own data"
OWN_DATA = {"myshapes": ("circle", "square", "triangle"), "mycolors": ("red", "green", "blue")}
OWN_IMAGES = 10  # per class: split {test: 0.2, val: 0.1} keeps 7 to train, 2 to test, 1 for val
CLIP_HUB_ID, CLIP_COMMIT = "openai/clip-vit-base-patch16", "4" * 40


def own_data(root: Path, cache: Path, readme: Path | None = None) -> None:
    """The own-data example's inputs under `root`: its class folders, its config (the section's
    YAML block, as printed) and its model, a tiny CLIP standing in for the hub id in `cache`."""
    from tests.cl_driver.helpers import build_tiny_clip

    for task, classes in OWN_DATA.items():
        for label, name in enumerate(classes):
            folder = root / task / name
            folder.mkdir(parents=True)
            for k in range(OWN_IMAGES):
                _drawn(task, label, k).save(folder / f"{k + 1:02d}.png")
    name, text = section_config((readme or Path(__file__).resolve().parents[1] / "README.md").read_text())
    (root / name).write_text(text)
    add_to_cache(cache, CLIP_HUB_ID, CLIP_COMMIT, build_tiny_clip(root / "hub-sources" / "tiny-clip"),
                 refs=("main",))


def _drawn(task: str, label: int, k: int):
    """A 24-pixel image of class `label`: a shape (myshapes) or a colour (mycolors), with seeded noise."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([label, k, len(task)])
    pixels = rng.integers(0, 50, (24, 24, 3), dtype=np.uint8)
    if task == "mycolors":
        pixels[..., label] += 180
    image = Image.fromarray(pixels)
    if task == "myshapes":
        draw, box = ImageDraw.Draw(image), (4, 4, 19, 19)
        shape = [draw.ellipse, draw.rectangle, lambda b, fill: draw.polygon([(4, 19), (12, 4), (19, 19)], fill=fill)]
        shape[label](box, fill=(230, 230, 230))
    return image


def section_config(readme: str) -> tuple[str, str]:
    """(file name, text) of the first YAML block of the README's own-data section; its first line
    names the file (`# my.yaml`)."""
    from tests.test_readme import parse

    blocks, _ = parse(readme)
    block = next(b for b in blocks if b.heading == OWN_DATA_SECTION and b.lang in ("yaml", "yml"))
    first = block.source.splitlines()[0]
    if not first.startswith("# ") or not first.endswith((".yaml", ".yml")):
        raise ValueError(f"README.md line {block.line}: the {OWN_DATA_SECTION!r} YAML block's first line names its "
                         f"file (# my.yaml); it is {first!r}")
    return first[2:].strip(), block.source
