"""The DAG as users run it: Snakemake targets, schema refusals, DVC stages, one dataset regenerated."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import IN_CHECKOUT

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
    # Each generator job's time and memory (benchmark:), and the report of what was made, without --cores.
    for name in TINY["datasets"]:
        with open(proj / f"benchmarks/datagen/{name}.tsv") as fh:
            row = next(csv.DictReader(fh, delimiter="\t"))
        assert float(row["s"]) > 0 and float(row["max_rss"]) > 0
    run(["snakemake", "--report", "report.html", "data_all"], proj)
    html = (proj / "report.html").read_text()
    assert "1. Datasets" in html and "Training frames of dataset" in html
    assert all(f"{name}.train.png" in html for name in TINY["datasets"])


@IN_CHECKOUT
def _job_counts(dry_run: str) -> dict:
    """Snakemake's "Job stats" table of a dry run: {rule: jobs}."""
    table = dry_run.split("Job stats:")[1].split("\n\n")[0]
    return {row.split()[0]: int(row.split()[1]) for row in table.splitlines()[3:] if row.strip()}


def test_demo_config_and_full_default_dry_runs_resolve():
    """A fresh clone's dry runs plan one generator job and one inspection per dataset of the config, and the
    generator commands carry each dataset's parameters."""
    full = yaml.safe_load((REPO / "params.yaml").read_text())
    for extra, params in (([], full), (["--configfile", "config/demo.yaml"], _demo_params())):
        p = run(["snakemake", "-n", "--forceall", "data_all", *extra], REPO)  # as on a fresh clone
        datasets = params["datasets"]
        kinds = [d["generator"] for d in datasets.values()]
        counts = _job_counts(p.stdout)
        assert counts["room3d"] == kinds.count("room3d") and counts["atari"] == kinds.count("atari"), counts
        assert counts["inspect_dataset"] == counts["show_dataset"] == len(datasets), counts
        small = datasets["room3d_small"]
        lo, hi = small["objects"]
        command = next(line for line in p.stdout.splitlines() if "python -m datagen room3d" in line
                       and "room3d_small.zarr" in line)
        assert f"--objects {lo} {hi}" in command and f"--split train={small['splits']['train']}" in command


def test_the_reference_overlay_trains_the_demo_preset_longer_on_four_seeds_and_scores_refined():
    p = run(["snakemake", "-n", "--forceall", "eval_all", "--configfile", "config/demo.yaml", "config/reference.yaml"],
            REPO)
    assert _job_counts(p.stdout)["train"] == 4
    commands = [line for line in p.stdout.splitlines() if "python -m space train" in line]
    assert len(commands) == 4 and all("results/runs/space_room3d_reference/seeds/" in c for c in commands)
    assert {c.split("--set train.seed=")[1].split()[0] for c in commands} == {"0", "1", "2", "3"}
    for c in commands:
        assert "--preset demo" in c and "train.steps=2500" in c
        assert "model.z_pres_prior=" in c and "\"end\": 0.001" in c and "model.tau=" in c
    scoring = [line for line in p.stdout.splitlines() if "python -m space evaluate" in line]
    refined = "--refine --refine-cost 60.0 --refine-candidates 0.0 --refine-box-steps 40 --refine-box-lr 0.3 --refine-box-rounds 2 "
    assert len(scoring) == 4 and all(refined in c for c in scoring)
    figures = [line for line in p.stdout.splitlines() if "python -m space show" in line]
    assert len(figures) == 4 and all(refined in c for c in figures)
    # each seed's scores and figure are of the checkpoint (best or last) its refined validation scores choose
    choices = [line for line in p.stdout.splitlines() if "python -m space select" in line]
    assert len(choices) == 4 and all("--split val --candidates best last --by count_error" in c and refined in c
                                     for c in choices)
    for c in scoring + figures:
        seed = c.split("results/runs/space_room3d_reference/seeds/")[1].split()[0]
        assert f"--checkpoint results/runs/space_room3d_reference/eval/seeds/{seed}/val/selected.json" in c


def test_the_small128_overlay_renders_and_trains_3d_room_small_alone_at_batch_4():
    """config/small128.yaml through eval_all: one dataset (room3d_small, 4,096 training frames of the paper's
    128x128 scenes) and one training run, the room3d_small preset with the CPU schedules."""
    p = run(["snakemake", "-n", "--forceall", "eval_all", "--configfile", "config/small128.yaml"], REPO)
    counts = _job_counts(p.stdout)
    assert counts["room3d"] == 1 and counts["train"] == 1 and "atari" not in counts, counts
    render = next(line for line in p.stdout.splitlines() if "python -m datagen room3d" in line)
    assert "room3d_small.zarr" in render and "--objects 4 8" in render and "--split train=4096" in render
    assert "--image-size" not in render  # the paper's 128x128
    train = next(line for line in p.stdout.splitlines() if "python -m space train" in line)
    assert "--preset room3d_small" in train and "train.batch_size=4" in train and "train.steps=4000" in train


