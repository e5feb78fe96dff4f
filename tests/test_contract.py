"""The export's contract under bad luck: models and data that used to ship wrong files, tracebacks or
files that verify then failed. Tiny models on scikit-learn's 8x8 digits; nothing here is timed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import edgeq
from edgeq import golden, runtime
from edgeq.data import Arrays, holdout
from edgeq.errors import ConfigError, ExportError
from edgeq.manifest import sha256_file
from edgeq.recipe import Finetune, Recipe
from edgeq.train import fit

from conftest import PINNED

PINNED = {**PINNED, "calibration_sizes": (128,)}  # conftest.PINNED, a smaller calibration


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    data = Arrays((d.images[:, None] / 16.0).astype(np.float32), d.target.astype(np.int64))
    train, test = holdout(data, 0.2, 0)
    return (train.x, train.y), (test.x, test.y)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


@pytest.fixture(scope="module")
def trained(digits):
    (x, y), _ = digits
    return fit(mlp(), Arrays(x, y), Finetune(epochs=8, lr=1e-2), progress=False)


def compress(model, digits, out: Path, log=None, **recipe) -> edgeq.Manifest:
    train, test = digits
    return edgeq.compress({"m": model}, train=train, test=test, out=out, recipe=Recipe(**{**PINNED, **recipe}),
                          progress=False, log=log or (lambda s: None))


class Branchy(nn.Module):
    """Data-dependent control flow: a trace records the branch its example input took."""

    def __init__(self, threshold: float):
        super().__init__()
        self.a, self.b, self.threshold = nn.Linear(64, 10), nn.Linear(64, 10), threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.a(x) if x.mean() > self.threshold else self.b(x)


def test_a_model_whose_graph_depends_on_its_input_ships_no_file_that_computes_something_else(digits, tmp_path):
    out = tmp_path / "art"
    (x, y), _ = digits
    _, val = holdout(Arrays(x, y), 0.2, 0)  # what compress holds out: its first input is the trace's example
    one, batch = float(val.x[:1].mean()), float(val.x.mean())
    assert abs(one - batch) > 1e-3
    with pytest.raises(ConfigError, match="depend on the rest of the batch") as info:  # the batch's mean picks it
        compress(Branchy((one + batch) / 2), digits, out, variants=("static",))
    assert "\n" not in str(info.value) and not out.exists()


class Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * x

    @staticmethod
    def backward(ctx, grad):
        return grad


class WithFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(Square.apply(x.flatten(1)))


def test_a_custom_autograd_function_skips_the_torchscript_files_and_builds_the_rest(digits, tmp_path):
    manifest = compress(WithFunction(), digits, tmp_path / "art", variants=())
    skipped = {s["name"]: s["reason"] for s in manifest.skipped}
    assert "TorchScript cannot save this model" in skipped["m-fp32-ts"] and "Square" in skipped["m-fp32-ts"]
    assert "m-fp32-ckpt" in skipped  # it runs in its TorchScript graph, which could not be saved
    assert [a.name for a in manifest.artifacts] == ["m-fp32-onnx"]
    assert edgeq.verify(tmp_path / "art", rounds=1, window_s=0.002, batch=8, progress=False).passed


def test_an_overflow_in_a_fine_tune_ships_no_file_with_nan_weights(digits, trained, tmp_path):
    (x, y), test = digits  # a 3e38 input is now refused up front (edgeq.data): the step size overflows instead
    manifest = edgeq.compress({"m": trained}, train=(x, y), val=test, test=test, out=tmp_path / "art", progress=False,
                              log=lambda s: None, recipe=Recipe(**{**PINNED, "variants": ("unstructured",),
                                                                   "pruning_steps": 1, "finetune_unstructured":
                                                                   Finetune(epochs=1, lr=1e30)}))
    assert "m-unstructured-onnx" not in {a.name for a in manifest.artifacts}
    assert any(s["name"] == "m-unstructured-onnx" for s in manifest.skipped)
    for a in manifest.artifacts:  # every shipped file's weights are finite, recounted from the file
        if a.format == "onnx":
            import onnx
            from onnx import numpy_helper

            for t in onnx.load(str(tmp_path / "art" / a.file)).graph.initializer:
                assert np.isfinite(numpy_helper.to_array(t)).all(), (a.name, t.name)


def test_a_model_given_in_train_mode_is_used_in_eval_mode_and_say_so(digits, trained, tmp_path):
    model = nn.Sequential(*trained, nn.Dropout(0.5)).train()
    lines: list[str] = []
    compress(model, digits, tmp_path / "art", log=lines.append, variants=("static",))
    assert any("train mode" in line and "eval mode" in line for line in lines)
    assert model.training  # the caller's model is not changed
    assert edgeq.verify(tmp_path / "art", rounds=1, window_s=0.002, batch=8, progress=False).passed


def test_a_split_too_small_for_the_bar_is_warned_about(digits, trained, tmp_path):
    train, (xt, yt) = digits
    lines: list[str] = []
    compress(trained, (train, (xt[:20], yt[:20])), tmp_path / "art", log=lines.append, variants=())
    assert any(line.startswith("warning: test split of 20 samples: one sample is 5 points") for line in lines)


def test_absurd_batch_sizes_are_refused_before_any_work():
    with pytest.raises(ConfigError, match="at most 4096 samples per timed batch"):
        Recipe(batches=(1, 100_000_000))


def test_a_replayed_plan_cannot_claim_an_accuracy_it_does_not_reach(tmp_path):
    """The hard case (edgeq/examples/hardcase.py) loses ~88 points all-int8 and meets the bar with layers kept
    in fp32. An edited plan says 'met, no fp32 layers, drop 0': the replay builds what the plan says,
    measures it again, and ships nothing over the bar, whatever the plan claims."""
    from edgeq.examples import hardcase

    model, (train, test) = hardcase.build(), hardcase.load()
    recipe = Recipe(**{**PINNED, "variants": ("static",), "calibration_sizes": (512,)})
    first = edgeq.compress({"hard": model}, train=train, test=test, out=tmp_path / "a", recipe=recipe,
                           progress=False, log=lambda s: None)
    assert first.artifact("hard-static-onnx").quantization["fp32_nodes"]  # measured: it needs fp32 layers
    plan = json.loads((tmp_path / "a" / "plan.json").read_text())
    decision = plan["models"]["hard"]["accuracy"]["hard-static-onnx"]
    plan["models"]["hard"]["accuracy"]["hard-static-onnx"] = {**decision, "met": True, "fp32_nodes_added": [],
                                                              "drop_points": 0.0}
    plan["models"]["hard"]["precision"]["fp32"]["qdq"]["exclude_nodes"] = []
    for layer in plan["models"]["hard"]["precision"]["fp32"]["layers"]:
        layer["precision"] = "int8"
    (tmp_path / "edited.json").write_text(json.dumps(plan))
    replayed = edgeq.compress({"hard": model}, train=train, test=test, out=tmp_path / "b", recipe=recipe,
                              progress=False, log=lambda s: None, plan=tmp_path / "edited.json")
    entry = next(s for s in replayed.skipped if s["name"] == "hard-static-onnx")
    assert entry["kind"] == "below_accuracy_bar" and "hard-static-onnx" not in {a.name for a in replayed.artifacts}
    assert not (tmp_path / "b" / "hard-static.onnx").exists()


def _rehash(directory: Path, name: str, new_file: Path) -> None:
    """Swap an artifact's file and rewrite every record the manifest keeps of it (sizes, hashes, both
    splits' counts, its golden outputs), as anyone who can write an unsigned directory can."""
    data = json.loads((directory / "manifest.json").read_text())
    art = next(a for a in data["artifacts"] if a["name"] == name)
    shutil.copyfile(new_file, directory / art["file"])
    run = runtime.load(directory / art["file"], art["format"])
    for split, key in (("eval.npz", "accuracy"), ("val.npz", "val_accuracy")):
        with np.load(directory / split) as z:
            correct = int((run.predict(z["inputs"]).argmax(1) == z["labels"]).sum())
            art[key] = correct / len(z["labels"])
            if key == "val_accuracy":
                art["contract"]["correct"] = correct
    art["bytes"], art["sha256"] = (directory / art["file"]).stat().st_size, sha256_file(directory / art["file"])
    entry = data["golden"]["outputs"][name]
    inputs = golden.read_tensor(directory / data["golden"]["input"]["file"])
    blob = golden.tensor_bytes(run.predict(inputs), "logits")
    (directory / entry["file"]).write_bytes(blob)
    entry["bytes"], entry["sha256"] = len(blob), sha256_file(directory / entry["file"])
    (directory / "manifest.json").write_text(json.dumps(data, indent=2))


