"""What the stages of one build share: the data splits, the decisions, the lineage, and per model
its recipe's narrowed settings, budgets and the validation logits of the files already written.

`Family.record` is the one way a written file enters the manifest: it runs the file in its own
runtime on the validation and test splits, checks its outputs are finite, judges it against the
contract (edgeq.policy) on the validation split, and either records it or deletes it and says why.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeq import policy, runtime
from edgeq.data import Arrays
from edgeq.decisions import Decisions
from edgeq.errors import ConfigError, EdgeqError, FinetuneError  # noqa: F401 (FinetuneError: re-exported)
from edgeq.lineage import FloatVariant, Lineage, file_of, name_of
from edgeq.manifest import Artifact, sha256_file
from edgeq.metrics import agreement, correct_count, finite, sqnr_db
from edgeq.plan import FamilyPlan
from edgeq.recipe import Finetune, Recipe, Settings, narrow
from edgeq.timing import threads
from edgeq.train import fit, predict_logits

DEPLOYED_SAMPLES = 32  # validation inputs each float file also runs at the deployment batch
FinetuneFn = Callable[[nn.Module, tuple[np.ndarray, np.ndarray], int], nn.Module]


@dataclass(frozen=True)
class Splits:
    """train feeds calibration, fine-tunes and QAT; val every accuracy decision; test is only reported."""

    train: Arrays
    val: Arrays
    test: Arrays
    val_source: dict  # how val was obtained: given, or held out of train (fraction, seed, stratified)


@dataclass(frozen=True)
class Bars:
    """The contract's bars, in points (edgeq.policy)."""

    max_accuracy_drop: float
    max_pruning_drop: float

    def of(self, kind: str, pruned: bool) -> list[tuple[str, float]]:
        return policy.bars(kind, pruned, self.max_accuracy_drop, self.max_pruning_drop)


@dataclass
class Budget:
    """Seconds shared by the parents still to be measured: each gets an equal share of what is left,
    so what one leaves unused carries over to the next."""

    seconds: float
    parents: int

    def share(self) -> float:
        return self.seconds / max(self.parents, 1)

    def spend(self, seconds: float) -> None:
        self.seconds, self.parents = max(self.seconds - seconds, 0.0), max(self.parents - 1, 0)

    def charge(self, seconds: float) -> None:
        """Seconds spent on work every turn needs before any turn starts (a parent's calibration candidates),
        taken from what the turns share: no turn is used up."""
        self.seconds = max(self.seconds - seconds, 0.0)

    def reshare(self, parts: int) -> None:
        """What is left, shared from now on by `parts` (the bars of a stage that runs after the last of the
        parents it was set for): none of them takes what the others after it would need."""
        self.parents = parts

    @contextlib.contextmanager
    def turn(self) -> Iterator[Budget]:
        """One parent's turn: what the block spends is charged as usual; a turn that spends nothing (its bar
        did not run, or failed before it measured) is closed with nothing spent, so its part passes on."""
        parts = self.parents
        try:
            yield self
        finally:
            if self.parents == parts:
                self.spend(0.0)


@dataclass
class Build:
    """One export: where it writes, the data, the decisions and what it has recorded so far."""

    dir: Path
    splits: Splits
    decisions: Decisions
    lineage: Lineage
    user_finetune: FinetuneFn | None = None
    progress: bool = True
    timings: dict = field(default_factory=dict)
    pool: object = None  # an edgeq.trials.Pool: where the untimed trials run
    workers: dict = field(default_factory=dict)  # how: recorded in the manifest's environment

    @property
    def log(self) -> Callable[[str], None]:
        return self.lineage.log

    @property
    def replaying(self) -> bool:
        return self.decisions.replaying

    def finetuner(self, spec: Finetune, seed: int, desc: str) -> Callable[..., nn.Module]:
        """A fine-tune step `run(model, on_epoch=None)`: the user's `finetune` when given, else edgeq's own
        loop with `spec` (`on_epoch(model, epoch)` is called before each epoch of edgeq's loop only)."""
        train = self.splits.train

        def run(model: nn.Module, on_epoch: Callable[[nn.Module, int], None] | None = None) -> nn.Module:
            if self.user_finetune is not None:
                out = self.user_finetune(model, (np.array(train.x), np.array(train.y)), spec.epochs)
                if not isinstance(out, nn.Module):
                    raise FinetuneError(f"finetune returned {type(out).__name__}; it must return the fine-tuned "
                                        "nn.Module")
                return out.eval()
            return fit(model, train, spec, seed=seed, desc=desc, progress=self.progress, on_epoch=on_epoch,
                       copy_model=False)

        return run


@dataclass
class Ship:
    """A recorded int8 file's ship decision, taken later with its siblings (edgeq.speed.settle): timed against
    its fp32 `parent` file in `fmt`; `on_gate(gate)` records the decision and has the last word, as `record`'s
    `ship` had: None when the file is dropped (deleted and listed under skipped), else the note it ships with."""

    fmt: str
    parent: Path
    on_gate: Callable[[dict], str | None]


