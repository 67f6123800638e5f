"""space/probe.py: the z_what probe reads back categories that the codes carry, and not ones they do not."""

import numpy as np

from space.probe import few_shot_accuracy, iou_matrix, linear_probe_accuracy, matched_codes, probe


def test_separable_codes_are_read_back_and_noise_is_at_chance():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    centres = rng.normal(size=(3, 8)) * 4
    x = centres[y] + rng.normal(size=(120, 8))
    assert linear_probe_accuracy(x, y) > 0.95
    assert few_shot_accuracy(x, y, 1) > 0.9 and few_shot_accuracy(x, y, 5) > 0.95
    noise = rng.normal(size=(120, 8))
    assert linear_probe_accuracy(noise, y) < 0.6  # chance is 1/3
    assert few_shot_accuracy(noise, y, 5) < 0.6
    scores = probe(x, y, ["sphere", "cube", "cylinder"])
    assert scores["objects"] == 120 and scores["per_category"] == {"sphere": 40, "cube": 40, "cylinder": 40}
    assert abs(scores["chance"] - 1 / 3) < 1e-9 and scores["linear_accuracy"] > 0.95
    assert probe(x[:3], y[:3], ["a", "b", "c"])["linear_accuracy"] is None  # too few objects to score


def test_each_object_takes_the_present_cell_that_covers_it_best_once():
    boxes = [np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], float)]
    labels = [np.array([2, 1, 0])]
    cells = [np.array([[1, 1, 11, 11], [0, 0, 10, 10], [21, 21, 31, 31], [40, 40, 50, 50]], float)]
    prob = [np.array([0.9, 0.9, 0.9, 0.2])]  # the last cell is off: the third object is not found
    z = [np.arange(4, dtype=float)[:, None] * np.ones((4, 2))]
    x, y = matched_codes(boxes, labels, cells, prob, z)
    assert y.tolist() == [2, 1] and x[:, 0].tolist() == [1.0, 2.0]  # object 0 takes cell 1 (IoU 1), not 0
    assert np.allclose(iou_matrix(boxes[0][:1], cells[0][:1]), 81 / 119)
