"""Bring your own model: `edgeq.compress` and `edgeq.verify` on architectures edgeq does not define.

Two families beyond the MNIST examples, trained briefly on the embedded digits: a residual network
(BN, residual adds, a strided 1x1 shortcut) and torchvision's mobilenet_v3_small (depthwise convs,
squeeze-excite, hardswish). Both must come out pruned, as int8 TorchScript and int8 ONNX QDQ, and
verify from the files alone. Timed decisions are pinned (no search, every int8 file shipped) so the
tests never depend on a timing outcome.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import edgeq
from edgeq.cli import main
from edgeq.errors import ConfigError, DataError
from edgeq.examples.mnist import Preprocessing, load_data
from edgeq.recipe import Finetune, Recipe, Structured
from edgeq.train import fit
from edgeq.data import Arrays

from conftest import PINNED

# conftest.PINNED, and two pruning steps at most
PINNED = {**PINNED, "pruning_steps": 2}
QUICK = Finetune(epochs=1, lr=1e-3)


class Block(nn.Module):
    """A basic residual block; a strided 1x1 conv shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(y + self.short(x))


class SmallResNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layers = nn.Sequential(Block(16, 16, 1), Block(16, 32, 2), Block(32, 64, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class DepthwiseBlock(nn.Module):
    """Inverted residual: 1x1 expansion, 3x3 depthwise, 1x1 projection, a residual add when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 2):
        super().__init__()
        mid = cin * expand
        self.body = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class ResidualDepthwise(nn.Module):
    """A small residual network with depthwise convolutions, for 1x8x8 digits."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.blocks = nn.Sequential(DepthwiseBlock(16, 16, 1), DepthwiseBlock(16, 24, 2), DepthwiseBlock(24, 24, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(24, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def mobilenet() -> nn.Module:
    from torchvision.models import mobilenet_v3_small

    m = mobilenet_v3_small(num_classes=10)
    first = m.features[0][0]
    m.features[0][0] = nn.Conv2d(1, first.out_channels, 3, 1, 1, bias=False)  # 1-channel digits, keep 28x28 longer
    return m


@pytest.fixture(scope="module")
def digits():
    ds, pre = load_data(), Preprocessing()
    train = (pre.apply(ds.train.images[:2000]), ds.train.labels[:2000])  # enough to train both to ~95 %
    test = (pre.apply(ds.test.images[:300]), ds.test.labels[:300])
    return train, test


def trained(model: nn.Module, train, epochs: int, lr: float = 3e-3) -> nn.Module:
    torch.manual_seed(0)
    return fit(model, Arrays(*train), Finetune(epochs=epochs, lr=lr), desc="train", progress=False)


@pytest.fixture(scope="module")
def small_digits():
    """scikit-learn's 1,797 8x8 digits: 1,437 to train, 360 to test (stratified, seeded)."""
    from sklearn.datasets import load_digits

    from edgeq.data import holdout

    d = load_digits()
    all_ = Arrays((d.images[:, None] / 16.0).astype(np.float32), d.target.astype(np.int64))
    train, test = holdout(all_, 360 / 1797, 0)
    return (train.x, train.y), (test.x, test.y)


# name: (model, epochs, learning rate, variants, data fixture, recipe overrides). The residual-depthwise
# family takes the default pruning amounts (a search that lands below them, and one that ships nothing);
# the residual one a single structured amount (one fine-tune, whichever way it goes); mobilenet int8 alone
# (its pruning costs minutes).
FAMILIES = {"resdw": (ResidualDepthwise, 6, 1e-2, ("unstructured", "structured", "static"), "small_digits", {}),
            "resnet": (SmallResNet, 2, 3e-3, ("structured", "static"), "digits",
                       {"structured": Structured(amount=0.25), "pruning_steps": 1}),
            "mobilenet": (mobilenet, 1, 3e-3, ("static",), "digits", {})}


_BUILT: dict[str, tuple] = {}  # each family built once per run, though pytest may set the fixture up again


@pytest.fixture(scope="module", params=list(FAMILIES))
def built(request, tmp_path_factory):
    if request.param not in _BUILT:
        _BUILT[request.param] = _build(request, tmp_path_factory)
    return _BUILT[request.param]


def _build(request, tmp_path_factory):
    make, epochs, lr, variants, data, overrides = FAMILIES[request.param]
    train, test = request.getfixturevalue(data)
    model = trained(make(), train, epochs, lr)
    out = tmp_path_factory.mktemp(request.param) / "art"
    recipe = Recipe(variants=variants, finetune_structured=Finetune(epochs=2, lr=1e-3),
                    finetune_unstructured=Finetune(epochs=2, lr=1e-3), **{**PINNED, **overrides})
    manifest = edgeq.compress({request.param: model}, train=train, test=test, out=out, recipe=recipe,
                              progress=False, log=lambda s: None)
    return request.param, model, out, manifest


def test_what_a_family_ships_passes_default_verify_and_what_it_does_not_is_explained(built) -> None:
    """The default recipe's contract, end to end: every file is shipped or listed under `skipped` with
    why, and `edgeq verify` with no options passes what was shipped."""
    name, model, out, manifest = built
    names = {a.name for a in manifest.artifacts}
    skipped = {s["name"]: s for s in manifest.skipped}
    variants = manifest.models[name]["recipe"]["variants"]
    floats = ["fp32"] + [v for v in variants if v in ("unstructured", "structured")]
    int8 = [("" if f == "fp32" else f + "-") + "static" for f in floats if f != "unstructured"]
    for v in floats:
        for short in ("ts", "ckpt", "onnx"):
            assert f"{name}-{v}-{short}" in names or skipped[f"{name}-{v}-{short}"]["reason"], (v, short)
    for v in int8:
        for short in ("ts", "onnx"):
            expected = f"{name}-{v}-{short}"
            assert expected in names or skipped[expected]["reason"], expected
    assert {f"{name}-fp32-ts", f"{name}-fp32-onnx"} <= names
    for entry in (s for s in manifest.skipped if s["kind"] == "below_accuracy_bar"):
        assert entry["best_drop_points"] is None or entry["best_drop_points"] > 0.5, entry
    result = edgeq.verify(out, batch=16, rounds=2, window_s=0.003, progress=False)
    assert result.passed, result.failures
    assert all(r.status in ("ok", "skipped") for r in result.rows)
    checked = [r for r in result.rows if r.contract]
    assert checked and all(c["met"] for r in checked for c in r.contract)


def test_no_shipped_file_is_more_than_the_bars_below_fp32_on_validation_data(built) -> None:
    """Recomputed here from val.npz and the files, not read from the manifest."""
    from edgeq import runtime

    name, _, out, manifest = built
    with np.load(out / "val.npz") as z:
        x, y = z["inputs"], z["labels"]
    correct = {}
    for a in manifest.artifacts:
        run = runtime.load(out / a.file, a.format, options=runtime.load_options(a.format, a.runtime))
        correct[a.name] = int((run.predict(x).argmax(1) == y).sum())
    for a in manifest.artifacts:
        fp32 = correct[f"{name}-fp32-{a.name.rsplit('-', 1)[1]}"]
        bar = (0.5 if a.precision == "int8" else 0.0) + (0.5 if a.pruning else 0.0)
        assert 100 * (fp32 - correct[a.name]) / len(y) <= bar + 1e-9, a.name


def test_a_models_budget_is_shared_by_its_parents_and_what_one_leaves_carries_over() -> None:
    from edgeq.context import Budget

    b = Budget(120.0, 2)
    assert b.share() == 60.0
    b.spend(10.0)  # the first parent finished early
    assert b.share() == 110.0 and b.parents == 1
    b.spend(500.0)
    assert b.share() == 0.0 and b.parents == 0


def test_a_turn_at_the_budget_that_spends_nothing_passes_its_part_on_and_one_that_spends_is_charged_once() -> None:
    from edgeq.context import Budget

    b = Budget(90.0, 3)
    with b.turn():  # a bar that did not run
        pass
    assert b.parents == 2 and b.share() == 45.0
    with b.turn() as t:  # a bar that spent 30 s of its 45
        t.spend(30.0)
    assert b.parents == 1 and b.share() == 60.0
    with pytest.raises(RuntimeError), b.turn():  # a bar that failed before it measured
        raise RuntimeError("lowering failed")
    assert b.parents == 0 and b.seconds == 60.0


def test_the_search_budget_is_the_models_and_sizes_are_checked(built) -> None:
    name, _, _, manifest = built
    names = {a.name for a in manifest.artifacts}
    parents = 1 + (f"{name}-structured-ckpt" in names)  # the fp32 parents of int8 ONNX files share the model's
    if f"{name}-static-onnx" not in names:
        pytest.skip(f"{name}-static-onnx was not shipped in this build")
    dense = manifest.artifact(f"{name}-static-onnx").quantization
    assert dense["search"]["budget_s"] == PINNED["search_budget_s"] / parents
    for a in (manifest.artifact(n) for n in (f"{name}-static-onnx", f"{name}-structured-static-onnx") if n in names):
        size, parent = a.quantization["size_vs_parent"], manifest.artifact(a.parent)
        assert size["ratio"] == round(a.bytes / parent.bytes, 3) and size["limit"] == 0.30
        assert size["within"] == (size["ratio"] <= 0.30)


def test_manifest_describes_the_model_from_the_model_and_data(built, request) -> None:
    def request_data(name):
        return request.getfixturevalue(FAMILIES[name][4])

    name, model, out, manifest = built
    train, test = request_data(name)
    side, n_test = test[0].shape[-1], len(test[1])
    assert manifest.input["shape"] == ["batch", 1, side, side]
    assert manifest.models[name]["recipe"]["variants"] == list(FAMILIES[name][3])
    assert manifest.preprocessing["description"].startswith("as given")
    with np.load(out / "eval.npz", allow_pickle=False) as z:
        assert z["inputs"].shape == (n_test, 1, side, side) and z["inputs"].dtype == np.float32
        assert z["labels"].dtype == np.int64
    data = json.loads((out / "manifest.json").read_text())
    assert data["dataset"]["eval"]["samples"] == n_test
    assert data["dataset"]["val"]["source"] == "held out of train" and data["dataset"]["val"]["stratified"]
    assert data["dataset"]["val_size"] + data["dataset"]["train_size"] == len(train[1])


def test_the_input_model_is_not_changed(digits, tmp_path: Path) -> None:
    train, test = digits
    model = SmallResNet().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = train
    edgeq.compress(model, train=(x[:600], y[:600]), test=test, out=tmp_path / "art", progress=False, log=lambda s: None,
                   recipe=Recipe(variants=("unstructured",), finetune_unstructured=QUICK,
                                 **{**PINNED, "pruning_steps": 1}))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_every_fine_tune_of_an_export_runs_at_the_builds_thread_count(digits, tmp_path: Path, monkeypatch) -> None:
    """Float sums depend on torch's thread count, so an export's fine-tunes run at a fixed one
    (build.TRAIN_THREADS) whatever ran before them: measuring a TorchScript file (one thread, as verify
    does) must not leave the process at one thread for the QAT fine-tune after it."""
    import edgeq.context
    from edgeq.build import TRAIN_THREADS
    from edgeq.timing import threads

    train, test = digits
    seen: list[tuple[str, int]] = []
    real = edgeq.context.fit

    def observed(*args, **kwargs):  # the real fine-tune, with the thread count it ran at noted
        seen.append((kwargs.get("desc") or "", torch.get_num_threads()))
        return real(*args, **kwargs)

    monkeypatch.setattr(edgeq.context, "fit", observed)
    x, y = train
    recipe = Recipe(variants=("structured", "qat"), finetune_structured=QUICK, qat=Finetune(epochs=1, lr=1e-4),
                    **{**PINNED, "pruning_steps": 1})
    with threads(1):  # the caller's count, which the export's own replaces and then restores
        manifest = edgeq.compress(SmallResNet().eval(), train=(x[:600], y[:600]), test=test, out=tmp_path / "art",
                                  progress=False, log=lambda s: None, recipe=recipe)
        assert torch.get_num_threads() == 1
    names = {a.name for a in manifest.artifacts}
    assert "model-fp32-ts" in names, "no TorchScript file was measured before the fine-tunes: proves nothing"
    assert any("QAT" in desc for desc, _ in seen) and any("structured" in desc for desc, _ in seen), seen
    assert TRAIN_THREADS != 1 and {n for _, n in seen} == {TRAIN_THREADS}, seen


# bad input: one line, before any training or writing ---------------------------------------------------


class Regressor(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).sum(1)


class NaNModel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :10] * float("nan")


@pytest.mark.parametrize("case, error, needle", [
    ("not a module", ConfigError, "expected a torch.nn.Module"),
    ("not logits", ConfigError, "logits [batch, classes]"),
    ("labels out of range", DataError, "labels range over [0, 42]"),
    ("shapes differ", DataError, "per sample but test inputs are"),
    ("nan inputs", DataError, "NaN or Inf"),
    ("nan outputs", DataError, "NaN or Inf logits"),
    ("empty", DataError, "empty"),
])
def test_bad_input_is_one_line_before_any_work(digits, tmp_path: Path, case: str, error, needle: str) -> None:
    (x, y), test = digits
    x, y = x[:64], y[:64]
    model: object = SmallResNet().eval()
    train = (x, y)
    match case:
        case "not a module":
            model = lambda t: t  # noqa: E731
        case "not logits":
            model = Regressor()
        case "labels out of range":
            train = (x, np.where(np.arange(len(y)) == 3, 42, y))
        case "shapes differ":
            train = (x[:, :, :20, :20], y)
        case "nan inputs":
            bad = x.copy()
            bad[5, 0, 3, 3] = np.nan
            train = (bad, y)
        case "nan outputs":
            model = NaNModel()
        case "empty":
            train = (x[:0], y[:0])
    out = tmp_path / "art"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(error, match=needle.replace("[", r"\[").replace("]", r"\]")) as info:
        edgeq.compress(model, train=train, test=test, out=out, force=True, progress=False, log=lambda s: None)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


class NoOnnx(nn.Module):
    """Traces in torch.fx and TorchScript, but the ONNX exporter has no symbolic for the op."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x.flatten(1))
        return y + torch.cummax(y, dim=1).values * 0.0


def test_a_model_the_onnx_exporter_refuses_names_the_operator_and_keeps_the_rest(digits, tmp_path: Path) -> None:
    train, test = digits
    manifest = edgeq.compress({"odd": NoOnnx()}, train=train, test=test, out=tmp_path / "art", progress=False,
                              log=lambda s: None, recipe=Recipe(variants=("static",), **PINNED))
    names = {a.name for a in manifest.artifacts}
    skipped = {s["name"]: s["reason"] for s in manifest.skipped}
    assert {"odd-fp32-ts", "odd-fp32-ckpt"} <= names and "odd-static-ts" in names | set(skipped)
    assert "cummax" in skipped["odd-fp32-onnx"]
    assert "odd-static-onnx" in skipped


# the CLI with FILE.py:FUNC ------------------------------------------------------------------------------


def write_user_files(tmp_path: Path) -> Path:
    src = tmp_path / "my_model.py"
    src.write_text(
        "import torch\nfrom torch import nn\nfrom edgeq.examples.mnist import Preprocessing, load_data\n"
        "def build():\n    torch.manual_seed(0)\n    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))\n"
        "def load():\n    ds, pre = load_data(), Preprocessing()\n"
        "    return (pre.apply(ds.train.images[:256]), ds.train.labels[:256]), (pre.apply(ds.test.images[:100]), ds.test.labels[:100])\n"
        "def broken():\n    raise RuntimeError('checkpoint not found')\n")
    (tmp_path / "recipe.toml").write_text('variants = ["structured"]\nsearch_budget_s = 0.001\nexecutorch = false\n'
                                          '[finetune_structured]\nepochs = 1\n')
    return src


def test_cli_takes_a_model_and_data_from_files(tmp_path: Path) -> None:
    src = write_user_files(tmp_path)
    out = tmp_path / "art"
    r = CliRunner().invoke(main, ["export", "--model", f"{src}:build", "--data", f"{src}:load", "--out", str(out),
                                  "--recipe", str(tmp_path / "recipe.toml"), "--quiet"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert {a["name"] for a in manifest["artifacts"]} >= {"my_model-fp32-onnx", "my_model-structured-onnx"}
    assert manifest["models"]["my_model"]["recipe"]["variants"] == ["structured"]


@pytest.mark.parametrize("model, data, needle", [
    ("missing.py:build", "{src}:load", "missing.py does not exist"),
    ("{src}:nope", "{src}:load", "has no function 'nope'"),
    ("{src}:broken", "{src}:load", "broken() raised RuntimeError: checkpoint not found"),
    ("{src}:build", None, "needs --data"),
])
def test_cli_model_spec_errors_are_one_line(tmp_path: Path, model: str, data: str | None, needle: str) -> None:
    src = write_user_files(tmp_path)
    args = ["export", "--model", model.format(src=src), "--out", str(tmp_path / "art"), "--quiet"]
    if data:
        args += ["--data", data.format(src=src)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip().count("\n") == 0 and needle in r.output, r.output
    assert not (tmp_path / "art").exists()


def test_recipe_round_trips_and_refuses_unknown_keys(tmp_path: Path) -> None:
    r = Recipe(variants=("structured", "qat"), structured=Structured(amount=0.25, round_to=16), seed=3)
    assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    bad = tmp_path / "r.toml"
    bad.write_text("[structured]\nratio = 0.5\n")
    with pytest.raises(ConfigError, match="unknown setting 'ratio'"):
        Recipe.from_file(bad)


@pytest.mark.parametrize("value", [0.0, 1.5, float("nan")])
def test_the_size_limit_is_a_fraction_of_the_parent(value: float) -> None:
    with pytest.raises(ConfigError, match="max_int8_size_ratio is a fraction"):
        Recipe(max_int8_size_ratio=value)


def test_structured_allocation_and_cap_are_checked() -> None:
    with pytest.raises(ConfigError, match="unknown structured allocation 'greedy'"):
        Structured(allocation="greedy")
    with pytest.raises(ConfigError, match="structured cap 0.2 must be in"):
        Structured(amount=0.5, cap=0.2)
