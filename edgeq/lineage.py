"""What a build records: each artifact with its parent, what it was measured to keep, and what was
skipped and why. Nothing here decides; the records are what the manifest and `edgeq verify` read.

Each stage returns a `Lineage` of its own (what it built, what it skipped, in order); `edgeq.build`
appends them to the build's, in stage order. `attempt` turns a variant's known failure into a skip of
that record; `runtime_info` is how a file of each format is run, as its manifest entry says.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from edgeq.manifest import Artifact

FORMATS = ("torchscript", "checkpoint", "onnx")  # in export order: a checkpoint runs in its TorchScript graph
EXT = {"checkpoint": "ckpt.pt", "torchscript": "ts.pt", "onnx": "onnx", "pte": "pte"}
SHORT = {"checkpoint": "ckpt", "torchscript": "ts", "onnx": "onnx", "pte": "pte"}


def name_of(model: str, variant: str, fmt: str) -> str:
    return f"{model}-{variant}-{SHORT[fmt]}"


def file_of(model: str, variant: str, fmt: str) -> str:
    return f"{model}-{variant}.{EXT[fmt]}"


@dataclass
class FloatVariant:
    """A float model variant (the model as given, or a pruned one) and its counts, counted once."""

    key: str  # fp32 | unstructured | structured
    model: nn.Module
    pruning: dict | None
    shape: dict = field(default_factory=dict)  # architecture, params, macs

    @classmethod
    def of(cls, key: str, model: nn.Module, pruning: dict | None, example: torch.Tensor) -> "FloatVariant":
        return cls(key, model, pruning, {"architecture": describe(model), "params": count_params(model),
                                         "macs": count_macs(model, example)})


@dataclass
class Lineage:
    """The artifacts a build wrote, in order, and the variants it did not ship."""

    log: Callable[[str], None]
    artifacts: list[Artifact] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    def get(self, name: str) -> Artifact | None:
        return next((a for a in self.artifacts if a.name == name), None)

    def add(self, art: Artifact) -> Artifact:
        self.artifacts.append(art)
        return art

    def skip(self, name: str, reason: str, kind: str = "not_built", **extra: object) -> None:
        self.skipped.append({"name": name, "kind": kind, "reason": reason, **extra})
        self.log(f"  {name}: not shipped ({reason})")

    def extend(self, stage: "Lineage") -> "Lineage":
        """Append what a stage recorded, in its order; returns this lineage."""
        self.artifacts.extend(stage.artifacts)
        self.skipped.extend(stage.skipped)
        return self


def attempt(out: Lineage, name: str, build):
    """Run one variant's build; a known failure (EdgeqError) becomes a `skipped` entry of `out`, not a crash.
    What must stop the whole export (a finetune that breaks its contract, a plan that cannot be replayed)
    is raised."""
    from edgeq.errors import EdgeqError, FinetuneError
    from edgeq.plan import PlanError

    try:
        return build()
    except (FinetuneError, PlanError):
        raise
    except EdgeqError as exc:
        out.skip(name, str(exc))
        return None


def runtime_info(fmt: str, precision: str = "fp32", graph: str | None = None, engine: str | None = None,
                 activations: str | None = None) -> dict:
    if fmt == "onnx":
        from edgeq.runtime import int8_session

        options = int8_session(activations) if precision == "int8" else {}
        info = {"engine": "onnxruntime", "providers": ["CPUExecutionProvider"], "session_options": options}
        if precision == "int8":
            info["graph"] = ("portable QDQ; onnxruntime's default optimizations (ORT_ENABLE_ALL) fuse it into the "
                             "int8 kernels listed in quantization.optimized_ops when the session loads. The optimized "
                             "form holds CPU-specific layout ops (NCHWc, NHWC) and is not shipped.")
        return info
    if fmt == "checkpoint":
        return {"engine": "torch", "devices": ["cpu", "cuda"], "graph": graph,
                "load": ("torch.load(weights_only=True)['state_dict']: into the model's own class, or into the "
                         "TorchScript `graph` beside it (how edgeq verify runs it without the model's code)")}
    if precision == "fp32":
        return {"engine": "torch", "devices": ["cpu", "cuda"]}
    # torch.ao int8 kernels exist only on CPU, in the quantized engine the file was built for
    return {"engine": "torch", "devices": ["cpu"], "quantized_engine": engine or "x86"}



def describe(model: nn.Module) -> dict:
    """The manifest's `architecture` of a model, found by type: class, layer counts, output widths."""
    kinds: dict[str, int] = {}
    widths = []
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            kinds[type(m).__name__] = kinds.get(type(m).__name__, 0) + 1
            widths.append(int(m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features))
    return {"class": f"{type(model).__module__}.{type(model).__qualname__}", "layers": kinds, "widths": widths}


def count_params(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters) of a float model."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(int(torch.count_nonzero(p)) for p in params)


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on one sample (Torch-Pruning's counter); 0 if it cannot count."""
    import torch_pruning as tp

    try:
        macs, _ = tp.utils.count_ops_and_params(copy.deepcopy(model).eval(), example)
        return int(macs)
    except Exception:  # a counter's limitation must not stop an export
        return 0
