"""Shared fixtures: one small real export, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def mlp_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real MLP export (fp32 + static int8, 2 epochs) in a temp dir. Read-only: copy it before damaging files.
    Its int8 bar is 2 points: a 2-epoch MLP's torch int8 file loses ~0.6 on 800 validation digits, and the
    tests that damage files need every format shipped. No ExecuTorch programs: their own tests cover them
    (tests/test_pte.py, tests/test_mnist_example.py)."""
    from edgeq.examples import mnist

    out = tmp_path_factory.mktemp("export") / "art"
    mnist.export(out, models=("mlp",), epochs=2, recipe_overrides={"variants": ("static",), "max_accuracy_drop": 2.0,
                                                                "executorch": False},
                 progress=False, log=lambda _: None)
    return out


@pytest.fixture(scope="session")
def verify_worker():
    """One verify worker process for the session's `verify()` calls: it imports torch once, not per call."""
    from edgeq.verify.worker import Worker, default_memory_limit_gb

    with Worker(default_memory_limit_gb()) as worker:
        yield worker


@pytest.fixture(scope="session")
def ray_cluster_session():
    """A real two-node Ray cluster on loopback for the whole session (tests/ray_cluster.py); stopped at
    the end, with a check that none of its processes is left. Tests use `ray_cluster`."""
    import os

    from ray_cluster import RayCluster, ray_available

    why = ray_available()
    if why:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(why)
    cluster = RayCluster()
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture
def ray_cluster(ray_cluster_session):
    """The session's cluster with both nodes up (the worker node restarted if a test killed it), and
    this process's environment set to connect to `ray_cluster.address`; disconnected after the test."""
    if not ray_cluster_session.worker_alive():
        ray_cluster_session.start_worker()
    with ray_cluster_session.connected_env():
        yield ray_cluster_session
