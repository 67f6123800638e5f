"""3D-Room scenes (paper, appendix E) rendered with MuJoCo, with ground truth from the camera.

One MuJoCo model is built per process with a fixed pool of geoms (K_max of each shape); each scene
re-places, resizes and recolours them, hiding the unused ones. Building a model and a GL context per
scene runs at about 4 scenes/s on a 2-core machine, against about 100 frames/s from one reused model, so
the renderer is created once and reused.

Ground truth per object:
- box: the camera projection of the object's true shape (exact for spheres, the hull of the rims for
  cylinders, the 8 corners for cubes), clipped to the frame;
- mask: MuJoCo's segmentation render (front-most geom per pixel);
- visibility: visible pixels / pixels the object would cover alone, the latter by casting a ray through
  every pixel centre of its box against the shape.
An object counts as ground truth when at least `min_visible_pixels` of its pixels are visible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import GenerationError, Room3DConfig
from .store import MASK_OTHER_OBJECT

N_FIXED = 11  # sky (5 panels), floor, 4 walls, ground outside: these come first in the model
SKY_DISTANCE = 60.0
MAX_REDRAWS = 100  # scenes drawn for one frame before giving up (see Room3DRenderer.sample_frame)


@dataclass
class Scene:
    """One sampled scene: everything the renderer and the ground truth need."""

    shapes: np.ndarray  # (n,) index into cfg.shapes
    sizes: np.ndarray  # (n, 2) radius or half-edge, and half-height (cylinders; else = size)
    positions: np.ndarray  # (n, 3) centre, resting on the floor
    yaws: np.ndarray  # (n,) rotation about the vertical, radians
    colors: np.ndarray  # (n,) index into cfg.object_colors
    wall_floor_sky: np.ndarray  # (3,) indices into cfg.background_colors
    camera: tuple  # (lookat x, lookat y, distance, azimuth, elevation)


def frame_rng(seed: int, split_id: int, index: int) -> np.random.Generator:
    """Every frame has its own stream, so output does not depend on workers, shards or order."""
    return np.random.default_rng(np.random.SeedSequence([seed, split_id, index]))


def sample_scene(cfg: Room3DConfig, rng: np.random.Generator) -> Scene:
    lo, hi = cfg.objects
    n = int(rng.integers(lo, hi + 1))
    for _attempt in range(20):
        scene = _try_place(cfg, rng, n)
        if scene is not None:
            break
    else:  # the capacity check in Room3DConfig.validate makes this very unlikely
        raise GenerationError(
            f"could not place {n} objects without overlap in 20 attempts; lower the object count or size_max"
        )
    shapes, sizes, pos, yaws = scene
    colors = rng.integers(0, len(cfg.object_colors), n)
    wfs = rng.integers(0, len(cfg.background_colors), 3)
    r = cfg.camera_lookat_jitter * math.sqrt(rng.uniform())
    a = rng.uniform(0, 2 * math.pi)
    camera = (
        r * math.cos(a),
        r * math.sin(a),
        rng.uniform(*cfg.camera_distance),
        rng.uniform(*cfg.camera_azimuth),
        rng.uniform(*cfg.camera_elevation),
    )
    return Scene(shapes, sizes, pos, yaws, colors, wfs, camera)


def _try_place(cfg: Room3DConfig, rng: np.random.Generator, n: int):
    shapes = rng.integers(0, len(cfg.shapes), n)
    size = rng.uniform(cfg.size_min, cfg.size_max, n)
    half_h = np.where(
        np.array(cfg.shapes)[shapes] == "cylinder", rng.uniform(cfg.size_min, cfg.size_max, n), size
    )
    yaws = rng.uniform(0, 2 * math.pi, n)
    is_cube = np.array(cfg.shapes)[shapes] == "cube"
    radius = np.where(is_cube, size * math.sqrt(2), size)  # footprint's bounding circle
    pos = np.zeros((n, 3))
    inner = cfg.room_half_size - cfg.wall_thickness / 2
    for i in range(n):
        lim = inner - radius[i] - cfg.gap / 2
        for _ in range(cfg.placement_tries):
            xy = rng.uniform(-lim, lim, 2)
            if i == 0 or np.all(np.hypot(*(pos[:i, :2] - xy).T) >= radius[:i] + radius[i] + cfg.gap):
                break
        else:
            return None
        pos[i, :2] = xy
        pos[i, 2] = half_h[i]  # resting on the floor (z = 0)
    return shapes, np.stack([size, half_h], 1), pos, yaws


def _model_xml(cfg: Room3DConfig) -> str:
    s = cfg.room_half_size
    t = cfg.wall_thickness / 2
    h = cfg.wall_height / 2
    d = SKY_DISTANCE
    fixed = [
        # Sky: five emissive panels facing inward (their outer faces), so flat and always drawn.
        f'<geom name="sky_n" type="box" size="{d} 0.1 {d}" pos="0 {d} 0" material="sky"/>',
        f'<geom name="sky_s" type="box" size="{d} 0.1 {d}" pos="0 {-d} 0" material="sky"/>',
        f'<geom name="sky_e" type="box" size="0.1 {d} {d}" pos="{d} 0 0" material="sky"/>',
        f'<geom name="sky_w" type="box" size="0.1 {d} {d}" pos="{-d} 0 0" material="sky"/>',
        f'<geom name="sky_top" type="box" size="{d} {d} 0.1" pos="0 0 {d}" material="sky"/>',
        f'<geom name="floor" type="box" size="{s + t} {s + t} 0.05" pos="0 0 -0.05"/>',
        f'<geom name="wall_n" type="box" size="{s + t} {t} {h}" pos="0 {s} {h}"/>',
        f'<geom name="wall_s" type="box" size="{s + t} {t} {h}" pos="0 {-s} {h}"/>',
        f'<geom name="wall_e" type="box" size="{t} {s + t} {h}" pos="{s} 0 {h}"/>',
        f'<geom name="wall_w" type="box" size="{t} {s + t} {h}" pos="{-s} 0 {h}"/>',
        # Ground outside the enclosure, so a low camera never looks into the void below the floor.
        f'<geom name="ground" type="box" size="{2 * s} {2 * s} 0.05" pos="0 0 -0.12"/>',
    ]
    assert len(fixed) == N_FIXED
    mj_type = {"sphere": "sphere", "cube": "box", "cylinder": "cylinder"}
    pool = [
        f'<geom name="{shape}{i}" type="{mj_type[shape]}" size="0.1 0.1 0.1" pos="0 0 -100" '
        # a non-trivial pose, or MuJoCo marks the geom as sharing its body's frame and ignores geom_quat
        f'euler="0 0 30" rgba="1 1 1 0"/>'
        for shape in cfg.shapes
        for i in range(cfg.objects[1])
    ]
    n = cfg.image_size
    return f"""<mujoco model="room3d">
  <visual>
    <global offwidth="{n}" offheight="{n}" fovy="{cfg.fovy}"/>
    <quality offsamples="{cfg.antialias_samples}"/>
    <headlight ambient="0.4 0.4 0.4" diffuse="0.5 0.5 0.5" specular="0 0 0"/>
    <map znear="0.001" zfar="1"/>
  </visual>
  <asset><material name="sky" emission="0.6" specular="0"/></asset>
  <worldbody>
    <light pos="1 -1 8" dir="-0.1 0.1 -1" diffuse="0.4 0.4 0.4" specular="0.1 0.1 0.1" castshadow="false"/>
    {''.join(fixed)}
    {''.join(pool)}
  </worldbody>
