"""How fast 3D-Room frames are made: per process, end to end, and projected to the paper's dataset.

Three parts (pick with --part; default all):

  scenes     scenes/s of one process with masks and full ground truth
             (Room3DRenderer.sample_frame over frame_rng seeds), Small (4-8 objects) and Large (18-24),
             median of --runs runs of --scenes frames after --warmup frames, plus a breakdown of where
             the time goes (scene sampling, pose, update_scene, RGB render, segmentation render,
             ground-truth numpy work), measured by timing those calls in a separate, instrumented run.
  e2e        `python -m datagen room3d` as a subprocess: frames/s written to the store (zarr included),
             for --workers 1, --workers 2, and --workers 2 with LP_NUM_THREADS=1 (llvmpipe's own thread
             count), wall time and peak memory (/usr/bin/time -v's max RSS of the largest single process,
             and the summed RSS of the whole process tree sampled from /proc every 0.1 s).
             Each configuration runs at two dataset sizes (--sizes), --repeats times each, after waiting
             for the shared machine to go quiet (--quiet-wait); the fastest repeat is kept and all are
             listed, with the CPU time other processes used meanwhile. The two peak RSS figures show
             whether memory grows with N; the slope between the sizes is the steady rate.
  project    projected wall time of the paper's 77,000 frames (63k/7k/7k) from the rate of the largest
             run (start-up included), and from the slope between the sizes.

Prints a readable table and, last, one JSON line with every result; --out also writes it to a file, and
--from prints a table of earlier runs (such files, or one whose "runs" lists them) instead of measuring:
--table scenes (per process, the default), breakdown, e2e or projection (--markdown: the table alone, as
bench/tables.py reads it).

    MUJOCO_GL=egl python bench/room3d_speed.py                 # everything, a few minutes
    python bench/room3d_speed.py --part scenes --runs 3 --scenes 300
    python bench/room3d_speed.py --part e2e --presets large --sizes 1000 3000
    python bench/room3d_speed.py --from bench/results/room3d_scenes_2026-11-25.json --markdown
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("MUJOCO_GL", "egl")

from benchlib import add_from_flags, emit, load_runs, machine  # noqa: E402  (bench/ is on sys.path when a script runs)

PRESETS = {"small": (4, 8), "large": (18, 24)}
PAPER_SPLITS = {"train": 63000, "val": 7000, "test": 7000}
PAPER_FRAMES = sum(PAPER_SPLITS.values())
REQ_SCENES_PER_S = 80.0
REQ_DATASET_MINUTES = 20.0


def cpu_ticks() -> tuple[int, int, int]:
    """(busy, steal, total) jiffies of all CPUs from /proc/stat; busy excludes idle, iowait and steal."""
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:]]
    idle, iowait, steal = v[3], v[4], v[7] if len(v) > 7 else 0
    total = sum(v[:8])
    return total - idle - iowait - steal, steal, total


def wait_quiet(max_wait: float, threshold: float = 0.25, window: float = 3.0) -> float:
    """Wait (up to max_wait s) until the machine's other load stays under `threshold` CPUs for `window`
    seconds; returns the load seen in the last window. Other sessions share this machine."""
    t_end = time.monotonic() + max_wait
    tick = os.sysconf("SC_CLK_TCK")
    while True:
        a = cpu_ticks()
        time.sleep(window)
        b = cpu_ticks()
        load = (b[0] - a[0]) / tick / window
        if load < threshold or time.monotonic() >= t_end:
            return load


def peak_rss_mb_self() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------- part: scenes


def bench_scenes(preset: str, size: int, n: int, runs: int, warmup: int, seed: int) -> dict:
    from datagen.config import Room3DConfig
    from datagen.room3d import Room3DRenderer, frame_rng

    cfg = Room3DConfig(objects=PRESETS[preset], image_size=size).validate()
    t = time.perf_counter()
    r = Room3DRenderer(cfg)
    setup_s = time.perf_counter() - t
    try:
        for i in range(warmup):
            r.sample_frame(frame_rng(seed, 99, i))
        rates = []
        for run in range(runs):
            t = time.perf_counter()
            for i in range(n):
                r.sample_frame(frame_rng(seed, run, i))
            rates.append(n / (time.perf_counter() - t))
        breakdown = _breakdown(r, n, seed)
    finally:
        r.close()
    return {
        "preset": preset,
        "objects": list(PRESETS[preset]),
        "image_size": size,
        "scenes_per_run": n,
        "runs": runs,
        "renderer_setup_s": round(setup_s, 3),
        "scenes_per_s_runs": [round(x, 1) for x in rates],
        "scenes_per_s_median": round(statistics.median(rates), 1),
        "ms_per_scene_median": round(1000 / statistics.median(rates), 2),
        "pass_80_per_s": statistics.median(rates) >= REQ_SCENES_PER_S,
        "breakdown": breakdown,
    }


def _breakdown(r, n: int, seed: int) -> dict:
    """Time the parts of sample_frame by wrapping the calls it makes (on this renderer only)."""
    import datagen.room3d as room3d

    acc = {k: 0.0 for k in ("sample_scene", "pose", "update_scene", "render_rgb", "render_seg",
                            "gt_project_box", "gt_covered_pixels", "render_total", "frame_total")}
    calls = {"scenes_drawn": 0, "objects_placed": 0, "objects_counted": 0}

    def timed(key, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[key] += time.perf_counter() - t
        return wrapper

    gl = r.renderer
    orig = {
        "sample_scene": room3d.sample_scene,
        "project_box": room3d.Camera.project_box,
        "covered_pixels": room3d.Camera.covered_pixels,
    }
    orig_render_gl = gl.render

    def render_gl(*a, **k):
        key = "render_seg" if gl._segmentation_rendering else "render_rgb"
        return timed(key, orig_render_gl)(*a, **k)

    orig_frame = r.frame

    def frame(scene):
        calls["scenes_drawn"] += 1
        calls["objects_placed"] += len(scene.shapes)
        out = timed("frame_total", orig_frame)(scene)
        calls["objects_counted"] += int(out["n_objects"])
        return out

    room3d.sample_scene = timed("sample_scene", orig["sample_scene"])
    room3d.Camera.project_box = timed("gt_project_box", orig["project_box"])
    room3d.Camera.covered_pixels = timed("gt_covered_pixels", orig["covered_pixels"])
    gl.render = render_gl
    gl.update_scene = timed("update_scene", gl.update_scene)
    r._pose = timed("pose", r._pose)
    r.render = timed("render_total", r.render)
    r.frame = frame
    try:
        t = time.perf_counter()
        for i in range(n):
            r.sample_frame(room3d.frame_rng(seed, 50, i))
        total = time.perf_counter() - t
    finally:
        room3d.sample_scene = orig["sample_scene"]
        room3d.Camera.project_box = orig["project_box"]
        room3d.Camera.covered_pixels = orig["covered_pixels"]
        for name in ("render", "update_scene"):
            gl.__dict__.pop(name, None)
        for name in ("_pose", "render", "frame"):
            r.__dict__.pop(name, None)
    gt_total = acc["frame_total"] - acc["render_total"]
    render_other = acc["render_total"] - acc["pose"] - acc["update_scene"] - acc["render_rgb"] - acc["render_seg"]
    parts = {
        "sample_scene (placement)": acc["sample_scene"],
        "pose (_pose, mj_kinematics)": acc["pose"],
        "update_scene": acc["update_scene"],
        "RGB render (+readback)": acc["render_rgb"],
        "segmentation render (+remap)": acc["render_seg"],
        "render(): camera, other": render_other,
        "GT: project_box": acc["gt_project_box"],
        "GT: covered_pixels (ray cast)": acc["gt_covered_pixels"],
        "GT: masks, lut, bincount, rest": gt_total - acc["gt_project_box"] - acc["gt_covered_pixels"],
        "sample_frame loop, other": total - acc["sample_scene"] - acc["frame_total"],
    }
    return {
        "frames": n,
        "scenes_drawn": calls["scenes_drawn"],
        "objects_placed_per_scene": round(calls["objects_placed"] / max(calls["scenes_drawn"], 1), 2),
        "objects_counted_per_scene": round(calls["objects_counted"] / max(calls["scenes_drawn"], 1), 2),
        "instrumented_frames_per_s": round(n / total, 1),
        "ms_per_frame": {k: round(1000 * v / n, 3) for k, v in parts.items()},
        "share": {k: round(v / total, 3) for k, v in parts.items()},
        "ground_truth_ms_per_frame": round(1000 * gt_total / n, 3),
    }


# ------------------------------------------------------------------------------------------- part: e2e


def _tree_rss_kb(root_pid: int) -> int:
    """Summed VmRSS of root_pid and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/status") as fh:
                m = re.search(r"^VmRSS:\s+(\d+)", fh.read(), re.M)
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
        rss[int(d)] = int(m.group(1)) if m else 0
    total, stack = 0, [root_pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack.extend(children.get(p, ()))
    return total


def run_generate(out: str, preset: str, frames: int, workers: int, lp_threads: int | None, size: int,
                 shard_size: int, extra_env: dict | None = None) -> dict:
    env = dict(os.environ)
    env["MUJOCO_GL"] = env.get("MUJOCO_GL", "egl")
    env.pop("LP_NUM_THREADS", None)
    if lp_threads is not None:
        env["LP_NUM_THREADS"] = str(lp_threads)
    env.update(extra_env or {})
    lo, hi = PRESETS[preset]
    cmd = [sys.executable, "-m", "datagen", "room3d", out, "--objects", str(lo), str(hi),
           "--image-size", str(size), "--split", f"train={frames}", "--workers", str(workers),
           "--shard-size", str(shard_size), "--quiet", "--overwrite"]
    gnu_time = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
    full = ([gnu_time, "-v"] if gnu_time else []) + cmd
    if os.path.exists(out):
        shutil.rmtree(out)
    peak_tree = 0
    stop = threading.Event()

    tick = os.sysconf("SC_CLK_TCK")
    c0 = cpu_ticks()
    t = time.perf_counter()
    proc = subprocess.Popen(full, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def sample():
        nonlocal peak_tree
        while not stop.is_set():
            peak_tree = max(peak_tree, _tree_rss_kb(proc.pid))
            stop.wait(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t
    c1 = cpu_ticks()
    stop.set()
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    max_rss_kb = None
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    if m:
        max_rss_kb = int(m.group(1))
    else:
        max_rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # max over all children so far
    m_u = re.search(r"User time \(seconds\): ([\d.]+)", stderr)
    m_s = re.search(r"System time \(seconds\): ([\d.]+)", stderr)
    own_cpu = float(m_u.group(1)) + float(m_s.group(1)) if m_u and m_s else None
    machine_busy = (c1[0] - c0[0]) / tick
    disk = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(out) for f in fs)
    shell_cmd = " ".join(([f"LP_NUM_THREADS={lp_threads}"] if lp_threads is not None else [])
                         + ["MUJOCO_GL=egl", "/usr/bin/time -v" if gnu_time else ""]
                         + ["python"] + cmd[1:]).replace("  ", " ")
    return {
        "preset": preset,
        "frames": frames,
        "workers": workers,
        "lp_num_threads": lp_threads if lp_threads is not None else "unset",
        "wall_s": round(wall, 2),
        "frames_per_s": round(frames / wall, 1),
        "max_rss_single_process_mb": round(max_rss_kb / 1024, 1),
        "peak_tree_rss_mb": round(peak_tree / 1024, 1),
        "store_mb": round(disk / 2**20, 1),
        # CPU seconds of the run itself (user + sys, workers included) vs of the whole machine meanwhile:
        # their difference is other load; steal is time the hypervisor gave to other guests.
        "cpu_s_run": round(own_cpu, 1) if own_cpu is not None else None,
        "cpu_s_machine": round(machine_busy, 1),
        "cpu_s_other_load": round(machine_busy - own_cpu, 1) if own_cpu is not None else None,
        "steal_s": round((c1[1] - c0[1]) / tick, 1),
        "command": shell_cmd,
    }


def bench_e2e(presets, sizes, configs, image_size, shard_size, workdir, repeats, quiet_wait) -> list[dict]:
    """Every (preset, config, size) `repeats` times; the fastest run is kept (best of N: other sessions'
    load on this shared machine only ever slows a run down), the others are listed beside it."""
    results = []
    for preset in presets:
        for workers, lp in configs:
            for n in sizes:
                out = os.path.join(workdir, f"{preset}_w{workers}_lp{lp or 'unset'}_{n}.zarr")
                reps = []
                for _ in range(repeats):
                    pre_load = wait_quiet(quiet_wait) if quiet_wait > 0 else None
                    res = run_generate(out, preset, n, workers, lp, image_size, shard_size)
                    shutil.rmtree(out, ignore_errors=True)
                    res["other_load_before_cpus"] = round(pre_load, 2) if pre_load is not None else None
                    reps.append(res)
                    print(f"  e2e {preset:5} workers={workers} LP_NUM_THREADS={str(lp or 'unset'):5} N={n:6}: "
                          f"{res['wall_s']:7.1f} s  {res['frames_per_s']:6.1f} frames/s  "
                          f"max RSS/process {res['max_rss_single_process_mb']:6.0f} MB  "
                          f"tree {res['peak_tree_rss_mb']:6.0f} MB  cpu run {res['cpu_s_run']} s, "
                          f"other load {res['cpu_s_other_load']} s, steal {res['steal_s']} s", flush=True)
                best = min(reps, key=lambda r: r["wall_s"])
                best = dict(best, wall_s_repeats=[r["wall_s"] for r in reps],
                            frames_per_s_repeats=[r["frames_per_s"] for r in reps],
                            other_load_s_repeats=[r["cpu_s_other_load"] for r in reps])
                results.append(best)
    return results


def project(e2e: list[dict]) -> list[dict]:
    """Steady rate from the slope between the two sizes of each configuration; start-up as intercept."""
    groups: dict[tuple, list[dict]] = {}
    for r in e2e:
        groups.setdefault((r["preset"], r["workers"], r["lp_num_threads"]), []).append(r)
    out = []
    for (preset, workers, lp), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["frames"])
        if len(rs) >= 2 and rs[-1]["frames"] > rs[0]["frames"]:
            a, b = rs[0], rs[-1]
            rate = (b["frames"] - a["frames"]) / max(b["wall_s"] - a["wall_s"], 1e-9)
            fixed = max(a["wall_s"] - a["frames"] / rate, 0.0)
        else:
            b = rs[-1]
            rate, fixed = b["frames"] / b["wall_s"], 0.0
        # Primary projection: the plain rate of the largest run (start-up included, so slightly
        # pessimistic). The slope between sizes removes start-up but amplifies noise; shown beside it.
        overall = rs[-1]["frames"] / rs[-1]["wall_s"]
        t = PAPER_FRAMES / overall
        t_slope = fixed + PAPER_FRAMES / rate
        rss = [r["peak_tree_rss_mb"] for r in rs]
        out.append({
            "preset": preset, "workers": workers, "lp_num_threads": lp,
            "frames_per_s_largest_n": round(overall, 1),
            "steady_frames_per_s_slope": round(rate, 1), "startup_s_slope": round(fixed, 1),
            "projected_77k_min": round(t / 60, 1),
            "projected_77k_min_slope": round(t_slope / 60, 1),
            "pass_20_min": t / 60 <= REQ_DATASET_MINUTES,
            "peak_tree_rss_mb_by_n": {str(r["frames"]): r["peak_tree_rss_mb"] for r in rs},
            "rss_growth_mb": round(rss[-1] - rss[0], 1),
        })
    return out


# ------------------------------------------------------------------------------------------------ main


def print_scene_table(rows):
    print("\n== per-process scenes/s with masks and full ground truth "
          f"(median of runs; requirement >= {REQ_SCENES_PER_S:.0f}/s) ==")
    print(f"{'preset':6} {'objects':7} {'size':4} {'runs (scenes/s)':28} {'median':>7} {'ms/scene':>8} {'pass':>5}")
    for r in rows:
        print(f"{r['preset']:6} {'-'.join(map(str, r['objects'])):7} {r['image_size']:4} "
              f"{', '.join(f'{x:.1f}' for x in r['scenes_per_s_runs']):28} {r['scenes_per_s_median']:7.1f} "
              f"{r['ms_per_scene_median']:8.2f} {'yes' if r['pass_80_per_s'] else 'NO':>5}")
    for r in rows:
        b = r["breakdown"]
        print(f"\n  breakdown, {r['preset']} ({b['frames']} frames, {b['scenes_drawn']} scenes drawn, "
              f"{b['objects_placed_per_scene']} placed / {b['objects_counted_per_scene']} counted per scene, "
              f"instrumented {b['instrumented_frames_per_s']} frames/s):")
        for k, v in b["ms_per_frame"].items():
            print(f"    {k:34} {v:7.3f} ms  {100 * b['share'][k]:5.1f} %")
        print(f"    {'ground truth (numpy) total':34} {b['ground_truth_ms_per_frame']:7.3f} ms")


def scenes_markdown(runs: list[dict]) -> str:
    """The per-process rates of every run with a 'scenes' part, a row per preset. Markdown."""
    lines = ["| preset | objects | LP_NUM_THREADS | runs (scenes/s) | median | ms/scene | "
             f"≥ {REQ_SCENES_PER_S:.0f}/s |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        for r in run.get("scenes", []):
            lines.append(f"| {r['preset']} | {'-'.join(map(str, r['objects']))} | {run['scenes_lp_num_threads']} | "
                         f"{', '.join(f'{x:.1f}' for x in r['scenes_per_s_runs'])} | {r['scenes_per_s_median']:.1f} | "
                         f"{r['ms_per_scene_median']:.2f} | {'pass' if r['pass_80_per_s'] else 'fail'} |")
    return "\n".join(lines)


def breakdown_markdown(runs: list[dict]) -> str:
    """Where a frame's time goes (the instrumented run of each preset), ms per frame and share. Markdown."""
    rows = [r for run in runs for r in run.get("scenes", []) if r.get("breakdown")]
    if not rows:
        return "(no breakdown in these results)"
    parts = list(rows[0]["breakdown"]["ms_per_frame"])
    head = " | ".join(f"{r['preset']} ms" for r in rows)
    lines = [f"| part | {head} | {rows[-1]['preset']} share |", "|---" * (len(rows) + 2) + "|"]
    for k in parts:
        ms = " | ".join(f"{r['breakdown']['ms_per_frame'][k]:.3f}" for r in rows)
        lines.append(f"| {k} | {ms} | {100 * rows[-1]['breakdown']['share'][k]:.1f}% |")
    gt = " | ".join(f"**{r['breakdown']['ground_truth_ms_per_frame']:.3f}**" for r in rows)
    last = rows[-1]["breakdown"]
    share = last["ground_truth_ms_per_frame"] / sum(last["ms_per_frame"].values())
    lines.append(f"| **ground truth (numpy), total** | {gt} | **{100 * share:.1f}%** |")
    return "\n".join(lines)


def _lp(v) -> str:
    return "unset" if v in (None, "unset") else str(v)


def e2e_markdown(runs: list[dict]) -> str:
    """Each end-to-end `python -m datagen room3d` configuration and size: the fastest repeat. Markdown."""
    lines = ["| preset | workers | LP_NUM_THREADS | N | wall s (repeats) | frames/s | other load (CPU s) | "
             "max RSS / process | tree RSS |", "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        for r in run.get("e2e", []):
            reps = ", ".join(f"{w:.1f}" for w in r.get("wall_s_repeats", [r["wall_s"]]))
            lines.append(f"| {r['preset']} | {r['workers']} | {_lp(r['lp_num_threads'])} | {r['frames']} | {reps} | "
                         f"{r['frames_per_s']:.1f} | {r['cpu_s_other_load']} | "
                         f"{r['max_rss_single_process_mb']:.0f} MB | {r['peak_tree_rss_mb']:.0f} MB |")
    return "\n".join(lines)


def projection_markdown(runs: list[dict]) -> str:
    """The paper's 77,000 frames projected from each configuration's largest run. Markdown."""
    lines = ["| preset | workers | LP_NUM_THREADS | frames/s | projected 77k | "
             f"≤ {REQ_DATASET_MINUTES:.0f} min | tree RSS by N (MB) |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        for r in run.get("projection", []):
            by_n = ", ".join(f"{n}: {v:.0f}" for n, v in r["peak_tree_rss_mb_by_n"].items())
            lines.append(f"| {r['preset']} | {r['workers']} | {_lp(r['lp_num_threads'])} | "
                         f"{r['frames_per_s_largest_n']:.1f} | {r['projected_77k_min']:.1f} min | "
                         f"{'pass' if r['pass_20_min'] else 'fail'} | {by_n} |")
    return "\n".join(lines)


TABLES = {"scenes": scenes_markdown, "breakdown": breakdown_markdown, "e2e": e2e_markdown,
          "projection": projection_markdown}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", nargs="+", choices=("scenes", "e2e", "project"), default=["scenes", "e2e", "project"])
    p.add_argument("--presets", nargs="+", choices=tuple(PRESETS), default=["small", "large"])
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--scenes", type=int, default=300, help="frames per timed run (default: %(default)s)")
    p.add_argument("--runs", type=int, default=3, help="timed runs, median reported (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=30, help="untimed frames first (default: %(default)s)")
    p.add_argument("--lp-threads", type=int, default=None,
                   help="set LP_NUM_THREADS for the 'scenes' part (llvmpipe threads; default: unset)")
    p.add_argument("--sizes", nargs="+", type=int, default=[1000, 3000],
                   help="frames per e2e run; two sizes give the steady rate and the memory growth "
                        "(default: %(default)s)")
    p.add_argument("--configs", nargs="+", default=["1:unset", "2:unset", "2:1"], metavar="WORKERS:LP",
                   help="e2e configurations WORKERS:LP_NUM_THREADS ('unset' leaves it unset) "
                        "(default: %(default)s)")
    p.add_argument("--e2e-presets", nargs="+", choices=tuple(PRESETS), default=None,
                   help="presets for the e2e part (default: --presets)")
    p.add_argument("--repeats", type=int, default=2,
                   help="e2e runs per (preset, config, size); the fastest is kept (default: %(default)s)")
    p.add_argument("--quiet-wait", type=float, default=60.0,
                   help="before each e2e run and each scenes preset, wait up to this many seconds for other "
                        "load to drop under 0.25 CPUs (0: do not wait; default: %(default)s)")
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--workdir", default=None, help="where e2e stores go (default: a temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="JSON", help="also write the results here")
    add_from_flags(p, many=True)  # the tables of earlier runs
    p.add_argument("--table", choices=tuple(TABLES), default="scenes",
                   help="with --from: which table (default: %(default)s)")
    ns = p.parse_args(argv)
    if ns.source:
        runs = load_runs(ns.source)
        emit({"runs": len(runs)}, TABLES[ns.table](runs), markdown=ns.markdown)
        return 0
    if ns.lp_threads is not None:
        os.environ["LP_NUM_THREADS"] = str(ns.lp_threads)  # read by Mesa when the GL context is made

    info = machine()
    result = {"bench": "room3d_speed", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": info, "argv": sys.argv[1:]}
    print(f"room3d_speed  {result['date']}  {info['cpus']} CPUs  {info['cpu_model']}  "
          f"load(1m) {info['loadavg_1m']:.2f}  MUJOCO_GL={os.environ.get('MUJOCO_GL')}  "
          f"LP_NUM_THREADS={os.environ.get('LP_NUM_THREADS', 'unset')}")

    if "scenes" in ns.part:
        rows = []
        for preset in ns.presets:
            if ns.quiet_wait > 0:
                wait_quiet(ns.quiet_wait)
            rows.append(bench_scenes(preset, ns.image_size, ns.scenes, ns.runs, ns.warmup, ns.seed))
        print_scene_table(rows)
        result["scenes"] = rows
        result["scenes_lp_num_threads"] = os.environ.get("LP_NUM_THREADS", "unset")
        result["scenes_peak_rss_mb"] = round(peak_rss_mb_self(), 1)

    if "e2e" in ns.part or "project" in ns.part:
        configs = []
        for c in ns.configs:
            w, _, lp = c.partition(":")
            configs.append((int(w), None if lp in ("", "unset") else int(lp)))
        workdir = ns.workdir or tempfile.mkdtemp(prefix="room3d_bench_")
        os.makedirs(workdir, exist_ok=True)
        print(f"\n== end to end: python -m datagen room3d (zarr writing included), stores under {workdir} ==",
              flush=True)
        e2e = bench_e2e(ns.e2e_presets or ns.presets, sorted(ns.sizes), configs, ns.image_size,
                        ns.shard_size, workdir, ns.repeats, ns.quiet_wait)
        result["e2e"] = e2e
        if ns.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        proj = project(e2e)
        result["projection"] = proj
        print(f"\n== projection to the paper's {PAPER_FRAMES:,} frames (63k/7k/7k); requirement <= "
              f"{REQ_DATASET_MINUTES:.0f} min on this machine, memory not growing with N ==")
        print(f"{'preset':6} {'workers':>7} {'LP':>5} {'f/s @maxN':>9} {'77k min':>8} {'pass':>5} "
              f"{'slope f/s':>9} {'77k min':>8}  peak tree RSS by N (MB)")
        for r in proj:
            print(f"{r['preset']:6} {r['workers']:7} {str(r['lp_num_threads']):>5} {r['frames_per_s_largest_n']:9.1f} "
                  f"{r['projected_77k_min']:8.1f} {'yes' if r['pass_20_min'] else 'NO':>5} "
                  f"{r['steady_frames_per_s_slope']:9.1f} {r['projected_77k_min_slope']:8.1f}  "
                  f"{r['peak_tree_rss_mb_by_n']} (growth {r['rss_growth_mb']:+.0f})")

    if ns.out:
        with open(ns.out, "w") as fh:
            json.dump(result, fh, indent=1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
