"""Out-of-domain image generators for the open-world benchmark.

A web-crawled pool holds many images that have nothing to do with the target domain. The
open-world benchmark (:mod:`mak.bench.openworld`) imitates that with two kinds of synthetic
28 x 28 grayscale images that look nothing like clothing:

- **glyphs**: letters, digits and symbols rendered from the fonts installed on the machine
  (``.ttf`` / ``.otf`` under ``/usr/share/fonts`` and a few other standard places) at a random
  size, stroke width, rotation, brightness and position, sometimes inverted;
- **textures**: procedural full-frame patterns: smoothed noise, stripes (sinusoidal or square
  gratings at a random angle and frequency), Gaussian blobs and checkerboards.

Every image is drawn from its own random generator seeded with ``(seed, kind, index)``, so an
image does not depend on how many others are generated nor in which order: generation is
deterministic per seed on a given machine (the glyphs depend on the installed fonts). No image is
blank: a glyph that renders (almost) empty, e.g. a character missing from a font, is redrawn.
"""
from __future__ import annotations

import functools
import os
import string
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from mak.errors import MakError

#: Where fonts are looked for when no directory is given (``$MAK_FONT_DIRS``, ``:``-separated,
#: takes precedence).
FONT_DIRS: tuple[str, ...] = (
    "/usr/share/fonts",
    "/usr/local/share/fonts",
    os.path.expanduser("~/.local/share/fonts"),
    os.path.expanduser("~/.fonts"),
)
FONT_PACKAGE = "fonts-dejavu-core"

#: Characters drawn as glyphs: Latin letters, digits, ASCII punctuation and a few symbols.
GLYPH_CHARS: str = (
    string.ascii_uppercase + string.ascii_lowercase + string.digits + "#$%&@*+=?!<>{}[]/\\~^"
    + "\u00a7\u00b6\u00b1\u00d7\u00f7\u03a9\u03a3\u03c0\u2190\u2192\u2191\u2193\u221e\u2248\u2260\u221a\u222b\u2202\u2605\u2660\u2663\u2665\u2666"
)
TEXTURE_KINDS: tuple[str, ...] = ("noise", "stripes", "blobs", "checker")

_KIND_GLYPH = 1
_KIND_TEXTURE = 2
_CANVAS = 64  # glyphs are drawn large, then rotated and reduced to the output size


def find_fonts(dirs: Iterable[str | os.PathLike] | None = None) -> list[Path]:
    """Return the usable ``.ttf`` / ``.otf`` font files under ``dirs``, sorted by path.

    ``dirs`` defaults to ``$MAK_FONT_DIRS`` (``:``-separated) or :data:`FONT_DIRS`. Fonts that
    FreeType cannot open are skipped. Raises :class:`MakError` naming the Debian package to
    install when none is found.
    """
    if dirs is None:
        env = os.environ.get("MAK_FONT_DIRS")
        dirs = [d for d in env.split(":") if d] if env else list(FONT_DIRS)
    dirs = [Path(d) for d in dirs]
    found: set[Path] = set()
    for d in dirs:
        if not d.is_dir():
            continue
        for p in d.rglob("*"):
            if p.suffix.lower() in (".ttf", ".otf") and p.is_file():
                found.add(p)
    usable = []
    for p in sorted(found, key=str):
        try:
            ImageFont.truetype(str(p), 20)
        except Exception:  # noqa: BLE001 - unreadable or unsupported font file
            continue
        usable.append(p)
    if not usable:
        where = ", ".join(str(d) for d in dirs)
        raise MakError(
            f"no TrueType/OpenType fonts (.ttf/.otf) found under {where}; the glyph images of the "
            f"benchmark need one: install the Debian package {FONT_PACKAGE} "
            f"(apt-get install {FONT_PACKAGE}) or set MAK_FONT_DIRS to a folder of fonts"
        )
    return usable


@functools.lru_cache(maxsize=2048)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def _rng(seed: int, kind: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, kind, int(index)])


def _not_blank(img: np.ndarray) -> bool:
    return int(img.max()) - int(img.min()) >= 64 and int((img > 64).sum()) >= 8


