"""The Zarr scene store: resuming a killed writer, the validating reader, the writer's guards."""

from __future__ import annotations

import json
import os
import re
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
            # a marker being written is a temporary "<n>.<uuid>.partial" file until zarr renames it into place
            out[split_dir.name] = {int(f.name) for f in c.iterdir() if f.name.isdigit()}
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


@pytest.mark.parametrize("rel, text, says", [
    ("train/images/zarr.json", "{bad", "not valid JSON"),
    ("train/images/zarr.json", "[1, 2]", "metadata"),
    ("val/zarr.json", "{bad", "not valid JSON"),
    ("zarr.json", "[1, 2]", "group's metadata"),
])
def test_damaged_metadata_file_is_named(small, tmp_path, rel, text, says):
    """zarr fails on these with a bare JSONDecodeError or 'pop expected at most 1 argument'."""
    copy = _copy(small, tmp_path)
    (copy / rel).write_text(text)
    problems = validate_store(copy)
    assert len(problems) == 1 and f"{copy}/{rel}" in problems[0] and says in problems[0], problems
    assert REGEN in problems[0]
    with pytest.raises(StoreError, match=re.escape(f"{copy}/{rel}")):
        Store(copy)
    r = cli("coco", copy, "--split", "train")
    assert r.returncode == 2 and r.stderr.startswith("error:") and rel in r.stderr, r.stderr
    r = cli("inspect", copy, "--full")
    assert r.returncode == 1 and "NOT a valid" in r.stderr and rel in r.stderr, r.stderr
    if rel == "zarr.json":  # a writer asked to finish the store refuses it rather than fail inside zarr
        with pytest.raises(StoreError, match="group's metadata"):
            StoreWriter.create_or_resume(copy, _tiny_spec())


# ------------------------------------------------------------------------ damaged stores (missing, truncated)


REGEN = "--overwrite"


def _copy(small, tmp_path, name="copy.zarr") -> Path:
    copy = tmp_path / name
    shutil.copytree(small, copy)
    return copy


def test_deleted_shard_file_is_found_by_inspect_and_every_reader(small, tmp_path):
    from datagen.coco import to_coco
    from datagen.store import gather

    copy = _copy(small, tmp_path)
    opened = Store(copy)  # a reader that opened the store before the file went
    shard = copy / "train" / "images" / "c" / "1" / "0" / "0" / "0"  # frames 16-31 of train
    shard.unlink()

    problems = validate_store(copy)
    assert len(problems) == 1, problems
    assert "train/images" in problems[0] and "missing" in problems[0] and "16-31" in problems[0], problems
    assert REGEN in problems[0]
    r = cli("inspect", copy)
    assert r.returncode == 1 and "NOT a valid" in r.stderr and "train/images" in r.stderr, (r.stdout, r.stderr)
    with pytest.raises(StoreError, match="train/images"):
        Store(copy)

    # Reads never give the fill value (black frames): they name store, split, array, frame and the fix.
    for index, frame in ((20, 20), (slice(10, 30), 16), (np.array([3, 31, 17]), 31), (slice(None), 16)):
        with pytest.raises(StoreError) as e:
            opened.read("train", "images", index)
        msg = str(e.value)
        assert str(copy) in msg and "train/images" in msg and f"frame {frame}" in msg and REGEN in msg, msg
    with pytest.raises(StoreError, match="frame 20"):
        gather(opened.split("train")["images"], np.array([0, 20]))
    # the frames of the other shards still read
    assert opened.read("train", "images", np.array([0, 15, 32])).shape == (3, 64, 64, 3)
    assert opened.read("val", "images", slice(None)).any(axis=(1, 2, 3)).all()

    # COCO: a lost boxes file raises rather than dropping that shard's boxes
    (copy / "train" / "boxes" / "c" / "1" / "0" / "0").unlink()
    with pytest.raises(StoreError, match="train/boxes"):
        to_coco(opened, "train")
    r = cli("coco", copy, "--split", "train")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "train/boxes" in r.stderr, r.stderr


