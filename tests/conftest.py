import os

import pytest
import torch

import utune_fx  # noqa: F401  (defines the torchvision op schemas before timm loads)

# Under pytest-xdist (`make test` runs `-n auto`) every worker is a process of its own: one
# intra-op thread each keeps N workers on N cores instead of N x N threads contending.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
