"""Training: one loop, no framework. `python -m space train --help`.

A run directory holds everything about one run:

    config.json           the full configuration (model and train), as resolved
    run.json              the run's record: the store's identity and the configuration (space/rundir.py)
    checkpoints/last.pt   model, optimisers, step, every rank's RNG state, the record; written atomically
                          every N steps and at the end, never with NaN or infinite values
    metrics.csv           one row per logged step: the loss terms, MSE, learning rates (for `dvc plots`)
    val.csv               validation MSE against step and wall time (figure 5's convergence panel)
    tb/                   TensorBoard scalars and decomposition images

The directory may be an object-store URL (s3://bucket/runs/NAME): the run is then trained in a local mirror
and copied up at every checkpoint (space/runs.py). A run whose directory already has a checkpoint resumes
from it when it was trained on the same store with the same settings (space/rundir.py); otherwise it is
refused, or with --restart started afresh. One trainer at a time holds a run directory (`.lock`).
On CPU with a fixed seed a resumed run continues with the losses an uninterrupted run would have had:
the data order is a function of the step (space/data.py) and every rank's RNG state is in the checkpoint.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .checkpoints import (CHECKPOINT_FORMAT, RESUME_KEYS, TrainingDiverged, load_checkpoint, restore_rng,
                          save_checkpoint)
from .config import Config, ConfigError
from .data import StepBatchSampler, StoreDataset, collate_batch
from .devices import checkpoint_images, distributed_context, pick_device, start_device, use_amp
from .memory import set_host_allocator
from .model import SPACE
from .recompute import forward_backward_in_chunks
from .rundir import RECORD_FILE, CsvLog, RunError, last_logged, make_record, open_run, write_json
from .runs import RunMirror

VAL_THRESHOLD = 0.5  # z_pres probability of a detection in validation, as `space evaluate`'s default
TERMS = ("loss", "elbo", "log_lik", "kl_pres", "kl_where", "kl_depth", "kl_what", "kl_bg_mask", "kl_bg_comp",
         "boundary_loss")
CSV_FIELDS = ("step", "wall_s", *TERMS, "mse", "grad_norm", "fg_lr", "bg_lr", "glimpses")


# ---------------------------------------------------------------------------------------------- logging


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


class ParameterWatch:
    """Whether the parameters are still finite after an optimiser step.

    A step can overflow the weights while the loss it came from was finite (a learning rate far too
    large); the next forward pass would then fail somewhere deep in the model, and a checkpoint would keep
    the damage. Each step: one fused L2-norm reduction per parameter group (torch._foreach_norm; max-|w|
    norms measured 6x slower on CPU) and one host sync. Only when a norm is not finite are the tensors
    looked at one by one: a NaN or infinity is then named, while weights merely so large (above ~1e19)
    that the sum of their squares overflows are let through (the loss checks catch what follows)."""

    def __init__(self, model: torch.nn.Module, groups: dict):
        self.groups = groups  # {"foreground": (params, "train.fg_lr"), "background": (params, "train.bg_lr")}
        self.names = {id(p): n for n, p in model.named_parameters()}

    def check(self, step: int, terms: dict, lrs: dict) -> None:
        norms = torch.stack([torch.stack(torch._foreach_norm(ps)).sum() for ps, _ in self.groups.values()])
        if bool(torch.isfinite(norms).all()):
            return
        for group, (params, lr_key) in self.groups.items():
            bad = [self.names[id(p)] for p in params if not bool(torch.isfinite(p).all())]
            if not bad:
                continue
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            losses = ", ".join(f"{k} {float(v.detach()):.6g}" for k, v in terms.items())
            raise TrainingDiverged(
                f"step {step}: the {group} parameters became NaN or infinite in the optimiser step ({shown}); "
                f"loss terms at that step: {losses}; stopped without writing a checkpoint (the last good one "
                f"is kept). Lower {lr_key} (now {lrs[lr_key]:g}) and train again with --restart."
            )


def optimiser_step(opt: torch.optim.Optimizer, step: int, group: str, lr_key: str, lr: float) -> None:
    """opt.step(), with a learning rate too large for float32 (the optimisers' step size, e.g. Adam's
    lr / (1 - beta1), must fit) named as divergence rather than torch's bare overflow RuntimeError."""
    try:
        opt.step()
    except RuntimeError as e:
        if "without overflow" not in str(e):
            raise
        raise TrainingDiverged(
            f"step {step}: the {group} optimiser's step overflowed float32 with {lr_key} {lr:g} ({e}); "
            f"stopped without writing a checkpoint (the last good one is kept). Lower {lr_key} (float32 "
            "holds at most 3.4e38; useful rates are far below 1) and train again with --restart."
        ) from None


