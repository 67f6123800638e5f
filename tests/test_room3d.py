"""3D-Room generator: geometry of the ground truth, object counts and placement, determinism.

Facts checked here come from outside the code under test wherever possible:
- the stored boxes against the instance masks MuJoCo's segmentation pass rendered;
- visibility against a second render of each object alone;
- placement against MuJoCo's own signed geom distances;
- determinism by comparing whole stores written with different workers and shard sizes.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")  # before anything imports mujoco

import numpy as np
import pytest
import zarr

from datagen.config import Room3DConfig
from datagen.room3d import N_FIXED, Room3DRenderer, Scene, frame_rng, sample_scene

REPO = Path(__file__).resolve().parents[1]


def cli(*args, timeout=600):
    """`python -m datagen ARGS`; returns the CompletedProcess."""
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    return subprocess.run(
        [sys.executable, "-m", "datagen", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env,
    )


def make_store(path, *args):
    r = cli("room3d", path, "--quiet", *args)
    assert r.returncode == 0, f"room3d failed ({r.returncode}):\n{r.stderr}"
    return Path(path)


def load(path) -> dict:
    """{split: {array: ndarray}} for every array (the done marks included) of a store."""
    root = zarr.open_group(str(path), mode="r")
    return {s: {k: root[s][k][:] for k in sorted(root[s].array_keys())} for s in sorted(root.group_keys())}


def assert_stores_identical(a, b):
    da, db = load(a), load(b)
    assert sorted(da) == sorted(db), "different splits"
    for split in da:
        assert sorted(da[split]) == sorted(db[split]), f"{split}: different arrays"
        for name, x in da[split].items():
            y = db[split][name]
            assert x.dtype == y.dtype and x.shape == y.shape, f"{split}/{name}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}"
            assert x.tobytes() == y.tobytes(), f"{split}/{name} differs between {a} and {b}"


def mask_bbox(mask: np.ndarray, value: int):
    ii, jj = np.nonzero(mask == value)
    if ii.size == 0:
        return None
    return np.array([jj.min(), ii.min(), jj.max() + 1, ii.max() + 1], float)


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def store128(tmp_path_factory):
    """The paper's image size and object range; enough frames for a few hundred objects per shape."""
    p = tmp_path_factory.mktemp("r128") / "s.zarr"
    return make_store(p, "--split", "train=400", "--image-size", "128", "--shard-size", "64", "--seed", "11")


@pytest.fixture(scope="module")
def store64(tmp_path_factory):
    """Small reference store: 64x64, objects 4-8, two splits, 16-frame shards, one worker."""
    p = tmp_path_factory.mktemp("r64") / "s.zarr"
    return make_store(p, "--split", "train=48", "--split", "val=24", "--image-size", "64", "--shard-size", "16",
                      "--seed", "3", "--workers", "1")


# ------------------------------------------------------------------------------------ 1. geometry


@pytest.mark.parametrize("shape", ["sphere", "cube", "cylinder"])
def test_boxes_match_mask_of_fully_visible_objects(store128, shape):
    root = zarr.open_group(str(store128), mode="r")
    cats = list(root.attrs["categories"])
    assert sorted(cats) == ["cube", "cylinder", "sphere"]
    label = cats.index(shape)
    h, w = root.attrs["image_size"]
    assert (h, w) == (128, 128)
    g = root["train"]
    boxes, labels, vis, counts, masks = g["boxes"][:], g["labels"][:], g["visibility"][:], g["n_objects"][:], g["masks"][:]
    errors = []
    for i in range(len(counts)):
        for k in range(int(counts[i])):
            if labels[i, k] != label or not vis[i, k] >= 0.999:
                continue
            b = boxes[i, k].astype(float)
            if b[0] <= 0 or b[1] <= 0 or b[2] >= w or b[3] >= h:
                continue  # touches the frame edge
            mb = mask_bbox(masks[i], k + 1)
            assert mb is not None, f"frame {i} object {k}: fully visible but no mask pixels"
            errors.append(np.abs(mb - b).max())
    errors = np.array(errors)
    assert errors.size >= 200, f"only {errors.size} fully visible {shape}s; the check needs a few hundred"
    # rasterisation moves each edge by under a pixel; a convention slip (e.g. x_max without +1) shows here
    assert np.median(errors) <= 0.75, f"{shape}: median box error {np.median(errors):.2f} px"
    assert errors.max() <= 1.5, (
        f"{shape}: stored box differs from the mask's bounding box by up to {errors.max():.2f} px "
        f"({(errors > 1.5).sum()} of {errors.size} objects over 1.5 px)"
    )