def test_truncated_shard_file_is_found_and_reads_raise_store_error(small, tmp_path):
    copy = _copy(small, tmp_path)
    shard = copy / "val" / "masks" / "c" / "0" / "0" / "0"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])

    problems = validate_store(copy)
    assert problems and any("val/masks" in p and "0-15" in p and REGEN in p for p in problems), problems
    r = cli("inspect", copy)
    assert r.returncode == 1 and "val/masks" in r.stderr, (r.stdout, r.stderr)
    s = Store(copy, check="metadata")  # what a reader opened before the damage sees
    for index in (3, slice(0, 4), np.array([5, 1])):
        with pytest.raises(StoreError, match=r"val/masks.*frame.*--overwrite"):
            s.read("val", "masks", index)


def test_full_check_finds_changed_bytes(small, tmp_path):
    copy = _copy(small, tmp_path)
    shard = copy / "train" / "masks" / "c" / "1" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside a chunk, not the index: only decoding that chunk finds it
    shard.write_bytes(bytes(data))
    assert validate_store(copy, "files") == []
    problems = validate_store(copy, "full")
    assert problems and all("train/masks" in p and "16-31" in p for p in problems), problems
    assert cli("inspect", copy, "--full").returncode == 1
    r = cli("inspect", "--help")
    assert "--full" in r.stdout and re.search(r"\d s more", " ".join(r.stdout.split()))  # says what it costs


