# Configuration checks and helpers shared by every rule file. Everything here runs when the workflow is
# parsed, so a bad params.yaml stops Snakemake before any job starts.

import os
import sys

from snakemake.utils import validate

validate(config, "../schemas/params.schema.yaml")  # types, ranges, unknown keys (named in the error)


def _check_datasets():
    """What a JSON schema cannot say (min <= max, objects that fit on the floor), from datagen itself."""
    from datagen.config import AtariConfig, ConfigError, Room3DConfig

    for name, ds in config["datasets"].items():
        try:
            if ds["generator"] == "room3d":
                Room3DConfig.from_dict({**ds.get("room3d", {}), "objects": ds["objects"]}).validate()
            elif ds["generator"] == "atari":
                if "objects" in ds:
                    raise ConfigError("objects: an Atari store's objects come from the games; remove the key")
                AtariConfig.from_dict({**ds.get("atari", {}), "games": ds["games"]}).validate()
        except ConfigError as e:
            raise ValueError(f"params: datasets.{name}: {e}") from None


_check_datasets()

DATASETS = sorted(config["datasets"])
EXPERIMENTS = sorted(k for k, e in config.get("experiments", {}).items() if e.get("enabled", True))


def set_flags(overrides: dict) -> str:
    """{'train.steps': 600} -> "--set 'train.steps=600'" (values as YAML, as the CLI reads them)."""
    import json

    return " ".join(f"--set '{k}={json.dumps(v)}'" for k, v in overrides.items())


def _check_experiments():
    """Each experiment names a dataset that exists, and its settings resolve (space's own checks)."""
    from space.__main__ import resolve_config
    from space.config import ConfigError

    for name in EXPERIMENTS:
        exp = config["experiments"][name]
        if exp["dataset"] not in config["datasets"]:
            raise ValueError(
                f"params: experiments.{name}.dataset is {exp['dataset']!r}, which is not a key of datasets "
                f"({', '.join(DATASETS)})"
            )
        sets = [f"{k}={v}" for k, v in exp.get("set", {}).items()]
        try:
            resolve_config(exp["preset"], None, sets)
        except ConfigError as e:
            raise ValueError(f"params: experiments.{name}: {e}") from None


_check_experiments()


def cli_flags(params: dict) -> str:
    """{'size_max': 0.3, 'camera_distance': [7, 9]} -> '--size-max 0.3 --camera-distance 7 9'"""
    out = []
    for key, value in params.items():
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, (list, tuple)):
            items = []
            for v in value:  # colours are r,g,b triples
                items.append(",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v))
            out.append(f"{flag} {' '.join(items)}")
        else:
            out.append(f"{flag} {value}")
    return " ".join(out)


def split_flags(splits: dict) -> str:
    return " ".join(f"--split {k}={v}" for k, v in splits.items())


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


def gen_log(dataset_log: str) -> str:
    return dataset_log if PARTS == 1 else dataset_log.replace(".log", ".part{part}.log")
