"""Training: one loop, no framework. `python -m space train --help`.

A run directory holds everything about one run:

    config.json           the full configuration (model and train), as resolved
    checkpoints/last.pt   model, optimisers, step, RNG state; written atomically every N steps and at the end
    metrics.csv           one row per logged step: the loss terms, MSE, learning rates (for `dvc plots`)
    val.csv               validation MSE against step and wall time (figure 5's convergence panel)
    tb/                   TensorBoard scalars and decomposition images

The directory may be an object-store URL (s3://bucket/runs/NAME): the run is then trained in a local mirror
and copied up at every checkpoint (space/runs.py). A run whose directory already has a checkpoint resumes
from it. On CPU with a fixed seed a resumed run
continues with the losses an uninterrupted run would have had: the data order is a function of the
step (space/data.py) and the RNG state is in the checkpoint.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import torch

from .config import Config, ConfigError
from .data import StepBatchSampler, StoreDataset, collate_batch
from .memory import lean_host_allocator
from .model import SPACE
from .runs import RunMirror

CHECKPOINT_FORMAT = 1
TERMS = ("loss", "elbo", "log_lik", "kl_pres", "kl_where", "kl_depth", "kl_what", "kl_bg_mask", "kl_bg_comp",
         "boundary_loss")
CSV_FIELDS = ("step", "wall_s", *TERMS, "mse", "grad_norm", "fg_lr", "bg_lr", "glimpses")


class TrainingDiverged(RuntimeError):
    """A loss term became NaN or infinite; the last good checkpoint is kept."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or from another configuration."""


# --------------------------------------------------------------------------------------------- devices


_CLAIMED: list = []  # open lock files of the CUDA devices this process holds


def claim_free_gpu(n_devices: int, lock_dir: str | None = None) -> int:
    """The first of n_devices CUDA devices that no other `space train` on this machine holds.

    Snakemake runs several training jobs at once on a workstation (profiles/gpu: resources gpu=N) but
    does not say which job gets which GPU. Each process takes an exclusive lock file per device
    (released when the process ends, even by a kill), so concurrent jobs spread over the GPUs. All held:
    device 0, shared."""
    import fcntl
    import tempfile

    folder = Path(lock_dir or tempfile.gettempdir())
    for i in range(n_devices):
        fh = open(folder / f"space-train-gpu{i}.lock", "w")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            continue
        _CLAIMED.append(fh)
        return i
    return 0


def pick_device(cfg_device: str) -> torch.device:
    if cfg_device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        # one process per GPU: under torchrun the local rank decides; a user's CUDA_VISIBLE_DEVICES too
        n = torch.cuda.device_count()
        if n > 1 and "LOCAL_RANK" not in os.environ and "CUDA_VISIBLE_DEVICES" not in os.environ:
            return torch.device("cuda", claim_free_gpu(n))
        return torch.device("cuda")
    if cfg_device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {cfg_device!r} but this machine has no CUDA device; use auto or cpu")
    return torch.device(cfg_device)


def checkpoint_images(setting: int, device: torch.device) -> int:
    """train.checkpoint_images with -1 resolved: 4 images a chunk on CPU, off on CUDA."""
    if setting >= 0:
        return setting
    return 0 if device.type == "cuda" else 4


def distributed_context():
    """(rank, world, local_rank) from torchrun's environment; (0, 1, 0) without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


# ------------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary file and rename: a kill never leaves a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, cfg: Config | None = None, map_location="cpu") -> dict:
    """Load without executing pickled code (weights_only); refuse one made with another model config."""
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
        raise CheckpointError(f"{path} is not a readable checkpoint: {e}") from None
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {state.get('format')}, expected {CHECKPOINT_FORMAT}")
    if cfg is not None:
        saved = state["config"]["model"]
        now = cfg.to_dict()["model"]
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if diff:
            raise CheckpointError(
                f"{path} was trained with other model settings ({', '.join(diff)}: "
                + "; ".join(f"{k} {saved.get(k)} -> {now.get(k)}" for k in diff[:4])
                + "); use a new run directory, or the settings it was trained with"
            )
    return state


# ---------------------------------------------------------------------------------------------- logging


class CsvLog:
    """Append rows; on resume, rows after the checkpoint's step (written by the killed run) are dropped."""

    def __init__(self, path: Path, fields, resume_step: int | None):
        self.path, self.fields = path, fields
        rows = []
        if resume_step is not None and path.exists():
            with open(path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= resume_step]
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fields)
            w.writeheader()
            w.writerows(rows)

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, self.fields).writerow({k: row.get(k, "") for k in self.fields})


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: scalars still go to metrics.csv
        return None
    return SummaryWriter(str(path))


