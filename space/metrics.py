"""Box and count scores of table 1, written out so they can be checked line by line.

Boxes are (x0, y0, x1, y1) in pixels, one array (n, 4) per image; detections carry a score. Every score is
class-agnostic: SPACE finds objects, it does not name them. `detect` reads them off a model's output: each
cell whose z_pres probability is above a threshold is a box, its glimpse's extent, scored by that probability.

Two AP definitions:
- `coco_ap`: the COCO definition (pycocotools' COCOeval for one category and all areas, without a cap on
  detections per image): per image, detections in score order each take the still-free ground-truth box
  of highest IoU at or above the threshold; precision made monotone and read at 101 recall points.
- `paper_ap`: the definition behind the paper's table 1: per image, each detection in score order takes
  its highest-IoU ground-truth box, and is a true positive only if that IoU is strictly above the
  threshold and the box is still free (no fallback to the next box); precision read at 11 recall points
  over all detections ranked globally.
"""

from __future__ import annotations

import numpy as np
import torch

IOU_THRESHOLDS = np.round(np.arange(0.5, 0.951, 0.05), 2)  # 0.5:0.05:0.95


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in a (n, 4) with every box in b (m, 4) -> (n, m)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _order(scores: np.ndarray) -> np.ndarray:
    return np.argsort(-np.asarray(scores), kind="mergesort")  # stable: ties keep their given order


def _match_coco(iou: np.ndarray, threshold: float) -> np.ndarray:
    """iou (dets in score order, gts) -> true-positive flags, COCO's greedy matching."""
    free = np.ones(iou.shape[1], dtype=bool)
    tp = np.zeros(iou.shape[0], dtype=bool)
    for d in range(iou.shape[0]):
        best, m = min(threshold, 1 - 1e-10), -1
        for g in range(iou.shape[1]):
            if free[g] and iou[d, g] >= best:  # a later box with an equal IoU wins, as in COCOeval
                best, m = iou[d, g], g
        if m >= 0:
            free[m] = False
            tp[d] = True
    return tp


def _match_paper(iou: np.ndarray, threshold: float) -> np.ndarray:
    """iou (dets in score order, gts) -> true-positive flags: best box only, IoU strictly above."""
    free = np.ones(iou.shape[1], dtype=bool)
    tp = np.zeros(iou.shape[0], dtype=bool)
    if iou.shape[1] == 0:
        return tp
    for d in range(iou.shape[0]):
        g = int(np.argmax(iou[d]))
        if iou[d, g] > threshold and free[g]:
            free[g] = False
            tp[d] = True
    return tp


def _pr(tp_per_image, scores_per_image, n_gt: int):
    """Globally ranked cumulative precision and recall."""
    tp = np.concatenate(tp_per_image) if tp_per_image else np.zeros(0, bool)
    scores = np.concatenate(scores_per_image) if scores_per_image else np.zeros(0)
    order = _order(scores)
    tp = tp[order]
    ctp = np.cumsum(tp)
    cfp = np.cumsum(~tp)
    recall = ctp / n_gt
    precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
    return precision, recall


def _ap(gt_boxes, det_boxes, det_scores, threshold: float, rule: str) -> float:
    n_gt = sum(len(g) for g in gt_boxes)
    if n_gt == 0:
        return float("nan")  # no ground truth: AP is undefined
    tps, scores = [], []
    for g, d, s in zip(gt_boxes, det_boxes, det_scores):
        o = _order(s)
        iou = iou_matrix(np.asarray(d).reshape(-1, 4)[o], g)
        tps.append(_match_coco(iou, threshold) if rule == "coco" else _match_paper(iou, threshold))
        scores.append(np.asarray(s, dtype=np.float64)[o])
    precision, recall = _pr(tps, scores, n_gt)
    if rule == "coco":
        # Monotone precision envelope, read at 101 recall points (first rank reaching each recall).
        precision = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
        points = np.linspace(0, 1, 101)
        idx = np.searchsorted(recall, points, side="left")
        return float(np.mean([precision[i] if i < len(precision) else 0.0 for i in idx]))
    # 11-point interpolation: the best precision at recall >= r, for r = 0, 0.1, ..., 1.
    points = np.linspace(0, 1, 11)
    return float(np.mean([precision[recall >= r].max() if np.any(recall >= r) else 0.0 for r in points]))