def optimisers(model: SPACE, t_cfg) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """Appendix D.2: RMSProp for the foreground's parameters, Adam for the background's."""
    fg_params, bg_params = model.param_groups()
    return torch.optim.RMSprop(fg_params, lr=t_cfg.fg_lr), torch.optim.Adam(bg_params, lr=t_cfg.bg_lr)


def learning_rates(t_cfg, step: int) -> tuple[float, float]:
    """The foreground's and the background's learning rates at a step (counted from 0): fg_lr after its
    linear warmup (train.fg_lr_warmup), bg_lr until train.bg_lr_zero_step, both times train.lr_decay."""
    decay = t_cfg.lr_decay.at(step)
    fg_lr = t_cfg.fg_lr * min(1.0, (step + 1) / t_cfg.fg_lr_warmup) if t_cfg.fg_lr_warmup else t_cfg.fg_lr
    bg_lr = 0.0 if t_cfg.bg_lr_zero_step and step >= t_cfg.bg_lr_zero_step else t_cfg.bg_lr
    return fg_lr * decay, bg_lr * decay


def train_step(net, x, step: int, opt_fg, opt_bg, t_cfg, amp: bool = False):
    """One training step on the batch x (B, 3, N, N): forward (bf16 autocast with `amp`) and backward, the
    loss checked finite, gradients clipped to train.clip_norm, both optimisers stepped, the background's
    learning rate 0 from train.bg_lr_zero_step (appendix D.2, 3D-Room), the foreground's warmed up over
    train.fg_lr_warmup. Training and every benchmark time this function. Returns the model's output, the
    gradient norm and the background learning rate used."""
    fg_lr, bg_lr = learning_rates(t_cfg, step)
    for opt, lr in ((opt_fg, fg_lr), (opt_bg, bg_lr)):
        for g in opt.param_groups:
            g["lr"] = lr
    opt_fg.zero_grad(set_to_none=True)
    opt_bg.zero_grad(set_to_none=True)
    # A plain model whose foreground runs in chunks goes backward chunk by chunk (space/recompute.py), which
    # computes the chunks' activations once instead of twice; DDP and torch.compile wrappers take the whole
    # loss at once.
    chunks = net.fg.checkpoint_images if isinstance(net, SPACE) and torch.is_grad_enabled() else 0
    chunked = 0 < chunks < x.shape[0]
    autocast = lambda: torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp)  # noqa: E731
    try:
        if chunked:
            out = forward_backward_in_chunks(net, x, step, chunks, autocast)
        else:
            with autocast():
                out = net(x, step)
    except ValueError as e:
        # Finite but huge weights can still overflow inside the model, and a NaN then fails an integer
        # conversion (the compositing window's size): that is divergence too.
        if "NaN" not in str(e):
            raise
        raise TrainingDiverged(f"step {step}: the forward pass met a NaN ({e}); stopped without writing a "
                               "checkpoint (the last good one is kept). Lower the learning rates.") from None
    terms = out["terms"]
    check_finite(terms, step)
    if not chunked:
        terms["loss"].backward()
    params = [p for opt in (opt_fg, opt_bg) for group in opt.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, t_cfg.clip_norm)
    if not torch.isfinite(grad_norm):
        raise TrainingDiverged(f"step {step}: the gradient norm became {float(grad_norm)}; stopped, "
                               "the last good checkpoint is kept")
    optimiser_step(opt_fg, step, "foreground", "train.fg_lr", fg_lr)
    optimiser_step(opt_bg, step, "background", "train.bg_lr", bg_lr)
    return out, grad_norm, bg_lr


