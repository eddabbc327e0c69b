"""The SLURM cluster the tests in this folder submit to: the one ``sinfo`` answers for, else a local one."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.slurm.slurm_helpers import SLURM_LOCAL, idle_nodes

NODES_NEEDED = 2


@pytest.fixture(scope="session")
def slurm_cluster():
    """Use a running cluster with two nodes; else start ``slurm-local up 2`` (and stop it afterwards);
    else skip, saying why."""
    if idle_nodes() >= NODES_NEEDED:
        yield
        return
    if not SLURM_LOCAL.is_file():
        pytest.skip(f"no SLURM cluster answers sinfo with {NODES_NEEDED} nodes, and {SLURM_LOCAL} does not exist")
    if os.geteuid() != 0:
        pytest.skip(f"no SLURM cluster answers sinfo, and {SLURM_LOCAL.name} needs root to start one")
    result = subprocess.run([str(SLURM_LOCAL), "up", str(NODES_NEEDED)], check=False, capture_output=True, text=True, timeout=900)
    if result.returncode != 0 or idle_nodes() < NODES_NEEDED:
        pytest.fail(f"{SLURM_LOCAL.name} up {NODES_NEEDED} failed: {(result.stderr or result.stdout)[-2000:]}")
    yield
    subprocess.run([str(SLURM_LOCAL), "down"], check=False, capture_output=True, timeout=120)
