"""SPACE's command line: `python -m space --help` lists the commands, `python -m space COMMAND --help` each one's flags."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from .config import PRESETS, ConfigError, resolve_config


def output_file(path: str, flag: str, formats=None) -> Path:
    """Check before any work that a file can be written at `path` (its missing parent folders are made
    when it is written): a bad --out fails now with one line, not in a traceback after the work, and
    nothing is created for a command that is then refused. `formats`: the file name endings the writer
    knows, when it picks the format by the name (PIL, matplotlib)."""
    p = Path(path)
    if formats is not None and p.suffix.lower() not in formats:
        raise ConfigError(f"{flag} {path}: give a file name ending in .png (or another of "
                          f"{', '.join(sorted(formats)[:8])}, ...)")
    if p.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; give the path of a file")
    _check_creatable(p.parent, f"{flag} {path}")
    return p


def output_dir(path: str, flag: str) -> Path:
    """Check before any work that the folder `path` exists or can be made, and files written in it."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{flag} {path} is a file, not a folder; give a folder (made if missing)")
    _check_creatable(p, f"{flag} {path}")
    return p


def _check_creatable(folder: Path, what: str) -> None:
    """`folder` exists, or its nearest existing ancestor is a folder where files can be written."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what}: cannot write there, {existing} is a file; choose another path")
    try:  # a file made and removed: permissions, a read-only filesystem
        probe = existing / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{what}: cannot write there ({e.strerror or e}: {existing}); choose another path") from None


def _write_png(image, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _image_formats() -> set:
    from PIL import Image

    return set(Image.registered_extensions())


def _run_dir(location: str, only=("checkpoints/last.pt",)):
    """A run's local directory: the path itself, or a fresh mirror of `only` these files of an object-store
    run (space/runs.py), the first of which must be there."""
    from .runs import RunMirror

    mirror = RunMirror(location)
    if mirror.remote and not mirror.exists(only[0]):
        from .checkpoints import CheckpointError

        raise CheckpointError(f"no {only[0]} at {location}; train the run first (python -m space train)")
    return mirror, mirror.pull(only)


CHECKPOINT_HELP = ("best (default): the checkpoint with the best validation AP50, or the last one when the run "
                   "never validated; best_count: the one with the lowest validation count error (the paper's code "
                   "kept both), or the last; last; the path of a checkpoint file; or the selected.json that "
                   "`python -m space select` wrote for this run")
CHECKPOINTS = {"best": "checkpoints/best.pt", "best_count": "checkpoints/best_count.pt", "last": "checkpoints/last.pt"}


def _run_checkpoint(location: str, which: str):
    """(mirror, local run directory, checkpoint file, what was asked) for --run and --checkpoint."""
    from .runs import RunMirror
    from .checkpoints import CheckpointError

    if which.endswith(".json"):  # a choice made by `space select`, which names one of CHECKPOINTS
        from .select import read_selection

        chosen = read_selection(which, location)
        if chosen not in CHECKPOINTS:
            raise CheckpointError(f"--checkpoint {which}: it chose {chosen!r}, not one of {', '.join(CHECKPOINTS)}; "
                                  "write it again with `python -m space select`")
        mirror, run, path, _ = _run_checkpoint(location, chosen)
        return mirror, run, path, which
    if which not in CHECKPOINTS:
        path = Path(which)
        if not path.is_file():
            raise CheckpointError(f"--checkpoint {which}: no such file; give best, best_count, last or a "
                                  "checkpoint's path")
        mirror = RunMirror(location)
        return mirror, mirror.local, path, which
    mirror = RunMirror(location)
    names = list(dict.fromkeys([CHECKPOINTS[which], CHECKPOINTS["last"]]))
    for name in names:
        if mirror.exists(name):
            return mirror, mirror.pull((name,)), mirror.local / name, which
    raise CheckpointError(f"no {names[-1]} at {location}; train the run first (python -m space train)")


def cmd_train(ns) -> int:
    """Train SPACE. Settings: a preset (the paper's), then --config YAML, then --set."""
    from .memory import exec_with_tcmalloc, set_host_allocator

    cfg = resolve_config(ns.preset, ns.config, ns.set)
    if ns.steps is not None:
        cfg.train.steps = ns.steps
    if ns.device is not None:
        cfg.train.device = ns.device
    cfg.validate()
    summary = output_file(ns.summary, "--summary") if ns.summary else None  # before training, not after
    live = output_file(ns.live, "--live") if ns.live else None
    if ns.from_shell:  # tcmalloc is loaded at start-up: this command runs again with it, nothing done yet
        exec_with_tcmalloc(cfg.train.host_allocator)
    set_host_allocator(cfg.train.host_allocator, cfg.train.malloc_mmap_threshold_mib)  # before torch allocates
    from .train import train

    last = train(cfg, ns.data, ns.out, progress=not ns.quiet, restart=ns.restart, live=live)
    print(json.dumps(last), file=sys.stderr)
    if summary:
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text(json.dumps({"run": ns.out, "data": ns.data, **last}, indent=2))
    return 0


def cmd_config(ns) -> int:
    """Print the settings `train` would use with the same --preset, --config and --set, as YAML: every field
    of space/config.py, validated."""
    cfg = resolve_config(ns.preset, ns.config, ns.set)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def cmd_sample(ns) -> int:
    from PIL import Image

    from .checkpoints import load_model
    from .generate import sample_images

    if ns.count < 1:
        raise ConfigError(f"--count: must be at least 1, got {ns.count}")
    if not 0 <= ns.seed < 2**63:  # torch.manual_seed's range
        raise ConfigError(f"--seed: a non-negative integer below 2**63, got {ns.seed}")
    output_file(ns.out, "--out", _image_formats())
    _, _, path, _ = _run_checkpoint(ns.run, ns.checkpoint)
    model, cfg, state = load_model(path)
    images = sample_images(model, ns.count, int(state["step"]), seed=ns.seed)
    n = cfg.model.image_size
    cols = min(8, ns.count)
    rows = -(-ns.count // cols)
    sheet = Image.new("RGB", (cols * n, rows * n))
    for i, img in enumerate(images):
        arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        sheet.paste(Image.fromarray(arr), ((i % cols) * n, (i // cols) * n))
    _write_png(sheet, ns.out)
    print(f"wrote {ns.out}", file=sys.stderr)
    return 0


def cmd_show(ns) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from .checkpoints import load_model
    from .data import StoreDataset
    from .viz import COLUMNS, decomposition_grid

    if ns.count < 1:
        raise ConfigError(f"--count: must be at least 1, got {ns.count}")
    _check_refine_flags(ns)
    output_file(ns.out, "--out", _image_formats())
    _, _, path, _ = _run_checkpoint(ns.run, ns.checkpoint)
    model, cfg, state = load_model(path)
    data = StoreDataset(ns.data, ns.split, image_size=cfg.model.image_size)
    frames = ns.frames or list(range(min(ns.count, len(data))))
    bad = [f for f in frames if not 0 <= f < len(data)]
    if bad:
        raise ConfigError(f"--frames {bad} are outside split {ns.split!r}, which has frames 0-{len(data) - 1}")
    x = data.__getitems__(np.asarray(frames))
    step = int(state["step"])
    with torch.no_grad():
        if ns.refine:
            from .refine import refined_output

            # z_pres of the refined cells 1, the others 0
            out = refined_output(model, x, step, candidates=ns.refine_candidates, cell_cost=ns.refine_cost,
                                 box_steps=ns.refine_box_steps, box_lr=ns.refine_box_lr,
                                 box_rounds=ns.refine_box_rounds)[0]
        else:
            out = model(x, step)
    _write_png(Image.fromarray(decomposition_grid(x, out, rows=len(frames))), ns.out)
    print(f"wrote {ns.out} (columns: {COLUMNS})", file=sys.stderr)
    return 0


def _add_refine_flags(parser) -> None:
    parser.add_argument("--refine-candidates", type=float, metavar="P",
                        help="with --refine, the smallest amortised z_pres probability of a cell the search may flip "
                             "(default: the detection threshold, 0.5, so it only switches cells off; lower also lets it "
                             "switch cells on)")
    parser.add_argument("--refine-cost", type=float, default=0.0, metavar="NATS",
                        help="with --refine, nats the search charges for every cell on, over the model's objective: "
                             "a stricter z_pres prior at inference, fewer boxes (default: 0)")
    parser.add_argument("--refine-box-steps", type=int, default=0, metavar="N",
                        help="with --refine, N Adam steps on the boxes (z_scale, z_shift) of the cells on after the "
                             "search, lowering the same objective, then the search again (default: 0, boxes as encoded)")
    parser.add_argument("--refine-box-lr", type=float, default=0.1, metavar="LR",
                        help="with --refine-box-steps, Adam's step size on the boxes' latents (default: 0.1)")
    parser.add_argument("--refine-box-rounds", type=int, default=1, metavar="R",
                        help="with --refine-box-steps, how many times the box steps and the search run (default: 1)")


def _check_refine_flags(ns) -> None:
    if ns.refine_candidates is not None and not 0 <= ns.refine_candidates <= 1:
        raise ConfigError(f"--refine-candidates: a z_pres probability in [0, 1], got {ns.refine_candidates}")
    if not ns.refine_cost >= 0:  # NaN fails too
        raise ConfigError(f"--refine-cost: 0 or more nats a cell, got {ns.refine_cost}")
    if ns.refine_box_steps < 0:
        raise ConfigError(f"--refine-box-steps: 0 or more Adam steps, got {ns.refine_box_steps}")
    if not ns.refine_box_lr > 0:
        raise ConfigError(f"--refine-box-lr: a step size above 0, got {ns.refine_box_lr}")
    if ns.refine_box_rounds < 1:
        raise ConfigError(f"--refine-box-rounds: 1 or more rounds, got {ns.refine_box_rounds}")
    if ns.refine_box_rounds != 1 and not ns.refine_box_steps:
        raise ConfigError("--refine-box-rounds: rounds of box steps; add --refine-box-steps N")
    for flag, given in (("--refine-candidates", ns.refine_candidates is not None), ("--refine-cost", ns.refine_cost),
                        ("--refine-box-steps", ns.refine_box_steps),
                        ("--refine-box-rounds", ns.refine_box_rounds != 1)):
        if given and not ns.refine:
            raise ConfigError(f"{flag}: applies to the refined decisions only; add --refine")


def _check_pass_flags(ns) -> None:
    """--frames and --batch-size of a command that runs a trained model over a split's frames."""
    if ns.frames is not None and ns.frames < 1:
        raise ConfigError(f"--frames: at least 1, got {ns.frames}")
    if ns.batch_size < 1:
        raise ConfigError(f"--batch-size: at least 1, got {ns.batch_size}")


def _check_scoring_flags(ns) -> None:
    """--threshold, the refine flags, --frames and --batch-size of a command that scores a split."""
    if not 0 <= ns.threshold < 1:
        raise ConfigError(f"--threshold: a z_pres probability in [0, 1), got {ns.threshold}")
    _check_refine_flags(ns)
    _check_pass_flags(ns)


def _scoring_settings(ns, device: str) -> dict:
    """`evaluate`'s settings from a scoring command's flags (evaluate and select take the same ones)."""
    return dict(threshold=ns.threshold, batch_size=ns.batch_size, frames=ns.frames, device=device,
                progress=not ns.quiet, refine=ns.refine, refine_candidates=ns.refine_candidates,
                refine_cost=ns.refine_cost, refine_box_steps=ns.refine_box_steps, refine_box_lr=ns.refine_box_lr,
                refine_box_rounds=ns.refine_box_rounds)


def cmd_evaluate(ns) -> int:
    """Score a trained run: COCO AP and the paper's AP at IoU 0.5 and 0.5:0.95, object-count error and
    accuracy, reconstruction MSE, with a trivial baseline beside each. Writes metrics.json, detections.json
    and ground_truth.json (COCO) to --out."""
    import json

    from .evaluate import evaluate
    from .devices import pick_device

    _check_scoring_flags(ns)
    device = str(pick_device(ns.device, "--device"))
    if ns.out is not None:
        output_dir(ns.out, "--out")
    mirror, run, path, _ = _run_checkpoint(ns.run, ns.checkpoint)
    if ns.out is None:
        output_dir(str(run / "eval" / ns.split), "the output folder (default of --out)")
    metrics = evaluate(str(run), ns.data, ns.split, ns.out, checkpoint=path, **_scoring_settings(ns, device))
    if ns.out is None:
        mirror.push(f"eval/{ns.split}")  # into the object-store run too, when the run lives there
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_select(ns) -> int:
    """Choose which of a run's checkpoints to score: each candidate is scored on a split (validation by
    default; with --refine refined, as the test scores will be) and the one with the lowest count error or
    the highest AP50 is chosen, the earlier candidate on a tie. Writes each candidate's evaluate files to
    OUT/NAME/ and the choice to OUT/selected.json, which evaluate, show, encode and sample take as
    --checkpoint. Not in the paper: its code scores the checkpoint with the best amortised validation AP
    (`best`)."""
    from .devices import pick_device
    from .select import select_checkpoint

    _check_scoring_flags(ns)
    if len(set(ns.candidates)) != len(ns.candidates):
        raise ConfigError(f"--candidates {' '.join(ns.candidates)}: each checkpoint once")
    device = str(pick_device(ns.device, "--device"))
    output_dir(ns.out, "--out")
    candidates = {}
    for name in ns.candidates:
        _, run, candidates[name], _ = _run_checkpoint(ns.run, name)
    selection = select_checkpoint(str(run) if "://" not in ns.run else ns.run, ns.data, ns.split, ns.out,
                                  candidates, ns.by, **_scoring_settings(ns, device))
    print(json.dumps(selection, indent=2))
    return 0


def cmd_encode(ns) -> int:
    """Encode every frame of a store split with a trained run (eval mode: the means) and write the latents as
    a new Zarr store whose arrays name their dimensions, for xarray: per frame and cell z_pres_prob, box
    (pixels), z_depth and z_what; per frame and background component z_mask and z_comp."""
    import json

    from .devices import pick_device
    from .encode import encode

    _check_pass_flags(ns)
    if Path(ns.out).exists():
        raise ConfigError(f"--out {ns.out} exists; remove it or give another path (latents are never overwritten)")
    _check_creatable(Path(ns.out).parent, f"--out {ns.out}")
    device = str(pick_device(ns.device, "--device"))
    _, _, path, _ = _run_checkpoint(ns.run, ns.checkpoint)
    summary = encode(path, ns.data, ns.split, ns.out, ns.batch_size, ns.frames, device, progress=not ns.quiet)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_summary(ns) -> int:
    import json
    from pathlib import Path

    from .evaluate import summary, summary_tsv

    missing = [f for f in ns.metrics if not Path(f).is_file()]
    if missing:
        raise ConfigError(f"no metrics file at {', '.join(missing)}; run `python -m space evaluate` first")
    markdown = output_file(ns.out_markdown, "--out-markdown") if ns.out_markdown else None
    rows_json = output_file(ns.out_json, "--out-json") if ns.out_json else None
    rows_tsv = output_file(ns.out_tsv, "--out-tsv") if ns.out_tsv else None
    table, rows = summary(ns.metrics)
    for f in (markdown, rows_json, rows_tsv):
        if f:
            f.parent.mkdir(parents=True, exist_ok=True)
    if markdown:
        markdown.write_text(table)
    else:
        print(table, end="")
    if rows_json:
        rows_json.write_text(json.dumps(rows, indent=2))
    if rows_tsv:
        rows_tsv.write_text(summary_tsv(rows))
    return 0


def cmd_curves(ns) -> int:
    from matplotlib.backend_bases import FigureCanvasBase

    from .curves import plot_curves

    output_file(ns.out, "--out", {f".{k}" for k in FigureCanvasBase.get_supported_filetypes()})
    # An object-store run's mirror keeps the run's name, which labels its curves.
    local = [str(_run_dir(r, only=("metrics.csv", "val.csv"))[1]) for r in ns.runs]
    plot_curves(local, ns.out, ns.labels)
    print(f"wrote {ns.out}", file=sys.stderr)
    return 0


def cmd_seeds(ns) -> int:
    """Combine an experiment's per-seed files (each under a seeds/SEED/ folder): JSON (train.json,
    metrics.json) into the mean over seeds of every number, with its spread and each seed's document; CSV
    (metrics.csv, val.csv) into the mean over seeds at each step all of them logged."""
    from .seeds import combine_files

    output_file(ns.out, "--out")
    combine_files(ns.files, ns.out, ns.allow_missing)
    print(f"wrote {ns.out} ({len(ns.files)} seeds)", file=sys.stderr)
    return 0


def _add_settings_flags(parser) -> None:
    """--preset, --config and --set: where a run's settings come from, in that order."""
    parser.add_argument("--preset", default="room3d_large", help=f"one of {', '.join(PRESETS)} (default: %(default)s)")
    parser.add_argument("--config", help="YAML with model: and train: sections, over the preset")
    parser.add_argument("--set", action="append", metavar="SECTION.NAME=VALUE",
                        help="override one setting, e.g. --set model.grid_size=8 --set train.batch_size=12")


def _add_run_flags(parser, data: bool = False, checkpoint: bool = True) -> None:
    """The flags of a command that reads a trained run: --run, --checkpoint, and with `data` a store split."""
    parser.add_argument("--run", required=True, help="run directory (or s3:// URL) written by train")
    if checkpoint:
        parser.add_argument("--checkpoint", default="best", help=CHECKPOINT_HELP)
    if data:
        parser.add_argument("--data", required=True, help="scene store, e.g. results/data/room3d_small.zarr")
        parser.add_argument("--split", default="test", help="default: %(default)s")


def _add_pass_flags(parser) -> None:
    """The flags of a command that runs a trained model over a split's frames: how many, how, where."""
    parser.add_argument("--frames", type=int, help="only the first FRAMES frames of the split")
    parser.add_argument("--batch-size", type=int, default=32, help="frames per forward pass (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N, mps")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _command(sub, func, help: str) -> argparse.ArgumentParser:
    """The subcommand that runs `func` (cmd_NAME is NAME); its --help description is func's docstring."""
    c = sub.add_parser(func.__name__.removeprefix("cmd_"), help=help, description=func.__doc__)
    c.set_defaults(func=func)
    return c


def build_parser() -> argparse.ArgumentParser:
    # not at the top: training imports this module, and its DVC fingerprint leaves select.py out
    from .select import SELECT_BY

    p = argparse.ArgumentParser(prog="python -m space", description="Train, score and look at SPACE (ICLR 2020) "
                                "on scene stores. `python -m space COMMAND --help` gives each command's flags.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    t = _command(sub, cmd_train, "train SPACE on a scene store (resumes a run that has a checkpoint)")
    t.add_argument("--data", required=True, help="scene store, e.g. results/data/room3d_small.zarr")
    t.add_argument("--out", required=True, help="run directory (resumed if it holds a checkpoint of the same "
                                                "store and settings; see --restart)")
    _add_settings_flags(t)
    t.add_argument("--steps", type=int, help="train to this global step (default: the config's)")
    t.add_argument("--device", help="auto (default), cpu, cuda, cuda:N, mps")
    t.add_argument("--restart", action="store_true",
                   help="if the run directory was trained on another store or with other settings, start afresh "
                        "in it (its checkpoints, metrics.csv, val.csv, tb/ and record are replaced); a run with "
                        "the same record still resumes. Without it such a run directory is refused")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--summary", help="write the last logged metrics here as JSON when training ends")
    t.add_argument("--live", help="rewrite this JSON file at every log step and validation with the step, loss, "
                                  "MSE and validation scores so far (for `dvc exp show` while the run goes)")

    g = _command(sub, cmd_config, "print the settings a preset, --config and --set resolve to (YAML)")
    _add_settings_flags(g)

    s = _command(sub, cmd_sample, "generate scenes from the prior of a trained run (algorithm 3)")
    _add_run_flags(s)
    s.add_argument("--out", required=True, help="PNG path")
    s.add_argument("--count", type=int, default=16, help="scenes to generate (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="random seed of the prior samples (default: %(default)s)")

    v = _command(sub, cmd_show, "decomposition of store frames by a trained run, as a PNG grid")
    _add_run_flags(v, data=True)
    v.add_argument("--out", required=True, help="PNG path")
    v.add_argument("--count", type=int, default=8, help="the first COUNT frames (default: 8)")
    v.add_argument("--frames", type=int, nargs="+", help="these frames instead")
    v.add_argument("--refine", action="store_true",
                   help="not in the paper: show the z_pres decisions refined by the model's own objective, "
                        "as evaluate --refine scores them (space/refine.py)")
    _add_refine_flags(v)

    e = _command(sub, cmd_evaluate, "score a trained run on a store split (table 1: AP, count error, MSE)")
    _add_run_flags(e, data=True)
    e.add_argument("--out", help="output folder (default: RUN/eval/SPLIT)")
    e.add_argument("--threshold", type=float, default=0.5, help="z_pres probability of a detection (default: 0.5)")
    e.add_argument("--refine", action="store_true",
                   help="not in the paper: refine each frame's z_pres decisions by the model's own objective "
                        "(switch cells off, or on with --refine-candidates, while that lowers -ELBO + boundary loss "
                        "+ --refine-cost a cell; space/refine.py), "
                        "then score those (1.5-4 times the time of amortised scoring)")
    _add_refine_flags(e)
    _add_pass_flags(e)

    q = _command(sub, cmd_select, "choose a run's checkpoint by its score on a split (validation by default)")
    _add_run_flags(q, data=True, checkpoint=False)
    q.set_defaults(split="val")
    q.add_argument("--candidates", nargs="+", choices=list(CHECKPOINTS), default=["best", "last"],
                   help="the checkpoints to choose from, the first preferred on a tie (default: best last)")
    q.add_argument("--by", choices=list(SELECT_BY), default="ap50",
                   help="the score that chooses: the highest ap50 (default) or the lowest count_error")
    q.add_argument("--out", required=True, help="output folder: NAME/ per candidate scored, and selected.json")
    q.add_argument("--threshold", type=float, default=0.5, help="z_pres probability of a detection (default: 0.5)")
    q.add_argument("--refine", action="store_true", help="score the refined z_pres decisions (see evaluate --help)")
    _add_refine_flags(q)
    _add_pass_flags(q)

    n = _command(sub, cmd_encode, "a trained run's latents (z_pres, z_where, z_depth, z_what, z^m, z^c) per "
                                  "frame of a store split, as a Zarr store")
    _add_run_flags(n, data=True)
    n.add_argument("--out", required=True, help="the latents store to create, e.g. latents.zarr (not overwritten)")
    _add_pass_flags(n)

    m = _command(sub, cmd_summary, "one table over runs from their evaluate metrics.json files")
    m.add_argument("metrics", nargs="*", help="metrics.json files (none: an empty table), e.g. results/runs/*/eval/test/metrics.json")
    m.add_argument("--out-markdown", help="write the Markdown table here (default: print it)")
    m.add_argument("--out-json", help="write the rows here as JSON")
    m.add_argument("--out-tsv", help="write the rows here as tab-separated values (the Snakemake report's table)")

    c = _command(sub, cmd_curves, "training loss and validation MSE (against steps and wall time) as a PNG")
    c.add_argument("runs", nargs="+", help="run directories, e.g. results/runs/*")
    c.add_argument("--out", required=True, help="PNG path")
    c.add_argument("--labels", nargs="+", help="one legend label per run (default: the directory names)")

    d = _command(sub, cmd_seeds, "combine one file per seed into an experiment's: means over seeds")
    d.add_argument("files", nargs="+", help="one file per seed, e.g. results/runs/x/seeds/*/train.json")
    d.add_argument("--out", required=True, help="the combined file, .json or .csv like the inputs")
    d.add_argument("--allow-missing", action="store_true",
                   help="leave out files that do not exist (a run that never validated has no val.csv)")

    return p


def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    ns.from_shell = argv is None  # the process is this command (python -m space ...), not a caller's
    from datagen.store import StoreError

    from .rundir import RunError
    from .checkpoints import CheckpointError, TrainingDiverged

    try:
        code = ns.func(ns)
        sys.stdout.flush()  # a reader that went away (`| head`) shows here, not in Python's exit
        return code
    except BrokenPipeError:  # the reader of stdout went away (`| head`): stop quietly, as SIGPIPE would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's last flush goes nowhere
        return 128 + 13
    except (ConfigError, StoreError, CheckpointError, TrainingDiverged, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
