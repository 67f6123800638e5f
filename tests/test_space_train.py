"""Training SPACE (space/train.py, `python -m space train`) on a tiny 3D-Room store.

What a run writes, checkpoints readable without pickled code, resume equal to an uninterrupted run,
stopping on a NaN with the last good checkpoint kept, a run directory reused only for the run it holds
(same store, same settings; --restart starts afresh) and by one trainer at a time, clear errors for bad
input, and (slow, about 11 minutes) that the CPU demo lowers the loss and switches z_pres on where the
objects are.

Settings are tiny (64x64 frames, 4x4 grid, K=2, batches of 2, a handful of steps) so the default run
stays within a couple of minutes on two CPU cores.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np
import pytest
import torch

import space.checkpoints as checkpoints
import space.train as space_train
from space.__main__ import main as space_main
from space.config import resolve_config
from space.config import Config, ConfigError, TrainConfig
from space.model import SPACE
from space.train import TERMS, TrainingDiverged, train

from conftest import TORCH_THREADS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"), "OMP_NUM_THREADS": str(TORCH_THREADS)}

# The demo preset (64x64, 4x4 grid) made smaller still.
TINY = [
    "model.grid_size=4",  # 16 cells: quick, and the tests below count them
    "model.n_components=2",
    "train.batch_size=2",
    "train.steps=4",
    "train.log_every=1",
    "train.checkpoint_every=2",
    "train.val_every=2",
    "train.val_batches=1",
    "train.image_every=1000",
    f"train.threads={TORCH_THREADS}",
    "train.device=cpu",
    "train.seed=5",
]

# Resume must reproduce the uninterrupted run's losses. On CPU with a fixed seed and the same thread
# count they are bit-identical; we allow 1e-4 relative (1e-3 absolute for terms near zero).
RESUME_RTOL, RESUME_ATOL = 1e-4, 1e-3


def tiny(*extra: str) -> Config:
    return resolve_config("demo", None, [*TINY, *extra])


def tiny_args(*extra: str) -> list[str]:
    out = ["--preset", "demo", "--quiet"]
    for s in (*TINY, *extra):
        out += ["--set", s]
    return out


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_main(capsys, *argv: str) -> tuple[int, str]:
    rc = space_main(list(argv))
    return rc, capsys.readouterr().err


def make_store(path: Path, objects: tuple, train: int, val: int) -> Path:
    """A 64x64 3D-Room store rendered by the generator's CLI."""
    r = subprocess.run(
        [sys.executable, "-m", "datagen", "room3d", str(path), "--objects", *map(str, objects), "--split",
         f"train={train}", "--split", f"val={val}", "--image-size", "64", "--seed", "11", "--quiet"],
        capture_output=True, text=True, timeout=600, cwd=REPO, env=ENV)
    assert r.returncode == 0, r.stderr
    return path


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("space_store") / "room.zarr", (4, 8), train=240, val=40)


# ----------------------------------------------------------------------------------------- a CLI run


