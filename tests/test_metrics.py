"""Box and count scores (space/metrics.py) against pycocotools and against hand-made cases."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest

from space.metrics import coco_ap, count_scores, iou_matrix, paper_ap


def _pycocotools_ap(gt_boxes, det_boxes, det_scores):
    """(AP@0.5:0.95, AP@0.5) from COCOeval, one category, boxes as x0, y0, x1, y1."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(b):
        return [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]

    gt = {"images": [{"id": i} for i in range(len(gt_boxes))], "categories": [{"id": 1, "name": "object"}],
          "annotations": [{"id": k + 1, "image_id": i, "category_id": 1, "bbox": xywh(b),
                           "area": float((b[2] - b[0]) * (b[3] - b[1])), "iscrowd": 0}
                          for k, (i, b) in enumerate((i, b) for i, g in enumerate(gt_boxes) for b in g)]}
    dets = [{"image_id": i, "category_id": 1, "bbox": xywh(b), "score": float(s)}
            for i, (bs, ss) in enumerate(zip(det_boxes, det_scores)) for b, s in zip(bs, ss)]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(dets), "bbox")
        ev.params.maxDets = [1, 10, 100]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0]), float(ev.stats[1])


def _random_scenes(seed, n_images=25):
    rng = np.random.default_rng(seed)
    gts, dets, scores = [], [], []
    for _ in range(n_images):
        k = int(rng.integers(0, 7))
        xy = rng.uniform(0, 100, (k, 2))
        wh = rng.uniform(5, 30, (k, 2))
        g = np.concatenate([xy, xy + wh], 1)
        # Detections: jittered copies of some boxes, some duplicates, some false alarms.
        d = [b + rng.normal(0, rng.uniform(0.5, 6), 4) for b in g if rng.random() < 0.8]
        d += [g[j] + rng.normal(0, 2, 4) for j in range(k) if rng.random() < 0.2]
        for _ in range(int(rng.integers(0, 4))):
            p = rng.uniform(0, 100, 2)
            d.append(np.concatenate([p, p + rng.uniform(5, 30, 2)]))
        d = np.array(d).reshape(-1, 4)
        d[:, 2:] = np.maximum(d[:, 2:], d[:, :2] + 1)
        gts.append(g)
        dets.append(d)
        scores.append(np.round(rng.uniform(0, 1, len(d)), 2))  # rounding makes ties, as real scores can have
    return gts, dets, scores


@pytest.mark.parametrize("seed", range(6))
def test_coco_ap_equals_pycocotools(seed):
    gts, dets, scores = _random_scenes(seed)
    ap, ap50 = _pycocotools_ap(gts, dets, scores)
    assert coco_ap(gts, dets, scores) == pytest.approx(ap, abs=1e-9)
    assert coco_ap(gts, dets, scores, 0.5) == pytest.approx(ap50, abs=1e-9)


def test_iou_matrix_by_hand():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]])
    assert np.allclose(iou_matrix(a, b), [[50 / 150, 0, 1]])


GT = [np.array([[0.0, 0.0, 10.0, 10.0]])]
HALF = [np.array([[0.0, 0.0, 10.0, 20.0]])]  # IoU with GT exactly 0.5


def test_iou_of_exactly_one_half_counts_for_coco_not_for_the_paper():
    assert iou_matrix(GT[0], HALF[0])[0, 0] == 0.5
    assert coco_ap(GT, HALF, [np.array([0.9])], 0.5) == 1.0  # COCO: IoU >= threshold
    assert paper_ap(GT, HALF, [np.array([0.9])], 0.5) == 0.0  # table 1: strictly above


def test_second_best_free_box():
    """Two objects A and B; the first detection takes A; the second overlaps A best (taken) and B enough.
    COCO falls back to B; the paper's rule does not, so its second detection is a false positive."""
    gt = [np.array([[0.0, 0.0, 10.0, 10.0], [4.0, 0.0, 14.0, 10.0]])]  # A, B
    det = [np.array([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0]])]
    iou = iou_matrix(det[0], gt[0])
    assert iou[1, 0] > iou[1, 1] > 0.5
    scores = [np.array([0.9, 0.8])]
    assert coco_ap(gt, det, scores, 0.5) == 1.0
    # Paper: ranks 1 (TP) and 2 (FP): precision 1 at recall 0.5, then 0.5; 11-point AP = 6/11.
    assert paper_ap(gt, det, scores, 0.5) == pytest.approx(6 / 11)


def test_ap_of_perfect_and_empty_detections():
    gts, _, _ = _random_scenes(0)
    assert coco_ap(gts, gts, [np.ones(len(g)) for g in gts]) == pytest.approx(1.0)
    assert paper_ap(gts, gts, [np.ones(len(g)) for g in gts]) == pytest.approx(1.0)
    empty = [np.zeros((0, 4)) for _ in gts]
    assert coco_ap(gts, empty, [np.zeros(0) for _ in gts]) == 0.0
    assert paper_ap(gts, empty, [np.zeros(0) for _ in gts]) == 0.0
    assert math.isnan(coco_ap(empty, gts, [np.ones(len(g)) for g in gts]))  # no objects at all: undefined


