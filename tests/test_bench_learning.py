"""bench/learning.py's command line: variants with schedules, and results of several processes together."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import learning  # noqa: E402


def test_a_variant_keeps_a_schedule_with_commas_as_one_value():
    name, sets = learning.parse_variant(
        "code:model.mixture=channel,model.tau={start: 2.5, end: 0.5, start_step: 0, end_step: 800},model.z_pres_logit_bound=8.8")
    assert name == "code"
    assert sets == ["model.mixture=channel", "model.tau={start: 2.5, end: 0.5, start_step: 0, end_step: 800}",
                    "model.z_pres_logit_bound=8.8"]
    assert learning.parse_variant("text:") == ("text", [])
    with pytest.raises(SystemExit, match="NAME:SECTION"):
        learning.parse_variant("no-colon")


def _point(variant, seed, step, ap):
    return {"variant": variant, "sets": [], "seed": seed, "step": step, "train_s": 1.0, "ap50": ap, "fg_ari": 0.1,
            "count_error": 0.5, "mse": 0.01, "baseline_fg_ari": 0.5}


def test_results_of_separate_processes_are_tabulated_together(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    base = {"data": "x.zarr", "preset": "demo", "split": "val"}
    a.write_text(json.dumps({**base, "points": [_point("text", s, 800, 0.1 * (s + 1)) for s in (0, 1)]}))
    b.write_text(json.dumps({**base, "points": [_point("channel", 0, 800, 0.4)]}))
    assert learning.main(["--out", str(a), "--with", str(b)]) == 0
    out = capsys.readouterr().out
    assert "| text | 800 | 2 | 0.150 (0.100-0.200)" in out
    assert "| channel | 800 | 1 | 0.400" in out
    with pytest.raises(SystemExit):
        learning.main(["--out", str(a), "--with", str(tmp_path / "missing.json")])
    assert "no such results file" in capsys.readouterr().err
