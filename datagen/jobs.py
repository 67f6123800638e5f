"""The store-writing job every generator runs: shards rendered or recorded, in one process or a pool.

A generator supplies its store's spec and a shard maker, an object with `shard(split, shard, start, stop)`
returning the frames start..stop-1 of a split as a dict of stacked arrays, and `close()`. The job creates
the store (or resumes an interrupted one: only the shards not yet written are made), optionally keeps to
one part of the shards (datagen.parts: a cluster job per part, joined by `python -m datagen merge`),
shows progress in frames, and marks the store finished. With several workers each process builds its own
maker from a picklable recipe (a module-level factory and its arguments): renderers and emulators do not
survive pickling, and a GL context must not be inherited through fork, so the pool spawns.
"""

from __future__ import annotations

from .config import ConfigError, StoreConfig, check_seed
from .store import StoreWriter

# One shard maker and store writer per worker process, made once by the pool's initialiser.
_WORKER: dict = {}


def _init_worker(factory, args: tuple, path: str) -> None:
    _WORKER["maker"] = factory(*args)
    _WORKER["writer"] = StoreWriter(path)


def _work(task) -> int:
    split, shard = task
    writer = _WORKER["writer"]
    start, stop = writer.shard_bounds(split, shard)
    writer.write_shard(split, shard, _WORKER["maker"].shard(split, shard, start, stop))
    return stop - start


def check_job(splits: dict, seed: int, shard_size: int, workers: int) -> None:
    """The settings every generator's job shares, checked before anything is made."""
    check_seed(seed)
    StoreConfig(shard_size=shard_size, splits=dict(splits)).validate()
    if workers < 1:
        raise ConfigError(f"workers: must be at least 1, got {workers}")


def write_store(out: str, spec, maker, recipe: tuple, *, workers: int = 1, overwrite: bool = False,
                progress: bool = True, part: tuple[int, int] | None = None, scratch: bool = False,
                desc: str = "") -> str:
    """Make the store `out` to `spec` with `maker` (one worker) or a pool of makers built by
    recipe = (factory, args); `maker` is closed at the end either way. Returns `out`."""
    import multiprocessing as mp

    from tqdm import tqdm

    try:
        writer = StoreWriter.create_or_resume(out, spec, overwrite=overwrite, scratch=scratch)
        tasks = [(split, shard) for split in spec.splits for shard in writer.pending(split)]
        if part is not None:  # this job's share of the shards (datagen.parts in params.yaml)
            mine = set(writer.part_tasks(part))
            tasks = [t for t in tasks if t in mine]
        total = sum(writer.shard_bounds(s, i)[1] - writer.shard_bounds(s, i)[0] for s, i in tasks)
        bar = tqdm(total=total, unit="frame", desc=f"{desc} {out}".strip(), disable=not progress, smoothing=0.05)
        if workers == 1:
            _WORKER.update(maker=maker, writer=writer)
            for t in tasks:
                bar.update(_work(t))
        else:
            maker.close()  # each worker makes its own
            factory, args = recipe
            with mp.get_context("spawn").Pool(workers, _init_worker, (factory, args, out)) as pool:
                for n in pool.imap_unordered(_work, tasks):
                    bar.update(n)
    finally:
        _WORKER.clear()
        maker.close()
    bar.close()
    if part is None:
        writer.finish()
    else:
        writer.finish_part(part)
    return out