def test_chunks_equal_to_the_fill_value_are_stored(tmp_path):
    """A shard of all-fill frames (no masks, an all-zero flag) still has its files: a missing file is
    then always damage, never a legitimately empty chunk."""
    spec = _tiny_spec()
    w = StoreWriter.create_or_resume(tmp_path / "fill.zarr", spec)
    for split in spec.splits:
        for shard in w.pending(split):
            a, b = w.shard_bounds(split, shard)
            arrays = _tiny_shard(split, a, b)
            arrays["masks"][:] = 0
            arrays["flag"][:] = 0
            w.write_shard(split, shard, arrays)
    w.finish()
    for split, n in spec.splits.items():
        for shard in range(-(-n // spec.shard_size)):
            assert (tmp_path / "fill.zarr" / split / "flag" / "c" / str(shard)).is_file()
            assert (tmp_path / "fill.zarr" / split / "masks" / "c" / str(shard) / "0" / "0").is_file()
    assert validate_store(tmp_path / "fill.zarr", "full") == []


# ------------------------------------------------------------------------------- creation killed midway


def _tiny_spec(**kw) -> "StoreSpec":
    from datagen.store import StoreSpec

    return StoreSpec(**{"generator": "test", "generator_version": "1", "params": {"p": 1}, "seed": 3,
                        "splits": {"train": 6, "val": 3}, "image_size": (8, 8), "k_max": 2,
                        "categories": ("a", "b"), "shard_size": 4, "with_masks": True,
                        "extra_arrays": (("flag", "uint8", (), 0),), **kw})


def _tiny_shard(split: str, start: int, stop: int, names=None) -> dict:
    """Frames start..stop-1 of a split: a pure function of (split, frame). names: only these arrays."""
    frames = np.arange(start, stop)
    rng = np.random.default_rng([len(split), start])
    m = len(frames)
    n = (frames % 3).astype(np.int16)  # 0, 1 or 2 objects
    obj = np.arange(2)[None] < n[:, None]
    boxes = np.where(obj[..., None], np.float32([1, 1, 5, 5]), np.nan).astype(np.float32)
    arrays = {
        "images": rng.integers(0, 256, (m, 8, 8, 3), dtype=np.uint8),
        "boxes": boxes,
        "n_objects": n,
        "labels": np.where(obj, 1, -1).astype(np.int16),
        "visibility": np.where(obj, 0.5, np.nan).astype(np.float32),
        "masks": rng.integers(0, 3, (m, 8, 8), dtype=np.uint8),
        "flag": (frames % 2).astype(np.uint8),
    }
    return {k: v for k, v in arrays.items() if names is None or k in names}


def _finish(path, spec, **kw) -> None:
    w = StoreWriter.create_or_resume(path, spec, **kw)
    for split in spec.splits:
        for shard in w.pending(split):
            names = set(w.root[split].array_keys()) - {"_shards_done"}
            w.write_shard(split, shard, _tiny_shard(split, *w.shard_bounds(split, shard), names))
    w.finish()


def _metadata(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("zarr.json"))}


def _assert_same_store(a: Path, b: Path) -> None:
    assert _metadata(a) == _metadata(b)
    assert_same_arrays(a, b)
    assert validate_store(a, "full") == []


class Killed(BaseException):
    """A kill: not an Exception, so no handler in the code under test runs for it."""


def _killed_at_write(monkeypatch, k: int, call) -> bool:
    """Run call() with every zarr write after the k-th raising Killed (the k-th and later never happen);
    True if it was killed. Writes already under way when it dies finish first, as they would have been
    on disk before a real kill. Only writes of new content count (a group's metadata that zarr writes
    again "if not exists" beside each array changes nothing), but all die after the kill."""
    from zarr.storage import LocalStore

    real = LocalStore._set  # set and set_if_not_exists both end here
    state = {"writes": 0, "busy": 0}

    async def write_or_die(self, key, value, exclusive=False):
        if state["writes"] >= k:
            raise Killed(f"killed before write {k}: {key}")
        state["writes"] += not exclusive
        state["busy"] += 1
        try:
            return await real(self, key, value, exclusive)
        finally:
            state["busy"] -= 1

    with monkeypatch.context() as m:
        m.setattr(LocalStore, "_set", write_or_die)
        try:
            call()
        except Killed:
            deadline = time.monotonic() + 10
            while state["busy"] and time.monotonic() < deadline:
                time.sleep(0.001)
            return True
    return False


def _rerun_equals(path: Path, spec, fresh: Path, ref: Path, finish: bool, **kw) -> None:
    """Rerun the command on what a kill left at `path`: the store it makes has the metadata of a fresh
    one (`fresh`) and, finished, equals an uninterrupted store (`ref`)."""
    if finish:
        _finish(path, spec, **kw)
        _assert_same_store(path, ref)
    else:
        StoreWriter.create_or_resume(path, spec, **kw)
        assert _metadata(path) == _metadata(fresh)
        assert not [f for f in path.rglob("*") if f.is_file() and f.name != "zarr.json"], "frames left behind"


@pytest.mark.parametrize("in_place", [False, True], ids=["rename", "object-store-in-place"])
def test_creation_killed_at_any_write_is_finished_by_a_rerun(tmp_path, monkeypatch, in_place):
    import datagen.store as store_mod

    if in_place:  # the object-store way (no rename), exercised on a local path
        monkeypatch.setattr(store_mod, "_is_local", lambda fs: False)
    spec = _tiny_spec(with_masks=False, extra_arrays=())  # few arrays: fewer kill points to try
    ref, fresh = tmp_path / "ref.zarr", tmp_path / "fresh.zarr"
    _finish(ref, spec)
    StoreWriter.create_or_resume(fresh, spec)
    kills = 0
    for k in range(100):
        path = tmp_path / f"k{k}.zarr"
        if not _killed_at_write(monkeypatch, k, lambda: StoreWriter.create_or_resume(path, spec)):
            break  # k is past the last write of a creation
        kills += 1
        assert validate_store(path), f"a store killed at write {k} validated"
        _rerun_equals(path, spec, fresh, ref, finish=k % 6 == 0)  # finishing one every few is enough
    # a kill before each write: the root, and per split its group, its 5 arrays and _shards_done
    assert kills >= 1 + len(spec.splits) * 7, f"only {kills} kill points: the creation wrote less than expected"
    assert not [p.name for p in tmp_path.iterdir() if not p.name.endswith(".zarr")], "temporary folders left behind"


@pytest.mark.parametrize("in_place", [False, True], ids=["rename", "object-store-in-place"])
def test_overwrite_killed_midway_is_finished_by_a_rerun(tmp_path, monkeypatch, in_place):
    import datagen.store as store_mod

    if in_place:
        monkeypatch.setattr(store_mod, "_is_local", lambda fs: False)
    spec = _tiny_spec(with_masks=False, extra_arrays=())  # few arrays: fewer kill points to try
    ref, fresh = tmp_path / "ref.zarr", tmp_path / "fresh.zarr"
    _finish(ref, spec)
    StoreWriter.create_or_resume(fresh, spec)
    other = _tiny_spec(with_masks=False, extra_arrays=(), compressor_level=1)  # an older store at the path, to be replaced
    _finish(tmp_path / "other.zarr", other)
    for k in (0, 1, 2, 9):
        path = tmp_path / f"k{k}.zarr"
        shutil.copytree(tmp_path / "other.zarr", path)
        assert _killed_at_write(monkeypatch, k, lambda: StoreWriter.create_or_resume(path, spec, overwrite=True))
        _rerun_equals(path, spec, fresh, ref, finish=k == 9, overwrite=True)
    if in_place:  # killed while deleting the old store's files, then rerun without --overwrite
        from fsspec.implementations.local import LocalFileSystem

        path = tmp_path / "rm.zarr"
        shutil.copytree(tmp_path / "other.zarr", path)
        real_rm = LocalFileSystem.rm

        def rm_half(self, paths, *a, **kw):
            if isinstance(paths, list):
                real_rm(self, paths[: len(paths) // 2])
                raise Killed("killed while deleting")
            return real_rm(self, paths, *a, **kw)

        with monkeypatch.context() as m:
            m.setattr(LocalFileSystem, "rm", rm_half)
            with pytest.raises(Killed):
                StoreWriter.create_or_resume(path, spec, overwrite=True)
        assert validate_store(path), "a half-deleted store validated"
        _rerun_equals(path, spec, fresh, ref, finish=True)


def test_stores_left_by_the_older_writer_killed_while_creating_are_finished(tmp_path):
    """The two states a kill left with the writer before this change: a root group without attributes
    ("a Zarr store of another kind (schema None)" on every rerun) and a root with attributes but only
    some arrays (KeyError: '_shards_done' on every rerun)."""
    from datagen.store import _create

    spec = _tiny_spec()
    ref = tmp_path / "ref.zarr"
    _finish(ref, spec)
    bare = tmp_path / "bare.zarr"
    zarr.open_group(str(bare), mode="w")
    _finish(bare, spec)
    _assert_same_store(bare, ref)

    partial = tmp_path / "partial.zarr"
    _create(partial, spec)
    shutil.rmtree(partial / "val")
    shutil.rmtree(partial / "train" / "_shards_done")
    shutil.rmtree(partial / "train" / "masks")
    _finish(partial, spec)
    _assert_same_store(partial, ref)

    # but an unfinished store with shards written and an array gone is damage: not silently remade
    broken = tmp_path / "broken.zarr"
    w = StoreWriter.create_or_resume(broken, spec)
    w.write_shard("train", 0, _tiny_shard("train", 0, 4))
    shutil.rmtree(broken / "val" / "masks")
    with pytest.raises(StoreError, match="val/masks.*--overwrite"):
        StoreWriter.create_or_resume(broken, spec)
    assert (broken / "train" / "images" / "c" / "0").exists(), "the written shard was deleted"


# --------------------------------------------------------------------- one contract: a store made by hand


def _hand_made(path: Path, images: dict, generator: str = "handmade", params=None) -> dict:
    """A store written with plain zarr to the documented layout (module docstring of datagen/store.py):
    no datagen writer, no `n_frames` or `_shards_done`, unsharded multi-frame chunks. Returns its arrays."""
    root = zarr.create_group(str(path), attributes={
        "schema": SCHEMA, "schema_version": 1, "complete": True, "generator": generator,
        "params": {} if params is None else params, "seed": 0, "image_size": [16, 16], "k_max": 3,
        "categories": ["disc", "square"], "box_convention": "x_min, y_min, x_max, y_max in pixels",
        "splits": {s: len(v) for s, v in images.items()},
    })
    out = {}
    for split, frames in images.items():
        n = len(frames)
        counts = (np.arange(n) % 4).astype(np.int16)
        obj = np.arange(3)[None] < counts[:, None]
        x = np.arange(n, dtype=np.float32)[:, None, None] + np.arange(3, dtype=np.float32)[None, :, None]
        boxes = np.where(obj[..., None], np.concatenate([x, x, x + 4, x + 5], -1), np.nan).astype(np.float32)
        arrays = {
            "images": np.asarray(frames, dtype=np.uint8),
            "boxes": boxes,
            "n_objects": counts,
            "labels": np.where(obj, np.arange(3)[None] % 2, -1).astype(np.int16),
            "visibility": np.where(obj, 1.0, np.nan).astype(np.float32),
        }
        g = root.create_group(split)
        for name, value in arrays.items():
            a = g.create_array(name, shape=value.shape, dtype=value.dtype, chunks=(2, *value.shape[1:]),
                               fill_value=-1 if name == "labels" else 0, config={"write_empty_chunks": True})
            a[:] = value
        out[split] = arrays
    return out


def test_a_store_made_by_hand_to_the_documented_layout_reads_everywhere(tmp_path):
    from datagen.coco import to_coco
    from space.data import StoreDataset

    path = tmp_path / "hand.zarr"
    rng = np.random.default_rng(1)
    data = _hand_made(path, {"train": rng.integers(0, 256, (7, 16, 16, 3)), "val": rng.integers(0, 256, (3, 16, 16, 3))})
    assert validate_store(path, "full") == []
    r = cli("inspect", path)
    assert r.returncode == 0 and "valid, complete handmade store" in r.stdout, (r.stdout, r.stderr)
    assert "train: 7 frames" in r.stdout

    # the trainer's dataset
    ds = StoreDataset(str(path), "train", image_size=16)
    assert len(ds) == 7
    batch = ds.__getitems__([6, 0, 3])
    want = data["train"]["images"][[6, 0, 3]].transpose(0, 3, 1, 2) / 255
    assert batch.shape == (3, 3, 16, 16) and np.allclose(batch.numpy(), want)
    assert np.allclose(ds[2].numpy(), data["train"]["images"][2].transpose(2, 0, 1) / 255)

    # COCO: every box, none dropped
    for split, arrays in data.items():
        coco = to_coco(Store(path), split)
        assert len(coco["images"]) == len(arrays["images"])
        assert len(coco["annotations"]) == int(arrays["n_objects"].sum())
        first = [a for a in coco["annotations"] if a["image_id"] == 1]
        assert [a["bbox"] for a in first] == [[1.0, 1.0, 4.0, 5.0]] and first[0]["category_id"] == 1
        assert [c["name"] for c in coco["categories"]] == ["disc", "square"]


def test_the_validator_asks_for_what_readers_need(tmp_path):
    rng = np.random.default_rng(2)
    frames = {"train": rng.integers(0, 256, (4, 16, 16, 3))}
    # an atari store: space/evaluate.py reads params.games and the arrays `moving` and `game`
    path = tmp_path / "atari.zarr"
    _hand_made(path, frames, generator="atari")
    problems = " | ".join(validate_store(path, "metadata"))
    assert "games" in problems, problems
    path = tmp_path / "atari2.zarr"
    _hand_made(path, frames, generator="atari", params={"games": ["Pong"]})
    problems = " | ".join(validate_store(path, "metadata"))
    assert "train/moving is missing" in problems and "train/game is missing" in problems, problems

    # attributes of the wrong type, and objects that disagree with n_objects
    path = tmp_path / "types.zarr"
    _hand_made(path, frames)
    _edit_root_attrs(path, image_size=[16, "16"], categories="disc")
    problems = " | ".join(validate_store(path, "metadata"))
    assert "image_size" in problems and "categories" in problems, problems
    path = tmp_path / "counts.zarr"
    _hand_made(path, frames)
    g = zarr.open_group(str(path), mode="r+")["train"]
    g["n_objects"].with_config({"write_empty_chunks": True})[1] = 3  # frame 1 has one box
    problems = " | ".join(validate_store(path))
    assert "train/boxes" in problems and "frame 1" in problems, problems
    from datagen.coco import to_coco

    with pytest.raises(StoreError, match="frames \\[1\\]"):
        to_coco(Store(path), "train")


# ------------------------------------------------------------------------------------------ repeated frames


def test_repeated_frames_on_a_store_with_known_repeats(tmp_path):
    from datagen.store import repeated_frames

    rng = np.random.default_rng(3)
    a, b, c, d = (rng.integers(0, 256, (16, 16, 3)) for _ in range(4))
    e = a.copy()
    e[15, 15, 2] ^= 1  # one bit away from A: a different frame
    path = tmp_path / "repeats.zarr"
    _hand_made(path, {"train": [a, b, a, c, b, e], "val": [c, d, d], "test": [a]})
    r = repeated_frames(path)
    assert r["splits"] == {
        "train": {"frames": 6, "repeated": 2, "share": 2 / 6, "repeated_within_split": 2},
        "val": {"frames": 3, "repeated": 2, "share": 2 / 3, "repeated_within_split": 1},
        "test": {"frames": 1, "repeated": 1, "share": 1.0, "repeated_within_split": 0},
    }
    assert r["overall"] == {"frames": 10, "distinct": 5, "repeated": 5, "share": 0.5}
    assert r["across_splits"] == {"distinct_frames": 2,
                                  "examples": [[["train", 0], ["test", 0]], [["train", 3], ["val", 0]]]}
    assert repeated_frames(Store(path), examples=1)["across_splits"]["examples"] == [[["train", 0], ["test", 0]]]

    r = cli("inspect", path, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["repeated_frames"]["overall"]["repeated"] == 5
    r = cli("inspect", path)
    assert "train 2/6 (33.33%)" in r.stdout and "overall 5/10 (50.00%)" in r.stdout, r.stdout
    assert "in two or more splits: 2, e.g. train[0]=test[0], train[3]=val[0]" in r.stdout, r.stdout


def test_repeated_frames_of_a_generated_store(small):
    from datagen.store import repeated_frames

    r = repeated_frames(small)
    imgs = {s: load(small)[s]["images"] for s in ("train", "val")}
    distinct = len({f.tobytes() for s in imgs for f in imgs[s]})
    assert r["overall"]["frames"] == 60 and r["overall"]["distinct"] == distinct


def test_a_finished_store_opens_in_xarray_with_named_dimensions_and_consolidated_metadata(small):
    """Every array has dimension names (frame first; y, x and object shared), so xarray reads a split as
    one Dataset with the store's own values; the root document holds every array's metadata once the store
    is finished (one read opens it), which the project's own checks do not trust (see the missing-group test)."""
    xr = pytest.importorskip("xarray")
    root = json.loads((small / "zarr.json").read_text())
    assert set(root["consolidated_metadata"]["metadata"]) >= {"train", "train/images", "val/boxes"}
    store = Store(small)
    for split in ("train", "val"):
        ds = xr.open_zarr(str(small), group=split)  # consolidated: no fallback warning
        assert ds["images"].dims == ("frame", "y", "x", "rgb")
        assert ds["masks"].dims == ("frame", "y", "x")
        assert ds["boxes"].dims == ("frame", "object", "box")
        assert ds.sizes["frame"] == store.n_frames(split) and ds.sizes["object"] == store.attrs["k_max"]
        for name in ("images", "boxes", "labels", "camera"):
            np.testing.assert_array_equal(ds[name].values, store.read(split, name, slice(None)))


def test_consolidated_metadata_comes_with_finishing_and_not_before(tmp_path, small):
    """Written shard by shard through the writer: no consolidated metadata while shards are missing (a
    reader of it would take the store for whole), then every array's once finish() has marked it complete."""
    spec = store_spec(Room3DConfig(image_size=64).validate(), {"train": 40, "val": 20}, seed=2, shard_size=16)
    store = tmp_path / "w.zarr"
    w = StoreWriter.create_or_resume(store, spec)
    full = load(small)
    consolidated = lambda: json.loads((store / "zarr.json").read_text()).get("consolidated_metadata")  # noqa: E731
    for split in ("train", "val"):
        for shard in w.pending(split):
            assert consolidated() is None
            a, b = w.shard_bounds(split, shard)
            w.write_shard(split, shard, {k: v[a:b] for k, v in full[split].items() if k != "_shards_done"})
    assert consolidated() is None
    w.finish()
    assert set(consolidated()["metadata"]) >= {"train/images", "val/masks", "train/_shards_done"}
    assert validate_store(store) == []
    assert_same_arrays(store, small)
