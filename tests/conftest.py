import pytest
import torch

import utune_fx  # noqa: F401  (defines the torchvision op schemas before timm loads)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
