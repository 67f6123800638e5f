"""The Zarr v3 scene store: schema, shard-by-shard writer, validating reader.

Layout (DESIGN.md, "Datasets"): one store per dataset, one group per split, arrays aligned on axis 0:

    images      uint8   (N, H, W, 3)   RGB, top row first
    boxes       float32 (N, K_max, 4)  x_min, y_min, x_max, y_max in pixels, NaN-padded
    n_objects   int16   (N,)
    labels      int16   (N, K_max)     category id (root attr `categories`), -1 padding
    visibility  float32 (N, K_max)     visible pixels / pixels covered if unoccluded, NaN-padded
    masks       uint8   (N, H, W)      0 background, k+1 for object k of `boxes`, 255 other objects
    + generator-specific per-frame arrays
    _shards_done uint8  (n_shards,)    1 once every array of that shard is written

Images and masks are stored one frame per chunk inside shards of `shard_size` frames: one file per
shard (few files for DVC and object stores) while a random frame is still one small decode.
Per-frame scalars use whole-shard chunks. Each shard is written by exactly one job and marked done last,
so a killed writer leaves unmarked shards that a rerun redoes, and the root attribute `complete` is only
set once every shard of every split is marked.
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

SCHEMA = "space-pipeline/scene-store"
SCHEMA_VERSION = 1
BOX_CONVENTION = (
    "x_min, y_min, x_max, y_max in pixels of the stored image; pixel (row i, column j) covers "
    "[j, j+1) x [i, i+1), so a box around that one pixel is (j, i, j+1, i+1); NaN rows pad to K_max"
)
MASK_OTHER_OBJECT = 255  # pixels of objects that exist but are not counted as ground truth
DONE = "_shards_done"

# name: (dtype, per-frame shape given H, W, K, fill, frame-per-chunk)
_CORE_ARRAYS = {
    "images": ("uint8", lambda h, w, k: (h, w, 3), 0, True),
    "boxes": ("float32", lambda h, w, k: (k, 4), np.nan, False),
    "n_objects": ("int16", lambda h, w, k: (), 0, False),
    "labels": ("int16", lambda h, w, k: (k,), -1, False),
    "visibility": ("float32", lambda h, w, k: (k,), np.nan, False),
}
_MASKS = ("uint8", lambda h, w, k: (h, w), 0, True)


def _location(path) -> tuple:
    """(fsspec filesystem, path on it) for a local path or a URL such as s3://bucket/x.zarr.

    Object stores go through fsspec (s3fs for s3://; endpoint and credentials from the usual AWS_*
    environment variables, e.g. AWS_ENDPOINT_URL for an S3-compatible server)."""
    import fsspec

    fs, p = fsspec.core.url_to_fs(str(path))
    return fs, p


def is_url(path) -> bool:
    return "://" in str(path)


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
        self.root = zarr.open_group(self.path, mode="r+")
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
                raise StoreError(
                    f"{path} exists and is not a Zarr store; move it away or choose another output path"
                )
            attrs = dict(zarr.open_group(str(path), mode="r").attrs)
            if attrs.get("schema") != SCHEMA:
                raise StoreError(
                    f"{path} is a Zarr store of another kind (schema {attrs.get('schema')!r}); not touching it"
                )
            diff = _identity_diff(attrs.get("identity", {}), _jsonable(spec.identity()))
            if overwrite or (scratch and diff):
                fs.rm(where, recursive=True)
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
            a = g[name]
            if value.shape != (stop - start, *a.shape[1:]):
                raise StoreError(f"shard {split}/{shard}: {name} has shape {value.shape}, expected {(stop - start, *a.shape[1:])}")
            a[start:stop] = value
        g[DONE][shard] = 1

    def finish(self) -> None:
        missing = {s: len(self.pending(s)) for s in self.attrs["identity"]["splits"]}
        if any(missing.values()):
            raise StoreError(f"cannot mark {self.path} complete: shards still missing {missing}")
        self.root.attrs["complete"] = True

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
        a = dict(zarr.open_group(str(p), mode="r").attrs)
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
        if overwrite and (out / "zarr.json").exists() and dict(zarr.open_group(str(out), mode="r").attrs).get("schema") == SCHEMA:
            shutil.rmtree(out)
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
    root = zarr.open_group(str(tmp), mode="r+")
    del root.attrs["part"]
    StoreWriter(tmp).finish()
    tmp.rename(out)
    return out


def _create(path, spec: StoreSpec) -> None:
    root = zarr.open_group(str(path), mode="w")
    # `complete` is False until finish(): a reader refuses the store while any shard is missing.
    root.attrs.update(
        _jsonable(
            {
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
        )
    )
    compressors = ZstdCodec(level=spec.compressor_level)
    for split, n in spec.splits.items():
        g = root.create_group(split)
        g.attrs["n_frames"] = int(n)
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
            )
        g.create_array(DONE, shape=(n_shards(n, spec.shard_size),), dtype="uint8", chunks=(1,), fill_value=0)


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


# ----------------------------------------------------------------------------------------------- reading


def validate_store(path: str | Path) -> list[str]:
    """Every way `path` falls short of a complete, readable store; empty when it is valid."""
    fs, where = _location(path)
    if not fs.exists(where):
        return [f"{path} does not exist"]
    if not fs.exists(f"{where}/zarr.json"):
        return [f"{path} is not a Zarr v3 store (no zarr.json)"]
    try:
        root = zarr.open_group(str(path), mode="r")
    except Exception as e:  # noqa: BLE001 - any failure to open is the problem to report
        return [f"{path} cannot be opened as a Zarr group: {e}"]
    a = dict(root.attrs)
    problems = []
    if a.get("schema") != SCHEMA:
        return [f"schema is {a.get('schema')!r}, expected {SCHEMA!r}: not a store written by datagen"]
    if a.get("schema_version") != SCHEMA_VERSION:
        problems.append(
            f"schema_version is {a.get('schema_version')}, this reader understands {SCHEMA_VERSION}; regenerate the store"
        )
    for key in ("generator", "params", "seed", "image_size", "k_max", "categories", "box_convention", "splits"):
        if key not in a:
            problems.append(f"root attribute {key!r} is missing")
    if problems:
        return problems
    h, w = a["image_size"]
    k = a["k_max"]
    for split, n in a["splits"].items():
        if split not in root:
            problems.append(f"split {split!r} is listed in attrs but its group is missing")
            continue
        g = root[split]
        keys = set(g.array_keys())
        for name, (dtype, shape, _fill, _pf) in _CORE_ARRAYS.items():
            if name not in keys:
                problems.append(f"{split}/{name} is missing")
                continue
            arr = g[name]
            want = (n, *shape(h, w, k))
            if arr.shape != want:
                problems.append(f"{split}/{name} has shape {arr.shape}, expected {want}")
            if str(arr.dtype) != dtype:
                problems.append(f"{split}/{name} has dtype {arr.dtype}, expected {dtype}")
        for name in keys - set(_CORE_ARRAYS) - {DONE}:
            if g[name].shape[0] != n:
                problems.append(f"{split}/{name} has {g[name].shape[0]} frames, expected {n}")
        if DONE in keys:
            done = g[DONE][:]
            if not done.all():
                problems.append(
                    f"{split}: {int((done == 0).sum())} of {done.size} shards are not written; the job that made "
                    f"it was interrupted: rerun the same command to finish it"
                )
    if not problems and not a.get("complete"):
        problems.append("the store is not marked complete; rerun the command that made it to finish it")
    return problems


class Store:
    """A validated, read-only scene store."""

    def __init__(self, path: str | Path):
        problems = validate_store(path)
        if problems:
            raise StoreError(f"{path} is not a valid scene store:\n  - " + "\n  - ".join(problems))
        self.path = str(path)
        self.root = zarr.open_group(self.path, mode="r")
        self.attrs = dict(self.root.attrs)
        self.categories = list(self.attrs["categories"])
        self.splits = dict(self.attrs["splits"])
        self._arrays: dict = {}  # (split, name) -> zarr.Array, opened once: reopening costs ~0.5 ms a call

    def split(self, name: str) -> zarr.Group:
        if name not in self.splits:
            raise StoreError(f"split {name!r} is not in {self.path}; it has {', '.join(self.splits)}")
        return self.root[name]

    def read(self, split: str, name: str, index) -> np.ndarray:
        """Frames `index` (an int, a slice or a 1-D array of ints, any order) of one array."""
        arr = self._arrays.get((split, name))
        if arr is None:
            arr = self._arrays[(split, name)] = self.split(split)[name]
        if isinstance(index, (int, np.integer, slice)):
            return arr[index]
        index = np.asarray(index)
        if index.ndim != 1 or not (index.size == 0 or np.issubdtype(index.dtype, np.integer)):
            raise TypeError(f"index must be an int, a slice or a 1-D array of ints, got {index.dtype} {index.shape}")
        return gather(arr, index)


def gather(arr: zarr.Array, index: np.ndarray) -> np.ndarray:
    """Read frames at arbitrary indices concurrently.

    `oindex` on a sharded array reads one chunk after another; issuing every frame's read at once
    lets zarr's event loop overlap the file reads (measured in bench/store_read.py).
    """
    from zarr.core.sync import sync

    aa = arr._async_array

    async def _all():
        return await asyncio.gather(*(aa.getitem((int(i),)) for i in index))

    if len(index) == 0:
        return np.empty((0, *arr.shape[1:]), dtype=arr.dtype)
    return np.stack(sync(_all()))
