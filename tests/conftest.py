import numpy as np
import pytest
import torch

from digseg_diffusers.testing_utils import make_tiny_pipeline

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_pipe():
    """One tiny random pipeline shared by the read-only tests (never modify it in a test)."""
    return make_tiny_pipeline(seed=0)


@pytest.fixture
def rgb_image():
    return np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8)
