"""Checkpoints of `python -m space train`: written atomically, never with NaN or infinite values; read
without executing pickled code and checked to fit the model their config describes, with each problem
named and its fix. `load_model` is how evaluation, `show` and `sample` get a trained model."""

from __future__ import annotations

import dataclasses

import os
from pathlib import Path

import torch

from .config import Config, ConfigError
from .model import SPACE


CHECKPOINT_FORMAT = 1
SCORE_KEYS = ("format", "step", "config", "model")  # what evaluate, show and sample read
RESUME_KEYS = (*SCORE_KEYS, "opt_fg", "opt_bg", "rng")  # what a resumed run needs besides
UNUSABLE_FIX = "retrain the run (python -m space train --restart) or use another one"  # ends those errors


class TrainingDiverged(RuntimeError):
    """A loss term became NaN or infinite; the last good checkpoint is kept."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or from another configuration."""


def nonfinite(tensors: dict, limit: int = 3) -> list:
    """The names of the first `limit` floating-point tensors holding NaN or infinite values."""
    bad = []
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad.append(name)
            if len(bad) == limit:
                break
    return bad


def _optimiser_tensors(opt_state: dict) -> dict:
    return {f"{i}.{k}": v for i, per in opt_state.get("state", {}).items() for k, v in per.items()}


def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary file and rename: a kill never leaves a half-written checkpoint. A state with
    NaN or infinite values is refused: a resume from it could only fail again."""
    for part in ("model", "opt_fg", "opt_bg"):
        if part in state:
            bad = nonfinite(state[part] if part == "model" else _optimiser_tensors(state[part]))
            if bad:
                raise TrainingDiverged(f"step {state.get('step')}: {part} holds NaN or infinite values "
                                       f"({', '.join(bad)}); not written, the last good checkpoint is kept. "
                                       "Lower the learning rates.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _check_structure(state, path: Path, need: tuple) -> None:
    """What a checkpoint must hold for the caller (`need`), each of the right kind."""
    what = f"{path} is not a checkpoint of python -m space train"
    fix = UNUSABLE_FIX
    if not isinstance(state, dict):
        raise CheckpointError(f"{what}: it holds a {type(state).__name__}, not a dict of {', '.join(need)}; {fix}")
    missing = [k for k in need if k not in state]
    if missing:
        raise CheckpointError(f"{what}: it lacks {', '.join(missing)} (of {', '.join(need)}); {fix}")
    if state["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {state['format']!r}, expected {CHECKPOINT_FORMAT}; {fix}")
    kinds = {"step": int, "config": dict, "model": dict, "opt_fg": dict, "opt_bg": dict, "rng": list}
    wrong = [f"{k} is a {type(state[k]).__name__}" for k in need if k in kinds and not isinstance(state[k], kinds[k])]
    if not wrong and "step" in need and state["step"] < 0:
        wrong.append(f"step is {state['step']}")
    if not wrong and "config" in need:
        try:
            Config.from_dict(state["config"])
        except (ConfigError, TypeError, AttributeError) as e:
            wrong.append(f"its config is not valid ({e})")
    if not wrong and "model" in need and not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        wrong.append("model is not a dict of tensors")
    if not wrong and "rng" in need and not (state["rng"] and all(isinstance(t, torch.Tensor) for t in state["rng"])):
        wrong.append("rng is not a list of RNG states")
    if wrong:
        raise CheckpointError(f"{what}: {'; '.join(wrong)}; {fix}")
    if not ("model" in need and "config" in need):
        return
    try:
        with torch.random.fork_rng(devices=[]):  # building the model draws initial weights: leave the RNG be
            model = SPACE(Config.from_dict(state["config"]).model)
    except (ConfigError, ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: its weights do not fit the model its config describes (the model "
                              f"cannot be built: {type(e).__name__}: {e}); {fix}") from None
    misfit = weight_mismatches(state["model"], model)
    if misfit:
        raise CheckpointError(f"{path}: its weights do not fit the model its config describes "
                              f"({'; '.join(misfit)}); {fix}")
    if "opt_fg" in need and "opt_bg" in need:
        for name, params in zip(("opt_fg", "opt_bg"), model.param_groups()):  # (fg, bg) parameters
            why = optimiser_misfit(state[name], params)
            if why:
                raise CheckpointError(f"{path}: its {name} optimiser state does not fit the model ({why}); {fix}")


def optimiser_misfit(saved: dict, params: list) -> str | None:
    """How an optimiser's saved state fails to fit `params` (one group, as train builds them), or None.
    torch's load_state_dict checks the group sizes only late and the state's shapes not at all: a misfit
    would surface as a traceback inside the first optimiser step."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not (isinstance(groups, list) and len(groups) == 1 and isinstance(groups[0], dict)
            and len(groups[0].get("params", ())) == len(params)):
        return f"its parameter groups do not hold the model's {len(params)} parameters"
    index = dict(zip(groups[0]["params"], params))
    for i, per in (saved.get("state") or {}).items():
        p = index.get(i)
        if p is None or not isinstance(per, dict):
            return f"state for parameter {i!r}, which the group does not list"
        for k, v in per.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape:
                return f"{k} of parameter {i} is {tuple(v.shape)}, the parameter's {tuple(p.shape)}"
    return None


