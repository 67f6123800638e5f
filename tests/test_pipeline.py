"""The DAG as users run it: Snakemake targets, schema refusals, DVC stages, one dataset regenerated."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # snakemake and dvc live beside this interpreter

TINY = {
    "datagen": {"workers": 1, "shard_size": 16},
    "datasets": {
        "room3d_small": {
            "generator": "room3d",
            "seed": 1,
            "objects": [4, 8],
            "splits": {"train": 32, "val": 16, "test": 16},
            "room3d": {"image_size": 64},
        },
        "room3d_large": {
            "generator": "room3d",
            "seed": 2,
            "objects": [18, 24],
            "splits": {"train": 32, "val": 16, "test": 16},
            "room3d": {"image_size": 64},
        },
    },
    "experiments": {},
}


def _env():
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env.setdefault("MUJOCO_GL", "egl")
    return env


def run(cmd, cwd, check=True):
    p = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, shell=isinstance(cmd, str))
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def project_copy(dest: Path, params: dict) -> Path:
    """The project's tracked files as they are now, with `params` as params.yaml, in a fresh git repo."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        src = REPO / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run("git init -q && git add -A && git -c user.name=t -c user.email=t@t commit -qm init", dest)
    return dest


def test_snakemake_data_all_on_a_tiny_config(tmp_path):
    proj = project_copy(tmp_path, TINY)
    run(["snakemake", "--cores", "2", "data_all"], proj)
    from datagen.store import Store

    for name, ds in TINY["datasets"].items():
        s = Store(proj / f"results/data/{name}.zarr")
        assert s.splits == ds["splits"]
        counts = s.split("train")["n_objects"][:]
        assert counts.min() >= ds["objects"][0] and counts.max() <= ds["objects"][1]
        assert (proj / f"results/data/{name}.train.png").stat().st_size > 1000
        assert (proj / f"logs/datagen/{name}.log").exists()
    # Nothing left to do: a second run schedules no job.
    dry = run(["snakemake", "-n", "data_all"], proj)
    assert "Nothing to be done" in dry.stdout + dry.stderr


def test_demo_config_and_full_default_dry_runs_resolve():
    for extra in ([], ["--configfile", "config/demo.yaml"]):
        p = run(["snakemake", "-n", "--forceall", "data_all", *extra], REPO)  # as on a fresh clone
        assert "room3d" in p.stdout


@pytest.mark.parametrize(
    "mutate, named",
    [
        (lambda p: p["datasets"]["room3d_small"].update(objetcs=[4, 8]), "objetcs"),
        (lambda p: p["datasets"]["room3d_small"].update(objects=[8, 4]), "datasets.room3d_small"),
        (lambda p: p["datasets"]["room3d_small"]["splits"].update(train=-5), "-5"),
        (lambda p: p["datasets"]["room3d_small"]["room3d"].update(shapes=["sphere", "pyramid"]), "pyramid"),
        (lambda p: p["datasets"]["room3d_large"].update(objects=[200, 250]), "do not fit"),
        (lambda p: p["datagen"].update(workers=0), "workers"),
        (lambda p: p["datasets"].update(atari_x={"generator": "atari", "seed": 0, "games": ["Pong"],
                                                 "splits": {"train": 4, "val": 4, "test": 4}}), "Pong"),
        (lambda p: p["datasets"].update(atari_x={"generator": "atari", "seed": 0, "games": ["Qbert"],
                                                 "splits": {"train": 4, "val": 4, "test": 4},
                                                 "atari": {"subsampel": 2}}), "subsampel"),
        (lambda p: p.update(experiments={"x": {"dataset": "nope", "preset": "demo"}}), "experiments.x.dataset"),
        (lambda p: p.update(experiments={"x": {"dataset": "room3d_small", "preset": "demo",
                                               "set": {"train.stepz": 3}}}), "stepz"),
    ],
)
def test_bad_params_are_refused_before_any_job(tmp_path, mutate, named):
    params = yaml.safe_load(yaml.safe_dump(TINY))
    mutate(params)
    proj = project_copy(tmp_path, params)
    p = run(["snakemake", "--cores", "1", "data_all"], proj, check=False)
    assert p.returncode != 0
    assert named in p.stdout + p.stderr
    assert not (proj / "results").exists()  # refused before any job started


def test_dvc_repro_then_changing_one_object_range_regenerates_only_that_dataset(tmp_path):
    proj = project_copy(tmp_path, TINY)
    run("dvc repro -q", proj)
    run("git add -A && git -c user.name=t -c user.email=t@t commit -qm data", proj)
    small_before = (proj / "results/data/room3d_small.zarr/zarr.json").read_bytes()
    large_before = (proj / "results/data/room3d_large.zarr/zarr.json").read_bytes()

    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["datasets"]["room3d_large"]["objects"] = [10, 12]
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run("dvc repro", proj).stdout
    assert "Running stage 'data@room3d_large'" in out
    assert "Running stage 'data@room3d_small'" not in out

    from datagen.store import Store

    assert (proj / "results/data/room3d_small.zarr/zarr.json").read_bytes() == small_before
    assert (proj / "results/data/room3d_large.zarr/zarr.json").read_bytes() != large_before
    counts = Store(proj / "results/data/room3d_large.zarr").split("train")["n_objects"][:]
    assert counts.min() >= 10 and counts.max() <= 12
    assert "up to date" in run("dvc status", proj).stdout


def test_snakemake_train_all_trains_each_experiment(tmp_path):
    params = yaml.safe_load(yaml.safe_dump(TINY))
    params["experiments"] = {
        "tiny": {
            "dataset": "room3d_small",
            "preset": "demo",
            "set": {"train.steps": 2, "train.batch_size": 2, "train.log_every": 1, "train.val_every": 0},
        }
    }
    proj = project_copy(tmp_path, params)
    run(["snakemake", "--cores", "2", "train_all"], proj)
    summary = json.loads((proj / "results/runs/tiny/train.json").read_text())
    assert summary["step"] == 2 and summary["loss"] == summary["loss"]  # finite, not NaN
    assert (proj / "results/runs/tiny/checkpoints/last.pt").exists()
    assert (proj / "logs/train/tiny.log").exists()
    # Then scored and pictured, with the table over runs.
    run(["snakemake", "--cores", "2", "eval_all"], proj)
    metrics = json.loads((proj / "results/runs/tiny/eval/test/metrics.json").read_text())
    assert metrics["step"] == 2 and metrics["split"] == "test"
    for name in ("detections.json", "ground_truth.json", "decomposition.png"):
        assert (proj / "results/runs/tiny/eval/test" / name).exists(), name
    assert "| tiny | test |" in (proj / "results/summary.md").read_text()
    assert (proj / "results/runs/tiny/eval/curves.png").exists()
