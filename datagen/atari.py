"""Atari frames from agent rollouts (gymnasium + ale-py), with object boxes from the game's RAM (OCAtari).

A store holds `frames_per_game` frames of every game of `AtariConfig.games`, game after game, in each
split. Every shard of a split is made by its own rollouts: the episodes of a shard are seeded by
(seed, game, split, shard, episode), so shards are independent jobs, a rerun redoes only missing shards,
and no episode appears in two splits (the split is by episode, never by frame).

Repeated frames: every episode opens on screens that do not depend on the agent (SpaceInvaders shows
one still frame for about 60 steps), so recording starts `opening_steps` agent steps after the no-ops;
otherwise that frame would be in every shard of every split. Pauses and deaths freeze the screen for
several recorded steps, so a frame whose stored bytes equal a frame already in its shard is dropped
and the rollout goes on. Both depend only on the shard's own episodes, so a store is still the same
bytes for any worker count and a rerun still redoes only missing shards. A game that never changes
cannot fill a shard: after `repeat_tries` drops in a row a repeat is kept (with a warning).

Ground truth: OCAtari reads each object's box from the RAM. The frame an ALE v5 env returns is the last
of its `frameskip` frames, and many games draw some sprites only every other frame (flicker), so RAM
reports objects that are not drawn in the stored frame. An object is kept only when its box has pixels
that differ from the game's background image (`support`); static scenery is exempt. HUD categories
(scores, lives) are never ground truth. The lists are per game in `datagen.config.ATARI_GAMES`.

Policies: "random" (uniform over the game's minimal action set, after a random number of no-op steps),
or a TorchScript file: `forward(frame)` takes the raw frame as a uint8 tensor (H, W, 3) and returns
logits over the minimal action set, shape (A,) or (1, A); the agent takes the argmax.
"""

from __future__ import annotations

import hashlib
import os
import warnings
import zlib

import numpy as np

from .config import ATARI_GAMES, ATARI_WIDTH, AtariConfig, ConfigError, GenerationError

NOOP = 0  # action 0 is NOOP in every game's minimal action set


def stable_key(*parts) -> int:
    """A stable seed component from names and numbers (not Python's salted hash)."""
    return zlib.crc32("/".join(map(str, parts)).encode())


def episode_seed(seed: int, game: str, split: str, shard: int, episode: int) -> int:
    return int(np.random.SeedSequence([seed, stable_key(game, split), shard, episode]).generate_state(1)[0])


def make_env(game: str, cfg: AtariConfig):
    import ale_py
    import gymnasium as gym

    gym.register_envs(ale_py)
    return gym.make(ATARI_GAMES[game]["env_id"], obs_type="rgb", frameskip=cfg.frameskip,
                    repeat_action_probability=cfg.sticky_actions, full_action_space=False,
                    max_episode_steps=cfg.max_episode_steps)


def _ocatari_ram():
    """OCAtari's RAM extraction. Its package imports pygame at import time; keep pygame quiet."""
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    try:
        from ocatari.ram import extract_ram_info
    except ImportError as e:  # noqa: F841
        raise ConfigError(
            f"Atari ground truth needs the ocatari package ({e}); install it with "
            "`pip install --no-deps ocatari==2.2.1` (setup.sh does; see pyproject.toml for why --no-deps)"
        ) from None
    return extract_ram_info


def game_categories(game: str) -> tuple[tuple[str, int], ...]:
    """(category, most objects at once) for a game's non-HUD OCAtari categories, in OCAtari's order."""
    import sys

    if ATARI_GAMES[game].get("boxes") == "vision":
        return tuple(ATARI_GAMES[game]["categories"].items())
    _ocatari_ram()
    mod = sys.modules[f"ocatari.ram.{game.lower()}"]
    hud = set(ATARI_GAMES[game]["hud"])
    return tuple((c, int(n)) for c, n in mod.MAX_NB_OBJECTS_HUD.items() if c not in hud)