def test_latents_all_encodes_each_seeds_run_on_its_test_split():
    p = run(["snakemake", "-n", "--forceall", "latents_all", "--configfile", "config/demo.yaml",
             "config/reference.yaml"], REPO)
    assert _job_counts(p.stdout)["encode"] == 4
    commands = sorted(line.strip() for line in p.stdout.splitlines() if "python -m space encode" in line)
    for seed, c in enumerate(commands):
        assert f"--run results/runs/space_room3d_reference/seeds/{seed} " in c
        assert "--data results/data/room3d_small.zarr --split test" in c
        assert f"--out results/runs/space_room3d_reference/latents/seeds/{seed}/test.zarr" in c
        # the latents are of the checkpoint the scores are of
        assert f"--checkpoint results/runs/space_room3d_reference/eval/seeds/{seed}/val/selected.json" in c


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
        # A value reaches the shell only as data, and a device is one of the devices, exactly.
        (lambda p: p.update(experiments={"x": {"dataset": "room3d_small", "preset": "demo", "set": {
            "train.device": "cuda:0' || touch INJECTED; echo '"}}}), "train.device"),
        # An experiment that cannot run on its dataset is refused before the dataset is made.
        (lambda p: (p["datasets"]["room3d_small"]["room3d"].pop("image_size"),
                    p.update(experiments={"x": {"dataset": "room3d_small", "preset": "demo"}})),
         "64x64 frames but the dataset makes 128x128"),
        (lambda p: p.update(experiments={"x": {"dataset": "room3d_small", "preset": "demo",
                                               "set": {"model.image_size": 32}}}), "set the dataset's image_size to 32"),
        (lambda p: (p["datasets"]["room3d_small"]["splits"].update(train=3),
                    p.update(experiments={"x": {"dataset": "room3d_small", "preset": "demo"}})),
         "fewer than one batch of 4"),
        (lambda p: p.update(experiments={"x": {"dataset": "room3d_small", "preset": "demo", "seeds": [0, 1],
                                               "set": {"train.seed": 3}}}), "both seeds and set: train.seed"),
        (lambda p: p.update(experiments={"x": {"dataset": "room3d_small", "preset": "demo", "seeds": [1, 1]}}),
         "seeds"),
        (lambda p: p.update(experiments={"x": {"dataset": "room3d_small", "preset": "demo", "refine_cost": 30}}),
         "set refine: true"),
        (lambda p: p.update(experiments={"x": {"dataset": "room3d_small", "preset": "demo", "refine": True,
                                               "refine_cost": -1}}), "refine_cost"),
        (lambda p: p.update(experiments={"x": {"dataset": "room3d_small", "preset": "demo", "refine": True,
                                               "refine_candidates": 1.5}}), "refine_candidates"),
        (lambda p: p.update(experiments={"x": {"dataset": "room3d_small", "preset": "demo",
                                               "refine_box_steps": 10}}), "set refine: true"),
        (lambda p: p.update(experiments={"x": {"dataset": "room3d_small", "preset": "demo", "refine": True,
                                               "refine_box_lr": 0}}), "refine_box_lr"),
        (lambda p: p.update(experiments={"x": {"dataset": "room3d_small", "preset": "demo",
                                               "checkpoint_by": "count_error"}}), "list them in checkpoints"),
        (lambda p: p.update(experiments={"x": {"dataset": "room3d_small", "preset": "demo",
                                               "checkpoints": ["best", "worst"]}}), "worst"),
    ],
)
def test_bad_params_are_refused_before_any_job(tmp_path, mutate, named):
    params = yaml.safe_load(yaml.safe_dump(TINY))
    mutate(params)
    proj = project_copy(tmp_path, params)
    p = run(["snakemake", "--cores", "1", "data_all"], proj, check=False)
    assert p.returncode != 0
    assert named in p.stdout + p.stderr
    written = [str(f.relative_to(proj)) for f in (proj / "results").rglob("*") if f.is_file()]
    assert written == ["results/runs/.gitkeep"], written  # refused before any job started (the folder is in git)
    assert not list(proj.rglob("INJECTED"))


