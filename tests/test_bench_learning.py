"""The benchmarks' command lines: learning.py's variants with schedules and results of several processes
together, recall_by_colour.py, step_parts.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
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


def test_recall_by_colour_finds_every_object_from_the_true_boxes_and_none_from_nothing(tmp_path, capsys):
    """bench/recall_by_colour.py on a small 3D-Room store: the ground-truth boxes as detections hit every
    object (recall 1 for every colour and size) and detections below the threshold hit none; a palette
    colour is named after itself however it is shaded."""
    import subprocess

    import recall_by_colour
    from datagen.coco import to_coco
    from datagen.store import Store

    store = tmp_path / "s.zarr"
    r = subprocess.run([sys.executable, "-m", "datagen", "room3d", str(store), "--objects", "2", "4",
                        "--image-size", "64", "--split", "val=6", "--seed", "3", "--quiet"],
                       capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    truth = to_coco(Store(str(store)), "val")
    hits = [{"image_id": a["image_id"], "bbox": a["bbox"], "score": 0.9} for a in truth["annotations"]]
    weak = [dict(d, score=0.2) for d in hits]
    for name, dets in (("hits", hits), ("weak", weak)):
        (tmp_path / f"{name}.json").write_text(json.dumps(dets))
    out = tmp_path / "recall.json"
    assert recall_by_colour.main(["--data", str(store), "--detections", str(tmp_path / "hits.json"),
                                  str(tmp_path / "weak.json"), "--labels", "hits", "weak", "--out", str(out),
                                  "--grid", "2"]) == 0
    rows = json.loads(out.read_text())["rows"]
    # objects whose box centre shares a 2x2 cell (32-pixel quarters) with another's, from the COCO boxes
    cells: dict = {}
    for a in truth["annotations"]:
        x, y, w, h = a["bbox"]
        cells.setdefault((a["image_id"], int((y + h / 2) // 32), int((x + w / 2) // 32)), []).append(a)
    shared = sum(len(v) for v in cells.values() if len(v) > 1)
    assert shared > 0 and rows["hits"]["shared 2x2 cell"]["objects"] == shared
    assert rows["hits"]["own 2x2 cell"]["objects"] == len(truth["annotations"]) - shared
    objects = sum(v["objects"] for k, v in rows["hits"].items() if k not in ("large", "small") and "cell" not in k)
    assert objects == len(truth["annotations"]) > 0
    assert all(v["recall"] == 1.0 for v in rows["hits"].values())
    assert all(v["recall"] == 0.0 for v in rows["weak"].values())
    # a palette colour keeps its name under shading (darker or lighter by a factor)
    for name, i in recall_by_colour.PALETTE.items():
        for shade in (0.4, 1.0):
            assert recall_by_colour.colour_name(255 * shade * np.asarray(recall_by_colour.OBJECT_COLORS[i])) == name
    capsys.readouterr()
    assert recall_by_colour.main(["--from", str(out), "--markdown"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| detections |") and "| hits | 1.00" in table and "{" not in table


def test_step_parts_times_every_part_of_a_step_and_the_rest(tmp_path, capsys):
    """bench/step_parts.py on the demo model at batch 2: every part of the model is found and timed, each
    once per call a step makes, and the table ends with the whole step; --from prints it again."""
    import step_parts
    import torch

    threads = torch.get_num_threads()
    out_file = tmp_path / "parts.json"
    try:
        assert step_parts.main(["--preset", "demo", "--batch", "2", "--repeats", "1", "--threads", "1",
                                "--out", str(out_file)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    labels = [label for label, _ in step_parts.MODULES + step_parts.FUNCTIONS]
    assert sorted(result["parts_s"]) == sorted(labels)
    assert all(s > 0 for s in result["parts_s"].values()) and result["step_s"] > 0
    assert result["rest_s"] == pytest.approx(result["step_s"] - sum(result["parts_s"].values()), abs=1e-3)
    assert out[0].startswith("| part |") and "**the training step**" in out[-2]
    assert step_parts.main(["--from", str(out_file), "--markdown"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == out[:-1]


def test_recall_by_colour_with_a_checkpoint_shows_what_it_paints_and_probes_z_what(tmp_path, capsys):
    """--checkpoint: per colour of the store's objects, what the model paints and decodes from the colour's
    mean z_what, and held-out probes of the colours from z_what; --from prints the same tables again."""
    import subprocess

    import recall_by_colour
    import torch

    from space.config import resolve_config
    from space.train import train

    store = tmp_path / "s.zarr"
    r = subprocess.run([sys.executable, "-m", "datagen", "room3d", str(store), "--objects", "3", "5",
                        "--image-size", "64", "--split", "train=4", "--split", "val=10", "--seed", "5", "--quiet"],
                       capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    threads = torch.get_num_threads()
    cfg = resolve_config("demo", None, ["train.batch_size=2", "train.steps=1", "train.val_every=0", "train.device=cpu",
                                        f"train.threads={threads}"])
    train(cfg, str(store), str(tmp_path / "run"), progress=False)
    torch.set_num_threads(threads)
    (tmp_path / "none.json").write_text("[]")
    out = tmp_path / "r.json"
    assert recall_by_colour.main(["--data", str(store), "--detections", str(tmp_path / "none.json"), "--checkpoint",
                                  str(tmp_path / "run/checkpoints/last.pt"), "--frames", "10", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[:-1]
    results = json.loads(out.read_text())
    colours = {k for k in results["rows"][str(tmp_path / "none.json")] if k not in ("large", "small")}
    assert set(results["decoded"]) == colours
    for d in results["decoded"].values():
        assert len(d["mean_code_rgb"]) == len(d["decoded_rgb"]) == len(d["true_rgb"]) == 3
    assert set(results["probe"]) == {"colour", *colours}
    assert all(0 <= p["accuracy"] <= 1 and 0 < p["floor"] <= 1 for p in results["probe"].values())
    assert "| every colour |" in "\n".join(printed)
    assert recall_by_colour.main(["--from", str(out), "--markdown"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == printed


def test_z_pres_forces_match_the_bernoulli_kl_derivative():
    """The kl_pres column against its closed form: d KL(Bern(p) || Bern(q)) / d logit = p (1 - p) (logit -
    logit(q)), the mean over cells; and the term that gradient descent follows sets the sign (positive: off)."""
    import torch

    import z_pres_forces
    from space.config import Config
    from space.model import SPACE

    cfg = Config.from_dict({"model": {"image_size": 32, "grid_size": 4, "n_components": 2,
                                      "z_pres_prior": {"start": 0.1, "end": 0.1, "start_step": 0, "end_step": 0}}})
    torch.manual_seed(0)
    net = SPACE(cfg.model).train()
    with torch.no_grad():
        net.fg.z_pres_net.bias.fill_(1.5)  # cells likelier on than the prior: its KL pushes them off
    x = torch.rand(3, 3, 32, 32)
    row = z_pres_forces.forces(net, x, 0, cfg)
    logit = net.fg.z_pres_net(net.fg.encoder(x))
    p = torch.sigmoid(logit)
    expected = float((p * (1 - p) * (logit - np.log(0.1 / 0.9))).mean()) * 1000
    assert row["kl_pres"] == pytest.approx(expected, rel=1e-3) and row["kl_pres"] > 0
    assert row["p_mean"] == pytest.approx(float(p.mean()), abs=1e-4)
    assert set(z_pres_forces.TERMS) <= set(row)
    # Charged for every cell (the paper's code), z_where's and z_depth's KLs do not depend on z_pres.
    cfg.model.kl_weighting = "every_cell"
    row = z_pres_forces.forces(SPACE(cfg.model).train(), x, 0, cfg)
    assert row["kl_where"] == 0.0 and row["kl_depth"] == 0.0 and row["-log_lik"] != 0.0


def test_count_errors_classes_each_detection_and_splits_table_1s_count_error():
    """bench/count_errors.py on hand-made frames (64 pixels): an exact box is found, a box inside an
    object already found is a duplicate, one half over an object a poor box, boxes over nothing are
    background (one touching the border), an object nobody boxes a miss; the count error is table 1's
    (space.metrics.count_scores) and its two parts add up to it."""
    import count_errors
    from space.metrics import count_scores

    objects = [[[10, 10, 20, 20], [30, 30, 40, 40]], [[10, 10, 30, 30]], [[5, 5, 15, 15], [40, 40, 50, 50]]]
    detections = [[(0.9, [10, 10, 20, 20]), (0.8, [11, 11, 19, 19]), (0.7, [0, 0, 5, 5]), (0.6, [50, 50, 55, 55])],
                  [(0.9, [20, 20, 40, 40])],
                  [(0.9, [40, 40, 50, 50])]]
    r = count_errors.classify(objects, detections, side=64)
    assert (r["found"], r["duplicate"], r["poor box"], r["background"], r["at the border"], r["missed"]) == \
        (2, 1, 1, 2, 1, 3)
    assert r["objects"] == 5 and r["detections"] == 6
    want = count_scores([len(o) for o in objects], [len(d) for d in detections])["count_error"]
    assert r["count_error"] == pytest.approx(want)
    assert r["from_too_many"] == pytest.approx(1.0 / 3) and r["from_too_few"] == pytest.approx(0.5 / 3)
    assert r["from_too_many"] + r["from_too_few"] == pytest.approx(want)


def test_count_errors_places_each_duplicate_beside_the_detection_that_found_its_object():
    """A tall object found by one box and boxed again 3 pixels lower, and a square one boxed twice about
    the same centre: offsets (0, 3) and (0, 0) from the finders, so medians 0 and 1.5, one of the two more
    up-down than sideways; the duplicated objects' sizes against all three objects'."""
    import count_errors

    objects = [[[10, 10, 20, 30], [40, 40, 50, 50]], [[10, 10, 20, 20]]]
    detections = [[(0.9, [10, 10, 20, 30]), (0.8, [11, 13, 19, 33]), (0.7, [40, 40, 50, 50])],
                  [(0.9, [10, 10, 20, 20]), (0.8, [11, 11, 19, 19])]]
    r = count_errors.classify(objects, detections, side=64)
    assert (r["found"], r["duplicate"]) == (3, 2)
    d = r["duplicates"]
    assert (d["offset_dx"], d["offset_dy"], d["vertical_share"]) == (0.0, 1.5, 0.5)
    assert (d["object_w"], d["object_h"], d["all_objects_w"], d["all_objects_h"]) == (10.0, 15.0, 10.0, 10.0)
    assert "| a | 2 | 0.0 | 1.5 | 0.50 | 10.0 x 15.0 | 10.0 x 10.0 |" in count_errors.duplicates_table({"rows": {"a": r}})


def test_experiment_scores_reads_each_seed_and_its_means_agree_with_the_pipelines_combined_file(tmp_path):
    """bench/experiment_scores.py over a pipeline experiment's folder (two seeds, hand-written files): each
    seed's test scores and validation curve are read back, the table's mean row is what `python -m space
    seeds` (space.seeds.combine_json, the pipeline's eval/test/metrics.json) gives, and a step only one seed
    validated has no mean; a folder without seeds is a clear error."""
    import experiment_scores
    from space.seeds import combine_json

    exp = tmp_path / "results" / "runs" / "x"
    tests = {"0": {"step": 2250, "ap50": 0.61, "ap50_paper": 0.63, "count_error": 0.21, "fg_ari": 0.66},
             "1": {"step": 2500, "ap50": 0.70, "ap50_paper": 0.72, "count_error": 0.25, "fg_ari": 0.60}}
    for seed, test in tests.items():
        run = exp / "seeds" / seed
        run.mkdir(parents=True)
        (run / "train.json").write_text(json.dumps({"step": 2500, "wall_s": 900.0 + int(seed)}))
        rows = "step,wall_s,val_mse,val_ap50,val_count_error\n250,100,0.01,0.1,0.5\n500,200,0.009,0.3,0.4\n"
        (run / "val.csv").write_text(rows + ("750,300,0.008,0.5,0.3\n" if seed == "1" else ""))
        (exp / "eval" / "seeds" / seed / "test").mkdir(parents=True)
        (exp / "eval" / "seeds" / seed / "test" / "metrics.json").write_text(json.dumps(test))
    out = tmp_path / "scores.json"
    assert experiment_scores.main(["--experiment", str(exp), "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["seeds"]["1"]["test"] == tests["1"] and len(results["seeds"]["0"]["val"]) == 2
    text = experiment_scores.tables(results)
    combined = combine_json(tests)
    mean_row = next(line for line in text.splitlines() if line.startswith("| mean |"))
    cols = [c.strip() for c in text.splitlines()[0].split("|")[2:-2]]
    cells = [c.strip() for c in mean_row.split("|")[2:-2]]
    for col, cell in zip(cols, cells):
        if col != "step":
            assert float(cell) == pytest.approx(combined[col], abs=5e-4), col
    assert "| 500 | 0.300 (0.40) | 0.300 (0.40) | 0.300 |" in text
    assert "| 750 |  | 0.500 (0.30) |  |" in text
    assert experiment_scores.tables(results, curve=False) == text.split("\n\n")[0]  # the test scores alone
    with pytest.raises(SystemExit, match="no seeds"):
        experiment_scores.main(["--experiment", str(tmp_path)])
    # another checkpoint's scores, evaluated beside the pipeline's: read from their own folder
    other = {"step": 1500, "ap50": 0.5, "count_error": 0.1}
    for seed in tests:
        (exp / "eval" / "seeds" / seed / "test_best_count").mkdir()
        (exp / "eval" / "seeds" / seed / "test_best_count" / "metrics.json").write_text(json.dumps(other))
    assert experiment_scores.collect(exp, "test_best_count")["0"]["test"] == other
    with pytest.raises(SystemExit, match="nope/metrics.json is missing"):
        experiment_scores.collect(exp, "nope")


def test_count_errors_names_what_is_missing_or_mismatched(tmp_path, capsys):
    """bench/count_errors.py without a store, or with fewer labels than detections files, stops with an
    error that says which, before reading anything."""
    import count_errors

    with pytest.raises(SystemExit):
        count_errors.main(["--detections", "a.json"])
    assert "give --data and --detections" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        count_errors.main(["--data", str(tmp_path), "--detections", "a.json", "b.json", "--labels", "a"])
    assert "1 labels for 2 detections files" in capsys.readouterr().err


def test_refine_sweep_reads_scored_settings_back_and_averages_over_every_seed(tmp_path, monkeypatch):
    """bench/refine_sweep.py over a hand-made experiment folder whose evaluations are already there: it runs
    nothing (each folder's metrics.json is read back, so a stopped sweep resumes), and its table gives each
    setting's mean over the seeds, each seed's count error, and the summed detections."""
    import subprocess

    import refine_sweep

    exp = tmp_path / "x"
    scores = {(0, 30.0, 0.5, 0): (0.7, 0.12), (1, 30.0, 0.5, 0): (0.8, 0.14), (0, 60.0, 0.05, 0): (0.72, 0.10),
              (1, 60.0, 0.05, 0): (0.78, 0.20), (0, 60.0, 0.05, 40): (0.8, 0.08), (1, 60.0, 0.05, 40): (0.84, 0.10)}
    for (seed, cost, p, n), (ap, ce) in scores.items():
        (exp / "seeds" / str(seed) / "checkpoints").mkdir(parents=True, exist_ok=True)
        out = exp / "eval" / "seeds" / str(seed) / refine_sweep.folder_name("val", cost, p, "best", n, 0.3)
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps({"ap50": ap, "count_error": ce, "count_accuracy": 0.5,
                                                      "detections": 100 + seed, "refine_flips": 7, "seconds": 1.0}))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("nothing should be rerun"))
    off = refine_sweep.sweep(exp, "store.zarr", "val", [30.0], [0.5], "best")
    on = refine_sweep.sweep(exp, "store.zarr", "val", [60.0], [0.05], "best", [0, 40], [0.3])
    lines = refine_sweep.table({"rows": off["rows"] + on["rows"]}).splitlines()
    assert refine_sweep.folder_name("val", 60.0, 0.05, "best", 40, 0.3) == "val_refined_c60_p0.05_b40_lr0.3"
    assert refine_sweep.folder_name("val", 60.0, 0.05, "best", 40, 0.3, 2) == "val_refined_c60_p0.05_b40x2_lr0.3"
    # another checkpoint's sweep has folders of its own, never the best's
    assert refine_sweep.folder_name("val", 30.0, 0.5, "last") == "val_refined_c30_p0.5_last"
    assert refine_sweep.folder_name("val", 30.0, 0.5, "runs/x/checkpoints/step.pt") == "val_refined_c30_p0.5_step"
    assert lines[2] == "| 0.5 | 30 | 0 | 0.750 | 0.130 | 0.120, 0.140 | 0.500 | 201 | 14 |"
    assert lines[3] == "| 0.05 | 60 | 0 | 0.750 | 0.150 | 0.100, 0.200 | 0.500 | 201 | 14 |"
    assert lines[4] == "| 0.05 | 60 | 40 (0.3) x 1 | 0.820 | 0.090 | 0.080, 0.100 | 0.500 | 201 | 14 |"
    (tmp_path / "empty" / "seeds").mkdir(parents=True)
    for folder in (tmp_path / "empty", tmp_path / "nowhere"):
        with pytest.raises(SystemExit, match="no trained seed"):
            refine_sweep.sweep(folder, "store.zarr", "val", [0.0], [0.5], "best")


def test_learning_trains_and_scores_with_another_checkout_and_reports_time_to_target(tmp_path, capsys):
    """--repo: the checkout named runs `python -m space` (a stub here that records its command lines), with
    this checkout's store and run paths made absolute; a checkout whose evaluate has no --checkpoint (before
    best.pt existed) is not given one. --target then lists each seed's first scored step at the AP50 asked
    and the training time to it, or that it was not reached."""
    repo = tmp_path / "old"
    (repo / "space").mkdir(parents=True)
    (repo / "space" / "__init__.py").write_text("")
    (repo / "space" / "__main__.py").write_text(
        "import json, sys\n"
        "from pathlib import Path\n"
        "args = sys.argv[1:]\n"
        "with open(Path(__file__).parent / 'calls.txt', 'a') as fh:\n"
        "    fh.write(' '.join(args) + '\\n')\n"
        "if '--help' in args:\n"
        "    print('usage: python -m space evaluate --run RUN --data DATA --out OUT')\n"
        "elif args[0] == 'evaluate':\n"
        "    out = Path(args[args.index('--out') + 1])\n"
        "    step = int(out.name.split('-')[1])\n"
        "    out.mkdir(parents=True)\n"
        "    (out / 'metrics.json').write_text(json.dumps({'ap50': step / 1000, 'fg_ari': 0.1, 'count_error': 0.5,\n"
        "                                                  'mse': 0.01, 'baseline_fg_ari': 0.3}))\n")
    out = tmp_path / "res.json"
    assert learning.main(["--repo", str(repo), "--data", "store.zarr", "--out", str(out), "--variant", "old:",
                          "--seeds", "0", "--steps", "400", "600", "--threads", "1"]) == 0
    calls = (repo / "space" / "calls.txt").read_text().splitlines()
    trains = [c for c in calls if c.startswith("train")]
    evaluates = [c for c in calls if c.startswith("evaluate") and "--help" not in c]
    assert len(trains) == len(evaluates) == 2
    store = str(Path("store.zarr").resolve())
    assert all(f"--data {store} " in c for c in trains + evaluates)
    assert all("--checkpoint" not in c for c in evaluates)
    results = json.loads(out.read_text())
    assert results["repo"]["path"] == str(repo.resolve())
    assert [p["ap50"] for p in results["points"]] == [0.4, 0.6]
    capsys.readouterr()
    assert learning.main(["--out", str(out), "--target", "0.5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("| old | 0 | 600 | 0.600 |")
    assert learning.main(["--out", str(out), "--target", "0.9"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("| old | 0 | not by 600 | 0.600 | > ")
    assert lines[3].startswith("| old | mean | | | > ")
    # a point scored without AP (None) is never a hit, and prints as "-"
    results["points"].append(dict(results["points"][-1], step=800, ap50=None))
    out.write_text(json.dumps(results))
    assert learning.main(["--out", str(out), "--target", "0.5"]) == 0
    assert capsys.readouterr().out.splitlines()[2].startswith("| old | 0 | 600 | 0.600 |")
    assert learning.main(["--out", str(out), "--target", "0.9"]) == 0
    assert capsys.readouterr().out.splitlines()[2].startswith("| old | 0 | not by 800 | - | > ")
    # the file holds the other checkout's runs: resuming it with this checkout's code is refused
    with pytest.raises(SystemExit, match="holds runs of"):
        learning.main(["--data", "store.zarr", "--out", str(out), "--variant", "old:", "--seeds", "0",
                       "--steps", "1000", "--threads", "1"])
