"""SPACE's configuration: one dataclass for the model, one for training, the paper's values as defaults.

Appendix D.2's table for 3D-Room Large gives the defaults; `PRESETS` holds the paper's other settings
(3D-Room Small with an 8x8 grid, joint Atari) and the CPU demo. Values the paper does not give are
marked "not in the paper" where they are defined.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

import yaml


# train.host_allocator's choices (space/memory.py sets them)
HOST_ALLOCATORS = ("auto", "tcmalloc", "heap", "lean", "glibc")


class ConfigError(ValueError):
    """A setting is invalid; the message names it and says how to fix it."""


def merge(base: dict, over: dict) -> dict:
    """`over` merged into `base`: nested mappings key by key, anything else replaced. Presets, --config files
    and --set overrides merge as Snakemake merges a --configfile over params.yaml."""
    return {**base, **{k: merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                       for k, v in over.items()}}


@dataclass
class Anneal:
    """A value annealed linearly from `start` to `end` between global steps `start_step` and `end_step`.

    Appendix D.2 writes this (m -> n) : (p -> q).
    """

    start: float
    end: float
    start_step: int = 0
    end_step: int = 0

    def at(self, step: int) -> float:
        if step <= self.start_step or self.end_step <= self.start_step:
            return self.start if step <= self.start_step else self.end
        if step >= self.end_step:
            return self.end
        t = (step - self.start_step) / (self.end_step - self.start_step)
        return self.start + t * (self.end - self.start)


@dataclass
class ModelConfig:
    image_size: int = 128
    grid_size: int = 16  # H = W cells of the foreground (16x16 for 3D-Room Large, 8x8 for Small)
    # The glimpse side in pixels: 32, the paper's for 128x128 frames. Not in the paper: 16, the same share of
    # a 64x64 frame's objects, at about a third of the glimpse networks' cost (its boundary band: set
    # boundary_width to 3, the paper's 6 halved).
    glimpse_size: int = 32
    z_what_dim: int = 32
    z_depth_dim: int = 1
    z_mask_dim: int = 32  # background z^m
    z_comp_dim: int = 32  # background z^c
    n_components: int = 5  # K
    lstm_hidden: int = 64
    comp_prior_hidden: int = 64  # the MLP of p(z^c | z^m): two hidden layers of this size
    fg_sigma: float = 0.15
    bg_sigma: float = 0.15
    # Gumbel-softmax (relaxed Bernoulli) temperature of z^pres: the paper's table says 2.0; the code behind
    # its 3D-Room numbers anneals 2.5 -> 0.5 over steps 0 -> 20,000. A number is a constant.
    tau: Anneal = field(default_factory=lambda: Anneal(2.0, 2.0))
    z_pres_prior: Anneal = field(default_factory=lambda: Anneal(0.1, 0.01, 4000, 10000))
    z_scale_prior_mean: Anneal = field(default_factory=lambda: Anneal(-1.0, -2.0, 10000, 20000))
    # The prior's spread: 0.1 in the paper and its code, a constant; a schedule here lets it start wide.
    z_scale_prior_std: Anneal = field(default_factory=lambda: Anneal(0.1, 0.1))
    # Added to the prior's mean for the glimpse's height (z_scale's y), so that the prior box is taller
    # than wide where the objects are (`python -m datagen inspect` gives the boxes' logits); 0: square, as
    # in the paper.
    z_scale_prior_aspect: float = 0.0
    z_shift_prior_mean: float = 0.0
    z_shift_prior_std: float = 1.0
    z_depth_prior_mean: float = 0.0
    z_depth_prior_std: float = 1.0
    # How far (in cells) a glimpse centre may move from its cell's centre: rescale(tanh(z_shift)).
    # Not in the paper's tables; one cell lets an object on a cell border be caught by either cell.
    shift_range: float = 1.0
    # Depth weights w = softmax over glimpses of -depth_sharpness * sigmoid(z_depth), restricted to the
    # glimpses covering a pixel (algorithm 1). The constant c is not in the paper.
    depth_sharpness: float = 10.0
    boundary_width: int = 6  # b of appendix C, in glimpse pixels
    boundary_loss_weight: float = 1.0
    # Appendix C's boundary loss on the overlap map (each present glimpse's border band times the foreground
    # mask alpha, summed over glimpses). "linear": the map summed over the canvas (the paper's text).
    # "gaussian": minus the log density of N(0, boundary_sigma) at the overlap, summed (the code behind the
    # paper's numbers): quadratic, so far weaker at the small early values.
    boundary_loss: str = "linear"
    boundary_sigma: float = 0.7  # "gaussian" only; the paper's code used 0.7
    boundary_off_step: int = 0  # the boundary loss is off from this step (0 = never; the paper's code: 100,000)
    # Which cells pay the KL of z_where, z_depth and z_what. "z_pres": weighted by the cell's z_pres sample
    # (the paper's appendix B). "every_cell": every cell, whatever its z_pres (the code behind its numbers).
    kl_weighting: str = "z_pres"
    # Equation 1's mixture of foreground and background. "pixel": one Gaussian over RGB per component, mixed
    # per pixel. "channel": mixed per colour channel (the code behind the paper's numbers).
    mixture: str = "pixel"
    # z_pres logits bounded to bound * tanh(logit) (0: unbounded, the paper's text; the paper's code: 8.8, so
    # its cells start decided rather than at probability 0.5 wherever the logit is large).
    z_pres_logit_bound: float = 0.0
    # Two training schedules not in the paper, against the foreground's colour lock (BENCHMARKS.md,
    # "Learning"): z_what's KL collapses within the first 50 steps, so every glimpse decodes one colour, and
    # the exact mixture gradient then trains the glimpse decoder only where the foreground already explains
    # pixels better than the background, so it never learns another.
    # kl_what_weight: a weight on z_what's KL in the loss, e.g. {start: 0, end: 1, start_step: 0,
    # end_step: 600} to warm it up. 1 (constant) is the paper's objective.
    kl_what_weight: Anneal = field(default_factory=lambda: Anneal(1.0, 1.0))
    # mixture_temperature: deterministic annealing of equation 1. Above 1, each pixel's gradient is shared
    # among the foreground and the background components by responsibilities tempered by it (a softmax of
    # their log-densities / T) rather than the exact posterior, so a component that explains a pixel worse
    # still learns from it. 1 (constant) is the exact gradient. The reported ELBO is the exact one either way.
    mixture_temperature: Anneal = field(default_factory=lambda: Anneal(1.0, 1.0))
    # Architecture details where appendix D.3 and the code behind the paper's numbers differ; each "paper"
    # (the text) or "code". The foreground image encoder: the table's layers (conv, GroupNorm, CELU), or the
    # code's order (conv, CELU, GroupNorm) and its lateral branch over the cell features.
    fg_encoder: str = "paper"
    # The glimpse encoder's feature maps: 32-16-16-13-6-3 (the table) or 32-16-8-4-1.
    glimpse_encoder: str = "paper"
    # The component decoder: three 3x3 BN/ELU layers and a 3x3 output (the table) or four and a 1x1 output.
    comp_decoder: str = "paper"
    # Not in the paper or its code: how the glimpse decoder reaches a colour. "paper": through its GroupNorm
    # stack alone, where each group's mean is normalised away, so at initialisation every z_what paints the
    # same colour and the decoder learns only the few colours it first explains (BENCHMARKS.md, "Learning").
    # "linear": the same decoder plus a linear map from z_what to o_att's logits, one shift per glimpse and
    # channel, zero at initialisation, so any colour lies along a direction of z_what.
    glimpse_colour: str = "paper"
    # The background LSTMs' h_0, c_0 and the dummy z^m_0 of algorithms 2 and 3: "zeros" (the paper gives no
    # values) or "learned" (the code).
    bg_initial_state: str = "zeros"
    # The component encoder's mask input: "pi" (algorithm 2: [pi_k, x]) or "log_pi" (log(pi_k + 1e-5), the code).
    comp_encoder_input: str = "pi"
    fix_alpha_steps: int = 0  # N/A for 3D-Room; Atari: 2000
    fix_alpha_value: float = 0.1
    # The foreground mean of equation 1. "premultiplied": algorithm 1's mu_fg = sum(w * alpha_hat * o_att),
    # the paper's. "normalised": sum(w * o_att), the glimpses' colour not darkened by alpha_hat, so the
    # foreground component can explain an object's colour before its mask and z_pres have grown; the demo
    # uses it (with "premultiplied" its foreground stays off over a short run, BENCHMARKS.md).
    fg_mean: str = "premultiplied"
    # Cells whose z^pres probability is below this skip their glimpse (sparse mode); 0 = exact model.
    sparse_threshold: float = 0.0

    def __post_init__(self):
        # A number where a schedule goes is a constant schedule (ModelConfig(tau=2.5), as from YAML).
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type == "Anneal" and isinstance(v, (int, float)) and not isinstance(v, bool):
                setattr(self, f.name, Anneal(float(v), float(v)))

    def validate(self) -> "ModelConfig":
        n = self.image_size
        if n < 16 or n > 128 or n & (n - 1):
            raise ConfigError(f"model.image_size: must be 16, 32, 64 or 128 (the paper: 128), got {n}")
        g = self.grid_size
        if g < 1 or g & (g - 1) or g > n // 4:
            raise ConfigError(f"model.grid_size: must be a power of two at most image_size/4, got {g}")
        if self.glimpse_size not in (16, 32):
            raise ConfigError(f"model.glimpse_size: 32 (the paper's) or 16 (for small frames), got {self.glimpse_size}")
        for name in ("fg_sigma", "bg_sigma", "z_shift_prior_std",
                     "z_depth_prior_std", "shift_range", "depth_sharpness", "boundary_sigma"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"model.{name}: must be above 0, got {getattr(self, name)}")
        for name in ("z_shift_prior_mean", "z_depth_prior_mean", "z_scale_prior_aspect"):  # any finite number
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"model.{name}: must be a finite number, got {getattr(self, name)}")
        a = self.z_scale_prior_mean
        if not (math.isfinite(a.start) and math.isfinite(a.end)):
            raise ConfigError(f"model.z_scale_prior_mean: must be finite (start and end), got {a.start} -> {a.end}")
        for name in ("tau", "z_scale_prior_std"):  # schedules that must stay positive
            a = getattr(self, name)
            if not (a.start > 0 and a.end > 0):
                raise ConfigError(f"model.{name}: must be above 0 (start and end), got {a.start} -> {a.end}")
        if not (self.mixture_temperature.start >= 1 and self.mixture_temperature.end >= 1):
            raise ConfigError(f"model.mixture_temperature: 1 (the exact gradient) or more, got "
                              f"{self.mixture_temperature.start} -> {self.mixture_temperature.end}")
        if not (self.kl_what_weight.start >= 0 and self.kl_what_weight.end >= 0):
            raise ConfigError(f"model.kl_what_weight: 0 or more (1: the paper's), got "
                              f"{self.kl_what_weight.start} -> {self.kl_what_weight.end}")
        for name, choices in (("boundary_loss", ("linear", "gaussian")), ("kl_weighting", ("z_pres", "every_cell")),
                              ("mixture", ("pixel", "channel")), ("fg_encoder", ("paper", "code")),
                              ("glimpse_encoder", ("paper", "code")), ("glimpse_colour", ("paper", "linear")),
                              ("comp_decoder", ("paper", "code")), ("bg_initial_state", ("zeros", "learned")),
                              ("comp_encoder_input", ("pi", "log_pi"))):
            if getattr(self, name) not in choices:
                raise ConfigError(f"model.{name}: {' or '.join(choices)} (the first is the paper's text), "
                                  f"got {getattr(self, name)!r}")
        if self.z_pres_logit_bound < 0 or self.boundary_off_step < 0:
            raise ConfigError("model.z_pres_logit_bound and model.boundary_off_step: 0 (off) or more")
        if self.n_components < 1:
            raise ConfigError(f"model.n_components: must be at least 1, got {self.n_components}")
        if not 0 <= self.boundary_width < self.glimpse_size // 2:
            raise ConfigError(f"model.boundary_width: must be in [0, {self.glimpse_size // 2}), got {self.boundary_width}")
        for v in (self.z_pres_prior.start, self.z_pres_prior.end, self.fix_alpha_value):
            if not 0 < v < 1:
                raise ConfigError(f"model: z_pres_prior and fix_alpha_value must lie in (0, 1), got {v}")
        if self.fg_mean not in ("premultiplied", "normalised"):
            raise ConfigError(f"model.fg_mean: premultiplied (the paper's) or normalised, got {self.fg_mean!r}")
        if not 0 <= self.sparse_threshold < 1:
            raise ConfigError(f"model.sparse_threshold: must lie in [0, 1), got {self.sparse_threshold}")
        return self


@dataclass
class TrainConfig:
    batch_size: int = 16  # paper: 12 to 16
    steps: int = 160_000  # not in the paper
    fg_lr: float = 1e-5  # RMSProp
    # Not in the paper: the foreground learning rate rises linearly from fg_lr / fg_lr_warmup to fg_lr over
    # this many first steps (0: none, the paper's). RMSProp has no bias correction, so its first steps move
    # every weight by up to 10 x fg_lr; at the demo's fast rate z_where's KL jumps 14-fold after the first
    # step, one of the pulls that switch the foreground off early (bench/z_pres_forces.py, BENCHMARKS.md).
    fg_lr_warmup: int = 0
    bg_lr: float = 1e-3  # Adam
    clip_norm: float = 1.0
    bg_lr_zero_step: int = 0  # 3D-Room: the background learning rate is set to 0 from this step (0 = never)
    # Not in the paper (its code keeps both rates constant): both learning rates multiplied by this factor,
    # e.g. {start: 1, end: 0.1, start_step: 2000, end_step: 3000} to settle a fast-trained run at its end.
    lr_decay: Anneal = field(default_factory=lambda: Anneal(1.0, 1.0))
    checkpoint_every: int = 1000
    log_every: int = 50  # CSV and TensorBoard scalars
    image_every: int = 1000  # TensorBoard images
    val_every: int = 2000  # validation scores and best.pt every this many steps (0 = never)
    # Fixed validation batches scored every val_every steps (MSE, AP50, count error; best.pt is chosen by
    # the AP): 32 batches of 16 are 512 frames, about the 500 the code behind the paper's numbers used; the
    # demo's 32 batches of 8 are its whole validation split. A smaller split is scored once over.
    val_batches: int = 32
    # The background-split check (train.background_split): from this step on (0 = never), a validation whose
    # largest background component holds bg_split_share of the frame or more is reported in the log and
    # train.json as a background that failed to split. 15,000: the paper's code saw the failure by 10-15k.
    bg_split_step: int = 15_000
    bg_split_share: float = 0.9
    seed: int = 0
    workers: int = 0  # DataLoader processes
    device: str = "auto"  # auto: CUDA when present, else CPU
    # bf16 autocast (the networks in bf16, latents, likelihood and KLs in float32), on GPU and CPU. Off: on a
    # CPU it pays only with native bf16 (AMX, AVX512-BF16), and it learns other weights than float32.
    amp: bool = False
    threads: int = 0  # CPU threads for torch (0: all cores)
    channels_last: bool = True  # NHWC convolutions: measured 1.1-1.4x faster on this CPU (bench/step_latency.py)
    # Activation checkpointing: the foreground runs in chunks of this many images, each going backward right
    # after its forward pass (training's step) so that one chunk's activations are held at a time, and the
    # background keeps only its convolutions' outputs (exact either way; 0 = off). -1: 2 on CPU, where it
    # keeps the paper presets' peaks under a fifth of the public port's with the allocator below
    # (BENCHMARKS.md), off on CUDA, where memory is rarely the limit.
    checkpoint_images: int = -1
    # Who serves the step's large activations on Linux (space/memory.py; BENCHMARKS.md, "Host memory"):
    # "tcmalloc" keeps freed blocks for reuse without glibc's heap fragmentation (the fastest and leanest
    # measured on the paper presets; preloaded at start-up), "heap" reuses freed blocks from glibc's heap,
    # so no step pays the kernel for fresh pages, "lean" hands every block of malloc_mmap_threshold_mib or
    # more back to the system when freed, with huge pages, "glibc" leaves the C library's own choice;
    # "auto": tcmalloc where it is installed, else heap.
    host_allocator: str = "auto"
    malloc_mmap_threshold_mib: int = 1  # "lean" only (0: the C library's own threshold)

    def validate(self) -> "TrainConfig":
        for name in ("batch_size", "steps", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be at least 1, got {getattr(self, name)}")
        if self.checkpoint_images < -1:
            raise ConfigError(f"train.checkpoint_images: must be -1 (auto), 0 (off) or more, got {self.checkpoint_images}")
        if self.bg_split_step < 0 or not 0 < self.bg_split_share <= 1:
            raise ConfigError(f"train.bg_split_step: 0 (never) or more, and train.bg_split_share in (0, 1]; got "
                              f"{self.bg_split_step} and {self.bg_split_share}")
        if self.host_allocator not in HOST_ALLOCATORS:
            raise ConfigError(f"train.host_allocator: one of {', '.join(HOST_ALLOCATORS)}, got {self.host_allocator!r}")
        if self.malloc_mmap_threshold_mib < 0:
            raise ConfigError(f"train.malloc_mmap_threshold_mib: must be 0 (the C library's default) or more, "
                              f"got {self.malloc_mmap_threshold_mib}")
        if self.fg_lr_warmup < 0:
            raise ConfigError(f"train.fg_lr_warmup: 0 (no warmup) or more steps, got {self.fg_lr_warmup}")
        if not (self.lr_decay.start > 0 and self.lr_decay.end > 0):
            raise ConfigError(f"train.lr_decay: a factor above 0 at both ends, got {self.lr_decay.start} and "
                              f"{self.lr_decay.end}")
        for name in ("fg_lr", "bg_lr", "clip_norm"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"train.{name}: must be above 0, got {getattr(self, name)}")
        check_device(self.device, "train.device")
        return self


# A device setting is one of these, exactly: it reaches torch and, through the workflow, shell commands.
DEVICE = re.compile(r"auto|cpu|cuda|cuda:[0-9]+|mps")


def check_device(value, key: str) -> str:
    if not isinstance(value, str) or not DEVICE.fullmatch(value):
        raise ConfigError(f"{key}: auto, cpu, cuda, cuda:N (N a device number) or mps, got {value!r}")
    return value


# Settings that change how fast a run goes, where, or what it logs, not what it learns. A run directory
# trained with other values of these is the same run and resumes (space/rundir.py compares the rest; every
# other setting counts, train.amp too: bf16 arithmetic learns other weights).
RUN_INDEPENDENT = (
    # Raising it extends the run: the annealing schedules are in absolute steps, so extending equals
    # training longer from the start. A checkpoint already past the new value is a difference (train.py).
    "train.steps",
    "train.checkpoint_every",  # when state is saved
    "train.log_every",  # logging draws no random numbers
    "train.image_every",
    "train.val_every",  # validation runs in eval mode, without sampling or BatchNorm updates
    "train.val_batches",
    "train.workers",  # the batches are a function of the step, whoever loads them
    "train.device",  # a run may move between machines (float rounding differs, the run does not)
    "train.threads",
    "train.channels_last",  # memory layout only: the same maths
    "train.checkpoint_images",  # activation checkpointing recomputes exactly
    "train.host_allocator",
    "train.malloc_mmap_threshold_mib",
    "train.bg_split_step",  # what training reports, not what it learns
    "train.bg_split_share",
)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "Config":
        self.model.validate()
        self.train.validate()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        unknown = set(d) - {"model", "train"}
        if unknown:
            raise ConfigError(f"unknown config section(s) {sorted(unknown)}; use model and train")
        return cls(model=_fill(ModelConfig, d.get("model", {}), "model"),
                   train=_fill(TrainConfig, d.get("train", {}), "train"))


def _fill(cls, d: dict, where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        raise ConfigError(f"unknown {where} setting(s) {sorted(unknown)}; known: {sorted(fields)}")
    kw = {}
    for k, v in d.items():
        kind = fields[k].type  # the annotation's text: "float", "int", "bool", "str" or "Anneal"
        if kind == "Anneal":
            if isinstance(v, Anneal):
                kw[k] = v
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool):  # a constant
                kw[k] = Anneal(float(v), float(v))
                continue
            if not isinstance(v, dict):
                raise ConfigError(f"{where}.{k}: give a number or {{start, end, start_step, end_step}}, got {v!r}")
            glued = [name for name, x in v.items() if x is None and ":" in str(name)]
            if glued:  # YAML reads {start:2.5} as the key "start:2.5" with no value
                raise ConfigError(f"{where}.{k}: {glued[0]!r} has no value; in YAML put a space after each colon, "
                                  f"e.g. {{start: 2.5, end: 0.5, start_step: 0, end_step: 20000}}")
            try:
                v = Anneal(**{name: _typed(f"{where}.{k}.{name}", x, "int" if name.endswith("step") else "float")
                              for name, x in v.items()})
            except TypeError as e:
                raise ConfigError(f"{where}.{k}: give start, end, start_step, end_step ({e})") from None
            kw[k] = v
        else:
            kw[k] = _typed(f"{where}.{k}", v, kind)
    return cls(**kw)


def _typed(key: str, v, kind: str):
    """Check (and for numbers written as text, such as YAML's 1e-4, convert) a setting's value."""
    if kind == "bool":
        if isinstance(v, bool):
            return v
    elif kind == "str":
        if isinstance(v, str):
            return v
    elif kind in ("int", "float") and not isinstance(v, bool):
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                pass
        if isinstance(v, (int, float)):
            if kind == "float":
                return float(v)
            if float(v).is_integer():
                return int(v)
    raise ConfigError(f"{key}: expected {'a number' if kind == 'float' else 'an integer' if kind == 'int' else kind}, "
                      f"got {v!r}")


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return Config.from_dict(PRESETS[name])


# The readings that learned best, measured on 3D-Room (BENCHMARKS.md, "Learning" and "3D-Room Small at
# 128x128 on a CPU"): the normalised foreground mean and the linear glimpse colour (in neither the paper's
# text nor its code), z_what's KL warmed up and equation 1's gradient tempered over the first 300 steps
# (in neither), and the code's glimpse encoder (the code behind table 1; 0.45 of the table's cost). With
# the paper's text alone the foreground switched on later and took a few colours only. The 3D-Room presets
# and the demo train with them; the model's defaults stay the paper's text (docs/paper.md).
LEARNED: dict = {
    "glimpse_encoder": "code",
    "fg_mean": "normalised",
    "glimpse_colour": "linear",
    "kl_what_weight": {"start": 0.0, "end": 1.0, "start_step": 0, "end_step": 300},
    "mixture_temperature": {"start": 5.0, "end": 1.0, "start_step": 0, "end_step": 300},
}

PRESETS: dict[str, dict] = {
    # Appendix D.2, "3D Room Large": the defaults with the readings that learned best (LEARNED).
    "room3d_large": {"model": LEARNED},
    # 3D-Room Small: the same model with an 8x8 grid (D.3: a stride-2 last encoder layer).
    "room3d_small": {"model": {**LEARNED, "grid_size": 8}},
    # Appendix D.2, "Joint Training on 10 Atari Games".
    "atari": {
        "model": {
            "n_components": 3,
            "fg_sigma": 0.20,
            "bg_sigma": 0.10,
            "tau": 2.5,
            "z_pres_prior": 0.01,
            "z_scale_prior_mean": {"start": -2.0, "end": -2.5, "start_step": 0, "end_step": 20000},
            "fix_alpha_steps": 2000,
            "fix_alpha_value": 0.1,
        },
    },
    # The CPU demo: 64x64 3D-Room, K=2, about 10 minutes of training on 2 cores (the machines vary).
    # Tuned by learning curves (BENCHMARKS.md, "Learning"): an 8x8 grid, since a 4x4 one leaves a tenth of
    # these frames' objects without a cell of their own; 16-pixel glimpses (the objects are 10-25 pixels
    # wide) with the boundary band halved and the code's glimpse encoder, which make the 8x8 step cheap;
    # batch 4, whose step costs about 40% of batch 8's here, so twice the steps learn more per minute; the
    # normalised foreground mean and the linear glimpse colour (objects of every colour); a faster
    # foreground learning rate (4e-4) than background (2.5e-4: a background that learns fast explains the
    # objects first); a constant z_scale prior for glimpses of a sixth of the frame; both training
    # schedules over the first 300 steps (LEARNED). The paper's settings learn too, over hundreds of
    # thousands of steps.
    "demo": {
        "model": {
            **LEARNED,
            "image_size": 64,
            "grid_size": 8,
            "glimpse_size": 16,
            "boundary_width": 3,
            "n_components": 2,
            "z_pres_prior": {"start": 0.1, "end": 0.05, "start_step": 500, "end_step": 1500},
            "z_scale_prior_mean": -1.5,
        },
        "train": {"batch_size": 4, "steps": 950, "fg_lr": 4e-4, "bg_lr": 2.5e-4, "checkpoint_every": 200,
                  "log_every": 25, "image_every": 200, "val_every": 200, "checkpoint_images": 0},
    },
}
PRESETS = {k: merge({}, v) for k, v in PRESETS.items()}


# ------------------------------------------------------------------- a preset, --config and --set


def _parse_value(item: str, text: str):
    """Values of --set are YAML: 8, 1e-4, true, [0.1, 0.01], {start: 0.1, end: 0.01}."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item}: the value is not valid YAML ({_one_line(e)}); e.g. "
                          "model.grid_size=8, train.fg_lr=1e-4, or a list in brackets [0.1, 0.01]") from None


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _read_config_file(path: str) -> dict:
    """A --config file: a YAML mapping of sections (model:, train:), each a mapping of settings."""
    try:
        with open(path) as fh:
            d = yaml.safe_load(fh)
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror or e}); give a YAML file "
                          "with model: and train: sections") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path} is not valid YAML ({_one_line(e)})") from None
    if d is None:  # an empty file: nothing over the preset
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"--config {path} holds a {type(d).__name__}, not a mapping of sections; give "
                          "model: and train: sections of NAME: VALUE settings")
    for section, values in d.items():
        if values is not None and not isinstance(values, dict):
            raise ConfigError(f"--config {path}: section {section}: holds {values!r}, not a mapping of "
                              f"settings; write it as {section}: {{NAME: VALUE, ...}} or one NAME: VALUE a line")
    return {k: v or {} for k, v in d.items()}  # an empty section: no settings over the preset's


def resolve_config(preset_name: str, config_file: str | None, sets: list[str]) -> Config:
    """The settings `python -m space train` uses: a preset, then a --config YAML file, then --set items."""
    if preset_name not in PRESETS:
        raise ConfigError(f"unknown preset {preset_name!r}; choose from {', '.join(PRESETS)}")
    d = merge({}, PRESETS[preset_name])
    if config_file:
        d = merge(d, _read_config_file(config_file))
    for item in sets or []:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in ("model", "train"):
            raise ConfigError(f"--set takes model.NAME=VALUE or train.NAME=VALUE, got {item!r}")
        d = merge(d, {section: {name: _parse_value(item, value)}})
    return Config.from_dict(d).validate()