def test_values_from_params_reach_the_shell_as_data(tmp_path):
    """A policy path with quotes, spaces and a command in it arrives at the generator as one argument,
    byte for byte (the dry run prints the job's command line), and running the job runs no command."""
    evil = "my agent's.pt' ; touch INJECTED ; echo '"
    params = yaml.safe_load(yaml.safe_dump(TINY))
    params["datasets"] = {"atari_x": {"generator": "atari", "seed": 0, "games": ["Qbert"],
                                      "splits": {"train": 4, "val": 4, "test": 4}, "atari": {"policy": evil}}}
    proj = project_copy(tmp_path, params)
    dry = run(["snakemake", "-n", "-p", "--cores", "1", "results/data/atari_x.zarr"], proj).stdout
    line = next(ln for ln in dry.splitlines() if "python -m datagen atari" in ln)
    import shlex

    args = shlex.split(line.split("2>")[0])
    assert args[args.index("--policy") + 1] == evil
    p = run(["snakemake", "--cores", "1", "results/data/atari_x.zarr"], proj, check=False)
    assert p.returncode != 0  # no such policy file
    assert not list(proj.rglob("INJECTED"))


@pytest.mark.slow  # 4-5 minutes each on 2 cores: `pytest -m slow` runs them
def test_snakemake_train_runs_then_eval_all_scores_each_experiment(tmp_path):
    """An experiment with two seeds: each trained with its own train.seed, scored and pictured; the
    experiment's scores are their means, with each seed's beside them."""
    params = yaml.safe_load(yaml.safe_dump(TINY))
    params["experiments"] = {
        "tiny": {
            "dataset": "room3d_small",
            "preset": "demo",
            "seeds": [0, 5],
            "set": {"train.steps": 2, "train.batch_size": 2, "train.log_every": 1, "train.val_every": 0},
            # chosen on validation: with no validation during training, best is the last checkpoint too
            "checkpoints": ["best", "last"],
            "checkpoint_by": "count_error",
        }
    }
    proj = project_copy(tmp_path, params)
    run(["snakemake", "--cores", "2", "train_runs"], proj)
    summary = json.loads((proj / "results/runs/tiny/train.json").read_text())
    assert summary["step"] == 2 and summary["loss"] == summary["loss"]  # finite, not NaN
    assert summary["seeds"] == ["0", "5"]
    per_seed_loss = [summary["per_seed"][s]["loss"] for s in ("0", "5")]
    assert per_seed_loss[0] != per_seed_loss[1]  # two seeds, two models
    assert summary["loss"] == pytest.approx(sum(per_seed_loss) / 2)
    for seed in (0, 5):
        assert _trained_on(proj, "tiny", seed)["config"]["train"]["seed"] == seed
        assert (proj / f"logs/train/tiny.seed{seed}.log").exists()
        live = json.loads((proj / f"results/live/tiny.seed{seed}.json").read_text())  # DVC's live metrics
        assert live["step"] == 2 and live["loss"] == summary["per_seed"][str(seed)]["loss"]
    # Then scored and pictured, with the table over runs.
    run(["snakemake", "--cores", "2", "eval_all"], proj)
    metrics = json.loads((proj / "results/runs/tiny/eval/test/metrics.json").read_text())
    assert metrics["step"] == 2 and metrics["split"] == "test"
    mse = [json.loads((proj / f"results/runs/tiny/eval/seeds/{s}/test/metrics.json").read_text())["mse"]
           for s in (0, 5)]
    assert metrics["mse"] == pytest.approx(sum(mse) / 2) and metrics["per_seed"]["5"]["mse"] == mse[1]
    for seed in (0, 5):
        for name in ("detections.json", "ground_truth.json", "decomposition.png"):
            assert (proj / f"results/runs/tiny/eval/seeds/{seed}/test" / name).exists(), name
        selection = json.loads((proj / f"results/runs/tiny/eval/seeds/{seed}/val/selected.json").read_text())
        assert selection["split"] == "val" and selection["by"] == "count_error" and selection["step"] == 2
        assert selection["same_weights"] == {"last": "best"}  # one checkpoint file, scored once
    assert "| tiny | test | 2 |" in (proj / "results/summary.md").read_text()
    assert (proj / "results/runs/tiny/eval/curves.png").exists()
    # The report as the results page: the figures and the summary table, with captions; and the jobs' times.
    assert all((proj / f"benchmarks/{step}/tiny.seed{s}.tsv").exists() for step in ("train", "evaluate") for s in (0, 5))
    run(["snakemake", "--report", "report.html", "eval_all"], proj)  # the target that was run
    html = (proj / "report.html").read_text()
    for text in ("2. Training", "3. Decompositions", "4. Scores", "decomposition.png", "curves.png", "summary.tsv"):
        assert text in html, text

    # A changed training setting trains a new model, from step 0, and scores it.
    params["experiments"]["tiny"]["set"]["train.fg_lr"] = 2e-4
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["snakemake", "--cores", "2", "train_all"], proj)
    for seed in (0, 5):
        assert _trained_on(proj, "tiny", seed)["config"]["train"]["fg_lr"] == 2e-4
        assert _logged_steps(proj, "tiny", seed) == [1, 2]  # one fresh run: no rows of the old one, none twice
    # A dataset regenerated with new object counts trains a new model on it, and that model is scored.
    params["datasets"]["room3d_small"]["objects"] = [2, 3]
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["snakemake", "--cores", "2", "train_all"], proj)
    _assert_scored_model_trained_on_the_store(proj, "tiny", "room3d_small", objects=[2, 3])
    assert _logged_steps(proj, "tiny", 0) == _logged_steps(proj, "tiny", 5) == [1, 2]
    assert "Nothing to be done" in run(["snakemake", "-n", "train_all"], proj).stdout


