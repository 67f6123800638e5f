"""Atari rollouts into the scene store, with RAM boxes filtered for what the frame shows."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("ale_py")
pytest.importorskip("ocatari")

from datagen.atari import (  # noqa: E402
    GameRecorder,
    RamObjects,
    object_reader,
    generate,
    layout,
    make_env,
    support_pixels,
)
from datagen.config import ATARI_GAMES, ATARI_WIDTH, AtariConfig, ConfigError  # noqa: E402
from datagen.store import Store, repeated_frames  # noqa: E402

FAST = dict(background_frames=8, noop_max=4)


@pytest.mark.parametrize("game", sorted(ATARI_GAMES))
def test_every_game_has_its_env_id_frame_size_and_ram_objects(game):
    """The explicit v5 id, the true frame size (AirRaid and Pacman 250 high, Carnival 214, Pooyan 220),
    and OCAtari's RAM reader running 200 steps under numpy 2 without an exception."""
    cfg = AtariConfig(games=(game,))
    env = make_env(game, cfg)
    assert env.spec.id == ATARI_GAMES[game]["env_id"]
    obs, _ = env.reset(seed=0)
    assert obs.shape == (ATARI_GAMES[game]["height"], ATARI_WIDTH, 3)
    ram = object_reader(game)
    rng = np.random.default_rng(0)
    seen = 0
    for _ in range(200):
        obs, _, terminated, truncated, _ = env.step(int(rng.integers(env.action_space.n)))
        seen += len(ram(env.unwrapped.ale.getRAM(), obs))
        if terminated or truncated:
            env.reset()
    env.close()
    assert seen > 0, f"{game}: OCAtari found no object in 200 steps"


def _store(tmp_path, name="a.zarr", seed=0, **kw):
    cfg = AtariConfig(**{**FAST, **kw}).validate()
    out = tmp_path / name
    generate(str(out), cfg, {"train": 40, "test": 30}, seed, shard_size=20, progress=False)
    return Store(out)


def test_same_seed_same_store_and_splits_are_disjoint_by_episode(tmp_path):
    a, b = _store(tmp_path, "a.zarr"), _store(tmp_path, "b.zarr")
    for split in ("train", "test"):
        for name in ("images", "boxes", "labels", "episode", "step", "action"):
            np.testing.assert_array_equal(a.read(split, name, slice(None)), b.read(split, name, slice(None)))
    c = _store(tmp_path, "c.zarr", seed=1)
    assert not np.array_equal(a.read("train", "images", slice(None)), c.read("train", "images", slice(None)))
    # Split by episode: once an episode has left its opening (SpaceInvaders' first ~40 steps are the same
    # still frame in every episode), no frame of test equals a frame of train.
    later = a.read("test", "step", slice(None)) > 48
    train = a.read("train", "images", slice(None)).reshape(40, -1)
    test = a.read("test", "images", slice(None)).reshape(30, -1)[later]
    assert len(test) > 5 and not any((train == t).all(1).any() for t in test)
    # Every episode's steps increase along the store, each by the subsample period, or at the end.
    ep, st = a.read("train", "episode", slice(None)), a.read("train", "step", slice(None))
    for e in np.unique(ep):
        steps = st[ep == e]
        assert (np.diff(steps) > 0).all()
    assert a.attrs["params"]["versions"]["ocatari"] == "2.2.1"


def test_boxes_are_scaled_and_hud_is_never_ground_truth(tmp_path):
    s = _store(tmp_path)
    boxes = s.read("train", "boxes", slice(None))
    n = s.read("train", "n_objects", slice(None))
    assert n.min() > 0
    valid = boxes[~np.isnan(boxes[..., 0])]
    assert (valid >= 0).all() and (valid <= 128).all() and (valid[:, 2] > valid[:, 0]).all()
    assert not any(c.endswith(("Score", "Lives")) for c in s.categories)
    moving = s.read("train", "moving", slice(None))
    labels = s.read("train", "labels", slice(None))
    shield = s.categories.index("SpaceInvaders.Shield")
    assert (moving[labels == shield] == 0).all() and (moving[labels == s.categories.index("SpaceInvaders.Alien")] == 1).all()


def test_box_alignment_on_a_known_sprite():
    """The player's cannon: its RAM box, scaled to the stored frame, covers the cannon's green pixels."""
    cfg = AtariConfig(**FAST)
    env = make_env("SpaceInvaders", cfg)
    obs, _ = env.reset(seed=3)
    for _ in range(10):
        obs, *_ = env.step(0)
    (player,) = [o for o in RamObjects("SpaceInvaders")(env.unwrapped.ale.getRAM(), obs) if o[0] == "Player"]
    env.close()
    _, x, y, w, h = player
    # The cannon's colour (50, 132, 50) in the rows of the player (above the ground line).
    rows, cols = np.nonzero((obs[170:195] == (50, 132, 50)).all(-1))
    assert rows.size > 0
    assert x <= cols.min() and cols.max() < x + w
    assert y <= rows.min() + 170 and rows.max() + 170 < y + h


