"""One SPACE training step (forward, backward, clipping, both optimiser steps): latency, memory, FLOP rate.

    python bench/step_latency.py --preset room3d_large --batch 16
    python bench/step_latency.py --preset room3d_small --batch 4 --sparse-threshold 0.01
    python bench/step_latency.py --preset room3d_small --batch 16 --out bench/results/step_latency.json
    python bench/step_latency.py --from bench/results/step_latency.json --markdown

Median of --steps timed steps after --warmup untimed ones, on random images (the step's cost does not
depend on the pixels, only on the glimpse sizes, which start at the z_scale prior's). FLOPs are counted
with torch.utils.flop_counter (convolutions and matrix products, forward and backward). Peak memory is the
process's peak resident set (ru_maxrss), which includes the model and the interpreter. The last line
printed is one JSON object. --out also adds it to a results file's list of runs; --from prints the table
of such a file instead of measuring (--markdown: the table alone, as bench/tables.py reads it). A results
file may also give the public SPACE port's figures per preset ("port": {"step_s": ..., "peak_gb": ...}),
which add the speed-up and memory-share columns.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import add_from_flags, print_from  # noqa: E402
from space.config import resolve_config  # noqa: E402
from space.config import PRESETS, Config  # noqa: E402
from space.memory import HOST_ALLOCATORS, exec_with_tcmalloc, set_host_allocator  # noqa: E402
from space.model import SPACE  # noqa: E402
from space.devices import checkpoint_images, use_amp  # noqa: E402
from space.train import optimisers, train_step  # noqa: E402


def straightforward(model: SPACE) -> None:
    """Swap this model's optimised computations for the plain ones they are tested against: full-canvas
    compositing for the windowed one, the tiled spatial broadcast for `broadcast_decode`. Other models in
    the process keep theirs."""
    import space.model

    def composite_full(maps, z_pres, depth_weight, centre, size, n, premultiplied=True, eps=None):
        return space.model.composite(maps, z_pres, depth_weight, centre, size, n, premultiplied)

    render = model.fg.render

    def render_full(*args, **kwargs):  # Foreground.render, with space.model.composite for its compositing
        windowed = space.model.composite_windowed
        space.model.composite_windowed = composite_full
        try:
            return render(*args, **kwargs)
        finally:
            space.model.composite_windowed = windowed

    model.fg.render = render_full
    model.bg.comp_decoder.forward = model.bg.comp_decoder.tiled


def fmt_range(r: dict) -> str:
    return f"{r['median_s']:.2f} ({r['min_s']:.2f}-{r['max_s']:.2f})"


def allocator(r: dict) -> str:
    """A run's host allocator (train.host_allocator) as the table names it; runs recorded before the
    setting existed give the mmap threshold alone (0: glibc's own)."""
    mode = r.get("host_allocator") or ("lean" if r["malloc_mmap_threshold_mib"] else "glibc")
    return {"heap": "heap", "glibc": "glibc's", "tcmalloc": "tcmalloc"}.get(mode) or \
        f"lean ({r['malloc_mmap_threshold_mib']} MiB)"


def table(results: dict) -> str:
    """The runs of a results file, one row each: latency, FLOPs, memory; against the port when it gives
    its figures. Markdown."""
    port = results.get("port", {})
    port_s, port_gb = port.get("step_s", {}), port.get("peak_gb", {})
    head = ["preset", "grid, K", "batch", "checkpointing", "allocator", "steps (warm-up)",
            "s/step (median, min-max)", "GFLOP/step", "GFLOP/s", "peak RSS"]
    gpu = any(r.get("peak_gpu_mib") is not None for r in results["runs"])
    cpu_bf16 = not gpu and any(r.get("amp") for r in results["runs"])
    if cpu_bf16:  # CPU runs under bf16 autocast beside float32 ones
        head.insert(5, "arithmetic")
    if gpu:  # runs on a GPU: what ran there, and its memory
        head += ["device", "bf16", "torch.compile", "steps/s", "peak GPU memory"]
    if port_s:
        head += ["port s/step", "speed-up"]
    if port_gb:
        head += ["port memory", "memory share"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["runs"]:
        ckpt = r["checkpoint_images"]
        cells = [r["preset"], f"{r['grid']}x{r['grid']}, K={r['K']}", str(r["batch"]),
                 f"{ckpt} images" if ckpt else "off",
                 allocator(r), *(["bf16" if r.get("amp") else "float32"] if cpu_bf16 else []),
                 f"{r['steps']} ({r['warmup']})", fmt_range(r), f"{r['gflop_step']:.0f}",
                 f"{r['gflop_step'] / r['median_s']:.0f}", f"{r['peak_rss_mib']:,.0f} MiB"]
        if gpu:
            mib = r.get("peak_gpu_mib")
            cells += [r["device"], "yes" if r.get("amp") else "no", r.get("compile") or "off",
                      f"{1 / r['median_s']:.1f}", "" if mib is None else f"{mib:,.0f} MiB"]
        if port_s:
            s = port_s.get(r["preset"])
            cells += [f"{s:.1f}", f"{s / r['median_s']:.1f}x"] if s else ["", ""]
        if port_gb:
            gb = port_gb.get(r["preset"])
            # MiB against the port's GB of 10^9 bytes
            cells += [f"{gb:.1f} GB", f"{r['peak_rss_mib'] * 2**20 / (gb * 1e9):.2f}"] if gb else ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="room3d_large", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-channels-last", action="store_true", help="NCHW instead of channels_last")
    p.add_argument("--amp", action="store_true", help="bf16 autocast, as train.amp (GPU and CPU)")
    p.add_argument("--compile", choices=("default", "reduce-overhead", "max-autotune"), default=None,
                   help="torch.compile the model with this mode (reduce-overhead also replays CUDA graphs); "
                        "the warm-up steps include the compilation")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.NAME=VALUE",
                   help="a setting over the preset, as `python -m space train --set` (repeatable), e.g. "
                        "model.grid_size=8")
    p.add_argument("--sparse-threshold", type=float, default=0.0, help="skip glimpses below this z_pres probability")
    p.add_argument("--checkpoint-images", type=int, default=None,
                   help="default: the preset's. Images per foreground chunk (train.checkpoint_images; "
                        "0 = off, -1 = as training: 2 on CPU, off on CUDA)")
    p.add_argument("--host-allocator", choices=HOST_ALLOCATORS, default=None,
                   help="train.host_allocator (space/memory.py; default: the preset's)")
    p.add_argument("--malloc-mmap-threshold-mib", type=int, default=None,
                   help="train.malloc_mmap_threshold_mib, for --host-allocator lean (default: the preset's); 0 = "
                        "the C library's dynamic threshold")
    p.add_argument("--present-share", type=float, default=None,
                   help="force z_pres on in this random share of cells (and off elsewhere), as in a trained "
                        "model, so that --sparse-threshold has cells to skip")
    p.add_argument("--straightforward", action="store_true",
                   help="the paper's computation as space/model.py writes it plainly, without this project's "
                        "optimisations: every glimpse composited on the whole canvas (composite), the spatial "
                        "broadcast tiled (CompDecoder.tiled), no activation checkpointing, glibc's allocator")
    p.add_argument("--out", metavar="JSON", help="also add this run to a results file's runs (made if missing)")
    add_from_flags(p)
    ns = p.parse_args(argv)
    if print_from(ns, table):
        return 0
    preset_train = Config.from_dict(PRESETS[ns.preset]).train
    if ns.straightforward:
        ns.host_allocator, ns.checkpoint_images = "glibc", 0
    ns.host_allocator = ns.host_allocator or preset_train.host_allocator
    if ns.checkpoint_images is None:
        ns.checkpoint_images = preset_train.checkpoint_images
    if ns.malloc_mmap_threshold_mib is None:
        ns.malloc_mmap_threshold_mib = preset_train.malloc_mmap_threshold_mib
    if argv is None:  # run from the shell: preload tcmalloc as `python -m space train` does
        exec_with_tcmalloc(ns.host_allocator)
    # before the first tensor, as training does
    in_effect = set_host_allocator(ns.host_allocator, ns.malloc_mmap_threshold_mib)

    if ns.threads:
        torch.set_num_threads(ns.threads)
    device = torch.device("cuda" if ns.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if ns.device == "auto" else ns.device))
    cfg = resolve_config(ns.preset, None, [*ns.set, f"model.sparse_threshold={ns.sparse_threshold}"])
    torch.manual_seed(0)
    model = SPACE(cfg.model).to(device)
    fmt = torch.contiguous_format if ns.no_channels_last else torch.channels_last
    model = model.to(memory_format=fmt)
    ns.checkpoint_images = checkpoint_images(ns.checkpoint_images, device)
    model.set_checkpoint_images(ns.checkpoint_images)
    if ns.straightforward:
        straightforward(model)
    if ns.present_share is not None:
        # The global RNG, which activation checkpointing restores, so a chunk recomputed by model(x) (DDP,
        # --compile) gets the same cells as its forward pass.
        def present(module, inputs, logits):  # (B, 1, G, G): +6 in a random share of cells, -6 elsewhere
            on = torch.rand(logits.shape) < ns.present_share
            return torch.where(on.to(logits.device), 6.0, -6.0).to(logits.dtype) + 0 * logits

        model.fg.z_pres_net.register_forward_hook(present)
    opt_fg, opt_bg = optimisers(model, cfg.train)
    n = cfg.model.image_size
    x = torch.rand(ns.batch, 3, n, n, device=device).contiguous(memory_format=fmt)

    net = torch.compile(model, mode=ns.compile) if ns.compile else model

    amp = use_amp(ns.amp, device)  # once: it may warn

    def step():  # the trainer's own step
        return train_step(net, x, 0, opt_fg, opt_bg, cfg.train, amp=amp)[0]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(ns.warmup):
        step()
    sync()
    times = []
    glimpses = 0
    for _ in range(ns.steps):
        t = time.perf_counter()
        out = step()
        sync()
        times.append(time.perf_counter() - t)
        glimpses = out["fg"]["glimpses_decoded"]

    # Peak memory of the training steps themselves, before the FLOP count below (which keeps every
    # activation) can raise it.
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None

    from torch.utils.flop_counter import FlopCounterMode

    # The model's FLOPs, without the forward work that checkpointing repeats in the backward pass.
    model.set_checkpoint_images(0)
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(x, 0)
        out["terms"]["loss"].backward()
    gflop = counter.get_total_flops() / 1e9
    med = statistics.median(times)
    result = {
        "preset": ns.preset,
        "set": ns.set,
        "batch": ns.batch,
        "grid": cfg.model.grid_size,
        "K": cfg.model.n_components,
        "image": n,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "channels_last": not ns.no_channels_last,
        "amp": amp,
        "compile": ns.compile,
        "sparse_threshold": ns.sparse_threshold,
        "checkpoint_images": ns.checkpoint_images,
        "host_allocator": in_effect,
        "malloc_mmap_threshold_mib": ns.malloc_mmap_threshold_mib if in_effect == "lean" else 0,
        "thp_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
        "present_share": ns.present_share,
        "straightforward": ns.straightforward,
        "glimpses_decoded": glimpses,
        "median_s": round(med, 3),
        "min_s": round(min(times), 3),
        "max_s": round(max(times), 3),
        "gflop_step": round(gflop, 1),
        "gflops_per_s": round(gflop / med, 1),
        "peak_rss_mib": round(peak_mib),
        "peak_gpu_mib": None if gpu_peak is None else round(gpu_peak),
        "steps": ns.steps,
        "warmup": ns.warmup,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(["python bench/step_latency.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    print(f"{ns.preset} batch {ns.batch}: median {med:.2f} s/step ({min(times):.2f}-{max(times):.2f}), "
          f"{gflop:.0f} GFLOP/step = {gflop / med:.1f} GFLOP/s, peak RSS {peak_mib:.0f} MiB")
    if ns.out:
        out = Path(ns.out)
        results = json.loads(out.read_text()) if out.exists() else {"runs": []}
        results["runs"].append(result)
        out.write_text(json.dumps(results, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