</mujoco>"""


class Room3DRenderer:
    """Renders scenes into (image, instance mask, ground truth); one per process, reused."""

    def __init__(self, cfg: Room3DConfig):
        import mujoco

        self.mj = mujoco
        self.cfg = cfg
        self.model = mujoco.MjModel.from_xml_string(_model_xml(cfg))
        self.data = mujoco.MjData(self.model)
        n = cfg.image_size
        self.renderer = mujoco.Renderer(self.model, n, n)
        for flag in ("mjRND_SHADOW", "mjRND_REFLECTION", "mjRND_SKYBOX", "mjRND_FOG", "mjRND_HAZE"):
            self.renderer.scene.flags[getattr(mujoco.mjtRndFlag, flag)] = 0  # shadows cost 20x (software GL)
        self.camera = mujoco.MjvCamera()
        self.camera.type = mujoco.mjtCamera.mjCAMERA_FREE
        self.k_pool = cfg.objects[1]

    def close(self) -> None:
        self.renderer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _pose(self, scene: Scene) -> np.ndarray:
        """Moves the geom pool into `scene`; returns the geom id of each object, (n,)."""
        m, cfg = self.model, self.cfg
        m.geom_rgba[N_FIXED:, 3] = 0  # alpha 0: the renderer skips them
        m.geom_pos[N_FIXED:] = (0, 0, -100)
        bg = np.asarray(cfg.background_colors)
        wall, floor, sky = bg[scene.wall_floor_sky]
        m.geom_rgba[0:5, :3] = sky
        m.geom_rgba[5, :3] = floor
        m.geom_rgba[6:10, :3] = wall
        m.geom_rgba[10, :3] = floor
        m.geom_rgba[:N_FIXED, 3] = 1
        used = np.zeros(len(cfg.shapes), int)
        gids = np.empty(len(scene.shapes), int)
        colors = np.asarray(cfg.object_colors)
        for i, s in enumerate(scene.shapes):
            gid = N_FIXED + s * self.k_pool + used[s]
            used[s] += 1
            gids[i] = gid
            r, hh = scene.sizes[i]
            # MuJoCo sizes: sphere (radius), box (half-edges), cylinder (radius, half-height)
            m.geom_size[gid] = {"sphere": (r, 0, 0), "cube": (r, r, r), "cylinder": (r, hh, 0)}[cfg.shapes[s]]
            m.geom_pos[gid] = scene.positions[i]
            y = scene.yaws[i] / 2
            m.geom_quat[gid] = (math.cos(y), 0, 0, math.sin(y))
            m.geom_rgba[gid] = (*colors[scene.colors[i]], 1)
        self.mj.mj_kinematics(m, self.data)
        lx, ly, dist, az, el = scene.camera
        self.camera.lookat[:] = (lx, ly, 0)
        self.camera.distance = dist
        self.camera.azimuth = az
        self.camera.elevation = el
        return gids

    def render(self, scene: Scene):
        """Returns image (H, W, 3) uint8, geom-id map (H, W) int32 (-1 none) and the camera."""
        gids = self._pose(scene)
        r = self.renderer
        r.update_scene(self.data, self.camera)
        r.disable_segmentation_rendering()
        image = r.render()
        r.enable_segmentation_rendering()
        seg = r.render()[..., 0]  # (H, W) geom id, -1 where nothing is drawn
        r.disable_segmentation_rendering()
        cam = self.mj.mjv_averageCamera(r.scene.camera[0], r.scene.camera[1])  # the two eyes' mean
        return image, seg, gids, Camera.from_gl(cam, self.cfg.image_size)

    def sample_frame(self, rng: np.random.Generator) -> dict:
        """A scene from `rng` whose counted objects lie in cfg.objects.

        Occlusion and the frame edge can hide some of the objects placed; such a scene is redrawn (from
        the same stream, so deterministically) until enough objects are visible.
        """
        for _ in range(MAX_REDRAWS):
            frame = self.frame(sample_scene(self.cfg, rng))
            if frame["n_objects"] >= self.cfg.objects[0]:
                return frame
        raise GenerationError(
            f"{MAX_REDRAWS} scenes in a row showed fewer than {self.cfg.objects[0]} visible objects; "
            "lower the object minimum or min_visible_pixels, or move the camera back (camera_distance)"
        )

    def frame(self, scene: Scene) -> dict:
        """One frame with its ground truth, in the store's per-frame layout (see datagen/store.py)."""
        cfg = self.cfg
        image, seg, gids, cam = self.render(scene)
        k_max = cfg.objects[1]
        boxes = np.full((k_max, 4), np.nan, np.float32)
        labels = np.full(k_max, -1, np.int16)
        vis = np.full(k_max, np.nan, np.float32)
        # Mask id of each object (k+1 if counted, MASK_OTHER_OBJECT if not); the last slot is background.
        mask_id = np.zeros(len(gids) + 1, np.uint8)
        # Geom id -> object index (or -1), to turn the segmentation into per-object pixel counts.
        lut = np.full(self.model.ngeom + 1, -1, np.int64)
        lut[gids] = np.arange(len(gids))
        obj_of_pixel = lut[seg]  # seg == -1 picks lut[-1] == -1
        counts = np.bincount(obj_of_pixel[obj_of_pixel >= 0], minlength=len(gids))
        k = 0
        for i in range(len(gids)):
            box = cam.project_box(cfg.shapes[scene.shapes[i]], scene.sizes[i], scene.positions[i], scene.yaws[i])
            visible = counts[i]
            if box is None or visible < cfg.min_visible_pixels:
                mask_id[i] = MASK_OTHER_OBJECT
                continue
            full = cam.covered_pixels(box, cfg.shapes[scene.shapes[i]], scene.sizes[i], scene.positions[i], scene.yaws[i])
            boxes[k] = box
            labels[k] = scene.shapes[i]
            vis[k] = min(1.0, visible / max(full, 1))
            mask_id[i] = k + 1
            k += 1
        return {
            "images": image,
            "masks": mask_id[obj_of_pixel],  # (N, N); obj_of_pixel == -1 picks the background slot
            "boxes": boxes,
            "labels": labels,
            "visibility": vis,
            "n_objects": np.int16(k),
            # what was sampled, including objects not counted: lets anyone rebuild the scene
            "n_placed": np.int16(len(gids)),
            "camera": np.asarray(scene.camera, np.float32),
            "background_colors": scene.wall_floor_sky.astype(np.int16),
        }


