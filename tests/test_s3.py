"""Stores and DVC data on an object store: an S3-compatible server (moto's server mode) on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import IN_CHECKOUT

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET = "space-test"


@pytest.fixture(scope="module")
def s3():
    """A local S3 endpoint with one bucket; yields the environment that points s3fs, boto and DVC at it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
               PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"))
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
    yield env
    server.stop()


def sh(cmd, env, cwd=REPO):
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, shell=isinstance(cmd, str), timeout=600)
    assert p.returncode == 0, f"{cmd}:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    return p


ARGS = ["--split", "train=24", "--split", "val=8", "--image-size", "32", "--objects", "1", "3", "--shard-size", "8",
        "--seed", "4", "--quiet"]


def test_a_store_written_to_s3_reads_back_equal_to_the_local_one(s3, tmp_path, monkeypatch):
    url = f"s3://{BUCKET}/stores/room.zarr"
    sh([sys.executable, "-m", "datagen", "room3d", url, *ARGS], s3)
    sh([sys.executable, "-m", "datagen", "room3d", str(tmp_path / "room.zarr"), *ARGS], s3)
    assert "valid, complete" in sh([sys.executable, "-m", "datagen", "inspect", url], s3).stdout
    for k, v in s3.items():
        monkeypatch.setenv(k, v)
    from datagen.store import Store

    remote, local = Store(url), Store(tmp_path / "room.zarr")
    for split in ("train", "val"):
        for name in ("images", "boxes", "labels", "masks", "n_objects"):
            a = remote.read(split, name, np.arange(remote.splits[split])[::-1])
            b = local.read(split, name, np.arange(local.splits[split])[::-1])
            assert a.tobytes() == b.tobytes(), f"{split}/{name}"
    # and training reads it like any store
    from space.data import StoreDataset

    assert len(StoreDataset(url, "train", image_size=32)) == 24


def test_an_unfinished_s3_store_is_refused_and_resumed(s3, tmp_path):
    url = f"s3://{BUCKET}/stores/unfinished.zarr"
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3["AWS_ENDPOINT_URL"]}, key="testing", secret="testing")
    sh([sys.executable, "-m", "datagen", "room3d", url, *ARGS], s3)
    fs.rm(f"{BUCKET}/stores/unfinished.zarr/train/_shards_done/c/1")  # as if the job died before that mark
    root = fs.cat(f"{BUCKET}/stores/unfinished.zarr/zarr.json").replace(b'"complete": true', b'"complete": false')
    fs.pipe(f"{BUCKET}/stores/unfinished.zarr/zarr.json", root)
    p = subprocess.run([sys.executable, "-m", "datagen", "inspect", url], env=s3, capture_output=True, text=True)
    assert p.returncode == 1 and "rerun the same command" in p.stderr
    sh([sys.executable, "-m", "datagen", "room3d", url, *ARGS], s3)  # finishes it
    assert "valid, complete" in sh([sys.executable, "-m", "datagen", "inspect", url], s3).stdout


def test_dvc_push_and_pull_through_an_s3_remote(s3, tmp_path):
    """The S3 remote of the README's one command, against the loopback server."""
    from test_pipeline import project_copy, TINY
    import yaml

    params = yaml.safe_load(yaml.safe_dump(TINY))
    del params["datasets"]["room3d_large"]
    first = project_copy(tmp_path / "first", params)
    endpoint = s3["AWS_ENDPOINT_URL"]
    sh(f"dvc remote add -d s3 s3://{BUCKET}/dvc && dvc remote modify s3 endpointurl {endpoint}", s3, first)
    sh("dvc repro -q && dvc push -q", s3, first)
    sh("git add -A && git -c user.name=t -c user.email=t@t commit -qm data", s3, first)
    assert not (tmp_path / "space-pipeline-dvc-storage").exists()  # it went to S3, not the local default
    sh(f"git clone -q {first} {tmp_path / 'second'}", s3, tmp_path)
    sh("dvc pull -q", s3, tmp_path / "second")
    assert "up to date" in sh("dvc status", s3, tmp_path / "second").stdout
    assert (tmp_path / "second/results/data/room3d_small.zarr/zarr.json").exists()


