#!/usr/bin/env bash
# Snakemake runs this after creating the datagen env (`--sdm conda`). ocatari's metadata pins numpy<2,
# which zarr 3 cannot share; its RAM reader runs under numpy 2 (see pyproject.toml's atari extra).
set -euo pipefail
python -m pip install --no-deps "ocatari==2.2.1"