def _trained_on(proj: Path, experiment: str, seed: int = 0) -> dict:
    """The record inside the run's checkpoint (the one the weights travel with)."""
    import torch

    state = torch.load(proj / f"results/runs/{experiment}/seeds/{seed}/checkpoints/last.pt", weights_only=True)
    return state["record"]


def _logged_steps(proj: Path, experiment: str, seed: int = 0) -> list:
    import csv

    with open(proj / f"results/runs/{experiment}/seeds/{seed}/metrics.csv") as fh:
        return [int(r["step"]) for r in csv.DictReader(fh)]


def _assert_scored_model_trained_on_the_store(proj: Path, experiment: str, dataset: str, objects: list):
    """The checkpoint was trained on the store as it is now, and the scores are of that checkpoint."""
    from datagen.store import Store

    store = Store(proj / f"results/data/{dataset}.zarr")
    assert store.attrs["identity"]["params"]["objects"] == objects
    record = _trained_on(proj, experiment)
    assert record["store"]["identity"] == store.attrs["identity"]
    metrics = json.loads((proj / f"results/runs/{experiment}/eval/test/metrics.json").read_text())
    from space.rundir import store_digest, store_record

    now = store_digest(store_record(store, str(proj / f"results/data/{dataset}.zarr")))
    assert metrics["trained_on"] == metrics["scored_on"] == now
    for seed, m in metrics["per_seed"].items():  # every seed's model, not only their common value
        assert m["trained_on"] == m["scored_on"] == now, seed


def _one_dataset(parts: int) -> dict:
    params = yaml.safe_load(yaml.safe_dump(TINY))
    params["datagen"]["parts"] = parts
    del params["datasets"]["room3d_large"]
    return params


def test_datagen_parts_run_as_separate_jobs_and_merge_into_the_one_job_store(tmp_path):
    """datagen.parts = 3: three generator jobs (each every 3rd shard, a part store) and one merge job; the
    merged store is the one-job store file for file, and the part stores are gone once merged."""
    stores = {}
    for parts in (1, 3):
        proj = project_copy(tmp_path / f"p{parts}", _one_dataset(parts))
        out = run(["snakemake", "--cores", "2", "results/data/room3d_small.zarr"], proj).stderr
        if parts == 3:
            assert out.count("rule room3d:") == 3 and "rule merge_parts:" in out
            assert not list((proj / "results/parts").rglob("zarr.json"))  # temp(): removed after the merge
        stores[parts] = proj / "results/data/room3d_small.zarr"
    files = lambda root: {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}
    a, b = files(stores[1]), files(stores[3])
    assert sorted(a) == sorted(b) and [k for k in a if a[k] != b[k]] == []


@IN_CHECKOUT
def test_full_default_dag_dry_runs_and_lints_clean():
    """`snakemake -n train_all` over every dataset and experiment of params.yaml, and `snakemake --lint`
    with nothing to report."""
    p = run(["snakemake", "-n", "--forceall", "train_all"], REPO)
    for name in ("space_room3d_small", "space_room3d_large", "space_atari_joint", "space_atari_riverraid"):
        assert f"experiment={name}" in p.stdout or name in p.stdout, name
    # Every dataset generated and pictured, every experiment trained, scored and drawn, one summary.
    jobs = {rule: p.stdout.count(f"\nrule {rule}:") for rule in (
        "room3d", "atari", "show_dataset", "train", "combine_seeds_training", "evaluate", "decomposition_figure",
        "combine_seeds_scores", "curves", "summary")}
    assert jobs == {"room3d": 2, "atari": 5, "show_dataset": 7, "train": 7, "combine_seeds_training": 7,
                    "evaluate": 7, "decomposition_figure": 7, "combine_seeds_scores": 7, "curves": 7,
                    "summary": 1}, jobs
    p = run(["snakemake", "--lint"], REPO, check=False)
    assert p.returncode == 0 and "Congratulations" in p.stdout + p.stderr, p.stdout + p.stderr


