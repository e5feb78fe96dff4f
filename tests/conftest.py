"""Shared fixtures and the one pinned recipe.

Rule for every test here: no test reads a timing outcome of its own run. A timed decision is
tested on recorded evidence (a plan's ratios, `edgeq.evidence.decide` on given blocks) or the
build is pinned (`PINNED`: nothing timed changes a file). Exports that several test files read are
built once per session, and once for all pytest-xdist workers (a file lock guards the build).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

# A recipe whose files depend on no timing: the speed search tries no layer (defaults kept), every
# int8 file within its bars ships untimed, one calibration candidate, no sensitivity pass, no
# ExecuTorch programs (tests of their own cover each of these). The bars are the defaults, so what
# ships must pass `edgeq verify` with its default options. Tests override fields with {**PINNED, ...}.
PINNED = dict(search_budget_s=1e-6, ship_rule="always", executorch=False, batches=(1, 8),
              calibration_methods=("MinMax",), calibration_sizes=(512,), bias_correction=(False,), sensitivity=False)


def stochastic_residual(side: int, p: float):
    """A small residual network with torchvision's StochasticDepth (drop probability `p`, as in EfficientNet)
    on its residual branch and a Dropout before its head, for `side` x `side` one-channel inputs."""
    from torch import nn
    from torchvision.ops import StochasticDepth

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
            self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
            self.drop_path, self.dropout = StochasticDepth(p, "row"), nn.Dropout(0.2)
            self.fc = nn.Linear(8 * side * side, 10)

        def forward(self, x):
            x = self.stem(x)
            x = x + self.drop_path(self.block(x))
            return self.fc(self.dropout(x.flatten(1)))

    return Residual()


def shared_build(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]) -> Path:
    """`build(out)` once per test run, whatever the number of xdist workers: the first worker builds
    under a lock, the others wait and read what it built. Read-only for the tests: copy it first."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's base directory, shared by the workers
    out = root / f"shared-{name}" / "art"
    with FileLock(str(root / f"shared-{name}.lock")):
        if not (out / "manifest.json").is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            build(out)
    return out


# the calibration candidates and the sensitivity pass are measured (on validation data: no timing)
MLP_ARTIFACTS = dict(models=("mlp",), epochs=2,
                     recipe_overrides={**PINNED, "variants": ("static",), "max_accuracy_drop": 2.0,
                                       "calibration_methods": ("MinMax", "Entropy", "Percentile"),
                                       "calibration_sizes": (128, 512), "bias_correction": (False, True),
                                       "sensitivity": True},
                     progress=False, log=lambda _: None)


@pytest.fixture(scope="session")
def mlp_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real MLP export (fp32 + static int8, 2 epochs) in a temp dir. Read-only: copy it before damaging files.

    Pinned: every file ships whatever this machine's timings would say, so the tests that damage files
    find every format on any machine (tests/test_plan.py builds and replays a timed export of its own).
    Its int8 bar is 2 points: a 2-epoch MLP's torch int8 file loses ~0.6 on 800
    validation digits. No ExecuTorch programs: their own tests cover them."""
    from edgeq.examples import mnist

    return shared_build(tmp_path_factory, "mlp", lambda out: mnist.export(out, **MLP_ARTIFACTS))


@pytest.fixture(scope="session")
def mlp_every_format(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The MLP example (3 epochs) with every variant in every format, ExecuTorch programs included, and the
    default bars; pinned. Built once for the run. Read-only: copy it before damaging files."""
    from edgeq.examples import mnist
    from edgeq.recipe import Recipe

    return shared_build(tmp_path_factory, "mlp-every-format", lambda out: mnist.export(
        out, models=("mlp",), epochs=3, recipe_overrides={**PINNED, "executorch": True, "variants": Recipe().variants},
        progress=False, log=lambda _: None))


@pytest.fixture(autouse=True)
def quantized_engine_kept():
    """Every test leaves torch's quantized engine (process-wide) as it found it. Tests share a process
    (a pytest-xdist worker runs whole files one after another), and an int8 model run in another
    engine than it was built in gives other outputs: a leak shows here, in the test that leaked it."""
    torch = sys.modules.get("torch")
    before = torch.backends.quantized.engine if torch is not None else None
    yield
    if before is not None:
        after = sys.modules["torch"].backends.quantized.engine
        assert after == before, f"the test left torch's quantized engine at {after!r} (it was {before!r})"


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


def pytest_configure(config) -> None:
    """Under pytest-xdist the test workers already use every core: an export's own trial pool, or a runtime's
    threads, would only oversubscribe them (on 2 cores, 2 workers with 2 torch threads each took 1.25x the time
    of one thread each), so exports here run their trials in-process and each worker (and the processes it
    starts) one intra-op thread, as edgeq's own pool workers do, unless a test asks otherwise."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        from edgeq.trials import set_process_threads

        os.environ.setdefault("EDGEQ_JOBS", "1")
        set_process_threads(1)


# The longest files first (their test time in a 2-core run, most first): under `--dist loadfile
# --no-loadscope-reorder` (the Makefile's) xdist hands out files in collection order, so a long file
# started last keeps one worker busy while the other idles (without that option xdist orders files by
# their number of tests). A scheduling hint only: a file not named here runs after these, in its usual order.
LONGEST_FIRST = ("test_compress.py", "test_pte.py", "test_verify.py", "test_hardening3.py", "test_scale.py",
                 "test_trials.py", "test_hardening3_export.py", "test_arm.py", "test_hardening2.py",
                 "test_hardening.py", "test_mnist_example.py", "test_plan.py", "test_quantize.py",
                 "test_verify_limits.py", "test_contract.py", "test_device.py", "test_prune.py", "test_accuracy.py")


def pytest_collection_finish(session) -> None:
    """What collection imported (torch, onnxruntime, ExecuTorch...) lives for the whole run: frozen out of the
    collector's sight, the automatic full collections during the run's exports, and the one at exit, walk
    only what the tests made (on test_compress and test_hardening: 2.3 s -> 1.7-2.1 s of collection per worker)."""
    import gc

    gc.freeze()


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order
