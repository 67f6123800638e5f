"""The Zarr scene store: resuming a killed writer, the validating reader, the writer's guards."""

from __future__ import annotations

import json
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
import zarr

from datagen.room3d import store_spec
from datagen.config import Room3DConfig
from datagen.store import SCHEMA, Store, StoreError, StoreWriter, validate_store

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "datagen", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, env=ENV)


def load(path) -> dict:
    root = zarr.open_group(str(path), mode="r")
    return {s: {k: root[s][k][:] for k in sorted(root[s].array_keys())} for s in sorted(root.group_keys())}


def assert_same_arrays(a, b):
    da, db = load(a), load(b)
    assert sorted(da) == sorted(db)
    for split in da:
        assert sorted(da[split]) == sorted(db[split]), split
        for name, x in da[split].items():
            y = db[split][name]
            assert (x.dtype, x.shape) == (y.dtype, y.shape), f"{split}/{name}"
            assert x.tobytes() == y.tobytes(), f"{split}/{name} differs between {a} and {b}"


def tree_mtimes(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    p = tmp_path_factory.mktemp("small") / "s.zarr"
    r = cli("room3d", p, "--quiet", "--split", "train=40", "--split", "val=20", "--image-size", "64",
            "--shard-size", "16", "--seed", "2")
    assert r.returncode == 0, r.stderr
    return p


# ------------------------------------------------------------------------------ 4. resume after kill


def _done_shards(store: Path) -> dict:
    """{split: set of shard indices marked done}, read from the files alone (the writer may be mid-write)."""
    out = {}
    for split_dir in store.iterdir():
        c = split_dir / "_shards_done" / "c"
        if c.is_dir():
            out[split_dir.name] = {int(f.name) for f in c.iterdir()}
    return out


def _start_and_kill(cmd: list, store: Path, timeout: float = 120.0):
    """Start the writer, kill -9 its whole process group as soon as one shard is marked done.

    Returns (killed, done shards at the kill)."""
    p = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if p.poll() is not None:
                return False, _done_shards(store) if store.exists() else {}
            if store.exists() and any(_done_shards(store).values()):
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                return p.returncode == -signal.SIGKILL, _done_shards(store)
            time.sleep(0.002)
        raise AssertionError(f"no shard was marked done within {timeout} s")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
    frames = 320
    for attempt in range(4):
        store = tmp_path / f"killed{attempt}.zarr"
        args = ["room3d", store, "--quiet", "--split", f"train={frames}", "--split", "val=48", "--image-size", "64",
                "--shard-size", "16", "--seed", "9"]
        cmd = [sys.executable, "-m", "datagen", *map(str, args)]
        killed, done = _start_and_kill(cmd, store)
        total = {"train": -(-frames // 16), "val": 3}
        if killed and sum(len(v) for v in done.values()) < sum(total.values()):
            break
        frames *= 4  # it finished (or wrote every shard) before the kill landed: give it more work
    else:
        pytest.fail("the writer always finished before it could be killed")

    # The killed store is refused everywhere, with a message saying to rerun.
    problems = validate_store(store)
    assert problems, "a killed store validated"
    assert any("rerun" in p for p in problems), problems
    with pytest.raises(StoreError, match="rerun"):
        Store(store)
    r = cli("inspect", store)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "NOT a valid" in r.stderr and "rerun" in r.stderr
    assert zarr.open_group(str(store), mode="r").attrs["complete"] is False

    # Rerun the same command: it finishes, and leaves the shards done before the kill alone.
    before = tree_mtimes(store)
    r = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    after = tree_mtimes(store)
    rewritten = []
    for rel, t in before.items():
        parts = rel.split("/")
        # SPLIT/ARRAY/c/SHARD/...: chunk index 0 along frames is the shard (all arrays chunk by shard)
        if len(parts) >= 4 and parts[2] == "c" and int(parts[3]) in done.get(parts[0], ()):
            if after.get(rel) != t:
                rewritten.append(rel)
    assert not rewritten, f"the rerun rewrote shards that were already done: {rewritten[:5]}"

    assert validate_store(store) == []
    s = Store(store)
    assert s.splits == {"train": frames, "val": 48}
    for split, n in s.splits.items():
        assert s.split(split)["_shards_done"][:].all()
        assert s.split(split)["images"].shape[0] == n
    assert cli("inspect", store).returncode == 0

    # Byte-identical to one uninterrupted run: nothing lost, nothing duplicated or shifted.
    ref = tmp_path / "ref.zarr"
    args[1] = ref
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert_same_arrays(store, ref)
    a, b = dict(zarr.open_group(str(store)).attrs), dict(zarr.open_group(str(ref)).attrs)
    assert a == b
    # and every frame is distinct (a duplicated shard would repeat frames)
    imgs = load(store)["train"]["images"]
    assert len({f.tobytes() for f in imgs}) == len(imgs)


def test_resume_through_api_after_partial_write(tmp_path, small):
    """Write some shards with the writer API only, then let the CLI finish: equals a whole run."""
    cfg = Room3DConfig(image_size=64).validate()
    splits = {"train": 40, "val": 20}
    spec = store_spec(cfg, splits, seed=2, shard_size=16)
    store = tmp_path / "partial.zarr"
    w = StoreWriter.create_or_resume(store, spec)
    assert w.pending("train") == [0, 1, 2] and w.pending("val") == [0, 1]
    full = load(small)
    for split, shard in (("train", 1), ("val", 0)):
        a, b = w.shard_bounds(split, shard)
        w.write_shard(split, shard, {k: v[a:b] for k, v in full[split].items() if k != "_shards_done"})
    assert w.pending("train") == [0, 2] and w.pending("val") == [1]
    with pytest.raises(StoreError, match="missing"):
        w.finish()
    assert any("2 of 3 shards" in p for p in validate_store(store)), validate_store(store)
    r = cli("room3d", store, "--quiet", "--split", "train=40", "--split", "val=20", "--image-size", "64",
            "--shard-size", "16", "--seed", "2")
    assert r.returncode == 0, r.stderr
    assert_same_arrays(store, small)


def test_write_shard_rejects_wrong_arrays(tmp_path, small):
    cfg = Room3DConfig(image_size=64).validate()
    spec = store_spec(cfg, {"train": 40, "val": 20}, seed=2, shard_size=16)
    w = StoreWriter.create_or_resume(tmp_path / "w.zarr", spec)
    full = load(small)["train"]
    arrays = {k: v[0:16] for k, v in full.items() if k != "_shards_done"}
    with pytest.raises(StoreError, match="masks"):
        w.write_shard("train", 0, {k: v for k, v in arrays.items() if k != "masks"})
    with pytest.raises(StoreError, match="shape"):
        w.write_shard("train", 0, {**arrays, "images": arrays["images"][:15]})
    assert w.pending("train") == [0, 1, 2], "a refused shard was marked done"


# ------------------------------------------------------------------------------------ 8. the reader


def test_valid_store_reads(small):
    assert validate_store(small) == []
    s = Store(small)
    assert s.splits == {"train": 40, "val": 20}
    assert s.categories == ["sphere", "cube", "cylinder"]
    assert s.attrs["schema"] == SCHEMA and s.attrs["complete"] is True
    with pytest.raises(StoreError, match="train, val"):
        s.split("test")


@pytest.mark.parametrize("name", ["images", "masks", "boxes", "labels", "visibility", "n_objects", "camera"])
def test_read_index_array_any_order_equals_slicing(small, name):
    s = Store(small)
    whole = s.read("train", name, slice(None))
    rng = np.random.default_rng(0)
    for idx in (rng.permutation(40), np.array([39, 0, 17, 16, 15, 31, 32, 5]), np.array([7, 7, 3]), np.array([33])):
        got = s.read("train", name, idx)
        assert got.dtype == whole.dtype and got.shape == (len(idx), *whole.shape[1:])
        assert got.tobytes() == whole[idx].tobytes(), f"{name}[{idx.tolist()}]"
    # a list and numpy integer scalars work too
    assert s.read("train", name, [3, 1]).tobytes() == whole[[3, 1]].tobytes()
    assert s.read("train", name, np.int64(5)).tobytes() == whole[5].tobytes()
    assert s.read("train", name, 5).tobytes() == whole[5].tobytes()
    assert s.read("train", name, slice(10, 30, 3)).tobytes() == whole[10:30:3].tobytes()
    empty = s.read("train", name, np.array([], dtype=int))
    assert empty.shape == (0, *whole.shape[1:])


def _edit_root_attrs(path: Path, **changes):
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"].update(changes)
    (path / "zarr.json").write_text(json.dumps(meta))


def test_other_schema_is_rejected(small, tmp_path):
    copy = tmp_path / "other.zarr"
    shutil.copytree(small, copy)
    _edit_root_attrs(copy, schema="someone-else/tables")
    problems = validate_store(copy)
    assert len(problems) == 1 and "schema" in problems[0] and "someone-else/tables" in problems[0], problems
    with pytest.raises(StoreError, match="schema"):
        Store(copy)
    r = cli("inspect", copy)
    assert r.returncode == 1 and "schema" in r.stderr


def test_newer_schema_version_is_rejected(small, tmp_path):
    copy = tmp_path / "v2.zarr"
    shutil.copytree(small, copy)
    _edit_root_attrs(copy, schema_version=2)
    with pytest.raises(StoreError, match="schema_version"):
        Store(copy)


def test_missing_array_is_named(small, tmp_path):
    copy = tmp_path / "holey.zarr"
    shutil.copytree(small, copy)
    shutil.rmtree(copy / "val" / "boxes")
    problems = validate_store(copy)
    assert any("val/boxes" in p and "missing" in p for p in problems), problems
    with pytest.raises(StoreError, match="val/boxes"):
        Store(copy)
    r = cli("inspect", copy)
    assert r.returncode == 1 and "val/boxes" in r.stderr


def test_missing_split_group_is_named(small, tmp_path):
    copy = tmp_path / "nosplit.zarr"
    shutil.copytree(small, copy)
    shutil.rmtree(copy / "val")
    problems = validate_store(copy)
    assert any("'val'" in p for p in problems), problems


def test_wrong_shape_is_named(small, tmp_path):
    copy = tmp_path / "shape.zarr"
    shutil.copytree(small, copy)
    _edit_root_attrs(copy, image_size=[32, 32])
    problems = validate_store(copy)
    assert any("train/images" in p and "shape" in p for p in problems), problems


def test_not_a_store(tmp_path):
    assert validate_store(tmp_path / "nope") and "does not exist" in validate_store(tmp_path / "nope")[0]
    d = tmp_path / "plain"
    d.mkdir()
    (d / "a.txt").write_text("x")
    assert "not a Zarr" in validate_store(d)[0]
    with pytest.raises(StoreError):
        Store(d)
    g = tmp_path / "g.zarr"
    zarr.open_group(str(g), mode="w").attrs["hello"] = 1
    assert "schema" in validate_store(g)[0]
