"""Untimed trials on every core and on a Ray cluster: the files never depend on where they ran.

The model is tests/test_groups.py's squeeze-excitation net with an outlier gate: its int8 file
needs the accuracy bar's ranking (tens of independent trials) before it ships, so every export here
runs calibration candidates, per-layer sensitivity and the bar's ranking on the workers asked for.
The Ray cluster is real: two nodes on loopback (tests/ray_cluster.py), one CPU each.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

import edgeq
from edgeq.manifest import sha256_file
from edgeq.recipe import Recipe

from conftest import PINNED
from test_groups import digits, outlier_gate  # noqa: F401  (module fixtures)

pytestmark = pytest.mark.slow  # left out of `make test-fast`

RECIPE = {**PINNED, "variants": ("static",), "calibration_methods": ("MinMax", "Percentile"),
          "calibration_sizes": (128, 256), "sensitivity": True}


def _export(model, data, out: Path, **workers) -> Path:
    train, test = data
    edgeq.compress({"se": model}, train=(train.x, train.y), test=(test.x, test.y), out=out,
                   recipe=Recipe(**{**RECIPE, **workers}), progress=False, log=lambda s: None)
    return out


def _files(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): sha256_file(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", "plan.json")}


def _decisions(directory: Path) -> dict:
    """The plan's untimed decisions: without the timed ones (the recommendation, measured here on each run),
    what was timed (seconds, per-node profiles) and where trials ran."""
    timed = ("seconds", "ran_on", "measured_on", "profile_us", "recommended")

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in timed}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    plan = json.loads((directory / "plan.json").read_text())
    return strip(plan["models"])


@pytest.fixture(scope="module")
def local(outlier_gate, digits, tmp_path_factory) -> Path:  # noqa: F811
    """In this process, one trial after the other: the reference."""
    return _export(outlier_gate, digits, tmp_path_factory.mktemp("local") / "art", jobs=1)


def test_two_workers_give_the_files_and_decisions_of_one(local, outlier_gate, digits, tmp_path) -> None:  # noqa: F811
    pooled = _export(outlier_gate, digits, tmp_path / "art", jobs=2)
    assert _files(pooled) == _files(local)
    assert _decisions(pooled) == _decisions(local)
    manifest = json.loads((pooled / "manifest.json").read_text())
    assert manifest["environment"]["workers"]["backend"] == "pool" and manifest["environment"]["workers"]["jobs"] == 2
    bar = json.loads((local / "plan.json").read_text())["models"]["se"]["accuracy"]["se-static-onnx"]
    assert bar["met"] and bar["ranking"]["kinds"]  # the ranking ran: these were real trials on the pool


def test_an_export_on_a_ray_cluster_runs_on_both_nodes_with_the_local_files(
        ray_cluster, local, outlier_gate, digits, tmp_path) -> None:  # noqa: F811
    out = _export(outlier_gate, digits, tmp_path / "art", ray_address=ray_cluster.address)
    assert _files(out) == _files(local) and _decisions(out) == _decisions(local)
    plan = json.loads((out / "plan.json").read_text())["models"]["se"]
    nodes = set(plan["precision"]["fp32"]["calibration"].get("ran_on", {}))
    nodes |= set(plan["precision"]["fp32"]["sensitivity"].get("ran_on", {}))
    nodes |= set(plan["accuracy"]["se-static-onnx"].get("ran_on", {}))
    assert nodes == {ray_cluster.head_node, ray_cluster.worker_node}  # recorded in the plan's evidence
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["environment"]["workers"] == {"backend": "ray", "jobs": manifest["environment"]["workers"]["jobs"],
                                                  "ray_address": ray_cluster.address}


def test_ship_decisions_are_timed_on_the_node_labelled_with_the_target(ray_cluster, outlier_gate, digits,  # noqa: F811
                                                                      tmp_path) -> None:
    """A cluster with a node labelled `target:<the build's target>` times the ship decisions there, and the
    plan names the node. Which way each decision went is this machine's timing: not asserted."""
    from edgeq.target import here

    out = _export(outlier_gate, digits, tmp_path / "art", ray_address=ray_cluster.address, ship_rule="timed")
    ships = json.loads((out / "plan.json").read_text())["models"]["se"]["ships"]
    assert "se-static-onnx" in ships  # the int8 TorchScript file may miss its bar before any timing
    for rec in ships.values():
        assert rec["timed_on"]["node"] == ray_cluster.worker_node, rec  # the labelled node, not the head
        assert rec["timed_on"]["resource"] == f"target:{here().name}"
        assert rec["evidence"]["blocks"] >= 1 and set(rec["latency_vs_parent"]) == {"1", "8"}


# Last: it ends the worker node, which the test after it would have to start again (4 s).
def test_a_worker_node_killed_mid_export_changes_no_file(ray_cluster, local, outlier_gate, digits,  # noqa: F811
                                                         tmp_path) -> None:
    """The worker node is killed while it runs one of the export's trials: the trial runs again on the
    head node and the export finishes with the local files."""
    killed: list[bool] = []
    done = threading.Event()

    def kill_when_busy() -> None:
        while not done.is_set():
            if any("ray::_ray_call" in cmd for pid, cmd in ray_cluster.processes().items()
                   if ray_cluster.on_worker(pid)):
                ray_cluster.kill_worker()
                killed.append(True)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_busy, daemon=True)
    killer.start()
    try:
        out = _export(outlier_gate, digits, tmp_path / "art", ray_address=ray_cluster.address)
    finally:
        done.set()  # the watcher stops with the export: it must not kill a later test's node
        killer.join(timeout=30)
    assert killed, "the worker node never ran a trial"
    assert not ray_cluster.worker_alive()
    assert _files(out) == _files(local) and _decisions(out) == _decisions(local)
