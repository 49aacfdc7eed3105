"""Shared test setup: golden-vector location, deterministic seeds, small threads."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # golden_adapters, helpers


def golden_dir() -> Path:
    env = os.environ.get('VISIONPE_GOLDEN_DIR')
    return Path(env) if env else HERE.parent.parent / 'shared' / 'golden'


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
