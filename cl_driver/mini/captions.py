"""Image-caption pairs for pre-training the mini CLIP.

They describe the same attributes as the tasks (shape, colour, digit, letter, texture, count,
position, size, arrow direction, facial expression), often several in one caption, in a style
of their own: plain or gradient backgrounds in any colour, outlined as well as filled shapes,
thinner and smaller glyphs in any colour, arrows without a sign, faces of any colour, little or
no noise. The tasks' house styles (`cl_driver.mini.tasks`) are never drawn here, so zero-shot
accuracy on the tasks measures transfer across a change of style.

`sample_pair(rng, image_size)` draws one (image, caption); `make_batch` draws many;
`reference_pairs` draws the fixed set that ZSCL distils on (cl_driver/zscl.py).
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from . import draw
from .draw import SUPERSAMPLE, jitter_color

COLORS = tuple(draw.PALETTE)
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses",
           "hexagon": "hexagons", "diamond": "diamonds", "heart": "hearts"}
UPPER_LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")
PREFIXES = ("", "", "a photo of ", "a picture of ", "a drawing of ", "an image of ")
# Object centres for a named position, used only for objects small enough to fit there.
SMALL_SIZES = ("tiny", "small")

# Every word a caption can contain (checked by the tests against sampled captions).
VOCABULARY_TEXTS = (
    list(COLORS) + list(draw.SHAPES) + list(PLURALS.values()) + list(draw.DIGIT_WORDS) + list(UPPER_LETTERS)
    + list(draw.TEXTURES) + list(draw.POSITIONS) + list(draw.SIZES) + list(draw.DIRECTIONS) + list(draw.EXPRESSIONS)
    + list(PREFIXES) + [
        "a an the of on in at and to is there are that looks pointing digit number letter capital lowercase",
        "shape object something color pattern texture dot dots objects face arrow left right background",
    ]
)


def choose(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def background(rng: np.random.Generator, side: int) -> Image.Image:
    """A plain or gradient background in any colour (the tasks each use one fixed kind)."""
    c1 = tuple(int(v) for v in rng.integers(0, 256, 3))
    if rng.random() < 0.5:
        return Image.new("RGB", (side, side), c1)
    return draw.gradient(side, c1, tuple(int(v) for v in rng.integers(0, 256, 3)))


def contrasting_color(rng: np.random.Generator, img: Image.Image, names=COLORS) -> str:
    """A palette colour that stands out against the background's mean colour."""
    bg = np.asarray(img.resize((1, 1), Image.BOX), dtype=float).reshape(3)
    for _ in range(20):
        name = choose(rng, names)
        if np.abs(np.array(draw.PALETTE[name]) - bg).sum() > 150:
            return name
    return name


def position_center(rng: np.random.Generator, position: str) -> tuple[float, float]:
    cx, cy = draw.POSITION_CENTERS[position]
    return cx + rng.uniform(-0.06, 0.06), cy + rng.uniform(-0.06, 0.06)


def scene_object(rng, side):
    """One shape with colour, size and (for small ones) position."""
    img = background(rng, side)
    shape, size, color = choose(rng, draw.SHAPES), choose(rng, draw.SIZES), contrasting_color(rng, img)
    r = rng.uniform(*draw.SIZE_RADII[size])
    position = choose(rng, draw.POSITIONS) if size in SMALL_SIZES else None
    cx, cy = position_center(rng, position) if position else rng.uniform(0.5 - (0.5 - r) * 0.4, 0.5 + (0.5 - r) * 0.4, 2)
    outline = rng.random() < 0.3
    fill = jitter_color(rng, color)
    if outline:
        draw.draw_shape(img, shape, cx, cy, r, None, angle=rng.uniform(-10, 10), outline=fill, width=0.05)
    else:
        draw.draw_shape(img, shape, cx, cy, r, fill, angle=rng.uniform(-10, 10))
    where = f" in the {position}" if position else ""
    captions = [
        f"a {size} {color} {shape}{where}", f"a {color} {shape}{where}", f"a {color} {shape}", f"a {shape}",
        f"a {size} {shape}", f"a {size} {color} shape", f"a {color} object", f"something {color}",
        f"the color {color}", f"a {size} object", f"a {shape} shape",
    ]
    if position:
        captions += [f"a shape in the {position}", f"an object at the {position}", f"a {shape} at the {position}",
                     f"a {color} shape in the {position}"]
    return img, choose(rng, captions), True


def scene_digit(rng, side):
    img = background(rng, side)
    digit, color = int(rng.integers(10)), contrasting_color(rng, img)
    word = draw.DIGIT_WORDS[digit]
    draw.draw_glyph(img, str(digit), *rng.uniform(0.35, 0.65, 2), rng.uniform(0.35, 0.55), jitter_color(rng, color),
                    angle=rng.uniform(-8, 8))
    captions = [f"the digit {word}", f"the number {word}", f"a {color} digit {word}", f"a {color} number {word}",
                f"a digit {word}", f"the number {word} in {color}"]
    return img, choose(rng, captions), True


def scene_letter(rng, side):
    img = background(rng, side)
    letter, color, upper = choose(rng, UPPER_LETTERS), contrasting_color(rng, img), rng.random() < 0.6
    draw.draw_glyph(img, letter.upper() if upper else letter, *rng.uniform(0.35, 0.65, 2), rng.uniform(0.35, 0.55),
                    jitter_color(rng, color), angle=rng.uniform(-8, 8))
    case = "capital" if upper else "lowercase"
    captions = [f"the letter {letter}", f"a {color} letter {letter}", f"a {case} letter {letter}",
                f"the {case} letter {letter} in {color}"]
    return img, choose(rng, captions), True