@dataclass
class Camera:
    """Pinhole camera matching MuJoCo's GL projection (top row of the image first)."""

    pos: np.ndarray
    forward: np.ndarray
    up: np.ndarray
    right: np.ndarray
    f: float  # focal length in pixels
    size: int

    @classmethod
    def from_gl(cls, gl, size: int) -> "Camera":
        fwd = np.array(gl.forward, float)
        up = np.array(gl.up, float)
        right = np.cross(fwd, up)
        # Symmetric frustum: the top plane at distance `near` is `frustum_top` above the axis.
        f = (size / 2) * gl.frustum_near / gl.frustum_top
        return cls(np.array(gl.pos, float), fwd, up, right, f, size)

    def to_camera(self, p: np.ndarray) -> np.ndarray:
        """World points (..., 3) -> camera coordinates (..., 3): right, up, depth."""
        d = p - self.pos
        return np.stack([d @ self.right, d @ self.up, d @ self.forward], -1)

    def to_pixels(self, pc: np.ndarray) -> np.ndarray:
        c = self.size / 2
        return np.stack([c + self.f * pc[..., 0] / pc[..., 2], c - self.f * pc[..., 1] / pc[..., 2]], -1)

    def project_box(self, shape: str, size, pos, yaw):
        """Box of the object's silhouette, clipped to the frame; None if it is not in front or in frame."""
        r, hh = size
        if shape == "sphere":
            c = self.to_camera(np.asarray(pos))
            if c[2] <= r:
                return None
            x0, x1 = _tangent_range(c[0], c[2], r)
            y0, y1 = _tangent_range(c[1], c[2], r)
            cx = self.size / 2
            box = np.array([cx + self.f * x0, cx - self.f * y1, cx + self.f * x1, cx - self.f * y0])
        else:
            pts = _shape_points(shape, r, hh, np.asarray(pos), yaw)
            pc = self.to_camera(pts)
            if np.any(pc[:, 2] <= 1e-3):
                return None
            uv = self.to_pixels(pc)
            box = np.array([uv[:, 0].min(), uv[:, 1].min(), uv[:, 0].max(), uv[:, 1].max()])
        box = np.clip(box, 0, self.size)
        if box[2] - box[0] <= 0 or box[3] - box[1] <= 0:
            return None
        return box.astype(np.float32)

    def covered_pixels(self, box, shape: str, size, pos, yaw) -> int:
        """Pixels (centres) of `box` whose camera ray hits the shape: its unoccluded coverage."""
        j0, i0 = int(math.floor(box[0])), int(math.floor(box[1]))
        j1, i1 = int(math.ceil(box[2])), int(math.ceil(box[3]))
        jj, ii = np.meshgrid(np.arange(j0, j1) + 0.5, np.arange(i0, i1) + 0.5)
        c = self.size / 2
        # Ray directions in world space for each pixel centre, (P, 3).
        d = (
            self.forward[None]
            + ((jj.ravel() - c) / self.f)[:, None] * self.right[None]
            - ((ii.ravel() - c) / self.f)[:, None] * self.up[None]
        )
        # Into the object's frame: centred, un-yawed.
        cy, sy = math.cos(yaw), math.sin(yaw)
        rot = np.array([[cy, sy, 0], [-sy, cy, 0], [0, 0, 1]])  # world -> object
        o = rot @ (self.pos - np.asarray(pos))
        d = d @ rot.T
        r, hh = size
        if shape == "sphere":
            hit = _ray_sphere(o, d, r)
        elif shape == "cube":
            hit = _ray_box(o, d, np.array([r, r, r]))
        else:
            hit = _ray_cylinder(o, d, r, hh)
        return int(hit.sum())


