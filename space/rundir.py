"""A run directory: what it was trained on, who is training it, its CSV logs, and whether it resumes.

A run's record is the store's identity (the `identity` root attribute of datagen/store.py: generator, its
version and parameters, seed, splits, image size, K_max, shard size) and the full resolved configuration.
It is kept in the checkpoint (the true one: it travels with the weights) and in `run.json` beside it.
`python -m space train` resumes a run only when its record matches, apart from the settings in
space.config.RUN_INDEPENDENT; otherwise it refuses, or with --restart starts afresh in the directory.

One trainer at a time: `lock_run` takes an exclusive flock on `<run>/.lock` (for an object-store run, on
a file beside its local mirror), which the kernel releases when the holder ends, even by a kill.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from .checkpoints import (RESUME_KEYS, UNUSABLE_FIX, CheckpointError, TrainingDiverged, load_checkpoint,
                          nonfinite)
from .config import RUN_INDEPENDENT, Config, ConfigError
from .runs import RunMirror

RECORD_FILE = "run.json"
RECORD_FORMAT = 1
# What --restart replaces, checkpoints first: a clear cut short leaves no checkpoint beside foreign logs.
RUN_FILES = ("checkpoints", "metrics.csv", "val.csv", "tb", RECORD_FILE, "config.json")
MAX_LISTED = 6  # differences named in the error; more are counted


class RunError(RuntimeError):
    """The run directory cannot be used as asked: another record, another trainer, not writable."""


# A store's identity fields (datagen.store.StoreSpec.identity), read from its root attributes when a store
# does not carry the `identity` attribute itself (the schema does not require it).
IDENTITY_FIELDS = ("generator", "generator_version", "params", "seed", "splits", "image_size", "k_max", "shard_size")


def store_identity(store) -> dict:
    identity = store.attrs.get("identity")
    if isinstance(identity, dict) and identity:
        return identity
    return {k: store.attrs[k] for k in IDENTITY_FIELDS if k in store.attrs}


def store_content(path) -> str:
    """A digest of a store's bytes: BLAKE2b over every file of it (its path in the store and its bytes), in
    sorted order. The identity says how a store was made; this says what it holds, so a store remade with
    the same parameters by changed generator code, or edited in place, is another store. Reading every file
    costs about as much as one pass over the data (measured in BENCHMARKS.md)."""
    import fsspec

    fs, where = fsspec.core.url_to_fs(str(path))
    where = where.rstrip("/")
    h = hashlib.blake2b(digest_size=16)
    for f in sorted(fs.find(where)):
        h.update(f[len(where):].lstrip("/").encode() + b"\0")
        h.update(fs.cat_file(f))
    return h.hexdigest()


def store_record(store, data: str) -> dict:
    """The store part of a record: how it was made (identity), what it holds (content), where it was.
    The path is only information: a store copied or moved elsewhere is the same store."""
    return {"identity": store_identity(store), "content": store_content(data), "path": str(data)}


def store_digest(store_rec: dict | None) -> str | None:
    """A short name for a recorded store (identity and content), for metrics.json: two stores have the same
    digest when they were made alike and hold the same bytes."""
    if not store_rec or not store_rec.get("identity"):
        return None
    text = json.dumps({"identity": store_rec["identity"], "content": store_rec.get("content")}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def make_record(cfg: Config, store, data: str) -> dict:
    """This run's record, JSON-ready (what the checkpoint and run.json hold)."""
    return json.loads(json.dumps({
        "format": RECORD_FORMAT,
        "store": store_record(store, data),
        "config": cfg.to_dict(),
    }))


def legacy_record(state: dict) -> dict:
    """A checkpoint written before runs kept records: its config is known, its store is not."""
    return {"format": 0, "store": None, "config": state.get("config")}


def _flatten(d, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay whole values."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _config_values(config) -> dict:
    """Dotted settings of a recorded config, with fields added since it was written at their defaults."""
    if not isinstance(config, dict):
        return {}
    try:
        config = Config.from_dict(config).to_dict()
    except (ConfigError, TypeError):  # a setting since removed: compare what was recorded
        pass
    return _flatten(config)


_MISSING = object()  # a key one side has and the other has not


def _show(v) -> str:
    if v is _MISSING:
        return "(none)"
    return json.dumps(v) if isinstance(v, (list, dict, str)) else str(v)


def _differences(old: dict, new: dict, prefix: str = "") -> list:
    keys = list(new) + [k for k in old if k not in new]
    return [f"{prefix}{k} {_show(old.get(k, _MISSING))} -> {_show(new.get(k, _MISSING))}"
            for k in keys if old.get(k, _MISSING) != new.get(k, _MISSING)]


def record_diff(old: dict, new: dict) -> list:
    """What differs between a run's record and this one's, as "key old -> new", settings first.

    Settings in RUN_INDEPENDENT do not count."""
    def learned(values: dict) -> dict:
        return {k: v for k, v in values.items() if ".".join(k.split(".")[:2]) not in RUN_INDEPENDENT}

    out = _differences(learned(_config_values(old.get("config"))), learned(_config_values(new["config"])))
    old_store = old.get("store")
    if not isinstance(old_store, dict):
        out.append("store not recorded (written before runs recorded their store)")
    else:
        out += _differences(_flatten(old_store.get("identity") or {}), _flatten(new["store"]["identity"]), "store ")
        if old_store.get("content") != new["store"]["content"]:  # same parameters, other bytes
            out.append(f"store content {old_store.get('content') or '(not recorded)'} -> {new['store']['content']}")
    return out


def describe(diff: list) -> str:
    shown = "; ".join(diff[:MAX_LISTED])
    return shown + (f"; and {len(diff) - MAX_LISTED} more" if len(diff) > MAX_LISTED else "")


def read_record(run: Path) -> dict | None:
    """run.json's record, or None when there is none; an unreadable one counts as a record of nothing."""
    path = run / RECORD_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"store": None, "config": None}
    return record if isinstance(record, dict) else {"store": None, "config": None}


