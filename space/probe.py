"""Does z_what tell objects apart? The category of each detected ground-truth object read back from its
z_what, by a linear probe (cross-validated) and by few-shot nearest class means: a use of the latents
beyond the paper, as RL and object-centric work uses them. Reported by `evaluate` as `z_what_probe`."""

from __future__ import annotations

import numpy as np
import torch

FOLDS = 5  # cross-validation folds of the linear probe
L2 = 1e-3  # the probe's weight decay, on standardised features
SHOTS = (1, 5)  # labelled examples per class for the few-shot readings
DRAWS = 20  # random draws of the labelled examples, averaged


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Boxes (n, 4) and (m, 4), x_min, y_min, x_max, y_max -> IoU (n, m)."""
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), -1)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], -1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter + 1e-9)


def matched_codes(gt_boxes, gt_labels, cell_boxes, cell_prob, z_what, threshold: float = 0.5, min_iou: float = 0.5):
    """Per image: ground-truth boxes (k, 4) and labels (k,); the cells' boxes (C, 4), z_pres probabilities
    (C,) and z_what (C, D). Each object takes the present cell (probability above `threshold`) whose box
    overlaps it most, if that IoU reaches `min_iou`, each cell once. Returns X (M, D) and y (M,)."""
    xs, ys = [], []
    for boxes, labels, cb, prob, z in zip(gt_boxes, gt_labels, cell_boxes, cell_prob, z_what):
        keep = np.flatnonzero(prob > threshold)
        if not len(boxes) or not len(keep):
            continue
        iou = iou_matrix(boxes, cb[keep])  # (k, present)
        taken = set()
        for i in np.argsort(-iou.max(1)):  # the best-covered objects choose first
            for j in np.argsort(-iou[i]):
                if iou[i, j] < min_iou:
                    break
                if j not in taken:
                    taken.add(j)
                    xs.append(z[keep[j]])
                    ys.append(labels[i])
                    break
    d = z_what[0].shape[-1] if len(z_what) else 0
    return (np.stack(xs) if xs else np.zeros((0, d), np.float32)), np.asarray(ys, np.int64)


def linear_probe_accuracy(x: np.ndarray, y: np.ndarray, folds: int = FOLDS, seed: int = 0) -> float:
    """Held-out accuracy of multinomial logistic regression on standardised features, over `folds` folds."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    classes = np.unique(y)
    index = {c: i for i, c in enumerate(classes)}
    target = torch.tensor([index[c] for c in y])
    feats = torch.tensor(x, dtype=torch.float64)
    right = 0
    for f in range(folds):
        test = order[f::folds]
        train = np.setdiff1d(order, test)
        mu, sd = feats[train].mean(0), feats[train].std(0) + 1e-6
        a, b = (feats[train] - mu) / sd, (feats[test] - mu) / sd
        w = torch.zeros(x.shape[1], len(classes), dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, bias], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(a @ w + bias, target[train]) + L2 * (w**2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            right += int(((b @ w + bias).argmax(1) == target[test]).sum())
    return right / len(y)


def few_shot_accuracy(x: np.ndarray, y: np.ndarray, shots: int, draws: int = DRAWS, seed: int = 0) -> float | None:
    """Accuracy of nearest class mean (Euclidean) from `shots` labelled examples per class, on the rest;
    None when a class has no example left to test."""
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    if min((y == c).sum() for c in classes) <= shots:
        return None
    scores = []
    for _ in range(draws):
        labelled = np.concatenate([rng.choice(np.flatnonzero(y == c), shots, replace=False) for c in classes])
        rest = np.setdiff1d(np.arange(len(y)), labelled)
        means = np.stack([x[labelled][y[labelled] == c].mean(0) for c in classes])
        nearest = classes[np.argmin(((x[rest, None, :] - means[None]) ** 2).sum(-1), 1)]
        scores.append(float((nearest == y[rest]).mean()))
    return float(np.mean(scores))


def probe(x: np.ndarray, y: np.ndarray, categories: list[str]) -> dict:
    """The z_what probe's scores for objects' codes x (M, D) and categories y (M,)."""
    counts = {categories[c]: int((y == c).sum()) for c in np.unique(y)} if len(y) else {}
    out = {"objects": int(len(y)), "per_category": counts,
           "chance": max(counts.values()) / len(y) if counts else None}
    usable = len(counts) >= 2 and min(counts.values()) >= FOLDS
    out["linear_accuracy"] = linear_probe_accuracy(x, y) if usable else None
    for shots in SHOTS:
        out[f"few_shot_{shots}"] = few_shot_accuracy(x, y, shots) if len(counts) >= 2 else None
    return out
