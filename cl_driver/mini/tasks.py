"""The built-in procedural tasks of the mini-MTIL benchmark.

Each task has its own label space, named in words that prompts can use, and its own house
style (background, noise, scale, font), distinct from the style of the pre-training captions
(`cl_driver.mini.captions`), so that the shipped CLIP's zero-shot accuracy is real but imperfect.

    from cl_driver.mini.tasks import BUILTIN_TASKS, get_task
    spec = get_task("shapes")
    images, labels = spec.render("train", 100, image_size=32, seed=0)

Splits are seeded and fixed: image i of a split depends only on (task, split, seed, i), so the
same arguments always give the same images, and a shorter split is a prefix of a longer one.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from PIL import Image

from . import draw
from .draw import SUPERSAMPLE, jitter_color

SPLITS = ("train", "test", "val")  # val: held-out images for calibration (the `gated` aggregate)
DEFAULT_SIZES = {"train": 1000, "test": 400, "val": 200}

# A painter draws one image of class `label` on a canvas of `side` pixels and returns it
# together with the noise settings for `draw.finish`.
Painter = Callable[[np.random.Generator, int, int], tuple[Image.Image, dict]]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    class_names: list[str]
    templates: list[str]
    painter: Painter = field(repr=False)

    def render(self, split: str, n: int | None = None, *, image_size: int = 32,
               seed: int = 0) -> tuple[list[Image.Image], list[int]]:
        """`n` RGB images of `split` ("train", "test" or "val") and their labels, balanced over classes."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        n = DEFAULT_SIZES[split] if n is None else int(n)
        if n < 0 or image_size < 8:
            raise ValueError(f"need n >= 0 and image_size >= 8, got n={n}, image_size={image_size}")
        key = [zlib.crc32(self.name.encode()), SPLITS.index(split), int(seed)]
        labels = balanced_labels(np.random.default_rng(key + [2**31]), n, len(self.class_names))
        images = []
        for i, label in enumerate(labels):
            rng = np.random.default_rng(key + [i])
            canvas, noise = self.painter(rng, label, image_size * SUPERSAMPLE)
            images.append(draw.finish(canvas, image_size, rng, **noise))
        return images, labels