VAL_FIELDS = ("step", "wall_s", "val_mse", "val_ap50", "val_count_error", "val_bg_share", "val_fg_share")


@torch.no_grad()
def validate(model, val_set: StoreDataset, batch_size: int, batches: int, seed: int, device, step: int,
             chunk: int = 0) -> dict:
    """Reconstruction MSE, COCO AP at IoU 0.5 and the object-count error (table 1) on the same `batches`
    fixed validation batches every time, so the curve compares across steps and a resumed run scores what
    an uninterrupted one would. The best checkpoint is chosen by this AP, as the paper's code did.

    `chunk` images go through the model at a time (0: a whole batch): in eval mode every image is computed
    alone, so the scores are the same, and the peak memory stays near the training step's chunks'."""
    from .metrics import detect
    from .metrics import coco_ap, count_scores

    sampler = StepBatchSampler(len(val_set), min(batch_size, len(val_set)), seed)
    batches = min(batches, sampler.per_epoch)  # a split smaller than the batches asked is scored once over
    channels_last = next(model.parameters()).is_contiguous(memory_format=torch.channels_last)
    model.eval()
    total, n, gt_boxes, dets, bg_share, fg_share = 0.0, 0, [], [], 0.0, 0.0
    pieces = [sampler.batch(k) for k in range(batches)]
    if chunk:
        pieces = [idx[i : i + chunk] for idx in pieces for i in range(0, len(idx), chunk)]
    for idx in pieces:
        x = val_set.__getitems__(idx).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = model(x, step)
        total += float(out["mse"].sum())
        # The background component holding most of each frame (its share of the pixels' mixing weight),
        # and the foreground's share: the statistics `background_split` reads.
        bg_share += float(out["pi"].mean((2, 3, 4)).max(1).values.sum())
        fg_share += float(out["fg"]["alpha"].mean((1, 2, 3)).sum())
        n += x.shape[0]
        dets += detect(out, val_set.image_size, VAL_THRESHOLD)
        boxes = val_set.store.read(val_set.split, "boxes", idx)  # (b, K, 4) NaN-padded
        gt_boxes += [g[~np.isnan(g[:, 0])].astype(np.float64) for g in boxes]
    model.train()
    counts = count_scores([len(g) for g in gt_boxes], [len(d[0]) for d in dets])
    ap50 = coco_ap(gt_boxes, [d[0] for d in dets], [d[1] for d in dets], 0.5)
    return {"val_mse": total / max(n, 1), "val_ap50": ap50, "val_count_error": counts["count_error"],
            "val_bg_share": bg_share / max(n, 1), "val_fg_share": fg_share / max(n, 1)}


def background_split(v: dict, step: int, cfg: Config) -> dict | None:
    """Whether the background has split into components, read from a validation's statistics.

    The code behind the paper's numbers warns that on 3D-Room Large the background sometimes fails to split
    by 10-15k steps and the run needs another seed. Such a run keeps one component over (nearly) the whole
    frame: from train.bg_split_step on, a largest component holding train.bg_split_share of the pixels or
    more is reported as that failure. None before that step, or with one component (nothing to split)."""
    t_cfg = cfg.train
    if (cfg.model.n_components < 2 or not t_cfg.bg_split_step or step < t_cfg.bg_split_step
            or v.get("val_bg_share") is None):
        return None
    failed = v["val_bg_share"] >= t_cfg.bg_split_share
    return {"step": step, "largest_share": round(v["val_bg_share"], 4), "split": not failed,
            **({"advice": "one background component holds the whole frame; train again with another "
                          "train.seed (the paper's code gives the same advice)"} if failed else {})}


def open_data(cfg: Config, data: str, world: int):
    """The train split (and val, when validating), refused now when it cannot fill one global batch."""
    t_cfg = cfg.train
    dataset = StoreDataset(data, "train", image_size=cfg.model.image_size)
    need = t_cfg.batch_size * world
    if len(dataset) < need:
        per = f"train.batch_size {t_cfg.batch_size}" + (f" x {world} ranks" if world > 1 else "")
        raise ConfigError(f"the train split of {data} has {len(dataset)} frames, fewer than one batch of {need} "
                          f"({per}); lower train.batch_size to at most {len(dataset) // world} or use a store "
                          "with more training frames")
    val_set = None
    if t_cfg.val_every and "val" in dataset.store.splits:
        val_set = StoreDataset(data, "val", image_size=cfg.model.image_size)
    return dataset, val_set


