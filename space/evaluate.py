"""Scoring a trained run on a store split, as table 1 does: `python -m space evaluate --help`.

Writes to the output folder (default RUN/eval/SPLIT):

    metrics.json        the scores, with a trivial baseline's beside them
    detections.json     the detections, COCO results format (one category, "object")
    ground_truth.json   the COCO ground truth they were scored against (one category)

so that anyone can recompute the COCO numbers with pycocotools from the two JSON files.

On an Atari store (boxes from the RAM, `python -m datagen atari`) metrics.json also holds `precision`,
`recall` and `f1` with the centre-distance match (a detection hits a box when its centre lies within half
the box's diagonal of the box's centre; `space.metrics.centre_matches`) over every non-HUD object, and
under `atari` the same with AP50 for the moving objects only, per game, and per category. Detections
name no category: for one category (or the moving set) a detection that hits an object outside it is
left out, and one that hits nothing counts against it.

A detection is a cell whose z_pres probability is above `threshold` (0.5, a hard z_pres), scored by that
probability, its box from the z_where mean, clipped to the frame.
With `refine` (`--refine`, not in the paper) the cells are those space/refine.py's search over z_pres
settles on, each still scored by its amortised probability; metrics.json says `refined` and how many
cells the search changed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError
from .data import StoreDataset
from .metrics import (adjusted_rand_index, centre_scores, coco_ap, count_scores, detect, matched_mask_iou, paper_ap,
                      subset_scores)
from .model import to_canvas

OBJECT_CATEGORY = 1  # the one category of detections and ground truth: SPACE finds objects, it does not name them


def instance_labels(out: dict, image_size: int) -> np.ndarray:
    """Which glimpse owns each pixel: (B, N, N), 0 where the foreground mask alpha is below 0.5, else
    1 + the index of the cell whose glimpse has the largest depth-weighted mask there (algorithm 1's
    weights). Needs an eval-mode output (it holds the glimpse maps)."""
    fg = out["fg"]
    maps = fg["glimpse_maps"]  # (B, C, 5, S, S)
    b, c = maps.shape[:2]
    labels = []
    for i in range(b):  # one image at a time: C full-canvas maps of one image are small, of a batch not
        alpha_att = to_canvas(maps[i : i + 1, :, :1], fg["centre"][i : i + 1].reshape(1, c, 2),
                              fg["size"][i : i + 1].reshape(1, c, 2), image_size)[0, :, 0]  # (C, N, N)
        z_pres = fg["z_pres"][i].reshape(c, 1, 1)
        importance = alpha_att * z_pres * fg["depth_weight"][i].reshape(c, 1, 1)
        owner = importance.argmax(0) + 1  # (N, N)
        labels.append(torch.where(fg["alpha"][i, 0] >= 0.5, owner, 0).cpu().numpy())
    return np.stack(labels)


def segmentation_scores(gt_masks: np.ndarray, labels: np.ndarray, ignore: int) -> tuple[list, list]:
    """Per image with objects: ARI over the objects' pixels (FG-ARI) and the matched masks' mean IoU."""
    aris, ious = [], []
    for gt, pred in zip(gt_masks, labels):
        fg = (gt != 0) & (gt != ignore)
        if not fg.any():
            continue
        aris.append(adjusted_rand_index(gt[fg], pred[fg]))
        ious.append(matched_mask_iou(gt, pred, ignore=ignore))
    return aris, ious


def cell_labels(n_images: int, grid: int, image_size: int) -> np.ndarray:
    """The trivial segmentation: every pixel belongs to its cell."""
    cell = np.arange(image_size) * grid // image_size
    one = 1 + cell[:, None] * grid + cell[None, :]
    return np.broadcast_to(one, (n_images, image_size, image_size))


def cell_baseline(n_images: int, grid: int, image_size: int):
    """The trivial detector: every cell reports its own square, with score 1."""
    cell = image_size / grid
    ys, xs = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    boxes = np.stack([xs * cell, ys * cell, (xs + 1) * cell, (ys + 1) * cell], -1).reshape(-1, 4).astype(np.float64)
    return [(boxes, np.ones(len(boxes))) for _ in range(n_images)]


def box_scores(gt_boxes, dets, centre: bool = False) -> dict:
    det_boxes = [d[0] for d in dets]
    det_scores = [d[1] for d in dets]
    return {
        "ap50": coco_ap(gt_boxes, det_boxes, det_scores, 0.5),
        "ap50_95": coco_ap(gt_boxes, det_boxes, det_scores),
        "ap50_paper": paper_ap(gt_boxes, det_boxes, det_scores, 0.5),
        "ap50_95_paper": paper_ap(gt_boxes, det_boxes, det_scores),
        **count_scores([len(g) for g in gt_boxes], [len(b) for b in det_boxes]),
        **(centre_scores(gt_boxes, det_boxes, det_scores) if centre else {}),
    }


def atari_scores(store, split: str, n: int, gt_boxes, dets) -> dict:
    """Per game and per category scores of an Atari store (see the module's docstring)."""
    labels = store.read(split, "labels", slice(0, n))  # (N, K), -1 padding
    moving = store.read(split, "moving", slice(0, n)).astype(bool)  # (N, K)
    game = store.read(split, "game", slice(0, n))  # (N,)
    games = store.attrs["params"]["games"]
    det_boxes = [d[0] for d in dets]
    det_scores = [d[1] for d in dets]
    lab = [labels[i, : len(g)] for i, g in enumerate(gt_boxes)]  # boxes come first, padding after
    mov = [moving[i, : len(g)] for i, g in enumerate(gt_boxes)]

    def scores(images, keep):
        return subset_scores([gt_boxes[i] for i in images], [keep[i] for i in images],
                             [det_boxes[i] for i in images], [det_scores[i] for i in images])

    everything = [np.ones(len(g), bool) for g in gt_boxes]
    all_images = range(len(gt_boxes))
    out = {"all": scores(all_images, everything), "moving": scores(all_images, mov), "games": {}, "categories": {}}
    for g, name in enumerate(games):
        images = [i for i in all_images if game[i] == g]
        out["games"][name] = {"all": scores(images, everything), "moving": scores(images, mov)}
    for c, name in enumerate(store.categories):
        g = games.index(name.split(".")[0])
        images = [i for i in all_images if game[i] == g]
        out["categories"][name] = scores(images, [lab_i == c for lab_i in lab])
    return out


def coco_files(gt_boxes, dets, image_size: int, split: str):
    """COCO ground truth and results, one category, boxes as [x, y, width, height]."""
    images = [{"id": i, "width": image_size, "height": image_size, "file_name": f"{split}/{i:06d}"}
              for i in range(len(gt_boxes))]
    annotations = []
    for i, boxes in enumerate(gt_boxes):
        for x0, y0, x1, y1 in boxes.tolist():
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": OBJECT_CATEGORY,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    gt = {"images": images, "annotations": annotations,
          "categories": [{"id": OBJECT_CATEGORY, "name": "object", "supercategory": "object"}]}
    results = [{"image_id": i, "category_id": OBJECT_CATEGORY, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": s}
               for i, (boxes, scores) in enumerate(dets)
               for (x0, y0, x1, y1), s in zip(boxes.tolist(), scores.tolist())]
    return gt, results


def evaluate(run: str, data: str, split: str = "test", out: str | None = None, threshold: float = 0.5,
             batch_size: int = 32, frames: int | None = None, device: str = "cpu", progress: bool = True,
             checkpoint: str | Path | None = None, refine: bool = False, refine_candidates: float | None = None,
             refine_cost: float = 0.0, refine_box_steps: int = 0, refine_box_lr: float = 0.1,
             refine_box_rounds: int = 1) -> dict:
    """Score `checkpoint` (default: the run's last) on a split; writes and returns metrics.json's scores.
    refine: score the z_pres decisions refined by the model's own objective (space/refine.py) instead of
    the amortised ones; refine_candidates: the smallest amortised probability of a cell the search may
    flip (default `threshold`: it only switches cells off; lower also lets it switch cells on);
    refine_cost: nats the search charges for each cell on, over the objective (0: none); refine_box_steps:
    Adam steps (at refine_box_lr) on the boxes of the cells on after the search, which then runs again;
    refine_box_rounds: how many times boxes-then-search runs."""
    from tqdm import tqdm

    from .checkpoints import load_model
    from .encode import latents
    from .probe import matched_codes, probe
    from .refine import refined_output

    checkpoint = Path(checkpoint) if checkpoint else Path(run) / "checkpoints" / "last.pt"
    refine_candidates = threshold if refine_candidates is None else refine_candidates
    if batch_size < 1:
        raise ConfigError(f"batch_size: at least 1, got {batch_size}")
    folder = Path(out) if out else Path(run) / "eval" / split
    if folder.exists() and not folder.is_dir():  # found now, not after scoring every frame
        raise ConfigError(f"the output folder {folder} is a file; give a folder (created if missing)")
    model, cfg, state = load_model(checkpoint, device)
    step = int(state["step"])
    dataset = StoreDataset(data, split, image_size=cfg.model.image_size)
    n = len(dataset) if frames is None else min(frames, len(dataset))
    size = cfg.model.image_size

    gt_all = dataset.store.read(split, "boxes", slice(0, n))  # (N, K, 4) NaN-padded
    gt_boxes = [g[~np.isnan(g[:, 0])].astype(np.float64) for g in gt_all]
    from datagen.store import MASK_OTHER_OBJECT

    has_masks = "masks" in dataset.store.split(split)
    dets, sq_err, aris, ious, base_aris, base_ious, cells = [], 0.0, [], [], [], [], []
    flips = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in tqdm(range(0, n, batch_size), desc=f"evaluate {split}", unit="batch", disable=not progress):
            idx = np.arange(start, min(start + batch_size, n))
            x = dataset.__getitems__(idx).to(device)
            if refine:  # the decisions the search settles on, scored by the amortised probability
                o, present, prob, f = refined_output(model, x, step, threshold, refine_candidates, refine_cost,
                                                    refine_box_steps, refine_box_lr, refine_box_rounds)
                dets += detect(o, size, threshold, present=present, scores=prob)
                flips += int(f.sum())
            else:
                o = model(x, step)
                dets += detect(o, size, threshold)
            sq_err += float(o["mse"].sum())
            z = latents(model, x, step, out=o)  # for the z_what probe: each cell's box, probability, z_what
            g2 = cfg.model.grid_size ** 2
            cells += [(b.reshape(g2, 4), p.reshape(g2), w.reshape(g2, -1)) for b, p, w in
                      zip(z["box"].cpu().numpy(), z["z_pres_prob"].cpu().numpy(), z["z_what"].cpu().numpy())]
            if has_masks:
                gt_masks = dataset.store.read(split, "masks", idx)  # (B, N, N)
                a, i = segmentation_scores(gt_masks, instance_labels(o, size), MASK_OTHER_OBJECT)
                aris += a
                ious += i
                a, i = segmentation_scores(gt_masks, cell_labels(len(idx), cfg.model.grid_size, size),
                                           MASK_OTHER_OBJECT)
                base_aris += a
                base_ious += i
    seconds = time.perf_counter() - t0

    def mean(v):
        return float(np.mean(v)) if v else float("nan")

    is_atari = dataset.store.attrs.get("generator") == "atari"
    metrics = {**box_scores(gt_boxes, dets, centre=is_atari), "mse": sq_err / n}
    if has_masks:
        metrics.update(fg_ari=mean(aris), mask_miou=mean(ious))
    baseline_dets = cell_baseline(n, cfg.model.grid_size, size)
    baseline = box_scores(gt_boxes, baseline_dets, centre=is_atari)
    if has_masks:
        baseline.update(fg_ari=mean(base_aris), mask_miou=mean(base_ious))
    metrics.update({f"baseline_{k}": v for k, v in baseline.items()})
    # Which store the model learnt from and which it was scored on (digests of how each was made and of its
    # bytes, space/rundir.py): a reader of metrics.json can tell a model scored on its own data from one
    # scored on a store since remade. Both through the run record's functions, so a store without an
    # `identity` attribute (written by another program) is named alike when trained on and when scored.
    from .rundir import store_digest, store_record

    record = state.get("record") or {}
    metrics.update(trained_on=store_digest(record.get("store")),
                   scored_on=store_digest(store_record(dataset.store, data)))
    metrics.update(checkpoint=checkpoint.name, frames=n, split=split, step=step, threshold=threshold, objects=sum(len(g) for g in gt_boxes),
                   detections=sum(len(d[0]) for d in dets), seconds=round(seconds, 2), refined=refine)
    if refine:
        metrics["refine_candidates"] = refine_candidates
        metrics["refine_cost"] = refine_cost
        metrics["refine_box_steps"] = refine_box_steps
        if refine_box_steps:
            metrics["refine_box_lr"] = refine_box_lr
            metrics["refine_box_rounds"] = refine_box_rounds
        metrics["refine_flips"] = flips  # cells whose decision the search changed, over all frames
    # z_what's use beyond the paper: each found object's category read back from its z_what
    gt_labels = dataset.store.read(split, "labels", slice(0, n))  # (N, K), boxes first, -1 padding
    codes, cats = matched_codes(gt_boxes, [gt_labels[i, : len(g)] for i, g in enumerate(gt_boxes)],
                                *zip(*cells), threshold=threshold) if cells else (np.zeros((0, 1)), np.zeros(0, int))
    metrics["z_what_probe"] = probe(codes, cats, list(dataset.store.categories))
    if is_atari:
        metrics["atari"] = atari_scores(dataset.store, split, n, gt_boxes, dets)
        metrics["baseline_atari"] = atari_scores(dataset.store, split, n, gt_boxes, baseline_dets)

    gt_json, det_json = coco_files(gt_boxes, dets, size, split)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ground_truth.json").write_text(json.dumps(gt_json))
    (folder / "detections.json").write_text(json.dumps(det_json))
    # AP is undefined (NaN) on a split without objects: null in JSON.
    metrics = _nan_to_none(metrics)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _nan_to_none(v):
    if isinstance(v, dict):
        return {k: _nan_to_none(x) for k, x in v.items()}
    return None if isinstance(v, float) and v != v else v


SUMMARY_COLUMNS = ("ap50", "ap50_95", "ap50_paper", "ap50_95_paper", "count_error", "count_accuracy", "mse",
                   "fg_ari", "mask_miou", "f1", "baseline_ap50", "baseline_count_error", "step", "frames")


def summary_head(rows: list[dict]) -> list[str]:
    """The summary table's columns: the run, its split and seeds, then the scores."""
    return list(rows[0]) if rows else ["run", "split", "seeds", SUMMARY_COLUMNS[0], "ap50_std", *SUMMARY_COLUMNS[1:]]


def summary(metric_files: list[str]) -> tuple[str, list[dict]]:
    """A Markdown table and its rows, one per run, from `evaluate`'s metrics.json files.

    The run is named by its directory: results/runs/NAME/eval/SPLIT/metrics.json -> NAME. A file combined
    over seeds (`python -m space seeds`) gives their means, the number of seeds and AP50's standard deviation.
    """
    rows = []
    for f in metric_files:
        path = Path(f)
        m = json.loads(path.read_text())
        name = path.parents[2].name if len(path.parents) > 2 and path.parent.parent.name == "eval" else str(path)
        spread = (m.get("spread") or {}).get("ap50") or {}
        rows.append({"run": name, "split": m.get("split"), "seeds": len(m.get("seeds") or [None]),
                     **{k: m.get(k) for k in SUMMARY_COLUMNS[:1]}, "ap50_std": spread.get("std"),
                     **{k: m.get(k) for k in SUMMARY_COLUMNS[1:]}})

    def cell(v):
        return "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    head = summary_head(rows)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(r[k]) for k in head) + " |" for r in rows]
    return "\n".join(lines) + "\n", rows


def summary_tsv(rows: list[dict]) -> str:
    """`summary`'s rows as tab-separated values with a header line (empty cells for missing scores)."""
    head = summary_head(rows)
    cell = lambda v: "" if v is None else repr(v) if isinstance(v, float) else str(v)  # noqa: E731
    return "".join("\t".join(line) + "\n" for line in [head, *([cell(r[k]) for k in head] for r in rows)])
