"""Contact sheets: frames of a store with their ground-truth boxes, to check a dataset by eye."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from .store import Store

# One outline colour per category id, cycled.
BOX_COLORS = ((255, 255, 0), (255, 0, 255), (0, 255, 255), (255, 128, 0), (128, 255, 0), (0, 128, 255))


def contact_sheet(store: Store, split: str, frames: list[int], scale: int = 2, columns: int = 8) -> Image.Image:
    n = len(frames)
    idx = np.asarray(frames)
    images = store.read(split, "images", idx)  # (n, H, W, 3)
    boxes = store.read(split, "boxes", idx)  # (n, K, 4)
    labels = store.read(split, "labels", idx)  # (n, K)
    counts = store.read(split, "n_objects", idx)  # (n,)
    h, w = images.shape[1:3]
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    pad = 2
    sheet = Image.new("RGB", (cols * (w * scale + pad) + pad, rows * (h * scale + pad + 12) + pad), (20, 20, 20))
    draw = ImageDraw.Draw(sheet)
    for j in range(n):
        r, c = divmod(j, cols)
        x0, y0 = pad + c * (w * scale + pad), pad + r * (h * scale + pad + 12)
        tile = Image.fromarray(images[j]).resize((w * scale, h * scale), Image.NEAREST)
        sheet.paste(tile, (x0, y0))
        for k in range(int(counts[j])):
            bx = boxes[j, k] * scale
            color = BOX_COLORS[int(labels[j, k]) % len(BOX_COLORS)]
            draw.rectangle([x0 + bx[0], y0 + bx[1], x0 + bx[2] - 1, y0 + bx[3] - 1], outline=color)
        draw.text((x0 + 2, y0 + h * scale), f"{split}[{frames[j]}] n={int(counts[j])}", fill=(230, 230, 230))
    return sheet