@pytest.fixture(scope="module")
def cli_run(store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli_run") / "run"
    r = subprocess.run([sys.executable, "-m", "space", "train", "--data", str(store), "--out", str(out),
                        *tiny_args(), "--steps", "2"],
                       capture_output=True, text=True, timeout=600, cwd=REPO, env=ENV)
    assert r.returncode == 0, r.stderr
    return out


def test_cli_run_writes_the_run_directory(cli_run, store):
    cfg = json.loads((cli_run / "config.json").read_text())
    expected = tiny().to_dict()
    expected["train"]["steps"] = 2  # --steps
    assert cfg == expected
    # The run's record: the store it was trained on, by the identity the store itself carries, and the settings.
    import zarr

    record = json.loads((cli_run / "run.json").read_text())
    assert record["store"]["identity"] == zarr.open_group(str(store), mode="r").attrs["identity"]
    assert record["store"]["identity"]["params"]["objects"] == [4, 8]
    assert record["config"] == expected
    assert torch.load(cli_run / "checkpoints" / "last.pt", weights_only=True)["record"] == record
    assert (cli_run / "checkpoints" / "last.pt").is_file()
    assert not list((cli_run / "checkpoints").glob("*.tmp"))  # the atomic write left nothing behind

    rows = read_csv(cli_run / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2]
    for r in rows:
        for k in (*TERMS, "mse", "grad_norm"):
            assert math.isfinite(float(r[k])), k
        assert int(r["glimpses"]) == 2 * 4 * 4  # batch * cells

    val = read_csv(cli_run / "val.csv")
    assert [int(r["step"]) for r in val] == [2]
    assert 0 < float(val[0]["val_mse"]) < 1

    events = list((cli_run / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_checkpoint_loads_without_pickled_code(cli_run):
    state = torch.load(cli_run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 2
    assert state["format"] == checkpoints.CHECKPOINT_FORMAT
    assert state["config"] == json.loads((cli_run / "config.json").read_text())
    cfg = Config.from_dict(state["config"])
    model = SPACE(cfg.model)
    model.load_state_dict(state["model"])  # strict: every tensor present with its shape
    for name in ("opt_fg", "opt_bg", "rng"):
        assert name in state
    # The loader in space.train agrees and checks the config.
    assert checkpoints.load_checkpoint(cli_run / "checkpoints" / "last.pt", cfg)["step"] == 2


def test_finished_run_is_not_retrained(cli_run, store, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(cli_run, run)
    before = sha(run / "checkpoints" / "last.pt"), (run / "metrics.csv").read_text()
    cfg = tiny("train.steps=2")
    done = train(cfg, str(store), str(run), progress=False)
    with open(run / "metrics.csv", newline="") as fh:
        ended = list(csv.DictReader(fh))[-1]  # what it returns: the row it ended with
    assert done["step"] == 2 and done["loss"] == float(ended["loss"]) and done["mse"] == float(ended["mse"])
    assert (sha(run / "checkpoints" / "last.pt"), (run / "metrics.csv").read_text()) == before


def test_without_a_progress_bar_each_log_step_and_validation_is_a_line(store, tmp_path, capsys):
    """--quiet (the pipeline's way) leaves no bar, so a log would stay empty until the end: instead each
    log step prints its step, loss and time to go, and each validation its scores, as they happen."""
    run = tmp_path / "run"
    live = tmp_path / "live" / "0.json"
    train(tiny("train.steps=4", "train.log_every=2", "train.val_every=2"), str(store), str(run), progress=False,
          live=str(live))
    lines = capsys.readouterr().err.splitlines()
    steps = [line for line in lines if " loss " in line]
    assert [line.split(": step ")[1].split()[0] for line in steps] == ["2/4", "4/4"]
    assert all("min to go" in line for line in steps)
    # One line each, opening with the run it is about (it once opened with the model's whole output).
    assert all(line.startswith(f"{run}: step ") for line in lines if "step" in line), lines
    assert len(lines) < 12, lines
    assert [line.split(": step ")[1].split(":")[0] for line in lines if "validation AP50" in line] == ["2", "4"]
    loss_4 = float(read_csv(run / "metrics.csv")[-1]["loss"])
    assert f"loss {loss_4:.1f} " in steps[-1]  # the logged value, as metrics.csv has it
    # --live (DVC's live metrics): the step and the latest scores, as metrics.csv and val.csv have them.
    now, val = json.loads(live.read_text()), read_csv(run / "val.csv")
    best = max(val, key=lambda r: float(r["val_ap50"]))
    assert now["step"] == now["steps"] == 4 and now["loss"] == loss_4
    assert now["val_ap50"] == float(val[-1]["val_ap50"]) and now["val_count_error"] == float(val[-1]["val_count_error"])
    assert now["best_val_ap50"] == float(best["val_ap50"]) and now["best_step"] == int(best["step"])


# -------------------------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def resume_runs(store, tmp_path_factory):
    """Run A: 4 steps straight. Run B: stops after step 3 (checkpoint at 2, metrics rows to 3, as a
    killed run leaves them), then resumes to 4."""
    base = tmp_path_factory.mktemp("resume")
    a, b = base / "a", base / "b"
    train(tiny(), str(store), str(a), progress=False)
    train(tiny(), str(store), str(b), progress=False, stop_after=3)
    interrupted = {
        "ckpt_step": torch.load(b / "checkpoints" / "last.pt", weights_only=True)["step"],
        "rows": [int(r["step"]) for r in read_csv(b / "metrics.csv")],
    }
    train(tiny(), str(store), str(b), progress=False)
    return a, b, interrupted


def test_resume_equals_uninterrupted(resume_runs):
    a, b, interrupted = resume_runs
    assert interrupted == {"ckpt_step": 2, "rows": [1, 2, 3]}
    rows_a, rows_b = read_csv(a / "metrics.csv"), read_csv(b / "metrics.csv")
    steps_b = [int(r["step"]) for r in rows_b]
    assert steps_b == [1, 2, 3, 4], "duplicated or missing step rows after resume"
    assert [int(r["step"]) for r in rows_a] == [1, 2, 3, 4]
    for ra, rb in zip(rows_a, rows_b):
        for k in (*TERMS, "mse", "grad_norm"):
            assert float(rb[k]) == pytest.approx(float(ra[k]), rel=RESUME_RTOL, abs=RESUME_ATOL), (ra["step"], k)
    # The runs did learn something different from step to step (the comparison is not vacuous).
    assert len({r["loss"] for r in rows_a}) == 4
    sa = torch.load(a / "checkpoints" / "last.pt", weights_only=True)
    sb = torch.load(b / "checkpoints" / "last.pt", weights_only=True)
    assert sa["step"] == sb["step"] == 4
    for k, v in sa["model"].items():
        assert torch.allclose(v.float(), sb["model"][k].float(), rtol=1e-4, atol=1e-6), k


def test_resume_continues_the_validation_curve(resume_runs):
    a, b, _ = resume_runs
    va, vb = read_csv(a / "val.csv"), read_csv(b / "val.csv")
    assert [r["step"] for r in va] == [r["step"] for r in vb] == ["2", "4"]
    for ra, rb in zip(va, vb):
        assert float(rb["val_mse"]) == pytest.approx(float(ra["val_mse"]), rel=RESUME_RTOL), ra["step"]


def test_a_resumed_runs_wall_time_runs_on(resume_runs):
    """wall_s of the resumed run continues from the kept rows (step 2, then 3 and 4 after the resume):
    restarted from 0, curves against wall time would run backwards."""
    _, b, _ = resume_runs
    for name in ("metrics.csv", "val.csv"):
        walls = [float(r["wall_s"]) for r in read_csv(b / name)]
        assert walls == sorted(walls), (name, walls)
    rows = read_csv(b / "metrics.csv")
    assert float(rows[2]["wall_s"]) > float(rows[1]["wall_s"])  # step 3, the first after the resume


def test_resume_keeps_the_best_checkpoint_of_the_uninterrupted_run(resume_runs):
    a, b, _ = resume_runs
    best_a = torch.load(a / "checkpoints" / "best.pt", weights_only=True)
    best_b = torch.load(b / "checkpoints" / "best.pt", weights_only=True)
    assert best_a["step"] == best_b["step"] and best_a["best"] == best_b["best"]
    count_a = torch.load(a / "checkpoints" / "best_count.pt", weights_only=True)
    count_b = torch.load(b / "checkpoints" / "best_count.pt", weights_only=True)
    assert count_a["step"] == count_b["step"] and count_a["best_count"] == count_b["best_count"]


# --------------------------------------------------------------------------- validation AP, best checkpoint


def test_validation_scores_agree_with_evaluate_and_the_best_checkpoint_is_scored(store, tmp_path, capsys):
    """With validation batches covering the whole val split (20 batches of 2 = its 40 frames), val.csv's
    AP50 and count error at a step are `space evaluate --split val`'s on that step's checkpoint; best.pt is
    the step with the highest validation AP50, best_count.pt the one with the lowest count error, and
    `--checkpoint best|best_count|last|PATH` choose what is scored."""
    run = tmp_path / "run"
    train(tiny("train.val_batches=20"), str(store), str(run), progress=False)
    val = read_csv(run / "val.csv")
    assert [int(r["step"]) for r in val] == [2, 4]
    aps = [float(r["val_ap50"]) for r in val]
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert best["step"] == [2, 4][aps.index(max(aps))]
    counts = [float(r["val_count_error"]) for r in val]
    best_count = torch.load(run / "checkpoints" / "best_count.pt", weights_only=True)
    assert best_count["step"] == [2, 4][counts.index(min(counts))]  # the first of equals
    assert best_count["best_count"] == {"val_count_error": min(counts), "step": best_count["step"]}
    scored = {}
    for which in ("last", "best", "best_count", str(run / "checkpoints" / "best.pt")):
        out = tmp_path / f"eval-{len(scored)}"
        rc = space_main(["evaluate", "--run", str(run), "--data", str(store), "--split", "val", "--out", str(out),
                         "--checkpoint", which, "--quiet", "--device", "cpu"])
        assert rc == 0
        scored[which] = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    last = scored["last"]
    assert last["step"] == 4 and last["checkpoint"] == "last.pt"
    assert last["ap50"] == pytest.approx(aps[1], abs=1e-9)
    assert last["count_error"] == pytest.approx(float(val[1]["val_count_error"]), abs=1e-9)
    assert scored["best"]["step"] == best["step"] and scored["best"]["checkpoint"] == "best.pt"
    assert scored[str(run / "checkpoints" / "best.pt")]["step"] == best["step"]
    assert scored["best_count"]["step"] == best_count["step"] and scored["best_count"]["checkpoint"] == "best_count.pt"
    assert scored["best_count"]["count_error"] == pytest.approx(min(counts), abs=1e-9)
    rc, err = run_main(capsys, "evaluate", "--run", str(run), "--data", str(store), "--checkpoint",
                       str(tmp_path / "nope.pt"), "--quiet", "--device", "cpu")
    assert rc == 2 and "nope.pt: no such file" in err


def test_select_chooses_the_checkpoint_with_the_best_validation_score_and_evaluate_scores_it(store, tmp_path,
                                                                                            capsys):
    """`space select` scores each candidate on the validation split once per distinct step and chooses the
    lowest count error (or highest AP50), the earlier candidate on a tie; val.csv, written by training,
    holds the same scores (validation covers the whole split here). `evaluate --checkpoint selected.json`
    then scores that checkpoint, and refuses the file for another run."""
    run = tmp_path / "run"
    train(tiny("train.val_batches=20"), str(store), str(run), progress=False)
    val = {int(r["step"]): r for r in read_csv(run / "val.csv")}
    steps = {name: int(torch.load(run / "checkpoints" / f"{name}.pt", weights_only=True)["step"])
             for name in ("best", "best_count", "last")}
    names = ["best", "best_count", "last"]
    for by, column, lower in (("count_error", "val_count_error", True), ("ap50", "val_ap50", False)):
        out = tmp_path / f"select-{by}"
        rc = space_main(["select", "--run", str(run), "--data", str(store), "--candidates", *names, "--by", by,
                         "--out", str(out), "--quiet", "--device", "cpu"])
        assert rc == 0
        selection = json.loads((out / "selected.json").read_text())
        assert json.loads(capsys.readouterr().out) == selection
        scores = [float(val[steps[n]][column]) for n in names]
        goal = min(scores) if lower else max(scores)
        expected = names[next(i for i, v in enumerate(scores) if v == pytest.approx(goal, abs=1e-9))]
        assert selection["checkpoint"] == expected and selection["step"] == steps[expected]
        for n in names:
            assert selection["candidates"][n]["step"] == steps[n]
            assert selection["candidates"][n][by] == pytest.approx(float(val[steps[n]][column]), abs=1e-9)
        # three candidates from two validation steps: each step scored once, the others named as its twins
        firsts = {steps[n]: n for n in reversed(names)}
        assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(firsts.values())
        assert selection["same_weights"] == {n: firsts[steps[n]] for n in names if firsts[steps[n]] != n}

    rc = space_main(["evaluate", "--run", str(run), "--data", str(store), "--split", "val", "--out",
                     str(tmp_path / "scored"), "--checkpoint", str(out / "selected.json"), "--quiet", "--device", "cpu"])
    assert rc == 0
    scored = json.loads((tmp_path / "scored" / "metrics.json").read_text())
    assert scored["step"] == selection["step"] and scored["checkpoint"] == f"{selection['checkpoint']}.pt"
    capsys.readouterr()
    other = tmp_path / "other"
    shutil.copytree(run, other)
    rc, err = run_main(capsys, "evaluate", "--run", str(other), "--data", str(store), "--checkpoint",
                       str(out / "selected.json"), "--quiet", "--device", "cpu")
    assert rc == 2 and "chosen among the checkpoints of" in err and "not of --run" in err
    (tmp_path / "bad.json").write_text("{}")
    rc, err = run_main(capsys, "evaluate", "--run", str(run), "--data", str(store), "--checkpoint",
                       str(tmp_path / "bad.json"), "--quiet", "--device", "cpu")
    assert rc == 2 and "not a selection written by `python -m space select`" in err
    rc, err = run_main(capsys, "select", "--run", str(run), "--data", str(store), "--candidates", "last", "last",
                       "--out", str(tmp_path / "twice"), "--quiet", "--device", "cpu")
    assert rc == 2 and "each checkpoint once" in err and not (tmp_path / "twice").exists()


def test_validation_scores_a_small_split_once_over(store):
    """More validation batches than the split holds score each frame once, not some of them twice."""
    from space.data import StoreDataset

    cfg = tiny()
    torch.manual_seed(0)
    model = SPACE(cfg.model)
    val = StoreDataset(str(store), "val", image_size=64)
    once = space_train.validate(model, val, 2, 20, seed=1, device="cpu", step=0)  # 20 x 2 = the 40 frames
    assert space_train.validate(model, val, 2, 30, seed=1, device="cpu", step=0) == once  # not 1.5 times over


def test_validation_in_chunks_scores_what_whole_batches_score(store):
    """Validation runs the training step's chunks of images at a time: the same scores (eval mode computes
    each image alone), at the memory of a chunk."""
    from space.data import StoreDataset

    cfg = tiny()
    torch.manual_seed(0)
    model = SPACE(cfg.model)
    val = StoreDataset(str(store), "val", image_size=64)
    whole = space_train.validate(model, val, 4, 3, seed=1, device="cpu", step=0)
    chunked = space_train.validate(model, val, 4, 3, seed=1, device="cpu", step=0, chunk=3)  # 3 + 1 a batch
    assert chunked.keys() == whole.keys()
    for k in whole:
        assert chunked[k] == pytest.approx(whole[k], rel=1e-5, abs=1e-7), k


def test_a_run_that_never_validated_is_scored_on_its_last_checkpoint(cli_run, store, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny("train.steps=2", "train.val_every=0"), str(store), str(run), progress=False)
    assert not (run / "checkpoints" / "best.pt").exists()
    out = tmp_path / "eval"
    assert space_main(["evaluate", "--run", str(run), "--data", str(store), "--split", "val", "--out", str(out),
                       "--quiet", "--device", "cpu"]) == 0
    assert json.loads((out / "metrics.json").read_text())["checkpoint"] == "last.pt"


# ----------------------------------------------------------------------------------------- divergence


def _nan_model(term: str, from_step: int):
    class NaNFrom(SPACE):
        def forward(self, x, step: int = 0):
            out = super().forward(x, step)
            if step >= from_step:
                out["terms"][term] = out["terms"][term] * float("nan")
            return out

    return NaNFrom


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(store, tmp_path, monkeypatch):
    saved = []
    original = space_train.save_checkpoint

    def recording_save(path, state):
        original(path, state)
        saved.append((state["step"], sha(path)))

    monkeypatch.setattr(space_train, "save_checkpoint", recording_save)
    monkeypatch.setattr(space_train, "SPACE", _nan_model("kl_what", 1))
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"step 1: kl_what") as e:
        train(tiny("train.steps=6", "train.checkpoint_every=1", "train.val_every=0"), str(store), str(run),
              progress=False)
    assert "NaN" in str(e.value)
    assert [s for s, _ in saved] == [1]  # step 0 (0-based) went fine and was saved, step 1 did not
    ckpt = run / "checkpoints" / "last.pt"
    assert sha(ckpt) == saved[-1][1], "the last good checkpoint was overwritten"
    assert torch.load(ckpt, weights_only=True)["step"] == 1
    rows = read_csv(run / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1]
    assert all(math.isfinite(float(r["loss"])) for r in rows)


def test_nan_gradient_stops_the_run(store, tmp_path, monkeypatch):
    class NaNGrad(SPACE):
        def forward(self, x, step: int = 0):
            out = super().forward(x, step)
            # finite value (0), infinite derivative times 0: the loss stays finite, the gradient is NaN
            zero = self.fg.z_pres_net.bias.sum() * 0
            out["terms"]["loss"] = out["terms"]["loss"] + torch.sqrt(zero)
            return out

    monkeypatch.setattr(space_train, "SPACE", NaNGrad)
    with pytest.raises(TrainingDiverged, match="gradient norm"):
        train(tiny("train.val_every=0"), str(store), str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_cli_reports_divergence_with_exit_2(store, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(space_train, "SPACE", _nan_model("log_lik", 0))
    rc, err = run_main(capsys, "train", "--data", str(store), "--out", str(tmp_path / "run"), *tiny_args())
    assert rc == 2
    assert "log_lik" in err and "NaN" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


# ------------------------------------------------------------------------------------------ bad input


def test_store_of_the_wrong_image_size(store, tmp_path, capsys):
    rc, err = run_main(capsys, "train", "--data", str(store), "--out", str(tmp_path / "run"),
                       *tiny_args("model.image_size=128"))
    assert rc == 2
    assert "64x64" in err and "128" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_train_split_smaller_than_a_batch_is_named(store, tmp_path, capsys):
    rc, err = run_main(capsys, "train", "--data", str(store), "--out", str(tmp_path / "run"),
                       *tiny_args("train.batch_size=241"))
    assert rc == 2, err
    for words in ("train split", "240 frames", "241", "lower train.batch_size to at most 240"):
        assert words in err, (words, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("device", ["cuda:0' || touch INJECTED; echo '", "cuda:", "cuda:x", "cuda:0 ", "cuda:0\n",
                                    "CPU", "gpu", "mps:0", ""])
def test_a_device_is_one_of_the_devices_exactly(device, store, tmp_path, capsys):
    with pytest.raises(ConfigError, match="train.device"):
        TrainConfig(device=device).validate()
    rc, err = run_main(capsys, "evaluate", "--run", str(tmp_path / "run"), "--data", str(store), "--device", device)
    assert rc == 2 and "--device" in err and "Traceback" not in err, err


def test_the_devices_there_are_pass():
    for device in ("auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"):
        TrainConfig(device=device).validate()


def test_an_output_that_cannot_be_written_is_refused_before_any_work(store, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    built = []
    monkeypatch.setattr(space_train, "SPACE", lambda *a, **kw: built.append(1) or SPACE(*a, **kw))
    for out in (blocker / "run", blocker):
        rc, err = run_main(capsys, "train", "--data", str(store), "--out", str(out), *tiny_args())
        assert rc == 2, err
        assert "cannot write the run directory" in err and str(out) in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    # --live (DVC's live metrics) is checked as early: a directory, or a path under a file, is refused.
    for live in (tmp_path, blocker / "live.json"):
        rc, err = run_main(capsys, "train", "--data", str(store), "--out", str(tmp_path / "run"), *tiny_args(),
                           "--live", str(live))
        assert rc == 2 and "--live" in err and str(live) in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    assert not built, "a model was built for an output that cannot be written"
    assert blocker.read_text() == "keep me"


def test_path_that_is_not_a_store(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, err = run_main(capsys, "train", "--data", str(empty), "--out", str(tmp_path / "run"), *tiny_args())
    assert rc == 2
    assert str(empty) in err and "not a" in err
    rc, err = run_main(capsys, "train", "--data", str(tmp_path / "missing.zarr"), "--out", str(tmp_path / "run"),
                       *tiny_args())
    assert rc == 2
    assert "does not exist" in err


def test_checkpoint_from_another_config(cli_run, store, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(cli_run, run)
    before = {p: sha(run / p) for p in ("config.json", "checkpoints/last.pt", "metrics.csv")}
    rc, err = run_main(capsys, "train", "--data", str(store), "--out", str(run), *tiny_args("model.grid_size=8"))
    assert rc == 2
    assert "grid_size" in err and "4 -> 8" in err
    assert "Traceback" not in err
    # Refused before touching anything: the run directory still describes the run it holds.
    assert {p: sha(run / p) for p in before} == before


@pytest.mark.parametrize("argv,words", [
    (["--set", "model.grid_sise=4"], ["grid_sise", "unknown"]),
    (["--set", "train.nope=1"], ["nope", "unknown"]),
    (["--set", "grid_size=4"], ["--set takes", "grid_size=4"]),
    (["--set", "optim.lr=1"], ["--set takes"]),
    (["--preset", "nope"], ["unknown preset", "nope", "room3d_large"]),
    (["--set", "model.grid_size=3"], ["model.grid_size"]),
    (["--set", "train.batch_size=0"], ["train.batch_size"]),
])
def test_bad_settings_are_named(store, tmp_path, capsys, argv, words):
    rc, err = run_main(capsys, "train", "--data", str(store), "--out", str(tmp_path / "run"), *tiny_args(), *argv)
    assert rc == 2
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text,words", [
    ("model: {grid_size: [4\n", ["is not valid YAML"]),
    ("- 1\n- 2\n", ["holds a list", "not a mapping of sections"]),
    ("train: 5\n", ["section train:", "holds 5"]),  # was silently the preset's train settings
    ("model: [4, 8]\n", ["section model:"]),
    (None, ["cannot read it", "No such file"]),
])
def test_a_bad_config_file_is_named(store, tmp_path, capsys, text, words):
    config = tmp_path / "c.yaml"
    if text is not None:
        config.write_text(text)
    rc, err = run_main(capsys, "train", "--data", str(store), "--out", str(tmp_path / "run"), *tiny_args(),
                       "--config", str(config))
    assert one_line_error(rc, err) and f"--config {config}" in err, (rc, err)
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "run").exists()


def test_a_config_file_with_empty_sections_is_the_preset(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model:\ntrain: {}\n")
    assert resolve_config("demo", str(config), []) == resolve_config("demo", None, [])


def test_a_set_value_that_is_not_yaml_is_named(store, tmp_path, capsys):
    rc, err = run_main(capsys, "train", "--data", str(store), "--out", str(tmp_path / "run"), *tiny_args(),
                       "--set", "model.grid_size=[4")
    assert one_line_error(rc, err) and "--set model.grid_size=[4: the value is not valid YAML" in err, (rc, err)
    assert not (tmp_path / "run").exists()


def test_cli_subprocess_exit_code_for_unknown_preset(store, tmp_path):
    r = subprocess.run([sys.executable, "-m", "space", "train", "--data", str(store), "--out", str(tmp_path / "r"),
                        "--preset", "nope"], capture_output=True, text=True, timeout=300, cwd=REPO, env=ENV)
    assert r.returncode == 2
    assert "unknown preset 'nope'" in r.stderr
    assert "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------ run identity


def snapshot(run: Path) -> dict:
    """Every file of a run directory (its lock file aside) and its hash."""
    return {p.relative_to(run).as_posix(): sha(p) for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture()
def finished(cli_run, tmp_path) -> Path:
    """A copy of the CLI run, trained to its end (step 2), to change."""
    run = tmp_path / "run"
    shutil.copytree(cli_run, run)
    return run


@pytest.fixture(scope="module")
def other_store(tmp_path_factory) -> Path:
    """Another store: other objects (and fewer frames, to be quick)."""
    return make_store(tmp_path_factory.mktemp("other_store") / "room.zarr", (3, 6), train=8, val=4)


def train_cli(capsys, store, run, *extra) -> tuple[int, str]:
    """`python -m space train` as the CLI run was made (to step 2), with `extra` arguments after."""
    return run_main(capsys, "train", "--data", str(store), "--out", str(run), *tiny_args(), "--steps", "2", *extra)


def one_line_error(rc: int, err: str) -> bool:
    return rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err


def test_a_run_with_other_settings_is_refused_and_restart_starts_it_afresh(finished, store, capsys):
    before, rows_before = snapshot(finished), read_csv(finished / "metrics.csv")
    rc, err = train_cli(capsys, store, finished, "--set", "train.fg_lr=0.0008")
    assert one_line_error(rc, err), (rc, err)
    assert "train.fg_lr 0.0004 -> 0.0008" in err and "--restart" in err
    assert snapshot(finished) == before, "a refused run changed the run directory (config.json included)"

    rc, err = train_cli(capsys, store, finished, "--set", "train.fg_lr=0.0008", "--restart", "--steps", "1")
    assert rc == 0, err
    state = torch.load(finished / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 1 and state["config"]["train"]["fg_lr"] == 0.0008
    assert json.loads((finished / "config.json").read_text()) == state["config"]
    assert json.loads((finished / "run.json").read_text()) == state["record"]
    # Afresh from step 0 (the same initial weights and first loss), with the new learning rate.
    rows = read_csv(finished / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1]
    assert rows[0]["loss"] == rows_before[0]["loss"] and float(rows[0]["fg_lr"]) == 0.0008
    old_events = {p for p in before if p.startswith("tb/")}
    assert old_events and not old_events & set(snapshot(finished)), "the old run's TensorBoard events are left"

    # --restart on a run with the same record resumes it (here: nothing left to do).
    after = snapshot(finished)
    rc, err = train_cli(capsys, store, finished, "--set", "train.fg_lr=0.0008", "--restart", "--steps", "1")
    assert rc == 0 and snapshot(finished) == after


def test_a_run_on_another_store_is_refused_but_the_same_store_elsewhere_resumes(finished, store, other_store,
                                                                                 tmp_path, capsys):
    before, rows_before = snapshot(finished), read_csv(finished / "metrics.csv")
    rc, err = train_cli(capsys, other_store, finished, "--steps", "3")
    assert one_line_error(rc, err), (rc, err)
    assert "store params.objects [4, 8] -> [3, 6]" in err and "--restart" in err
    assert snapshot(finished) == before
    # The store's path is not its identity: a copy of it continues the run.
    moved = tmp_path / "moved.zarr"
    shutil.copytree(store, moved)
    rc, err = train_cli(capsys, moved, finished, "--steps", "3")
    assert rc == 0, err
    rows = read_csv(finished / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3] and rows[:2] == rows_before
    assert json.loads((finished / "run.json").read_text())["store"]["path"] == str(moved)


def test_a_store_with_the_same_parameters_but_other_frames_is_another_store(finished, store, tmp_path, capsys):
    """A store remade by changed generator code (or edited in place) has the same identity attribute but
    other bytes: the record's content digest tells them apart, so the run is not resumed on it."""
    import zarr

    changed = tmp_path / "changed.zarr"
    shutil.copytree(store, changed)
    images = zarr.open_group(str(changed), mode="r+")["train"]["images"]
    images[0] = 255 - images[0]  # one frame inverted; every attribute unchanged
    before = snapshot(finished)
    rc, err = train_cli(capsys, changed, finished, "--steps", "3")
    assert one_line_error(rc, err), (rc, err)
    assert "store content" in err and "--restart" in err and "params" not in err
    assert snapshot(finished) == before


def test_more_steps_extend_a_run_and_fewer_than_its_checkpoint_are_refused(finished, store, capsys):
    before, rows_before = snapshot(finished), read_csv(finished / "metrics.csv")
    rc, err = train_cli(capsys, store, finished, "--steps", "1")
    assert one_line_error(rc, err), (rc, err)
    assert "train.steps 1 is below the checkpoint's step 2" in err and "--restart" in err
    assert snapshot(finished) == before
    # Settings that change how fast it goes or what is logged, not what is learned, keep it the same run.
    rc, err = train_cli(capsys, store, finished, "--steps", "3", "--set", "train.checkpoint_every=1",
                        "--set", "train.threads=1", "--set", "train.channels_last=false", "--set", "train.val_every=3",
                        "--set", "train.image_every=3")
    assert rc == 0, err
    rows = read_csv(finished / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3] and rows[:2] == rows_before
    assert json.loads((finished / "config.json").read_text())["train"]["threads"] == 1


def test_a_checkpoint_without_a_record_is_not_resumed(finished, store, capsys):
    """Written before runs recorded their store: which store it was trained on is unknown."""
    state = torch.load(finished / "checkpoints" / "last.pt", weights_only=True)
    state.pop("record", None)
    torch.save(state, finished / "checkpoints" / "last.pt")
    (finished / "run.json").unlink(missing_ok=True)
    rc, err = train_cli(capsys, store, finished, "--steps", "3")
    assert one_line_error(rc, err), (rc, err)
    assert "store not recorded" in err and "--restart" in err


def test_train_help_names_restart(capsys):
    with pytest.raises(SystemExit) as e:
        space_main(["train", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--restart" in out and "start afresh" in out and "same record still resumes" in out


def test_one_trainer_at_a_time_and_a_killed_ones_lock_is_taken_over(store, tmp_path):
    run = tmp_path / "run"
    args = ["--data", str(store), "--out", str(run), *tiny_args("train.checkpoint_every=1"), "--steps", "100000"]
    with open(tmp_path / "first.err", "w") as err:
        first = subprocess.Popen([sys.executable, "-m", "space", "train", *args], stderr=err, cwd=REPO, env=ENV)
    lock = run / ".lock"
    try:
        deadline = time.monotonic() + 300
        # The first trainer holds the run (or, without a lock, is at work already).
        while not ((lock.exists() and lock.read_text().strip()) or (run / "checkpoints" / "last.pt").exists()):
            assert first.poll() is None, (tmp_path / "first.err").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        cfg = tiny("train.checkpoint_every=1", "train.steps=100000")
        with pytest.raises(Exception, match=f"trained by another process \\(pid {first.pid}\\)") as e:
            train(cfg, str(store), str(run), progress=False, stop_after=1)
        assert type(e.value).__name__ == "RunError"  # the CLI's one-line error, exit 2
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # Killed: its lock went with it, and the next trainer resumes from its last checkpoint (if it wrote one).
    ckpt = run / "checkpoints" / "last.pt"
    step = torch.load(ckpt, weights_only=True)["step"] if ckpt.exists() else 0
    assert train(cfg, str(store), str(run), progress=False, stop_after=step + 1)["step"] == step + 1
    assert [int(r["step"]) for r in read_csv(run / "metrics.csv")] == list(range(1, step + 2))  # one row a step
    assert (run / ".lock").read_text().split() == [str(os.getpid())]


# ------------------------------------------------------------------------------ blow-ups, broken checkpoints


def test_a_blow_up_stops_naming_the_parameters_and_terms_and_saves_nothing(store, tmp_path, capsys):
    run = tmp_path / "run"
    rc, err = train_cli(capsys, store, run, "--set", "train.fg_lr=1e38", "--set", "train.checkpoint_every=1",
                        "--steps", "5")
    assert one_line_error(rc, err), (rc, err)
    assert "step 0: the foreground parameters became NaN or infinite" in err, err
    assert "fg.encoder.net.0.0.weight" in err and "train.fg_lr (now 1e+38)" in err
    assert "kl_what" in err and "boundary_loss" in err  # the loss terms at that step
    assert not (run / "checkpoints").exists()  # nothing that a resume would crash on


def test_a_learning_rate_that_overflows_the_optimiser_is_named(store, tmp_path, capsys):
    """Adam's step size lr / (1 - beta1) = 1e39 does not fit float32: torch raises 'value cannot be
    converted to type float without overflow' inside the optimiser step."""
    run = tmp_path / "run"
    rc, err = train_cli(capsys, store, run, "--set", "train.bg_lr=1e38", "--set", "train.checkpoint_every=1")
    assert one_line_error(rc, err), (rc, err)
    assert "step 0: the background optimiser's step overflowed" in err and "Lower train.bg_lr" in err, err
    assert not (run / "checkpoints").exists()


def test_an_rmsprop_learning_rate_beyond_float32_is_named():
    from space.train import optimiser_step

    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.ones(3)
    with pytest.raises(TrainingDiverged, match=r"step 7: the foreground optimiser's step overflowed float32 with "
                                               r"train\.fg_lr 1e\+39 .* Lower train\.fg_lr"):
        optimiser_step(torch.optim.RMSprop([w], lr=1e39), 7, "foreground", "train.fg_lr", 1e39)
    optimiser_step(torch.optim.RMSprop([w], lr=1e-3), 8, "foreground", "train.fg_lr", 1e-3)  # a usual rate steps


def test_the_parameter_watch_names_nan_and_infinity_but_not_large_weights():
    from space.train import ParameterWatch

    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    watch = ParameterWatch(net, {"foreground": (list(net[0].parameters()), "train.fg_lr"),
                                 "background": (list(net[1].parameters()), "train.bg_lr")})
    lrs, terms = {"train.fg_lr": 0.1, "train.bg_lr": 0.2}, {"loss": torch.tensor(3.0)}
    with torch.no_grad():
        net[1].weight.fill_(3e19)  # finite; the sum of its squares overflows float32
        watch.check(7, terms, lrs)
        net[1].bias.fill_(float("-inf"))
        with pytest.raises(TrainingDiverged, match=r"step 7: the background parameters .* \(1\.bias\); "
                                                   r"loss terms at that step: loss 3; .* train\.bg_lr \(now 0\.2\)"):
            watch.check(7, terms, lrs)


def test_a_checkpoint_is_never_written_with_nan(cli_run, tmp_path):
    state = torch.load(cli_run / "checkpoints" / "last.pt", weights_only=True)
    state["opt_bg"]["state"][0]["exp_avg"] = state["opt_bg"]["state"][0]["exp_avg"] * float("inf")
    with pytest.raises(TrainingDiverged, match="opt_bg holds NaN or infinite values"):
        checkpoints.save_checkpoint(tmp_path / "last.pt", state)
    assert list(tmp_path.iterdir()) == []


BROKEN_WEIGHT = "fg.encoder.net.0.0.weight"


def break_checkpoint(source: Path, target: Path, kind: str) -> None:
    state = torch.load(source, weights_only=True)
    if kind == "list":
        state = [state["step"], state["model"]]
    elif kind == "no config":
        del state["config"]
    elif kind == "missing weight":
        del state["model"][BROKEN_WEIGHT]
    elif kind == "weight shape":
        state["model"][BROKEN_WEIGHT] = state["model"][BROKEN_WEIGHT][:1]
    else:  # "nan": as a run that diverged before the checks left it; "huge": finite weights that overflow
        state["model"][BROKEN_WEIGHT] = state["model"][BROKEN_WEIGHT] * (float("nan") if kind == "nan" else 1e30)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, target)


@pytest.mark.parametrize("kind,words", [("list", ["holds a list", "format, step, config, model"]),
                                        ("no config", ["lacks config"]),
                                        ("nan", ["NaN or infinite weights", BROKEN_WEIGHT]),
                                        # load_state_dict's many-line RuntimeError, named in one line
                                        ("missing weight", ["do not fit", f"missing: {BROKEN_WEIGHT}"]),
                                        ("weight shape", ["do not fit", f"{BROKEN_WEIGHT} is (1, "])])
@pytest.mark.parametrize("command", ["evaluate", "show", "sample", "train"])
def test_a_broken_checkpoint_is_named_by_every_command(finished, store, tmp_path, capsys, kind, words, command):
    for name in ("last.pt", "best.pt"):  # evaluate, show and sample score best.pt when the run has one
        if (finished / "checkpoints" / name).exists():
            break_checkpoint(finished / "checkpoints" / name, finished / "checkpoints" / name, kind)
    png = tmp_path / "x.png"
    argv = {"evaluate": ["--data", str(store), "--split", "val", "--out", str(tmp_path / "eval"), "--quiet",
                         "--device", "cpu"],
            "show": ["--data", str(store), "--split", "val", "--out", str(png)],
            "sample": ["--out", str(png)]}
    if command == "train":
        rc, err = train_cli(capsys, store, finished, "--steps", "3")
    else:
        rc, err = run_main(capsys, command, "--run", str(finished), *argv[command])
    assert one_line_error(rc, err), (rc, err)
    for w in words:
        assert w in err, (w, err)
    assert not png.exists() and not (tmp_path / "eval").exists()
    if command == "train":
        assert "--restart" in err
        if kind == "list":  # unusable: --restart replaces it
            rc, err = train_cli(capsys, store, finished, "--steps", "1", "--restart")
            assert rc == 0, err
            assert torch.load(finished / "checkpoints" / "last.pt", weights_only=True)["step"] == 1


@pytest.mark.parametrize("kind,words", [("state shape", ["opt_fg optimiser state does not fit", "is (1,)"]),
                                        ("group size", ["opt_bg optimiser state does not fit", "parameter groups"])])
def test_an_optimiser_state_that_does_not_fit_is_named_before_resuming(finished, store, capsys, kind, words):
    """torch's load_state_dict would take a state of other shapes and fail inside the first step."""
    path = finished / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    if kind == "state shape":
        first = next(iter(state["opt_fg"]["state"]))
        state["opt_fg"]["state"][first]["square_avg"] = torch.zeros(1)
    else:
        state["opt_bg"]["param_groups"][0]["params"] = state["opt_bg"]["param_groups"][0]["params"][:3]
    torch.save(state, path)
    rc, err = train_cli(capsys, store, finished, "--steps", "3")
    assert one_line_error(rc, err), (rc, err)
    assert "cannot be resumed" in err and "--restart" in err and all(w in err for w in words), err


def test_outputs_are_checked_before_the_work_and_their_folders_made(finished, store, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    run = tmp_path / "new_run"
    # --summary under a file: refused before training (the run directory is not even made), not after it
    rc, err = run_main(capsys, "train", "--data", str(store), "--out", str(run), *tiny_args(),
                       "--summary", str(blocker / "s.json"))
    assert one_line_error(rc, err) and "--summary" in err and f"{blocker} is a file" in err, (rc, err)
    assert not run.exists()
    show = ["show", "--run", str(finished), "--data", str(store), "--split", "val", "--count", "2"]
    sample = ["sample", "--run", str(finished), "--count", "2"]
    for argv, out, words in ((show, blocker / "x.png", [f"{blocker} is a file"]),
                             (sample, blocker / "x.png", [f"{blocker} is a file"]),
                             (sample, tmp_path / "x.txt", ["ending in .png"]),
                             (show, tmp_path / "x", ["ending in .png"]),
                             (show[:-1] + ["0"], tmp_path / "y.png", ["--count"]),
                             (sample + ["--seed", str(2**64)], tmp_path / "z.png", ["--seed"])):
        rc, err = run_main(capsys, *argv, "--out", str(out))
        assert one_line_error(rc, err), (argv, rc, err)
        for w in words:
            assert w in err, (w, err)
        assert not out.exists()
    assert blocker.read_text() == "keep me"
    # missing folders are made
    summary = tmp_path / "a" / "b" / "s.json"
    rc, err = train_cli(capsys, store, finished, "--summary", str(summary))
    assert rc == 0, err
    # the run had ended: the summary is what it ended with, metrics.csv's last row (as when it trained)
    with open(finished / "metrics.csv", newline="") as fh:
        ended = list(csv.DictReader(fh))[-1]
    written = json.loads(summary.read_text())
    assert written["step"] == 2 and written["loss"] == float(ended["loss"]) and written["wall_s"] > 0
    for argv, out in ((show, tmp_path / "c" / "show.png"), (sample, tmp_path / "d" / "e" / "sample.png")):
        rc, err = run_main(capsys, *argv, "--out", str(out))
        assert rc == 0 and out.is_file(), err


@pytest.mark.parametrize("kind", ["nan", "huge"])
def test_resuming_a_diverged_checkpoint_is_a_clear_error(finished, store, capsys, kind):
    break_checkpoint(finished / "checkpoints" / "last.pt", finished / "checkpoints" / "last.pt", kind)
    rc, err = train_cli(capsys, store, finished, "--steps", "3")
    assert one_line_error(rc, err), (rc, err)
    if kind == "nan":  # refused before the first step
        assert BROKEN_WEIGHT in err and "NaN or infinite weights" in err and "(step 2)" in err
    else:  # finite weights whose forward pass overflows into a NaN
        assert "step 2: the forward pass met a NaN" in err


# -------------------------------------------------------------------------------------------- learning


# The CPU demo exactly as `snakemake --cores 2 train_all --configfile config/demo.yaml` runs it: the demo
# dataset's scene settings, seed and sizes (config/demo.yaml over params.yaml) and the demo preset with
# 2 threads, so this reproduces the README's demo run (about 10 minutes on 2 cores).
DEMO_STORE = ["--objects", "3", "6", "--image-size", "64", "--room-half-size", "2.0", "--size-min", "0.25",
              "--size-max", "0.4", "--camera-distance", "4.5", "5.5", "--seed", "1",
              "--split", "train=2048", "--split", "val=256", "--split", "test=256"]


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory):
    """The demo preset trained to its end on the demo's store; only the slow tests use it."""
    store = tmp_path_factory.mktemp("learn_store") / "room.zarr"
    r = subprocess.run([sys.executable, "-m", "datagen", "room3d", str(store), *DEMO_STORE, "--workers", "2",
                        "--quiet"], capture_output=True, text=True, timeout=600, cwd=REPO, env=ENV)
    assert r.returncode == 0, r.stderr
    # Logging every step (for the loss test's first steps) draws no random numbers: the run is unchanged.
    cfg = resolve_config("demo", None, ["train.threads=2", "train.device=cpu", "train.log_every=1"])
    run = tmp_path_factory.mktemp("learn") / "run"
    train(cfg, str(store), str(run), progress=False)
    return cfg, run, store


@pytest.mark.slow
def test_the_demo_lowers_the_loss(learned_run):
    cfg, run, _ = learned_run
    rows = read_csv(run / "metrics.csv")
    assert len(rows) == cfg.train.steps
    first, last = rows[:10], rows[-10:]
    loss0, loss1 = (np.mean([float(r["loss"]) for r in rs]) for rs in (first, last))
    mse0, mse1 = (np.mean([float(r["mse"]) for r in rs]) for rs in (first, last))
    # loss is -ELBO in nats per image (64*64*3 values): a clear fall is thousands of nats.
    assert loss1 < loss0 - 2000, (loss0, loss1)
    assert mse1 < 0.6 * mse0, (mse0, mse1)


@pytest.mark.slow
def test_the_demo_switches_z_pres_on_at_objects(learned_run):
    """In eval mode, z_pres probability is higher in cells holding a ground-truth box centre than elsewhere."""
    cfg, run, store = learned_run
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    model = SPACE(cfg.model)
    model.load_state_dict(state["model"])
    model.eval()
    from datagen.store import Store

    st = Store(store)
    n = st.splits["val"]
    images = torch.from_numpy(st.read("val", "images", slice(0, n))).permute(0, 3, 1, 2).float() / 255
    boxes = st.read("val", "boxes", slice(0, n))  # (N, K, 4) x_min, y_min, x_max, y_max in pixels, NaN-padded
    g, size = cfg.model.grid_size, cfg.model.image_size
    with torch.no_grad():
        prob = model(images, cfg.train.steps)["fg"]["z_pres_prob"].numpy()  # (N, G, G): rows y, columns x
    has = np.zeros_like(prob, dtype=bool)
    for i in range(n):
        for x0, y0, x1, y1 in boxes[i][~np.isnan(boxes[i][:, 0])]:
            col = min(int((x0 + x1) / 2 / size * g), g - 1)
            row = min(int((y0 + y1) / 2 / size * g), g - 1)
            has[i, row, col] = True
    assert has.any() and (~has).any()
    with_obj, without = float(prob[has].mean()), float(prob[~has].mean())
    assert with_obj > without + 0.1, (with_obj, without)


def test_checkpoint_images_auto_stores_far_fewer_activations_on_cpu_and_all_of_them_on_cuda():
    """The default (-1) resolved for each device and applied as training applies it: on CPU the forward
    pass keeps under 40% of the bytes for the backward pass that it keeps with checkpointing off (counted by
    autograd's saved-tensor hooks); on CUDA it is off, every activation kept."""
    from space.config import TrainConfig, preset
    from space.devices import checkpoint_images

    def saved_bytes(images: int) -> int:
        torch.manual_seed(0)
        model = SPACE(preset("demo").model)
        model.set_checkpoint_images(images)
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        x = torch.rand(8, 3, 64, 64)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(x)["terms"]["loss"]
        loss.backward()  # the recomputation in here is not counted: only what the forward pass kept
        return total

    auto = TrainConfig().checkpoint_images
    assert auto == -1
    off = saved_bytes(0)
    assert saved_bytes(checkpoint_images(auto, torch.device("cpu"))) < 0.4 * off  # measured: 0.17
    assert checkpoint_images(auto, torch.device("cuda")) == 0  # = `off` above
    assert checkpoint_images(2, torch.device("cuda")) == 2  # a number is taken as given


LEAN_PROBE = """
import sys
from space.memory import set_host_allocator
assert set_host_allocator("lean", 1) == "lean"
import torch
x = torch.ones(64 << 18)  # 64 MiB, allocated by PyTorch after the switch
x += 1
huge = sum(int(l.split()[1]) for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages"))
print(huge)
"""


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="Linux only")
def test_lean_host_allocator_backs_tensors_with_huge_pages():
    """train.host_allocator=lean: glibc takes the threshold, and PyTorch's large allocations come in huge
    pages when the kernel offers them (transparent_hugepage madvise or always)."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    # Whether the kernel has free 2 MiB blocks to offer depends on what else the machine is doing (CI runs
    # tests side by side): one fresh process got 20 of the 64 MiB in huge pages there. Up to three tries,
    # the best counting.
    huge = []
    for _ in range(3):
        p = subprocess.run([sys.executable, "-c", LEAN_PROBE], capture_output=True, text=True, timeout=120,
                           env={k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"})
        assert p.returncode == 0, p.stderr
        huge.append(int(p.stdout.split()[-1]))
        if huge[-1] >= 32 * 1024:
            break
    if thp.exists() and "[never]" not in thp.read_text():
        assert max(huge) >= 32 * 1024, huge  # kB: most of the 64 MiB tensor


# The kernel's count of minor page faults while a 60 MiB tensor is written after a 64 MiB one was freed:
# 15,360 (one per 4 KiB page) when the freed block went back to the system, about none when it is reused.
REUSE_PROBE = """
import resource, sys
from space.memory import set_host_allocator
set_host_allocator(sys.argv[1])
import torch
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(64 << 18)  # 64 MiB, above glibc's largest dynamic mmap threshold (32 MiB)
pin = torch.ones(1 << 18)  # 1 MiB after it, so that the freed block is not the heap's top, which glibc trims
del x
before = faults()
y = torch.ones(60 << 18)  # 60 MiB: fits in the freed block with room for the alignment PyTorch asks for
print(faults() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_heap_host_allocator_reuses_freed_blocks_without_page_faults():
    """train.host_allocator=heap keeps a freed block for the next allocation; glibc's own hands a 64 MiB
    block back to the system, so writing the next one faults every page in again."""
    env = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "GLIBC_TUNABLES")}
    run = lambda mode: subprocess.run([sys.executable, "-c", REUSE_PROBE, mode], capture_output=True,  # noqa: E731
                                      text=True, timeout=120, env=env)
    heap, glibc = run("heap"), run("glibc")
    assert heap.returncode == 0 and glibc.returncode == 0, heap.stderr + glibc.stderr
    assert int(glibc.stdout.split()[-1]) > 8_000  # pages faulted in afresh
    assert int(heap.stdout.split()[-1]) < 1_000


def test_host_allocator_setting_is_checked():
    from space.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="train.host_allocator: one of auto, tcmalloc, heap, lean, glibc"):
        TrainConfig(host_allocator="jemalloc").validate()


# What the process that `exec_with_tcmalloc` leaves running sees: tcmalloc mapped, LD_PRELOAD as it was
# (so that the processes it starts are not preloaded), and the page faults of REUSE_PROBE's reuse.
TCMALLOC_PROBE = """
import os, resource, sys
from space.memory import PRELOAD_MARK, exec_with_tcmalloc, set_host_allocator, tcmalloc_loaded
exec_with_tcmalloc(sys.argv[1])
print("in effect", set_host_allocator(sys.argv[1]), "pid", os.getpid())
print("LD_PRELOAD", repr(os.environ.get("LD_PRELOAD")), "mark", PRELOAD_MARK in os.environ)
import torch
x = torch.ones(64 << 18)
pin = torch.ones(1 << 18)
del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
y = torch.ones(60 << 18)
print("faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD and /proc are Linux's")
def test_tcmalloc_is_preloaded_by_running_the_command_again():
    """train.host_allocator=tcmalloc (and auto, where it is installed): the command runs itself again with
    tcmalloc preloaded, in the same process, with LD_PRELOAD put back; tcmalloc then reuses a freed 64 MiB
    block without faulting its pages in again."""
    from space.memory import find_tcmalloc

    if find_tcmalloc() is None:
        pytest.skip("tcmalloc is not installed (apt install libtcmalloc-minimal4)")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "THP_MEM_ALLOC_ENABLE")}

    def probe(mode, preload=None):
        p = subprocess.Popen([sys.executable, "-c", TCMALLOC_PROBE, mode], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**env, **({"LD_PRELOAD": preload} if preload else {})})
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        return p.pid, out

    for mode in ("tcmalloc", "auto"):
        pid, out = probe(mode)
        assert f"in effect tcmalloc pid {pid}" in out, out  # the same process, run again
        assert "LD_PRELOAD None mark False" in out, out
        assert int(out.split("faults")[-1]) < 1_000, out
    # A library the user preloads stays, after tcmalloc, and is what the processes started see again;
    # "auto" leaves such a process alone (another allocator or a sanitizer may be what is preloaded).
    pid, out = probe("tcmalloc", "libm.so.6")
    assert f"in effect tcmalloc pid {pid}" in out and "LD_PRELOAD 'libm.so.6' mark False" in out, out
    pid, out = probe("auto", "libm.so.6")
    assert f"in effect heap pid {pid}" in out and "LD_PRELOAD 'libm.so.6' mark False" in out, out


def test_training_called_from_python_is_not_run_again(monkeypatch, tmp_path, capsys):
    """Only `python -m space train` from the shell runs itself again with tcmalloc: main() given its
    arguments by a caller (a test, a notebook) never does, whatever the setting."""
    import space.memory as memory
    from space.__main__ import main

    monkeypatch.setattr(memory.os, "execve", lambda *a: pytest.fail("ran the command again"))
    monkeypatch.setattr(memory, "tcmalloc_loaded", lambda: False)
    with pytest.warns(UserWarning, match="tcmalloc is not loaded in this process"):  # and it takes heap
        code = main(["train", "--data", str(tmp_path / "missing.zarr"), "--out", str(tmp_path / "run"),
                     "--set", "train.host_allocator=tcmalloc"])
    assert code == 2 and "missing.zarr" in capsys.readouterr().err  # refused for the store, not run again


def test_tcmalloc_where_it_is_not_installed(monkeypatch):
    """Without the library, "auto" stays in the process (and takes heap); "tcmalloc" is refused before
    anything is done, with the packages that install it and the setting that does without."""
    import space.memory as memory
    from space.config import ConfigError

    monkeypatch.setattr(memory, "find_tcmalloc", lambda: None)
    monkeypatch.setattr(memory, "tcmalloc_loaded", lambda: False)
    monkeypatch.delenv(memory.PRELOAD_MARK, raising=False)
    monkeypatch.setattr(memory.os, "execve", lambda *a: pytest.fail("ran the command again"))
    memory.exec_with_tcmalloc("auto")
    memory.exec_with_tcmalloc("heap")
    with pytest.raises(ConfigError, match="apt install libtcmalloc-minimal4.*gperftools.*host_allocator=auto"):
        memory.exec_with_tcmalloc("tcmalloc")


def test_tcmalloc_on_a_path_ld_preload_cannot_carry(monkeypatch):
    """A library path with a space or colon would be split by LD_PRELOAD: "tcmalloc" is refused with the
    reason and the way out, "auto" stays in the process."""
    import space.memory as memory
    from space.config import ConfigError

    monkeypatch.setattr(memory, "find_tcmalloc", lambda: "/opt/my libs/libtcmalloc_minimal.so.4")
    monkeypatch.setattr(memory, "tcmalloc_loaded", lambda: False)
    monkeypatch.setattr(memory.sys, "platform", "linux")
    for name in (memory.PRELOAD_MARK, "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(memory.os, "execve", lambda *a: pytest.fail("ran the command again"))
    memory.exec_with_tcmalloc("auto")
    with pytest.raises(ConfigError, match="'/opt/my libs/libtcmalloc_minimal.so.4' has a space or a colon.*"
                                          "host_allocator=auto"):
        memory.exec_with_tcmalloc("tcmalloc")


HEAP_FALLBACK_PROBE = """
import warnings
import space.memory as memory
memory.tcmalloc_loaded = lambda: False
print(memory.set_host_allocator("auto"))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    print(memory.set_host_allocator("tcmalloc"), caught[0].message if caught else "no warning")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_tcmalloc_not_loaded_falls_back_to_heap():
    """Training started from Python (not preloaded): "auto" takes heap quietly, "tcmalloc" says so."""
    p = subprocess.run([sys.executable, "-c", HEAP_FALLBACK_PROBE], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    auto, asked = p.stdout.splitlines()
    assert auto == "heap"
    assert asked.startswith("heap train.host_allocator=tcmalloc: tcmalloc is not loaded")


def test_concurrent_runs_claim_different_gpus(tmp_path):
    """profiles/gpu runs several training jobs at once: each claims a device no other holds (lock files,
    released when the holder ends); with every device held the next shares device 0."""
    from space.devices import _CLAIMED, claim_free_gpu

    held = len(_CLAIMED)
    try:
        assert [claim_free_gpu(2, str(tmp_path)) for _ in range(3)] == [0, 1, 0]
        _CLAIMED.pop(held).close()  # the run on device 0 ends
        assert claim_free_gpu(2, str(tmp_path)) == 0
    finally:
        while len(_CLAIMED) > held:
            _CLAIMED.pop().close()


# ------------------------------------------------------------------------------- background split check


def test_background_split_verdict_reads_the_largest_components_share():
    from space.train import background_split

    t = tiny("train.bg_split_step=100", "train.bg_split_share=0.9")
    assert background_split({"val_bg_share": 0.99}, 99, t) is None  # not yet judged
    failed = background_split({"val_bg_share": 0.95}, 100, t)
    assert failed["split"] is False and failed["largest_share"] == 0.95 and "train.seed" in failed["advice"]
    ok = background_split({"val_bg_share": 0.6}, 200, t)
    assert ok == {"step": 200, "largest_share": 0.6, "split": True}
    assert background_split({"val_bg_share": 0.99}, 10**6, tiny("train.bg_split_step=0")) is None
    assert background_split({"val_bg_share": 1.0}, 200, tiny("train.bg_split_step=100", "model.n_components=1")) is None


def test_validation_shares_are_the_mixing_weights_and_a_failed_split_reaches_the_log_and_summary(store, tmp_path,
                                                                                                   capsys):
    """val.csv's bg share is the largest component's mean mixing weight (K weights summing to 1 per pixel,
    so it lies in [1/K, 1]); with a threshold every run trips, the log and train.json say the background
    has not split and what to do."""
    run = tmp_path / "run"
    summary = tmp_path / "train.json"
    rc = space_main(["train", *tiny_args("train.bg_split_step=1", "train.bg_split_share=0.01"), "--data",
                     str(store), "--out", str(run), "--summary", str(summary), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0
    val = read_csv(run / "val.csv")
    k = tiny().model.n_components
    for r in val:
        assert 1 / k - 1e-6 <= float(r["val_bg_share"]) <= 1 + 1e-6
        assert 0 <= float(r["val_fg_share"]) <= 1
    assert "the background has not split" in err and err.count("has not split") == 1  # said once, not per check
    verdict = json.loads(summary.read_text())["background_split"]
    assert verdict["split"] is False and verdict["step"] == int(val[-1]["step"])


def test_the_foreground_learning_rate_warms_up_linearly_then_holds():
    from space.config import ConfigError, TrainConfig
    from space.train import learning_rates

    t = TrainConfig(fg_lr=4e-4, bg_lr=1e-3, fg_lr_warmup=4, bg_lr_zero_step=6)
    fg = [learning_rates(t, s)[0] for s in range(6)]
    assert fg == pytest.approx([1e-4, 2e-4, 3e-4, 4e-4, 4e-4, 4e-4])
    assert [learning_rates(t, s)[1] for s in (5, 6)] == [1e-3, 0.0]
    assert learning_rates(TrainConfig(fg_lr=4e-4), 0)[0] == 4e-4  # no warmup: the paper's constant rate
    with pytest.raises(ConfigError, match="fg_lr_warmup"):
        TrainConfig(fg_lr_warmup=-1).validate()


def test_lr_decay_scales_both_learning_rates_and_reaches_the_optimisers():
    from space.config import Config, ConfigError
    from space.train import learning_rates

    t = Config.from_dict({"train": {"fg_lr": 4e-4, "bg_lr": 1e-3, "lr_decay": {
        "start": 1, "end": 0.1, "start_step": 10, "end_step": 20}}}).validate().train
    assert learning_rates(t, 10) == pytest.approx((4e-4, 1e-3))
    assert learning_rates(t, 15) == pytest.approx((4e-4 * 0.55, 1e-3 * 0.55))
    assert learning_rates(t, 99) == pytest.approx((4e-5, 1e-4))
    with pytest.raises(ConfigError, match="train.lr_decay"):
        Config.from_dict({"train": {"lr_decay": 0}}).validate()
