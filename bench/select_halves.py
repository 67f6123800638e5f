"""Is a checkpoint chosen on validation by count error more than noise? Checked on the validation frames alone.

    python -m space select ... --by count_error --out results/runs/EXPERIMENT/eval/seeds/SEED/val   # the pipeline's
    python bench/select_halves.py --experiment results/runs/EXPERIMENT --out bench/results/select_halves.json
    python bench/select_halves.py --from bench/results/select_halves.json --markdown

For each seed's selection (`eval/seeds/SEED/val/selected.json` and the candidates' detections scored beside
it), each frame's count error |detected - true| / true from the candidates' `detections.json` and
`ground_truth.json` (their mean is `metrics.json`'s count_error). Per seed: each candidate's count error
and its paired difference from the first candidate's, frame by frame, with its standard error. Over the
experiment: --halvings random halvings of the split; on each, every seed chooses on one half by the same
rule (lowest count error, the first candidate on a tie) and is scored on the other, and the held-out mean
over seeds is compared with always scoring the first candidate. A rule that picks noise gains nothing on
the held-out half on average. The last line printed is one JSON object (without --markdown).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import emit, machine  # noqa: E402

from space.metrics import frame_count_errors  # noqa: E402


def scored_count_errors(folder: Path) -> np.ndarray:
    """Each frame's count error (table 1's, per frame) of a scored split: evaluate's files in `folder`."""
    gt = json.loads((folder / "ground_truth.json").read_text())
    dets = json.loads((folder / "detections.json").read_text())
    row = {image["id"]: i for i, image in enumerate(gt["images"])}
    true, found = np.zeros(len(row)), np.zeros(len(row))
    np.add.at(true, [row[a["image_id"]] for a in gt["annotations"]], 1)
    np.add.at(found, [row[d["image_id"]] for d in dets], 1)
    return frame_count_errors(true, found)


def collect(experiment: Path) -> dict:
    """Each seed's selection and its candidates' per-frame count errors."""
    files = sorted((experiment / "eval" / "seeds").glob("*/val/selected.json"), key=lambda p: int(p.parts[-3]))
    if not files:
        raise SystemExit(f"error: no eval/seeds/*/val/selected.json under {experiment}; run the pipeline with the "
                         "experiment's checkpoints: [best, last] and checkpoint_by: count_error first")
    seeds = {}
    for f in files:
        selection = json.loads(f.read_text())
        if selection["by"] != "count_error":
            raise SystemExit(f"error: {f} chose by {selection['by']}; this check splits count error, a mean over "
                             "frames, and AP50 is not one")
        names = list(selection["candidates"])
        twins = selection["same_weights"]
        errors = {n: scored_count_errors(f.parent / twins.get(n, n)).tolist() for n in names}
        seeds[f.parts[-3]] = {"chosen": selection["checkpoint"], "candidates": names, "frame_errors": errors,
                              "steps": {n: selection["candidates"][n]["step"] for n in names}}
    return seeds


def analyse(seeds: dict, halvings: int, seed: int) -> dict:
    per_seed = {}
    for s, sel in seeds.items():
        e = {n: np.asarray(v) for n, v in sel["frame_errors"].items()}
        first = sel["candidates"][0]
        diffs = {n: e[n] - e[first] for n in sel["candidates"][1:]}  # paired, frame by frame
        per_seed[s] = {"count_error": {n: float(v.mean()) for n, v in e.items()}, "chosen": sel["chosen"],
                       "minus_first": {n: float(d.mean()) for n, d in diffs.items()},
                       "minus_first_se": {n: float(d.std(ddof=1) / np.sqrt(len(d))) for n, d in diffs.items()}}
    rng = np.random.default_rng(seed)
    gains = []
    for _ in range(halvings):
        rule, first = [], []
        for sel in seeds.values():
            e = {n: np.asarray(v) for n, v in sel["frame_errors"].items()}
            order = rng.permutation(len(e[sel["candidates"][0]]))
            a, b = order[: len(order) // 2], order[len(order) // 2:]
            pick = min(sel["candidates"], key=lambda n: e[n][a].mean())
            rule.append(e[pick][b].mean())
            first.append(e[sel["candidates"][0]][b].mean())
        gains.append(float(np.mean(first) - np.mean(rule)))
    g = np.asarray(gains)
    return {"per_seed": per_seed, "halvings": halvings, "gain_mean": float(g.mean()),
            "gain_p5": float(np.percentile(g, 5)), "gain_p95": float(np.percentile(g, 95)),
            "worse_share": float((g < 0).mean())}


def table(results: dict) -> str:
    a = results["analysis"]
    lines = ["| seed | count error of each candidate (its step) | each other minus the first (s.e.) | chosen |",
             "|---|---|---|---|"]
    for s, r in a["per_seed"].items():
        steps = results["seeds"][s]["steps"]
        each = ", ".join(f"{n} {v:.4f} ({steps[n]})" for n, v in r["count_error"].items())
        minus = ", ".join(f"{n} {d:+.4f} ({r['minus_first_se'][n]:.4f})" for n, d in r["minus_first"].items())
        lines.append(f"| {s} | {each} | {minus} | {r['chosen']} |")
    lines += ["", f"Chosen on one half, scored on the other ({a['halvings']} halvings): the rule's mean over seeds "
              f"minus the first candidate's is {-a['gain_mean']:+.4f} on average (5-95%: {-a['gain_p95']:+.4f} to "
              f"{-a['gain_p5']:+.4f}; above 0 in {a['worse_share']:.0%} of halvings)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", help="the experiment's folder, results/runs/EXPERIMENT")
    p.add_argument("--halvings", type=int, default=2000, help="random halvings of the split (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="of the halvings (default: %(default)s)")
    p.add_argument("--out", help="also write the results here (JSON)")
    p.add_argument("--from", dest="source", metavar="JSON", help="print the table of a results file instead")
    p.add_argument("--markdown", action="store_true", help="print the table alone (bench/tables.py)")
    ns = p.parse_args(argv)
    if ns.halvings < 1:
        p.error(f"--halvings: at least 1, got {ns.halvings}")
    if ns.source:
        results = json.loads(Path(ns.source).read_text())
    elif ns.experiment:
        seeds = collect(Path(ns.experiment))
        results = {"experiment": ns.experiment, "seeds": seeds, "analysis": analyse(seeds, ns.halvings, ns.seed),
                   "machine": machine(), "command": " ".join(sys.argv)}
    else:
        p.error("give --experiment (or --from a results file)")
    emit(results, table(results), None if ns.source else ns.out, ns.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