@dataclass
class Awaiting:
    """A file `record` added to `out` whose ship decision is still to come (`Ship`)."""

    ship: Ship
    art: Artifact
    out: Lineage
    path: Path


@dataclass
class Family:
    """One model of the build and the state its stages share."""

    build: Build
    name: str
    recipe: Recipe
    example: torch.Tensor  # one input [1, ...]
    plan: FamilyPlan
    calibration: list[np.ndarray] = field(default_factory=list)
    budgets: dict[str, Budget] = field(default_factory=dict)
    val_logits: dict[str, np.ndarray] = field(default_factory=dict)  # artifact name -> its logits on val
    cache: dict = field(default_factory=dict)  # what a stage derives once per variant and reuses (a cropped model)
    awaiting: list[Awaiting] = field(default_factory=list)  # files recorded, their ship decisions to come (edgeq.speed)

    @property
    def settings(self) -> Settings:
        """The recipe narrowed per stage (edgeq.recipe.narrow), once."""
        if "settings" not in self.cache:
            self.cache["settings"] = narrow(self.recipe)
        return self.cache["settings"]

    @property
    def bars(self) -> Bars:
        return Bars(self.settings.max_accuracy_drop, self.settings.max_pruning_drop)

    def contract_of(self, precision: str, pruned: bool, method: str | None) -> policy.Contract:
        """The rule book's contract for a file of this family (edgeq.policy.contract, with its recipe's bars)."""
        return policy.contract(precision, pruned, method, self.settings.max_accuracy_drop,
                               self.settings.max_pruning_drop)

    @property
    def val(self) -> Arrays:
        return self.build.splits.val

    def path(self, variant: str, fmt: str) -> Path:
        return self.build.dir / file_of(self.name, variant, fmt)

    def deployed_inputs(self) -> np.ndarray:
        """The validation inputs a float file is also run on at the deployment batch (the batch every
        decision is measured at is larger): enough for a few batches, and at least DEPLOYED_SAMPLES."""
        n = max(DEPLOYED_SAMPLES, 2 * self.settings.timing.deployment_batch)
        return np.array(self.val.x[:n])  # a writable copy: torch warns on read-only arrays

    def val_correct(self, name: str) -> int | None:
        logits = self.val_logits.get(name)
        return None if logits is None else correct_count(logits, self.val.y)

    def contract(self, fmt: str, precision: str, pruned: bool, parent: str | None, method: str | None,
                 logits: np.ndarray) -> dict:
        """The bars this file is held to, measured on the validation split against the files already
        recorded (its parent, the family's fp32 file of its format), and whether it meets them."""
        n, correct = len(self.val), correct_count(logits, self.val.y)
        refs = {"parent": parent, "fp32": name_of(self.name, "fp32", fmt)}
        rules = self.contract_of(precision, pruned, method)
        bars = []
        for ref, points in rules.bars:
            ref_correct = self.val_correct(refs[ref])
            if ref_correct is None:  # its reference was not shipped: nothing to be held against
                continue
            drop = policy.drop_points(ref_correct, correct, n)
            bars.append({"relative_to": refs[ref], "max_drop_points": points, "drop_points": drop,
                         "met": policy.within_bar(drop, points)})
        out = {"split": "val", "samples": n, "correct": correct, "bars": bars, "agreement": None}
        if rules.min_agreement is not None and parent in self.val_logits:
            value = round(agreement(self.val_logits[parent], logits), 6)
            out["agreement"] = {"relative_to": parent, "min": rules.min_agreement, "value": value,
                                "met": policy.within_agreement(value, rules.min_agreement)}
        out["met"] = all(b["met"] for b in bars) and (out["agreement"] or {"met": True})["met"]
        return out

    def record(self, out: Lineage, v: FloatVariant, variant: str, fmt: str, *, precision: str, parent: str | None,
               quantization: dict | None, runtime_info: dict, notes: str = "",
               fidelity: Callable[[np.ndarray, np.ndarray], str | None] | None = None,
               ship: Ship | None = None) -> Artifact | None:
        """Measure a written file from disk and record it in `out` (its stage's lineage), or delete it and record
        why in `out` when its outputs are not finite, it
        is not faithful to what it was built from (`fidelity(val_logits, deployed_logits)` returns why: the
        second on `deployed_inputs`, run at the deployment batch), or it breaks the
        contract; then `ship` (the speed rule) has the last word, once the stage settles the ship decisions of
        the parent's files together (edgeq.speed.settle): it may still take the file out of `out`."""
        b, path, name = self.build, self.path(variant, fmt), name_of(self.name, variant, fmt)
        # one thread, as `edgeq verify` measures it: the same sums, the same predictions. A torch runner sets
        # torch's process-wide count as it loads: the build's own (its fine-tunes') is restored after the block
        with threads(1):
            try:
                runner = runtime.load(path, fmt, threads=1, options=runtime.load_options(fmt, runtime_info))
            except EdgeqError as exc:  # written, but its runtime refuses it: that file alone is not shipped
                path.unlink(missing_ok=True)
                cause = str(exc).removeprefix(f"{path.name}: ").removesuffix("; re-run `edgeq export`")
                out.skip(name, f"{path.name} was written, but its runtime cannot load it back ({cause}); "
                                     "not shipped, the other formats are built")
                return None
            val_logits = runner.predict(np.array(self.val.x))  # writable copies: torch warns on read-only
            test_logits = runner.predict(np.array(b.splits.test.x))
            deployed = (runner.predict(self.deployed_inputs(), batch=self.settings.timing.deployment_batch)
                        if fidelity is not None else None)
        why = None if finite(val_logits) and finite(test_logits) else "its outputs hold NaN or Inf"
        why = why or nonfinite_weights(path, fmt)
        why = why or (fidelity(val_logits, deployed) if fidelity is not None else None)
        method = (quantization or {}).get("method")
        contract = self.contract(fmt, precision, v.pruning is not None, parent, method, val_logits)
        if why is None and not contract["met"]:
            why = _broken(contract)
            kind = "below_accuracy_bar"
        else:
            kind = "not_built"
        if why is not None:
            path.unlink(missing_ok=True)
            over = [bar["drop_points"] for bar in contract["bars"] if not bar["met"]]
            out.skip(name, why, kind, contract=contract, best_drop_points=max(over) if over else None)
            return None
        self.val_logits[name] = val_logits
        n_test = len(b.splits.test)
        art = Artifact(
            name=name, file=path.name, format=fmt, precision=precision, model=self.name,
            architecture=v.shape["architecture"], parent=parent, quantization=quantization, pruning=v.pruning,
            params=v.shape["params"][0], nonzero_params=v.shape["params"][1], bytes=path.stat().st_size,
            sha256=sha256_file(path), accuracy=correct_count(test_logits, b.splits.test.y) / n_test,
            runtime=runtime_info, macs=v.shape["macs"], notes=notes,
            val_accuracy=contract["correct"] / contract["samples"], contract=contract)
        if ship is not None:
            self.awaiting.append(Awaiting(ship, art, out, path))
        return out.add(art)