def weight_mismatches(weights: dict, model: torch.nn.Module, limit: int = 3) -> list[str]:
    """How `weights` fail to fit `model` (missing or unexpected keys, other shapes), the first `limit` of
    each; empty when load_state_dict will take them. Checked on loading, so that a mismatch is named
    instead of surfacing as load_state_dict's many-line RuntimeError."""
    expected = model.state_dict()

    def first(items: list) -> str:
        return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")

    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    shapes = [f"{k} is {tuple(weights[k].shape)}, the model's {tuple(v.shape)}"
              for k, v in expected.items() if k in weights and weights[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing: {first(missing)}")
    if unexpected:
        problems.append(f"not in the model: {first(unexpected)}")
    if shapes:
        problems.append(f"other shapes: {first(shapes)}")
    return problems


def load_checkpoint(path: Path, cfg: Config | None = None, map_location="cpu", need: tuple = SCORE_KEYS,
                    finite: bool = True) -> dict:
    """Load without executing pickled code (weights_only); check it holds what the caller `need`s (and, with
    `finite`, finite weights); refuse one made with another model config."""
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""  # one line: torch's messages run on
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {first}); "
                              f"{UNUSABLE_FIX}") from None
    _check_structure(state, path, need)
    if finite:
        bad = nonfinite(state["model"])
        if bad:
            raise CheckpointError(f"{path} holds NaN or infinite weights ({', '.join(bad)}): the run diverged; "
                                  "retrain it with lower learning rates (python -m space train --restart)")
    if cfg is not None:
        saved = Config.from_dict(state["config"]).to_dict()["model"]  # settings added since: their defaults
        now = cfg.to_dict()["model"]
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if diff:
            raise CheckpointError(
                f"{path} was trained with other model settings ({', '.join(diff)}: "
                + "; ".join(f"{k} {saved.get(k)} -> {now.get(k)}" for k in diff[:4])
                + "); use a new run directory, or the settings it was trained with"
            )
    return state


def load_model(path: Path, device="cpu", **model_settings) -> tuple[SPACE, Config, dict]:
    """A trained model from a checkpoint file, in eval mode on `device`; with its config and the checkpoint
    (its "step", and the run's "record" where it has one). `model_settings` replace model settings that
    leave the weights as they are (e.g. sparse_threshold=0.1)."""
    state = load_checkpoint(Path(path))
    cfg = Config.from_dict(state["config"])
    cfg.model = dataclasses.replace(cfg.model, **model_settings).validate()
    model = SPACE(cfg.model)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg, state


def restore_rng(state: dict, rank: int, device: torch.device) -> None:
    """This rank's RNG state from the checkpoint. A rank the checkpoint has no state for (more ranks than
    wrote it) keeps its own stream, seeded by rank, so no two ranks draw the same noise."""
    if rank < len(state["rng"]):
        torch.set_rng_state(state["rng"][rank])
    cuda = state.get("cuda_rng")
    if device.type == "cuda" and cuda is not None:
        cuda = [cuda] if isinstance(cuda, torch.Tensor) else cuda  # one state: written by an older version
        if rank < len(cuda):
            torch.cuda.set_rng_state(cuda[rank], device)
