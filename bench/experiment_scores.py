"""A pipeline experiment's scores over its seeds, as a results file and tables.

    snakemake --cores 2 train_all --configfile config/demo.yaml config/reference.yaml
    python bench/experiment_scores.py --experiment results/runs/space_room3d_reference \
        --out bench/results/reference_scores.json
    python bench/experiment_scores.py --from bench/results/reference_scores.json --markdown
    python bench/experiment_scores.py --experiment results/runs/space_room3d_reference --scored test_best_count \
        --out bench/results/reference_scores_best_count.json     # another checkpoint's scores, evaluated there

Reads, for each seed the pipeline trained (`seeds/SEED/`): the validation scores during training
(`val.csv`: AP50 and count error every `train.val_every` steps, with the training wall time), the training
summary (`train.json`) and the test scores of the checkpoint `evaluate` scored (`eval/seeds/SEED/test/
metrics.json`, the best by validation AP50 unless the experiment says otherwise). Prints the test scores
per seed with their mean, then validation AP50 by step per seed, so a curve over seeds lives in
BENCHMARKS.md as numbers. The last line printed is one JSON object (without --markdown).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import emit, machine  # noqa: E402

TEST_COLUMNS = ("step", "ap50", "ap50_paper", "ap50_95", "count_error", "count_accuracy", "fg_ari", "mask_miou",
                "baseline_fg_ari", "baseline_mask_miou")


def collect(experiment: Path, scored: str = "test") -> dict:
    """Each seed's test scores (eval/seeds/SEED/`scored`/metrics.json), training summary and validation curve
    of a pipeline experiment folder."""
    seeds = sorted((experiment / "seeds").glob("*/train.json"), key=lambda p: int(p.parent.name))
    if not seeds:
        raise SystemExit(f"error: {experiment} has no seeds/*/train.json; is it results/runs/EXPERIMENT of a "
                         f"pipeline that has trained?")
    out = {}
    for summary in seeds:
        seed = summary.parent.name
        metrics = experiment / "eval" / "seeds" / seed / scored / "metrics.json"
        if not metrics.is_file():
            raise SystemExit(f"error: {metrics} is missing; score the seeds first (snakemake ... train_all, or "
                             f"python -m space evaluate ... --out {metrics.parent} for --scored {scored})")
        with open(summary.parent / "val.csv", newline="") as fh:
            val = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]
        out[seed] = {"test": json.loads(metrics.read_text()), "train": json.loads(summary.read_text()), "val": val}
    return out


def tables(results: dict, curve: bool = True) -> str:
    """The test scores per seed and their mean; with `curve`, validation AP50 by step per seed too."""
    seeds = results["seeds"]
    cols = [c for c in TEST_COLUMNS if all(c in s["test"] for s in seeds.values())]
    lines = ["| seed | " + " | ".join(cols) + " | train s |", "|---|" + "---|" * (len(cols) + 1)]
    fmt = lambda c, v: str(int(v)) if c == "step" else f"{v:.3f}"  # noqa: E731
    for seed, s in seeds.items():
        lines.append(f"| {seed} | " + " | ".join(fmt(c, s["test"][c]) for c in cols)
                     + f" | {s['train'].get('wall_s', float('nan')):.0f} |")
    mean = {c: sum(s["test"][c] for s in seeds.values()) / len(seeds) for c in cols}
    lines.append("| mean | " + " | ".join(fmt(c, mean[c]) if c != "step" else "" for c in cols) + " | |")
    if not curve:
        return "\n".join(lines)
    steps = sorted({int(r["step"]) for s in seeds.values() for r in s["val"]})
    by = {seed: {int(r["step"]): r for r in s["val"]} for seed, s in seeds.items()}
    lines += ["", "| step | " + " | ".join(f"seed {k} AP50 (count error)" for k in seeds) + " | mean AP50 |",
              "|---|" + "---|" * (len(seeds) + 1)]
    for step in steps:
        cells, aps = [], []
        for seed in seeds:
            r = by[seed].get(step)
            if r and "val_ap50" in r:
                aps.append(r["val_ap50"])
                cells.append(f"{r['val_ap50']:.3f} ({r['val_count_error']:.2f})")
            else:
                cells.append("")
        mean_ap = f"{sum(aps) / len(aps):.3f}" if len(aps) == len(seeds) else ""
        lines.append(f"| {step} | " + " | ".join(cells) + f" | {mean_ap} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", help="the experiment's folder, results/runs/EXPERIMENT")
    p.add_argument("--scored", default="test", help="the folder under eval/seeds/SEED/ whose metrics.json to "
                   "read (default: %(default)s, the pipeline's)")
    p.add_argument("--out", help="also write the results here (JSON)")
    p.add_argument("--from", dest="source", metavar="JSON", help="print the tables of a results file instead")
    p.add_argument("--markdown", action="store_true", help="print the tables alone (bench/tables.py)")
    p.add_argument("--test-only", action="store_true", help="the test scores alone, without the validation curve")
    ns = p.parse_args(argv)
    if ns.source:
        results = json.loads(Path(ns.source).read_text())
    elif ns.experiment:
        results = {"experiment": ns.experiment, "seeds": collect(Path(ns.experiment), ns.scored), "machine": machine(),
                   "command": " ".join(sys.argv)}
    else:
        p.error("give --experiment (or --from a results file)")
    emit(results, tables(results, curve=not ns.test_only), None if ns.source else ns.out, ns.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