def test_mask_pixels_lie_inside_their_boxes(store128):
    """Also for partly hidden objects: what is visible of an object lies within its box."""
    g = zarr.open_group(str(store128), mode="r")["train"]
    boxes, counts, masks = g["boxes"][:], g["n_objects"][:], g["masks"][:]
    worst = 0.0
    for i in range(len(counts)):
        for k in range(int(counts[i])):
            mb = mask_bbox(masks[i], k + 1)
            b = boxes[i, k]
            outside = max(b[0] - mb[0], b[1] - mb[1], mb[2] - b[2], mb[3] - b[3])
            worst = max(worst, outside)
    assert worst <= 1.5, f"mask pixels reach {worst:.2f} px outside their object's box"


@pytest.mark.parametrize("which", ["store128", "store64"])
def test_array_contents_and_padding(request, which):
    path = request.getfixturevalue(which)
    root = zarr.open_group(str(path), mode="r")
    a = root.attrs
    h, w = a["image_size"]
    k_max = a["k_max"]
    lo, hi = a["params"]["objects"]
    assert k_max == hi
    n_cats = len(a["categories"])
    min_pix = a["params"]["min_visible_pixels"]
    for split, n in a["splits"].items():
        g = root[split]
        images, masks = g["images"][:], g["masks"][:]
        boxes, labels, vis = g["boxes"][:], g["labels"][:], g["visibility"][:]
        counts, placed = g["n_objects"][:], g["n_placed"][:]
        assert images.shape == (n, h, w, 3) and images.dtype == np.uint8
        assert masks.shape == (n, h, w) and masks.dtype == np.uint8
        assert boxes.shape == (n, k_max, 4) and labels.shape == (n, k_max) and vis.shape == (n, k_max)
        assert (counts >= lo).all() and (counts <= hi).all()
        assert (placed >= counts).all() and (placed <= hi).all()
        for i in range(n):
            c = int(counts[i])
            ids, pix = np.unique(masks[i], return_counts=True)
            ok = (ids == 0) | (ids == 255) | ((ids >= 1) & (ids <= c))
            assert ok.all(), f"{split}[{i}]: mask ids {ids[~ok].tolist()} with n_objects={c}"
            per_id = dict(zip(ids.tolist(), pix.tolist()))
            for k in range(c):
                assert per_id.get(k + 1, 0) >= min_pix, f"{split}[{i}] object {k}: {per_id.get(k + 1, 0)} mask pixels"
            if 255 in per_id:
                assert placed[i] > c, f"{split}[{i}]: pixels of uncounted objects but every placed object counted"
            # real entries
            assert np.isfinite(boxes[i, :c]).all()
            assert (boxes[i, :c, 0] < boxes[i, :c, 2]).all() and (boxes[i, :c, 1] < boxes[i, :c, 3]).all()
            assert (boxes[i, :c, [0, 2]] >= 0).all() and (boxes[i, :c, [0, 2]] <= w).all()
            assert (boxes[i, :c, [1, 3]] >= 0).all() and (boxes[i, :c, [1, 3]] <= h).all()
            assert ((labels[i, :c] >= 0) & (labels[i, :c] < n_cats)).all()
            assert ((vis[i, :c] > 0) & (vis[i, :c] <= 1)).all(), f"{split}[{i}]: visibility {vis[i, :c]}"
            # padding
            assert np.isnan(boxes[i, c:]).all(), f"{split}[{i}]: boxes beyond n_objects are not NaN"
            assert (labels[i, c:] == -1).all(), f"{split}[{i}]: labels beyond n_objects are not -1"
            assert np.isnan(vis[i, c:]).all(), f"{split}[{i}]: visibility beyond n_objects is not NaN"
        # not blank: frames have structure and differ from each other
        assert images.std() > 10
        assert len({images[i].tobytes() for i in range(n)}) == n


@pytest.fixture(scope="module")
def renderer96():
    # the paper's Large range: crowded scenes, so plenty of objects are partly hidden by others
    cfg = Room3DConfig(image_size=96, objects=(18, 24)).validate()
    with Room3DRenderer(cfg) as r:
        yield r


def _alone(scene: Scene, i: int) -> Scene:
    s = slice(i, i + 1)
    return Scene(scene.shapes[s], scene.sizes[s], scene.positions[s], scene.yaws[s], scene.colors[s],
                 scene.wall_floor_sky, scene.camera)