def detect(out: dict, image_size: int, threshold: float, present=None, scores=None):
    """Model outputs -> per image (boxes (n, 4) x0, y0, x1, y1 in pixels, scores (n,)), scores descending.
    A detection is a cell whose z_pres probability is above `threshold`, or, given `present` (B, G, G) bool,
    a cell it marks; `scores` (B, G, G) replaces the probability as the score."""
    fg = out["fg"]
    prob = (fg["z_pres_prob"] if scores is None else scores).flatten(1)  # (B, C)
    centre = fg["centre"].flatten(1, 2) * image_size  # (B, C, 2) pixels
    size = fg["size"].flatten(1, 2) * image_size
    boxes = torch.cat([centre - size / 2, centre + size / 2], -1).clamp(0, image_size)  # (B, C, 4)
    result = []
    for i in range(prob.shape[0]):
        keep = prob[i] > threshold if present is None else present[i].flatten()
        p, b = prob[i][keep], boxes[i][keep]
        order = torch.argsort(p, descending=True, stable=True)
        result.append((b[order].double().cpu().numpy(), p[order].double().cpu().numpy()))
    return result


def coco_ap(gt_boxes, det_boxes, det_scores, threshold: float | None = None) -> float:
    """COCO AP at one IoU threshold, or averaged over 0.5:0.05:0.95 when `threshold` is None."""
    ts = IOU_THRESHOLDS if threshold is None else [threshold]
    return float(np.mean([_ap(gt_boxes, det_boxes, det_scores, t, "coco") for t in ts]))


def paper_ap(gt_boxes, det_boxes, det_scores, threshold: float | None = None) -> float:
    """Table 1's AP at one IoU threshold, or averaged over 0.5:0.05:0.95 when `threshold` is None."""
    ts = IOU_THRESHOLDS if threshold is None else [threshold]
    return float(np.mean([_ap(gt_boxes, det_boxes, det_scores, t, "paper") for t in ts]))


def frame_count_errors(true_counts, predicted_counts) -> np.ndarray:
    """Each image's |predicted - true| / true; an image with no objects divides by 1 instead of 0 (its
    error is the number of objects predicted)."""
    t = np.asarray(true_counts, dtype=np.float64)
    p = np.asarray(predicted_counts, dtype=np.float64)
    return np.abs(p - t) / np.maximum(t, 1)


def count_scores(true_counts, predicted_counts) -> dict:
    """Table 1's object-count error rate, the mean of `frame_count_errors` over images, and the share of
    images counted exactly."""
    return {"count_error": float(np.mean(frame_count_errors(true_counts, predicted_counts))),
            "count_accuracy": float(np.mean(np.asarray(predicted_counts) == np.asarray(true_counts)))}


def adjusted_rand_index(a, b) -> float:
    """ARI of two labelings of the same items (Hubert and Arabie). Two one-cluster labelings score 1, as
    scikit-learn counts them."""
    a = np.asarray(a).ravel()
    b = np.asarray(b).ravel()
    if a.size != b.size:
        raise ValueError(f"labelings of {a.size} and {b.size} items")
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    nb = int(bi.max()) + 1 if bi.size else 1
    pairs = np.bincount(ai.astype(np.int64) * nb + bi, minlength=0).astype(np.float64)  # contingency counts

    def comb2(x):
        return float(np.sum(x * (x - 1) / 2))

    same_both = comb2(pairs)
    same_a = comb2(np.bincount(ai).astype(np.float64))
    same_b = comb2(np.bincount(bi).astype(np.float64))
    total = a.size * (a.size - 1) / 2
    expected = same_a * same_b / total if total else 0.0
    best = (same_a + same_b) / 2
    if best == expected:
        return 1.0
    return (same_both - expected) / (best - expected)


