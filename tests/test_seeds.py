"""An experiment over several seeds: per-seed files combined (python -m space seeds)."""

from __future__ import annotations

import csv
import json
import statistics

import pytest

from space.__main__ import main


def _write_json(path, doc):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return str(path)


def _write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(path)


def test_json_numbers_are_averaged_with_their_spread_and_each_seed_kept(tmp_path):
    docs = {"0": {"ap50": 0.2, "step": 800, "split": "test", "run": "a", "fg_ari": None},
            "1": {"ap50": 0.5, "step": 800, "split": "test", "run": "b", "fg_ari": None},
            "7": {"ap50": 0.8, "step": 800, "split": "test", "run": "c", "fg_ari": None}}
    files = [_write_json(tmp_path / f"x/eval/seeds/{s}/test/metrics.json", d) for s, d in docs.items()]
    out = tmp_path / "x/eval/test/metrics.json"
    assert main(["seeds", *files, "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    ap = [d["ap50"] for d in docs.values()]
    assert got["ap50"] == pytest.approx(statistics.mean(ap))
    assert got["spread"]["ap50"] == pytest.approx({"std": statistics.stdev(ap), "min": 0.2, "max": 0.8})
    assert got["step"] == 800 and got["split"] == "test" and got["fg_ari"] is None
    assert "run" not in got  # differs between seeds and is not a number: only per seed
    assert got["seeds"] == ["0", "1", "7"] and got["per_seed"] == docs


def test_background_failures_are_listed_by_seed(tmp_path):
    ok = {"split": True, "step": 15000, "largest_share": 0.5}
    bad = {"split": False, "step": 15000, "largest_share": 0.97, "advice": "another seed"}
    files = [_write_json(tmp_path / f"seeds/{s}/train.json", {"loss": 1.0, "background_split": b})
             for s, b in (("0", ok), ("1", bad))]
    out = tmp_path / "train.json"
    main(["seeds", *files, "--out", str(out)])
    assert json.loads(out.read_text())["background_not_split"] == ["1"]


def test_csv_mean_at_the_steps_every_seed_logged(tmp_path):
    a = [{"step": 25, "loss": 1.0, "mse": 0.5}, {"step": 50, "loss": 3.0, "mse": 0.25}]
    b = [{"step": 25, "loss": 2.0, "mse": 0.25}]  # stopped earlier
    files = [_write_csv(tmp_path / "seeds/0/metrics.csv", a), _write_csv(tmp_path / "seeds/1/metrics.csv", b)]
    out = tmp_path / "metrics.csv"
    main(["seeds", *files, "--out", str(out)])
    with open(out) as fh:
        rows = list(csv.DictReader(fh))
    assert [(int(r["step"]), float(r["loss"]), float(r["mse"])) for r in rows] == [(25, 1.5, 0.375)]


@pytest.mark.parametrize("case, named", [
    ("missing", "no such file"),
    ("mixed", "of one kind"),
    ("twice", "two files for one seed"),
])
def test_bad_input_is_named(tmp_path, capsys, case, named):
    f0 = _write_json(tmp_path / "seeds/0/train.json", {"loss": 1.0})
    other = {"missing": str(tmp_path / "seeds/1/train.json"),
             "mixed": _write_csv(tmp_path / "seeds/1/val.csv", [{"step": 1, "val_mse": 0.1}]),
             "twice": _write_json(tmp_path / "again/seeds/0/train.json", {"loss": 2.0})}[case]
    out = tmp_path / "out.json"
    assert main(["seeds", f0, other, "--out", str(out)]) == 2
    assert named in capsys.readouterr().err
    assert not out.exists()


def test_runs_that_never_validated_give_an_empty_curve_with_allow_missing(tmp_path):
    """A run with train.val_every 0 writes no val.csv: the experiment's val.csv is then an empty table,
    and a seed that did validate is combined alone."""
    out = tmp_path / "val.csv"
    absent = [str(tmp_path / f"seeds/{s}/val.csv") for s in (0, 1)]
    assert main(["seeds", *absent, "--out", str(out), "--allow-missing"]) == 0
    assert out.read_text().strip() == "step"
    one = _write_csv(tmp_path / "seeds/1/val.csv", [{"step": 5, "val_mse": 0.5}])
    main(["seeds", absent[0], one, "--out", str(out), "--allow-missing"])
    with open(out) as fh:
        assert [dict(r) for r in csv.DictReader(fh)] == [{"step": "5", "val_mse": "0.5"}]


def test_the_summary_table_gives_an_experiment_its_mean_seed_count_and_spread(tmp_path, capsys):
    docs = {"0": {"split": "test", "ap50": 0.25}, "1": {"split": "test", "ap50": 0.75}}
    files = [_write_json(tmp_path / f"runs/x/eval/seeds/{s}/test/metrics.json", d) for s, d in docs.items()]
    combined = tmp_path / "runs/x/eval/test/metrics.json"
    main(["seeds", *files, "--out", str(combined)])
    out = tmp_path / "summary.json"
    assert main(["summary", str(combined), "--out-json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert (row["run"], row["seeds"], row["ap50"]) == ("x", 2, 0.5)
    assert row["ap50_std"] == pytest.approx(statistics.stdev([0.25, 0.75]))
