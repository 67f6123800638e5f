"""bench/check_costs.py measured on a tiny store and run: each check's row is there, the results file is what
was printed, and --from prints that file's figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

import torch

from space.config import resolve_config
from space.train import train

from conftest import TORCH_THREADS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def test_check_costs_measures_each_check_and_prints_its_file(tmp_path, capsys):
    import check_costs

    store = tmp_path / "s.zarr"
    r = subprocess.run([sys.executable, "-m", "datagen", "room3d", str(store), "--objects", "2", "3", "--image-size",
                        "64", "--split", "train=8", "--seed", "2", "--quiet"],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr
    cfg = resolve_config("demo", None, ["model.grid_size=4", "train.batch_size=2", "train.steps=1",
                                        "train.val_every=0", f"train.threads={TORCH_THREADS}", "train.device=cpu"])
    run = tmp_path / "run"
    train(cfg, str(store), str(run), progress=False)
    threads = torch.get_num_threads()
    out = tmp_path / "costs.json"
    try:
        assert check_costs.main(["--data", str(store), "--run", str(run), "--repeats", "1", "--steps", "1",
                                 "--threads", str(TORCH_THREADS), "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    results = json.loads(out.read_text())
    assert results == printed
    checks = [row["check"] for row in results["rows"]]
    assert checks[:2] == ["`python -m datagen inspect STORE`", "`python -m datagen inspect STORE --full`"]
    size_mib = sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) / 2**20
    assert f"({size_mib:.1f} MiB store)" in checks[2]
    assert "ParameterWatch" in checks[3] and "load_checkpoint" in checks[4]
    for row in results["rows"]:
        assert row["wall_s"] > 0
    # the inspect subprocesses' CPU time is their own, so at most their wall time on the cores they had
    for row in results["rows"][:2]:
        assert 0 < row["cpu_s"] <= row["wall_s"] * os.cpu_count()
    assert results["rows"][3]["against"].endswith("(batch 2)")

    assert check_costs.main(["--from", str(out), "--markdown"]) == 0
    text = capsys.readouterr().out
    body = [line for line in text.strip().splitlines() if line.startswith("|")][2:]
    assert [line.split("|")[1].strip() for line in body] == checks
    for line, row in zip(body, results["rows"]):
        wall = line.split("|")[2].strip()
        expected = f"{row['wall_s'] * 1e3:.1f} ms" if row["wall_s"] < 1 else f"{row['wall_s']:.2f} s"
        assert wall == expected