@IN_CHECKOUT
@pytest.mark.parametrize("profile", ["default", "gpu", "slurm"])
def test_profiles_resolve_the_full_dag(profile):
    """Every profile parses and plans the paper's DAG (executor plugins installed: the cluster extra): one
    training job per experiment and seed of params.yaml, and a dataset of each generator job or, under
    slurm's profile, of 16 part jobs and a merge."""
    p = run(["snakemake", "--profile", f"profiles/{profile}", "-n", "--forceall", "train_all"], REPO)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    if profile == "slurm":
        params["datagen"] = {**params.get("datagen", {}), **yaml.safe_load(
            (REPO / "profiles/slurm/cluster.yaml").read_text())["datagen"]}
    counts = _job_counts(p.stdout)
    experiments = [e for e in params["experiments"].values() if e.get("enabled", True)]
    assert counts["train"] == sum(len(e.get("seeds", [0])) for e in experiments), counts
    datasets = {e["dataset"] for e in experiments}
    parts = params.get("datagen", {}).get("parts", 1)
    if parts > 1:
        assert parts == 16 and counts["merge_parts"] == len(datasets), counts
        assert counts["room3d"] + counts["atari"] == parts * len(datasets), counts
    else:
        assert counts["room3d"] + counts["atari"] == len(datasets) and "merge_parts" not in counts, counts


def test_every_experiment_is_a_dvc_model_artifact_of_its_best_checkpoint():
    """dvc.yaml's artifacts: one per experiment of params.yaml and of the reference overlay, its seed 0's
    best checkpoint, inside what the experiment's train stage outputs (so DVC caches and pushes it)."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    experiments = [*yaml.safe_load((REPO / "params.yaml").read_text())["experiments"],
                   *yaml.safe_load((REPO / "config/reference.yaml").read_text())["experiments"]]
    want = {e.replace("_", "-"): f"results/runs/{e}/seeds/0/checkpoints/best.pt" for e in experiments}
    assert {k: v["path"] for k, v in dvc["artifacts"].items()} == want
    assert all(v["type"] == "model" for v in dvc["artifacts"].values())
    outs = [next(iter(o)) if isinstance(o, dict) else o for o in dvc["stages"]["train"]["do"]["outs"]]
    assert outs == ["results/runs/${key}/seeds"]


def test_the_scoring_stage_reruns_when_the_experiments_settings_change():
    """`refine: true` changes the scores and not the training: DVC must see it in the evaluate stage's own
    parameters, as the evaluate stage's other inputs (the runs) do not change with it."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert "experiments.${key}" in stages["evaluate"]["do"]["params"]
    assert "experiments.${key}" in stages["train"]["do"]["params"]


def test_dvc_pull_then_repro_on_a_second_clone_reruns_nothing(tmp_path):
    """The default remote (a folder beside the clones, .dvc/config): push from one clone, pull into a
    second, and `dvc repro` there has nothing to do."""
    first = project_copy(tmp_path / "first", _one_dataset(1))
    run("dvc repro -q && dvc push -q", first)
    run("git add -A && git -c user.name=t -c user.email=t@t commit -qm data", first)
    assert (tmp_path / "space-pipeline-dvc-storage").is_dir()
    run(f"git clone -q {first} {tmp_path / 'second'}", tmp_path)
    second = tmp_path / "second"
    run("dvc pull -q", second)
    out = run("dvc repro", second).stdout
    assert "Running stage" not in out and "up to date" in out
    assert "up to date" in run("dvc status", second).stdout
    from datagen.store import Store

    Store(second / "results/data/room3d_small.zarr")  # complete and valid