# ----------------------------------------------------------------------------------------------- train


def check_finite(terms: dict, step: int) -> None:
    bad = [k for k, v in terms.items() if not torch.isfinite(v).all()]
    if bad:
        raise TrainingDiverged(
            f"step {step}: {', '.join(bad)} became NaN or infinite; stopped without writing a checkpoint "
            f"(the last good one is kept). Lower the learning rates or check the data."
        )


@torch.no_grad()
def validation_mse(model, val_set: StoreDataset, batch_size: int, batches: int, seed: int, device, step: int) -> float:
    """Reconstruction MSE on the same `batches` fixed validation batches every time, so the curve compares
    across steps and a resumed run scores what an uninterrupted one would."""
    sampler = StepBatchSampler(len(val_set), min(batch_size, len(val_set)), seed)
    channels_last = next(model.parameters()).is_contiguous(memory_format=torch.channels_last)
    model.eval()
    total, n = 0.0, 0
    for k in range(batches):
        x = val_set.__getitems__(sampler.batch(k)).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = model(x, step)
        total += float(out["mse"].sum())
        n += x.shape[0]
    model.train()
    return total / max(n, 1)


def train(cfg: Config, data: str, out: str, progress: bool = True, stop_after: int | None = None) -> dict:
    """Train (or resume) a run; returns the last logged metrics. `stop_after` ends early (tests)."""
    cfg.validate()
    t_cfg, m_cfg = cfg.train, cfg.model
    rank, world, local = distributed_context()
    device = pick_device(t_cfg.device)
    lean_host_allocator(t_cfg.malloc_mmap_threshold_mib)  # before the first tensor (space/memory.py)
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", local)  # torchrun: one process per GPU by local rank
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cpu" and t_cfg.threads:
        torch.set_num_threads(t_cfg.threads)

    # An object-store run (s3://...) is trained in a local mirror and pushed at every checkpoint (space/runs.py).
    mirror = RunMirror(out, rank)
    run = mirror.pull(None if rank == 0 else ("checkpoints/last.pt",))
    ckpt_path = run / "checkpoints" / "last.pt"
    dataset = StoreDataset(data, "train", image_size=m_cfg.image_size)
    val_set = None
    if t_cfg.val_every and "val" in dataset.store.splits:
        val_set = StoreDataset(data, "val", image_size=m_cfg.image_size)

    torch.manual_seed(t_cfg.seed + rank)
    fmt = torch.channels_last if t_cfg.channels_last else torch.contiguous_format
    model = SPACE(m_cfg).to(device, memory_format=fmt)
    model.set_checkpoint_images(checkpoint_images(t_cfg.checkpoint_images, device))
    fg_params, bg_params = model.param_groups()
    opt_fg = torch.optim.RMSprop(fg_params, lr=t_cfg.fg_lr)
    opt_bg = torch.optim.Adam(bg_params, lr=t_cfg.bg_lr)

    start = 0
    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path, cfg, map_location=device)
        model.load_state_dict(state["model"])
        opt_fg.load_state_dict(state["opt_fg"])
        opt_bg.load_state_dict(state["opt_bg"])
        start = int(state["step"])
        torch.set_rng_state(state["rng"][rank % len(state["rng"])])
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
    is_main = rank == 0
    if is_main:
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    steps = t_cfg.steps
    if start >= steps:
        if is_main:
            print(f"{out}: already trained to step {start} of {steps}; nothing to do")
        return {"step": start}

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local] if device.type == "cuda" else None)

    sampler = StepBatchSampler(len(dataset), t_cfg.batch_size, t_cfg.seed, start, rank, world, steps)
    # A private generator: the DataLoader must not draw from the global RNG, or resume would diverge.
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=t_cfg.workers,
                                         collate_fn=collate_batch, generator=torch.Generator(),
                                         pin_memory=device.type == "cuda", persistent_workers=t_cfg.workers > 0)
    log = CsvLog(run / "metrics.csv", CSV_FIELDS, start) if is_main else None
    val_log = CsvLog(run / "val.csv", ("step", "wall_s", "val_mse"), start) if is_main else None
    tb = _tensorboard(run / "tb") if is_main else None
    amp = t_cfg.amp and device.type == "cuda"
    params = fg_params + bg_params

    def checkpoint(step: int) -> None:
        if not is_main:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "config": cfg.to_dict(),
            "model": model.state_dict(),
            "opt_fg": opt_fg.state_dict(),
            "opt_bg": opt_bg.state_dict(),
            "rng": [torch.get_rng_state()],
        }
        if device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(device)
        save_checkpoint(ckpt_path, state)
        if tb is not None:
            tb.flush()
        mirror.push()

    from tqdm import tqdm

    bar = tqdm(total=steps, initial=start, unit="step", disable=not (progress and is_main), dynamic_ncols=True)
    t0 = time.perf_counter()
    last = {}
    step = start
    model.train()
    for x in loader:
        x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
        # Appendix D.2: the background learning rate is set to zero from a chosen step (3D-Room).
        bg_lr = 0.0 if t_cfg.bg_lr_zero_step and step >= t_cfg.bg_lr_zero_step else t_cfg.bg_lr
        for g in opt_bg.param_groups:
            g["lr"] = bg_lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = net(x, step)
        terms = out["terms"]
        check_finite(terms, step)
        opt_fg.zero_grad(set_to_none=True)
        opt_bg.zero_grad(set_to_none=True)
        terms["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t_cfg.clip_norm)
        if not torch.isfinite(grad_norm):
            raise TrainingDiverged(f"step {step}: the gradient norm became {float(grad_norm)}; stopped, "
                                   "the last good checkpoint is kept")
        opt_fg.step()
        opt_bg.step()
        step += 1
        bar.update(1)

        if step % t_cfg.log_every == 0 or step == steps:
            logged = torch.stack([*(v.detach().float() for v in terms.values()), out["mse"].detach().mean()])
            if world > 1:  # every rank joins: the log shows the global batch's means, not rank 0's slice
                import torch.distributed as dist

                dist.all_reduce(logged)
                logged /= world
            logged = logged.tolist()
        if is_main and (step % t_cfg.log_every == 0 or step == steps):
            last = dict(zip(terms, logged[:-1]))
            last.update(step=step, wall_s=round(time.perf_counter() - t0, 3), mse=logged[-1],
                        grad_norm=float(grad_norm), fg_lr=t_cfg.fg_lr, bg_lr=bg_lr,
                        glimpses=out["fg"]["glimpses_decoded"])
            log.write(last)
            bar.set_postfix(loss=f"{last['loss']:.0f}", mse=f"{last['mse']:.4f}")
            if tb is not None:
                for k in (*TERMS, "mse", "grad_norm"):
                    tb.add_scalar(f"train/{k}", last[k], step)
        if is_main and val_set is not None and (step % t_cfg.val_every == 0 or step == steps):
            v = validation_mse(model, val_set, t_cfg.batch_size, t_cfg.val_batches, t_cfg.seed + 1, device, step)
            val_log.write({"step": step, "wall_s": round(time.perf_counter() - t0, 3), "val_mse": v})
            if tb is not None:
                tb.add_scalar("val/mse", v, step)
        if tb is not None and (step % t_cfg.image_every == 0 or step == steps):
            from .viz import decomposition_grid

            tb.add_image("decomposition", decomposition_grid(x, out, rows=4), step, dataformats="HWC")
        if step % t_cfg.checkpoint_every == 0 or step == steps:
            checkpoint(step)
        if step >= steps or (stop_after is not None and step >= stop_after):
            break
    bar.close()
    if tb is not None:
        tb.close()
        if is_main:
            mirror.push("tb")  # the events written since the last checkpoint
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return last

