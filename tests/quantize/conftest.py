import pytest
import torch


@pytest.fixture
def calib():
    """Calibration token ids for the quantize tests' tiny models (vocabulary 300)."""
    torch.manual_seed(1)
    return torch.randint(4, 300, (8, 32))
