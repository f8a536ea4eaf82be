"""Shared test fixtures: small synthetic feature stores and a CLI runner."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def run_cli(*argv: str) -> int:
    from mak.cli import main

    return main([str(a) for a in argv])


@pytest.fixture
def cli():
    return run_cli