class RamObjects:
    """The objects OCAtari finds in a game's RAM, as (category, x, y, w, h) in native frame pixels."""

    def __init__(self, game: str):
        self.game = game
        self._x = _ocatari_ram()
        self.reset()

    def reset(self) -> None:
        self.objects = self._x.init_objects(self.game, True)

    def __call__(self, ram: np.ndarray, frame: np.ndarray) -> list[tuple[str, int, int, int, int]]:
        # OCAtari 2.2.1 was written for numpy 1, where uint8 RAM values mixed with Python ints promoted
        # when a result left 0-255. Under numpy 2 (NEP 50) such arithmetic raises OverflowError (seen in
        # SpaceInvaders, AirRaid, Asterix, Atlantis, Kangaroo, Montezuma, Pacman, Riverraid) and a
        # comparison's numpy bool no longer indexes a list. So the readers get the RAM as Python ints:
        # exact for every in-range result, unbounded where uint8 would have wrapped (such objects lie
        # off-screen either way and are dropped by the frame clip). The tests run every game.
        ram = ram.tolist()
        with np.errstate(over="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            self._x.detect_objects_ram(self.objects, ram, self.game, True)
        out = []
        for o in self.objects:
            if o is None or o.category == "NoObject":
                continue
            x, y, w, h = (int(v) for v in o.xywh)
            if w > 0 and h > 0:
                out.append((o.category, x, y, w, h))
        return out


class VisionObjects:
    """The objects OCAtari's colour-based reader finds in the frame itself, for games whose RAM reader is
    wrong (ATARI_GAMES[game]["boxes"] == "vision"), as (category, x, y, w, h) in native frame pixels.
    Only the playfield counts: the rows below `playfield_rows` are the HUD."""

    def __init__(self, game: str):
        _ocatari_ram()  # the same import chain and error message
        from ocatari.vision.extract_vision_info import detect_objects_vision

        import importlib

        importlib.import_module(f"ocatari.vision.{game.lower()}")
        self.game, self._detect = game, detect_objects_vision
        self.rows = ATARI_GAMES[game].get("playfield_rows", ATARI_GAMES[game]["height"])
        self.max = dict(ATARI_GAMES[game]["categories"])
        self.reset()

    def reset(self) -> None:
        self.objects = []

    def __call__(self, ram: np.ndarray, frame: np.ndarray) -> list[tuple[str, int, int, int, int]]:
        self._detect(self.objects, frame, self.game, False)
        out, seen = [], {}
        for o in self.objects:
            x, y, w, h = (int(v) for v in o.xywh)
            if o.category not in self.max or w <= 0 or h <= 0 or y >= self.rows:
                continue
            seen[o.category] = seen.get(o.category, 0) + 1
            if seen[o.category] <= self.max[o.category]:
                out.append((o.category, x, y, w, min(h, self.rows - y)))
        return out


def object_reader(game: str):
    """RAM reader, or the frame reader for games whose RAM reader is wrong."""
    return VisionObjects(game) if ATARI_GAMES[game].get("boxes") == "vision" else RamObjects(game)


class RandomPolicy:
    def __init__(self, n_actions: int):
        self.n_actions = n_actions

    def __call__(self, frame: np.ndarray, rng: np.random.Generator) -> int:
        return int(rng.integers(self.n_actions))


class TorchScriptPolicy:
    """A user's agent: a TorchScript file mapping the raw frame (H, W, 3) uint8 to action logits."""

    def __init__(self, path: str, n_actions: int, frame_shape: tuple):
        if not os.path.isfile(path):
            raise ConfigError(f"policy: {path!r} is not a file; give 'random' or a TorchScript policy file")
        import torch

        try:
            self.module = torch.jit.load(path, map_location="cpu").eval()
        except Exception as e:  # noqa: BLE001 - whatever torch says, the file is not a usable policy
            raise ConfigError(
                f"policy: {path} does not load as a TorchScript module ({type(e).__name__}: {str(e)[:200]}); "
                "save the agent with torch.jit.save(torch.jit.script(agent), path)"
            ) from None
        self.n_actions = n_actions
        probe = self._logits(np.zeros(frame_shape, np.uint8), path)
        if probe.shape[-1] != n_actions:
            raise ConfigError(f"policy: {path} returns {probe.shape[-1]} logits; this game has {n_actions} actions")

    def _logits(self, frame, path="the policy"):
        import torch

        with torch.no_grad():
            try:
                out = self.module(torch.from_numpy(np.ascontiguousarray(frame)))
            except Exception as e:  # noqa: BLE001
                raise ConfigError(
                    f"policy: {path} failed on a frame of shape {frame.shape} uint8 ({type(e).__name__}: "
                    f"{str(e)[:200]}); its forward must take the raw (H, W, 3) uint8 frame"
                ) from None
        return out.reshape(-1).numpy()

    def __call__(self, frame: np.ndarray, rng: np.random.Generator) -> int:
        return int(np.argmax(self._logits(frame)))


def make_policy(cfg: AtariConfig, env):
    n = int(env.action_space.n)
    if cfg.policy == "random":
        return RandomPolicy(n)
    return TorchScriptPolicy(cfg.policy, n, env.observation_space.shape)


def background_image(game: str, cfg: AtariConfig, seed: int) -> np.ndarray:
    """The game's background at native size (H, 160, 3): the per-pixel median of frames from random
    rollouts, so moving sprites drop out. Deterministic in (seed, game), so every shard job agrees."""
    env = make_env(game, cfg)
    rng = np.random.default_rng([seed, stable_key(game, "background")])
    frames = []
    try:
        while len(frames) < cfg.background_frames:
            obs, _ = env.reset(seed=int(rng.integers(2**31)))
            done = False
            step = 0
            while not done and len(frames) < cfg.background_frames:
                obs, _, terminated, truncated, _ = env.step(int(rng.integers(env.action_space.n)))
                done = terminated or truncated
                step += 1
                if step % (4 * cfg.subsample) == 0:  # sparser than the data: more varied positions
                    frames.append(obs)
    finally:
        env.close()
    return np.median(np.stack(frames), axis=0).astype(np.uint8)


def support_pixels(frame: np.ndarray, background: np.ndarray, box, tolerance: int) -> tuple[int, int]:
    """(pixels of the box that differ from the background by more than `tolerance`, pixels of the box),
    the box (x, y, w, h) clipped to the frame."""
    h, w = frame.shape[:2]
    x, y, bw, bh = box
    x0, y0, x1, y1 = max(0, x), max(0, y), min(w, x + bw), min(h, y + bh)
    if x1 <= x0 or y1 <= y0:
        return 0, 0
    diff = np.abs(frame[y0:y1, x0:x1].astype(np.int16) - background[y0:y1, x0:x1].astype(np.int16)).max(-1)
    return int((diff > tolerance).sum()), int(diff.size)


class GameRecorder:
    """Rollouts of one game, turned into store rows."""

    def __init__(self, game: str, cfg: AtariConfig, seed: int, categories: list[str], k_max: int):
        self.game, self.cfg, self.seed, self.k_max = game, cfg, seed, k_max
        self.game_id = list(cfg.games).index(game)
        self.env = make_env(game, cfg)
        want = (ATARI_GAMES[game]["height"], ATARI_WIDTH, 3)
        if self.env.observation_space.shape != want:
            raise GenerationError(f"{game}: frames are {self.env.observation_space.shape}, expected {want}")
        self.policy = make_policy(cfg, self.env)
        self.ram = object_reader(game)
        self.background = background_image(game, cfg, seed)
        self.static = set(ATARI_GAMES[game]["static"])
        self.hud = set(ATARI_GAMES[game]["hud"])
        prefix = game + "."
        self.label = {c[len(prefix):]: i for i, c in enumerate(categories) if c.startswith(prefix)}
        self.kept_repeats = 0  # repeats kept after repeat_tries drops in a row, over all shards made

    def close(self) -> None:
        self.env.close()

    def rows(self, split: str, shard: int, n: int) -> dict:
        """n frames from fresh episodes of this (split, shard), stacked per array."""
        cfg = self.cfg
        s = cfg.image_size
        height = ATARI_GAMES[self.game]["height"]
        scale = np.array([s / ATARI_WIDTH, s / height, s / ATARI_WIDTH, s / height], np.float32)
        out = {
            "images": np.zeros((n, s, s, 3), np.uint8),
            "boxes": np.full((n, self.k_max, 4), np.nan, np.float32),
            "n_objects": np.zeros(n, np.int16),
            "labels": np.full((n, self.k_max), -1, np.int16),
            "visibility": np.full((n, self.k_max), np.nan, np.float32),
            "moving": np.zeros((n, self.k_max), np.uint8),
            "game": np.full(n, self.game_id, np.int16),
            "episode": np.zeros(n, np.int32),
            "step": np.zeros(n, np.int32),
            "action": np.zeros(n, np.int16),
            "reward": np.zeros(n, np.float32),
            "lives": np.zeros(n, np.int16),
            "terminated": np.zeros(n, np.uint8),
            "truncated": np.zeros(n, np.uint8),
        }
        from PIL import Image

        i = 0
        episode = 0
        unwrapped = self.env.unwrapped
        seen: set = set()  # hashes of the frames already in this shard's rows
        tries = 0  # candidate frames dropped in a row as repeats
        kept = 0  # repeats kept after repeat_tries drops in a row
        while i < n:
            ep_seed = episode_seed(self.seed, self.game, split, shard, episode)
            rng = np.random.default_rng(ep_seed)
            obs, info = self.env.reset(seed=ep_seed)
            self.ram.reset()
            noops = int(rng.integers(cfg.noop_max + 1))
            # Every episode opens on the same screens whatever the agent does; record none of them.
            first = noops + cfg.opening_steps
            step, done = 0, False
            while not done and i < n:
                action = NOOP if step < noops else self.policy(obs, rng)
                obs, reward, terminated, truncated, info = self.env.step(action)
                done = terminated or truncated
                step += 1
                if step % cfg.subsample and not done:
                    continue
                # The reader sees every subsample-th frame, recorded or not: some of OCAtari's readers
                # carry state from call to call (Pooyan's arrow tracking fails if its first call is mid-flight).
                objects = self.ram(unwrapped.ale.getRAM(), obs)
                if step <= first and not done:
                    continue
                image = np.asarray(Image.fromarray(obs).resize((s, s), Image.BILINEAR))
                key = hashlib.blake2b(image.tobytes(), digest_size=16).digest()
                if key in seen and tries < cfg.repeat_tries:
                    tries += 1  # a still screen (a pause, a death): wait for the game to move
                    continue
                if key in seen:  # bounded: an agent that never moves still finishes its shard
                    if not kept and cfg.repeat_tries:
                        warnings.warn(f"{self.game}: shard {shard} of {split} keeps a repeated frame after "
                                      f"{cfg.repeat_tries} in a row (the screen did not change); a policy "
                                      "that moves, or a larger repeat_tries, avoids it", stacklevel=2)
                    kept += 1
                seen.add(key)
                tries = 0
                out["images"][i] = image
                k = 0
                for cat, x, y, w, h in objects:
                    if cat in self.hud or cat not in self.label or k == self.k_max:
                        continue
                    support, area = support_pixels(obs, self.background, (x, y, w, h), cfg.background_tolerance)
                    if area == 0 or (cat not in self.static and support < cfg.min_support_pixels):
                        continue  # outside the frame, or not drawn in this frame (flicker)
                    box = np.array([x, y, x + w, y + h], np.float32) * scale
                    out["boxes"][i, k] = np.clip(box, 0, s)
                    out["labels"][i, k] = self.label[cat]
                    out["visibility"][i, k] = support / area
                    out["moving"][i, k] = cat not in self.static
                    k += 1
                out["n_objects"][i] = k
                out["episode"][i] = shard * 10_000 + episode
                out["step"][i] = step
                out["action"][i] = action
                out["reward"][i] = reward
                out["lives"][i] = info.get("lives", 0)
                out["terminated"][i] = terminated
                out["truncated"][i] = truncated
                i += 1
            episode += 1
        self.kept_repeats += kept
        return out


EXTRA_ARRAYS = (  # (name, dtype, per-frame shape given k_max, fill)
    ("moving", "uint8", "k", 0),  # 1: a moving object, 0: static scenery (the "all" set is every row)
    ("game", "int16", (), -1),  # index into the root attribute `games`
    ("episode", "int32", (), -1),  # unique within (split, game)
    ("step", "int32", (), -1),  # agent step within the episode
    ("action", "int16", (), -1),  # the action that led to this frame
    ("reward", "float32", (), np.nan),
    ("lives", "int16", (), -1),
    ("terminated", "uint8", (), 0),
    ("truncated", "uint8", (), 0),
)


def layout(cfg: AtariConfig) -> tuple[list[str], int]:
    """The store's category names ("Game.Category") and K_max."""
    names, k_max = [], 0
    for g in cfg.games:
        cats = game_categories(g)
        names += [f"{g}.{c}" for c, _ in cats]
        k_max = max(k_max, sum(n for _, n in cats))
    return names, k_max


def versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("ale-py", "gymnasium", "ocatari", "numpy")}


