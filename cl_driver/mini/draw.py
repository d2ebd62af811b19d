"""Drawing primitives shared by the mini tasks and the pre-training captions.

Everything draws on a supersampled PIL canvas (`canvas_size = image_size * SUPERSAMPLE`) and is
shrunk at the end, so thin strokes and small glyphs stay legible at 32 pixels. Coordinates and
sizes are fractions of the canvas side, so one description renders at any image size.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SUPERSAMPLE = 4

# Names usable in prompts -> a reference RGB. Rendering jitters around it.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 50),
    "cyan": (30, 210, 220),
    "blue": (35, 60, 220),
    "purple": (130, 40, 180),
    "pink": (250, 130, 190),
    "brown": (120, 70, 30),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (15, 15, 15),
}

SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon", "diamond", "heart")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
LETTERS = ("b", "e", "f", "h", "k", "m", "r", "s", "t", "x")
TEXTURES = ("horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard", "polka dots", "grid")
COUNT_WORDS = ("one", "two", "three", "four", "five", "six")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
SIZES = ("tiny", "small", "medium", "large")
DIRECTIONS = ("up", "down", "left", "right")
EXPRESSIONS = ("happy", "sad", "surprised", "neutral")

# Centre of each named position, as fractions of the side.
POSITION_CENTERS = {
    "top left": (0.27, 0.27), "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73), "bottom right": (0.73, 0.73), "center": (0.5, 0.5),
}
# Radius of each named size, as a fraction of the side (range sampled uniformly).
SIZE_RADII = {"tiny": (0.07, 0.10), "small": (0.14, 0.18), "medium": (0.23, 0.28), "large": (0.36, 0.45)}


def jitter_color(rng: np.random.Generator, name: str, amount: int = 25) -> tuple[int, int, int]:
    """The palette colour `name` with a uniform per-channel jitter, so colour is a range, not a point."""
    base = np.array(PALETTE[name])
    return tuple(int(v) for v in np.clip(base + rng.integers(-amount, amount + 1, 3), 0, 255))


def shape_points(kind: str, cx: float, cy: float, r: float, angle: float = 0.0) -> list[tuple[float, float]]:
    """Polygon outline of a named shape of radius `r` around (cx, cy), rotated by `angle` degrees."""
    if kind == "circle":
        pts = [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 48, endpoint=False)]
    elif kind == "square":
        pts = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif kind == "diamond":
        pts = [(0, -1), (0.7, 0), (0, 1), (-0.7, 0)]
    elif kind == "triangle":
        pts = [(math.cos(t - math.pi / 2), math.sin(t - math.pi / 2) + 0.15) for t in np.linspace(0, 2 * math.pi, 3, endpoint=False)]
    elif kind == "hexagon":
        pts = [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 6, endpoint=False)]
    elif kind == "star":
        pts = [((1.0 if k % 2 == 0 else 0.42) * math.cos(k * math.pi / 5 - math.pi / 2),
                (1.0 if k % 2 == 0 else 0.42) * math.sin(k * math.pi / 5 - math.pi / 2)) for k in range(10)]
    elif kind == "cross":
        a, b = 0.3, 0.95
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    elif kind == "heart":
        ts = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        pts = [(16 * math.sin(t) ** 3 / 17, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)) / 17 - 0.05) for t in ts]
    else:
        raise ValueError(f"unknown shape {kind!r}; expected one of {SHAPES}")
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def draw_shape(img: Image.Image, kind: str, cx: float, cy: float, r: float, fill, *,
               angle: float = 0.0, outline=None, width: float = 0.0) -> None:
    """Draw a named shape; positions and sizes are fractions of the canvas side."""
    side = img.size[0]
    pts = shape_points(kind, cx * side, cy * side, r * side, angle)
    ImageDraw.Draw(img).polygon(pts, fill=fill, outline=outline, width=max(int(width * side), 0) if outline else 0)


@lru_cache(maxsize=256)
def font_of_size(size: int) -> ImageFont.FreeTypeFont:
    # Loading the font is slower than drawing a glyph: keep one per size.
    return ImageFont.load_default(size=size)


def draw_glyph(img: Image.Image, text: str, cx: float, cy: float, height: float, fill, *,
               angle: float = 0.0, stroke: float = 0.0) -> None:
    """Draw text centred at (cx, cy) with its ink `height` a fraction of the side, rotated by `angle`."""
    side = img.size[0]
    font = font_of_size(max(int(height * side * 1.35), 8))
    stroke_px = max(int(stroke * side), 0)
    left, top, right, bottom = font.getbbox(text, stroke_width=stroke_px)
    layer = Image.new("L", (right - left + 4, bottom - top + 4), 0)
    ImageDraw.Draw(layer).text((2 - left, 2 - top), text, fill=255, font=font, stroke_width=stroke_px, stroke_fill=255)
    layer = layer.rotate(angle, resample=Image.BILINEAR, expand=True)
    x, y = int(cx * side - layer.size[0] / 2), int(cy * side - layer.size[1] / 2)
    img.paste(Image.new("RGB", layer.size, fill), (x, y), layer)


def draw_arrow(img: Image.Image, direction: str, cx: float, cy: float, r: float, fill, *, width: float = 0.3) -> None:
    """A block arrow of half-length `r` pointing `direction` (up, down, left, right)."""
    side = img.size[0]
    w, h = width, 0.75  # shaft half-width and head length, relative to r
    pts = [(-1, -w / 2), (1 - h, -w / 2), (1 - h, -w * 1.6), (1, 0), (1 - h, w * 1.6), (1 - h, w / 2), (-1, w / 2)]
    rot = {"right": 0, "down": 90, "left": 180, "up": 270}[direction]
    c, s = math.cos(math.radians(rot)), math.sin(math.radians(rot))
    poly = [((cx + r * (x * c - y * s)) * side, (cy + r * (x * s + y * c)) * side) for x, y in pts]
    ImageDraw.Draw(img).polygon(poly, fill=fill)


def draw_face(img: Image.Image, expression: str, cx: float, cy: float, r: float, fill, ink) -> None:
    """A round face with two eyes and a mouth that shows `expression`."""
    side = img.size[0]
    d = ImageDraw.Draw(img)
    X, Y, R = cx * side, cy * side, r * side
    lw = max(int(R * 0.12), 1)
    d.ellipse([X - R, Y - R, X + R, Y + R], fill=fill)
    for ex in (-0.38, 0.38):
        e = R * (0.16 if expression == "surprised" else 0.12)
        d.ellipse([X + ex * R - e, Y - 0.3 * R - e, X + ex * R + e, Y - 0.3 * R + e], fill=ink)
    m = 0.5 * R
    if expression == "happy":
        d.arc([X - m, Y - 0.2 * R, X + m, Y + 0.6 * R], 20, 160, fill=ink, width=lw)
    elif expression == "sad":
        d.arc([X - m, Y + 0.25 * R, X + m, Y + 0.95 * R], 200, 340, fill=ink, width=lw)
    elif expression == "surprised":
        o = 0.2 * R
        d.ellipse([X - o, Y + 0.25 * R, X + o, Y + 0.65 * R], outline=ink, width=lw)
    elif expression == "neutral":
        d.line([X - m, Y + 0.4 * R, X + m, Y + 0.4 * R], fill=ink, width=lw)
    else:
        raise ValueError(f"unknown expression {expression!r}; expected one of {EXPRESSIONS}")


def texture(kind: str, side: int, c1, c2, period: float, phase: float = 0.0) -> Image.Image:
    """A full-frame two-colour texture; `period` is a fraction of the side."""
    yy, xx = np.mgrid[0:side, 0:side] / side
    p = max(period, 2.0 / side)
    u, v = (xx + phase) / p, (yy + phase) / p
    if kind == "horizontal stripes":
        on = (v % 1) < 0.5
    elif kind == "vertical stripes":
        on = (u % 1) < 0.5
    elif kind == "diagonal stripes":
        on = ((u + v) / 1.4 % 1) < 0.5
    elif kind == "checkerboard":
        on = ((np.floor(u) + np.floor(v)) % 2) == 0
    elif kind == "polka dots":
        on = ((u % 1 - 0.5) ** 2 + (v % 1 - 0.5) ** 2) < 0.09
    elif kind == "grid":
        on = ((u % 1) < 0.22) | ((v % 1) < 0.22)
    else:
        raise ValueError(f"unknown texture {kind!r}; expected one of {TEXTURES}")
    out = np.where(on[..., None], np.array(c1, np.uint8), np.array(c2, np.uint8))
    return Image.fromarray(out.astype(np.uint8), "RGB")


def gradient(side: int, top, bottom) -> Image.Image:
    """A vertical two-colour gradient background."""
    t = np.linspace(0, 1, side)[:, None, None]
    arr = (1 - t) * np.array(top) + t * np.array(bottom)
    return Image.fromarray(np.repeat(arr, side, axis=1).astype(np.uint8), "RGB")


def finish(img: Image.Image, image_size: int, rng: np.random.Generator, *, noise: float = 0.0,
           grain: float = 0.0) -> Image.Image:
    """Shrink the supersampled canvas to `image_size` and add pixel noise (std `noise`, 0-255 scale)
    and per-pixel luminance grain (std `grain`)."""
    small = img.resize((image_size, image_size), Image.BOX)
    if noise <= 0 and grain <= 0:
        return small
    arr = np.asarray(small, dtype=np.float32)
    if noise > 0:
        arr = arr + rng.normal(0, noise, arr.shape)
    if grain > 0:
        arr = arr + rng.normal(0, grain, arr.shape[:2])[..., None]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
