"""Sharing the cores: the OpenMP wait policy mak chooses before torch loads (mak._cores)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from mak._cores import PASSIVE, choose_wait_policy, is_shared, running_others


@pytest.mark.parametrize("others, cores, shared", [(0, 2, False), (0.4, 2, False), (1, 2, True), (1, 16, False),
                                                   (4, 16, True), (3, 16, False), (0.5, 1, True)])
def test_shared_means_half_a_core_or_a_quarter_of_them(others, cores, shared):
    assert is_shared(others, cores) == shared


def test_passive_only_on_shared_cores_and_never_over_the_users_choice():
    env: dict[str, str] = {}
    assert choose_wait_policy(env, others=0, cores=2) is None and env == {}
    assert choose_wait_policy(env, others=2, cores=2) == PASSIVE and env == {"OMP_WAIT_POLICY": PASSIVE}
    mine = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert choose_wait_policy(mine, others=5, cores=2) is None and mine == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_running_others_counts_a_busy_neighbour():
    alone = running_others()
    assert alone >= 0.0
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        assert running_others(samples=9) >= 1.0  # two spinning processes: at least one runs at any moment
    finally:
        for p in busy:
            p.kill()
            p.wait()


def test_the_cli_sets_the_policy_before_torch_loads():
    code = ("import os, sys\nimport mak._cores as c\nc.running_others = lambda: 3.0\nfrom mak.cli import main\n"
            "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
            "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split("\n")[-2] == f"{PASSIVE} False"
