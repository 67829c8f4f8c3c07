"""Shared test setup: every test starts from the same random state."""

from __future__ import annotations

import random

import pytest
import torch

# A long training job shares the machine; one thread keeps these tiny tests fast and stable.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Seed torch and Python's random with 0 before each test."""
    random.seed(0)
    torch.manual_seed(0)
