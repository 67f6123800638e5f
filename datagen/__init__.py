"""Dataset generation for the SPACE pipeline: 3D-Room scenes (MuJoCo) into Zarr scene stores."""

import os

# MuJoCo picks its GL backend when first imported: render offscreen through EGL unless told otherwise
# (Mesa's software renderer on a CPU machine, the GPU's driver on a GPU machine).
os.environ.setdefault("MUJOCO_GL", "egl")

__version__ = "0.1.0"