def store_spec(cfg: AtariConfig, frames_per_game: dict, seed: int, shard_size: int):
    from . import __version__
    from .store import StoreSpec

    categories, k_max = layout(cfg)
    params = dict(cfg.to_dict(), frames_per_game={k: int(v) for k, v in frames_per_game.items()}, versions=versions())
    return StoreSpec(
        generator="atari",
        generator_version=__version__,
        params=params,
        seed=int(seed),
        splits={k: int(v) * len(cfg.games) for k, v in frames_per_game.items()},
        image_size=(cfg.image_size, cfg.image_size),
        k_max=k_max,
        categories=tuple(categories),
        shard_size=int(shard_size),
        with_masks=False,
        extra_arrays=tuple((n, dt, (k_max,) if shape == "k" else shape, fill) for n, dt, shape, fill in EXTRA_ARRAYS),
    )


class ShardMaker:
    """Makes any shard of a store; keeps one recorder per game (env, background image) for reuse."""

    def __init__(self, cfg: AtariConfig, seed: int, frames_per_game: dict, categories: list, k_max: int):
        self.cfg, self.seed, self.frames_per_game = cfg, seed, frames_per_game
        self.categories, self.k_max = categories, k_max
        self.recorders: dict = {}

    def recorder(self, game: str) -> GameRecorder:
        if game not in self.recorders:
            self.recorders[game] = GameRecorder(game, self.cfg, self.seed, self.categories, self.k_max)
        return self.recorders[game]

    def shard(self, split: str, shard: int, start: int, stop: int) -> dict:
        """Frames start..stop-1 of a split: game g holds frames g*n .. (g+1)*n - 1."""
        n = self.frames_per_game[split]
        parts = []
        for g, game in enumerate(self.cfg.games):
            a, b = max(start, g * n), min(stop, (g + 1) * n)
            if a < b:
                parts.append(self.recorder(game).rows(split, shard, b - a))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def close(self) -> None:
        for r in self.recorders.values():
            r.close()
        self.recorders.clear()