@pytest.mark.slow  # 4-5 minutes each on 2 cores: `pytest -m slow` runs them
def test_dvc_exp_run_with_new_object_counts_regenerates_that_dataset_beside_the_baseline(tmp_path):
    """`dvc exp run -S 'datasets.room3d_large.objects=[10,12]'`: that dataset's stage alone reruns (the
    other store is left byte for byte), the experiment on it is trained afresh on the new store and scored
    (DVC's `persist` keeps the old checkpoint, which the trainer must not reuse), and the experiment sits
    beside the baseline in `dvc exp show`. Then a docstring edited in the model and a figure module
    changed: neither retrains."""
    params = yaml.safe_load(yaml.safe_dump(TINY))
    params["experiments"] = {"tiny": {"dataset": "room3d_large", "preset": "demo", "set": {
        "train.steps": 2, "train.batch_size": 2, "train.log_every": 1, "train.val_every": 0}}}
    proj = project_copy(tmp_path, params)
    run("dvc repro -q", proj)
    _assert_scored_model_trained_on_the_store(proj, "tiny", "room3d_large", objects=[18, 24])
    run("git add -A && git -c user.name=t -c user.email=t@t commit -qm data", proj)
    small_before = (proj / "results/data/room3d_small.zarr/zarr.json").read_bytes()
    large_before = (proj / "results/data/room3d_large.zarr/zarr.json").read_bytes()
    out = run(["dvc", "exp", "run", "-n", "counts", "-S", "datasets.room3d_large.objects=[10,12]"], proj).stdout
    assert "Running stage 'data@room3d_large'" in out and "Running stage 'data@room3d_small'" not in out
    rows = json.loads(run(["dvc", "exp", "show", "--json"], proj).stdout)
    names = [e.get("name") for r in rows for e in (r.get("experiments") or []) for e in (e.get("revs") or [])]
    assert "counts" in names, rows
    from datagen.store import Store

    assert (proj / "results/data/room3d_small.zarr/zarr.json").read_bytes() == small_before
    assert (proj / "results/data/room3d_large.zarr/zarr.json").read_bytes() != large_before
    counts = Store(proj / "results/data/room3d_large.zarr").split("train")["n_objects"][:]
    assert counts.min() >= 10 and counts.max() <= 12
    assert "Running stage 'train@tiny'" in out and "Running stage 'evaluate@tiny'" in out
    _assert_scored_model_trained_on_the_store(proj, "tiny", "room3d_large", objects=[10, 12])
    assert _logged_steps(proj, "tiny") == [1, 2]
    assert "up to date" in run("dvc status", proj).stdout

    model = proj / "space/model.py"
    model.write_text(model.read_text().replace('"""', '"""Edited. ', 1) + "\n# a comment\n")
    viz = proj / "space/viz.py"
    viz.write_text(viz.read_text() + "\nUNUSED_CONSTANT = 1\n")
    out = run("dvc repro", proj).stdout
    assert "Running stage 'code'" in out and "Running stage 'train@tiny'" not in out
    assert "Running stage 'evaluate@tiny'" in out  # the figures' code changed


def _demo_params() -> dict:
    """params.yaml with config/demo.yaml merged over it, as `python -m datagen params` writes it for DVC."""
    from datagen.__main__ import merge_params

    base = yaml.safe_load((REPO / "params.yaml").read_text())
    return merge_params(base, yaml.safe_load((REPO / "config/demo.yaml").read_text()))


def test_the_demo_as_dvc_params_keeps_only_its_enabled_experiment(tmp_path):
    """`python -m datagen params config/demo.yaml --out params.yaml`: DVC runs every experiment params.yaml
    lists, so the demo's disabled ones are dropped; its stages are the data, the one run, and the summary,
    in that order."""
    proj = project_copy(tmp_path, yaml.safe_load((REPO / "params.yaml").read_text()))
    run([sys.executable, "-m", "datagen", "params", "config/demo.yaml", "--out", "params.yaml"], proj)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    assert list(params["experiments"]) == ["space_room3d_small"]
    assert params["datasets"]["room3d_small"]["splits"] == {"train": 2048, "val": 256, "test": 256}
    assert params == _demo_params()
    stages = sorted(run("dvc stage list --name-only", proj).stdout.split())
    assert stages == sorted(["code", *(f"data@{d}" for d in params["datasets"]), "train@space_room3d_small",
                             "evaluate@space_room3d_small", "summary"]), stages
    dag = run("dvc dag --md", proj).stdout
    assert "train@space_room3d_small" in dag and "evaluate@space_room3d_small" in dag and "summary" in dag
    bad = run([sys.executable, "-m", "datagen", "params", "no/such.yaml"], proj, check=False)
    assert bad.returncode == 2 and "no such file: no/such.yaml" in bad.stderr


