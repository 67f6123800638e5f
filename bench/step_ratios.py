"""The training step side by side: this code, the paper's computation written plainly, and an earlier release.

    python bench/step_ratios.py --preset room3d_small --batch 16 --rounds 2 \
        --release ../space-2026-12-01 --out bench/results/step_ratios_room3d_small.json
    python bench/step_ratios.py --from bench/results/step_ratios_room3d_small.json --markdown

Each round runs, one after another in fresh processes, `bench/step_latency.py` three ways:
- `current`: this checkout with the preset's settings (what training does);
- `straightforward`: this checkout with `--straightforward` (full-canvas compositing, the tiled spatial
  broadcast, no activation checkpointing, glibc's allocator: the plain model the optimisations are tested
  against);
- `release`: `bench/step_latency.py` of another checkout (`--release`, e.g. a git worktree of an earlier
  commit), with that checkout's own preset, as a user of that release had it.
Taking turns round by round spreads a machine's drift over all three. The table gives each variant's
median over rounds of its median step, its peak memory, and its time as a multiple of `current`'s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import add_from_flags, commit, emit, machine, print_from  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("current", "straightforward", "release")


def run_variant(repo: Path, flags: list[str]) -> dict:
    """One `bench/step_latency.py` process in `repo`: its last line, one JSON object."""
    cmd = [sys.executable, "bench/step_latency.py", *flags]
    r = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} in {repo} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def table(results: dict) -> str:
    rows = {}
    for r in results["runs"]:
        rows.setdefault(r["variant"], []).append(r)
    base = statistics.median(r["median_s"] for r in rows["current"])
    lines = ["| preset | variant | code | rounds | s/step (median of rounds, min-max) | peak RSS "
             "| time against current |", "|---|---|---|---|---|---|---|"]
    for name in VARIANTS:
        if name not in rows:
            continue
        rs = rows[name]
        med = statistics.median(r["median_s"] for r in rs)
        lo, hi = min(r["median_s"] for r in rs), max(r["median_s"] for r in rs)
        code = results["commits"][name]
        lines.append(f"| {results['preset']} | {name} | {code} | {len(rs)} | {med:.2f} ({lo:.2f}-{hi:.2f}) | "
                     f"{max(r['peak_rss_mib'] for r in rs):,.0f} MiB | {med / base:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="room3d_small")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="timed steps per process (default: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: 1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="times each variant runs, taking turns (default: 2)")
    p.add_argument("--release", help="another checkout to time with its own bench/step_latency.py and preset "
                                     "(left out: current and straightforward only)")
    p.add_argument("--out", help="results JSON")
    add_from_flags(p)
    ns = p.parse_args(argv)
    if print_from(ns, table):
        return 0
    release = Path(ns.release).resolve() if ns.release else None
    if release and not (release / "bench" / "step_latency.py").exists():
        p.error(f"--release {ns.release}: no bench/step_latency.py there; give a checkout of this project")
    common = ["--preset", ns.preset, "--batch", str(ns.batch), "--steps", str(ns.steps), "--warmup",
              str(ns.warmup), "--threads", str(ns.threads), "--device", "cpu"]
    plan = [("current", REPO, common), ("straightforward", REPO, [*common, "--straightforward"])]
    if release:
        plan.append(("release", release, common))
    results = {"preset": ns.preset, "batch": ns.batch, "machine": machine(),
               "date": time.strftime("%Y-%m-%d %H:%M"),
               "commits": {name: commit(repo, short=True) for name, repo, _ in plan},
               "command": " ".join(["python bench/step_ratios.py", *(sys.argv[1:] if argv is None else argv)]),
               "runs": []}
    for i in range(ns.rounds):
        for name, repo, flags in plan:
            r = run_variant(repo, flags)
            results["runs"].append({"variant": name, "round": i, **r})
            print(f"round {i} {name}: {r['median_s']:.2f} s/step, {r['peak_rss_mib']:,} MiB", file=sys.stderr,
                  flush=True)
            if ns.out:
                Path(ns.out).write_text(json.dumps(results, indent=1))
    emit(results, table(results), ns.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
