"""An experiment trained with several seeds: each seed's file combined into the experiment's.

The pipeline trains one run per seed (results/runs/EXPERIMENT/seeds/SEED/) and combines their files with
`python -m space seeds FILE... --out FILE`:
- JSON (a run's train.json, a split's metrics.json): every number the seeds share, averaged over them at
  the top level (so tables and `dvc metrics` read the experiment like a single run), its spread under
  "spread" (sample standard deviation, min, max), and each seed's own document under "per_seed";
- CSV (metrics.csv, val.csv): the mean over seeds of every column, at each step all seeds logged.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from .config import ConfigError


def seed_label(path: str | Path) -> str:
    """results/runs/x/seeds/3/train.json -> "3": the folder after the nearest `seeds`; else the path."""
    parts = Path(path).parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "seeds":
            return parts[i + 1]
    return str(path)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def combine_json(docs: dict[str, dict]) -> dict:
    """{seed: document} -> the experiment's document.

    Numbers every seed has: their mean (top level) and {std, min, max} ("spread"). Other values every seed
    has alike (the split, the checkpoint's name): kept. A value that differs and is not a number (the run
    directory): only under "per_seed". Runs whose background did not split (train.json's background_split)
    are listed under "background_not_split"."""
    if not docs:
        raise ConfigError("no per-seed files to combine")
    seeds = list(docs)
    first = docs[seeds[0]]
    out, spread = {}, {}
    for key, value in first.items():
        values = [d.get(key) for d in docs.values()]
        if all(_number(v) for v in values):
            mean = sum(values) / len(values)
            var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
            out[key] = mean
            spread[key] = {"std": math.sqrt(var), "min": min(values), "max": max(values)}
        elif all(v == value for v in values):
            out[key] = value
    failed = [s for s, d in docs.items() if isinstance(d.get("background_split"), dict)
              and d["background_split"].get("split") is False]
    if any("background_split" in d for d in docs.values()):
        out["background_not_split"] = failed
    out.update(seeds=seeds, spread=spread, per_seed=docs)
    return out


def combine_csv(tables: dict[str, list[dict]]) -> list[dict]:
    """{seed: rows of a CSV with a `step` column} -> rows of the mean over seeds, one per step every seed
    logged, for the columns every seed has (a cell some seed left empty stays empty)."""
    if not tables:
        raise ConfigError("no per-seed files to combine")
    for seed, rows in tables.items():
        if rows and "step" not in rows[0]:
            raise ConfigError(f"seed {seed}'s file has no step column; give metrics.csv or val.csv files")
    columns = [c for c in (next(iter(tables.values())) or [{}])[0] if all(t and c in t[0] for t in tables.values())]
    by_step = [{int(float(r["step"])): r for r in rows} for rows in tables.values()]
    steps = sorted(set.intersection(*(set(s) for s in by_step)))
    out = []
    for step in steps:
        row = {}
        for c in columns:
            cells = [b[step][c] for b in by_step]
            row[c] = step if c == "step" else ("" if "" in cells else sum(map(float, cells)) / len(cells))
        out.append(row)
    return out


def combine_files(files: list[str], out: str, allow_missing: bool = False) -> None:
    """Combine per-seed files (all .json or all .csv, like `out`) into `out`. With `allow_missing`, files
    that do not exist are left out (a run that never validated has no val.csv); none at all gives an empty
    table."""
    paths = [Path(f) for f in files]
    missing = [str(p) for p in paths if not p.is_file()]
    if allow_missing:
        paths = [p for p in paths if p.is_file()]
    elif missing:
        raise ConfigError(f"no such file: {', '.join(missing)}; train (and evaluate) each seed first")
    kinds = {p.suffix for p in paths} | {Path(out).suffix}
    if len(kinds) != 1 or kinds - {".json", ".csv"}:
        raise ConfigError(f"give files of one kind, .json or .csv, and an --out of the same kind; got "
                          f"{', '.join(sorted(kinds))}")
    labels = [seed_label(p) for p in paths]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"two files for one seed among {', '.join(map(str, paths))}; give each seed's once")
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.suffix == ".json":
        if not paths:
            raise ConfigError(f"none of the files exists: {', '.join(missing)}")
        docs = {}
        for label, p in zip(labels, paths):
            try:
                docs[label] = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{p} is not JSON ({e}); was it written by `python -m space`?") from None
        target.write_text(json.dumps(combine_json(docs), indent=2))
        return
    tables = {}
    for label, p in zip(labels, paths):
        with open(p, newline="") as fh:
            tables[label] = list(csv.DictReader(fh))
    rows = combine_csv(tables) if tables else []
    with open(target, "w", newline="") as fh:
        columns = list(rows[0]) if rows else ["step"]
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
