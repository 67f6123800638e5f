"""Which of a run's checkpoints to score, chosen by a validation score (not in the paper: its code scores
the checkpoint with the best amortised validation AP, the one `best` names).

Each candidate is scored on a split with `evaluate`, refined as the test scores will be where asked, so the
choice rests on the numbers that will be reported rather than on the amortised ones training kept its
checkpoints by. The lowest count error (or highest AP50) wins; a tie goes to the earlier candidate.
Candidates saved at the same step of one run hold the same weights and are scored once."""

from __future__ import annotations

import json
from pathlib import Path

from .config import ConfigError

# the score a selection may go by -> whether lower is better
SELECT_BY = {"count_error": True, "ap50": False}
SELECTION_FILE = "selected.json"


def select_checkpoint(run: str, data: str, split: str, out: str | Path, candidates: dict[str, Path], by: str,
                      **evaluate_kwargs) -> dict:
    """candidates: name -> checkpoint file, in order of preference on a tie. Scores each distinct one into
    OUT/NAME/ (evaluate's files) and writes OUT/selected.json; returns what it holds: the chosen name, its
    step, and every candidate's step, count error and AP50."""
    from .checkpoints import load_checkpoint
    from .evaluate import evaluate

    if by not in SELECT_BY:
        raise ConfigError(f"select by {by!r}: give one of {', '.join(SELECT_BY)}")
    if not candidates:
        raise ConfigError("no candidate checkpoints; give at least one of best, best_count, last")
    out = Path(out)
    scores, same_weights, scored_at = {}, {}, {}
    for name, path in candidates.items():
        step = int(load_checkpoint(Path(path))["step"])
        if step in scored_at:  # e.g. best.pt written at the last validation, which is the last step
            same_weights[name] = scored_at[step]
            scores[name] = {**scores[scored_at[step]], "checkpoint": str(path)}
            continue
        scored_at[step] = name
        m = evaluate(run, data, split, str(out / name), checkpoint=path, **evaluate_kwargs)
        scores[name] = {"step": m["step"], "count_error": m["count_error"], "ap50": m["ap50"], "checkpoint": str(path)}
    sign = 1.0 if SELECT_BY[by] else -1.0
    chosen = min(candidates, key=lambda name: sign * scores[name][by])  # min keeps the first of equals
    selection = {"checkpoint": chosen, "step": scores[chosen]["step"], "by": by, "split": split, "run": str(run),
                 "refined": bool(evaluate_kwargs.get("refine")), "candidates": scores, "same_weights": same_weights}
    out.mkdir(parents=True, exist_ok=True)
    (out / SELECTION_FILE).write_text(json.dumps(selection, indent=2) + "\n")
    return selection


def read_selection(path: str | Path, run: str) -> str:
    """The checkpoint name a selection file chose for `run`; refuses one written for another run."""
    from .checkpoints import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--checkpoint {path}: no such file; choose one with `python -m space select`, or "
                              "give best, best_count, last or a checkpoint's path")
    try:
        selection = json.loads(path.read_text())
        chosen, chosen_for = selection["checkpoint"], selection["run"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"--checkpoint {path}: not a selection written by `python -m space select` (it "
                              "needs the keys checkpoint and run); write it again with that command") from None
    if _same_run(chosen_for) != _same_run(run):
        raise CheckpointError(f"--checkpoint {path}: chosen among the checkpoints of {chosen_for}, not of --run {run}; "
                              "give that run, or select again for this one")
    return chosen


def _same_run(location: str) -> str:
    """A run's location in one spelling: a local folder's absolute path, a URL without a trailing slash."""
    return location.rstrip("/") if "://" in location else str(Path(location).resolve())
