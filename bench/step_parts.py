"""Where a SPACE training step's time goes: each part's forward and backward, timed alone.

    python bench/step_parts.py --preset room3d_large --batch 16 --threads 2
    python bench/step_parts.py --preset demo --batch 8 --markdown

One step of the model (activation checkpointing off, so nothing is computed twice) runs once with hooks
that keep the inputs of each part: the foreground image encoder, the glimpse reads (spatial transformer),
the glimpse encoder and decoder, the compositing of glimpses onto the canvas, the background image encoder,
the LSTMs' steps, the mask decoder, the component encoder and decoder. Each part is then run alone on its
own inputs, forward and backward (the gradient of a random weighting of its outputs), --repeats times; its
median, times the calls a step makes (the LSTMs step once per component), is its cost. The whole training step (the trainer's own `train_step`: forward, backward, clipping,
both optimisers) is timed the same way, with the preset's checkpointing, and "the rest" is the step
minus the parts: likelihood and KL terms, elementwise glue, clipping and the optimisers. The last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import emit, machine  # noqa: E402

import space.model as space_model  # noqa: E402
from space.config import PRESETS, Config, merge  # noqa: E402
from space.devices import checkpoint_images, use_amp  # noqa: E402
from space.memory import exec_with_tcmalloc, set_host_allocator  # noqa: E402
from space.train import optimisers, train_step  # noqa: E402

# Each part: a label and where it lives (a submodule, or a function of space.model called by the model).
MODULES = (
    ("foreground image encoder", "fg.encoder"),
    ("glimpse encoder", "fg.glimpse_encoder"),
    ("glimpse decoder", "fg.glimpse_decoder"),
    ("background image encoder", "bg.image_encoder"),
    ("background LSTMs", "bg.lstm"),
    ("background prior LSTM", "bg.prior_lstm"),
    ("mask decoder", "bg.mask_decoder"),
    ("component encoder", "bg.comp_encoder"),
    ("component decoder", "bg.comp_decoder"),
)
FUNCTIONS = (
    ("glimpse reads", "extract_glimpses"),
    ("compositing", "composite_windowed"),
)


def _detach(v):
    """An input as the part saw it, cut from the step's graph: float tensors keep requires_grad."""
    if isinstance(v, torch.Tensor):
        d = v.detach()
        return d.requires_grad_(v.requires_grad) if d.is_floating_point() else d
    if isinstance(v, (tuple, list)):
        return type(v)(_detach(x) for x in v)
    return v


def _tensors(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for x in out for t in _tensors(x)]
    if isinstance(out, dict):
        return [t for x in out.values() for t in _tensors(x)]
    return []


def capture(model, x, amp: bool = False) -> tuple[dict, dict]:
    """One forward pass with hooks: {label: (callable, args, kwargs)} for each part's first call, and
    {label: calls} (the LSTMs step once per background component)."""
    seen: dict = {}
    calls: dict = {}
    hooks = []
    for label, path in MODULES:
        module = model.get_submodule(path)

        def hook(mod, args, kwargs, _out, label=label):
            seen.setdefault(label, (mod, _detach(args), _detach(kwargs)))
            calls[label] = calls.get(label, 0) + 1

        hooks.append(module.register_forward_hook(hook, with_kwargs=True))
    originals = {}
    for label, name in FUNCTIONS:
        fn = originals[name] = getattr(space_model, name)

        def wrapper(*args, _fn=fn, _label=label, **kwargs):
            seen.setdefault(_label, (_fn, _detach(args), _detach(kwargs)))
            calls[_label] = calls.get(_label, 0) + 1
            return _fn(*args, **kwargs)

        setattr(space_model, name, wrapper)
    try:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x, 0)
        out["terms"]["loss"].backward()
    finally:
        for h in hooks:
            h.remove()
        for name, fn in originals.items():
            setattr(space_model, name, fn)
    model.zero_grad(set_to_none=True)
    return seen, calls