def render_glyph(rng: np.random.Generator, fonts: Sequence[str | os.PathLike], size: int = 28) -> np.ndarray:
    """Render one random glyph as a ``size`` x ``size`` uint8 image.

    Character, font, font size, stroke width, brightness, rotation (-60..60 degrees) and
    position are drawn from ``rng``; 20% of the images are inverted (dark glyph on light).
    Retries (with the same generator, so deterministically) until the image is not blank.
    """
    if not fonts:
        raise MakError("render_glyph needs at least one font")
    img = None
    for _ in range(50):
        ch = GLYPH_CHARS[int(rng.integers(len(GLYPH_CHARS)))]
        font_path = str(fonts[int(rng.integers(len(fonts)))])
        fsize = int(rng.integers(28, 72))
        stroke = int(rng.integers(0, 4))
        fill = int(rng.integers(150, 256))
        angle = float(rng.uniform(-60.0, 60.0))
        canvas = Image.new("L", (_CANVAS, _CANVAS), 0)
        draw = ImageDraw.Draw(canvas)
        try:
            font = _font(font_path, fsize)
            box = draw.textbbox((0, 0), ch, font=font, stroke_width=stroke)
        except Exception:  # noqa: BLE001 - a font that cannot draw this character
            continue
        w, h = box[2] - box[0], box[3] - box[1]
        if w <= 0 or h <= 0:
            continue
        # Random position: the glyph's box anywhere on the canvas, a little overflow allowed.
        slack_x, slack_y = _CANVAS - w, _CANVAS - h
        x = float(rng.uniform(min(0, slack_x), max(0, slack_x) + 1)) - box[0]
        y = float(rng.uniform(min(0, slack_y), max(0, slack_y) + 1)) - box[1]
        draw.text((x, y), ch, fill=fill, font=font, stroke_width=stroke, stroke_fill=fill)
        canvas = canvas.rotate(angle, resample=Image.BILINEAR, fillcolor=0)
        out = np.asarray(canvas.resize((size, size), Image.LANCZOS), dtype=np.uint8)
        if rng.random() < 0.2:
            out = (255 - out).astype(np.uint8)
        if _not_blank(out):
            return np.ascontiguousarray(out)
        img = out
    # Every attempt rendered (almost) nothing: fall back to a plain bar so the image is usable.
    img = np.zeros((size, size), np.uint8)
    img[size // 3: 2 * size // 3, 2: size - 2] = 255
    return img


def _stretch(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Map ``x`` to uint8 with a random but clearly visible contrast range."""
    x = x.astype(np.float64)
    lo_v, hi_v = x.min(), x.max()
    x = (x - lo_v) / (hi_v - lo_v) if hi_v > lo_v else np.zeros_like(x)
    lo = float(rng.uniform(0, 80))
    hi = float(rng.uniform(max(lo + 120, 200), 255.0))
    return np.clip(lo + x * (hi - lo) + 0.5, 0, 255).astype(np.uint8)


def render_texture(rng: np.random.Generator, size: int = 28, kind: str | None = None) -> np.ndarray:
    """Render one procedural texture (``noise``, ``stripes``, ``blobs`` or ``checker``).

    ``kind`` defaults to a random one. Returns a ``size`` x ``size`` uint8 image that fills the
    whole frame (unlike a centred clothing item on a black background).
    """
    if kind is None:
        kind = TEXTURE_KINDS[int(rng.integers(len(TEXTURE_KINDS)))]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    if kind == "noise":
        res = int(rng.integers(3, size + 1))
        low = rng.random((res, res)) * 255.0
        img = Image.fromarray(low.astype(np.uint8)).resize((size, size), Image.BICUBIC)
        radius = float(rng.uniform(0.0, 1.5))
        if radius > 0.2:
            img = img.filter(ImageFilter.GaussianBlur(radius))
        x = np.asarray(img, dtype=np.float64)
    elif kind == "stripes":
        theta = float(rng.uniform(0, np.pi))
        period = float(rng.uniform(3.0, 14.0))
        phase = float(rng.uniform(0, 2 * np.pi))
        u = xx * np.cos(theta) + yy * np.sin(theta)
        x = np.sin(2 * np.pi * u / period + phase)
        if rng.random() < 0.5:
            x = (x > 0).astype(np.float64)  # square wave
        if rng.random() < 0.3:  # a second grating: plaid
            theta2 = theta + float(rng.uniform(np.pi / 4, 3 * np.pi / 4))
            x = x + np.sin(2 * np.pi * (xx * np.cos(theta2) + yy * np.sin(theta2)) / period)
    elif kind == "blobs":
        x = np.zeros((size, size))
        for _ in range(int(rng.integers(3, 12))):
            cx, cy = rng.uniform(-2, size + 2, 2)
            s = float(rng.uniform(1.5, 6.0))
            amp = float(rng.uniform(0.3, 1.0)) * (1 if rng.random() < 0.8 else -1)
            x += amp * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
        x += rng.normal(0, 0.03, x.shape)
    elif kind == "checker":
        cell = int(rng.integers(2, 8))
        ox, oy = rng.integers(0, cell, 2)
        x = (((xx + ox) // cell + (yy + oy) // cell) % 2).astype(np.float64)
        x += rng.normal(0, 0.08, x.shape)
    else:
        raise MakError(f"unknown texture kind {kind!r}; expected one of {', '.join(TEXTURE_KINDS)}")
    return _stretch(x, rng)


def glyph_image(seed: int, index: int, fonts: Sequence[str | os.PathLike], size: int = 28) -> np.ndarray:
    """The ``index``-th glyph image of generator ``seed`` (independent of all other indices)."""
    return render_glyph(_rng(seed, _KIND_GLYPH, index), fonts, size)


def texture_image(seed: int, index: int, size: int = 28) -> np.ndarray:
    """The ``index``-th texture image of generator ``seed`` (independent of all other indices)."""
    return render_texture(_rng(seed, _KIND_TEXTURE, index), size)


def make_ood_images(
    n_glyphs: int,
    n_textures: int,
    seed: int = 0,
    size: int = 28,
    fonts: Sequence[str | os.PathLike] | None = None,
    tick: Callable[[int], Any] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Generate ``n_glyphs`` glyph then ``n_textures`` texture images.

    Returns ``(images, kinds)``: a uint8 array ``(n_glyphs + n_textures, size, size)`` and the
    kind of each image (``"glyph"`` or ``"texture"``). Fonts are looked up with
    :func:`find_fonts` when ``fonts`` is None and glyphs are requested. ``tick(1)`` is called
    after each image (a progress bar's ``update``).
    """
    if n_glyphs < 0 or n_textures < 0:
        raise MakError("image counts must be >= 0")
    if n_glyphs and fonts is None:
        fonts = find_fonts()
    out = np.empty((n_glyphs + n_textures, size, size), np.uint8)
    tick = tick or (lambda n: None)
    for i in range(n_glyphs):
        out[i] = glyph_image(seed, i, fonts or [], size)
        tick(1)
    for j in range(n_textures):
        out[n_glyphs + j] = texture_image(seed, j, size)
        tick(1)
    return out, ["glyph"] * n_glyphs + ["texture"] * n_textures
