"""The Zarr v3 scene store: schema, shard-by-shard writer, validating reader.

The contract: all that `validate_store` checks and all that any reader (Store, space.data, coco, evaluate,
show) relies on. A store written by another program to it is read like one written here.

Root group attributes (required):
    schema          "space-pipeline/scene-store"
    schema_version  1
    complete        true (false while a writer is still at work)
    generator       str; "atari" stores also need params.games (list of game names) and the arrays
                    `moving` and `game` below
    params          dict of the generator's parameters
    seed            int
    image_size      [H, W]
    k_max           int, K_max below
    categories      [str, ...]: category id c is categories[c]
    box_convention  str (BOX_CONVENTION)
    splits          {split name: N frames}
(written here too, not required: generator_version, mask_convention, identity (what a resumed run compares),
and each split group's `n_frames`; readers take a split's frame count from the arrays, images.shape[0].)

One group per split, arrays aligned on axis 0 (N frames):

    images      uint8   (N, H, W, 3)   RGB, top row first
    boxes       float32 (N, K_max, 4)  x_min, y_min, x_max, y_max in pixels, NaN-padded
    n_objects   int16   (N,)
    labels      int16   (N, K_max)     category id (root attr `categories`), -1 padding
    visibility  float32 (N, K_max)     visible pixels / pixels covered if unoccluded, NaN-padded
    masks       uint8   (N, H, W)      optional: 0 background, k+1 for object k of `boxes`, 255 other objects
    + generator-specific per-frame arrays (atari: moving uint8 (N, K_max), game int16 (N,), ...)
    _shards_done uint8  (n_shards,)    optional: 1 once every array of that shard is written

Rows k < n_objects of boxes, labels and visibility are the frame's objects (finite boxes, labels in
[0, len(categories))); the rows after them are padding. Every chunk (or shard) file of every array is
stored, those equal to the fill value too (zarr: open the arrays with config={"write_empty_chunks": True}),
so a missing file always means a damaged store, never frames of fill values; readers raise StoreError.

Here, images and masks are stored one frame per chunk inside shards of `shard_size` frames: one file per
shard (few files for DVC and object stores) while a random frame is still one small decode. Per-frame
scalars use whole-shard chunks. Chunks are zstd frames with a content checksum, so damage is found when
decoded (validate_store(..., check="full")). Each shard is written by exactly one job and marked done
last, so a killed writer leaves unmarked shards that a rerun redoes, and the root attribute `complete` is
only set once every shard of every split is marked. Creating a store's metadata survives a kill at any
instant too (see _create): a rerun finishes it.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.core.sync import sync

SCHEMA = "space-pipeline/scene-store"
SCHEMA_VERSION = 1
BOX_CONVENTION = (
    "x_min, y_min, x_max, y_max in pixels of the stored image; pixel (row i, column j) covers "
    "[j, j+1) x [i, i+1), so a box around that one pixel is (j, i, j+1, i+1); NaN rows pad to K_max"
)
MASK_OTHER_OBJECT = 255  # pixels of objects that exist but are not counted as ground truth
DONE = "_shards_done"
CREATING = "creating"  # root attribute of a store whose metadata is being written in place (object stores)
# Every chunk file is written, also one equal to the fill value: a missing file is then always damage.
WRITE_CONFIG = {"write_empty_chunks": True}
REGENERATE = "regenerate it: rerun the command that made it with --overwrite"
# How much validate_store checks, cheapest first (see its docstring).
CHECKS = ("metadata", "files", "shards", "full")

# name: (dtype, per-frame shape given H, W, K, fill, frame-per-chunk)
_CORE_ARRAYS = {
    "images": ("uint8", lambda h, w, k: (h, w, 3), 0, True),
    "boxes": ("float32", lambda h, w, k: (k, 4), np.nan, False),
    "n_objects": ("int16", lambda h, w, k: (), 0, False),
    "labels": ("int16", lambda h, w, k: (k,), -1, False),
    "visibility": ("float32", lambda h, w, k: (k,), np.nan, False),
}
_MASKS = ("uint8", lambda h, w, k: (h, w), 0, True)
# Arrays and params that a generator's own readers need (space/evaluate.py's Atari scores).
_GENERATOR_ARRAYS = {
    "atari": {"moving": ("uint8", lambda h, w, k: (k,)), "game": ("int16", lambda h, w, k: ())},
}
_GENERATOR_PARAMS = {"atari": ("games",)}
# Dimension names after the first axis ("frame"), so xarray reads every array of a split group as one
# Dataset: equal names are equal sizes (y and x: the frame; object: k_max). Arrays not named here (a
# generator's extras, per frame) get NAME_0, NAME_1, ...
DIMENSIONS = {
    "images": ("y", "x", "rgb"),
    "masks": ("y", "x"),
    "boxes": ("object", "box"),  # box: x_min, y_min, x_max, y_max
    "labels": ("object",),
    "visibility": ("object",),
    "moving": ("object",),
    "camera": ("camera_param",),  # room3d: lookat x, lookat y, distance, azimuth, elevation
    "background_colors": ("wall_floor_sky",),  # room3d
}


def _open_group(path, mode: str) -> zarr.Group:
    """The store's root as its files say it is: never through the consolidated metadata that a finished store
    carries for other readers (xarray), which would still list a group or array whose files are gone."""
    return zarr.open_group(str(path), mode=mode, use_consolidated=False)


def consolidate(location) -> None:
    """Every array's metadata copied into the root document of a finished Zarr store (one read opens it)."""
    with warnings.catch_warnings():  # zarr notes that v3's spec has no consolidated metadata yet
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(str(location))