def test_visibility_matches_render_of_object_alone(renderer96):
    """visibility ~ visible pixels / pixels the same object covers when rendered with nothing else.

    Only objects well inside the room are compared (walls can hide the others even when alone). The
    tolerance allows for MuJoCo tessellating spheres and cylinders (a few boundary pixels of small ones).
    """
    r = renderer96
    diffs, occluded = [], []
    for idx in range(100):
        scene = sample_scene(r.cfg, frame_rng(21, 0, idx))
        f = r.frame(scene)
        n = int(f["n_objects"])
        for i in range(len(scene.shapes)):
            solo = r.frame(_alone(scene, i))
            if int(solo["n_objects"]) != 1:
                continue
            # the full frame's object with the same (occlusion-independent) projected box
            k = [k for k in range(n) if np.array_equal(f["boxes"][k], solo["boxes"][0])]
            if not k or np.abs(scene.positions[i, :2]).max() > 1.5:
                continue
            k = k[0]
            alone_px = int((solo["masks"] == 1).sum())
            visible_px = int((f["masks"] == k + 1).sum())
            assert visible_px <= alone_px + 2, "an object shows more pixels among others than alone"
            diffs.append(float(f["visibility"][k]) - visible_px / alone_px)
            occluded.append(visible_px / alone_px < 0.9)
    diffs, occluded = np.array(diffs), np.array(occluded)
    assert diffs.size >= 300 and occluded.sum() >= 40, (diffs.size, occluded.sum())
    assert np.abs(diffs).max() <= 0.12, f"visibility off by up to {np.abs(diffs).max():.3f}"
    assert np.abs(diffs[occluded]).max() <= 0.12, "visibility of partly hidden objects is off"
    assert np.abs(np.median(diffs)) <= 0.02, f"visibility biased by {np.median(diffs):.3f}"


def test_unoccluded_objects_have_visibility_near_one(renderer96):
    r = renderer96
    vis = []
    for idx in range(200):
        scene = sample_scene(r.cfg, frame_rng(22, 0, idx))
        inner = np.flatnonzero(np.abs(scene.positions[:, :2]).max(1) <= 1.5)
        if inner.size == 0:
            continue
        f = r.frame(_alone(scene, int(inner[0])))
        b = f["boxes"][0]
        if int(f["n_objects"]) == 1 and b[0] > 0 and b[1] > 0 and b[2] < 96 and b[3] < 96:
            vis.append(float(f["visibility"][0]))
    vis = np.array(vis)
    assert vis.size >= 100
    assert vis.min() >= 0.88, f"an unoccluded object has visibility {vis.min():.3f}"
    assert np.median(vis) >= 0.98


# ------------------------------------------------------------------------------ 2. counts, placement


@pytest.fixture(scope="module")
def store_2_3(tmp_path_factory):
    p = tmp_path_factory.mktemp("r23") / "s.zarr"
    return make_store(p, "--split", "train=64", "--image-size", "64", "--shard-size", "16", "--objects", "2", "3",
                      "--seed", "5")


@pytest.mark.parametrize("which,lo,hi", [("store64", 4, 8), ("store_2_3", 2, 3), ("store128", 4, 8)])
def test_object_counts_within_range(request, which, lo, hi):
    root = zarr.open_group(str(request.getfixturevalue(which)), mode="r")
    assert root.attrs["params"]["objects"] == [lo, hi]
    assert root.attrs["k_max"] == hi
    seen = set()
    for split in root.attrs["splits"]:
        counts = root[split]["n_objects"][:]
        assert counts.min() >= lo and counts.max() <= hi, f"{split}: n_objects {counts.min()}-{counts.max()}"
        assert root[split]["boxes"].shape[1] == hi
        seen |= set(counts.tolist())
    assert len(seen) >= 2, f"every frame has the same count {seen}: the range is not being sampled"


def _radii(cfg: Room3DConfig, scene: Scene) -> np.ndarray:
    names = np.array(cfg.shapes)[scene.shapes]
    return np.where(names == "cube", scene.sizes[:, 0] * math.sqrt(2), scene.sizes[:, 0])