def train(cfg: Config, data: str, out: str, progress: bool = True, stop_after: int | None = None,
          restart: bool = False, live: str | None = None) -> dict:
    """Train (or resume) a run; returns the last logged metrics. `stop_after` ends early (tests).

    `restart`: if the run directory was trained on another store or with other settings, start afresh in
    it (otherwise that is refused); a run with the same record still resumes. `live`: a JSON file rewritten
    at every log step and validation with the step and the latest scores, for `dvc exp show` while the run
    goes (the pipeline keeps it outside the run directory, which DVC tracks as a whole)."""
    cfg.validate()
    t_cfg = cfg.train
    rank, world, local = distributed_context()
    device = pick_device(t_cfg.device)
    set_host_allocator(t_cfg.host_allocator, t_cfg.malloc_mmap_threshold_mib)  # before the first tensor
    # The data before the run directory: a store that does not fit is refused with nothing written.
    dataset, val_set = open_data(cfg, data, world)
    record = make_record(cfg, dataset.store, data)
    device = start_device(device, world, local, t_cfg.threads)
    if world > 1:
        import torch.distributed as dist

    # An object-store run (s3://...) is trained in a local mirror and pushed at every checkpoint (space/runs.py).
    mirror = RunMirror(out, rank)
    is_main = rank == 0
    lock, run, state, problem = None, None, None, None
    if is_main:
        try:
            lock, run, state = open_run(mirror, out, record, cfg, restart)
        except Exception as e:  # noqa: BLE001 - shared with the other ranks below, then raised
            problem = e
    if world > 1:  # the other ranks wait for rank 0's decision, and stop with it rather than wait forever
        box = [None if problem is None else str(problem)]
        dist.broadcast_object_list(box)
        if not is_main:
            if box[0] is not None:
                raise RunError(f"rank 0 stopped: {box[0]}")
            run = mirror.pull(("checkpoints/last.pt",))
            if (run / "checkpoints" / "last.pt").exists():
                state = load_checkpoint(run / "checkpoints" / "last.pt", need=RESUME_KEYS, finite=False)
    if problem is not None:
        raise problem
    try:
        return _train(cfg, record, state, dataset, val_set, mirror, run, device, rank=rank, world=world, local=local,
                      progress=progress, stop_after=stop_after, live=Path(live) if live else None)
    finally:
        if lock is not None:
            lock.close()


