"""Pictures of what the model sees: input, reconstruction, boxes, foreground, background components."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw


def boxes_from_output(out: dict, threshold: float = 0.5):
    """Per image, the boxes (x0, y0, x1, y1 in fractions of the image) and z_pres probabilities of the
    cells whose z_pres probability exceeds `threshold` (a hard z_pres), from the z_where means."""
    fg = out["fg"]
    prob = fg["z_pres_prob"].flatten(1)  # (B, C)
    centre = fg["centre"].flatten(1, 2)  # (B, C, 2)
    size = fg["size"].flatten(1, 2)
    result = []
    for i in range(prob.shape[0]):
        keep = prob[i] > threshold
        c, s = centre[i][keep], size[i][keep]
        box = torch.cat([c - s / 2, c + s / 2], 1).clamp(0, 1)
        result.append((box.detach().cpu().numpy(), prob[i][keep].detach().cpu().numpy()))
    return result


def _img(t: torch.Tensor) -> np.ndarray:
    """(3, N, N) or (1, N, N) in [0, 1] -> (N, N, 3) uint8."""
    t = t.detach().float().clamp(0, 1).cpu()
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    return (t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


TITLE_HEIGHT = 14  # pixels of the row of column titles, room for PIL's default font


def column_titles(k: int) -> list[str]:
    """The titles of the grid's columns, short enough for a 64-pixel tile."""
    return ["input", "recon", "boxes", "fg", "alpha", "bg", *(f"bg {j + 1}" for j in range(k))]


def decomposition_grid(x: torch.Tensor, out: dict, rows: int = 8, scale: int = 2, titles: bool = True) -> np.ndarray:
    """One row per image: input, reconstruction, boxes over the input, foreground (alpha * mu_fg),
    alpha, background, and each background component (pi_k * mu_k), under a row of column titles (unless
    `titles` is false). Returns (H, W, 3) uint8."""
    b = min(rows, x.shape[0])
    fg = out["fg"]
    boxes = boxes_from_output(out)
    k = out["pi"].shape[1]
    n = x.shape[-1]
    tiles_per_row = 6 + k
    pad = 2
    sheet = Image.new("RGB", (tiles_per_row * (n * scale + pad) + pad, b * (n * scale + pad) + pad), (40, 40, 40))
    for i in range(b):
        tiles = [
            _img(x[i]),
            _img(out["recon"][i]),
            _img(x[i]),
            _img(fg["alpha"][i] * fg["mu_fg"][i]),
            _img(fg["alpha"][i]),
            _img(out["bg_image"][i]),
        ] + [_img(out["pi"][i, j] * out["bg"]["mu_bg"][i, j]) for j in range(k)]
        for t, tile in enumerate(tiles):
            im = Image.fromarray(tile).resize((n * scale, n * scale), Image.NEAREST)
            if t == 2:
                d = ImageDraw.Draw(im)
                for bx in boxes[i][0]:
                    x0, y0, x1, y1 = (bx * n * scale).tolist()
                    d.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=(255, 40, 40))
            sheet.paste(im, (pad + t * (n * scale + pad), pad + i * (n * scale + pad)))
    if titles:
        titled = Image.new("RGB", (sheet.width, sheet.height + TITLE_HEIGHT), (40, 40, 40))
        titled.paste(sheet, (0, TITLE_HEIGHT))
        d = ImageDraw.Draw(titled)
        for t, title in enumerate(column_titles(k)):
            d.text((pad + t * (n * scale + pad) + 2, 2), title, fill=(230, 230, 230))
        sheet = titled
    return np.asarray(sheet)


COLUMNS = "input, reconstruction, boxes (z_pres > 0.5), foreground, alpha, background, components 1..K"