@pytest.mark.parametrize(
    "cfg",
    [
        Room3DConfig(),
        Room3DConfig(objects=(18, 24)),
        Room3DConfig(objects=(20, 24), shapes=("cube",)),
        Room3DConfig(objects=(2, 3), shapes=("cylinder", "sphere"), size_min=0.3, size_max=0.5, gap=0.2),
    ],
    ids=["small", "large", "cubes-crowded", "custom"],
)
def test_sample_scene_objects_rest_on_floor_apart(cfg):
    cfg.validate()
    inner = cfg.room_half_size - cfg.wall_thickness / 2
    lo, hi = cfg.objects
    ns = set()
    for idx in range(300):
        s = sample_scene(cfg, frame_rng(99, 1, idx))
        n = len(s.shapes)
        ns.add(n)
        assert lo <= n <= hi
        assert s.sizes.shape == (n, 2) and s.positions.shape == (n, 3) and s.yaws.shape == (n,)
        names = np.array(cfg.shapes)[s.shapes]
        assert ((s.sizes[:, 0] >= cfg.size_min) & (s.sizes[:, 0] <= cfg.size_max)).all()
        assert ((s.sizes[:, 1] >= cfg.size_min) & (s.sizes[:, 1] <= cfg.size_max)).all()
        # spheres and cubes: half-height is the radius / half-edge
        assert np.array_equal(s.sizes[names != "cylinder", 1], s.sizes[names != "cylinder", 0])
        # resting on the floor (z = 0): centre at the half-height
        np.testing.assert_allclose(s.positions[:, 2], s.sizes[:, 1], rtol=0, atol=1e-12)
        r = _radii(cfg, s)
        # inside the walls
        assert (np.abs(s.positions[:, :2]).max(1) + r <= inner + 1e-9).all()
        # pairwise footprint discs separated by at least the gap
        d = np.hypot(*(s.positions[:, None, :2] - s.positions[None, :, :2]).transpose(2, 0, 1))
        need = r[:, None] + r[None, :] + cfg.gap
        off = ~np.eye(n, dtype=bool)
        assert (d[off] >= need[off] - 1e-9).all(), f"scene {idx}: objects closer than their radii + gap"
        assert 0 <= s.camera[3] <= 360 and cfg.camera_elevation[0] <= s.camera[4] <= cfg.camera_elevation[1]
    if hi > lo:
        assert len(ns) > 1


def test_placed_geoms_do_not_interpenetrate_per_mujoco():
    """MuJoCo's own signed distances between the posed geoms: objects apart by the gap, on the floor."""
    import mujoco

    cfg = Room3DConfig(image_size=16, objects=(18, 24)).validate()
    fromto = np.zeros(6)
    with Room3DRenderer(cfg) as r:
        m, d = r.model, r.data
        floor = [mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_GEOM, "floor")]
        walls = [mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_GEOM, w) for w in ("wall_n", "wall_s", "wall_e", "wall_w")]
        assert min(floor + walls) >= 0 and max(floor + walls) < N_FIXED
        pair_min, wall_min, floor_err = np.inf, np.inf, 0.0
        for idx in range(40):
            gids = r._pose(sample_scene(cfg, frame_rng(7, 2, idx)))
            mujoco.mj_forward(m, d)
            for a in range(len(gids)):
                floor_err = max(floor_err, abs(mujoco.mj_geomDistance(m, d, int(gids[a]), floor[0], 1.0, fromto)))
                for wg in walls:
                    wall_min = min(wall_min, mujoco.mj_geomDistance(m, d, int(gids[a]), wg, 1.0, fromto))
                for b in range(a + 1, len(gids)):
                    pair_min = min(pair_min, mujoco.mj_geomDistance(m, d, int(gids[a]), int(gids[b]), 1.0, fromto))
    assert pair_min >= cfg.gap - 1e-3, f"two objects are {pair_min:.4f} apart (gap {cfg.gap})"
    assert wall_min >= -1e-6, f"an object reaches {-wall_min:.4f} into a wall"
    assert floor_err <= 1e-6, f"an object floats or sinks by {floor_err:.2e}"


# --------------------------------------------------------------------------------- 3. determinism

_DET_ARGS = ("--split", "train=48", "--split", "val=24", "--image-size", "64", "--seed", "3")


@pytest.mark.parametrize(
    "workers,shard",
    [(2, 16), (1, 8), (2, 8)],
    ids=["2-workers", "shard-8", "2-workers-shard-8"],
)
def test_same_seed_same_bytes_whatever_workers_and_shards(store64, tmp_path, workers, shard):
    other = make_store(tmp_path / "o.zarr", *_DET_ARGS, "--shard-size", shard, "--workers", workers)
    da, db = load(store64), load(other)
    for split in ("train", "val"):
        # shard marks differ in number; every data array must be byte-identical
        da[split].pop("_shards_done"), db[split].pop("_shards_done")
    assert sorted(da) == sorted(db) == ["train", "val"]
    for split in da:
        assert sorted(da[split]) == sorted(db[split])
        for name in da[split]:
            x, y = da[split][name], db[split][name]
            assert x.dtype == y.dtype and x.shape == y.shape
            assert x.tobytes() == y.tobytes(), f"{split}/{name} differs with workers={workers} shard_size={shard}"


