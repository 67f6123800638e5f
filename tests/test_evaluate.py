"""`python -m space evaluate`: what it writes, and that pycocotools recomputes its COCO numbers from it."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np
import pytest
import torch

from space.__main__ import main as space_main
from space.config import resolve_config
from space.train import train

from conftest import TORCH_THREADS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    store = root / "s.zarr"
    r = subprocess.run([sys.executable, "-m", "datagen", "room3d", str(store), "--objects", "2", "4", "--image-size",
                        "64", "--split", "train=16", "--split", "test=12", "--seed", "4", "--quiet"],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr
    cfg = resolve_config("demo", None, ["model.grid_size=4", "model.n_components=2", "train.batch_size=2",
                                        "train.steps=2", "train.val_every=0", f"train.threads={TORCH_THREADS}",
                                        "train.device=cpu"])
    run = root / "run"
    train(cfg, str(store), str(run), progress=False)
    return store, run


def test_evaluate_writes_scores_and_coco_files_that_pycocotools_agrees_with(trained, tmp_path, capsys):
    store, run = trained
    out = tmp_path / "eval"
    # Threshold 0: every cell is a detection, so an untrained model still has detections to score.
    rc = space_main(["evaluate", "--run", str(run), "--data", str(store), "--out", str(out), "--threshold", "0",
                     "--quiet", "--device", "cpu"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("ap50", "ap50_95", "ap50_paper", "ap50_95_paper", "count_error", "count_accuracy", "mse",
                "fg_ari", "mask_miou", "baseline_ap50", "baseline_count_error", "baseline_fg_ari"):
        assert isinstance(metrics[key], float), key
    assert metrics["frames"] == 12 and metrics["detections"] == 12 * 16  # 4x4 cells, all above 0
    probe = metrics["z_what_probe"]  # found objects' shapes read back from their z_what
    assert probe["objects"] <= metrics["objects"] and sum(probe["per_category"].values()) == probe["objects"]
    assert set(probe["per_category"]) <= {"sphere", "cube", "cylinder"}
    assert json.loads(capsys.readouterr().out) == metrics

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(out / "ground_truth.json"))
        ev = COCOeval(gt, gt.loadRes(str(out / "detections.json")), "bbox")
        ev.params.maxDets = [1, 10, 100]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert metrics["ap50_95"] == pytest.approx(ev.stats[0], abs=1e-9)
    assert metrics["ap50"] == pytest.approx(ev.stats[1], abs=1e-9)
    assert metrics["objects"] == len(gt.getAnnIds())


def test_evaluate_default_folder_is_in_the_run(trained, capsys):
    store, run = trained
    assert space_main(["evaluate", "--run", str(run), "--data", str(store), "--quiet", "--device", "cpu"]) == 0
    metrics = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    assert metrics["threshold"] == 0.5 and metrics["split"] == "test"
    # The store the model learnt from, and the one it was scored on: here the same, by how it was made
    # (its identity attribute) and by its bytes (every file of it, hashed here independently).
    import hashlib

    import zarr

    identity = dict(zarr.open_group(str(store), mode="r").attrs)["identity"]
    content = hashlib.blake2b(digest_size=16)
    for f in sorted(p for p in store.rglob("*") if p.is_file()):
        content.update(f.relative_to(store).as_posix().encode() + b"\0")
        content.update(f.read_bytes())
    text = json.dumps({"identity": identity, "content": content.hexdigest()}, sort_keys=True)
    assert metrics["trained_on"] == metrics["scored_on"] == hashlib.sha256(text.encode()).hexdigest()[:16]


def test_evaluate_refine_scores_the_cells_the_search_settles_on(trained, tmp_path, capsys):
    store, run = trained
    out = tmp_path / "refined"
    assert space_main(["evaluate", "--run", str(run), "--data", str(store), "--out", str(out), "--refine",
                       "--quiet", "--device", "cpu"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["refined"] is True and isinstance(metrics["refine_flips"], int) and metrics["refine_cost"] == 0
    assert metrics["refine_box_steps"] == 0
    # The same search run here on the same frames: its cells are the detections, scored by the amortised
    # probability, so each detection's score is one of its cells' probabilities.
    from space.checkpoints import load_model
    from space.data import StoreDataset
    from space.refine import refine_presence

    model, cfg, state = load_model(run / "checkpoints" / "last.pt", "cpu")
    data = StoreDataset(str(store), "test", image_size=cfg.model.image_size)
    with torch.no_grad():
        present, prob, flips = refine_presence(model, data.__getitems__(np.arange(len(data))), int(state["step"]))
    assert metrics["detections"] == int(present.sum()) and metrics["refine_flips"] == int(flips.sum())
    dets = json.loads((out / "detections.json").read_text())
    assert sorted(round(d["score"], 5) for d in dets) == sorted(round(float(p), 5) for p in prob[present])


def test_show_refine_draws_the_refined_decisions(trained, tmp_path):
    store, run = trained
    from PIL import Image

    from space.checkpoints import load_model
    from space.data import StoreDataset
    from space.refine import objective_with, refine_presence
    from space.viz import decomposition_grid

    png = tmp_path / "refined.png"
    assert space_main(["show", "--run", str(run), "--data", str(store), "--split", "test", "--count", "4",
                       "--refine", "--out", str(png)]) == 0
    model, cfg, state = load_model(run / "checkpoints" / "last.pt", "cpu")
    x = StoreDataset(str(store), "test", image_size=cfg.model.image_size).__getitems__(np.arange(4))
    step = int(state["step"])
    with torch.no_grad():
        present, _, _ = refine_presence(model, x, step)
        out = objective_with(model, x, step, present.float())
    assert torch.equal(out["fg"]["z_pres_prob"] > 0.5, present)  # the boxes drawn are the refined cells
    assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), decomposition_grid(x, out, rows=4))
    # The search's settings reach it as evaluate's do.
    assert space_main(["show", "--run", str(run), "--data", str(store), "--split", "test", "--count", "4",
                       "--refine", "--refine-candidates", "0.05", "--refine-cost", "20", "--out", str(png)]) == 0
    with torch.no_grad():
        present, _, _ = refine_presence(model, x, step, candidates=0.05, cell_cost=20.0)
        out = objective_with(model, x, step, present.float())
    assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), decomposition_grid(x, out, rows=4))
    # and its box steps: the boxes drawn are the moved ones
    assert space_main(["show", "--run", str(run), "--data", str(store), "--split", "test", "--count", "4",
                       "--refine", "--refine-box-steps", "3", "--out", str(png)]) == 0
    from space.refine import refined_output

    out = refined_output(model, x, step, box_steps=3)[0]
    assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), decomposition_grid(x, out, rows=4))
    assert space_main(["show", "--run", str(run), "--data", str(store), "--refine-cost", "20",
                       "--out", str(tmp_path / "no.png")]) == 2
    assert not (tmp_path / "no.png").exists()


@pytest.mark.parametrize("argv,words", [
    (["--split", "val"], ["val"]),
    (["--threshold", "1.5"], ["--threshold"]),
    (["--frames", "0"], ["--frames"]),
    (["--batch-size", "0"], ["--batch-size", "at least 1"]),
    (["--refine", "--refine-candidates", "1.5"], ["--refine-candidates"]),
    (["--refine", "--refine-cost", "-1"], ["--refine-cost", "0 or more"]),
    (["--refine-cost", "5"], ["--refine-cost", "add --refine"]),
    (["--refine-candidates", "0.1"], ["--refine-candidates", "add --refine"]),
    (["--refine-box-steps", "5"], ["--refine-box-steps", "add --refine"]),
    (["--refine", "--refine-box-steps", "-1"], ["--refine-box-steps", "0 or more"]),
    (["--refine", "--refine-box-steps", "5", "--refine-box-lr", "0"], ["--refine-box-lr", "above 0"]),
    (["--refine", "--refine-box-steps", "5", "--refine-box-rounds", "0"], ["--refine-box-rounds", "1 or more"]),
    (["--refine", "--refine-box-rounds", "2"], ["--refine-box-rounds", "add --refine-box-steps"]),
])
def test_evaluate_bad_input_is_named(trained, tmp_path, capsys, argv, words):
    store, run = trained
    rc = space_main(["evaluate", "--run", str(run), "--data", str(store), "--out", str(tmp_path / "e"), "--quiet",
                     *argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    for w in words:
        assert w in err
    assert not (tmp_path / "e").exists()


def test_evaluate_output_folder_is_checked_before_scoring_and_made_when_missing(trained, tmp_path, capsys,
                                                                                monkeypatch):
    import space.checkpoints

    store, run = trained
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    scored = []
    load_model = space.checkpoints.load_model
    monkeypatch.setattr(space.checkpoints, "load_model", lambda *a, **kw: scored.append(1) or load_model(*a, **kw))
    for out in (blocker, blocker / "eval"):
        rc = space_main(["evaluate", "--run", str(run), "--data", str(store), "--out", str(out), "--quiet",
                         "--device", "cpu"])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: --out") and len(err.strip().splitlines()) == 1, err
    assert not scored and blocker.read_text() == "keep me"
    out = tmp_path / "a" / "b"
    assert space_main(["evaluate", "--run", str(run), "--data", str(store), "--out", str(out), "--quiet",
                       "--device", "cpu", "--frames", "2", "--batch-size", "1"]) == 0
    assert json.loads((out / "metrics.json").read_text())["frames"] == 2


def test_trained_on_and_scored_on_agree_for_a_store_without_an_identity(trained, tmp_path, capsys):
    """A store written by another program need not carry `identity`: training records a fallback identity
    for it (space.rundir.store_identity), and evaluate must name the store the same way, not None."""
    import shutil

    store, _ = trained
    copy = tmp_path / "other.zarr"
    shutil.copytree(store, copy)
    meta = json.loads((copy / "zarr.json").read_text())
    del meta["attributes"]["identity"]
    (copy / "zarr.json").write_text(json.dumps(meta))
    cfg = resolve_config("demo", None, ["model.n_components=2", "train.batch_size=2", "train.steps=1",
                                        "train.val_every=0", f"train.threads={TORCH_THREADS}", "train.device=cpu"])
    run = tmp_path / "run"
    train(cfg, str(copy), str(run), progress=False)
    assert space_main(["evaluate", "--run", str(run), "--data", str(copy), "--quiet", "--device", "cpu",
                       "--frames", "2"]) == 0
    capsys.readouterr()
    metrics = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    assert metrics["scored_on"] is not None and metrics["scored_on"] == metrics["trained_on"], metrics


def test_evaluate_without_a_checkpoint_is_named(trained, tmp_path, capsys):
    store, _ = trained
    rc = space_main(["evaluate", "--run", str(tmp_path / "nothing"), "--data", str(store), "--quiet"])
    assert rc == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_summary_table_over_runs(trained, tmp_path, capsys):
    store, run = trained
    assert space_main(["evaluate", "--run", str(run), "--data", str(store), "--quiet", "--device", "cpu"]) == 0
    capsys.readouterr()
    md, js, tsv = tmp_path / "s.md", tmp_path / "s.json", tmp_path / "s.tsv"
    f = str(run / "eval" / "test" / "metrics.json")
    assert space_main(["summary", f, f, "--out-markdown", str(md), "--out-json", str(js), "--out-tsv", str(tsv)]) == 0
    rows = json.loads(js.read_text())
    # The TSV (the Snakemake report's table) holds the same rows and values as the JSON.
    import csv

    with open(tsv) as fh:
        table = list(csv.DictReader(fh, delimiter="\t"))
    assert [r["run"] for r in table] == ["run", "run"] and list(table[0]) == list(rows[0])
    assert float(table[0]["ap50"]) == rows[0]["ap50"] and float(table[1]["mse"]) == rows[1]["mse"]
    assert [r["run"] for r in rows] == ["run", "run"]
    lines = md.read_text().splitlines()
    assert lines[0].startswith("| run | split | seeds | ap50 | ap50_std |") and len(lines) == 4
    assert [r["seeds"] for r in rows] == [1, 1]  # a single run: one seed
    assert space_main(["summary", str(tmp_path / "missing.json")]) == 2
    assert "space evaluate" in capsys.readouterr().err
    # outputs: under a file refused before anything is written, missing folders made
    assert space_main(["summary", f, "--out-json", str(md / "s.json")]) == 2
    assert f"{md} is a file" in capsys.readouterr().err
    assert space_main(["summary", f, "--out-markdown", str(tmp_path / "new" / "s.md")]) == 0
    assert (tmp_path / "new" / "s.md").read_text().splitlines() == md.read_text().splitlines()[:3]
    # printed into a pipe whose reader has gone (`| head -1`): quiet, status 141 as for SIGPIPE
    p = subprocess.Popen([sys.executable, "-m", "space", "summary", f], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd=REPO)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 141 and err == "", err


def test_instance_labels_give_each_pixel_to_the_front_glimpse():
    """Two opaque square glimpses overlapping: each owns its square, the nearer one owns the overlap,
    and pixels outside both (alpha below 0.5) are background."""
    from space.evaluate import instance_labels

    s, n = 32, 32
    maps = torch.zeros(1, 2, 5, s, s)
    maps[0, :, 0] = 1.0
    centre = torch.tensor([[[0.35, 0.5], [0.65, 0.5]]])
    size = torch.full((1, 2, 2), 0.4)
    alpha = torch.zeros(1, 1, n, n)
    alpha[0, 0, 10:22, 2:26] = 1.0  # the union of the two squares (x 0.15-0.85, y 0.3-0.7), roughly
    out = {"fg": {"glimpse_maps": maps, "centre": centre, "size": size, "z_pres": torch.ones(1, 2),
                  "depth_weight": torch.tensor([[1.0, 0.01]]), "alpha": alpha}}
    labels = instance_labels(out, n)[0]
    assert labels[16, 8] == 1  # left square only
    assert labels[16, 24] == 2  # right square only
    assert labels[16, 16] == 1  # the overlap: glimpse 1 is nearer
    assert labels[2, 16] == 0 and labels[16, 30] == 0  # background


def test_curves_figure_of_a_run(trained, tmp_path, capsys):
    from PIL import Image

    _, run = trained
    out = tmp_path / "curves.png"
    assert space_main(["curves", str(run), str(run), "--labels", "a", "b", "--out", str(out)]) == 0
    assert Image.open(out).format == "PNG"  # what it plots: test_curves_panels_plot_the_runs_own_numbers
    assert space_main(["curves", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "no metrics.csv" in capsys.readouterr().err
    assert space_main(["curves", str(run), "--labels", "a", "b", "--out", str(tmp_path / "y.png")]) == 2
    capsys.readouterr()
    # an output under a file, or in a format matplotlib does not write: one line, before the figure
    assert space_main(["curves", str(run), "--out", str(out / "c.png")]) == 2
    assert f"{out} is a file" in capsys.readouterr().err
    assert space_main(["curves", str(run), "--out", str(tmp_path / "c.foo")]) == 2
    assert "ending in .png" in capsys.readouterr().err


def test_curves_panels_plot_the_runs_own_numbers(tmp_path):
    """Each panel's line holds the numbers of the run's metrics.csv and val.csv as csv reads them: loss by
    step, validation MSE by step and by wall time in minutes, validation AP50 by step."""
    import csv

    import matplotlib.pyplot as plt

    from space.curves import curves_figure

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("step,wall_s,loss\n25,10.0,900.5\n50,20.0,850.25\n75,30.0,800.0\n")
    (run / "val.csv").write_text("step,wall_s,val_mse,val_ap50\n50,21.0,0.02,0.1\n100,45.0,0.015,0.3\n")

    def column(name, key):
        with open(run / name, newline="") as fh:
            return [float(r[key]) for r in csv.DictReader(fh)]

    fig = curves_figure([str(run)], ["a"])
    loss, mse, mse_t, ap = (ax.lines[0] for ax in fig.axes)
    assert list(loss.get_xdata()) == column("metrics.csv", "step") == [25, 50, 75]
    assert list(loss.get_ydata()) == column("metrics.csv", "loss")
    assert list(mse.get_xdata()) == column("val.csv", "step")
    assert list(mse.get_ydata()) == list(mse_t.get_ydata()) == column("val.csv", "val_mse")
    assert list(mse_t.get_xdata()) == pytest.approx([0.35, 0.75])  # minutes
    assert list(ap.get_xdata()) == [50, 100] and list(ap.get_ydata()) == [0.1, 0.3]
    assert [ax.get_legend().get_texts()[0].get_text() for ax in fig.axes] == ["a"] * 4
    plt.close(fig)


def test_evaluate_on_an_atari_store_scores_games_and_categories(tmp_path, capsys):
    """Precision, recall and F1 (centre match) and AP50, overall, for the moving set, per game and per
    category; the per-game and per-category object counts add up to the whole."""
    pytest.importorskip("ocatari")
    store = tmp_path / "atari.zarr"
    r = subprocess.run([sys.executable, "-m", "datagen", "atari", str(store), "--game", "SpaceInvaders", "--game",
                        "Pooyan", "--image-size", "64", "--split", "train=8", "--split", "test=8",
                        "--background-frames", "8", "--subsample", "16", "--quiet"],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr
    cfg = resolve_config("demo", None, ["model.n_components=2", "train.batch_size=2", "train.steps=1",
                                        "train.val_every=0", f"train.threads={TORCH_THREADS}", "train.device=cpu"])
    run = tmp_path / "run"
    train(cfg, str(store), str(run), progress=False)
    assert space_main(["evaluate", "--run", str(run), "--data", str(store), "--threshold", "0", "--quiet"]) == 0
    m = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    capsys.readouterr()
    a = m["atari"]
    for key in ("precision", "recall", "f1", "ap50"):
        assert isinstance(a["all"][key], float), key
    assert m["f1"] == a["all"]["f1"] and m["objects"] == a["all"]["objects"]
    assert set(a["games"]) == {"SpaceInvaders", "Pooyan"}
    assert sum(g["all"]["objects"] for g in a["games"].values()) == m["objects"]
    assert sum(c["objects"] for c in a["categories"].values()) == m["objects"]
    assert a["moving"]["objects"] < m["objects"]  # SpaceInvaders' shields are static
    assert "SpaceInvaders.Shield" in a["categories"] and not any("Score" in c for c in a["categories"])
    assert isinstance(m["baseline_f1"], float) and "baseline_atari" in m


def test_encode_writes_the_latents_the_model_decodes(trained, tmp_path, capsys):
    """`space encode`: a Zarr store that xarray reads, with per cell the z_pres probability and box the
    model's own forward pass gives, and a z_what (and per component z^c) that the model's decoders turn
    back into exactly the glimpses (and background components) of that pass."""
    xr = pytest.importorskip("xarray")
    from space.checkpoints import load_model
    from space.data import StoreDataset

    store, run = trained
    out = tmp_path / "latents.zarr"
    assert space_main(["encode", "--run", str(run), "--data", str(store), "--split", "test", "--out", str(out),
                       "--batch-size", "5", "--quiet", "--device", "cpu"]) == 0
    ds = xr.open_zarr(str(out))
    model, cfg, state = load_model(run / "checkpoints" / "last.pt")
    g, n = cfg.model.grid_size, 12
    assert ds["z_what"].dims == ("frame", "cell_y", "cell_x", "z_what_dim")
    assert ds["z_what"].shape == (n, g, g, cfg.model.z_what_dim)
    assert ds["z_comp"].shape == (n, cfg.model.n_components, cfg.model.z_comp_dim)
    x = StoreDataset(str(store), "test", image_size=cfg.model.image_size).__getitems__(np.arange(n))
    with torch.no_grad():
        o = model(x, int(state["step"]))
        np.testing.assert_allclose(ds["z_pres_prob"].values, o["fg"]["z_pres_prob"].numpy(), atol=1e-5)
        centre = o["fg"]["centre"].numpy() * cfg.model.image_size
        np.testing.assert_allclose((ds["box"].values[..., :2] + ds["box"].values[..., 2:]) / 2, centre, atol=1e-3)
        z_what = torch.from_numpy(ds["z_what"].values).reshape(n * g * g, -1)
        maps = model.fg.decode(z_what).view_as(o["fg"]["glimpse_maps"])
        assert torch.allclose(maps, o["fg"]["glimpse_maps"], atol=1e-4)
        z_comp = torch.from_numpy(ds["z_comp"].values).reshape(n * cfg.model.n_components, -1)
        mu_bg = model.bg.comp_decoder(z_comp).view_as(o["bg"]["mu_bg"])
        assert torch.allclose(mu_bg, o["bg"]["mu_bg"], atol=1e-4)
    capsys.readouterr()
    # an existing output is never overwritten
    assert space_main(["encode", "--run", str(run), "--data", str(store), "--out", str(out), "--quiet"]) == 2
    assert "exists" in capsys.readouterr().err
