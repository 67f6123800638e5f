"""Random-minibatch reads from a datagen scene store, the way a shuffled PyTorch sampler reads them.

Builds a store (or takes --store PATH), then reads random batches of --batch frames (indices from a
random permutation, like a shuffled sampler) of one array (default `images`) in four ways:

  gather        datagen.store.Store.read(split, name, idx): one concurrent read per frame (zarr's
                event loop overlaps them)
  oindex        zarr's orthogonal indexing on the same array: arr.oindex[idx]
  loop          one read per index: np.stack([arr[i] for i in idx])
  full_frame    gather of every per-frame array a training step would take (images, masks, boxes,
                labels, n_objects, visibility), still counted in frames/s

and then through torch.utils.data.DataLoader (batch_size --batch, shuffle=True, num_workers 0 and 2)
over a small Dataset wrapper, per item (Dataset.__getitem__ reads arr[i]) and batched (the wrapper's
__getitems__ reads the whole batch with Store.read, which DataLoader calls when it exists).

Each method runs --rounds rounds of --seconds seconds, interleaved; reported: median over rounds of
images/s, and the median batch latency. --cold evicts the store's files from the page cache
(posix_fadvise DONTNEED) before every round; by default the store is in the page cache (warm).

Prints a readable table and, last, one JSON line with every result.

    python bench/store_read.py                         # builds /tmp/bench/store_read_large_8192.zarr once
    python bench/store_read.py --store results/data/room3d_large.zarr --split val
    python bench/store_read.py --build synthetic --frames 8192 --cold
    python bench/store_read.py --from RUN.json [RUN.json ...] --markdown   # earlier runs side by side

--out also writes the JSON object to a file; --from prints the images/s of earlier runs (such files, or
one file whose "runs" lists them) side by side instead of measuring (--markdown: the table alone, as
bench/tables.py reads it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import sys
import time

os.environ.setdefault("MUJOCO_GL", "egl")

from benchlib import add_from_flags, emit, load_runs, machine  # noqa: E402  (bench/ is on sys.path when a script runs)

import numpy as np  # noqa: E402

REQ_IMAGES_PER_S = 1000.0
FRAME_ARRAYS = ("images", "masks", "boxes", "labels", "n_objects", "visibility")


# Row names of the side-by-side table (bench/tables.py), for the methods this script measures.
LABELS = {
    "gather (Store.read)": "`Store.read` (concurrent `gather`)",
    "oindex": "zarr `oindex` on the same array",
    "loop arr[i]": "loop `arr[i]` per index",
    "full_frame (gather, 6 arrays)": "full frame: `gather` of images, masks, boxes, labels, n_objects, visibility "
                                     "(frames/s)",
    "full_frame (gather img+mask, rest cached)": "same, the 4 small arrays read once whole and indexed in memory",
    "DataLoader w=0 per item": "DataLoader, `num_workers=0`, per item",
    "DataLoader w=0 __getitems__ gather": "DataLoader, `num_workers=0`, `__getitems__` → `Store.read`",
    "DataLoader w=0 torch threads 1 per item": "same with `torch.set_num_threads(1)`: per item",
    "DataLoader w=0 torch threads 1 __getitems__ gather": "same with `torch.set_num_threads(1)`: `__getitems__` → "
                                                          "`Store.read`",
    "DataLoader w=2 per item": "DataLoader, `num_workers=2`, per item",
    "DataLoader w=2 __getitems__ gather": "DataLoader, `num_workers=2`, `__getitems__` → `Store.read`",
}


def side_by_side(runs: list[dict]) -> str:
    """Median images/s of every method, a column per run (headed by its time of day), how many runs reached
    the requirement, and what the machine was doing meanwhile. Markdown."""
    times = [r["date"][11:16] for r in runs]
    lines = ["| method | " + " | ".join(times) + f" | runs at ≥ {REQ_IMAGES_PER_S:,.0f}/s |",
             "|---|" + "---|" * (len(runs) + 1)]
    methods = []
    for r in runs:
        methods += [row["method"] for row in r["results"] if row["method"] not in methods]
    for m in methods:
        rates = [next((row["images_per_s_median"] for row in r["results"] if row["method"] == m), None) for r in runs]
        seen = [x for x in rates if x is not None]
        passed = sum(x >= REQ_IMAGES_PER_S for x in seen)
        ctx = {row.get("mp_context") for r in runs for row in r["results"] if row["method"] == m} - {None}
        label = LABELS.get(m, m) + (f" ({', '.join(sorted(ctx))})" if ctx else "")
        lines.append(f"| {label} | " + " | ".join("–" if x is None else f"{x:,}" for x in rates)
                     + f" | {passed} of {len(seen)} |")
    lines.append("| other load while measuring (CPUs) | "
                 + " | ".join(f"{r['other_load_cores']:.2f}" for r in runs) + " | |")
    if any("thread_roundtrip_us" in r for r in runs):
        lines.append("| thread wake-up round trip (µs, before / after) | " + " | ".join(
            " / ".join(map(str, r["thread_roundtrip_us"])) if "thread_roundtrip_us" in r else "–" for r in runs)
            + " | |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ building


class RepeatedShard:
    """A shard maker (datagen.jobs) that returns the same rendered frames for every shard."""

    def __init__(self, block: dict):
        self.block = block

    def shard(self, split, shard, start, stop) -> dict:
        return {k: v[: stop - start] for k, v in self.block.items()}

    def close(self) -> None:
        pass


def build_store(path: str, frames: int, how: str, objects: tuple, workers: int, seed: int) -> float:
    """Writes a complete room3d store of `frames` train frames at `path`; returns seconds taken."""
    from datagen.config import Room3DConfig

    cfg = Room3DConfig(objects=objects).validate()
    t = time.perf_counter()
    if how == "datagen":
        from datagen.room3d import generate

        generate(path, cfg, {"train": frames}, seed, workers=workers, overwrite=True, progress=False)
    else:
        # Synthetic: 256 real rendered frames (real compressibility, real ground truth) written over and
        # over by the generators' own store-writing job, so every chunk decodes like a real one.
        from datagen.jobs import write_store
        from datagen.room3d import Room3DRenderer, render_shard, store_spec

        shard = 256
        with Room3DRenderer(cfg) as r:
            block = render_shard(r, seed, "train", 0, shard)
        write_store(path, store_spec(cfg, {"train": frames}, seed, shard), RepeatedShard(block), None,
                    overwrite=True, progress=False)
    return time.perf_counter() - t


def evict(path: str) -> None:
    """Drop the store's file pages from the page cache (no root needed for clean pages)."""
    for dp, _, fs in os.walk(path):
        for f in fs:
            fd = os.open(os.path.join(dp, f), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def thread_roundtrip_us(n: int = 3000) -> float:
    """Mean time for one thread to wake another and be woken back. zarr's reads hop between threads
    (caller -> event loop -> file I/O pool) several times per chunk, so on a VM whose idle vCPUs sleep
    this latency, not decoding, sets much of the read rate; it is lower when other work keeps the
    CPUs awake."""
    import queue
    import threading

    a, b = queue.Queue(), queue.Queue()

    def echo():
        for _ in range(n):
            b.put(a.get())

    th = threading.Thread(target=echo)
    th.start()
    t = time.perf_counter()
    for i in range(n):
        a.put(i)
        b.get()
    dt = time.perf_counter() - t
    th.join()
    return 1e6 * dt / n


def cpu_busy_s() -> float:
    """CPU seconds the whole machine spent busy so far (all CPUs; idle, iowait and steal excluded)."""
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4] - (v[7] if len(v) > 7 else 0)) / os.sysconf("SC_CLK_TCK")