def test_same_params_twice_identical_store(store64, tmp_path):
    other = make_store(tmp_path / "again.zarr", *_DET_ARGS, "--shard-size", "16", "--workers", "1")
    assert_stores_identical(store64, other)


def test_parts_merged_equal_the_one_job_store_file_for_file(store64, tmp_path):
    """datagen.parts: 3 jobs each write every 3rd shard into a part store (in any order), `merge` joins
    them; the result is the one-job store, every file byte for byte (metadata included)."""
    parts = [tmp_path / f"part{i}.zarr" for i in range(3)]
    for i in (2, 0, 1):
        make_store(parts[i], *_DET_ARGS, "--shard-size", "16", "--part", f"{i}/3")
    # a part alone is not a store anyone reads
    assert cli("inspect", parts[0]).returncode == 1
    r = cli("merge", tmp_path / "merged.zarr", *parts)
    assert r.returncode == 0, r.stderr
    merged = tmp_path / "merged.zarr"
    files = lambda root: {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}
    a, b = files(store64), files(merged)
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    assert not (tmp_path / "merged.zarr.merging").exists()


def test_merge_refuses_missing_unfinished_or_foreign_parts(tmp_path):
    parts = [tmp_path / f"p{i}.zarr" for i in range(2)]
    for i in range(2):
        make_store(parts[i], "--split", "train=8", "--image-size", "32", "--objects", "1", "2",
                   "--shard-size", "4", "--seed", "5", "--part", f"{i}/2")
    other = make_store(tmp_path / "other.zarr", "--split", "train=8", "--image-size", "32", "--objects", "1", "2",
                       "--shard-size", "4", "--seed", "6", "--part", "1/2")
    out = tmp_path / "m.zarr"
    r = cli("merge", out, parts[0])
    assert r.returncode == 2 and "parts 0..1 of 2 exactly once" in r.stderr
    r = cli("merge", out, parts[0], other)
    assert r.returncode == 2 and "seed" in r.stderr and "differ" in r.stderr
    r = cli("merge", out, parts[0], parts[0])
    assert r.returncode == 2
    r = cli("room3d", tmp_path / "x.zarr", "--split", "train=8", "--part", "2/2")
    assert r.returncode == 2 and "I/N" in r.stderr
    assert not out.exists()
    assert cli("merge", out, *parts).returncode == 0
    r = cli("merge", out, *parts)  # never over a store without --overwrite
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert cli("inspect", out).returncode == 0


def test_other_seed_other_images(store64, tmp_path):
    other = make_store(tmp_path / "seed4.zarr", "--split", "train=48", "--split", "val=24", "--image-size", "64",
                       "--seed", "4", "--shard-size", "16")
    a, b = load(store64), load(other)
    for split in ("train", "val"):
        x, y = a[split]["images"], b[split]["images"]
        same = [i for i in range(len(x)) if np.array_equal(x[i], y[i])]
        assert not same, f"{split}: frames {same} are identical under seeds 3 and 4"


def test_splits_are_not_copies_of_each_other(store64):
    a = load(store64)
    train, val = a["train"]["images"], a["val"]["images"]
    t = {f.tobytes() for f in train}
    assert not any(f.tobytes() in t for f in val), "a val frame also appears in train"


def test_scratch_keeps_a_complete_store_with_the_same_parameters_and_replaces_others(tmp_path):
    args = ("--split", "train=8", "--image-size", "32", "--objects", "1", "2", "--shard-size", "4")
    out = make_store(tmp_path / "s.zarr", *args, "--seed", "5")
    first = (out / "train/images/c/0/0/0/0").stat().st_ino
    assert cli("room3d", out, *args, "--seed", "5").returncode == 2  # a complete store is never redone...
    make_store(out, *args, "--seed", "5", "--scratch")  # ...except as scratch, where it is kept as it is
    assert (out / "train/images/c/0/0/0/0").stat().st_ino == first
    make_store(out, *args, "--seed", "6", "--scratch")  # other parameters: replaced
    import zarr

    assert dict(zarr.open_group(str(out), mode="r").attrs)["seed"] == 6