def matched_mask_iou(gt: np.ndarray, pred: np.ndarray, ignore: int | None = None) -> float:
    """Mean IoU over the ground-truth objects of one image, each matched to at most one predicted segment.

    gt, pred: (H, W) integer maps, 0 background, other values one object or segment each; pixels equal to
    `ignore` in gt are left out. Matching is greedy by IoU, highest first; an unmatched object scores 0.
    NaN when the image has no object.
    """
    keep = np.ones(gt.shape, bool) if ignore is None else gt != ignore
    g, p = gt[keep], pred[keep]
    objects = [v for v in np.unique(g) if v != 0]
    segments = [v for v in np.unique(p) if v != 0]
    if not objects:
        return float("nan")
    if not segments:
        return 0.0
    gm = np.stack([g == v for v in objects])  # (n_obj, pixels)
    pm = np.stack([p == v for v in segments])  # (n_seg, pixels)
    inter = gm.astype(np.float64) @ pm.T.astype(np.float64)
    union = gm.sum(1)[:, None] + pm.sum(1)[None, :] - inter
    iou = inter / np.maximum(union, 1)
    scores = np.zeros(len(objects))
    free_o = np.ones(len(objects), bool)
    free_s = np.ones(len(segments), bool)
    for flat in np.argsort(-iou, axis=None, kind="mergesort"):
        o, s = divmod(int(flat), len(segments))
        if iou[o, s] <= 0:
            break
        if free_o[o] and free_s[s]:
            scores[o] = iou[o, s]
            free_o[o] = free_s[s] = False
    return float(scores.mean())


def centre_matches(gt: np.ndarray, det: np.ndarray) -> np.ndarray:
    """One image: detections (in score order) -> the ground-truth box each one hits, or -1.

    A detection hits a ground-truth box when the detection's centre lies within half the box's diagonal
    of the box's centre (on the circle counts). In score order, each detection takes the nearest box it
    hits that no earlier detection took, so a box is hit at most once.
    """
    gt = np.asarray(gt, dtype=np.float64).reshape(-1, 4)
    det = np.asarray(det, dtype=np.float64).reshape(-1, 4)
    match = np.full(len(det), -1)
    if len(gt) == 0 or len(det) == 0:
        return match
    g_centre = (gt[:, :2] + gt[:, 2:]) / 2
    radius = np.hypot(gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]) / 2
    d_centre = (det[:, :2] + det[:, 2:]) / 2
    dist = np.hypot(*(d_centre[:, None, :] - g_centre[None, :, :]).transpose(2, 0, 1))  # (dets, gts)
    free = np.ones(len(gt), bool)
    for d in range(len(det)):
        hits = np.flatnonzero(free & (dist[d] <= radius))
        if hits.size:
            g = hits[np.argmin(dist[d, hits])]
            match[d] = g
            free[g] = False
    return match


def prf(tp: int, n_det: int, n_gt: int) -> dict:
    """Precision, recall and F1 from counts; NaN where a denominator is 0."""
    precision = tp / n_det if n_det else float("nan")
    recall = tp / n_gt if n_gt else float("nan")
    f1 = 2 * tp / (n_det + n_gt) if n_det + n_gt else float("nan")
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1)}


def centre_scores(gt_boxes, det_boxes, det_scores) -> dict:
    """Precision, recall and F1 over a set of images with the centre-distance match."""
    tp = n_det = n_gt = 0
    for g, d, s in zip(gt_boxes, det_boxes, det_scores):
        d = np.asarray(d).reshape(-1, 4)[_order(s)]
        tp += int((centre_matches(g, d) >= 0).sum())
        n_det += len(d)
        n_gt += len(np.asarray(g).reshape(-1, 4))
    return prf(tp, n_det, n_gt)


def subset_scores(gt_boxes, keep, det_boxes, det_scores) -> dict:
    """Scores against a subset of each image's ground-truth boxes (keep: one boolean array per image).

    Detections are class-agnostic, so a detection that hits a box outside the subset (centre match against
    every box of the image) is neither right nor wrong for the subset: it is left out. The rest are scored
    with `centre_scores` (precision, recall, F1) and `coco_ap` at IoU 0.5 against the subset's boxes.
    """
    sub_gt, sub_det, sub_scores = [], [], []
    for g, k, d, s in zip(gt_boxes, keep, det_boxes, det_scores):
        g = np.asarray(g, dtype=np.float64).reshape(-1, 4)
        k = np.asarray(k, dtype=bool)
        o = _order(s)
        d = np.asarray(d, dtype=np.float64).reshape(-1, 4)[o]
        s = np.asarray(s, dtype=np.float64)[o]
        m = centre_matches(g, d)
        other = (m >= 0) & ~k[np.maximum(m, 0)] if len(g) else np.zeros(len(d), bool)
        sub_gt.append(g[k])
        sub_det.append(d[~other])
        sub_scores.append(s[~other])
    return {**centre_scores(sub_gt, sub_det, sub_scores), "ap50": coco_ap(sub_gt, sub_det, sub_scores, 0.5),
            "objects": int(sum(len(g) for g in sub_gt)), "detections": int(sum(len(d) for d in sub_det))}