@IN_CHECKOUT
def test_kubernetes_profile_plans_the_dag_through_s3_storage(s3):
    """profiles/kubernetes: pods share no filesystem, so every file goes through S3 storage; the dry run
    resolves the whole DAG against the loopback bucket (the executor itself needs a cluster)."""
    p = sh(["snakemake", "--profile", "profiles/kubernetes", "-n", "--forceall", "train_all",
            "--default-storage-prefix", f"s3://{BUCKET}/k8s", "--storage-s3-endpoint-url", s3["AWS_ENDPOINT_URL"],
            "--storage-s3-access-key", "testing", "--storage-s3-secret-key", "testing"], s3)
    assert "merge_parts" in p.stdout and "train" in p.stdout


def test_a_run_on_s3_resumes_on_another_machine_and_is_scored_there(s3, tmp_path):
    """`--out s3://...`: training in a local mirror pushed at each checkpoint. The first job stops at step
    2 and its mirror is deleted (a second machine); the second job resumes from the object store's
    checkpoint and must log the losses of an uninterrupted local run. `evaluate` and `curves` then read
    the run from S3, and the scores land beside it there."""
    import csv

    from test_space_train import TERMS, tiny_args

    store = tmp_path / "room.zarr"
    sh([sys.executable, "-m", "datagen", "room3d", str(store), "--objects", "2", "4", "--split", "train=16",
        "--split", "val=8", "--split", "test=8", "--image-size", "64", "--seed", "3", "--shard-size", "8",
        "--quiet"], s3)
    url = f"s3://{BUCKET}/runs/demo"
    env = dict(s3, SPACE_RUN_CACHE=str(tmp_path / "mirror"))
    train = [sys.executable, "-m", "space", "train", "--data", str(store), *tiny_args()]
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3["AWS_ENDPOINT_URL"]}, key="testing", secret="testing")
    sh([*train, "--out", url, "--steps", "2"], env)
    first = fs.cat(f"{BUCKET}/runs/demo/metrics.csv").decode().splitlines()
    import shutil

    shutil.rmtree(tmp_path / "mirror")
    sh([*train, "--out", url], env)
    sh([*train, "--out", str(tmp_path / "local")], env)
    # Resumed, not restarted: the first job's rows (wall-clock times included) are still there.
    assert fs.cat(f"{BUCKET}/runs/demo/metrics.csv").decode().splitlines()[:3] == first[:3]
    names = {p.split("runs/demo/", 1)[1] for p in fs.find(f"{BUCKET}/runs/demo")}
    assert {"config.json", "metrics.csv", "val.csv", "checkpoints/last.pt"} <= names
    assert any(n.startswith("tb/events") for n in names)

    def rows(text):
        return list(csv.DictReader(text.splitlines()))

    remote = rows(fs.cat(f"{BUCKET}/runs/demo/metrics.csv").decode())
    local = rows((tmp_path / "local/metrics.csv").read_text())
    assert [r["step"] for r in remote] == [r["step"] for r in local] == ["1", "2", "3", "4"]
    for a, b in zip(remote, local):
        for k in TERMS:
            assert float(a[k]) == pytest.approx(float(b[k]), rel=1e-4, abs=1e-3), (a["step"], k)

    sh([sys.executable, "-m", "space", "evaluate", "--run", url, "--data", str(store), "--checkpoint", "last",
        "--quiet"], env)
    import json

    metrics = json.loads(fs.cat(f"{BUCKET}/runs/demo/eval/test/metrics.json"))
    assert metrics["step"] == 4 and "ap50" in metrics
    assert fs.exists(f"{BUCKET}/runs/demo/eval/test/detections.json")
    sh([sys.executable, "-m", "space", "curves", url, "--out", str(tmp_path / "curves.png")], env)
    assert (tmp_path / "curves.png").stat().st_size > 1000
    # A run that is not there is named, not a traceback.
    p = subprocess.run([sys.executable, "-m", "space", "evaluate", "--run", f"s3://{BUCKET}/runs/none",
                        "--data", str(store)], env=env, capture_output=True, text=True)
    assert p.returncode == 2 and "no checkpoints/last.pt at s3://" in p.stderr
