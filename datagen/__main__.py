"""datagen's command line: `python -m datagen --help` lists the commands, `python -m datagen COMMAND --help` each
one's flags."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import typing
from pathlib import Path

from .config import ATARI_GAMES, AtariConfig, ConfigError, Room3DConfig, StoreConfig


def _parse_split(text: str) -> tuple[str, int]:
    name, sep, n = text.partition("=")
    if not sep or not n.strip().lstrip("-").isdigit():
        raise argparse.ArgumentTypeError(f"--split takes NAME=FRAMES, e.g. train=1000; got {text!r}")
    return name.strip(), int(n)


def _parse_color(text: str) -> tuple[float, float, float]:
    """#rrggbb or r,g,b in [0, 1]."""
    t = text.lstrip("#")
    try:
        if "," in t:
            rgb = tuple(float(v) for v in t.split(","))
        else:
            rgb = tuple(int(t[i : i + 2], 16) / 255 for i in (0, 2, 4)) if len(t) == 6 else ()
    except ValueError:
        rgb = ()
    if len(rgb) != 3:
        raise argparse.ArgumentTypeError(f"a colour is #rrggbb or r,g,b with values in [0, 1]; got {text!r}")
    return rgb


def flag_name(field: str) -> str:
    """A generator setting's command-line flag: size_max -> --size-max."""
    return "--" + field.replace("_", "-")