def balanced_labels(rng: np.random.Generator, n: int, num_classes: int) -> list[int]:
    """Labels in blocks of one shuffled copy of every class, so any prefix is nearly balanced."""
    blocks = -(-n // num_classes)
    return [int(c) for _ in range(blocks) for c in rng.permutation(num_classes)][:n]


def vivid_colors(exclude: tuple[str, ...] = ()) -> list[str]:
    return [c for c in draw.PALETTE if c not in ("white", "gray", "black") + exclude]


# --- painters: one house style per task ---------------------------------------------------------

def paint_shapes(rng, label, side):
    # Filled shape of a vivid colour on cream paper with grain.
    paper = tuple(int(v) for v in rng.integers(225, 250, 3))
    img = Image.new("RGB", (side, side), paper)
    r = rng.uniform(0.25, 0.38)
    cx, cy = rng.uniform(0.5 - (0.48 - r) * 0.5, 0.5 + (0.48 - r) * 0.5, 2)
    draw.draw_shape(img, draw.SHAPES[label], cx, cy, r, jitter_color(rng, str(rng.choice(vivid_colors()))),
                    angle=rng.uniform(-12, 12))
    return img, {"grain": 10.0}


def paint_colors(rng, label, side):
    # A random shape in the class colour on a mid-gray speckled background.
    names = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink", "brown", "white")
    img = Image.new("RGB", (side, side), tuple(int(v) for v in rng.integers(90, 140, 3)))
    draw.draw_shape(img, str(rng.choice(draw.SHAPES)), *rng.uniform(0.4, 0.6, 2), rng.uniform(0.3, 0.42),
                    jitter_color(rng, names[label], 20), angle=rng.uniform(0, 360))
    return img, {"noise": 14.0}


def paint_digits(rng, label, side):
    # A light digit on a navy background with sensor noise.
    img = Image.new("RGB", (side, side), tuple(int(v) for v in rng.integers(10, 50, 3) + np.array([0, 0, 60])))
    ink = tuple(int(v) for v in rng.integers(200, 256, 3))
    draw.draw_glyph(img, str(label), rng.uniform(0.42, 0.58), rng.uniform(0.42, 0.58), rng.uniform(0.62, 0.78),
                    ink, angle=rng.uniform(-10, 10), stroke=0.02)
    return img, {"noise": 18.0}


def paint_letters(rng, label, side):
    # A dark capital letter on yellowed paper, slightly rotated.
    img = Image.new("RGB", (side, side), (235, 215, int(rng.integers(140, 180))))
    draw.draw_glyph(img, draw.LETTERS[label].upper(), rng.uniform(0.43, 0.57), rng.uniform(0.43, 0.57),
                    rng.uniform(0.6, 0.75), (30, 25, 20), angle=rng.uniform(-15, 15), stroke=0.025)
    return img, {"grain": 8.0}


def paint_textures(rng, label, side):
    # Two random colours of different brightness, a random period and phase.
    c1 = jitter_color(rng, str(rng.choice(vivid_colors())), 40)
    c2 = tuple(int(v) for v in rng.integers(0, 70, 3)) if sum(c1) > 300 else tuple(int(v) for v in rng.integers(190, 256, 3))
    img = draw.texture(draw.TEXTURES[label], side, c1, c2, rng.uniform(0.2, 0.33), rng.uniform(0, 1))
    return img, {"noise": 8.0}


def paint_counts(rng, label, side):
    # `label + 1` dark dots scattered without overlap on a light-blue card.
    img = Image.new("RGB", (side, side), (170, 200, int(rng.integers(225, 255))))
    r = rng.uniform(0.06, 0.08)
    centers = place_apart(rng, label + 1, r)
    ink = tuple(int(v) for v in rng.integers(0, 60, 3))
    for cx, cy in centers:
        draw.draw_shape(img, "circle", cx, cy, r, ink)
    return img, {"noise": 6.0}


def place_apart(rng, k: int, r: float) -> list[tuple[float, float]]:
    """k centres in the unit square whose discs of radius r neither overlap nor leave the frame."""
    while True:
        pts = []
        for _ in range(200):
            p = rng.uniform(r + 0.04, 1 - r - 0.04, 2)
            if all((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2 > (2.6 * r) ** 2 for q in pts):
                pts.append((float(p[0]), float(p[1])))
                if len(pts) == k:
                    return pts


def paint_positions(rng, label, side):
    # One small white square-ish marker on a noisy grass-green field.
    img = Image.new("RGB", (side, side), (40, int(rng.integers(110, 150)), 40))
    cx, cy = draw.POSITION_CENTERS[draw.POSITIONS[label]]
    cx, cy = cx + rng.uniform(-0.07, 0.07), cy + rng.uniform(-0.07, 0.07)
    draw.draw_shape(img, str(rng.choice(["square", "circle", "diamond"])), cx, cy, rng.uniform(0.1, 0.14),
                    jitter_color(rng, "white", 10))
    return img, {"noise": 20.0}


def paint_sizes(rng, label, side):
    # A bright blob of the class's size on a dark slate background.
    lo, hi = draw.SIZE_RADII[draw.SIZES[label]]
    r = rng.uniform(lo, hi)
    img = Image.new("RGB", (side, side), (45, 50, int(rng.integers(55, 75))))
    c = rng.uniform(0.5 - (0.48 - r) * 0.6, 0.5 + (0.48 - r) * 0.6, 2)
    draw.draw_shape(img, str(rng.choice(["circle", "square", "hexagon"])), c[0], c[1], r,
                    jitter_color(rng, str(rng.choice(["orange", "yellow", "cyan"]))), angle=rng.uniform(0, 90))
    return img, {"noise": 10.0}


def paint_arrows(rng, label, side):
    # A white arrow on a road-sign red or blue disc.
    img = Image.new("RGB", (side, side), tuple(int(v) for v in rng.integers(200, 240, 3)))
    sign = jitter_color(rng, str(rng.choice(["red", "blue"])), 15)
    cx, cy = rng.uniform(0.45, 0.55, 2)
    draw.draw_shape(img, "circle", cx, cy, 0.46, sign)
    draw.draw_arrow(img, draw.DIRECTIONS[label], cx, cy, rng.uniform(0.3, 0.38), (250, 250, 250), width=0.35)
    return img, {"noise": 6.0}


def paint_faces(rng, label, side):
    # A yellow face with a dark expression on a purple background.
    img = Image.new("RGB", (side, side), (90, 40, int(rng.integers(110, 150))))
    draw.draw_face(img, draw.EXPRESSIONS[label], rng.uniform(0.46, 0.54), rng.uniform(0.46, 0.54),
                   rng.uniform(0.4, 0.46), jitter_color(rng, "yellow", 15), (40, 20, 10))
    return img, {"noise": 8.0}


# --- the task table ----------------------------------------------------------------------------

def _spec(name, class_names, templates, painter) -> TaskSpec:
    return TaskSpec(name, list(class_names), list(templates), painter)


_TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    _spec("shapes", draw.SHAPES,
          ["a photo of a {}.", "a drawing of a {}.", "a {} shape.", "a picture of a {}."], paint_shapes),
    _spec("colors", ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink", "brown", "white"),
          ["a photo of something {}.", "a {} shape.", "the color {}.", "a {} object."], paint_colors),
    _spec("digits", draw.DIGIT_WORDS,
          ["a photo of the digit {}.", "the number {}.", "a digit {}.", "a picture of the number {}."], paint_digits),
    _spec("letters", draw.LETTERS,
          ["a photo of the letter {}.", "the letter {}.", "a capital letter {}.", "a picture of the letter {}."],
          paint_letters),
    _spec("textures", draw.TEXTURES,
          ["a photo of {}.", "a pattern of {}.", "a texture of {}.", "a picture of {}."], paint_textures),
    _spec("counts", draw.COUNT_WORDS,
          ["a photo of {} dots.", "{} dots.", "there are {} dots.", "a picture of {} circles."], paint_counts),
    _spec("positions", draw.POSITIONS,
          ["a photo of a shape in the {}.", "a shape at the {}.", "an object in the {}.", "a picture of a shape in the {}."],
          paint_positions),
    _spec("sizes", draw.SIZES,
          ["a photo of a {} shape.", "a {} object.", "a {} shape.", "a picture of a {} object."], paint_sizes),
    _spec("arrows", draw.DIRECTIONS,
          ["a photo of an arrow pointing {}.", "an arrow pointing {}.", "a sign pointing {}.", "a picture of an arrow pointing {}."],
          paint_arrows),
    _spec("faces", draw.EXPRESSIONS,
          ["a photo of a {} face.", "a {} face.", "a face that looks {}.", "a picture of a {} face."], paint_faces),
)}

# The fixed task order of the benchmark (as MTIL fixes its order I).
BUILTIN_TASKS: tuple[str, ...] = tuple(_TASKS)


def get_task(name: str) -> TaskSpec:
    """The built-in task called `name`."""
    try:
        return _TASKS[name]
    except KeyError:
        raise ValueError(f"unknown built-in task {name!r}; expected one of {', '.join(BUILTIN_TASKS)}") from None
