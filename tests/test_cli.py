"""`python -m datagen`: refusing bad input before any work, COCO export, inspect, show, --help."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np
import pytest
import zarr
from PIL import Image

from datagen.config import Room3DConfig
from datagen.room3d import store_spec
from datagen.store import StoreWriter

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
SMALL = ("--split", "train=40", "--split", "val=20", "--image-size", "64", "--shard-size", "16", "--seed", "2")


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "datagen", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, env=ENV)


def tree_hash(path: Path) -> str:
    """Every file's relative path and bytes (and a plain file's own bytes)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        h.update(p.relative_to(path).as_posix().encode() if p != path else b".")
        h.update(b"\0" + p.read_bytes() + b"\0")
    dirs = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_dir()) if path.is_dir() else []
    h.update(json.dumps(dirs).encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    p = tmp_path_factory.mktemp("cli") / "s.zarr"
    r = cli("room3d", p, "--quiet", *SMALL)
    assert r.returncode == 0, r.stderr
    return p


def arrays(path, split):
    g = zarr.open_group(str(path), mode="r")[split]
    return {k: g[k][:] for k in g.array_keys()}


# ------------------------------------------------------------------------------------- 5. bad input

# (flags, words the error must contain). Split sizes are large so that any work before the check
# would show as a long run and leave files behind.
BAD = [
    (["--objects", "8", "4"], ["objects", "min 8", "max 4"]),
    (["--objects", "200", "250"], ["objects", "250", "fit"]),
    (["--shapes", "sphere", "pyramid"], ["pyramid", "sphere, cube, cylinder"]),
    (["--size-min", "0"], ["size_min", "above 0"]),
    (["--size-min", "0.5", "--size-max", "0.3"], ["size_min", "size_max"]),
    (["--split", "train=0"], ["train", "at least 1"]),
    (["--split", "train=-5"], ["train", "at least 1"]),
    (["--split", "train=100", "--split", "train=50"], ["twice"]),
    (["--split", "train"], ["NAME=FRAMES"]),
    (["--shard-size", "0"], ["shard_size"]),
    (["--workers", "0"], ["workers"]),
    (["--image-size", "4"], ["image_size"]),
    (["--camera-distance", "2", "3"], ["camera_distance", "inside the room"]),
    (["--object-colors", "#ff00zz"], ["colour"]),
    (["--shapes", "cube", "cube"], ["shapes", "cube"]),
    (["--fovy", "180"], ["fovy"]),
    (["--placement-tries", "0"], ["placement_tries"]),
    (["--min-visible-pixels", "100000"], ["min_visible_pixels"]),
    # passes every check, but objects this small never show 12 pixels: caught by the trial frame
    (["--image-size", "16"], ["visible objects", "min_visible_pixels"]),
    (["--seed", "-1"], ["seed", "non-negative"]),  # numpy's SeedSequence refuses it deep in the renderer
]


def _id(case):
    flags = case.values[0] if hasattr(case, "values") else case[0]
    return " ".join(flags)


@pytest.mark.parametrize("flags,words", BAD, ids=[_id(c) for c in BAD])
def test_bad_input_refused_before_any_work(tmp_path, flags, words):
    out = tmp_path / "new.zarr"
    split = [] if any(f == "--split" for f in flags) else ["--split", "train=100000", "--split", "val=100000"]
    r = cli("room3d", out, "--quiet", *split, *flags, timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr)
    for w in words:
        assert w in r.stderr, f"{w!r} not in stderr:\n{r.stderr}"
    assert "Traceback" not in r.stderr
    assert not out.exists(), "output was created although the input was refused"
    assert list(tmp_path.iterdir()) == []


def test_a_negative_atari_seed_is_refused_before_any_work(tmp_path):
    out = tmp_path / "new.zarr"
    r = cli("atari", out, "--quiet", "--seed", "-1", "--split", "train=100000", timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: seed") and "non-negative" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_complete_store_is_not_overwritten(small, tmp_path):
    before = tree_hash(small)
    r = cli("room3d", small, "--quiet", *SMALL, timeout=120)
    assert r.returncode == 2 and "--overwrite" in r.stderr and "complete" in r.stderr, r.stderr
    # other parameters: still refused, still untouched
    r = cli("room3d", small, "--quiet", *SMALL[:-1], "7", timeout=120)
    assert r.returncode == 2 and "--overwrite" in r.stderr, r.stderr
    assert tree_hash(small) == before, "a refused run changed the existing store"


def test_overwrite_replaces_complete_store(small, tmp_path):
    target = tmp_path / "o.zarr"
    shutil.copytree(small, target)
    old = arrays(target, "train")["images"]
    r = cli("room3d", target, "--quiet", "--overwrite", "--split", "train=20", "--image-size", "64", "--seed", "8")
    assert r.returncode == 0, r.stderr
    root = zarr.open_group(str(target), mode="r")
    assert root.attrs["complete"] is True and root.attrs["seed"] == 8
    assert sorted(root.group_keys()) == ["train"], "groups of the replaced store survived"
    new = root["train"]["images"][:]
    assert new.shape[0] == 20 and not np.array_equal(new, old[:20])


@pytest.fixture()
def unfinished(tmp_path):
    """A store started by the writer with SMALL's parameters, no shard written."""
    cfg = Room3DConfig(image_size=64).validate()
    path = tmp_path / "unfinished.zarr"
    StoreWriter.create_or_resume(path, store_spec(cfg, {"train": 40, "val": 20}, seed=2, shard_size=16))
    return path


@pytest.mark.parametrize(
    "change,word",
    [
        (("--seed", "3"), "seed"),
        (("--objects", "2", "3"), "params"),
        (("--shard-size", "8"), "shard_size"),
        (("--split", "train=41"), "splits"),
    ],
)
def test_unfinished_store_with_other_parameters_is_refused(unfinished, change, word):
    args = list(SMALL)
    if change[0] == "--split":
        args = ["--split", change[1], *SMALL[2:]]  # train=41 instead of train=40
    elif change[0] in args:
        args[args.index(change[0]) + 1] = change[1]
    else:
        args += list(change)
    before = tree_hash(unfinished)
    r = cli("room3d", unfinished, "--quiet", *args, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "unfinished" in r.stderr and word in r.stderr, r.stderr
    assert tree_hash(unfinished) == before


@pytest.mark.parametrize("kind", ["dir", "file", "zarr-of-other-schema"])
def test_path_that_is_not_a_store_is_refused(tmp_path, kind):
    p = tmp_path / "thing"
    if kind == "dir":
        p.mkdir()
        (p / "notes.txt").write_text("keep me")
    elif kind == "file":
        p.write_text("keep me")
    else:
        zarr.open_group(str(p), mode="w").attrs["owner"] = "someone else"
    before = tree_hash(p)
    r = cli("room3d", p, "--quiet", *SMALL, timeout=120)
    assert r.returncode == 2, r.stderr
    assert str(p) in r.stderr and ("not a Zarr store" in r.stderr or "another kind" in r.stderr), r.stderr
    assert tree_hash(p) == before
    if kind != "zarr-of-other-schema":
        # --overwrite replaces stores, never arbitrary files or folders
        r = cli("room3d", p, "--quiet", "--overwrite", *SMALL, timeout=120)
        assert r.returncode == 2 and "not a Zarr store" in r.stderr, r.stderr
        assert tree_hash(p) == before


# ------------------------------------------------------------------------------------------- 6. COCO


@pytest.fixture(scope="module")
def coco_file(small, tmp_path_factory):
    out = tmp_path_factory.mktemp("coco") / "val.json"
    r = cli("coco", small, "--split", "val", "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def test_coco_stdout_equals_file(small, coco_file):
    r = cli("coco", small, "--split", "val")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == json.loads(coco_file.read_text())


def test_coco_loads_and_round_trips(small, coco_file):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(coco_file))
    a = arrays(small, "val")
    counts, boxes, labels = a["n_objects"], a["boxes"], a["labels"]
    cats = zarr.open_group(str(small), mode="r").attrs["categories"]
    assert len(gt.getImgIds()) == 20
    assert len(gt.getAnnIds()) == int(counts.sum())
    assert {c["id"]: c["name"] for c in gt.loadCats(gt.getCatIds())} == {i + 1: n for i, n in enumerate(cats)}
    for img in gt.loadImgs(gt.getImgIds()):
        assert (img["width"], img["height"]) == (64, 64)
    for i in range(20):
        anns = gt.loadAnns(gt.getAnnIds(imgIds=[i]))
        assert len(anns) == counts[i]
        got = np.array([[x, y, x + w, y + h] for x, y, w, h in (an["bbox"] for an in anns)]).reshape(-1, 4)
        np.testing.assert_allclose(got, boxes[i, : counts[i]], rtol=0, atol=1e-4)
        assert [an["category_id"] - 1 for an in anns] == labels[i, : counts[i]].tolist()
        for an in anns:
            assert an["area"] == pytest.approx(an["bbox"][2] * an["bbox"][3])
            assert an["iscrowd"] == 0 and 0 < an["visibility"] <= 1
    assert len({an["id"] for an in gt.dataset["annotations"]}) == len(gt.dataset["annotations"])


def test_coco_ground_truth_as_detections_scores_ap_1(coco_file):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        gt = COCO(str(coco_file))
        dets = [{"image_id": an["image_id"], "category_id": an["category_id"], "bbox": an["bbox"], "score": 1.0}
                for an in gt.dataset["annotations"]]
        ev = COCOeval(gt, gt.loadRes(copy.deepcopy(dets)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0), buf.getvalue()  # AP @ IoU .50:.95
    assert ev.stats[1] == pytest.approx(1.0)  # AP @ .50

    # and the check can fail: shifting every box by half its width loses most matches
    shifted = [{**d, "bbox": [d["bbox"][0] + d["bbox"][2] / 2, *d["bbox"][1:]]} for d in dets]
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(shifted), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] < 0.5


def test_coco_unknown_split(small):
    r = cli("coco", small, "--split", "nope")
    assert r.returncode == 2 and "nope" in r.stderr and "train, val" in r.stderr


# ------------------------------------------------------------------------------------ 7. inspect, show


def test_inspect_text(small):
    r = cli("inspect", small)
    assert r.returncode == 0, r.stderr
    assert re.search(r"\btrain: 40 frames", r.stdout), r.stdout
    assert re.search(r"\bval: 20 frames", r.stdout), r.stdout
    assert "valid, complete room3d store" in r.stdout


def test_inspect_json(small):
    r = cli("inspect", small, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["generator"] == "room3d" and d["seed"] == 2 and d["image_size"] == [64, 64] and d["k_max"] == 8
    assert d["categories"] == ["sphere", "cube", "cylinder"]
    assert {s: v["frames"] for s, v in d["splits"].items()} == {"train": 40, "val": 20}
    for split, v in d["splits"].items():
        a = arrays(small, split)
        c = a["n_objects"]
        assert v["objects_per_frame"]["min"] == c.min() and v["objects_per_frame"]["max"] == c.max()
        assert sum(v["objects_per_category"].values()) == c.sum()
        assert v["arrays"]["images"] == [[len(c), 64, 64, 3], "uint8"]
        assert "_shards_done" not in v["arrays"]
    # the z_scale prior advice: glimpses (sigmoid(z_scale) of the frame) the size of the median object's
    # longer box side in the train split, read here from the store's boxes directly
    b = arrays(small, "train")["boxes"].reshape(-1, 4)
    b = b[~np.isnan(b[:, 0])]
    side = np.median(np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) / 64)
    z = d["z_scale_prior"]
    assert z["split_boxes"] == len(b) and z["side_median"] == pytest.approx(side, abs=1e-4)
    assert 1 / (1 + np.exp(-z["z_scale_prior_mean"])) == pytest.approx(side, abs=1e-3)
    assert z["side_p10"] <= z["side_median"] <= z["side_p90"]
    assert f"--set model.z_scale_prior_mean={z['z_scale_prior_mean']:.2f}" in cli("inspect", small).stdout
    # each side's median: the sigmoid of its logit is the median width (height) as a share of the frame
    for key, lo, hi in (("width_logit_median", 0, 2), ("height_logit_median", 1, 3)):
        assert 1 / (1 + np.exp(-z[key])) == pytest.approx(np.median((b[:, hi] - b[:, lo]) / 64), abs=1e-3)
    # the grid advice: every grid SPACE takes at 64 pixels, coarse to fine, left-over shares falling
    g = d["grid"]
    assert [x["grid_size"] for x in g["grids"]] == [2, 4, 8, 16]
    assert [x["sharing"] for x in g["grids"]] == sorted((x["sharing"] for x in g["grids"]), reverse=True)
    assert f"--set model.grid_size={g['advised']}" in cli("inspect", small).stdout


def test_grid_advice_counts_the_objects_left_without_a_cell():
    """Frames drawn by hand on a 64-pixel canvas: at 4x4 (16-pixel cells) the first frame's two objects
    centred at (4, 4) and (12, 12) share cell (0, 0), its third at (40, 40) is alone; at 8x8 all three
    have cells of their own. The second frame's two objects share at every grid up to 16x16 (both
    centred in pixel 20-23). So 4x4 leaves 1 of 3 and 1 of 2 over: a share of 2 of 5, a count error of
    (1/3 + 1/2) / 2; 8x8 leaves 1 of 5."""
    from datagen.__main__ import grid_advice

    nan = [np.nan] * 4
    boxes = np.array([[[2, 2, 6, 6], [10, 10, 14, 14], [38, 38, 42, 42]],
                      [[20, 20, 22, 22], [21, 21, 23, 23], nan]], dtype=np.float32)  # (N, K, 4) x0 y0 x1 y1
    g = {x["grid_size"]: x for x in grid_advice(boxes, 64)["grids"]}
    assert g[4]["sharing"] == pytest.approx(2 / 5, abs=1e-4)
    assert g[4]["count_error_floor"] == pytest.approx((1 / 3 + 1 / 2) / 2, abs=1e-4)
    assert g[8]["sharing"] == pytest.approx(1 / 5, abs=1e-4) and g[16]["sharing"] == pytest.approx(1 / 5, abs=1e-4)
    assert grid_advice(boxes, 64)["advised"] == 16  # nothing reaches 2%: the finest grid
    assert grid_advice(np.full((2, 3, 4), np.nan), 64) is None


def test_box_cells_are_the_row_major_cells_of_the_box_centres():
    """Hand-placed boxes on a 64-high, 128-wide frame with a 4x4 grid (cells 16 high, 32 wide): a centre at
    (x 40, y 8) is row 0, column 1; one at (x 127.5, y 63.5) is the last cell; the frame's far corner itself
    still belongs to it; NaN padding has no cell."""
    from datagen.coco import box_cells

    boxes = np.array([[36, 4, 44, 12], [127, 63, 128, 64], [128, 64, 128, 64], [np.nan] * 4])  # (K, 4) xyxy
    assert box_cells(boxes, (64, 128), 4).tolist() == [0 * 4 + 1, 15, 15, -1]
    assert box_cells(boxes[None], (64, 128), 4).shape == (1, 4)  # (N, K) in, (N, K) out
    assert int(box_cells(boxes[0], 128, 2)) == 0  # a square 128-pixel frame: (40, 8) is in the first cell


def test_inspect_into_a_closed_pipe_stops_quietly(small):
    """`inspect S | head -2`: the reader is gone before the summary is written (closed here before the
    child writes anything, so the broken pipe is certain): no BrokenPipeError traceback, status 141 as
    for a command stopped by SIGPIPE."""
    p = subprocess.Popen([sys.executable, "-m", "datagen", "inspect", str(small)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd=REPO, env=ENV)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 141, err
    assert err == "", err


def test_inspect_missing_path(tmp_path):
    r = cli("inspect", tmp_path / "absent.zarr")
    assert r.returncode == 1 and "does not exist" in r.stderr


def test_show_writes_png_of_expected_size_and_frames(small, tmp_path):
    out = tmp_path / "sheet.png"
    r = cli("show", small, "--split", "val", "--frames", "5", "0", "3", "--scale", "1", "--columns", "2", "--out", out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    im = Image.open(out)
    assert im.format == "PNG"
    # 2 columns x 2 rows of 64x64 tiles, 2 px padding, 12 px caption under each row
    assert im.size == (2 * (64 + 2) + 2, 2 * (64 + 2 + 12) + 2)
    sheet = np.asarray(im.convert("RGB"))
    images = arrays(small, "val")["images"]
    for j, frame in enumerate([5, 0, 3]):
        r_, c = divmod(j, 2)
        x0, y0 = 2 + c * 66, 2 + r_ * 78
        tile = sheet[y0 : y0 + 64, x0 : x0 + 64]
        same = (tile == images[frame]).all(-1).mean()
        assert same > 0.7, f"tile {j} does not show val[{frame}] ({same:.2f} of pixels match)"
        others = [f for f in range(20) if f != frame]
        assert same > max((tile == images[f]).all(-1).mean() for f in others)


def test_show_default_sheet(small, tmp_path):
    out = tmp_path / "d.png"
    r = cli("show", small, "--out", out)  # train, 16 random frames, scale 2, 8 columns
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (8 * (128 + 2) + 2, 2 * (128 + 2 + 12) + 2)


@pytest.mark.parametrize("args,word", [(["--frames", "20"], "outside"), (["--split", "test"], "train, val")])
def test_show_bad_arguments(small, tmp_path, args, word):
    out = tmp_path / "x.png"
    r = cli("show", small, "--split", "val", *args, "--out", out) if args[0] != "--split" else cli(
        "show", small, *args, "--out", out)
    assert r.returncode == 2 and word in r.stderr, r.stderr
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--count", "--columns", "--scale"])
def test_show_zero_count_columns_scale_are_refused(small, tmp_path, flag):
    out = tmp_path / "z.png"
    r = cli("show", small, flag, "0", "--out", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert not out.exists()


@pytest.mark.parametrize("sub", [[], ["room3d"], ["inspect"], ["coco"], ["show"]])
def test_help(sub):
    r = cli(*sub, "--help", timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: python -m datagen")
    if sub == ["room3d"]:
        for flag in ("--objects", "--shapes", "--split", "--seed", "--workers", "--shard-size", "--overwrite"):
            assert flag in r.stdout
    if not sub:
        for name in ("room3d", "inspect", "coco", "show"):
            assert name in r.stdout


def test_generator_settings_as_flags_read_back_as_the_same_settings():
    """The pipeline passes params.yaml's generator settings through `config_argv`; datagen's own parser
    reads them back into the same dataclass (flag names, tuples, colour triples)."""
    import dataclasses

    from datagen.__main__ import _config_from_args, build_parser, config_argv
    from datagen.config import AtariConfig, Room3DConfig

    room = {"objects": [2, 3], "size_max": 0.25, "shapes": ["cube", "sphere"], "camera_distance": [6.5, 8],
            "object_colors": [[1.0, 0.0, 0.0], [0.0, 0.5, 1.0]], "antialias_samples": 2}
    atari = {"frameskip": 3, "sticky_actions": 0.0, "policy": "random", "noop_max": 7}
    for command, cls, params in (("room3d", Room3DConfig, room), ("atari", AtariConfig, atari)):
        ns = build_parser().parse_args([command, "OUT.zarr", *config_argv(params)])
        got = dataclasses.asdict(_config_from_args(cls, ns))
        for key, value in params.items():
            want = [list(v) if isinstance(v, list) else v for v in value] if isinstance(value, list) else value
            have = [list(v) if isinstance(v, tuple) else v for v in got[key]] if isinstance(got[key], tuple) else got[key]
            assert have == want, (command, key, have, want)
