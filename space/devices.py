"""Where training and scoring run: the device a setting names, GPUs shared among concurrent jobs, torchrun's
ranks, and activation checkpointing's default per device."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import ConfigError, check_device


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


def pick_device(cfg_device: str, key: str = "train.device") -> torch.device:
    check_device(cfg_device, key)
    if cfg_device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        # one process per GPU: under torchrun the local rank decides; a user's CUDA_VISIBLE_DEVICES too
        n = torch.cuda.device_count()
        if n > 1 and "LOCAL_RANK" not in os.environ and "CUDA_VISIBLE_DEVICES" not in os.environ:
            return torch.device("cuda", claim_free_gpu(n))
        return torch.device("cuda")
    if cfg_device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{key} is {cfg_device!r} but this machine has no CUDA device; use auto or cpu")
    if cfg_device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key} is 'mps' but this machine has no Apple GPU; use auto or cpu")
    return torch.device(cfg_device)


def checkpoint_images(setting: int, device: torch.device) -> int:
    """train.checkpoint_images with -1 resolved: 2 images a chunk on CPU, off on CUDA."""
    if setting >= 0:
        return setting
    return 0 if device.type == "cuda" else 2


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic natively (AVX512-BF16 or AMX), where oneDNN's bf16 convolutions
    beat float32; elsewhere they are emulated and slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def use_amp(setting: bool, device: torch.device) -> bool:
    """train.amp resolved for a device: bf16 autocast on CUDA and on the CPU (the networks in bf16, the
    latents, likelihood and KL terms in float32; space/model.py), off elsewhere. On a CPU without native
    bf16 it still runs, with a warning that it will be slower."""
    if not setting or device.type not in ("cuda", "cpu"):
        return False
    if device.type == "cpu" and not cpu_has_fast_bf16():
        print("warning: train.amp on a CPU without native bf16 (AVX512-BF16 or AMX): bf16 is emulated here "
              "and slower than float32; set train.amp=false")
    return True


def distributed_context():
    """(rank, world, local_rank) from torchrun's environment; (0, 1, 0) without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def start_device(device: torch.device, world: int, local: int, threads: int) -> torch.device:
    """Make `device` this process's: under torchrun join the process group (one process per GPU, by local
    rank); on the CPU use train.threads threads (0: torch's default). Returns the device to train on."""
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cpu" and threads:
        torch.set_num_threads(threads)
    return device
