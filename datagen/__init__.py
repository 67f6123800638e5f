"""Dataset generation for the SPACE pipeline: 3D-Room scenes (MuJoCo) into Zarr scene stores."""

__version__ = "0.1.0"