def _shard_maker(cfg_dict: dict, seed: int, frames_per_game: dict, categories: list, k_max: int) -> ShardMaker:
    """A worker's ShardMaker (datagen/jobs.py), from picklable arguments."""
    return ShardMaker(AtariConfig.from_dict(cfg_dict), seed, frames_per_game, categories, k_max)


def generate(out: str, cfg: AtariConfig, frames_per_game: dict, seed: int, shard_size: int = 256,
             workers: int = 1, overwrite: bool = False, progress: bool = True, part: tuple[int, int] | None = None,
             scratch: bool = False) -> str:
    """Record a whole store (or finish an interrupted one); `frames_per_game` maps split -> frames of each game."""
    from .jobs import check_job, write_store

    cfg.validate()
    check_job(frames_per_game, seed, shard_size, workers)
    spec = store_spec(cfg, frames_per_game, seed, shard_size)
    maker = ShardMaker(cfg, seed, dict(frames_per_game), list(spec.categories), spec.k_max)
    try:
        # The first game's env, policy and background before anything is written: a policy file that
        # does not load fails here, not in a worker mid-run.
        maker.recorder(cfg.games[0])
    except BaseException:
        maker.close()
        raise
    recipe = (_shard_maker, (cfg.to_dict(), seed, dict(frames_per_game), list(spec.categories), spec.k_max))
    return write_store(out, spec, maker, recipe, workers=workers, overwrite=overwrite, progress=progress,
                       part=part, scratch=scratch, desc="atari")
