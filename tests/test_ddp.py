"""Data-parallel training through torchrun (DDP, gloo on CPU): the same script, the same checkpoints."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "s.zarr"
    subprocess.run([sys.executable, "-m", "datagen", "room3d", str(out), "--objects", "2", "4", "--image-size", "64",
                    "--split", "train=32", "--seed", "3", "--quiet"], check=True)
    return out


def test_torchrun_two_processes_train_and_write_a_checkpoint_one_process_resumes(store, tmp_path):
    run = tmp_path / "run"
    common = ["--data", str(store), "--out", str(run), "--preset", "demo", "--set", "train.batch_size=2",
              "--set", "train.log_every=1", "--set", "train.val_every=0", "--set", "train.threads=1", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([str(BIN / "torchrun"), "--nproc-per-node", "2", "-m", "space", "train", *common,
                        "--steps", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 2
    with open(run / "metrics.csv") as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == [1, 2]  # one writer, no duplicate rows
    # The data-parallel checkpoint resumes in a single process.
    p = subprocess.run([sys.executable, "-m", "space", "train", *common, "--steps", "3"], capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 3