def test_the_demo_as_a_dvc_experiment_leaves_params_yaml_untouched(tmp_path):
    """`python -m datagen params config/demo.yaml --exp-run`: DVC runs the demo as an experiment in a
    temporary copy, its --set-param overrides turning params.yaml into the merged demo params there (as
    DVC itself reads them back), while the workspace's params.yaml keeps its bytes. The pipeline is swapped
    for one stage that reads the same params, so this checks the overrides, not the training."""
    proj = project_copy(tmp_path, yaml.safe_load((REPO / "params.yaml").read_text()))
    (proj / "dvc.yaml").write_text(
        "stages:\n  seen:\n    cmd: python -c \"import shutil; shutil.copy('params.yaml', 'seen.yaml')\"\n"
        "    params: [datagen, datasets, experiments]\n    outs: [seen.yaml]\n")
    run("git add -A && git -c user.name=t -c user.email=t@t commit -qm stage", proj)
    before = (proj / "params.yaml").read_bytes()
    p = run([sys.executable, "-m", "datagen", "params", "config/demo.yaml", "--exp-run"], proj)
    assert "dvc exp run --temp --name demo -S" in p.stderr
    assert (proj / "params.yaml").read_bytes() == before
    assert run("git status --porcelain", proj).stdout == ""
    shown = json.loads(run("dvc exp show --json", proj).stdout)
    (exp,) = [e for row in shown for e in (row.get("experiments") or []) if e["name"] == "demo"]
    assert exp["revs"][0]["data"]["params"]["params.yaml"]["data"] == _demo_params()
    # and its results come into the workspace on request (docs/scale-out.md)
    assert not (proj / "seen.yaml").exists()
    run("dvc exp apply demo", proj)
    assert yaml.safe_load((proj / "seen.yaml").read_text()) == _demo_params()


def test_dvc_overrides_turn_any_params_into_any_other():
    """The overrides for values DVC's grammar needs care with: quotes, dotted keys (as `set:`'s), a key
    removed and one added, a type changed, nested lists; applied by DVC's own Hydra override code."""
    from dvc.utils.hydra import apply_overrides

    from datagen.__main__ import dvc_set_params
    from datagen.config import ConfigError

    base = {"a": {"b": 1, "c": [1, 2], "gone": {"x": 1}},
            "e": {"s": {"train.steps": 800, "model.x": "it's"}, "f": 2, "g": True}}
    target = {"a": {"b": 1.5, "c": [[3, 4], "w"], "new": {"y": None, "z": "a b:c", "q": 'say "hi"', "w": 'C:\\x'}},
              "e": {"s": {"train.steps": 3000, "model.x": "it's"}, "f": 2, "g": 1}}
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "params.yaml"
        path.write_text(yaml.safe_dump(base))
        apply_overrides(str(path), dvc_set_params(base, target))
        got = yaml.safe_load(path.read_text())
    assert got == target and type(got["e"]["g"]) is int and type(got["a"]["b"]) is float
    with pytest.raises(ConfigError, match="write the merged params with --out"):
        dvc_set_params({"a": 1}, {"a": "both ' and \""})


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["snakemake", "dvc"])
def test_the_cpu_demo_dag_end_to_end_in_a_fresh_copy(tmp_path, runner):
    """The whole demo DAG, data to figures and the summary table, in a temporary copy of the project:
    under Snakemake (the README's first command) and under DVC (the demo's settings as params.yaml);
    then nothing is left to do."""
    import time

    if runner == "snakemake":
        proj = project_copy(tmp_path, yaml.safe_load((REPO / "params.yaml").read_text()))
        t = time.perf_counter()
        run(["snakemake", "--cores", "2", "train_all", "--configfile", "config/demo.yaml"], proj)
        again = run(["snakemake", "--cores", "2", "train_all", "--configfile", "config/demo.yaml", "-n"], proj).stdout
        assert "Nothing to be done" in again
    else:
        proj = project_copy(tmp_path, _demo_params())
        t = time.perf_counter()
        run("dvc repro", proj)
        assert "up to date" in run("dvc status", proj).stdout
        shown = run("dvc metrics show --json", proj).stdout
        assert "ap50" in shown and "space_room3d_small" in shown
        assert "results/live/space_room3d_small.seed0.json" in shown  # the live metrics, at their last step
        # The model from DVC's registry: a version registered by an annotated tag, fetched by name.
        run("git add -A && git -c user.name=t -c user.email=t@t commit -qm demo && git -c user.name=t "
            "-c user.email=t@t tag -a space-room3d-small@v0.1.0 -m demo", proj)
        run("dvc artifacts get . space-room3d-small -o fetched.pt", proj)
        assert (proj / "fetched.pt").read_bytes() == (
            proj / "results/runs/space_room3d_small/seeds/0/checkpoints/best.pt").read_bytes()
    minutes = (time.perf_counter() - t) / 60
    print(f"demo DAG under {runner}: {minutes:.1f} min")
    for f in ("results/summary.md", "results/summary.json", "results/runs/space_room3d_small/eval/test/metrics.json",
              "results/runs/space_room3d_small/eval/seeds/0/test/decomposition.png",
              "results/runs/space_room3d_small/eval/curves.png", "results/data/room3d_small.train.png"):
        assert (proj / f).exists(), f
    assert "| space_room3d_small | test |" in (proj / "results/summary.md").read_text()
    assert minutes < 15  # issue 6's bound for the demo on a 2-core machine