def dimension_names(name: str, ndim: int) -> tuple:
    """The names of an array's axes in a store: "frame", then DIMENSIONS' (or the array's own)."""
    if name == DONE:
        return ("shard",)
    rest = DIMENSIONS.get(name, tuple(f"{name}_{i}" for i in range(ndim - 1)))
    return ("frame", *rest)


def _location(path) -> tuple:
    """(fsspec filesystem, path on it) for a local path or a URL such as s3://bucket/x.zarr.

    Object stores go through fsspec (s3fs for s3://; endpoint and credentials from the usual AWS_*
    environment variables, e.g. AWS_ENDPOINT_URL for an S3-compatible server)."""
    import fsspec

    fs, p = fsspec.core.url_to_fs(str(path))
    return fs, p


def is_url(path) -> bool:
    return "://" in str(path)


def _is_local(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _identity_diff(old: dict, new: dict) -> list:
    """The identity fields (StoreSpec.identity) in which two stores differ."""
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


class StoreError(Exception):
    """A store is missing, incomplete, of another schema, or would be overwritten."""


@dataclass(frozen=True)
class StoreSpec:
    """What a generator is about to write; compared field by field when a run resumes."""

    generator: str
    generator_version: str
    params: dict  # every generator parameter, JSON-ready
    seed: int
    splits: dict  # split name -> number of frames
    image_size: tuple  # (H, W)
    k_max: int
    categories: tuple
    shard_size: int
    with_masks: bool
    compressor_level: int = 3
    extra_arrays: tuple = ()  # ((name, dtype, per-frame shape, fill), ...)

    def identity(self) -> dict:
        return {
            "generator": self.generator,
            "generator_version": self.generator_version,
            "params": self.params,
            "seed": self.seed,
            "splits": dict(self.splits),
            "image_size": list(self.image_size),
            "k_max": self.k_max,
            "shard_size": self.shard_size,
        }


def n_shards(n_frames: int, shard_size: int) -> int:
    return -(-n_frames // shard_size)


def _array_specs(spec: StoreSpec) -> dict:
    h, w = spec.image_size
    out = {name: (dt, shape(h, w, spec.k_max), fill, per_frame) for name, (dt, shape, fill, per_frame) in _CORE_ARRAYS.items()}
    if spec.with_masks:
        dt, shape, fill, per_frame = _MASKS
        out["masks"] = (dt, shape(h, w, spec.k_max), fill, per_frame)
    for name, dt, shape, fill in spec.extra_arrays:
        out[name] = (dt, tuple(shape), fill, False)
    return out


class StoreWriter:
    """Creates a store, or reopens one with the same identity to finish it."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.root = _open_group(self.path, "r+")
        self.attrs = dict(self.root.attrs)

    @classmethod
    def create_or_resume(cls, path: str | Path, spec: StoreSpec, overwrite: bool = False,
                         scratch: bool = False) -> "StoreWriter":
        """scratch: `path` is a staging location the pipeline owns (workflow/rules/datagen.smk): a store
        there with the same parameters is finished or, complete, kept; one with other parameters is
        replaced."""
        fs, where = _location(path)
        if fs.exists(where):
            if not fs.exists(f"{where}/zarr.json"):
                if fs.isdir(where) and not fs.ls(where):  # an empty folder: nothing there to lose
                    _create(path, spec)
                    return cls(path)
                raise StoreError(
                    f"{path} exists and is not a Zarr store; move it away or choose another output path"
                )
            bad = _node_problem(fs, where, path, "zarr.json", "group")
            if bad:
                raise StoreError(f"{bad.removesuffix(REGENERATE)}move it away or choose another output path")
            root = _open_group(str(path), "r")
            attrs = dict(root.attrs)
            if _creation_unfinished(root, attrs, spec):
                _remove(path)  # it holds no frames yet: make it again from the start
                _create(path, spec)
                return cls(path)
            if attrs.get("schema") != SCHEMA:
                raise StoreError(
                    f"{path} is a Zarr store of another kind (schema {attrs.get('schema')!r}); not touching it"
                )
            diff = _identity_diff(attrs.get("identity", {}), _jsonable(spec.identity()))
            if overwrite or (scratch and diff):
                _remove(path)
            elif scratch:
                return cls(path)  # the same store: finish what is missing (nothing, when complete)
            elif attrs.get("complete"):
                raise StoreError(
                    f"{path} is already a complete store; pass --overwrite to replace it, or choose another path"
                )
            else:
                if diff:
                    raise StoreError(
                        f"{path} is an unfinished store made with other parameters ({', '.join(diff)} differ); "
                        f"rerun with the parameters it was started with, pass --overwrite, or choose another path"
                    )
                missing = _missing_metadata(root, attrs, spec)
                if missing:
                    raise StoreError(
                        f"{path} is an unfinished store that lacks {', '.join(missing[:3])}"
                        f"{' ...' if len(missing) > 3 else ''} although shards were written: it is damaged; "
                        f"pass --overwrite to make it again"
                    )
                return cls(path)  # resume: same identity, unfinished shards will be redone
        _create(path, spec)
        return cls(path)

    def shard_bounds(self, split: str, shard: int) -> tuple[int, int]:
        size = self.attrs["identity"]["shard_size"]
        n = self.attrs["identity"]["splits"][split]
        return shard * size, min(n, (shard + 1) * size)

    def pending(self, split: str) -> list[int]:
        done = self.root[split][DONE][:]
        return [int(i) for i in np.flatnonzero(done == 0)]

    def write_shard(self, split: str, shard: int, arrays: dict) -> None:
        """Write every array of one shard, then mark it done (the mark is the last write)."""
        start, stop = self.shard_bounds(split, shard)
        g = self.root[split]
        names = set(arrays)
        expected = {k for k in g.array_keys() if k != DONE}
        if names != expected:
            raise StoreError(f"shard {split}/{shard}: arrays {sorted(names)} do not match the store's {sorted(expected)}")
        for name, value in arrays.items():
            # every chunk file is written, also one that equals the fill value: a missing file is damage
            a = g[name].with_config(WRITE_CONFIG)
            if value.shape != (stop - start, *a.shape[1:]):
                raise StoreError(f"shard {split}/{shard}: {name} has shape {value.shape}, expected {(stop - start, *a.shape[1:])}")
            a[start:stop] = value
        g[DONE][shard] = 1

    def finish(self) -> None:
        missing = {s: len(self.pending(s)) for s in self.attrs["identity"]["splits"]}
        if any(missing.values()):
            raise StoreError(f"cannot mark {self.path} complete: shards still missing {missing}")
        self.root.attrs["complete"] = True
        # Every array's metadata in the root document: one read opens the store (one round trip on S3),
        # and xarray.open_zarr finds it. Nothing's metadata changes after this, so it cannot go stale.
        consolidate(self.path)

    def part_tasks(self, part: tuple[int, int]) -> list:
        """The (split, shard) tasks of part (i, n): every n-th shard of the whole store, from the i-th."""
        ident = self.attrs["identity"]
        every = [(s, k) for s, n in ident["splits"].items() for k in range(n_shards(n, ident["shard_size"]))]
        return every[part[0] :: part[1]]

    def finish_part(self, part: tuple[int, int]) -> None:
        """Mark this store as part i of n, its own shards all written (never complete on its own)."""
        left = [t for t in self.part_tasks(part) if t[1] in set(self.pending(t[0]))]
        if left:
            raise StoreError(f"cannot mark {self.path} as part {part[0]}/{part[1]} done: {len(left)} shards missing")
        self.root.attrs["part"] = {"index": part[0], "of": part[1], "done": True}


def parse_part(text: str) -> tuple[int, int]:
    """'2/8' -> (2, 8): part 2 of 8, counted from 0."""
    i, sep, n = str(text).partition("/")
    try:
        part = (int(i), int(n))
    except ValueError:
        part = None
    if not sep or part is None or not (part[1] >= 1 and 0 <= part[0] < part[1]):
        raise StoreError(f"a part is I/N with 0 <= I < N (part I of N, counted from 0), e.g. 0/4; got {text!r}")
    return part


def merge_parts(out: str | Path, parts: list, overwrite: bool = False) -> Path:
    """Merge part stores (each written with --part I/N) into one complete store at `out`.

    Every part has the whole store's metadata and only its own shards' files, so merging copies part 0
    and then the chunk files of the others, byte for byte: the result equals the store one job would
    have written. It is assembled beside `out` and renamed into place only when complete, so an
    interrupted merge leaves no store that looks finished; the parts are left as they are."""
    if is_url(out) or any(is_url(p) for p in parts):
        raise StoreError("merge works on a filesystem (local or shared); copy the parts there first")
    out = Path(out)
    parts = [Path(p) for p in parts]
    if not parts:
        raise StoreError("merge: give the part stores to merge")
    infos = []
    for p in parts:
        if not (p / "zarr.json").exists():
            raise StoreError(f"{p} is not a Zarr store; give the part stores written with --part I/N")
        a = dict(_open_group(str(p), "r").attrs)
        if a.get("schema") != SCHEMA:
            raise StoreError(f"{p} is a Zarr store of another kind (schema {a.get('schema')!r})")
        part = a.get("part")
        if not part:
            raise StoreError(f"{p} is not a part store (no 'part' attribute); write parts with --part I/N")
        if not part.get("done"):
            raise StoreError(f"{p} (part {part['index']}/{part['of']}) is unfinished; rerun its command to finish it")
        infos.append((p, a, part))
    ident = infos[0][1]["identity"]
    for p, a, _ in infos[1:]:
        if a["identity"] != ident:
            diff = _identity_diff(ident, a["identity"])
            raise StoreError(f"{p} was made with other parameters than {infos[0][0]} ({', '.join(diff)} differ)")
    n = infos[0][2]["of"]
    have = sorted(part["index"] for _, _, part in infos)
    if any(part["of"] != n for _, _, part in infos) or have != list(range(n)):
        raise StoreError(f"merge needs parts 0..{n - 1} of {n} exactly once each; got parts {have}")
    if out.exists():
        if overwrite and (out / "zarr.json").exists() and dict(_open_group(str(out), "r").attrs).get("schema") == SCHEMA:
            _remove(out)
        else:
            raise StoreError(f"{out} exists; pass --overwrite to replace a store there, or choose another path")
    tmp = out.with_name(out.name + ".merging")
    if tmp.exists():
        shutil.rmtree(tmp)  # a merge that was interrupted: redo it from the parts
    shutil.copytree(infos[0][0], tmp)  # every part holds the whole store's metadata
    for p, _, _ in infos[1:]:
        for f in p.rglob("*"):
            rel = f.relative_to(p)
            if f.is_file() and "c" in rel.parts[:-1]:  # chunk and shard files only; metadata is part 0's
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, tmp / rel)
    root = _open_group(str(tmp), "r+")
    del root.attrs["part"]
    StoreWriter(tmp).finish()
    tmp.rename(out)
    return out


# ---------------------------------------------------------------------------------------------- creating


def _create(path, spec: StoreSpec, in_place: bool | None = None) -> None:
    """Write a new store's metadata (root, split groups, empty arrays) so that a kill at any instant leaves
    either nothing or a store that StoreWriter.create_or_resume finishes.

    On a local filesystem it is written into a sibling folder and renamed into place, which is atomic.
    An object store has no rename (in_place, the default there): the root is written first, marked
    `creating`, the mark is cleared last, and create_or_resume makes a store still marked so again."""
    fs, where = _location(path)
    if in_place is None:
        in_place = not _is_local(fs)
    if in_place:
        _write_metadata(str(path), spec, creating=True)
        del _open_group(str(path), "r+").attrs[CREATING]
        return
    out = Path(where)
    tmp = out.with_name(out.name + ".creating")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a creation that was killed
    _write_metadata(str(tmp), spec, creating=False)
    if out.is_dir():
        out.rmdir()  # an empty folder (create_or_resume checked): the name must be free for the rename
    tmp.rename(out)


def _write_metadata(location: str, spec: StoreSpec, creating: bool) -> None:
    # `complete` is False until finish(): a reader refuses the store while any shard is missing.
    attrs = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "generator": spec.generator,
        "generator_version": spec.generator_version,
        "params": spec.params,
        "seed": spec.seed,
        "image_size": list(spec.image_size),
        "k_max": spec.k_max,
        "categories": list(spec.categories),
        "box_convention": BOX_CONVENTION,
        "mask_convention": f"0 background, k+1 object k of boxes, {MASK_OTHER_OBJECT} objects not counted",
        "splits": dict(spec.splits),
        "identity": spec.identity(),
        "complete": False,
    }
    if creating:
        attrs[CREATING] = True
    # One write for the root with all its attributes: no instant where it exists without them.
    root = zarr.create_group(location, attributes=_jsonable(attrs))
    # checksum: a chunk whose bytes changed fails to decode instead of reading as other pixels
    compressors = ZstdCodec(level=spec.compressor_level, checksum=True)
    for split, n in spec.splits.items():
        g = root.create_group(split, attributes={"n_frames": int(n)})
        s = min(spec.shard_size, n)
        for name, (dtype, frame_shape, fill, per_frame) in _array_specs(spec).items():
            shape = (n, *frame_shape)
            shard_shape = (s, *frame_shape)
            chunk_shape = (1, *frame_shape) if per_frame else shard_shape
            g.create_array(
                name,
                shape=shape,
                dtype=dtype,
                chunks=chunk_shape,
                shards=shard_shape if per_frame else None,
                fill_value=fill,
                compressors=compressors,
                dimension_names=dimension_names(name, len(shape)),
            )
        g.create_array(DONE, shape=(n_shards(n, spec.shard_size),), dtype="uint8", chunks=(1,), fill_value=0,
                       dimension_names=dimension_names(DONE, 1))


def _remove(path) -> None:
    """Delete a store so that a kill midway leaves nothing a rerun would take for a store to keep."""
    fs, where = _location(path)
    if _is_local(fs):
        p = Path(where)
        aside = p.with_name(p.name + ".removing")
        if aside.exists():
            shutil.rmtree(aside)  # left by a removal that was killed
        p.rename(aside)  # atomic: the store is there whole, or not at all
        shutil.rmtree(aside)
        return
    # An object store deletes file by file: first mark the root (a rerun then makes the store again,
    # see _creation_unfinished), and delete the root last.
    root_key = f"{where}/zarr.json"
    if fs.exists(root_key):
        root = _open_group(str(path), "r+")
        if dict(root.attrs).get("schema") == SCHEMA:
            root.attrs.update({CREATING: True, "complete": False})
    rest = [f for f in fs.find(where) if f.rstrip("/") != root_key]
    if rest:
        fs.rm(rest)
    fs.rm(where, recursive=True)


def _missing_metadata(root: zarr.Group, attrs: dict, spec: StoreSpec) -> list:
    """The split groups and arrays of `spec` that the store at `root` lacks."""
    missing = []
    for split in attrs.get("splits") or spec.splits:
        if split not in root:
            missing.append(split)
            continue
        have = set(root[split].array_keys())
        missing += [f"{split}/{name}" for name in (*_array_specs(spec), DONE) if name not in have]
    return missing


def _creation_unfinished(root: zarr.Group, attrs: dict, spec: StoreSpec) -> bool:
    """Whether the store at `root` is one whose creation was killed, so that it holds no frames yet."""
    if not attrs:
        # an empty group: an older writer, killed between writing its root and the root's attributes
        return not list(root.members())
    if attrs.get("schema") != SCHEMA:
        return False
    if attrs.get(CREATING):
        return True
    if attrs.get("complete"):
        return False
    # An older writer, killed while it made the arrays: no shard can have been written yet.
    if not _missing_metadata(root, attrs, spec):
        return False
    for split in root.group_keys():
        g = root[split]
        if DONE in g.array_keys() and g[DONE][:].any():
            return False
    return True


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


# ------------------------------------------------------------------------------------------- chunk files


def _blocks(arr: zarr.Array) -> tuple[int, tuple]:
    """(frames per stored file along axis 0, the grid of stored files): shards, or chunks if unsharded."""
    block = arr.shards or arr.chunks
    return block[0], tuple(-(-s // b) for s, b in zip(arr.shape, block))


def _block_keys(arr: zarr.Array, i: int) -> list[str]:
    """The store keys of the files that hold block i of the frames (one file, unless a store written
    elsewhere also cuts the frames into chunks)."""
    _, grid = _blocks(arr)
    encoding = arr.metadata.chunk_key_encoding
    return [f"{arr.path}/{encoding.encode_chunk_key((i, *rest))}"
            for rest in itertools.product(*(range(g) for g in grid[1:]))]


def _frames_of(arr: zarr.Array, i: int) -> str:
    b = _blocks(arr)[0]
    return f"{i * b}-{min(arr.shape[0], (i + 1) * b) - 1}"


def _listed(arr: zarr.Array) -> set:
    async def keys():
        return {k async for k in arr.store_path.store.list_prefix(f"{arr.path}/")}

    return sync(keys())


def _missing_blocks(arr: zarr.Array) -> list[int]:
    """Blocks of frames with a file missing, from one listing of the array's files."""
    have = _listed(arr)
    return [i for i in range(_blocks(arr)[1][0]) if any(k not in have for k in _block_keys(arr, i))]


def _require_files(arr: zarr.Array, frames: np.ndarray, present: set, label: str) -> None:
    """Raise StoreError if a file holding any of `frames` is missing: zarr would read it as fill values.

    `present` holds the (array, block) pairs already seen to exist, so each file is asked about once."""
    n = arr.shape[0]
    frames = np.asarray(frames, dtype=np.int64)
    frames = frames[(frames >= -n) & (frames < n)] % max(n, 1)  # out of range: zarr's IndexError says so
    b = _blocks(arr)[0]
    todo = [int(i) for i in np.unique(frames // b) if (arr.path, int(i)) not in present]
    if not todo:
        return
    keys = {i: _block_keys(arr, i) for i in todo}
    store = arr.store_path.store

    async def exists():
        # The first byte of each file, not store.exists: an object store's client may answer that from a
        # cached listing made before the file went; a read asks the store itself.
        from zarr.abc.store import RangeByteRequest
        from zarr.core.buffer import default_buffer_prototype

        first = RangeByteRequest(0, 1)
        got = await asyncio.gather(*(store.get(k, default_buffer_prototype(), byte_range=first)
                                     for i in todo for k in keys[i]))
        return [b is not None for b in got]

    found = iter(sync(exists()))
    for i in todo:
        gone = [k for k in keys[i] if not next(found)]
        if gone:
            asked = frames[frames // b == i]
            raise StoreError(
                f"{label}: frame {int(asked[0])} is missing from the store (file {gone[0]}, frames "
                f"{_frames_of(arr, i)}, is gone), so it would read as zarr's fill value; the store is damaged: "
                f"{REGENERATE}"
            )
        present.add((arr.path, i))


def _read_frames(arr: zarr.Array, index: np.ndarray) -> np.ndarray:
    """Frames at arbitrary indices, read concurrently (no checks)."""
    aa = arr._async_array

    async def _all():
        return await asyncio.gather(*(aa.getitem((int(i),)) for i in index))

    if len(index) == 0:
        return np.empty((0, *arr.shape[1:]), dtype=arr.dtype)
    return np.stack(sync(_all()))


def _damaged(label: str, what: str, e: Exception) -> StoreError:
    return StoreError(f"{label}: {what} cannot be read ({type(e).__name__}: {str(e)[:200]}); "
                      f"the store is damaged: {REGENERATE}")


def _show(frames) -> str:
    """'frame 5', 'frames 4, 5', 'frames 0, 1, 2, 3, 4 ... (10 frames)'."""
    frames = [int(f) for f in frames]
    return (("frames " if len(frames) > 1 else "frame ") + ", ".join(map(str, frames[:5]))
            + (f" ... ({len(frames)} frames)" if len(frames) > 5 else ""))


# ----------------------------------------------------------------------------------------------- reading


def validate_store(path: str | Path, check: str = "shards") -> list[str]:
    """Every way `path` falls short of a complete, readable store (the contract in the module docstring);
    empty when it is valid. `check` says how far to look, each level adding to the one before:

      metadata  attributes, split groups, arrays, their shapes and dtypes, done marks, `complete`
      files     every chunk (shard) file that a complete store has exists: one listing per array
      shards    the last frame of every file decodes (a shard's checksummed index is at its end, so a
                truncated shard fails here), and n_objects, boxes and labels agree on every frame
      full      every frame of every array decodes (zstd checksums find changed bytes)

    Store() checks `files`; `python -m datagen inspect` checks `shards`, `full` with --full."""
    if check not in CHECKS:
        raise ValueError(f"check must be one of {', '.join(CHECKS)}, got {check!r}")
    problems, root, a = _check_metadata(path)
    if problems or check == "metadata":
        return problems
    arrays = [(split, name, root[split][name]) for split in a["splits"]
              for name in sorted(root[split].array_keys()) if name != DONE]
    for split, name, arr in arrays:
        gone = _missing_blocks(arr)
        if gone:
            problems.append(
                f"{split}/{name}: {len(gone)} of {_blocks(arr)[1][0]} chunk files are missing (frames "
                f"{', '.join(_frames_of(arr, i) for i in gone[:3])}{' ...' if len(gone) > 3 else ''}), which "
                f"would read as fill values; the store is damaged: {REGENERATE}"
            )
    if problems or check == "files":
        return problems
    for split, name, arr in arrays:
        b, grid = _blocks(arr)
        last = np.array([min(arr.shape[0], (i + 1) * b) - 1 for i in range(grid[0])])
        try:
            _read_frames(arr, last)
        except Exception:  # noqa: BLE001 - find which files, then say so
            for i, f in enumerate(last):
                try:
                    _read_frames(arr, [f])
                except Exception as e:  # noqa: BLE001
                    problems.append(str(_damaged(f"{split}/{name}", f"file {_block_keys(arr, i)[0]} (frames "
                                                 f"{_frames_of(arr, i)})", e)))
    if problems:
        return problems
    for split in a["splits"]:
        problems += _check_objects(root[split], split, a["k_max"], len(a["categories"]))
    if problems or check == "shards":
        return problems
    for split, name, arr in arrays:
        b, grid = _blocks(arr)
        for i in range(grid[0]):
            try:
                arr[i * b : (i + 1) * b]
            except Exception as e:  # noqa: BLE001
                problems.append(str(_damaged(f"{split}/{name}", f"file {_block_keys(arr, i)[0]} (frames "
                                             f"{_frames_of(arr, i)})", e)))
    return problems


def _node_problem(fs, where: str, path, rel: str, kind: str | None = None) -> str | None:
    """What is wrong with the Zarr metadata file `rel` (e.g. "train/images/zarr.json") of the store at
    `path`, or None when it is a JSON object of a Zarr v3 node (of `kind`, "group" or "array", if given).
    zarr itself fails on a damaged one with a bare JSONDecodeError or an unrelated TypeError."""
    import json

    name = f"{str(path).rstrip('/')}/{rel}"
    try:
        meta = json.loads(fs.cat_file(f"{where}/{rel}"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        return f"{name} is not valid JSON ({e}): the store's metadata is damaged; {REGENERATE}"
    node = meta.get("node_type") if isinstance(meta, dict) else None
    if node not in ("group", "array") or meta.get("zarr_format") != 3 or (kind and node != kind):
        return (f"{name} does not hold a Zarr v3 {kind or 'group or array'}'s metadata (it holds "
                f"{_shorten(meta)}): the store's metadata is damaged; {REGENERATE}")
    return None


def _shorten(v, limit: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _damaged_metadata(fs, where: str, path, splits) -> list[str]:
    """The damaged metadata files of the split groups and their arrays: zarr names none of them."""
    problems = []
    for split in splits:
        rel = f"{split}/zarr.json"
        if not fs.exists(f"{where}/{rel}"):
            continue  # a missing group is reported as such
        bad = _node_problem(fs, where, path, rel, "group")
        if bad:
            problems.append(bad)
            continue
        for member in sorted(fs.ls(f"{where}/{split}", detail=False)):
            rel = f"{split}/{member.rstrip('/').rsplit('/', 1)[-1]}/zarr.json"
            bad = _node_problem(fs, where, path, rel) if fs.exists(f"{where}/{rel}") else None
            if bad:
                problems.append(bad)
    return problems


def _check_metadata(path) -> tuple[list, zarr.Group | None, dict]:
    fs, where = _location(path)
    if not fs.exists(where):
        return [f"{path} does not exist"], None, {}
    if not fs.exists(f"{where}/zarr.json"):
        return [f"{path} is not a Zarr v3 store (no zarr.json)"], None, {}
    bad = _node_problem(fs, where, path, "zarr.json", "group")
    if bad:
        return [bad], None, {}
    try:
        root = _open_group(str(path), "r")
    except Exception as e:  # noqa: BLE001 - any failure to open is the problem to report
        return [f"{path} cannot be opened as a Zarr group: {e}"], None, {}
    try:
        return _check_layout(root, dict(root.attrs))
    except Exception as e:  # noqa: BLE001 - zarr could not read a member's metadata: find and name the file
        splits = dict(root.attrs).get("splits")
        damaged = _damaged_metadata(fs, where, path, [k for k in splits if isinstance(k, str)]
                                    if isinstance(splits, dict) else [])
        return damaged or [f"{path}: the metadata of its groups or arrays cannot be read ({type(e).__name__}: "
                           f"{e}); {REGENERATE}"], None, {}


def _check_layout(root: zarr.Group, a: dict) -> tuple[list, zarr.Group | None, dict]:
    """_check_metadata's checks once the root group is open."""
    problems = []
    if a.get("schema") != SCHEMA:
        return [f"schema is {a.get('schema')!r}, expected {SCHEMA!r}: not a store written by datagen"], root, a
    if a.get("schema_version") != SCHEMA_VERSION:
        problems.append(
            f"schema_version is {a.get('schema_version')}, this reader understands {SCHEMA_VERSION}; regenerate the store"
        )
    for key in ("generator", "params", "seed", "image_size", "k_max", "categories", "box_convention", "splits"):
        if key not in a:
            problems.append(f"root attribute {key!r} is missing")
    if problems:
        return problems, root, a
    problems += _check_attr_types(a)
    if problems:
        return problems, root, a
    h, w = a["image_size"]
    k = a["k_max"]
    for split, n in a["splits"].items():
        if split not in root:
            problems.append(f"split {split!r} is listed in attrs but its group is missing")
            continue
        g = root[split]
        keys = set(g.array_keys())
        wanted = {name: (dtype, shape) for name, (dtype, shape, _fill, _pf) in _CORE_ARRAYS.items()}
        wanted.update(_GENERATOR_ARRAYS.get(a["generator"], {}))
        if "masks" in keys:
            wanted["masks"] = _MASKS[:2]
        for name, (dtype, shape) in wanted.items():
            if name not in keys:
                problems.append(f"{split}/{name} is missing")
                continue
            arr = g[name]
            want = (n, *shape(h, w, k))
            if arr.shape != want:
                problems.append(f"{split}/{name} has shape {arr.shape}, expected {want}")
            if str(arr.dtype) != dtype:
                problems.append(f"{split}/{name} has dtype {arr.dtype}, expected {dtype}")
        for name in keys - set(wanted) - {DONE}:
            if len(g[name].shape) == 0 or g[name].shape[0] != n:
                problems.append(f"{split}/{name} has {g[name].shape[:1]} frames, expected {n}")
        if DONE in keys:
            done = g[DONE][:]
            if not done.all():
                problems.append(
                    f"{split}: {int((done == 0).sum())} of {done.size} shards are not written; the job that made "
                    f"it was interrupted: rerun the same command to finish it"
                )
    if not problems and a.get(CREATING):
        problems.append("the store's creation was interrupted; rerun the command that made it to finish it")
    if not problems and not a.get("complete"):
        problems.append("the store is not marked complete; rerun the command that made it to finish it")
    return problems, root, a


def _check_attr_types(a: dict) -> list:
    """The root attributes that readers use have the types they expect."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if not isinstance(a["generator"], str):
        return [f"root attribute generator is {a['generator']!r}, expected a name"]
    problems = []
    size = a["image_size"]
    if not (isinstance(size, list) and len(size) == 2 and all(is_int(v) and v > 0 for v in size)):
        problems.append(f"root attribute image_size is {size!r}, expected [H, W] (two positive integers)")
    if not (is_int(a["k_max"]) and a["k_max"] >= 0):
        problems.append(f"root attribute k_max is {a['k_max']!r}, expected an integer >= 0")
    cats = a["categories"]
    if not (isinstance(cats, list) and all(isinstance(c, str) for c in cats)):
        problems.append(f"root attribute categories is {cats!r}, expected a list of names")
    splits = a["splits"]
    if not (isinstance(splits, dict) and splits and all(is_int(n) and n >= 0 for n in splits.values())):
        problems.append(f"root attribute splits is {splits!r}, expected {{split name: frames, ...}}")
    if not isinstance(a["params"], dict):
        problems.append(f"root attribute params is a {type(a['params']).__name__}, expected a mapping")
    else:
        for key in _GENERATOR_PARAMS.get(a["generator"], ()):
            if key not in a["params"]:
                problems.append(f"root attribute params has no {key!r}, which {a['generator']} stores need")
    return problems


def _check_objects(g: zarr.Group, split: str, k: int, n_categories: int) -> list:
    """n_objects, boxes and labels agree: rows below n_objects are objects, the rest padding."""
    n = g["n_objects"][:].astype(np.int64)
    boxes, labels = g["boxes"][:], g["labels"][:]
    problems = []
    bad = np.flatnonzero((n < 0) | (n > k))
    if bad.size:
        return [f"{split}/n_objects: {_show(bad)} have counts outside 0..{k} (k_max)"]
    obj = np.arange(k)[None, :] < n[:, None]  # (N, K): row is an object
    rows_ok = np.where(obj, np.isfinite(boxes).all(-1), np.isnan(boxes).all(-1))
    bad = np.flatnonzero(~rows_ok.all(-1))
    if bad.size:
        problems.append(f"{split}/boxes: {_show(bad)}: the rows below n_objects must be finite boxes "
                        f"and the rest NaN padding")
    rows_ok = np.where(obj, (labels >= 0) & (labels < n_categories), labels == -1)
    bad = np.flatnonzero(~rows_ok.all(-1))
    if bad.size:
        problems.append(f"{split}/labels: {_show(bad)}: the rows below n_objects must be category ids "
                        f"0..{n_categories - 1} and the rest -1")
    return problems


class Store:
    """A validated, read-only scene store. Reads never return fill values for a missing file: they raise
    StoreError, as they do for a file that does not decode."""

    def __init__(self, path: str | Path, check: str = "files"):
        problems = validate_store(path, check)
        if problems:
            raise StoreError(f"{path} is not a valid scene store:\n  - " + "\n  - ".join(problems))
        self.path = str(path)
        self.root = _open_group(self.path, "r")
        self.attrs = dict(self.root.attrs)
        self.categories = list(self.attrs["categories"])
        self.splits = dict(self.attrs["splits"])
        self._arrays: dict = {}  # (split, name) -> zarr.Array, opened once: reopening costs ~0.5 ms a call
        self._present: set = set()  # (array path, block) whose files were seen: each is asked about once

    def split(self, name: str) -> zarr.Group:
        if name not in self.splits:
            raise StoreError(f"split {name!r} is not in {self.path}; it has {', '.join(self.splits)}")
        return self.root[name]

    def n_frames(self, split: str) -> int:
        """Frames in a split, from its arrays (the validator checks they all agree)."""
        return int(self.array(split, "images").shape[0])

    def array(self, split: str, name: str) -> zarr.Array:
        arr = self._arrays.get((split, name))
        if arr is None:
            g = self.split(split)
            if name not in g.array_keys():
                raise StoreError(f"{self.path}: split {split!r} has no array {name!r}; "
                                 f"it has {', '.join(sorted(k for k in g.array_keys() if k != DONE))}")
            arr = self._arrays[(split, name)] = g[name]
        return arr

    def read(self, split: str, name: str, index) -> np.ndarray:
        """Frames `index` (an int, a slice or a 1-D array of ints, any order) of one array."""
        arr = self.array(split, name)
        label = f"{self.path}: {split}/{name}"
        if isinstance(index, (int, np.integer, slice)):
            frames = np.arange(arr.shape[0])[index] if isinstance(index, slice) else np.array([index])
            _require_files(arr, frames, self._present, label)
            try:
                return arr[index]
            except (IndexError, TypeError):
                raise
            except Exception as e:  # noqa: BLE001 - a chunk that does not decode
                raise _damaged(label, _show(np.atleast_1d(frames)), e) from e
        index = np.asarray(index)
        if index.ndim != 1 or not (index.size == 0 or np.issubdtype(index.dtype, np.integer)):
            raise TypeError(f"index must be an int, a slice or a 1-D array of ints, got {index.dtype} {index.shape}")
        return _gather(arr, index, self._present, label)


def gather(arr: zarr.Array, index: np.ndarray) -> np.ndarray:
    """Read frames at arbitrary indices concurrently; StoreError for a missing or damaged file.

    `oindex` on a sharded array reads one chunk after another; issuing every frame's read at once
    lets zarr's event loop overlap the file reads (measured in bench/store_read.py).
    """
    return _gather(arr, np.asarray(index), set(), f"{arr.store_path.store}: {arr.path}")


def _gather(arr: zarr.Array, index: np.ndarray, present: set, label: str) -> np.ndarray:
    _require_files(arr, index, present, label)
    try:
        return _read_frames(arr, index)
    except (IndexError, TypeError):
        raise
    except Exception as e:  # noqa: BLE001 - a chunk that does not decode
        raise _damaged(label, _show(index), e) from e


# ------------------------------------------------------------------------------------------ repeated frames


def repeated_frames(store, examples: int = 5) -> dict:
    """Frames whose image bytes repeat an earlier frame of the store, per split, overall and across splits.

    `store` is a Store or a path. Frames are taken in store order: the splits in the order of the root
    attribute `splits`, each from frame 0 up; two frames are the same when their `images` bytes are
    (compared by blake2b digests; read shard by shard). Returns a JSON-ready dict:

        {"splits": {SPLIT: {"frames": int,                 # frames in the split
                            "repeated": int,               # its frames equal to an earlier frame of the
                                                           # store (earlier in it, or in an earlier split)
                            "share": float,                # repeated / frames (0.0 for no frames)
                            "repeated_within_split": int}, # its frames equal to an earlier frame of it
                    ...},
         "overall": {"frames": int, "distinct": int,       # distinct = frames - repeated
                     "repeated": int, "share": float},     # sums over the splits; share = repeated / frames
         "across_splits": {"distinct_frames": int,         # distinct images found in two or more splits
                           "examples": [[[SPLIT, INDEX], [SPLIT, INDEX], ...], ...]}}
                           # up to `examples` of those images in store order, each the first
                           # (split, index) of it in every split that holds it

    E.g. train = [A, B, A], val = [B, C, C]: train repeated 1 (within 1), val repeated 2 (within 1),
    overall 6 frames, 3 distinct, 3 repeated; across_splits 1 image: [[["train", 1], ["val", 0]]].
    A missing or damaged file raises StoreError."""
    if not isinstance(store, Store):
        store = Store(store)
    first: dict = {}  # digest -> {split: first index in that split}, splits in store order
    per_split = {}
    for split in store.splits:
        arr = store.array(split, "images")
        n, b = arr.shape[0], _blocks(arr)[0]
        repeated = within = 0
        for start in range(0, n, b):
            for j, frame in enumerate(store.read(split, "images", slice(start, min(n, start + b)))):
                digest = hashlib.blake2b(frame.tobytes(), digest_size=16).digest()
                seen = first.setdefault(digest, {})
                repeated += bool(seen)
                within += split in seen
                seen.setdefault(split, start + j)
        per_split[split] = {"frames": int(n), "repeated": repeated, "share": repeated / n if n else 0.0,
                            "repeated_within_split": within}
    total = sum(s["frames"] for s in per_split.values())
    repeated = sum(s["repeated"] for s in per_split.values())
    shared = [seen for seen in first.values() if len(seen) > 1]
    return {
        "splits": per_split,
        "overall": {"frames": total, "distinct": total - repeated, "repeated": repeated,
                    "share": repeated / total if total else 0.0},
        "across_splits": {"distinct_frames": len(shared),
                          "examples": [[[s, i] for s, i in seen.items()] for seen in shared[:examples]]},
    }