def _train(cfg: Config, record: dict, state: dict | None, dataset, val_set, mirror: RunMirror, run: Path,
           device: torch.device, *, rank: int, world: int, local: int, progress: bool, stop_after: int | None,
           live: Path | None = None) -> dict:
    """The training loop of `train`, in a run directory that `open_run` found to be this run's (or empty),
    from the checkpoint `state` when there is one."""
    t_cfg, m_cfg = cfg.train, cfg.model
    is_main = rank == 0
    name = str(mirror)  # the run, as messages name it
    ckpt_path = run / "checkpoints" / "last.pt"
    if world > 1:
        import torch.distributed as dist

    torch.manual_seed(t_cfg.seed + rank)
    fmt = torch.channels_last if t_cfg.channels_last else torch.contiguous_format
    model = SPACE(m_cfg).to(device, memory_format=fmt)
    model.set_checkpoint_images(checkpoint_images(t_cfg.checkpoint_images, device))
    fg_params, bg_params = model.param_groups()
    opt_fg, opt_bg = optimisers(model, t_cfg)
    watch = ParameterWatch(model, {"foreground": (fg_params, "train.fg_lr"), "background": (bg_params, "train.bg_lr")})

    start = 0
    best = {"val_ap50": -1.0, "step": None}  # the best validation AP so far, and its step (checkpoints/best.pt)
    # and the lowest validation count error (checkpoints/best_count.pt: the paper's code kept one too)
    best_count = {"val_count_error": float("inf"), "step": None}
    bg_check = None  # the last verdict of background_split
    if state is not None:
        model.load_state_dict(state["model"])
        opt_fg.load_state_dict(state["opt_fg"])
        opt_bg.load_state_dict(state["opt_bg"])
        start = int(state["step"])
        restore_rng(state, rank, device)
        best = dict(state.get("best") or best)
        best_count = dict(state.get("best_count") or best_count)
        bg_check = state.get("background_split")
    if is_main:  # only now, the run directory being this run's: it describes what it holds
        write_json(run / RECORD_FILE, record)
        (run / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    steps = t_cfg.steps
    if start >= steps:
        if not is_main:
            return {"step": start}
        print(f"{name}: already trained to step {start} of {steps}; nothing to do")
        done = {**last_logged(run / "metrics.csv", start), "step": start}  # what the run ended with
        if bg_check is not None:
            done["background_split"] = bg_check
        return done

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local] if device.type == "cuda" else None)

    sampler = StepBatchSampler(len(dataset), t_cfg.batch_size, t_cfg.seed, start, rank, world, steps)
    # A private generator: the DataLoader must not draw from the global RNG, or resume would diverge.
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=t_cfg.workers,
                                         collate_fn=collate_batch, generator=torch.Generator(),
                                         pin_memory=device.type == "cuda", persistent_workers=t_cfg.workers > 0)
    log = CsvLog(run / "metrics.csv", CSV_FIELDS, start) if is_main else None
    val_log = CsvLog(run / "val.csv", VAL_FIELDS, start) if is_main else None
    tb = _tensorboard(run / "tb") if is_main else None
    amp = use_amp(t_cfg.amp, device)
    latest = {"steps": steps}  # the step and scores `live` holds, updated as the run goes
    if live is not None and is_main:
        live.parent.mkdir(parents=True, exist_ok=True)

    def write_live(**now) -> None:
        latest.update(now)
        write_json(live, {**latest, "best_val_ap50": best["val_ap50"] if best["step"] is not None else None,
                          "best_step": best["step"]})

    def training_state(step: int, rng: list) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "config": cfg.to_dict(),
            "record": record,
            "model": model.state_dict(),
            "opt_fg": opt_fg.state_dict(),
            "opt_bg": opt_bg.state_dict(),
            "rng": rng,
            "best": dict(best),
            "best_count": dict(best_count),
            "background_split": bg_check,
        }

    def checkpoint(step: int) -> None:
        # Every rank's RNG state: each restores its own on resume, so the ranks keep drawing different noise.
        rng = [torch.get_rng_state()]
        cuda_rng = [torch.cuda.get_rng_state(device)] if device.type == "cuda" else None
        if world > 1:
            every = [None] * world
            dist.all_gather_object(every, (rng[0], cuda_rng))
            rng = [r for r, _ in every]
            cuda_rng = [c[0] for _, c in every] if cuda_rng is not None else None
        if not is_main:
            return
        state = training_state(step, rng)
        if cuda_rng is not None:
            state["cuda_rng"] = cuda_rng
        save_checkpoint(ckpt_path, state)
        if tb is not None:
            tb.flush()
        mirror.push()

    from tqdm import tqdm

    bar = tqdm(total=steps, initial=start, unit="step", disable=not (progress and is_main), dynamic_ncols=True)
    # wall_s counts on from where the logs of a resumed run left off, so curves against time run forwards.
    t0 = time.perf_counter() - (max(log.wall_s, val_log.wall_s) if is_main else 0.0)
    last = {}
    step = start
    wall_start = time.perf_counter() - t0  # this session's start on the run's clock, for the time to go
    model.train()
    for x in loader:
        x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
        out, grad_norm, bg_lr = train_step(net, x, step, opt_fg, opt_bg, t_cfg, amp)
        terms = out["terms"]
        watch.check(step, terms, {"train.fg_lr": t_cfg.fg_lr, "train.bg_lr": bg_lr})
        step += 1
        bar.update(1)

        if step % t_cfg.log_every == 0 or step == steps:
            logged = torch.stack([*(v.detach().float() for v in terms.values()), out["mse"].detach().mean()])
            if world > 1:  # every rank joins: the log shows the global batch's means, not rank 0's slice
                dist.all_reduce(logged)
                logged /= world
            logged = logged.tolist()
        if is_main and (step % t_cfg.log_every == 0 or step == steps):
            last = dict(zip(terms, logged[:-1]))
            last.update(step=step, wall_s=round(time.perf_counter() - t0, 3), mse=logged[-1],
                        grad_norm=float(grad_norm), fg_lr=learning_rates(t_cfg, step - 1)[0], bg_lr=bg_lr,
                        glimpses=out["fg"]["glimpses_decoded"])
            log.write(last)
            if live is not None:
                write_live(step=step, loss=last["loss"], mse=last["mse"])
            bar.set_postfix(loss=f"{last['loss']:.0f}", mse=f"{last['mse']:.4f}")
            if not progress:  # no bar (--quiet, as the pipeline runs it): a line a log step, so logs show progress
                done = step - start
                eta = (steps - step) * (last["wall_s"] - wall_start) / max(done, 1)
                print(f"{name}: step {step}/{steps} loss {last['loss']:.1f} mse {last['mse']:.5f} "
                      f"({eta / 60:.1f} min to go)", file=sys.stderr, flush=True)
            if tb is not None:
                for k in (*TERMS, "mse", "grad_norm"):
                    tb.add_scalar(f"train/{k}", last[k], step)
        if is_main and val_set is not None and (step % t_cfg.val_every == 0 or step == steps):
            v = validate(model, val_set, t_cfg.batch_size, t_cfg.val_batches, t_cfg.seed + 1, device, step,
                         model.fg.checkpoint_images)
            val_log.write({"step": step, "wall_s": round(time.perf_counter() - t0, 3), **v})
            if not progress:
                print(f"{name}: step {step}: validation AP50 {v['val_ap50']:.3f}, count error "
                      f"{v['val_count_error']:.2f}, MSE {v['val_mse']:.5f}", file=sys.stderr, flush=True)
            if tb is not None:
                for k, value in v.items():
                    tb.add_scalar(f"val/{k[4:]}", value, step)
            check = background_split(v, step, cfg)
            if check is not None:
                if not check["split"] and (bg_check is None or bg_check["split"]):
                    tqdm.write(f"{name}: step {step}: the background has not split: one component holds "
                               f"{check['largest_share']:.0%} of the frame. {check['advice']}.", file=sys.stderr)
                bg_check = check
            if v["val_ap50"] == v["val_ap50"] and v["val_ap50"] > best["val_ap50"]:  # NaN: no objects to find
                best = {"val_ap50": v["val_ap50"], "step": step}
                # The paper's test scores are of the checkpoint with the best validation AP (its code kept it).
                save_checkpoint(run / "checkpoints" / "best.pt", training_state(step, [torch.get_rng_state()]))
            if v["val_count_error"] < best_count["val_count_error"]:
                best_count = {"val_count_error": v["val_count_error"], "step": step}
                save_checkpoint(run / "checkpoints" / "best_count.pt", training_state(step, [torch.get_rng_state()]))
            if live is not None:  # JSON has no NaN (a validation with no objects to find)
                write_live(step=step, **{k: v[k] if v[k] == v[k] else None for k in ("val_ap50", "val_count_error")})
        if tb is not None and (step % t_cfg.image_every == 0 or step == steps):
            from .viz import decomposition_grid

            tb.add_image("decomposition", decomposition_grid(x, out, rows=4), step, dataformats="HWC")
        if step % t_cfg.checkpoint_every == 0 or step == steps:
            checkpoint(step)
        if step >= steps or (stop_after is not None and step >= stop_after):
            break
    bar.close()
    if is_main and bg_check is not None:
        last["background_split"] = bg_check  # in train.json
    if tb is not None:
        tb.close()
        if is_main:
            mirror.push("tb")  # the events written since the last checkpoint
    if world > 1:
        dist.destroy_process_group()
    return last