def wait_quiet(max_wait: float, threshold: float = 0.25, window: float = 2.0) -> None:
    """Wait (up to max_wait s) until other load stays under `threshold` CPUs for `window` seconds."""
    t_end = time.monotonic() + max_wait
    while True:
        a, o = cpu_busy_s(), own_cpu_s()
        time.sleep(window)
        if ((cpu_busy_s() - a) - (own_cpu_s() - o)) / window < threshold or time.monotonic() >= t_end:
            return


class OtherLoad:
    """Accumulates, over the measured intervals only, CPU time used by other processes on the machine."""

    def __init__(self):
        self.other = self.wall = 0.0

    def __enter__(self):
        self._b, self._o, self._t = cpu_busy_s(), own_cpu_s(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.other += (cpu_busy_s() - self._b) - (own_cpu_s() - self._o)
        self.wall += time.perf_counter() - self._t

    @property
    def cpus(self) -> float:
        return max(self.other, 0.0) / max(self.wall, 1e-9)


def own_cpu_s() -> float:
    ru = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(r.ru_utime + r.ru_stime for r in ru)


# ------------------------------------------------------------------------------------------ readers


class Batches:
    """Index batches from successive random permutations, like a shuffled sampler's epochs."""

    def __init__(self, n: int, batch: int, seed: int):
        self.n, self.batch, self.rng = n, batch, np.random.default_rng(seed)
        self.perm, self.pos = self.rng.permutation(n), 0

    def next(self) -> np.ndarray:
        if self.pos + self.batch > self.n:
            self.perm, self.pos = self.rng.permutation(self.n), 0
        idx = self.perm[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return idx


def make_readers(store, split: str, name: str):
    from datagen.store import gather

    g = store.split(split)
    arr = g[name]
    arrays = {k: g[k] for k in FRAME_ARRAYS if k in g.array_keys()}
    # The small per-frame arrays (whole-shard chunks) read once, whole, into memory: what a Dataset
    # could do instead of one chunk decode per frame per array.
    big = {k: a for k, a in arrays.items() if k in ("images", "masks")}
    cached = {k: a[:] for k, a in arrays.items() if k not in big}
    return {
        "gather (Store.read)": lambda idx: store.read(split, name, idx),
        "oindex": lambda idx: arr.oindex[idx],
        "loop arr[i]": lambda idx: np.stack([arr[int(i)] for i in idx]),
        "full_frame (gather, 6 arrays)": lambda idx: {k: gather(a, idx) for k, a in arrays.items()},
        "full_frame (gather img+mask, rest cached)": lambda idx: {
            **{k: gather(a, idx) for k, a in big.items()}, **{k: v[idx] for k, v in cached.items()}},
    }


def time_reader(fn, batches: Batches, seconds: float) -> tuple[float, list[float], int]:
    lat = []
    n_img = 0
    t0 = time.perf_counter()
    while True:
        idx = batches.next()
        t = time.perf_counter()
        out = fn(idx)
        lat.append(time.perf_counter() - t)
        n_img += len(idx)
        if time.perf_counter() - t0 >= seconds:
            break
    _ = out
    return n_img / (time.perf_counter() - t0), lat, n_img


# --------------------------------------------------------------------------------------- DataLoader


class FrameDataset:
    """A minimal map-style Dataset over one array of one split; opens the store lazily per process."""

    def __init__(self, path: str, split: str, name: str):
        import zarr

        self.path, self.split, self.name = path, split, name
        self._store = self._arr = None
        self.n = zarr.open_group(path, mode="r")[split][name].shape[0]

    def _open(self):
        if self._arr is None:
            from datagen.store import Store

            self._store = Store(self.path)
            self._arr = self._store.split(self.split)[self.name]
        return self._arr

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        import torch

        return torch.from_numpy(np.asarray(self._open()[int(i)]))

    def __getstate__(self):  # workers reopen the store themselves
        d = dict(self.__dict__)
        d["_arr"] = d["_store"] = None
        return d


class BatchedFrameDataset(FrameDataset):
    """Same, plus __getitems__, which DataLoader calls with a whole batch of indices when it exists."""

    def __getitems__(self, idx):
        import torch

        self._open()
        return list(torch.from_numpy(self._store.read(self.split, self.name, np.asarray(idx))))


def time_dataloader(path, split, name, batch, workers, batched, seconds, seed, mp_context, torch_threads=None):
    import torch

    old_threads = torch.get_num_threads()
    if torch_threads:
        torch.set_num_threads(torch_threads)
    try:
        return _time_dataloader(path, split, name, batch, workers, batched, seconds, seed, mp_context)
    finally:
        torch.set_num_threads(old_threads)


def _time_dataloader(path, split, name, batch, workers, batched, seconds, seed, mp_context):
    import torch
    from torch.utils.data import DataLoader

    ds = (BatchedFrameDataset if batched else FrameDataset)(path, split, name)
    g = torch.Generator().manual_seed(seed)
    kw = {}
    if workers:
        kw = {"persistent_workers": True, "prefetch_factor": 4, "multiprocessing_context": mp_context}
    dl = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, generator=g, **kw)
    t_start = time.perf_counter()
    it = iter(dl)
    next(it)  # start-up (worker start, store open) not timed
    startup = time.perf_counter() - t_start
    lat, n_img = [], 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        t = time.perf_counter()
        try:
            b = next(it)
        except StopIteration:
            it = iter(dl)
            b = next(it)
        lat.append(time.perf_counter() - t)
        n_img += len(b)
    rate = n_img / (time.perf_counter() - t0)
    del it, dl
    return rate, lat, startup


# ---------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", help="an existing complete store (default: build one at --build-path)")
    p.add_argument("--build", choices=("datagen", "synthetic"), default="datagen",
                   help="how to build the store when --store is not given (default: %(default)s)")
    p.add_argument("--build-path", default="/tmp/bench/store_read_large_8192.zarr",
                   help="store to build, reused when already complete (default: %(default)s)")
    p.add_argument("--frames", type=int, default=8192, help="frames to build (default: %(default)s)")
    p.add_argument("--objects", type=int, nargs=2, default=(18, 24), help="room3d objects (default: Large)")
    p.add_argument("--build-workers", type=int, default=2)
    p.add_argument("--split", default="train")
    p.add_argument("--array", default="images")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seconds", type=float, default=3.0, help="seconds per round (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per method (default: %(default)s)")
    p.add_argument("--loader-workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--mp-context", default="spawn", choices=("spawn", "fork", "forkserver"),
                   help="DataLoader worker start method (default: %(default)s)")
    p.add_argument("--no-loader", action="store_true", help="skip the DataLoader part")
    p.add_argument("--cold", action="store_true", help="evict the store from the page cache before each round")
    p.add_argument("--quiet-wait", type=float, default=30.0,
                   help="before each round, wait up to this many seconds for other load on the shared "
                        "machine to drop under 0.25 CPUs (0: do not wait; default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="JSON", help="also write the results here")
    add_from_flags(p, many=True)  # earlier runs' images/s side by side
    ns = p.parse_args(argv)
    if ns.source:
        runs = load_runs(ns.source)
        emit({"runs": len(runs)}, side_by_side(runs), markdown=ns.markdown)
        return 0

    from datagen.store import Store, gather, validate_store

    info = machine()
    result = {"bench": "store_read", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": info, "argv": sys.argv[1:], "batch": ns.batch, "cold": ns.cold}
    path = ns.store
    if path is None:
        path = ns.build_path
        if validate_store(path) or Store(path).splits.get(ns.split) != ns.frames:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            print(f"building {path}: {ns.frames} frames, objects {ns.objects[0]}-{ns.objects[1]}, {ns.build} ...",
                  flush=True)
            result["build_s"] = round(build_store(path, ns.frames, ns.build, tuple(ns.objects),
                                                  ns.build_workers, ns.seed), 1)
            result["build"] = ns.build
    store = Store(path)
    arr = store.split(ns.split)[ns.array]
    n = arr.shape[0]
    disk = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(path) for f in fs)
    raw = arr.nbytes
    result.update({"store": path, "split": ns.split, "array": ns.array, "frames": n,
                   "frame_shape": list(arr.shape[1:]), "chunks": list(arr.chunks),
                   "shards": list(arr.shards) if getattr(arr, "shards", None) else None,
                   "store_mb": round(disk / 2**20, 1), "array_raw_mb": round(raw / 2**20, 1)})
    print(f"store_read  {result['date']}  {info['cpus']} CPUs  {info['cpu_model']}  load(1m) {info['loadavg_1m']:.2f}")
    print(f"store {path}: {ns.split}/{ns.array} {arr.shape} {arr.dtype}, chunks {arr.chunks}, shards "
          f"{result['shards']}, store {result['store_mb']} MB on disk; batch {ns.batch}, "
          f"{'cold (evicted) ' if ns.cold else 'warm '}page cache")

    readers = make_readers(store, ns.split, ns.array)
    per_array = {}
    for k, a in store.split(ns.split).arrays():
        if k.startswith("_"):
            continue
        b = Batches(n, ns.batch, 11)
        gather(a, b.next())
        t = time.perf_counter()
        for _ in range(20):
            gather(a, b.next())
        per_array[k] = round(1000 * (time.perf_counter() - t) / 20, 2)
    result["gather_ms_per_batch_by_array"] = per_array
    print("gather of one batch, ms per array: " + ", ".join(f"{k} {v}" for k, v in per_array.items()))

    # Sanity: the three single-array readers return the same frames.
    idx = Batches(n, ns.batch, 123).next()
    ref = readers["loop arr[i]"](idx)
    for k in ("gather (Store.read)", "oindex"):
        assert np.array_equal(readers[k](idx), ref), k
    for fn in readers.values():  # warm-up: zarr's event loop, codecs, page cache
        for _ in range(3):
            fn(Batches(n, ns.batch, 7).next())

    load = OtherLoad()
    rt_before = thread_roundtrip_us()
    rates = {k: [] for k in readers}
    lats = {k: [] for k in readers}
    batches = {k: Batches(n, ns.batch, ns.seed + i) for i, k in enumerate(readers)}
    for _ in range(ns.rounds):
        if ns.quiet_wait > 0:
            wait_quiet(ns.quiet_wait)
        for k, fn in readers.items():
            if ns.cold:
                evict(path)
            with load:
                r, lat, _n = time_reader(fn, batches[k], ns.seconds)
            rates[k].append(r)
            lats[k].extend(lat)

    rows = []
    for k in readers:
        rows.append({"method": k, "images_per_s_rounds": [round(x) for x in rates[k]],
                     "images_per_s_median": round(statistics.median(rates[k])),
                     "batch_ms_median": round(1000 * statistics.median(lats[k]), 2),
                     "batch_ms_p90": round(1000 * float(np.percentile(lats[k], 90)), 2),
                     "batches": len(lats[k])})

    if not ns.no_loader:
        import torch

        result["torch_threads_default"] = torch.get_num_threads()
        variants = []
        for workers in ns.loader_workers:
            # In the main process (workers 0) also with torch.set_num_threads(1): torch's OpenMP threads
            # spin after each parallel op (default_collate's torch.stack) and starve zarr's I/O thread.
            for threads in ((None, 1) if workers == 0 else (None,)):
                for batched in (False, True):
                    variants.append((workers, threads, batched))
        for workers, threads, batched in variants:
            name = (f"DataLoader w={workers}{' torch threads 1' if threads else ''} "
                    f"{'__getitems__ gather' if batched else 'per item'}")
            rs, ls, starts = [], [], []
            for _ in range(ns.rounds):
                if ns.quiet_wait > 0:
                    wait_quiet(ns.quiet_wait)
                if ns.cold:
                    evict(path)
                with load:
                    r, lat, startup = time_dataloader(path, ns.split, ns.array, ns.batch, workers, batched,
                                                      ns.seconds, ns.seed, ns.mp_context, threads)
                rs.append(r)
                ls.extend(lat)
                starts.append(startup)
            rows.append({"method": name, "images_per_s_rounds": [round(x) for x in rs],
                         "images_per_s_median": round(statistics.median(rs)),
                         "batch_ms_median": round(1000 * statistics.median(ls), 2),
                         "batch_ms_p90": round(1000 * float(np.percentile(ls, 90)), 2),
                         "batches": len(ls), "startup_s_median": round(statistics.median(starts), 2),
                         "mp_context": ns.mp_context if workers else None})

    result["other_load_cores"] = round(load.cpus, 2)  # mean CPUs busy with other work while measuring
    for r in rows:
        r["pass_1000_per_s"] = r["images_per_s_median"] >= REQ_IMAGES_PER_S
    result["results"] = rows
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

    print(f"\n== random batches of {ns.batch} from {ns.split}/{ns.array} (median of {ns.rounds} rounds of "
          f"{ns.seconds:g} s; requirement well over {REQ_IMAGES_PER_S:.0f} images/s) ==")
    print(f"{'method':50} {'images/s (rounds)':26} {'median':>7} {'batch ms':>9} {'p90 ms':>7} {'pass':>5}")
    for r in rows:
        print(f"{r['method']:50} {', '.join(map(str, r['images_per_s_rounds'])):26} {r['images_per_s_median']:7d} "
              f"{r['batch_ms_median']:9.2f} {r['batch_ms_p90']:7.2f} {'yes' if r['pass_1000_per_s'] else 'NO':>5}")
    result["thread_roundtrip_us"] = [round(rt_before, 1), round(thread_roundtrip_us(), 1)]
    print(f"thread wake-up round trip before / after: {result['thread_roundtrip_us']} us")
    print(f"other load on the machine during the measurements: about {result['other_load_cores']} of "
          f"{info['cpus']} CPUs (machine busy time minus this process and its reaped children, DataLoader workers included once joined at the end of each round)")
    if ns.out:
        with open(ns.out, "w") as fh:
            json.dump(result, fh, indent=1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
