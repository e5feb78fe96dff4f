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
