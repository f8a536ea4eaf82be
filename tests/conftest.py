"""Shared test fixtures: small synthetic feature stores and a CLI runner."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# native kernels are built once per test session into a private cache, not the user's ~/.cache
os.environ.setdefault("MAK_CACHE_DIR", tempfile.mkdtemp(prefix="mak-test-cache-"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def run_cli(*argv: str) -> int:
    from mak.cli import main

    return main([str(a) for a in argv])


@pytest.fixture
def cli():
    return run_cli


def torchrun(nproc: int, *argv, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run ``python -m mak ARGV`` under ``torch.distributed.run`` with ``nproc`` CPU processes."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "mak", *map(str, argv)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
