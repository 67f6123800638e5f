"""How fast variants of SPACE learn to decompose: AP50 and FG-ARI against steps and wall time.

Each variant (a name and `--set` overrides over a preset) is trained for every seed with the project's
own trainer, `python -m space train`, one segment after another (resuming at each scoring step, which
continues exactly as an uninterrupted run), and after each segment the checkpoint reached is scored with
`python -m space evaluate --checkpoint last` on a split of the store. Results go to a JSON file that is
rewritten after every score, so an interrupted benchmark resumes where it stopped; `--plot` draws AP50
and FG-ARI against steps and against training wall time, one line per variant (the mean over seeds,
each seed faint), and prints a table.

    python bench/learning.py --data results/data/room3d_small.zarr --out bench/results/learning_demo.json \\
        --variant text: --variant code:model.mixture=channel,model.kl_weighting=every_cell \\
        --seeds 0 1 2 --steps 200 400 600 800
    python bench/learning.py --out bench/results/learning_demo.json --plot docs/learning_demo.png

Variants may also run as separate processes, each with its own --out (one thread each, side by side on a
2-core machine); `--with B.json C.json` then draws and tabulates them together with --out.

A variant is NAME:SECTION.NAME=VALUE,...; `NAME:` alone is the preset. Runs live beside the JSON file
(`--runs`), so their checkpoints, metrics.csv and TensorBoard logs are there to look at.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import commit, machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCORES = ("ap50", "fg_ari", "count_error", "mse")


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, sets = text.partition(":")
    if not sep or not name:
        raise SystemExit(f"error: --variant takes NAME:SECTION.NAME=VALUE,... (or NAME: for the preset), got {text!r}")
    parts, depth, cur = [], 0, ""
    for ch in sets:  # split at the commas outside braces: a schedule {start: 2.5, end: 0.5, ...} is one value
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return name, [s for s in [*parts, cur] if s]


def _run(cmd: list[str], log: Path, env: dict, repo: Path = REPO) -> float:
    t = time.perf_counter()
    with open(log, "a") as fh:
        r = subprocess.run(cmd, cwd=repo, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if r.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed ({r.returncode}); see {log}")
    return time.perf_counter() - t


def train_and_score(ns) -> dict:
    out = Path(ns.out)
    results = json.loads(out.read_text()) if out.exists() else {"points": []}
    results.update(data=ns.data, preset=ns.preset, split=ns.split, threads=ns.threads, machine=machine(),
                   command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    done = {(p["variant"], p["seed"], p["step"]) for p in results["points"]}
    # Absolute paths: the commands run in the checkout (--repo), wherever this one is started from.
    runs = Path(ns.runs or out.with_suffix("")).resolve()
    data = ns.data if "://" in ns.data else str(Path(ns.data).resolve())
    env = {**os.environ, "OMP_NUM_THREADS": str(ns.threads)}
    repo = Path(ns.repo).resolve() if ns.repo else REPO
    before = (results.get("repo") or {}).get("path")
    if results["points"] and before != (str(repo) if repo != REPO else None):
        raise SystemExit(f"error: {out} holds runs of {before or 'this checkout'}; give it --repo "
                         f"{before or '(none)'}, or start another results file")
    if repo != REPO:
        results["repo"] = {"path": str(repo), "commit": commit(repo)}
    # A checkout from before evaluate's --checkpoint had only last.pt, which is what it scores by default.
    evaluate_help = subprocess.run([sys.executable, "-m", "space", "evaluate", "--help"], cwd=repo,
                                   capture_output=True, text=True, env=env).stdout
    which = ["--checkpoint", "last"] if re.search(r"--checkpoint[\s=,]", evaluate_help) else []
    for spec in ns.variant:
        name, sets = parse_variant(spec)
        for seed in ns.seeds:
            run = runs / f"{name}-s{seed}"
            run.mkdir(parents=True, exist_ok=True)
            log = run / "bench.log"
            flags = [a for s in [*sets, f"train.seed={seed}", f"train.threads={ns.threads}", "train.device=cpu"]
                     for a in ("--set", s)]
            wall = max([p["train_s"] for p in results["points"] if p["variant"] == name and p["seed"] == seed],
                       default=0.0)
            for step in ns.steps or (200, 400, 600, 800):
                if (name, seed, step) in done:
                    continue
                wall += _run([sys.executable, "-m", "space", "train", "--data", data, "--out", str(run),
                              "--preset", ns.preset, *flags, "--steps", str(step), "--quiet"], log, env, repo)
                folder = run / f"eval-{step}"
                _run([sys.executable, "-m", "space", "evaluate", "--run", str(run), "--data", data, "--split",
                      ns.split, *which, "--out", str(folder), "--quiet", "--device", "cpu"], log, env, repo)
                m = json.loads((folder / "metrics.json").read_text())
                point = {"variant": name, "sets": sets, "seed": seed, "step": step, "train_s": round(wall, 1),
                         **{k: m.get(k) for k in SCORES}, "baseline_fg_ari": m.get("baseline_fg_ari")}
                results["points"].append(point)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(results, indent=1))
                print(json.dumps(point), flush=True)
    return results


def table(results: dict) -> str:
    """Mean (min-max over seeds) of AP50 and FG-ARI per variant and step, Markdown."""
    import numpy as np

    rows = {}
    for p in results["points"]:
        rows.setdefault((p["variant"], p["step"]), []).append(p)
    lines = ["| variant | step | seeds | AP50 mean (min-max) | FG-ARI mean (min-max) | count error | train s |",
             "|---|---|---|---|---|---|---|"]
    for (name, step), ps in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        def col(k, ps=ps):
            v = np.array([p[k] if p[k] is not None else np.nan for p in ps], dtype=float)
            return f"{np.nanmean(v):.3f} ({np.nanmin(v):.3f}-{np.nanmax(v):.3f})"
        lines.append(f"| {name} | {step} | {len(ps)} | {col('ap50')} | {col('fg_ari')} | "
                     f"{np.mean([p['count_error'] for p in ps]):.2f} | {np.mean([p['train_s'] for p in ps]):.0f} |")
    return "\n".join(lines)


def target_table(results: dict, target: float) -> str:
    """Per variant and seed, the first scored step whose AP50 reaches `target` and the training wall time to it,
    Markdown. The scoring steps bound it from above; a seed that never reaches it shows its last step and
    score, with ">" before its time."""
    import numpy as np

    lines = [f"| variant | seed | first scored step with AP50 >= {target} | AP50 there | train s to it |",
             "|---|---|---|---|---|"]
    means = {}
    for name in sorted({p["variant"] for p in results["points"]}):
        for seed in sorted({p["seed"] for p in results["points"] if p["variant"] == name}):
            ps = sorted((p for p in results["points"] if p["variant"] == name and p["seed"] == seed),
                        key=lambda p: p["step"])
            hit = next((p for p in ps if p["ap50"] is not None and p["ap50"] >= target), None)
            p = hit or ps[-1]
            when = f"{p['train_s']:.0f}" if hit else f"> {p['train_s']:.0f}"
            ap = "-" if p["ap50"] is None else f"{p['ap50']:.3f}"
            lines.append(f"| {name} | {seed} | {p['step'] if hit else 'not by ' + str(p['step'])} | {ap} | {when} |")
            means.setdefault(name, []).append((p["train_s"], hit is not None))
        times = means[name]
        bound = "" if all(h for _, h in times) else "> "
        lines.append(f"| {name} | mean | | | {bound}{np.mean([t for t, _ in times]):.0f} |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    names = sorted({p["variant"] for p in results["points"]})
    for i, name in enumerate(names):
        colour = f"C{i}"
        pts = [p for p in results["points"] if p["variant"] == name]
        seeds = sorted({p["seed"] for p in pts})
        # The mean line at the steps that every seed still running was scored at: a seed scored at an extra
        # step shows in its own faint line only, and a seed stopped early leaves the mean to the others.
        def scored_by_all_running(t, pts=pts):
            running = {p["seed"] for p in pts if p["step"] >= t}
            return running == {p["seed"] for p in pts if p["step"] == t}

        steps = sorted(t for t in {p["step"] for p in pts} if scored_by_all_running(t))
        for row, key in enumerate(("ap50", "fg_ari")):
            for col, x in enumerate(("step", "train_s")):
                ax = axes[row, col]
                for s in seeds:
                    ps = sorted((p for p in pts if p["seed"] == s), key=lambda p: p["step"])
                    ax.plot([p[x] for p in ps], [p[key] for p in ps], color=colour, alpha=0.25, lw=1)
                mean_x = [np.mean([p[x] for p in pts if p["step"] == t]) for t in steps]
                mean_y = [np.mean([p[key] for p in pts if p["step"] == t]) for t in steps]
                ax.plot(mean_x, mean_y, color=colour, lw=2, marker="o", label=name if row == col == 0 else None)
                ax.set_xlabel("training step" if x == "step" else "training wall time (s)")
                ax.set_ylabel({"ap50": "AP50 (COCO)", "fg_ari": "FG-ARI"}[key])
    base = [p["baseline_fg_ari"] for p in results["points"] if p.get("baseline_fg_ari") is not None]
    # One line only when the runs agree on it: code of another day (--repo) may score FG-ARI otherwise.
    if base and max(base) - min(base) < 0.02:
        for ax in axes[1]:
            ax.axhline(float(np.mean(base)), color="grey", ls="--", lw=1, label="cell-square baseline")
        axes[1, 0].legend(fontsize=8)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"{results['preset']} preset on {Path(results['data']).name}, {results['split']} split "
                 f"(mean over seeds; each seed faint)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="results JSON (resumed when it exists)")
    p.add_argument("--data", help="scene store to train on and score (its train and --split splits)")
    p.add_argument("--preset", default="demo", help="the preset every variant starts from (default: demo)")
    p.add_argument("--variant", action="append", default=[], help="NAME:SECTION.NAME=VALUE,... (repeatable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, nargs="+",
                   help="scoring steps (default: 200 400 600 800); without --variant, the steps to tabulate")
    p.add_argument("--split", default="val", help="split to score on (default: val; keep test for the end)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per training (default: 2)")
    p.add_argument("--runs", help="folder for the runs (default: beside --out, named after it)")
    p.add_argument("--repo", help="the checkout whose `python -m space` trains and scores, e.g. a git worktree of "
                                  "an earlier commit to compare with side by side (default: this one)")
    p.add_argument("--plot", help="draw the figure here (PNG) from --out, and print the table")
    p.add_argument("--markdown", action="store_true",
                   help="print the table alone (BENCHMARKS.md's tables are this output: bench/tables.py)")
    p.add_argument("--target", type=float, metavar="AP50",
                   help="print, instead of the table, each seed's first scored step at this validation AP50 "
                        "and the training time to it (the demo's target is 0.5)")
    p.add_argument("--with", dest="also", nargs="+", default=[], metavar="JSON",
                   help="more results files to draw and tabulate with --out (variants run as separate processes)")
    ns = p.parse_args(argv)
    if ns.variant:
        if not ns.data:
            p.error("--data is needed to train variants")
        results = train_and_score(ns)
    else:
        if not Path(ns.out).exists():
            p.error(f"{ns.out} does not exist; give --variant and --data to train")
        results = json.loads(Path(ns.out).read_text())
    for extra in ns.also:
        if not Path(extra).exists():
            p.error(f"--with {extra}: no such results file")
        results["points"] = results["points"] + json.loads(Path(extra).read_text())["points"]
    shown = dict(results, points=[p for p in results["points"] if not ns.steps or p["step"] in ns.steps])
    print(target_table(results, ns.target) if ns.target is not None else table(shown))
    if ns.markdown:
        return 0
    if ns.plot:
        plot(results, ns.plot)
        print(f"wrote {ns.plot}", file=sys.stderr)
    print(json.dumps({"points": len(results["points"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