def test_count_scores_including_an_image_without_objects():
    s = count_scores([2, 4, 0, 1], [2, 3, 1, 1])
    assert s["count_error"] == pytest.approx((0 + 1 / 4 + 1 + 0) / 4)
    assert s["count_accuracy"] == 0.5


def _ari_by_pairs(a, b):
    """ARI from its definition: count item pairs grouped together in a, in b, and in both."""
    n = len(a)
    both = same_a = same_b = 0
    for i in range(n):
        for j in range(i + 1, n):
            sa, sb = a[i] == a[j], b[i] == b[j]
            same_a += sa
            same_b += sb
            both += sa and sb
    total = n * (n - 1) / 2
    expected = same_a * same_b / total
    best = (same_a + same_b) / 2
    return 1.0 if best == expected else (both - expected) / (best - expected)


@pytest.mark.parametrize("seed", range(5))
def test_ari_equals_the_pair_counting_definition(seed):
    from space.metrics import adjusted_rand_index

    rng = np.random.default_rng(seed)
    a = rng.integers(0, 4, 60)
    b = np.where(rng.random(60) < 0.7, a, rng.integers(0, 5, 60))
    assert adjusted_rand_index(a, b) == pytest.approx(_ari_by_pairs(a, b), abs=1e-12)


def test_ari_known_values():
    from space.metrics import adjusted_rand_index

    assert adjusted_rand_index([0, 0, 1, 1], [5, 5, 3, 3]) == 1.0  # the same partition, other names
    assert adjusted_rand_index([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(4 / 7)
    assert adjusted_rand_index([1, 1, 1], [2, 2, 2]) == 1.0


def test_matched_mask_iou_by_hand():
    from space.metrics import matched_mask_iou

    gt = np.zeros((4, 4), int)
    gt[:2, :2] = 1  # object 1: 4 pixels
    gt[2:, 2:] = 2  # object 2: 4 pixels
    gt[0, 3] = 255  # not counted
    pred = np.zeros((4, 4), int)
    pred[:2, :2] = 7  # exactly object 1
    pred[2:, 2] = 9  # half of object 2: IoU 2/4
    pred[0, 3] = 9  # on an ignored pixel: left out
    assert matched_mask_iou(gt, pred, ignore=255) == pytest.approx((1 + 0.5) / 2)
    assert matched_mask_iou(gt, np.zeros_like(pred), ignore=255) == 0.0
    assert math.isnan(matched_mask_iou(np.zeros_like(gt), pred))


# ----------------------------------------------------------------------------------- centre-distance match


def test_centre_match_by_hand():
    from space.metrics import centre_matches

    gt = np.array([[0, 0, 6, 8]])  # centre (3, 4), diagonal 10: hit radius 5
    assert centre_matches(gt, [[3, 9, 3, 9]])[0] == 0  # centre (3, 9): distance 5, on the circle, a hit
    assert centre_matches(gt, [[3, 9.01, 3, 9.01]])[0] == -1  # just outside
    assert centre_matches(gt, [[100, 100, 101, 101]])[0] == -1
    # Two detections on one box: the first in score order hits, the second finds it taken.
    assert centre_matches(gt, [[2, 3, 4, 5], [2, 3, 4, 5]]).tolist() == [0, -1]
    # A detection hitting two boxes takes the nearer one; the next detection takes the other.
    two = np.array([[0, 0, 10, 10], [4, 0, 14, 10]])  # centres (5, 5) and (9, 5)
    assert centre_matches(two, [[7, 4, 9, 6], [5, 4, 7, 6]]).tolist() == [1, 0]
    assert centre_matches(np.zeros((0, 4)), [[0, 0, 1, 1]]).tolist() == [-1]


def test_centre_scores_count_by_hand():
    from space.metrics import centre_scores

    gt = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]]), np.zeros((0, 4))]
    dets = [np.array([[4, 4, 6, 6], [50, 50, 52, 52], [19, 19, 29, 29]]), np.array([[0, 0, 2, 2]])]
    scores = [np.array([0.9, 0.8, 0.7]), np.array([0.6])]
    s = centre_scores(gt, dets, scores)  # 2 hits of 4 detections, 2 objects
    assert (s["precision"], s["recall"]) == (0.5, 1.0)
    assert s["f1"] == pytest.approx(2 * 0.5 * 1.0 / 1.5)


def test_subset_scores_leave_out_detections_of_other_objects():
    from space.metrics import centre_scores, subset_scores

    gt = [np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]])]
    dets = [np.array([[4, 4, 6, 6], [24, 24, 26, 26], [80, 80, 82, 82]])]
    scores = [np.array([0.9, 0.8, 0.7])]
    # Subset {box 0}: detection 2 hits box 1 (another category): left out. Detection 3 hits nothing: a miss.
    s = subset_scores(gt, [np.array([True, False, False])], dets, scores)
    assert (s["precision"], s["recall"], s["objects"], s["detections"]) == (0.5, 1.0, 1, 2)
    assert s["ap50"] == pytest.approx(coco_ap([gt[0][:1]], [dets[0][[0, 2]]], [scores[0][[0, 2]]], 0.5))
    # Every box: the same as centre_scores.
    everything = subset_scores(gt, [np.ones(3, bool)], dets, scores)
    plain = centre_scores(gt, dets, scores)
    assert all(everything[k] == plain[k] for k in ("precision", "recall", "f1"))