def test_an_interrupted_dataset_job_resumes_where_it_stopped(tmp_path):
    """Generator jobs write into results/.staging/ and move the finished store into place, so a killed
    job (here: a staging store with one shard's mark missing, as a kill leaves it) is finished by the
    rerun (`snakemake --rerun-incomplete`, which deletes only the never-created output) without redoing
    the shards already written."""
    proj = project_copy(tmp_path, _one_dataset(1))
    staging = proj / "results/.staging/data/room3d_small.zarr"
    run([sys.executable, "-m", "datagen", "room3d", str(staging), "--quiet", "--objects", "4", "8",
         "--split", "train=32", "--split", "val=16", "--split", "test=16", "--seed", "1", "--shard-size", "16",
         "--image-size", "64"], proj)
    (staging / "train/_shards_done/c/1").unlink()  # shard 1 of train never marked: the job was killed
    meta = staging / "zarr.json"
    meta.write_text(meta.read_text().replace('"complete": true', '"complete": false'))
    kept = staging / "val/images/c/0/0/0/0"
    inode = kept.stat().st_ino
    out = run(["snakemake", "--cores", "1", "--rerun-incomplete", "results/data/room3d_small.zarr"], proj)
    store = proj / "results/data/room3d_small.zarr"
    from datagen.store import Store

    Store(store)  # complete and valid
    assert (store / "val/images/c/0/0/0/0").stat().st_ino == inode, "a finished shard was rendered again"
    assert not staging.exists()
    assert "room3d" in out.stderr


def test_the_rules_conda_envs_pin_what_pyproject_pins():
    """envs/*.yaml (the rules' `conda:` environments) list pyproject.toml's requirements with the same
    version ranges, and each holds every package its package's code imports; torch comes from conda-forge,
    whose build conda picks by the machine's driver (the CPU one without a GPU), never from pip."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {}
    for spec in project["dependencies"] + [s for extra in project["optional-dependencies"].values() for s in extra]:
        name = re.split(r"[<>=!\[ ]", spec, maxsplit=1)[0].lower()
        declared[name] = spec.replace(" ", "")
    envs = {}
    for name in ("datagen", "space"):
        doc = yaml.safe_load((REPO / f"envs/{name}.yaml").read_text())
        pip = next(d["pip"] for d in doc["dependencies"] if isinstance(d, dict) and "pip" in d)
        envs[name] = {re.split(r"[<>=!\[ ]", s, maxsplit=1)[0].lower(): s.replace(" ", "") for s in pip}
        # conda packages: conda-forge's pytorch is PyPI's torch (conda chooses its CPU or CUDA build)
        conda = [d.replace("pytorch", "torch", 1) for d in doc["dependencies"] if isinstance(d, str) and d.startswith("pytorch")]
        envs[name].update({re.split(r"[<>=]", s, maxsplit=1)[0]: s for s in conda})
        for pkg, spec in envs[name].items():
            assert declared.get(pkg) == spec, f"envs/{name}.yaml has {spec}, pyproject.toml {declared.get(pkg)}"
    needs = {
        "datagen": {"numpy", "zarr", "fsspec", "s3fs", "mujoco", "pillow", "tqdm", "pyyaml", "jsonschema",
                    "gymnasium", "ale-py", *(re.split(r"[<>=]", s)[0] for s in project["optional-dependencies"]["atari"])},
        "space": {"torch", "numpy", "zarr", "fsspec", "s3fs", "pillow", "tqdm", "pyyaml", "pycocotools",
                  "tensorboard", "matplotlib"},
    }
    for name, pkgs in needs.items():
        assert pkgs <= set(envs[name]), f"envs/{name}.yaml lacks {sorted(pkgs - set(envs[name]))}"
    assert "ocatari==2.2.1" in (REPO / "envs/datagen.post-deploy.sh").read_text()
    space_pip = next(d["pip"] for d in yaml.safe_load((REPO / "envs/space.yaml").read_text())["dependencies"]
                     if isinstance(d, dict))
    assert not any(s.startswith("torch") for s in space_pip)
