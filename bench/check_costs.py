"""What the integrity checks cost, beside the work they guard.

    python bench/check_costs.py --data results/data/room3d_small.zarr --run results/runs/space_room3d_small/seeds/0 \
        --out bench/results/check_costs.json
    python bench/check_costs.py --from bench/results/check_costs.json --markdown

Each check, its median over --repeats, and what it guards:
- `python -m datagen inspect STORE` (every file there, each shard's index read, repeated frames hashed) and
  `--full` (every frame decoded), as subprocesses: wall time and CPU time (user + system of the child);
- the run record's content digest (`space.rundir.store_content`: BLAKE2b over the store's bytes), once per
  `train` and per `evaluate`;
- the parameters checked finite after every optimiser step (`space.train.ParameterWatch.check`), against
  the training step it follows (`space.train.train_step` on the run's settings and a batch of the store);
- loading a checkpoint with its checks (`space.checkpoints.load_checkpoint`: structure, shapes against a
  model built from its config, finite weights) against `torch.load` of the same file.
The last line printed is one JSON object (without --markdown).
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import add_from_flags, emit, machine, print_from  # noqa: E402


def _subprocess_cost(argv: list[str]) -> tuple[float, float]:
    """(wall s, child CPU s) of one run of argv."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(data: str, run: str, repeats: int, steps: int, threads: int) -> dict:
    import torch

    from space.checkpoints import load_checkpoint, load_model
    from space.data import StoreDataset
    from space.devices import checkpoint_images
    from space.rundir import store_content
    from space.train import ParameterWatch, optimisers, train_step

    torch.set_num_threads(threads)
    rows = []
    for flags, what in (([], "`python -m datagen inspect STORE`"), (["--full"], "`python -m datagen inspect STORE --full`")):
        costs = [_subprocess_cost([sys.executable, "-m", "datagen", "inspect", data, *flags]) for _ in range(repeats)]
        rows.append({"check": what, "wall_s": statistics.median(c[0] for c in costs),
                     "cpu_s": statistics.median(c[1] for c in costs)})
    size_mb = sum(f.stat().st_size for f in Path(data).rglob("*") if f.is_file()) / 2**20
    rows.append({"check": f"the run record's content digest ({size_mb:.1f} MiB store)",
                 "wall_s": _median_time(lambda: store_content(data), repeats)})

    ckpt = Path(run) / "checkpoints" / "last.pt"
    model, cfg, _ = load_model(ckpt)
    if cfg.train.channels_last:  # as the trainer sets it up
        model = model.to(memory_format=torch.channels_last)
    model.set_checkpoint_images(checkpoint_images(cfg.train.checkpoint_images, torch.device("cpu")))
    model.train()
    fg, bg = model.param_groups()
    opt_fg, opt_bg = optimisers(model, cfg.train)
    watch = ParameterWatch(model, {"foreground": (fg, "train.fg_lr"), "background": (bg, "train.bg_lr")})
    dataset = StoreDataset(data, "train", image_size=cfg.model.image_size)
    x = dataset.__getitems__(list(range(cfg.train.batch_size)))  # (B, 3, N, N)
    step_s = _median_time(lambda: train_step(model, x, 0, opt_fg, opt_bg, cfg.train), steps)
    rows.append({"check": "parameters checked finite after an optimiser step (`ParameterWatch`)",
                 "wall_s": _median_time(lambda: watch.check(0, {}, {}), max(repeats, 50)),
                 "against": f"a training step, {step_s:.3f} s (batch {cfg.train.batch_size})"})
    torch_s = _median_time(lambda: torch.load(ckpt, map_location="cpu", weights_only=True), repeats)
    rows.append({"check": "loading a checkpoint with its checks (`load_checkpoint`)",
                 "wall_s": _median_time(lambda: load_checkpoint(ckpt), repeats),
                 "against": f"`torch.load` alone, {torch_s:.3f} s"})
    return {"bench": "check_costs", "date": datetime.datetime.now().isoformat(timespec="minutes"),
            "machine": machine(), "threads": threads, "data": data, "run": run, "repeats": repeats,
            "command": "python bench/check_costs.py " + " ".join(sys.argv[1:]), "rows": rows}


def _seconds(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def table(results: dict) -> str:
    lines = ["| check | wall | CPU | beside |", "|---|---|---|---|"]
    for r in results["rows"]:
        cpu = _seconds(r["cpu_s"]) if "cpu_s" in r else ""
        lines.append(f"| {r['check']} | {_seconds(r['wall_s'])} | {cpu} | {r.get('against', '')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="a scene store")
    p.add_argument("--run", help="a run directory trained on it (checkpoints/last.pt)")
    p.add_argument("--repeats", type=int, default=5, help="runs of each check, median reported (default: %(default)s)")
    p.add_argument("--steps", type=int, default=5, help="training steps timed (default: %(default)s)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: every core)")
    p.add_argument("--out", metavar="JSON", help="also write the results here")
    add_from_flags(p)
    ns = p.parse_args(argv)
    if print_from(ns, table):
        return 0
    if not (ns.data and ns.run):
        p.error("--data and --run are needed to measure (or give --from RESULTS.json)")
    results = measure(ns.data, ns.run, ns.repeats, ns.steps, ns.threads)
    emit(results, table(results), out=ns.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