def _broken(contract: dict) -> str:
    parts = [f"{b['drop_points']:.2f} points below {b['relative_to']} (bar {b['max_drop_points']:g})"
             for b in contract["bars"] if not b["met"]]
    a = contract.get("agreement")
    if a and not a["met"]:
        parts.append(f"top-1 agreement {a['value']:.3f} with {a['relative_to']} (at least {a['min']:g})")
    return f"on the validation split ({contract['samples']} samples): " + "; ".join(parts)


def nonfinite_weights(path: Path, fmt: str) -> str | None:
    """Why a file's stored float weights are not all finite (NaN or Inf), or None."""
    if fmt == "onnx":
        import onnx
        from onnx import numpy_helper

        tensors = ((t.name, numpy_helper.to_array(t)) for t in onnx.load(str(path)).graph.initializer)
    elif fmt == "checkpoint":
        tensors = ((k, v.numpy()) for k, v in runtime.load_state_dict(path).items())
    else:
        return None  # TorchScript: its outputs are checked; int8 packed weights hold no floats to check
    for name, array in tensors:
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            return f"its weight {name} holds NaN or Inf (an overflow in training or pruning); not shipped"
    return None


def fidelity(fam: "Family", model: nn.Module):
    """The fidelity test of a float file of `model` (for Family.record): its logits against the model's own,
    on the validation split at the evaluation batch, and on `fam.deployed_inputs()` at the deployment batch,
    where a file deployed one sample at a time would show a graph fixed to one batch or one branch."""
    batch = fam.settings.timing.deployment_batch
    eager = predict_logits(model, np.array(fam.val.x))
    deployed = predict_logits(model, fam.deployed_inputs(), batch=batch)

    def check(got: np.ndarray, got_deployed: np.ndarray) -> str | None:
        return faithful(eager, got) or faithful(deployed, got_deployed, f"at the deployment batch of {batch}")

    return check


def faithful(eager: np.ndarray, got: np.ndarray, where: str = "") -> str | None:
    """Why a float file does not compute what its model computes (on the validation inputs, `where`), or None."""
    if got.shape != eager.shape:
        return f"its output shape {list(got.shape)} differs from the model's {list(eager.shape)}"
    sqnr = sqnr_db(eager, got)
    if not policy.faithful(sqnr):
        agree = float((eager.argmax(1) == got.argmax(1)).mean())
        return (f"it does not compute what the model computes on the validation inputs{' ' + where if where else ''} "
                f"(logit SQNR {sqnr:.1f} dB, top-1 agreement {agree:.3f}): the model's graph depends on its input "
                "(data-dependent control flow is traced on one branch) or on the batch, or holds values the file "
                "format cannot carry; make the forward pass input-independent")
    return None
