"""Refined scoring's settings swept over a pipeline experiment's seeds: the cost per cell on
(`--refine-cost`), which cells may flip (`--refine-candidates`) and the Adam steps on the boxes after the
search (`--refine-box-steps`, `--refine-box-lr`), scored on one split.

    python bench/refine_sweep.py --experiment results/runs/space_room3d_reference \
        --data results/data/room3d_small.zarr --split val --costs 0 30 60 120 --candidates 0.5 0.05 \
        --out bench/results/refine_sweep_val.json
    python bench/refine_sweep.py --from bench/results/refine_sweep_val.json --markdown

For each seed, cost and candidate threshold it runs `python -m space evaluate --refine` on the seed's
checkpoint (`--checkpoint`, default best) into `eval/seeds/SEED/SPLIT_refined_cCOST_pP/` under the
experiment (`..._pP_bSTEPS_lrLR/` with box steps, `..._CHECKPOINT/` for a checkpoint other than best), skipping any whose metrics.json is already there (a sweep stopped half-way resumes), then
tabulates AP50, count error, count accuracy and detections per setting: the mean over seeds, then each seed.
Choose on the validation split and score the choice once on test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import add_from_flags, emit, machine, print_from  # noqa: E402

SCORES = ("ap50", "count_error", "count_accuracy", "detections", "refine_flips", "seconds")


def folder_name(split: str, cost: float, candidates: float, checkpoint: str = "best", box_steps: int = 0,
                box_lr: float = 0.1, box_rounds: int = 1) -> str:
    """Where one setting's scores go; the checkpoint is in the name, so that a sweep of another checkpoint
    never reads back the best's scores as its own."""
    name = f"{split}_refined_c{cost:g}_p{candidates:g}"
    if box_steps:
        name += f"_b{box_steps}" + (f"x{box_rounds}" if box_rounds != 1 else "") + f"_lr{box_lr:g}"
    return name if checkpoint == "best" else f"{name}_{Path(checkpoint).stem}"


def _setting(r: dict) -> tuple:
    """A row's setting: (candidates, cost, box steps, box lr, box rounds); rows from before the box steps had
    none."""
    steps = r.get("box_steps", 0)
    return (r["candidates"], r["cost"], steps, r.get("box_lr", 0.1) if steps else 0.0,
            r.get("box_rounds", 1) if steps else 0)


def sweep(experiment: Path, data: str, split: str, costs, candidates, checkpoint: str, box_steps=(0,),
          box_lrs=(0.1,), box_rounds=(1,)) -> dict:
    folder = experiment / "seeds"
    seeds = sorted((p.name for p in folder.iterdir() if (p / "checkpoints").is_dir()), key=int) if folder.is_dir() else []
    if not seeds:
        raise SystemExit(f"error: {experiment}/seeds has no trained seed (seeds/SEED/checkpoints); run the "
                         "pipeline's train_all first")
    rows = []
    boxes = [(0, 0.0, 0)] * (0 in box_steps) + [(n, lr, r) for n in box_steps if n for lr in box_lrs
                                                 for r in box_rounds]
    for p in candidates:
        for c in costs:
            for n, lr, rounds in boxes:
                for seed in seeds:
                    out = experiment / "eval" / "seeds" / seed / folder_name(split, c, p, checkpoint, n, lr, rounds)
                    if not (out / "metrics.json").exists():
                        more = ["--refine-box-steps", str(n), "--refine-box-lr", str(lr),
                                "--refine-box-rounds", str(rounds)] if n else []
                        subprocess.run([sys.executable, "-m", "space", "evaluate", "--run",
                                        str(experiment / "seeds" / seed), "--checkpoint", checkpoint, "--data", data,
                                        "--split", split, "--out", str(out), "--refine", "--refine-cost", str(c),
                                        "--refine-candidates", str(p), *more, "--quiet"],
                                       check=True, stdout=subprocess.DEVNULL)
                    m = json.loads((out / "metrics.json").read_text())
                    rows.append({"seed": int(seed), "cost": c, "candidates": p, "box_steps": n, "box_lr": lr,
                                 "box_rounds": rounds, **{k: m[k] for k in SCORES}})
    return {"machine": machine(), "experiment": str(experiment), "split": split, "checkpoint": checkpoint,
            "command": " ".join(sys.argv), "rows": rows}


def table(results: dict) -> str:
    settings = sorted({_setting(r) for r in results["rows"]}, key=lambda s: (-s[0], *s[1:]))
    seeds = sorted({r["seed"] for r in results["rows"]})
    lines = ["| candidates | cost (nats) | box steps (lr) x rounds | AP50 mean | count error mean | count error per seed "
             "| count accuracy | detections | flips |", "|---|---|---|---|---|---|---|---|---|"]
    for setting in settings:
        p, c, n, lr, rounds = setting
        rs = sorted((r for r in results["rows"] if _setting(r) == setting), key=lambda r: r["seed"])
        if [r["seed"] for r in rs] != seeds:
            continue  # a setting not scored on every seed has no mean to compare

        def mean(k):
            return sum(r[k] for r in rs) / len(rs)

        per_seed = ", ".join(f"{r['count_error']:.3f}" for r in rs)
        box = f"{n} ({lr:g}) x {rounds}" if n else "0"
        lines.append(f"| {p:g} | {c:g} | {box} | {mean('ap50'):.3f} | {mean('count_error'):.3f} | {per_seed} | "
                     f"{mean('count_accuracy'):.3f} | {sum(r['detections'] for r in rs)} | "
                     f"{sum(r['refine_flips'] for r in rs)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--experiment", help="the experiment's folder, results/runs/EXPERIMENT")
    ap.add_argument("--data", help="the store the experiment trained on")
    ap.add_argument("--split", default="val", help="the split to score (default: val)")
    ap.add_argument("--costs", type=float, nargs="+", default=[0.0], help="nats a cell on (default: 0)")
    ap.add_argument("--candidates", type=float, nargs="+", default=[0.5],
                    help="smallest amortised z_pres probability a cell may flip at (default: 0.5, off only)")
    ap.add_argument("--box-steps", type=int, nargs="+", default=[0],
                    help="Adam steps on the boxes after the search (default: 0, the encoder's boxes)")
    ap.add_argument("--box-lr", type=float, nargs="+", default=[0.1],
                    help="Adam's step sizes for the box steps above 0 (default: 0.1)")
    ap.add_argument("--box-rounds", type=int, nargs="+", default=[1],
                    help="how many times the box steps and the search run (default: 1)")
    ap.add_argument("--checkpoint", default="best", help="best (default), best_count, last or a path")
    ap.add_argument("--out", help="also write the results here (JSON)")
    add_from_flags(ap)
    ns = ap.parse_args()
    if print_from(ns, table):
        return
    if not (ns.experiment and ns.data):
        ap.error("--experiment and --data, or --from")
    if any(c < 0 for c in ns.costs) or any(not 0 <= p <= 1 for p in ns.candidates):
        ap.error("--costs are 0 or more nats; --candidates are probabilities in [0, 1]")
    if any(n < 0 for n in ns.box_steps) or any(not lr > 0 for lr in ns.box_lr) or any(r < 1 for r in ns.box_rounds):
        ap.error("--box-steps are 0 or more; --box-lr are above 0; --box-rounds are 1 or more")
    results = sweep(Path(ns.experiment), ns.data, ns.split, ns.costs, ns.candidates, ns.checkpoint, ns.box_steps,
                    ns.box_lr, ns.box_rounds)
    emit(results, table(results), ns.out, ns.markdown)


if __name__ == "__main__":
    main()
