"""Small rules of an export, checked directly: where its untimed trials run (recipe.jobs, EDGEQ_JOBS,
RAY_ADDRESS), and what a refused int8 ONNX file's record says runs in fp32 inside it."""

from __future__ import annotations

import pytest

from edgeq.build import _workers
from edgeq.errors import ConfigError
from edgeq.precision import float_ops
from edgeq.recipe import Recipe
from edgeq.speed import _float_ops
from edgeq.trials import available_cores


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("EDGEQ_JOBS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return monkeypatch


def test_jobs_come_from_the_recipe_then_edgeq_jobs_then_every_core(clean_env):
    assert _workers({"m": Recipe()}).jobs == available_cores()
    clean_env.setenv("EDGEQ_JOBS", "3")
    assert _workers({"m": Recipe()}).jobs == 3
    assert _workers({"m": Recipe(jobs=1)}).jobs == 1  # the recipe wins over the environment
    assert _workers({"m": Recipe(jobs=1)}).backend == "serial"


@pytest.mark.parametrize("value", ["0", "two", "-1", "1.5"])
def test_a_bad_edgeq_jobs_is_one_line_naming_it(clean_env, value):
    clean_env.setenv("EDGEQ_JOBS", value)
    with pytest.raises(ConfigError, match="EDGEQ_JOBS") as err:
        _workers({"m": Recipe()})
    assert "\n" not in str(err.value)


def test_ray_address_from_the_environment_sends_trials_to_the_cluster(clean_env):
    clean_env.setenv("RAY_ADDRESS", "127.0.0.9:6390")
    workers = _workers({"m": Recipe()})
    assert workers.ray_address == "127.0.0.9:6390" and workers.jobs is None  # the cluster decides the width


def test_models_asking_for_different_workers_are_refused(clean_env):
    with pytest.raises(ConfigError, match="one setting for the whole export"):
        _workers({"a": Recipe(jobs=1), "b": Recipe(jobs=2)})


def test_float_ops_are_what_runs_in_fp32_between_int8_kernels():
    optimized = {"QLinearConv": 12, "QGemm": 1, "QLinearAdd": 3, "QuantizeLinear": 30, "DequantizeLinear": 29,
                 "Transpose": 4, "Reshape": 1, "HardSigmoid": 28, "Mul": 28, "GlobalAveragePool": 9, "Conv": 2}
    assert float_ops(optimized) == {"HardSigmoid": 28, "Mul": 28, "GlobalAveragePool": 9, "Conv": 2}
    assert float_ops({"QLinearConv": 3, "QuantizeLinear": 1, "DequantizeLinear": 1}) == {}


def test_a_slower_files_record_names_its_float_ops_most_first():
    text = _float_ops({"Mul": 6, "HardSigmoid": 28})
    assert "34 ops in fp32" in text and text.index("HardSigmoid x28") < text.index("Mul x6")
    assert _float_ops({}) == "" and _float_ops(None) == ""
