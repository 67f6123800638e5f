import os

import pytest

os.environ.setdefault("MUJOCO_GL", "egl")

# torch threads for the tests (in process and in the processes they start): 2, or 1 on each worker of
# `pytest -n N`, where the workers share the cores; oversubscribed threads spin and slow everyone.
TORCH_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
if TORCH_THREADS == 1:
    os.environ["OMP_NUM_THREADS"] = "1"
import torch  # noqa: E402

torch.set_num_threads(TORCH_THREADS)

# Tests that run Snakemake in the checkout itself (its .snakemake/ folder): one after another under -n.
IN_CHECKOUT = pytest.mark.xdist_group("repo")

# Modules whose tests are independent (a fresh project copy each, a cheap loopback server) are spread over
# the workers test by test; every other module keeps its tests on one worker, where its module fixtures
# (a trained run, a rendered store) are built once.
SPREAD = {"test_pipeline", "test_s3"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("xdist_group") is None and item.module.__name__ not in SPREAD:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