def time_part(fn, args, kwargs, repeats: int, sync, amp: bool = False, device: str = "cpu") -> float:
    """Median seconds of fn's forward (under bf16 autocast with amp) and backward on these inputs."""
    times = []
    for i in range(repeats + 1):  # the first is a warm-up
        a, k = _detach(args), _detach(kwargs)
        sync()
        t = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            outs = [o for o in _tensors(fn(*a, **k)) if o.requires_grad]
        if outs:
            weights = [torch.randn_like(o) for o in outs]
            torch.autograd.backward(outs, weights)
        sync()
        if i:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="room3d_large", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each part and of the step (median)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action="store_true", help="bf16 autocast, as train.amp")
    p.add_argument("--markdown", action="store_true", help="print the table alone")
    p.add_argument("--out", help="also write the results here (JSON), e.g. bench/results/step_parts_large.json")
    p.add_argument("--from", dest="source", metavar="JSON", help="print the table of a results file instead")
    ns = p.parse_args(argv)
    if ns.source:
        result = json.loads(Path(ns.source).read_text())
        emit(result, table(result), markdown=ns.markdown)
        return 0
    cfg = Config.from_dict(merge(PRESETS[ns.preset], {})).validate()
    if argv is None:  # run from the shell: preload tcmalloc as `python -m space train` does
        exec_with_tcmalloc(cfg.train.host_allocator)
    in_effect = set_host_allocator(cfg.train.host_allocator, cfg.train.malloc_mmap_threshold_mib)  # as training does
    if ns.threads:
        torch.set_num_threads(ns.threads)
    device = torch.device("cuda" if ns.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if ns.device == "auto" else ns.device))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = space_model.SPACE(cfg.model).to(device).to(memory_format=torch.channels_last)
    n = cfg.model.image_size
    x = torch.rand(ns.batch, 3, n, n, device=device).contiguous(memory_format=torch.channels_last)

    # The whole step as training runs it (with the preset's activation checkpointing).
    ckpt = checkpoint_images(cfg.train.checkpoint_images, device)
    model.set_checkpoint_images(ckpt)
    opt_fg, opt_bg = optimisers(model, cfg.train)
    amp = use_amp(ns.amp, device)
    step_s = time_part(lambda: train_step(model, x, 0, opt_fg, opt_bg, cfg.train, amp)[0]["terms"]["loss"].detach(),
                       (), {}, ns.repeats, sync)
    model.set_checkpoint_images(0)
    seen, calls = capture(model, x, amp)
    parts = {label: calls[label] * time_part(fn, args, kwargs, ns.repeats, sync, amp, device.type)
             for label, (fn, args, kwargs) in seen.items()}
    result = {"preset": ns.preset, "batch": ns.batch, "threads": torch.get_num_threads(), "device": str(device),
              "checkpoint_images": ckpt, "amp": amp, "host_allocator": in_effect, "step_s": round(step_s, 4), "parts_s": {k: round(v, 4) for k, v in parts.items()},
              "rest_s": round(step_s - sum(parts.values()), 4), "machine": machine(),
              "date": time.strftime("%Y-%m-%d %H:%M"),
              "command": " ".join(["bench/step_parts.py", *(sys.argv[1:] if argv is None else argv)])}
    emit(result, table(result), ns.out, ns.markdown)
    return 0


def table(result: dict) -> str:
    """The parts, largest first, then the rest and the whole step: seconds and shares. Markdown."""
    step_s = result["step_s"]
    rows = sorted(result["parts_s"].items(), key=lambda kv: -kv[1])
    rows.append(("the rest (losses, glue, clipping, optimisers)", result["rest_s"]))
    lines = ["| part | s (forward + backward) | share of the step |", "|---|---|---|"]
    lines += [f"| {label} | {s:.3f} | {s / step_s:.0%} |" for label, s in rows]
    bf16 = ", bf16" if result.get("amp") else ""
    lines.append(f"| **the training step** (checkpointing {result['checkpoint_images'] or 'off'}{bf16}) | **{step_s:.3f}** | 100% |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