def _tangent_range(x: float, z: float, r: float) -> tuple[float, float]:
    """Slopes k of the planes x = k z through the eye that touch a sphere at (x, z) of radius r."""
    # (x - k z)^2 = r^2 (1 + k^2)  ->  k^2 (z^2 - r^2) - 2 k x z + (x^2 - r^2) = 0
    a = z * z - r * r
    b = x * z
    disc = math.sqrt(max(b * b - a * (x * x - r * r), 0.0))
    return (b - disc) / a, (b + disc) / a


def _shape_points(shape: str, r: float, hh: float, pos: np.ndarray, yaw: float) -> np.ndarray:
    """Points whose projection hull is the silhouette's hull: cube corners, cylinder rims."""
    if shape == "cube":
        s = np.array([-1.0, 1.0])
        local = np.stack(np.meshgrid(s * r, s * r, s * r), -1).reshape(-1, 3)
    else:  # cylinder: the silhouette's extremes lie on the two rims; 720 points is < 0.01 px off
        t = np.linspace(0, 2 * math.pi, 360, endpoint=False)
        ring = np.stack([r * np.cos(t), r * np.sin(t)], 1)
        local = np.concatenate([np.c_[ring, np.full(360, -hh)], np.c_[ring, np.full(360, hh)]])
    cy, sy = math.cos(yaw), math.sin(yaw)
    rot = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])
    return local @ rot.T + pos


