"""Run directories on local disk or on an object store (`--run s3://bucket/runs/NAME`).

Training writes its checkpoints, CSV logs and TensorBoard events with ordinary file calls, so a run whose
location is a URL is worked on in a local mirror and copied up through fsspec (s3fs for s3://; endpoint
and credentials from the usual AWS_* variables, as for stores):

    mirror = RunMirror("s3://bucket/runs/a")   # local: $SPACE_RUN_CACHE/<bucket>/runs/a
    run = mirror.pull()                        # the object store's copy, if any, replaces the local one
    ...                                        # train or evaluate into `run`
    mirror.push()                              # every file up, checkpoints last

The object store is the run's one true copy: `pull` always starts from it, so a run resumed on another
machine continues from the last checkpoint that reached the store. `push` uploads the logs before the
checkpoint, so a store that holds a checkpoint holds the logs up to it (later rows are dropped on
resume, as for a local run). For a local path both calls do nothing and `pull` returns the path itself.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from datagen.store import is_url

CACHE_ENV = "SPACE_RUN_CACHE"  # where mirrors of object-store runs live (default ~/.cache/space/runs)


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "space" / "runs")


class RunMirror:
    """A run directory at `location`: a local path, or a URL mirrored into `cache_root()`."""

    def __init__(self, location: str, rank: int = 0):
        self.location = str(location).rstrip("/")
        self.remote = is_url(self.location)
        if not self.remote:
            self.local = Path(self.location)
            return
        import fsspec

        self.fs, self.path = fsspec.core.url_to_fs(self.location)
        scheme = self.location.split("://", 1)[0]
        self.local = cache_root() / scheme / self.path.strip("/")
        if rank:  # other DDP ranks on this host get their own mirror (they only read the checkpoint)
            self.local = self.local.with_name(f"{self.local.name}.rank{rank}")

    def exists(self, relative: str) -> bool:
        """Whether the run holds this file (on the object store for a URL)."""
        if not self.remote:
            return (self.local / relative).exists()
        return self.fs.exists(f"{self.path}/{relative}")

    def pull(self, only: tuple[str, ...] | None = None) -> Path:
        """The local directory to work in, filled from the object store (or `only` these files of it)."""
        if not self.remote:
            return self.local
        if self.local.exists():
            shutil.rmtree(self.local)  # the object store is the true copy; a stale mirror must not win
        self.local.mkdir(parents=True)
        if not self.fs.exists(self.path):
            return self.local
        if only is None:
            names = [p[len(self.path) + 1:] for p in self.fs.find(self.path)]
        else:  # the files asked for that the run has
            names = [name for name in only if self.fs.exists(f"{self.path}/{name}")]
        for name in names:
            (self.local / name).parent.mkdir(parents=True, exist_ok=True)
            self.fs.get(f"{self.path}/{name}", str(self.local / name))
        return self.local

    def push(self, under: str | None = None) -> None:
        """Copy the local files (or those under `under`) up; checkpoints last, so they never run ahead."""
        if not self.remote:
            return
        base = self.local / under if under else self.local
        files = sorted((p for p in base.rglob("*") if p.is_file() and not p.name.endswith(".tmp")),
                       key=lambda p: (p.relative_to(self.local).parts[0] == "checkpoints", str(p)))
        for f in files:
            self.fs.put(str(f), f"{self.path}/{f.relative_to(self.local).as_posix()}")

    def __str__(self) -> str:
        return self.location
