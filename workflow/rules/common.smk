# Configuration checks and helpers shared by every rule file. Everything here runs when the workflow is
# parsed, so a bad params.yaml stops Snakemake before any job starts.

import os
import sys

from snakemake.utils import validate

from datagen.config import enabled_experiments

validate(config, "../schemas/params.schema.yaml")  # types, ranges, unknown keys (named in the error)


def _check_datasets() -> dict:
    """What a JSON schema cannot say (min <= max, objects that fit on the floor), from datagen itself.
    Returns each dataset's frame size and train frames, which the experiments are checked against."""
    from datagen.config import AtariConfig, ConfigError, Room3DConfig

    shapes = {}
    for name, ds in config["datasets"].items():
        try:
            if ds["generator"] == "room3d":
                gen = Room3DConfig.from_dict({**ds.get("room3d", {}), "objects": ds["objects"]}).validate()
                train_frames = ds["splits"]["train"]
            elif ds["generator"] == "atari":
                if "objects" in ds:
                    raise ConfigError("objects: an Atari store's objects come from the games; remove the key")
                gen = AtariConfig.from_dict({**ds.get("atari", {}), "games": ds["games"]}).validate()
                train_frames = ds["splits"]["train"] * len(ds["games"])  # splits are frames per game
        except ConfigError as e:
            raise ValueError(f"params: datasets.{name}: {e}") from None
        shapes[name] = {"image_size": gen.image_size, "train_frames": train_frames}
    return shapes


DATASET_SHAPES = _check_datasets()

DATASETS = sorted(config["datasets"])
EXPERIMENTS = sorted(enabled_experiments(config))


def set_items(overrides: dict) -> list:
    """{'train.steps': 600} -> ["train.steps=600"]: an experiment's `set` as `python -m space train --set`
    reads it (values as YAML; JSON is YAML). The one serialisation of overrides: the checks below resolve
    these very items, and the rules pass them."""
    import json

    return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]


def set_flags(overrides: dict) -> str:
    """The `set_items` as --set flags, each quoted for the shell: a value from params.yaml (or
    `dvc exp run -S`) is data, never code."""
    import shlex

    return " ".join(f"--set {shlex.quote(item)}" for item in set_items(overrides))


def _check_experiments() -> dict:
    """Each experiment names a dataset that exists, its settings resolve (space's own checks), and it can
    run on that dataset: the model's frame size is the store's, and the train split holds a batch.
    Returns each experiment's seeds: its `seeds` list, or its settings' train.seed alone."""
    from space.config import resolve_config
    from space.config import ConfigError

    seeds = {}
    for name in EXPERIMENTS:
        exp = config["experiments"][name]
        if exp["dataset"] not in config["datasets"]:
            raise ValueError(
                f"params: experiments.{name}.dataset is {exp['dataset']!r}, which is not a key of datasets "
                f"({', '.join(DATASETS)})"
            )
        try:
            cfg = resolve_config(exp["preset"], None, set_items(exp.get("set", {})))
        except ConfigError as e:
            raise ValueError(f"params: experiments.{name}: {e}") from None
        ds = DATASET_SHAPES[exp["dataset"]]
        where = f"params: experiments.{name} (preset {exp['preset']}) on datasets.{exp['dataset']}"
        if cfg.model.image_size != ds["image_size"]:
            raise ValueError(
                f"{where}: the model takes {cfg.model.image_size}x{cfg.model.image_size} frames but the "
                f"dataset makes {ds['image_size']}x{ds['image_size']}; set the dataset's image_size to "
                f"{cfg.model.image_size} or the experiment's model.image_size to {ds['image_size']}"
            )
        if ds["train_frames"] < cfg.train.batch_size:
            raise ValueError(
                f"{where}: the train split has {ds['train_frames']} frames, fewer than one batch of "
                f"{cfg.train.batch_size}; enlarge splits.train or lower train.batch_size"
            )
        if "seeds" in exp and "train.seed" in exp.get("set", {}):
            raise ValueError(
                f"params: experiments.{name}: both seeds and set: train.seed; list the seeds in seeds alone"
            )
        if "checkpoint_by" in exp and len(exp.get("checkpoints", ["best"])) < 2:
            raise ValueError(
                f"params: experiments.{name}: checkpoint_by chooses among two or more checkpoints; list them in "
                "checkpoints (e.g. [best, last]) or remove checkpoint_by"
            )
        for key in ("refine_cost", "refine_candidates", "refine_box_steps", "refine_box_lr", "refine_box_rounds"):
            if key in exp and not exp.get("refine"):
                raise ValueError(
                    f"params: experiments.{name}: {key} applies to refined scores only; set refine: true "
                    f"or remove {key}"
                )
        seeds[name] = exp.get("seeds", [cfg.train.seed])
    return seeds