def write_json(path: Path, data: dict) -> None:
    """Atomically: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def clear_run(run: Path, mirror) -> None:
    """Remove what --restart replaces, locally and, for an object-store run, on the object store."""
    for name in RUN_FILES:
        if mirror.remote and mirror.exists(name):
            mirror.fs.rm(f"{mirror.path}/{name}", recursive=True)
        p = run / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


# ------------------------------------------------------------------------------------ the directory itself


def check_writable(run: Path, out: str) -> None:
    """Create the run directory and write a file in it, so a bad --out fails now, not at the first checkpoint."""
    try:
        run.mkdir(parents=True, exist_ok=True)
        probe = run / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RunError(f"cannot write the run directory {out} ({e.strerror or e}: {e.filename or run}); "
                       "choose another --out, or make it writable") from None


def lock_run(path: Path, out: str):
    """Hold an exclusive lock on `path` for this process; refuse when another process holds it.

    Returns the open lock file: closing it (or the process ending, however) releases the lock."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")  # "a+": opening must not erase the holder's pid
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        raise RunError(f"{out} is being trained by another process (pid {holder}); wait for it to end or "
                       "stop it, or train into another --out") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


def lock_path(mirror) -> Path:
    """`<run>/.lock`; beside the mirror for an object-store run, whose mirror `pull` replaces (and whose
    files `push` uploads)."""
    if mirror.remote:
        return mirror.local.with_name(mirror.local.name + ".lock")
    return mirror.local / ".lock"


# ------------------------------------------------------------------------------ logs and resuming


def rows_until(path: Path, step: int) -> list[dict]:
    """The rows of a run's CSV log at or before `step`, as text; [] when there is no log."""
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return [r for r in csv.DictReader(fh) if int(r["step"]) <= step]


class CsvLog:
    """Append rows; on resume, rows after the checkpoint's step (written by the killed run) are dropped."""

    def __init__(self, path: Path, fields, resume_step: int | None):
        self.path, self.fields = path, fields
        rows = rows_until(path, resume_step) if resume_step is not None else []
        # The wall time the kept rows reached: a resumed run's clock continues from it, not from 0.
        walls = [float(r["wall_s"]) for r in rows if r.get("wall_s") not in ("", None)]
        self.wall_s = max(walls, default=0.0)
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fields)
            w.writeheader()
            w.writerows(rows)

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, self.fields).writerow({k: row.get(k, "") for k in self.fields})


def last_logged(path: Path, step: int) -> dict:
    """The last row of a metrics.csv at or before `step`, as numbers; {} when there is none."""
    rows = rows_until(path, step)
    if not rows:
        return {}
    return {k: int(v) if k in ("step", "glimpses") else float(v) for k, v in rows[-1].items() if v not in ("", None)}


def open_run(mirror: RunMirror, out: str, record: dict, cfg: Config, restart: bool):
    """Rank 0's decision on the run directory: (lock, local directory, checkpoint state to resume or None).

    Another trainer holding it, an unwritable directory, or a record other than this run's (another store,
    other settings, a checkpoint past train.steps) is refused; with `restart` a differing run is cleared
    and started afresh. The caller closes the lock."""
    if mirror.remote:  # the lock first: pull replaces the mirror, which a running trainer works in
        lock = lock_run(lock_path(mirror), out)
        try:
            run = mirror.pull()
            check_writable(run, out)
        except BaseException:
            lock.close()
            raise
    else:
        run = mirror.pull()
        check_writable(run, out)
        lock = lock_run(lock_path(mirror), out)
    try:
        ckpt = run / "checkpoints" / "last.pt"
        state, diff, unusable = None, [], None
        if ckpt.exists():
            try:
                state = load_checkpoint(ckpt, need=RESUME_KEYS, finite=False)
            except CheckpointError as e:
                unusable = str(e).removesuffix(f"; {UNUSABLE_FIX}")
            else:
                diff = record_diff(state.get("record") or legacy_record(state), record)
                if state["step"] > cfg.train.steps:
                    diff.append(f"train.steps {cfg.train.steps} is below the checkpoint's step {state['step']}")
        elif (old := read_record(run)) is not None:
            diff = record_diff(old, record)
        if (diff or unusable) and not restart:
            problem = (f"cannot be resumed: {unusable}" if unusable else
                       f"holds a run trained on another store or with other settings ({describe(diff)})")
            raise RunError(f"{out} {problem}; pass --restart to start afresh in it, or use another --out")
        if diff or unusable:
            print(f"{out}: starting afresh (--restart): {unusable or describe(diff)}", file=sys.stderr)
            clear_run(run, mirror)
            state = None
        elif state is not None:  # the same run: resume, unless it was saved broken (before this check existed)
            bad = nonfinite(state["model"])
            if bad:
                raise TrainingDiverged(f"{ckpt} (step {state['step']}) holds NaN or infinite weights "
                                       f"({', '.join(bad)}): the run diverged; lower the learning rates and "
                                       "train again with --restart")
        return lock, run, state
    except BaseException:
        lock.close()
        raise
