"""Command line: `python -m space {train,sample,show} --help`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from .config import PRESETS, Config, ConfigError, merge


def _parse_value(text: str):
    """Values of --set are YAML: 8, 1e-4, true, [0.1, 0.01], {start: 0.1, end: 0.01}."""
    return yaml.safe_load(text)


def resolve_config(preset_name: str, config_file: str | None, sets: list[str]) -> Config:
    if preset_name not in PRESETS:
        raise ConfigError(f"unknown preset {preset_name!r}; choose from {', '.join(PRESETS)}")
    d = merge({}, PRESETS[preset_name])
    if config_file:
        with open(config_file) as fh:
            d = merge(d, yaml.safe_load(fh) or {})
    for item in sets or []:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in ("model", "train"):
            raise ConfigError(f"--set takes model.NAME=VALUE or train.NAME=VALUE, got {item!r}")
        d = merge(d, {section: {name: _parse_value(value)}})
    return Config.from_dict(d).validate()


def _run_dir(location: str, only=("checkpoints/last.pt",)):
    """A run's local directory: the path itself, or a fresh mirror of `only` these files of an object-store
    run (space/runs.py), the first of which must be there."""
    from .runs import RunMirror

    mirror = RunMirror(location)
    if mirror.remote and not mirror.exists(only[0]):
        from .train import CheckpointError

        raise CheckpointError(f"no {only[0]} at {location}; train the run first (python -m space train)")
    return mirror, mirror.pull(only)


CHECKPOINT_HELP = ("best (default): the checkpoint with the best validation AP50, or the last one when the run "
                   "never validated; last; or the path of a checkpoint file")


def _run_checkpoint(location: str, which: str):
    """(mirror, local run directory, checkpoint file, what was asked) for --run and --checkpoint."""
    from .runs import RunMirror
    from .train import CheckpointError

    if which not in ("best", "last"):
        path = Path(which)
        if not path.is_file():
            raise CheckpointError(f"--checkpoint {which}: no such file; give best, last or a checkpoint's path")
        mirror = RunMirror(location)
        return mirror, mirror.local, path, which
    mirror = RunMirror(location)
    names = ["checkpoints/best.pt", "checkpoints/last.pt"] if which == "best" else ["checkpoints/last.pt"]
    for name in names:
        if mirror.exists(name):
            return mirror, mirror.pull((name,)), mirror.local / name, which
    raise CheckpointError(f"no {names[-1]} in {location}; train the run first (python -m space train)")


def cmd_train(ns) -> int:
    from .memory import lean_host_allocator

    cfg = resolve_config(ns.preset, ns.config, ns.set)
    if ns.steps is not None:
        cfg.train.steps = ns.steps
    if ns.device is not None:
        cfg.train.device = ns.device
    cfg.validate()
    lean_host_allocator(cfg.train.malloc_mmap_threshold_mib)  # before torch allocates anything
    from .train import train

    last = train(cfg, ns.data, ns.out, progress=not ns.quiet, restart=ns.restart)
    print(json.dumps(last), file=sys.stderr)
    if ns.summary:
        with open(ns.summary, "w") as fh:
            json.dump({"run": ns.out, "data": ns.data, **last}, fh, indent=2)
    return 0


def cmd_sample(ns) -> int:
    from PIL import Image

    from .generate import sample_images
    from .train import load_checkpoint

    if ns.count < 1:
        raise ConfigError(f"--count: must be at least 1, got {ns.count}")

    _, _, path, _ = _run_checkpoint(ns.run, ns.checkpoint)
    state = load_checkpoint(path)
    cfg = Config.from_dict(state["config"])
    images = sample_images(cfg, state["model"], ns.count, int(state["step"]), seed=ns.seed)
    n = cfg.model.image_size
    cols = min(8, ns.count)
    rows = -(-ns.count // cols)
    sheet = Image.new("RGB", (cols * n, rows * n))
    for i, img in enumerate(images):
        arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        sheet.paste(Image.fromarray(arr), ((i % cols) * n, (i // cols) * n))
    sheet.save(ns.out)
    print(f"wrote {ns.out}", file=sys.stderr)
    return 0


def cmd_show(ns) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from .data import StoreDataset
    from .model import SPACE
    from .train import load_checkpoint
    from .viz import COLUMNS, decomposition_grid

    _, _, path, _ = _run_checkpoint(ns.run, ns.checkpoint)
    state = load_checkpoint(path)
    cfg = Config.from_dict(state["config"])
    data = StoreDataset(ns.data, ns.split, image_size=cfg.model.image_size)
    frames = ns.frames or list(range(min(ns.count, len(data))))
    bad = [f for f in frames if not 0 <= f < len(data)]
    if bad:
        raise ConfigError(f"--frames {bad} are outside split {ns.split!r}, which has frames 0-{len(data) - 1}")
    model = SPACE(cfg.model)
    model.load_state_dict(state["model"])
    model.eval()
    x = data.__getitems__(np.asarray(frames))
    with torch.no_grad():
        out = model(x, int(state["step"]))
    Image.fromarray(decomposition_grid(x, out, rows=len(frames))).save(ns.out)
    print(f"wrote {ns.out} (columns: {COLUMNS})", file=sys.stderr)
    return 0


def cmd_evaluate(ns) -> int:
    import json

    from .evaluate import evaluate
    from .train import pick_device

    if not 0 <= ns.threshold < 1:
        raise ConfigError(f"--threshold: a z_pres probability in [0, 1), got {ns.threshold}")
    if ns.frames is not None and ns.frames < 1:
        raise ConfigError(f"--frames: at least 1, got {ns.frames}")
    device = str(pick_device(ns.device, "--device"))
    mirror, run, path, _ = _run_checkpoint(ns.run, ns.checkpoint)
    metrics = evaluate(str(run), ns.data, ns.split, ns.out, ns.threshold, ns.batch_size, ns.frames, device,
                       progress=not ns.quiet, checkpoint=path)
    if ns.out is None:
        mirror.push(f"eval/{ns.split}")  # into the object-store run too, when the run lives there
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_summary(ns) -> int:
    import json
    from pathlib import Path

    from .evaluate import summary

    missing = [f for f in ns.metrics if not Path(f).is_file()]
    if missing:
        raise ConfigError(f"no metrics file at {', '.join(missing)}; run `python -m space evaluate` first")
    table, rows = summary(ns.metrics)
    if ns.out_markdown:
        Path(ns.out_markdown).write_text(table)
    else:
        print(table, end="")
    if ns.out_json:
        Path(ns.out_json).write_text(json.dumps(rows, indent=2))
    return 0


def cmd_curves(ns) -> int:
    from .curves import plot_curves

    # An object-store run's mirror keeps the run's name, which labels its curves.
    local = [str(_run_dir(r, only=("metrics.csv", "val.csv"))[1]) for r in ns.runs]
    plot_curves(local, ns.out, ns.labels)
    print(f"wrote {ns.out}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m space", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train SPACE on a scene store (resumes a run that has a checkpoint)",
                       description="Train SPACE. Settings: a preset (the paper's), then --config YAML, then --set.")
    t.add_argument("--data", required=True, help="scene store, e.g. results/data/room3d_small.zarr")
    t.add_argument("--out", required=True, help="run directory (resumed if it holds a checkpoint of the same "
                                                "store and settings; see --restart)")
    t.add_argument("--preset", default="room3d_large", help=f"one of {', '.join(PRESETS)} (default: %(default)s)")
    t.add_argument("--config", help="YAML with model: and train: sections, over the preset")
    t.add_argument("--set", action="append", metavar="SECTION.NAME=VALUE",
                   help="override one setting, e.g. --set model.grid_size=8 --set train.batch_size=12")
    t.add_argument("--steps", type=int, help="train to this global step (default: the config's)")
    t.add_argument("--device", help="auto (default), cpu, cuda, cuda:N, mps")
    t.add_argument("--restart", action="store_true",
                   help="if the run directory was trained on another store or with other settings, start afresh "
                        "in it (its checkpoints, metrics.csv, val.csv, tb/ and record are replaced); a run with "
                        "the same record still resumes. Without it such a run directory is refused")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--summary", help="write the last logged metrics here as JSON when training ends")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="generate scenes from the prior of a trained run (algorithm 3)")
    s.add_argument("--run", required=True, help="run directory (or s3:// URL) written by train")
    s.add_argument("--checkpoint", default="best", help=CHECKPOINT_HELP)
    s.add_argument("--out", required=True, help="PNG path")
    s.add_argument("--count", type=int, default=16)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_sample)

    v = sub.add_parser("show", help="decomposition of store frames by a trained run, as a PNG grid")
    v.add_argument("--run", required=True, help="run directory (or s3:// URL) written by train")
    v.add_argument("--checkpoint", default="best", help=CHECKPOINT_HELP)
    v.add_argument("--data", required=True)
    v.add_argument("--split", default="test")
    v.add_argument("--out", required=True, help="PNG path")
    v.add_argument("--count", type=int, default=8, help="the first COUNT frames (default: 8)")
    v.add_argument("--frames", type=int, nargs="+", help="these frames instead")
    v.set_defaults(func=cmd_show)

    e = sub.add_parser("evaluate", help="score a trained run on a store split (table 1: AP, count error, MSE)",
                       description="Score a trained run: COCO AP and the paper's AP at IoU 0.5 and 0.5:0.95, "
                                   "object-count error and accuracy, reconstruction MSE, with a trivial "
                                   "baseline beside each. Writes metrics.json, detections.json and "
                                   "ground_truth.json (COCO) to --out.")
    e.add_argument("--run", required=True, help="run directory (or s3:// URL) written by train")
    e.add_argument("--checkpoint", default="best", help=CHECKPOINT_HELP)
    e.add_argument("--data", required=True)
    e.add_argument("--split", default="test")
    e.add_argument("--out", help="output folder (default: RUN/eval/SPLIT)")
    e.add_argument("--threshold", type=float, default=0.5, help="z_pres probability of a detection (default: 0.5)")
    e.add_argument("--frames", type=int, help="only the first FRAMES frames of the split")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N, mps")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_evaluate)

    m = sub.add_parser("summary", help="one table over runs from their evaluate metrics.json files")
    m.add_argument("metrics", nargs="*", help="metrics.json files (none: an empty table), e.g. results/runs/*/eval/test/metrics.json")
    m.add_argument("--out-markdown", help="write the Markdown table here (default: print it)")
    m.add_argument("--out-json", help="write the rows here as JSON")
    m.set_defaults(func=cmd_summary)

    c = sub.add_parser("curves", help="training loss and validation MSE (against steps and wall time) as a PNG")
    c.add_argument("runs", nargs="+", help="run directories, e.g. results/runs/*")
    c.add_argument("--out", required=True, help="PNG path")
    c.add_argument("--labels", nargs="+", help="one legend label per run (default: the directory names)")
    c.set_defaults(func=cmd_curves)

    ns = p.parse_args(argv)
    from datagen.store import StoreError

    from .record import RunError
    from .train import CheckpointError, TrainingDiverged

    try:
        return ns.func(ns)
    except (ConfigError, StoreError, CheckpointError, TrainingDiverged, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