# Each experiment trains one run per seed, in results/runs/{experiment}/seeds/{seed}/; the experiment's
# train.json, metrics.csv, val.csv and eval/test/metrics.json combine them (python -m space seeds).
SEEDS = _check_experiments()


def seed_paths(pattern: str):
    """A per-seed path pattern ({seed} in it) -> a function of wildcards giving the experiment's paths."""
    return lambda wc: expand(pattern, experiment=wc.experiment, seed=SEEDS[wc.experiment])


def every_seed(pattern: str) -> list:
    """A per-seed path pattern ({experiment} and {seed} in it) -> its paths for every seed of every experiment."""
    return [p for e in EXPERIMENTS for p in expand(pattern, experiment=e, seed=SEEDS[e])]


def cli_flags(params: dict) -> str:
    """A dataset's generator settings as datagen's flags (`datagen.__main__.config_argv`), each value quoted
    for the shell (a policy path, for one, is the user's text)."""
    import shlex

    from datagen.__main__ import config_argv

    return " ".join(map(shlex.quote, config_argv(params)))


def split_flags(splits: dict) -> str:
    import shlex

    return " ".join(f"--split {shlex.quote(f'{k}={v}')}" for k, v in splits.items())


def refine_flag(wc) -> str:
    """`--refine ` with the experiment's `refine_cost`, `refine_candidates` and box refinement, for evaluate
    and show where it says `refine: true`; else nothing."""
    exp = config["experiments"][wc.experiment]
    if not exp.get("refine"):
        return ""
    flags = "--refine "
    if "refine_cost" in exp:
        flags += f"--refine-cost {float(exp['refine_cost'])} "
    if "refine_candidates" in exp:
        flags += f"--refine-candidates {float(exp['refine_candidates'])} "
    if "refine_box_steps" in exp:
        flags += f"--refine-box-steps {int(exp['refine_box_steps'])} "
    if "refine_box_lr" in exp:
        flags += f"--refine-box-lr {float(exp['refine_box_lr'])} "
    if "refine_box_rounds" in exp:
        flags += f"--refine-box-rounds {int(exp['refine_box_rounds'])} "
    return flags


# Which checkpoint each seed's test scores, figure and latents are of: the experiment's one `checkpoints`
# entry (default best), or with several the one its validation scores choose (rule select_checkpoint).
SELECTION = "results/runs/{experiment}/eval/seeds/{seed}/val/selected.json"


def checkpoint_candidates(wc) -> list:
    return config["experiments"][wc.experiment].get("checkpoints", ["best"])


def checkpoint_selection(wc) -> list:
    """The seed's selection file as an input, where the experiment chooses among checkpoints; else none."""
    return [SELECTION.format(experiment=wc.experiment, seed=wc.seed)] if len(checkpoint_candidates(wc)) > 1 else []


def checkpoint_flag(wc) -> str:
    """`--checkpoint NAME ` of the experiment's one checkpoint, or of the seed's selection file."""
    names = checkpoint_candidates(wc)
    which = names[0] if len(names) == 1 else SELECTION.format(experiment=wc.experiment, seed=wc.seed)
    return f"--checkpoint {which} "


# Dataset jobs (datagen.smk): with datagen.parts = N > 1 a generator job writes part {part} of a store.
PARTS = config["datagen"].get("parts", 1)
# the generator's output: the store itself, or part {part} of it
GEN_OUT = "results/data/{dataset}.zarr" if PARTS == 1 else "results/parts/{dataset}/part{part}.zarr"


def part_flag(wc) -> str:
    return f"--part {wc.part}/{PARTS}" if PARTS > 1 else ""


def gen_out():
    return directory(GEN_OUT) if PARTS == 1 else temp(directory(GEN_OUT))


def staging(wc, output) -> str:
    """Where a generator job writes before moving the finished store to its output. Snakemake (and DVC)
    delete an interrupted job's outputs; a store written here survives a kill, and the rerun finishes it
    (python -m datagen ... --scratch) instead of starting over."""
    return output[0].replace("results/", "results/.staging/", 1)


def per_part(path: str) -> str:
    """A generator job's log or benchmark file: one per dataset, or with datagen.parts > 1 one per part."""
    stem, _, ext = path.rpartition(".")
    return path if PARTS == 1 else f"{stem}.part{{part}}.{ext}"