def test_flicker_filter_drops_an_object_not_drawn():
    """A RAM object at a place where the frame shows only background has no support and is dropped;
    the same place with a sprite drawn in has support."""
    background = np.zeros((210, 160, 3), np.uint8)
    frame = background.copy()
    box = (40, 100, 1, 8)  # a bullet's 1x8 box
    assert support_pixels(frame, background, box, 24) == (0, 8)
    frame[102:106, 40] = (142, 142, 142)
    assert support_pixels(frame, background, box, 24) == (4, 8)
    assert support_pixels(frame, background, (200, 300, 4, 4), 24) == (0, 0)  # outside the frame

    # In real rollouts some RAM bullets are dropped: the flicker the filter is for.
    cfg = AtariConfig(**FAST)
    names, k_max = layout(cfg)
    rec = GameRecorder("SpaceInvaders", cfg, 0, names, k_max)
    env, ram = rec.env, rec.ram
    env.reset(seed=0)
    kept = dropped = 0
    rng = np.random.default_rng(0)
    for _ in range(400):
        obs, _, te, tr, _ = env.step(int(rng.integers(env.action_space.n)))
        for cat, *b in ram(env.unwrapped.ale.getRAM(), obs):
            if cat == "Bullet":
                if support_pixels(obs, rec.background, b, cfg.background_tolerance)[0] >= cfg.min_support_pixels:
                    kept += 1
                else:
                    dropped += 1
        if te or tr:
            env.reset()
    rec.close()
    assert kept > 0 and dropped > 0, (kept, dropped)


def test_joint_store_holds_each_game_in_turn(tmp_path):
    s = _store(tmp_path, games=("SpaceInvaders", "Pooyan"))
    assert s.splits == {"train": 80, "test": 60}
    game = s.read("train", "game", slice(None))
    assert (game[:40] == 0).all() and (game[40:] == 1).all()
    labels = s.read("train", "labels", slice(None))
    names = np.array(s.categories)
    assert all(n.startswith("Pooyan.") for n in names[labels[40:][labels[40:] >= 0]])


