"""PyTorch access to the project's Zarr scene stores (datagen/store.py)."""

from __future__ import annotations

import numpy as np
import torch

from datagen.store import Store, StoreError


class StoreDataset(torch.utils.data.Dataset):
    """Frames of one split as float tensors (3, N, N) in [0, 1].

    `__getitems__` reads a whole minibatch in one concurrent call, which the DataLoader uses when it is
    given a batch sampler; single items work too.
    """

    def __init__(self, path: str, split: str = "train", image_size: int | None = None):
        self.store = Store(path)  # validates the schema, says what is wrong otherwise
        self.split = split
        self.n = self.store.n_frames(split)  # from the arrays: the one contract validate_store checks
        size = tuple(self.store.attrs["image_size"])
        if size[0] != size[1]:
            raise StoreError(f"{path} holds {size[0]}x{size[1]} frames; SPACE takes square frames: use a store of "
                             f"square frames")
        if image_size is not None and size != (image_size, image_size):
            raise StoreError(
                f"{path} holds {size[0]}x{size[1]} frames but the model expects {image_size}x{image_size}; "
                f"set model.image_size to {size[0]} or use a store of {image_size}x{image_size} frames"
            )
        self.image_size = size[0]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._to_tensor(self.store.read(self.split, "images", int(i))[None])[0]

    def __getitems__(self, indices) -> torch.Tensor:
        return self._to_tensor(self.store.read(self.split, "images", np.asarray(indices)))

    @staticmethod
    def _to_tensor(images: np.ndarray) -> torch.Tensor:
        # (B, N, N, 3) uint8 -> (B, 3, N, N) float in [0, 1]
        return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)


def collate_batch(batch):
    """`__getitems__` already returns the stacked batch."""
    return batch if isinstance(batch, torch.Tensor) else torch.stack(batch)


class StepBatchSampler(torch.utils.data.Sampler):
    """Shuffled minibatches as a pure function of the global step, so a resumed run sees the same data.

    Epoch e visits a permutation drawn from (seed, e); a step's batch is a slice of it. With several
    data-parallel ranks, the global batch (batch_size * world) is cut into per-rank slices.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int = 0, rank: int = 0, world: int = 1,
                 steps: int | None = None):
        if n < batch_size * world:
            raise ValueError(f"the split has {n} frames, fewer than one global batch of {batch_size * world}")
        self.n, self.b, self.seed, self.start, self.rank, self.world, self.steps = n, batch_size, seed, start_step, rank, world, steps
        self.per_epoch = n // (batch_size * world)

    def batch(self, step: int) -> np.ndarray:
        epoch, k = divmod(step, self.per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        g = self.b * self.world
        start = k * g + self.rank * self.b
        return np.sort(perm[start : start + self.b])

    def __iter__(self):
        step = self.start
        while self.steps is None or step < self.steps:
            yield self.batch(step).tolist()
            step += 1

    def __len__(self):
        return (self.steps - self.start) if self.steps is not None else 2**31