def scene_texture(rng, side):
    kind = choose(rng, draw.TEXTURES)
    c1, c2 = rng.choice(len(COLORS), 2, replace=False)
    n1, n2 = COLORS[c1], COLORS[c2]
    img = draw.texture(kind, side, jitter_color(rng, n1), jitter_color(rng, n2), rng.uniform(0.1, 0.45), rng.uniform(0, 1))
    captions = [kind, f"a pattern of {kind}", f"{n1} and {n2} {kind}", f"a texture of {kind}", f"{n1} {kind}"]
    return img, choose(rng, captions), False  # textures fill the frame: no prefix "a photo of a ..."


def scene_count(rng, side):
    img = background(rng, side)
    k, shape, color = int(rng.integers(1, 7)), choose(rng, ("circle", "circle", "square", "star", "triangle", "heart")), contrasting_color(rng, img)
    r = rng.uniform(0.05, 0.075)
    fill = jitter_color(rng, color)
    for cx, cy in _place_apart(rng, k, r):
        draw.draw_shape(img, shape, cx, cy, r, fill)
    word = draw.DIGIT_WORDS[k]
    noun = shape if k == 1 else PLURALS[shape]
    captions = [f"{word} {color} {noun}", f"{word} {noun}", f"there are {word} {noun}", f"{word} objects"]
    if shape == "circle":
        captions += [f"{word} dots", f"{word} {color} dots", f"there are {word} dots"]
    return img, choose(rng, captions), False


def _place_apart(rng, k, r):
    from .tasks import place_apart
    return place_apart(rng, k, r)


def scene_arrow(rng, side):
    img = background(rng, side)
    direction, color = choose(rng, draw.DIRECTIONS), contrasting_color(rng, img)
    draw.draw_arrow(img, direction, *rng.uniform(0.4, 0.6, 2), rng.uniform(0.22, 0.38), jitter_color(rng, color),
                    width=rng.uniform(0.2, 0.4))
    captions = [f"an arrow pointing {direction}", f"a {color} arrow pointing {direction}", f"an arrow to the {direction}"
                if direction in ("left", "right") else f"an arrow pointing {direction}"]
    return img, choose(rng, captions), False


def scene_face(rng, side):
    img = background(rng, side)
    expression, color = choose(rng, draw.EXPRESSIONS), contrasting_color(rng, img, ("yellow", "orange", "pink", "white", "green", "cyan"))
    ink = (250, 250, 250) if color == "black" else (10, 10, 10)
    draw.draw_face(img, expression, *rng.uniform(0.42, 0.58, 2), rng.uniform(0.28, 0.4), jitter_color(rng, color), ink)
    captions = [f"a {expression} face", f"a {color} {expression} face", f"a face that looks {expression}", f"a {color} face"]
    return img, choose(rng, captions), True


def scene_pair(rng, side):
    """Two shapes side by side, described left to right."""
    img = background(rng, side)
    (s1, s2), (c1, c2) = [choose(rng, draw.SHAPES) for _ in range(2)], [contrasting_color(rng, img) for _ in range(2)]
    for shape, color, cx in ((s1, c1, 0.27), (s2, c2, 0.73)):
        draw.draw_shape(img, shape, cx + rng.uniform(-0.03, 0.03), 0.5 + rng.uniform(-0.2, 0.2), rng.uniform(0.13, 0.19),
                        jitter_color(rng, color))
    captions = [f"a {c1} {s1} and a {c2} {s2}", f"a {c1} {s1} on the left and a {c2} {s2} on the right",
                f"a {s1} and a {s2}"]
    return img, choose(rng, captions), False


SCENES = ((scene_object, 3.0), (scene_digit, 1.5), (scene_letter, 1.5), (scene_texture, 1.0), (scene_count, 1.2),
          (scene_arrow, 0.8), (scene_face, 0.8), (scene_pair, 0.7))
_WEIGHTS = np.array([w for _, w in SCENES]) / sum(w for _, w in SCENES)


def sample_pair(rng: np.random.Generator, image_size: int = 32) -> tuple[Image.Image, str]:
    """One pre-training (image, caption), drawn from a random scene in the pre-training style."""
    scene = SCENES[int(rng.choice(len(SCENES), p=_WEIGHTS))][0]
    img, caption, prefixable = scene(rng, image_size * SUPERSAMPLE)
    if prefixable:
        caption = choose(rng, PREFIXES) + caption
    noise = rng.uniform(0, 10) if rng.random() < 0.5 else 0.0
    return draw.finish(img, image_size, rng, noise=noise), caption


def make_batch(rng: np.random.Generator, n: int, image_size: int = 32) -> tuple[list[Image.Image], list[str]]:
    pairs = [sample_pair(rng, image_size) for _ in range(n)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


REFERENCE_STREAM = 10**6  # seeds the reference set apart from the pre-training batches ([seed, step], step < 10^6)


def reference_pairs(n: int, *, image_size: int = 32, seed: int = 0) -> tuple[list[Image.Image], list[str]]:
    """n (image, caption) pairs of the pre-training distribution, the same for the same seed: the mini
    CLIP's stand-in for ZSCL's reference images (ImageNet) and texts (Conceptual Captions)."""
    return make_batch(np.random.default_rng([seed, REFERENCE_STREAM]), n, image_size)