def test_bad_input_is_refused_clearly(tmp_path):
    with pytest.raises(ConfigError, match="unknown game 'Pong'"):
        AtariConfig(games=("Pong",)).validate()
    with pytest.raises(ConfigError, match="repeat_tries: must be 0 or more, got -1"):
        AtariConfig(repeat_tries=-1).validate()
    with pytest.raises(ConfigError, match="opening_steps 100 leave nothing of an episode of max_episode_steps 120"):
        AtariConfig(max_episode_steps=120).validate()
    with pytest.raises(ConfigError, match="frame count must be at least 1"):
        generate(str(tmp_path / "z.zarr"), AtariConfig(**FAST), {"train": 0}, 0, progress=False)
    bad = tmp_path / "agent.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="does not load as a TorchScript module"):
        generate(str(tmp_path / "p.zarr"), AtariConfig(policy=str(bad), **FAST), {"train": 4}, 0, progress=False)
    assert not (tmp_path / "p.zarr").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="is not a file"):
        AtariConfig(policy=str(tmp_path / "missing.pt"), **FAST).validate() and generate(
            str(tmp_path / "q.zarr"), AtariConfig(policy=str(tmp_path / "missing.pt"), **FAST), {"train": 4}, 0,
            progress=False)
    p = subprocess.run([sys.executable, "-m", "datagen", "atari", str(tmp_path / "c.zarr"), "--game", "Pong"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "invalid choice: 'Pong'" in p.stderr


def test_a_torchscript_policy_drives_the_agent(tmp_path):
    torch = pytest.importorskip("torch")

    class AlwaysFire(torch.nn.Module):
        def forward(self, frame: torch.Tensor) -> torch.Tensor:
            return torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # FIRE in SpaceInvaders' minimal set

    path = tmp_path / "fire.pt"
    torch.jit.save(torch.jit.script(AlwaysFire()), str(path))
    s = _store(tmp_path, policy=str(path), noop_max=0)
    assert (s.read("train", "action", slice(None)) == 1).all()


def test_riverraid_boxes_come_from_the_frame_and_hold_their_sprites():
    """Riverraid's RAM reader is wrong (README), so its boxes come from the frame: every box lies in the
    playfield and holds pixels of its category's colour; enemies are found, not only the player."""
    from datagen.atari import VisionObjects

    cfg = AtariConfig(games=("Riverraid",), **FAST)
    env = make_env("Riverraid", cfg)
    reader = object_reader("Riverraid")
    assert isinstance(reader, VisionObjects)
    colours = {"Player": [(232, 232, 74)], "Helicopter": [(0, 64, 48), (210, 164, 74)],
               "FuelDepot": [(214, 92, 92), (214, 214, 214)], "Tanker": [(84, 160, 197), (163, 57, 21)]}
    rng = np.random.default_rng(0)
    obs, _ = env.reset(seed=1)
    cats, checked = set(), 0
    for _ in range(300):
        obs, _, terminated, truncated, _ = env.step(int(rng.integers(env.action_space.n)))
        for cat, x, y, w, h in reader(env.unwrapped.ale.getRAM(), obs):
            assert 0 <= y and y + h <= 163, (cat, y, h)  # never in the HUD
            cats.add(cat)
            if cat in colours:
                patch = obs[y : y + h, max(x, 0) : x + w]
                assert any((patch == c).all(-1).any() for c in colours[cat]), (cat, x, y, w, h)
                checked += 1
        if terminated or truncated:
            obs, _ = env.reset()
    env.close()
    assert checked > 100 and "Player" in cats and cats & {"Helicopter", "Tanker", "FuelDepot", "Jet"}, cats


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory):
    """SpaceInvaders in the demo's shape, shrunk: several shards per split, so several episode starts."""
    out = tmp_path_factory.mktemp("repeats") / "si.zarr"
    generate(str(out), AtariConfig(**FAST).validate(), {"train": 96, "val": 32, "test": 32}, 3, shard_size=32,
             progress=False)
    return Store(out)


def test_no_repeated_frames_and_no_frame_in_two_splits(demo_like):
    """Every episode used to open on SpaceInvaders' still start screen (60-75 steps: 15 or more recorded frames
    per shard), and deaths freeze the screen for several recorded steps: 20% of the demo store was
    repeats, and the start screen sat in every split. Openings are skipped and a frame already in its
    shard is dropped; measured at demo size (640 frames) and at 6,000 frames, no repeat is left, so one
    repeat in 50 is the bound here (a chance repeat across shards is possible, a flood is not)."""
    report = repeated_frames(demo_like)
    assert report["overall"]["frames"] == 160
    assert report["overall"]["share"] <= 0.02, report["overall"]
    assert report["across_splits"]["distinct_frames"] == 0, report["across_splits"]
    steps = demo_like.read("train", "step", slice(None))
    assert steps.min() > AtariConfig().opening_steps  # no frame from the opening


def test_an_atari_store_opens_in_xarray_like_a_3d_room_one(demo_like):
    """The Atari generator writes through the same store: every array (the RAM and actions included) has
    named dimensions, frame first (but the writer's per-shard bookkeeping), so xarray reads each split
    whole, with the store's own values."""
    xr = pytest.importorskip("xarray")
    for split in ("train", "test"):
        ds = xr.open_zarr(str(demo_like.path), group=split)
        assert ds["images"].dims == ("frame", "y", "x", "rgb") and ds["boxes"].dims == ("frame", "object", "box")
        data = [name for name in ds.data_vars if not name.startswith("_")]
        assert {"action", "reward", "episode", "visibility"} <= set(data)
        assert all(ds[name].dims[0] == "frame" for name in data) and ds["_shards_done"].dims == ("shard",)
        assert ds.sizes["frame"] == demo_like.n_frames(split)
        for name in data:
            np.testing.assert_array_equal(ds[name].values, demo_like.read(split, name, slice(None)))


def test_a_frozen_screen_is_kept_after_repeat_tries(monkeypatch):
    """A game whose screen never changes cannot fill a shard with new frames: after repeat_tries repeats
    dropped in a row the next one is kept, so the recorder ends (no endless loop)."""
    cfg = AtariConfig(**FAST, opening_steps=0, repeat_tries=3)
    names, k_max = layout(cfg)
    rec = GameRecorder("SpaceInvaders", cfg, 0, names, k_max)
    real_reset, real_step = rec.env.reset, rec.env.step
    still = {}

    def reset(**kw):
        obs, info = real_reset(**kw)
        still["obs"] = obs
        return obs, info

    def step(action):
        _, *rest = real_step(action)
        return (still["obs"], *rest)

    monkeypatch.setattr(rec.env, "reset", reset)
    monkeypatch.setattr(rec.env, "step", step)
    with pytest.warns(UserWarning, match="SpaceInvaders: shard 0 of train keeps a repeated frame after 3"):
        rows = rec.rows("train", 0, 4)
    rec.close()
    assert (rows["images"] == rows["images"][:1]).all()
    assert rec.kept_repeats == 3
    # Each kept repeat follows repeat_tries dropped candidates, one every subsample steps.
    assert set(np.diff(rows["step"])) == {(cfg.repeat_tries + 1) * cfg.subsample}


@pytest.mark.slow
def test_same_store_for_any_worker_count(tmp_path):
    """Dropping repeats depends only on the shard's own episodes: two workers write the same bytes."""
    cfg = AtariConfig(**FAST).validate()
    stores = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}.zarr"
        generate(str(out), cfg, {"train": 64, "test": 32}, 3, shard_size=32, workers=workers, progress=False)
        stores.append(Store(out))
    for split in ("train", "test"):
        for name in ("images", "boxes", "step", "episode"):
            a, b = (s.read(split, name, slice(None)) for s in stores)
            np.testing.assert_array_equal(a, b)
