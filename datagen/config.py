"""Every generator parameter, in one place, with the paper's values as defaults.

The dataclasses are filled from `params.yaml` (through the CLI flags the Snakemake rules pass) and are
written whole into each store's root attributes, so a store says exactly how it was made.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

# Appendix E: "The possible objects are randomly sized spheres, cubes, and cylinders."
SHAPES = ("sphere", "cube", "cylinder")

# Appendix E: object colours from 8 ...
OBJECT_COLORS = (
    (0.86, 0.16, 0.16),  # red
    (0.16, 0.70, 0.22),  # green
    (0.18, 0.32, 0.90),  # blue
    (0.95, 0.85, 0.15),  # yellow
    (0.80, 0.25, 0.80),  # magenta
    (0.15, 0.80, 0.85),  # cyan
    (0.98, 0.55, 0.10),  # orange
    (0.95, 0.95, 0.95),  # white
)
# ... and wall, floor and sky colours from 5.
BACKGROUND_COLORS = (
    (0.55, 0.55, 0.58),  # grey
    (0.72, 0.62, 0.48),  # sand
    (0.45, 0.58, 0.72),  # slate blue
    (0.60, 0.70, 0.50),  # sage
    (0.70, 0.50, 0.52),  # dusty rose
)


class ConfigError(ValueError):
    """A parameter is invalid; the message names it and says how to fix it."""


class GenerationError(ConfigError):
    """Valid-looking parameters that cannot make the frames asked for (found by trying)."""


class GeneratorParams:
    """A generator's parameters to and from the plain dict that params.yaml and a store's attributes hold
    (lists there, tuples here). `KIND` names the generator in errors."""

    KIND = "generator"

    def to_dict(self) -> dict:
        return json_ready(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown {cls.KIND} parameter(s) {sorted(unknown)}; known: {sorted(names)}")
        return cls(**{k: tuplify(v) for k, v in d.items()})


@dataclass
class Room3DConfig(GeneratorParams):
    """A 3D-Room scene (paper, appendix E). Lengths are in MuJoCo metres, angles in degrees."""

    KIND = "room3d"

    image_size: int = 128  # square frames, as in the paper
    objects: tuple[int, int] = (4, 8)  # inclusive range; Small 4-8, Large 18-24
    shapes: tuple[str, ...] = SHAPES
    object_colors: tuple[tuple[float, float, float], ...] = OBJECT_COLORS
    background_colors: tuple[tuple[float, float, float], ...] = BACKGROUND_COLORS
    room_half_size: float = 3.0  # floor is a square of side 2 * room_half_size
    wall_height: float = 0.6
    wall_thickness: float = 0.1
    size_min: float = 0.15  # radius of spheres and cylinders, half-edge of cubes
    size_max: float = 0.30
    gap: float = 0.04  # least free floor between two objects, so none interpenetrate
    camera_distance: tuple[float, float] = (7.0, 9.0)
    camera_elevation: tuple[float, float] = (-50.0, -30.0)  # below the horizon
    camera_azimuth: tuple[float, float] = (0.0, 360.0)
    camera_lookat_jitter: float = 0.6  # the camera aims at a random floor point this near the centre
    fovy: float = 45.0
    antialias_samples: int = 4  # MuJoCo offscreen multisampling
    # Ground-truth rule: an object is counted when at least this many of its pixels are visible in the
    # frame. Objects hidden behind others or outside the frame are left out of boxes and labels.
    min_visible_pixels: int = 12
    placement_tries: int = 200  # rejection-sampling tries per object before the scene is resampled

    def validate(self) -> "Room3DConfig":
        lo, hi = self.objects
        if lo < 1 or hi < 1:
            raise ConfigError(f"objects: counts must be at least 1, got {lo}-{hi}")
        if lo > hi:
            raise ConfigError(f"objects: min {lo} is above max {hi}; give MIN MAX with MIN <= MAX")
        if hi > 254:
            raise ConfigError(f"objects: max {hi} is above 254, the most a uint8 instance mask can hold")
        if self.image_size < 8:
            raise ConfigError(f"image_size: {self.image_size} is too small; use at least 8 (the paper: 128)")
        if not self.shapes:
            raise ConfigError("shapes: give at least one of " + ", ".join(SHAPES))
        for s in self.shapes:
            if s not in SHAPES:
                raise ConfigError(f"shapes: unknown shape {s!r}; choose from {', '.join(SHAPES)}")
        if len(set(self.shapes)) != len(self.shapes):
            raise ConfigError(f"shapes: {list(self.shapes)} names a shape twice; give each shape once")
        for name in ("size_min", "size_max", "room_half_size", "wall_height", "wall_thickness", "fovy"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: must be above 0, got {getattr(self, name)}")
        if not self.fovy < 180:
            raise ConfigError(f"fovy: a perspective camera's field of view is below 180 degrees, got {self.fovy}")
        if self.placement_tries < 1:
            raise ConfigError(f"placement_tries: must be at least 1, got {self.placement_tries}")
        if self.antialias_samples < 0:
            raise ConfigError(f"antialias_samples: must be 0 or more, got {self.antialias_samples}")
        if self.size_min > self.size_max:
            raise ConfigError(f"size_min {self.size_min} is above size_max {self.size_max}")
        for name in ("gap", "camera_lookat_jitter"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be 0 or more, got {getattr(self, name)}")
        for name in ("object_colors", "background_colors"):
            colors = getattr(self, name)
            if not colors or any(len(c) != 3 or not all(0 <= v <= 1 for v in c) for c in colors):
                raise ConfigError(f"{name}: give one or more RGB triples with values in [0, 1]")
        for name in ("camera_distance", "camera_elevation", "camera_azimuth"):
            a, b = getattr(self, name)
            if a > b:
                raise ConfigError(f"{name}: range {a}-{b} is reversed")
        if not -90 < self.camera_elevation[0] <= self.camera_elevation[1] < 0:
            raise ConfigError("camera_elevation: must lie in (-90, 0) so the camera looks down into the room")
        if self.camera_distance[0] <= self.room_half_size * math.sqrt(2):
            raise ConfigError(
                f"camera_distance: {self.camera_distance[0]} puts the camera inside the room; "
                f"use more than {self.room_half_size * math.sqrt(2):.2f} (room_half_size * sqrt 2)"
            )
        if not 1 <= self.min_visible_pixels <= self.image_size**2:
            raise ConfigError(
                f"min_visible_pixels: must be between 1 and the frame's {self.image_size ** 2} pixels, "
                f"got {self.min_visible_pixels}"
            )
        self._check_floor_capacity()
        return self

    def _check_floor_capacity(self) -> None:
        # Each object needs a disc of its footprint radius plus half the gap. Random sequential placement
        # jams at about half the floor covered, so refuse counts whose expected footprint passes
        # FLOOR_PACKING_LIMIT of the usable floor, before any work (rare crowded draws are resampled).
        usable = 2 * (self.room_half_size - self.wall_thickness / 2 - self.bounding_radius_max - self.gap / 2)
        if usable <= 0:
            raise ConfigError("size_max is too large for the room; lower size_max or raise room_half_size")
        a, b = self.size_min + self.gap / 2, self.size_max + self.gap / 2
        mean_r2 = (a * a + a * b + b * b) / 3  # E[r^2] for r uniform on [a, b]
        cube_share = sum(s == "cube" for s in self.shapes) / len(self.shapes)
        mean_area = math.pi * mean_r2 * (1 + cube_share)  # a cube's footprint circle has 2x the area
        have = FLOOR_PACKING_LIMIT * usable * usable
        if self.objects[1] * mean_area > have:
            raise ConfigError(
                f"objects: {self.objects[1]} objects of size {self.size_min}-{self.size_max} do not fit on a "
                f"floor of side {2 * self.room_half_size} (at most about {int(have / mean_area)}); lower the "
                f"object max, lower size_min/size_max, or raise room_half_size"
            )

    @property
    def bounding_radius_max(self) -> float:
        # A cube turned about the vertical axis reaches sqrt(2) times its half-edge.
        return self.size_max * (math.sqrt(2) if "cube" in self.shapes else 1.0)



# Random sequential addition of discs jams near 0.55 of the area; stay below it so sampling terminates.
FLOOR_PACKING_LIMIT = 0.45


@dataclass
class StoreConfig:
    """How frames are laid out on disk (see datagen/store.py)."""

    shard_size: int = 256  # frames per shard file and per unit of (resumable) work
    compressor_level: int = 3  # zstd level
    splits: dict[str, int] = field(default_factory=lambda: {"train": 63000, "val": 7000, "test": 7000})

    def validate(self) -> "StoreConfig":
        if self.shard_size < 1:
            raise ConfigError(f"shard_size: must be at least 1, got {self.shard_size}")
        if not self.splits:
            raise ConfigError("splits: give at least one split, e.g. --split train=1000")
        for name, n in self.splits.items():
            if not name.isidentifier():
                raise ConfigError(f"split name {name!r}: use letters, digits and underscores")
            if int(n) < 1:
                raise ConfigError(f"split {name}: frame count must be at least 1, got {n}")
        return self


def check_seed(seed) -> int:
    """A dataset seed: numpy's SeedSequence takes non-negative integers only, and fails deep inside a
    generator on any other, after the store may have been started."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed: a non-negative integer, got {seed!r}; e.g. --seed 0")
    return seed