def test_verify_tells_an_fp32_file_that_does_not_compute_what_its_model_computed(mlp_artifacts, tmp_path):
    """Every record re-hashed to match a different file: only the model's own outputs, kept at export,
    can tell, and they do."""
    art = tmp_path / "art"
    shutil.copytree(mlp_artifacts, art)
    _rehash(art, "mlp-fp32-onnx", mlp_artifacts / "mlp-static.onnx")
    result = edgeq.verify(art, rounds=1, window_s=0.002, batch=8, progress=False)
    row = next(r for r in result.rows if r.name == "mlp-fp32-onnx")
    assert not result.passed and any("does not compute what its model computed" in r for r in row.reasons)


def test_verify_on_another_machine_allows_the_stated_slack_and_says_so(mlp_artifacts, tmp_path):
    """Built elsewhere (another CPU named in the manifest), a count of correct answers may move by 0.2 % of
    the samples; the report says which rule it applied. Here the rule is exact."""
    art = tmp_path / "art"
    shutil.copytree(mlp_artifacts, art)
    here = edgeq.verify(art, rounds=1, window_s=0.002, batch=8, progress=False)
    assert here.environment["claims"].startswith("exact")
    data = json.loads((art / "manifest.json").read_text())
    data["environment"]["cpu"]["model"] = "Some Other CPU"
    entry = next(a for a in data["artifacts"] if a["name"] == "mlp-static-onnx")
    n = 1000
    entry["accuracy"] = (round(entry["accuracy"] * n) + 1) / n  # one sample off the file's own count
    (art / "manifest.json").write_text(json.dumps(data, indent=2))
    elsewhere = edgeq.verify(art, rounds=1, window_s=0.002, batch=8, progress=False)
    assert elsewhere.environment["claims"].startswith("within 0.2%") and elsewhere.passed, elsewhere.failures
    entry["accuracy"] = (round(entry["accuracy"] * n) + 4) / n  # five off: past 0.2 % of 1,000
    (art / "manifest.json").write_text(json.dumps(data, indent=2))
    far = edgeq.verify(art, rounds=1, window_s=0.002, batch=8, progress=False)
    assert not far.passed and any("manifest claims" in f for f in far.failures)
