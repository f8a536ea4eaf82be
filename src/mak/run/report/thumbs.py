"""Pool images as inline thumbnails, and the grids that show them.

A thumbnail is a ``data:image/png;base64`` URI about ``THUMB_PX`` pixels on its long side (small
images scaled up by whole factors, large ones down). :class:`Thumbs` caches them per pool row; an
image the loader cannot deliver becomes a hatched placeholder and is counted, never raised.
:func:`thumb_grid` lays out ``GRID_COLS`` x ``GRID_ROWS`` of them with a tooltip each; samples drawn
for grids use ``RANDOM_SEED``.
"""
from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from mak.run.report.format import esc
from mak.run.report.inputs import without_label

if TYPE_CHECKING:
    from mak.run.report.context import Context
    from mak.run.report.inputs import Scores

THUMB_PX = 56
GRID_COLS = 8
GRID_ROWS = 4
RANDOM_SEED = 0


def _to_uint8_image(a: Any) -> np.ndarray:
    """HxW or HxWxC (C in 1, 3, 4; CxHxW accepted) uint8 array from whatever the loader returns."""
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[2] not in (1, 3, 4):
        a = np.transpose(a, (1, 2, 0))
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[2] == 2:
        a = a[..., 0]
    if a.ndim not in (2, 3) or a.size == 0:
        raise ValueError(f"cannot show an image of shape {a.shape}")
    if a.dtype != np.uint8:
        f = a.astype(np.float64)
        if np.nanmax(f) <= 1.0:
            f = f * 255.0
        a = np.clip(np.nan_to_num(f), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a)


def _thumb_uri(a: Any, px: int = THUMB_PX) -> str:
    """``data:image/png;base64,...`` of a thumbnail about ``px`` pixels on its long side."""
    from PIL import Image

    resampling = getattr(Image, "Resampling", Image)
    img = Image.fromarray(_to_uint8_image(a))
    w, h = img.size
    long_side = max(w, h)
    if long_side <= px:
        f = max(1, int(round(px / long_side)))
        if f > 1:
            img = img.resize((w * f, h * f), resampling.NEAREST)
    else:
        s = px / long_side
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class Thumbs:
    """Thumbnail cache over ``pool_images`` (a failing image becomes a placeholder, not an error)."""

    def __init__(self, loader: Callable[[int], np.ndarray] | None) -> None:
        self.loader = loader
        self.cache: dict[int, str | None] = {}
        self.failed = 0

    def get(self, i: int) -> str | None:
        if self.loader is None:
            return None
        if i not in self.cache:
            try:
                self.cache[i] = _thumb_uri(self.loader(int(i)))
            except Exception:  # a corrupt or missing image must not sink the whole report
                self.cache[i] = None
                self.failed += 1
        return self.cache[i]


def ood_note(labels: np.ndarray | None) -> str:
    """The grids' legend of the red frame, "" when no image can carry one (no labels, or none below 0)."""
    return "; red frame = out-of-domain" if labels is not None and bool((labels < 0).any()) else ""


def thumb_grid(ctx: Context, title: str, sub: str, entries: Sequence[tuple[int, int | None, str]],
               sc: Scores | None) -> str:
    """A thumbnail grid of ``(pool index, label or None, tooltip details)`` entries.

    The tooltip shows the item without its label where the entry gives the label in its details."""
    if ctx.thumbs.loader is None or not entries:
        return ""
    texts = ctx.item_text(sc, [e[0] for e in entries])
    cells = []
    for i, lab, detail in entries:
        uri = ctx.thumbs.get(i)
        item = texts.get(i, "") if lab is None else without_label(texts.get(i, ""))
        tip = " · ".join(t for t in (f"pool row {i}", detail, item) if t)
        cls = ' class="ood"' if lab is not None and lab < 0 else ""
        if uri is None:
            cells.append(f'<div class="miss" title="{esc(tip + " (image unavailable)")}"></div>')
        else:
            cells.append(f'<img src="{uri}" width="{THUMB_PX}" height="{THUMB_PX}" alt="" '
                         f'title="{esc(tip)}"{cls}>')
    return (f'<figure><figcaption><b>{esc(title)}</b><span>{esc(sub)}</span></figcaption>'
            f'<div class="thumbs">{"".join(cells)}</div></figure>')