def _ray_sphere(o, d, r):
    # |o + t d|^2 = r^2 has a root with t > 0 (the eye is outside the sphere)
    a = (d * d).sum(1)
    b = d @ o
    c = o @ o - r * r
    return (b * b - a * c >= 0) & (b < 0)


def _ray_box(o, d, half):
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (-half - o) / d
        t2 = (half - o) / d
    tmin = np.nanmax(np.minimum(t1, t2), 1)
    tmax = np.nanmin(np.maximum(t1, t2), 1)
    return (tmax >= tmin) & (tmax > 0)


def _ray_cylinder(o, d, r, hh):
    # side: |(o + t d)_xy| = r with |z| <= hh
    a = d[:, 0] ** 2 + d[:, 1] ** 2
    b = d[:, 0] * o[0] + d[:, 1] * o[1]
    c = o[0] ** 2 + o[1] ** 2 - r * r
    disc = b * b - a * c
    ok = disc >= 0
    with np.errstate(divide="ignore", invalid="ignore"):
        sq = np.sqrt(np.where(ok, disc, 0))
        hits = np.zeros(len(d), bool)
        for t in ((-b - sq) / a, (-b + sq) / a):
            z = o[2] + t * d[:, 2]
            hits |= ok & (t > 0) & (np.abs(z) <= hh)
        # caps: z = +-hh with |xy| <= r
        for zc in (-hh, hh):
            t = (zc - o[2]) / d[:, 2]
            x = o[0] + t * d[:, 0]
            y = o[1] + t * d[:, 1]
            hits |= (t > 0) & (x * x + y * y <= r * r)
    return hits


