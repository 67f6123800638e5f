"""The params schema (workflow/schemas/params.schema.yaml) against the dataclasses it describes.

Snakemake validates params.yaml with the schema before any job runs, and the generators check their own
dataclasses again; these tests fail when the two drift apart: a field added to a dataclass but not to the
schema (which would then refuse it), one removed (which the schema would still let through), or a bound
that one side enforces and the other does not."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from datagen.config import ATARI_GAMES, SHAPES, AtariConfig, ConfigError, Room3DConfig, StoreConfig
from space.config import PRESETS

SCHEMA = yaml.safe_load((Path(__file__).resolve().parents[1] / "workflow/schemas/params.schema.yaml").read_text())
DATASET = SCHEMA["properties"]["datasets"]["additionalProperties"]["properties"]
# Each generator section of a dataset, the dataclass it fills, and the fields given outside the section.
SECTIONS = {"room3d": (Room3DConfig, {"objects": [2, 3]}), "atari": (AtariConfig, {"games": ["SpaceInvaders"]})}


@pytest.mark.parametrize("section", SECTIONS)
def test_each_generator_section_lists_exactly_its_dataclass_fields(section):
    cls, outside = SECTIONS[section]
    fields = {f.name for f in dataclasses.fields(cls)} - set(outside)
    assert set(DATASET[section]["properties"]) == fields


def test_the_schemas_choices_are_the_codes():
    assert DATASET["games"]["items"]["enum"] == sorted(ATARI_GAMES)
    assert DATASET["room3d"]["properties"]["shapes"]["items"]["enum"] == list(SHAPES)
    preset = SCHEMA["properties"]["experiments"]["additionalProperties"]["properties"]["preset"]
    assert sorted(preset["enum"]) == sorted(PRESETS)


def _bounded(section):
    """(field, value just outside one of the schema's bounds) for every bound on a number of a section."""
    for name, spec in DATASET[section]["properties"].items():
        step = 1 if spec.get("type") == "integer" else 0.5
        if "exclusiveMinimum" in spec:
            yield name, spec["exclusiveMinimum"]
        elif "minimum" in spec:
            yield name, spec["minimum"] - step
        if "exclusiveMaximum" in spec:
            yield name, spec["exclusiveMaximum"]
        elif "maximum" in spec:
            yield name, spec["maximum"] + step


def test_the_bounds_checked_include_upper_ones():
    assert ("background_tolerance", 255) in list(_bounded("atari"))
    assert ("fovy", 180) in list(_bounded("room3d")) and ("fovy", 0) in list(_bounded("room3d"))


@pytest.mark.parametrize("section, name, value",
                         [(s, n, v) for s in SECTIONS for n, v in _bounded(s)])
def test_a_value_the_schema_refuses_the_dataclass_refuses_too(section, name, value):
    cls, outside = SECTIONS[section]
    with pytest.raises(ConfigError, match=name):
        cls.from_dict({**outside, name: value}).validate()


def test_the_datagen_section_is_the_stores_settings_and_the_jobs_flags():
    """params.yaml's datagen: section holds StoreConfig's settings (shard_size) and the store-writing job's
    workers and parts; a value below the schema's minimum is one the store or the job refuses too."""

    section = SCHEMA["properties"]["datagen"]["properties"]
    store_fields = {f.name for f in dataclasses.fields(StoreConfig)}
    assert set(section) - {"workers", "parts"} <= store_fields
    for name in set(section) & store_fields:
        with pytest.raises(ConfigError, match=name):
            StoreConfig(**{name: section[name]["minimum"] - 1}).validate()


@pytest.mark.parametrize("name", ["train", "val", "test", "holdout_2", "a", "Train", "1st", "a-b", "", "two words",
                                  "_x", "val.2"])
def test_a_split_name_the_schema_accepts_is_one_the_store_accepts(name):
    import re

    accepted = re.search(DATASET["splits"]["propertyNames"]["pattern"], name) is not None
    try:
        StoreConfig(splits={name: 1}).validate()
        stored = True
    except ConfigError:
        stored = False
    assert stored or not accepted, name