def merge(base: dict, over: dict) -> dict:
    """`over` merged into `base` key by key (nested mappings merged, anything else replaced), as Snakemake
    merges a --configfile over its configfile; used for params.yaml overlays and for SPACE's presets."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def enabled_experiments(params: dict) -> dict:
    """params.yaml's experiments less those marked `enabled: false`: what the DAG trains and DVC's stages
    list (one definition for both)."""
    experiments = params.get("experiments") or {}
    return {k: e for k, e in experiments.items() if not (isinstance(e, dict) and e.get("enabled", True) is False)}


def tuplify(v):
    """YAML and JSON give lists; the configs hold tuples so they compare and hash."""
    if isinstance(v, list):
        return tuple(tuplify(x) for x in v)
    return v


def json_ready(v):
    if isinstance(v, (tuple, list)):
        return [json_ready(x) for x in v]
    if isinstance(v, dict):
        return {k: json_ready(x) for k, x in v.items()}
    return v


# ------------------------------------------------------------------------------------------------ Atari

# Per game (paper, appendix E): the gymnasium id (explicit, never a bare name, which would pick a v4
# env), the true frame height (width is 160), and the OCAtari categories that are not scene objects. HUD
# categories (scores, lives, inventories) are never ground truth; static categories (scenery such as
# shields, walls, ladders, pills) are kept in the "all" set and left out of the "moving" set. These lists
# are written here, not read from OCAtari's `.hud` flags, which are unreliable.
ATARI_GAMES = {
    "SpaceInvaders": {"env_id": "ALE/SpaceInvaders-v5", "height": 210,
                      "hud": ("P1Score", "P2Score", "Lives"), "static": ("Shield",)},
    "AirRaid": {"env_id": "ALE/AirRaid-v5", "height": 250, "hud": ("PlayerScore", "Lives"), "static": ("Building",)},
    # OCAtari 2.2.1's Riverraid RAM reader misses most enemies and places the rest beside their sprites
    # (docs/datasets.md, "Atari"), so its boxes come from OCAtari's colour-based reader of the frame instead
    # ("vision"), which finds what is drawn: houses (scenery, no enemy) are not among its categories.
    "Riverraid": {"env_id": "ALE/Riverraid-v5", "height": 210, "hud": ("PlayerScore", "Lives"), "static": (),
                  "boxes": "vision", "playfield_rows": 163,
                  "categories": {"Player": 1, "PlayerMissile": 1, "FuelDepot": 4, "Tanker": 4, "Helicopter": 4,
                                 "Jet": 4, "Bridge": 1}},
    "MontezumaRevenge": {"env_id": "ALE/MontezumaRevenge-v5", "height": 210,
                         "hud": ("Score", "Life", "Key_HUD", "Amulet_HUD", "Torch_HUD", "Sword_HUD"),
                         "static": ("Barrier", "Beam", "Rope", "Wall", "Ladder", "Platform",
                                    "Disappearing_Platform", "Conveyer_Belt")},
    "Asterix": {"env_id": "ALE/Asterix-v5", "height": 210, "hud": ("Score", "Lives"), "static": ()},
    "Atlantis": {"env_id": "ALE/Atlantis-v5", "height": 210, "hud": ("Score",),
                 "static": ("Sentry", "AcropolisCommandPost", "Generator", "DomedPalace", "BridgedBazaar",
                            "AquaPlane")},
    "Carnival": {"env_id": "ALE/Carnival-v5", "height": 214,
                 "hud": ("AmmoBar", "BonusSign", "BonusValue", "PlayerScore"), "static": ("Wheel",)},
    "DoubleDunk": {"env_id": "ALE/DoubleDunk-v5", "height": 210, "hud": ("Player_Score", "Opponent_Score"),
                   "static": ("Basket", "Backboard")},
    "Kangaroo": {"env_id": "ALE/Kangaroo-v5", "height": 210, "hud": ("Score", "Lives", "Time"),
                 "static": ("Ladder", "Platform", "Bell")},
    "Pacman": {"env_id": "ALE/Pacman-v5", "height": 250, "hud": ("Score", "Life"), "static": ("PowerPill",)},
    "Pooyan": {"env_id": "ALE/Pooyan-v5", "height": 220, "hud": ("PlayerScore", "Lives"), "static": ()},
    "Qbert": {"env_id": "ALE/Qbert-v5", "height": 210, "hud": ("Score", "Lives"), "static": ("Cube", "Disk")},
}
ATARI_WIDTH = 160


@dataclass
class AtariConfig(GeneratorParams):
    """Frames from agent rollouts (paper, appendix E), with object boxes from the game's RAM."""

    KIND = "atari"

    games: tuple[str, ...] = ("SpaceInvaders",)
    image_size: int = 128  # frames are resized from each game's true size to image_size x image_size RGB
    frameskip: int = 4  # emulator frames per agent step (ALE v5's default)
    sticky_actions: float = 0.25  # repeat_action_probability (ALE v5's default)
    noop_max: int = 30  # a random number (0..noop_max) of no-op steps starts every episode
    # Agent steps after the no-ops before recording starts: a game's opening screens are the same in every
    # episode whatever the agent does (random agent: up to step 75 in SpaceInvaders, 62 in AirRaid), so
    # recording them would put the same frames in every shard of every split.
    opening_steps: int = 100
    subsample: int = 4  # keep every subsample-th agent step's frame: consecutive frames are near-duplicates
    max_episode_steps: int = 5000  # agent steps before an episode is cut (truncated)
    # A frame equal (byte for byte, as stored) to one already in its shard is dropped and the rollout goes
    # on: a pause or a death replay is one still screen for several recorded steps. After repeat_tries
    # repeats in a row the next one is kept anyway, so an agent that never moves still finishes a shard;
    # 0 keeps every frame.
    repeat_tries: int = 64
    policy: str = "random"  # "random", or the path of a TorchScript policy file (see datagen/atari.py)
    # Flicker filter: an object counts only when at least this many pixels of its box differ from the
    # game's background image (the per-pixel median of background_frames calibration frames) by more than
    # background_tolerance (max over RGB, 0-255). Static categories are exempt: they are the background.
    min_support_pixels: int = 2
    background_tolerance: int = 24
    background_frames: int = 96

    def validate(self) -> "AtariConfig":
        if not self.games:
            raise ConfigError("games: give at least one game, e.g. --game SpaceInvaders")
        for g in self.games:
            if g not in ATARI_GAMES:
                raise ConfigError(f"games: unknown game {g!r}; choose from {', '.join(sorted(ATARI_GAMES))}")
        if len(set(self.games)) != len(self.games):
            raise ConfigError(f"games: {list(self.games)} names a game twice; give each game once")
        if self.image_size < 8:
            raise ConfigError(f"image_size: {self.image_size} is too small; use at least 8 (the paper: 128)")
        for name in ("frameskip", "subsample", "max_episode_steps", "background_frames", "min_support_pixels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        for name in ("noop_max", "opening_steps", "repeat_tries"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be 0 or more, got {getattr(self, name)}")
        if self.noop_max + self.opening_steps >= self.max_episode_steps:
            raise ConfigError(
                f"noop_max {self.noop_max} + opening_steps {self.opening_steps} leave nothing of an episode of "
                f"max_episode_steps {self.max_episode_steps} to record; lower them or raise max_episode_steps"
            )
        if not 0 <= self.sticky_actions < 1:
            raise ConfigError(f"sticky_actions: a probability in [0, 1), got {self.sticky_actions}")
        if not 0 <= self.background_tolerance < 255:
            raise ConfigError(f"background_tolerance: must be in 0-254, got {self.background_tolerance}")
        if not self.policy:
            raise ConfigError("policy: give 'random' or the path of a TorchScript policy file")
        return self