def config_argv(params: dict) -> list[str]:
    """Generator settings as the arguments their flags read (the pipeline's rules pass params.yaml's
    this way): {'size_max': 0.3, 'camera_distance': [7, 9]} -> ['--size-max', '0.3', '--camera-distance',
    '7', '9']; a colour, an (r, g, b) triple, as 'r,g,b'."""
    argv = []
    for key, value in params.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        argv += [flag_name(key), *(",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v) for v in values)]
    return argv


def _add_config_flags(p: argparse.ArgumentParser, cls, skip: tuple = (), notes: dict | None = None) -> None:
    """One flag per dataclass field (but those in `skip`), its default the paper's value; `notes` adds to a
    field's help."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = flag_name(f.name)
        default = f.default
        t = hints[f.name]
        args = typing.get_args(t)
        help_default = f"default: {json.dumps(default) if not isinstance(default, tuple) else ' '.join(map(str, default))}"
        help_default += (notes or {}).get(f.name, "")
        if f.name.endswith("colors"):
            p.add_argument(flag, nargs="+", type=_parse_color, metavar="COLOR", default=None,
                           help=f"palette as #rrggbb or r,g,b (default: the paper's {len(default)} colours)")
        elif typing.get_origin(t) is tuple and args and args[-1] is Ellipsis:
            p.add_argument(flag, nargs="+", type=args[0], default=None, help=help_default)
        elif typing.get_origin(t) is tuple:
            p.add_argument(flag, nargs=len(args), type=args[0], metavar=("MIN", "MAX"), default=None, help=help_default)
        else:
            p.add_argument(flag, type=t, default=None, help=help_default)


def _config_from_args(cls, ns, **given) -> object:
    """The dataclass from its flags (those given, the rest its defaults) and the fields in `given`."""
    kw = dict(given)
    for f in dataclasses.fields(cls):
        v = getattr(ns, f.name, None)
        if f.name not in given and v is not None:
            kw[f.name] = tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
    return cls(**kw)


def _add_job_flags(p: argparse.ArgumentParser, what: str) -> None:
    """The flags of a store-writing job (datagen/jobs.py), shared by every generator."""
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default: 0)")
    p.add_argument("--workers", type=int, default=1, help=f"{what} processes (default: 1)")
    p.add_argument("--shard-size", type=int, default=StoreConfig.shard_size, help="frames per shard (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace a complete store at OUT")
    p.add_argument("--scratch", action="store_true",
                   help="OUT is a staging location (the pipeline's): finish or keep a store with the same "
                        "parameters there, replace one with other parameters")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--part", metavar="I/N", help="write only part I of N of the shards (counted from 0) "
                   "into a part store; `python -m datagen merge` joins the N parts into one store")


def _run_job(ns, generate, cfg, default_splits: dict) -> int:
    """Check the splits and run a generator's job with the shared flags."""
    splits = dict(ns.split) if ns.split else default_splits
    if len(splits) != len(ns.split or splits):
        raise ConfigError("a split is given twice; give each --split NAME=FRAMES once")
    generate(ns.out, cfg, splits, ns.seed, shard_size=ns.shard_size, workers=ns.workers,
             overwrite=ns.overwrite, progress=not ns.quiet, part=_part(ns), scratch=ns.scratch)
    print(f"wrote {ns.out}" + (f" (part {ns.part})" if ns.part else ""), file=sys.stderr)
    return 0


def cmd_room3d(ns) -> int:
    from .room3d import generate

    return _run_job(ns, generate, _config_from_args(Room3DConfig, ns).validate(), StoreConfig().splits)


def cmd_atari(ns) -> int:
    from .atari import generate

    cfg = _config_from_args(AtariConfig, ns, **({"games": tuple(ns.game)} if ns.game else {})).validate()
    return _run_job(ns, generate, cfg, {"train": 50000, "val": 5000, "test": 5000})  # the paper's, per game


def _part(ns):
    from .store import parse_part

    return parse_part(ns.part) if ns.part else None


def cmd_merge(ns) -> int:
    """Join the N part stores of one dataset, each written with --part I/N, into one complete store equal to
    what a single job writes. The parts are left in place."""
    from .store import merge_parts

    merge_parts(ns.out, ns.parts, overwrite=ns.overwrite)
    print(f"wrote {ns.out} from {len(ns.parts)} parts", file=sys.stderr)
    return 0


def cmd_inspect(ns) -> int:
    """Validate a scene store and summarize it: objects per frame and category, and repeated frames
    (byte-identical to an earlier frame) per split, overall and across splits. Checks the metadata, that every
    chunk file a complete store has exists, that each shard's index and last frame decode (a truncated file
    fails), that n_objects, boxes and labels agree; reading every image for the repeats decodes every image.
    Exit 1 when the store is not valid."""
    from .store import Store, StoreError, repeated_frames, validate_store

    def refuse(problems) -> int:
        print(f"{ns.store}: NOT a valid scene store", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1

    problems = validate_store(ns.store, "full" if ns.full else "shards")
    if problems:
        return refuse(problems)
    s = Store(ns.store, check="metadata")  # just validated
    summary = {
        "path": ns.store,
        "generator": s.attrs["generator"],
        "generator_version": s.attrs.get("generator_version"),
        "seed": s.attrs["seed"],
        "image_size": s.attrs["image_size"],
        "k_max": s.attrs["k_max"],
        "categories": s.categories,
        "splits": {},
        "params": s.attrs["params"],
    }
    try:
        for split in s.splits:
            g = s.split(split)
            counts = s.read(split, "n_objects", slice(None))
            labels = s.read(split, "labels", slice(None))
            vis = s.read(split, "visibility", slice(None))
            per_cat = {c: int((labels == i).sum()) for i, c in enumerate(s.categories)}
            summary["splits"][split] = {
                "frames": s.n_frames(split),
                "objects_per_frame": ({"min": int(counts.min()), "mean": round(float(counts.mean()), 3),
                                       "max": int(counts.max())} if counts.size else None),
                "objects_per_category": per_cat,
                "mean_visibility": round(float(vis[~(vis != vis)].mean()), 4) if (vis == vis).any() else None,
                "arrays": {k: [list(g[k].shape), str(g[k].dtype)] for k in sorted(g.array_keys()) if not k.startswith("_")},
            }
        first = "train" if "train" in s.splits else s.splits[0]
        boxes = s.read(first, "boxes", slice(None))
        summary["z_scale_prior"] = z_scale_advice(boxes, s.attrs["image_size"])
        summary["grid"] = grid_advice(boxes, s.attrs["image_size"])
        # every image is read (and so decoded) here: byte-identical frames, within and across splits
        repeats = repeated_frames(s)
    except StoreError as e:  # a file lost or damaged since it was validated
        return refuse([str(e)])
    summary["repeated_frames"] = repeats
    if ns.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{summary['path']}: valid, complete {summary['generator']} store (generator {summary['generator_version']}, seed {summary['seed']})")
    print(f"  images {summary['image_size'][0]}x{summary['image_size'][1]}, up to {summary['k_max']} objects, categories {', '.join(s.categories)}")
    for split, d in summary["splits"].items():
        o = d["objects_per_frame"] or {"min": "-", "max": "-", "mean": "-"}
        print(f"  {split:>6}: {d['frames']} frames, objects/frame {o['min']}-{o['max']} (mean {o['mean']}), "
              f"per category {d['objects_per_category']}, mean visibility {d['mean_visibility']}")
    shares = [f"{split} {r['repeated']}/{r['frames']} ({100 * r['share']:.2f}%)" for split, r in repeats["splits"].items()]
    o = repeats["overall"]
    print(f"  repeated frames (byte-identical to an earlier frame): {', '.join(shares)}; "
          f"overall {o['repeated']}/{o['frames']} ({100 * o['share']:.2f}%)")
    across = repeats["across_splits"]
    examples = ["=".join(f"{sp}[{i}]" for sp, i in ex) for ex in across["examples"]]
    print(f"  frames in two or more splits: {across['distinct_frames']}" + (f", e.g. {', '.join(examples)}" if examples else ""))
    z = summary["z_scale_prior"]
    if z:
        print(f"  object boxes ({z['split_boxes']} in {first}): longer side {z['side_median']:.3f} of the frame (median; "
              f"10-90%: {z['side_p10']:.3f}-{z['side_p90']:.3f}); for SPACE on this store, glimpses of that size: "
              f"--set model.z_scale_prior_mean={z['z_scale_prior_mean']:.2f} (sigmoid(z_scale) is the glimpse side); "
              f"logits of the widths {z['width_logit_median']:.2f} and heights {z['height_logit_median']:.2f} "
              "(medians; model.z_scale_prior_aspect is added to the prior's height)")
    grid = summary["grid"]
    if grid:
        shares = ", ".join(f"{g['grid_size']}x{g['grid_size']} {100 * g['sharing']:.1f}% (count error "
                           f"{g['count_error_floor']:.3f} from that alone)" for g in grid["grids"])
        print(f"  objects left without a cell of their own, their box centre in a cell with another's ({first}; "
              f"a SPACE cell holds one object): {shares}; for at most {100 * GRID_SHARING_ADVISED:.0f}%: "
              f"--set model.grid_size={grid['advised']}")
    print("  params: " + json.dumps(summary["params"]))
    return 0


GRID_SHARING_ADVISED = 0.02  # the share of objects left without a cell of their own worth a finer grid


def grid_advice(boxes, image_size) -> dict | None:
    """How crowded SPACE's grid would be on a store's frames: each cell explains at most one object (one
    glimpse), so an object whose box centre falls in a cell already holding another's has no cell of its own.
    Per grid size (the powers of two SPACE takes, image side / 32 to / 4): the share of objects so left over
    and the count error a detector of one object per cell would still make (the mean over frames of
    left-over / objects, the count error's own form); and the smallest grid with at most
    GRID_SHARING_ADVISED left over. boxes (N, K, 4) in pixels, NaN padded."""
    import numpy as np

    from .coco import box_cells

    height, width = (image_size, image_size) if np.isscalar(image_size) else image_size[:2]
    side = min(height, width)
    present = ~np.isnan(boxes[..., 0])  # (N, K)
    if not present.any():
        return None
    n = present.sum(1)  # (N,)
    grids, advised = [], None
    for g in (2 ** k for k in range(1, 10)):
        if not side // 32 <= g <= side // 4:
            continue
        cell = box_cells(boxes, (height, width), g)  # (N, K)
        occupied = np.array([len(set(c[m].tolist())) for c, m in zip(cell, present)])  # (N,)
        left = n - occupied
        sharing = float(left.sum() / n.sum())
        grids.append({"grid_size": g, "sharing": round(sharing, 4),
                      "count_error_floor": round(float((left / np.maximum(n, 1))[n > 0].mean()), 4)})
        if advised is None and sharing <= GRID_SHARING_ADVISED:
            advised = g
    return {"grids": grids, "advised": advised or grids[-1]["grid_size"]} if grids else None


def z_scale_advice(boxes, image_size) -> dict | None:
    """What z_scale prior mean fits a store's objects: SPACE's glimpse side is sigmoid(z_scale) of the frame
    (algorithm 1), so the logit of the objects' median longer side (boxes (N, K, 4) in pixels, NaN padded)
    starts glimpses at the typical object's size, the first thing to set for a new dataset."""
    import numpy as np

    b = boxes.reshape(-1, 4)
    b = b[~np.isnan(b[:, 0])]
    if not len(b):
        return None
    height, width = (image_size, image_size) if np.isscalar(image_size) else image_size[:2]
    w = ((b[:, 2] - b[:, 0]) / width).clip(1e-3, 1 - 1e-3)  # each side as a share of the frame
    h = ((b[:, 3] - b[:, 1]) / height).clip(1e-3, 1 - 1e-3)
    side = np.maximum(w, h)
    median = float(np.median(side))
    # Each side on its own too: SPACE's z_scale has one per axis, and objects seen from above are taller
    # than wide (model.z_scale_prior_aspect moves the prior's height by the difference of their logits).
    logit = lambda f: float(np.median(np.log(f / (1 - f))))  # noqa: E731
    return {"split_boxes": int(len(b)), "side_median": round(median, 4),
            "side_p10": round(float(np.quantile(side, 0.1)), 4), "side_p90": round(float(np.quantile(side, 0.9)), 4),
            "z_scale_prior_mean": round(float(np.log(median / (1 - median))), 3),
            "width_logit_median": round(logit(w), 3), "height_logit_median": round(logit(h), 3)}


def cmd_coco(ns) -> int:
    from .coco import to_coco
    from .store import Store

    text = json.dumps(to_coco(Store(ns.store), ns.split))
    if ns.out:
        with open(ns.out, "w") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text + "\n")
    return 0


def cmd_show(ns) -> int:
    import numpy as np

    from .show import contact_sheet
    from .store import Store

    for flag in ("count", "scale", "columns"):
        if getattr(ns, flag) < 1:
            raise ConfigError(f"--{flag}: must be at least 1, got {getattr(ns, flag)}")
    s = Store(ns.store)
    s.split(ns.split)  # names the splits there are when this one is not
    n = s.splits[ns.split]
    if ns.frames:
        frames = ns.frames
        bad = [f for f in frames if not 0 <= f < n]
        if bad:
            raise ConfigError(f"--frames {bad} are outside split {ns.split!r}, which has frames 0-{n - 1}")
    else:
        frames = sorted(np.random.default_rng(ns.seed).choice(n, min(ns.count, n), replace=False).tolist())
    out = ns.out or f"{ns.store.rstrip('/').removesuffix('.zarr')}.{ns.split}.png"
    contact_sheet(s, ns.split, frames, scale=ns.scale, columns=ns.columns).save(out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def merge_params(base: dict, overlay: dict) -> dict:
    """`overlay` merged over `base` key by key, as Snakemake merges a --configfile; then the experiments
    marked `enabled: false` dropped, since DVC's stages run every experiment params.yaml lists."""
    from .config import enabled_experiments, merge

    merged = merge(base, overlay)
    if isinstance(merged.get("experiments"), dict):
        merged["experiments"] = enabled_experiments(merged)
    return merged


def _hydra_value(v) -> str:
    """A value in the override grammar DVC's --set-param reads (Hydra's): strings quoted, no spaces, so
    each override is one argument."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        for quote in "'\"":
            if quote not in v and not v.endswith("\\"):
                return quote + v + quote
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_hydra_value(x) for x in v) + "]"
    if isinstance(v, dict) and all(isinstance(k, str) and _HYDRA_KEY.fullmatch(k) for k in v):
        return "{" + ",".join(f"{k}:{_hydra_value(x)}" for k, x in v.items()) + "}"
    raise ConfigError(f"DVC's --set-param cannot give the value {v!r}; write the merged params with --out instead")


_HYDRA_KEY = re.compile(r"[A-Za-z_][\w./\-+$%*@?|]*")  # a dict key Hydra reads unquoted


def dvc_set_params(base: dict, target: dict, path: str = "") -> list[str]:
    """DVC --set-param overrides that turn `base` into `target`: a changed value set (`key=value`), a new key
    added (`+key=value`), a key gone removed (`~key`); mappings on both sides compared key by key, unless a
    key holds a dot (as `set:`'s `train.steps`), which an override path cannot name: then the whole mapping."""
    plain = all(isinstance(k, str) and k.isidentifier() for k in [*base, *target])
    if path and not plain:
        return [] if base == target else [f"{path.rstrip('.')}={_hydra_value(target)}"]
    out = []
    for k in base:
        if k not in target:
            out.append(f"~{path}{k}")
    for k, v in target.items():
        if k not in base:
            out.append(f"+{path}{k}={_hydra_value(v)}")
        elif isinstance(v, dict) and isinstance(base[k], dict):
            out += dvc_set_params(base[k], v, f"{path}{k}.")
        elif v != base[k] or type(v) is not type(base[k]):
            out.append(f"{path}{k}={_hydra_value(v)}")
    return out


def cmd_params(ns) -> int:
    """Merge an overlay such as config/demo.yaml over params.yaml as Snakemake's --configfile does, and
    drop the experiments it disables: DVC reads only params.yaml and runs every experiment listed there.
    E.g. python -m datagen params config/demo.yaml --out params.yaml && dvc repro"""
    import yaml

    docs = []
    for path in (ns.base, ns.overlay):
        try:
            with open(path) as fh:
                docs.append(yaml.safe_load(fh) or {})
        except FileNotFoundError:
            raise ConfigError(f"no such file: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(docs[-1], dict):
            raise ConfigError(f"{path}: expected a mapping of sections (datasets:, experiments:, ...)")
    if ns.exp_run and ns.out:
        raise ConfigError("--exp-run runs the overlay as a DVC experiment and writes no file; drop --out")
    merged = merge_params(*docs)
    if ns.exp_run:
        return _exp_run(dvc_set_params(docs[0], merged), ns.exp_name or Path(ns.overlay).stem)
    text = yaml.safe_dump(merged, sort_keys=False)
    if ns.out:
        tmp = Path(ns.out + ".tmp")
        tmp.write_text(text)
        tmp.replace(ns.out)  # whole or not at all
        print(f"wrote {ns.out}: {len(merged.get('datasets', {}))} datasets, "
              f"{len(merged.get('experiments', {}))} experiments", file=sys.stderr)
    else:
        print(text, end="")
    return 0


def _exp_run(overrides: list[str], name: str) -> int:
    """`dvc exp run --temp`: the experiment runs in a temporary copy with the overrides applied there, so the
    workspace's params.yaml stays as it is; the results are an experiment (`dvc exp show`, `dvc exp apply`)."""
    import shlex
    import shutil
    import subprocess

    dvc = shutil.which("dvc")
    if dvc is None:
        raise ConfigError("--exp-run needs DVC on the PATH (pip install dvc); or write the merged params with --out")
    args = ["dvc", "exp", "run", "--temp", "--name", name, *(a for o in overrides for a in ("-S", o))]
    print("running: " + shlex.join(args), file=sys.stderr, flush=True)
    return subprocess.call([dvc, *args[1:]])


def cmd_fingerprint(ns) -> int:
    """SHA-256 over the syntax trees of FILES without their docstrings: it changes when the code
    does, not when a comment, a docstring or the layout does. dvc.yaml's code stage writes one per stage
    result, and the costly stages depend on it instead of on whole packages."""
    from .fingerprint import source_fingerprint

    try:
        digest = source_fingerprint(ns.files)
    except (OSError, ValueError) as e:
        raise ConfigError(str(e)) from None
    text = f"{digest}\n"
    if ns.out:
        out = Path(ns.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if not out.exists() or out.read_text() != text:  # unchanged bytes: DVC sees nothing new
            out.write_text(text)
    else:
        print(text, end="")
    return 0


def _command(sub, func, help: str) -> argparse.ArgumentParser:
    """The subcommand that runs `func` (cmd_NAME is NAME); its --help description is func's docstring."""
    c = sub.add_parser(func.__name__.removeprefix("cmd_"), help=help, description=func.__doc__)
    c.set_defaults(func=func)
    return c


def _store_command(sub, name: str, help: str, description: str, example: str, split_help: str):
    """A generator's subcommand: its output store and --split flags (the job and parameter flags follow)."""
    c = sub.add_parser(name, help=help,
                       description=description + " Rerunning the same command finishes an interrupted store.")
    c.add_argument("out", help=f"output store, e.g. results/data/{example}.zarr")
    c.add_argument("--split", action="append", type=_parse_split, metavar="NAME=FRAMES", help=split_help)
    return c


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m datagen", description="Make, check and look at scene stores: "
                                "3D-Room and Atari datasets as Zarr. `python -m datagen COMMAND --help` gives "
                                "each command's flags.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    r = _store_command(sub, "room3d", "render a 3D-Room dataset (paper, appendix E) into a Zarr store",
                       "Render 3D-Room scenes with MuJoCo into a Zarr scene store.", "room3d_small",
                       "a split and its size; repeat (default: train=63000 val=7000 test=7000, the paper's)")
    _add_job_flags(r, "rendering")
    _add_config_flags(r, Room3DConfig)
    r.set_defaults(func=cmd_room3d)

    a = _store_command(sub, "atari", "record Atari frames from agent rollouts, with RAM boxes, into a Zarr store",
                       "Record frames of Atari games (gymnasium + ale-py) from agent rollouts into a Zarr scene "
                       "store, with object boxes read from the RAM (OCAtari) and filtered for objects not drawn in "
                       "the frame. Splits are by episode.", "atari_spaceinvaders",
                       "a split and its frames PER GAME; repeat (default: train=50000 val=5000 test=5000, the paper's)")
    a.add_argument("--game", action="append", choices=sorted(ATARI_GAMES), metavar="GAME",
                   help="a game; repeat for a joint store (default: SpaceInvaders). One of: " + ", ".join(sorted(ATARI_GAMES)))
    _add_job_flags(a, "recording")
    _add_config_flags(a, AtariConfig, skip=("games",),
                      notes={"policy": " (or the path of a TorchScript policy file)"})
    a.set_defaults(func=cmd_atari)

    m = _command(sub, cmd_merge, "join part stores (written with --part I/N) into one complete store")
    m.add_argument("out", help="the merged store, e.g. results/data/room3d_large.zarr")
    m.add_argument("parts", nargs="+", help="the part stores, in any order")
    m.add_argument("--overwrite", action="store_true", help="replace a store at OUT")

    i = _command(sub, cmd_inspect, "validate a store and print a summary")
    i.add_argument("store", help="the store (a path or an s3:// URL)")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.add_argument("--full", action="store_true",
                   help="also decode every chunk of every array (masks and per-frame arrays too), so changed "
                        "bytes fail their checksum. Costs about as much again as the whole default inspect: on "
                        "a 2560-frame 64x64 store about 2 s more (inspect about 2 s without, 4 s with)")

    c = _command(sub, cmd_coco, "write one split's ground truth as COCO-style JSON")
    c.add_argument("store", help="the store (a path or an s3:// URL)")
    c.add_argument("--split", required=True, help="the split to export, e.g. test")
    c.add_argument("--out", help="output file (default: stdout)")

    s = _command(sub, cmd_show, "write a PNG contact sheet of frames with their boxes")
    s.add_argument("store", help="the store (a path or an s3:// URL)")
    s.add_argument("--split", default="train", help="default: %(default)s")
    s.add_argument("--out", help="PNG path (default: beside the store, STORE.SPLIT.png)")
    s.add_argument("--count", type=int, default=16, help="random frames to show (default: 16)")
    s.add_argument("--frames", type=int, nargs="+", help="these frames instead of random ones")
    s.add_argument("--seed", type=int, default=0, help="which random frames (default: 0)")
    s.add_argument("--scale", type=int, default=2, help="pixel magnification (default: 2)")
    s.add_argument("--columns", type=int, default=8, help="frames a row (default: %(default)s)")

    q = _command(sub, cmd_params, "params.yaml with an overlay (e.g. config/demo.yaml) merged in, for DVC")
    q.add_argument("overlay", help="the YAML to merge over the base, e.g. config/demo.yaml")
    q.add_argument("--base", default="params.yaml", help="default: %(default)s")
    q.add_argument("--out", help="write here (default: print); may be the base itself")
    q.add_argument("--exp-run", action="store_true",
                   help="run it as a DVC experiment instead (dvc exp run --temp with one --set-param per setting "
                        "that differs), leaving the tracked params.yaml untouched; dvc exp show lists its scores")
    q.add_argument("--exp-name", help="the experiment's name with --exp-run (default: the overlay's, e.g. demo)")

    f = _command(sub, cmd_fingerprint, "a hash of Python files' code, blind to comments and docstrings (DVC)")
    f.add_argument("files", nargs="+", help="Python source files, e.g. space/model.py space/train.py")
    f.add_argument("--out", help="write the hash here (default: print it)")

    return p


def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    from .store import StoreError

    try:
        code = ns.func(ns)
        sys.stdout.flush()  # a reader that went away (`| head`) shows here, not in Python's exit
        return code
    except BrokenPipeError:
        return broken_pipe()
    except (ConfigError, StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def broken_pipe() -> int:
    """The reader of stdout has gone (`... | head`): stop quietly, as a command killed by SIGPIPE does.
    Further writes (and Python's final flush) go to /dev/null instead of raising again."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 128 + 13  # 141: the shell's status for SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
