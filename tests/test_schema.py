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

from datagen.config import ATARI_GAMES, SHAPES, AtariConfig, ConfigError, Room3DConfig
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