# ------------------------------------------------------------------------------------ writing a store

EXTRA_ARRAYS = (
    ("n_placed", "int16", (), 0),  # objects in the scene, counted or not
    ("camera", "float32", (5,), np.nan),  # lookat x, lookat y, distance, azimuth, elevation
    ("background_colors", "int16", (3,), -1),  # wall, floor, sky: indices into params.background_colors
)


def store_spec(cfg: Room3DConfig, splits: dict, seed: int, shard_size: int, compressor_level: int = 3):
    from . import __version__
    from .store import StoreSpec

    return StoreSpec(
        generator="room3d",
        generator_version=__version__,
        params=cfg.to_dict(),
        seed=int(seed),
        splits={k: int(v) for k, v in splits.items()},
        image_size=(cfg.image_size, cfg.image_size),
        k_max=cfg.objects[1],
        categories=tuple(cfg.shapes),
        shard_size=int(shard_size),
        with_masks=True,
        compressor_level=compressor_level,
        extra_arrays=EXTRA_ARRAYS,
    )


def split_key(split: str) -> int:
    """A stable number per split name for seeding (not Python's salted hash)."""
    import zlib

    return zlib.crc32(split.encode())


def render_shard(renderer: Room3DRenderer, seed: int, split: str, start: int, stop: int) -> dict:
    """Frames start..stop-1 of a split, stacked per array."""
    frames = [renderer.sample_frame(frame_rng(seed, split_key(split), i)) for i in range(start, stop)]
    return {k: np.stack([f[k] for f in frames]) for k in frames[0]}


class RoomShards:
    """The shard maker of a 3D-Room store (datagen/jobs.py): one renderer, reused for every frame."""

    def __init__(self, cfg_dict: dict, seed: int, renderer: Room3DRenderer | None = None):
        self.renderer = renderer or Room3DRenderer(Room3DConfig.from_dict(cfg_dict))
        self.seed = seed

    def shard(self, split: str, shard: int, start: int, stop: int) -> dict:
        return render_shard(self.renderer, self.seed, split, start, stop)

    def close(self) -> None:
        self.renderer.close()


def generate(out: str, cfg: Room3DConfig, splits: dict, seed: int, shard_size: int = 256, workers: int = 1,
             overwrite: bool = False, progress: bool = True, part: tuple[int, int] | None = None,
             scratch: bool = False) -> str:
    """Render a whole store (or finish an interrupted one); returns its path. With part=(i, n), render
    only part i of n of the shards into a part store (`python -m datagen merge` joins the parts)."""
    from .jobs import check_job, write_store

    cfg.validate()
    check_job(splits, seed, shard_size, workers)
    # One trial frame before anything is written: parameters that pass every check but cannot make
    # the frames asked for (too small an image for min_visible_pixels, say) fail here, not mid-run.
    # With one worker the same renderer then renders the store.
    spec = store_spec(cfg, splits, seed, shard_size)
    renderer = Room3DRenderer(cfg)
    try:
        renderer.sample_frame(frame_rng(seed, split_key(next(iter(splits))), 0))
    except BaseException:
        renderer.close()
        raise
    return write_store(out, spec, RoomShards(cfg.to_dict(), seed, renderer), (RoomShards, (cfg.to_dict(), seed)),
                       workers=workers, overwrite=overwrite, progress=progress, part=part, scratch=scratch,
                       desc="room3d")
