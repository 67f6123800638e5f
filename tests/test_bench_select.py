"""bench/select_halves.py: per-frame count errors from evaluate's COCO files, and the held-out check of a
choice made on validation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import select_halves  # noqa: E402

BOX = [1.0, 1.0, 4.0, 4.0]


def _scored(folder: Path, objects: list[int], found: list[int]) -> None:
    """evaluate's two COCO files for frames with these object and detection counts."""
    folder.mkdir(parents=True)
    images = [{"id": 10 + i} for i in range(len(objects))]  # ids need not be positions
    gt = [{"id": k, "image_id": 10 + i, "bbox": BOX} for k, (i, n) in
          enumerate((i, n) for i, n in enumerate(objects) for _ in range(n))]
    dets = [{"image_id": 10 + i, "bbox": BOX, "score": 0.9} for i, n in enumerate(found) for _ in range(n)]
    (folder / "ground_truth.json").write_text(json.dumps({"images": images, "annotations": gt, "categories": []}))
    (folder / "detections.json").write_text(json.dumps(dets))


def _experiment(root: Path, frames: int) -> Path:
    """Seed 0: last counts every frame right, best one too many on each; seed 1: best and last the same
    step (scored once, under best)."""
    exp = root / "exp"
    objects = [2 + i % 3 for i in range(frames)]
    sel0 = exp / "eval/seeds/0/val"
    _scored(sel0 / "best", objects, [n + 1 for n in objects])
    _scored(sel0 / "last", objects, objects)
    sel1 = exp / "eval/seeds/1/val"
    _scored(sel1 / "best", objects, [n + (i % 2) for i, n in enumerate(objects)])
    for folder, chosen, same in ((sel0, "last", {}), (sel1, "best", {"last": "best"})):
        (folder / "selected.json").write_text(json.dumps({
            "checkpoint": chosen, "by": "count_error", "same_weights": same,
            "candidates": {"best": {"step": 5}, "last": {"step": 9 if not same else 5}}}))
    return exp


def test_frame_count_errors_are_the_mean_that_evaluate_reports(tmp_path):
    _scored(tmp_path / "s", [2, 4, 0, 1], [3, 4, 2, 0])
    errors = select_halves.scored_count_errors(tmp_path / "s")
    assert errors.tolist() == [0.5, 0.0, 2.0, 1.0]  # a frame without objects divides by 1


def test_a_candidate_better_on_every_frame_gains_on_every_held_out_half(tmp_path):
    exp = _experiment(tmp_path, frames=40)
    seeds = select_halves.collect(exp)
    assert seeds["1"]["frame_errors"]["last"] == seeds["1"]["frame_errors"]["best"]  # the twin's scores
    result = select_halves.analyse(seeds, halvings=50, seed=0)
    expected = sum(1 / (2 + i % 3) for i in range(40)) / 40  # seed 0's first candidate, one too many a frame
    assert result["per_seed"]["0"]["count_error"]["best"] == pytest.approx(expected)
    assert result["per_seed"]["0"]["minus_first"] == {"last": pytest.approx(-expected)}
    assert result["per_seed"]["1"]["minus_first"] == {"last": 0.0}
    assert result["worse_share"] == 0.0 and result["gain_p5"] > 0
    # held out, seed 0 gains its half's error of best and seed 1 nothing: about half the full gap on average
    assert result["gain_mean"] == pytest.approx(expected / 2, rel=0.1)
    assert select_halves.main(["--experiment", str(exp), "--halvings", "20", "--out", str(tmp_path / "r.json")]) == 0
    assert select_halves.main(["--from", str(tmp_path / "r.json"), "--markdown"]) == 0


def test_a_choice_by_ap50_is_refused_by_name(tmp_path):
    exp = _experiment(tmp_path, frames=4)
    f = exp / "eval/seeds/0/val/selected.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "by": "ap50"}))
    with pytest.raises(SystemExit, match="chose by ap50"):
        select_halves.collect(exp)
    with pytest.raises(SystemExit, match="no eval/seeds"):
        select_halves.collect(tmp_path / "nothing")
