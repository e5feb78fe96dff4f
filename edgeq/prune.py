"""Pruning: unstructured (global L1 or random) and structured channel pruning with physical removal.

Unstructured pruning zeroes weights through torch.nn.utils.prune, fine-tunes with the masks in
place, then makes the zeros permanent (`prune.remove`), so later stages see plain modules: a
module still carrying `weight_orig`/`weight_mask` breaks quantization and TorchScript.

Structured pruning picks the hidden channels (conv filters, hidden units) with the smallest L2
norm per layer, `ln_structured(n=2, dim=0)` semantics, and removes them for real: the layer, its
batch norm and every consumer of that channel (the next conv, the flatten into the classifier,
the next linear) shrink. The dependency graph comes from torch-pruning, which traces the model
instead of relying on layer names, so removal stays correct when the architecture changes.
The output layer is never pruned.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import prune as tprune

from edgeq.errors import ConfigError
from edgeq.models import IMAGE, ModelConfig, widths

METHODS = ("l1_unstructured", "random_unstructured", "l2_structured")


@dataclass(frozen=True)
class PruneConfig:
    method: str = "l1_unstructured"
    amount: float = 0.8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown pruning method {self.method!r}: choose one of {', '.join(METHODS)}")
        if not 0.0 < self.amount < 1.0:
            raise ConfigError(f"pruning amount {self.amount} is out of range: use a fraction between 0 and 1, e.g. 0.8")

    @property
    def structured(self) -> bool:
        return self.method == "l2_structured"


@dataclass
class PruneResult:
    model: nn.Module
    config: ModelConfig  # architecture after pruning (narrower for structured pruning)
    sparsity: float  # measured fraction of zero weights in the prunable layers
    removed: dict[str, int]  # structured: channels removed per layer


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def weight_sparsity(model: nn.Module) -> float:
    layers = weight_layers(model)
    total = sum(m.weight.numel() for _, m in layers)
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
    return zeros / total


def prune_model(
    model: nn.Module,
    model_cfg: ModelConfig,
    cfg: PruneConfig,
    finetune: Callable[[nn.Module], nn.Module] | None = None,
) -> PruneResult:
    """Prune a copy of `model`, fine-tune it with `finetune` (if given), and make the result permanent."""
    if cfg.structured:
        return _structured(model, model_cfg, cfg, finetune)
    return _unstructured(model, model_cfg, cfg, finetune)


def _unstructured(model, model_cfg, cfg, finetune) -> PruneResult:
    model = copy.deepcopy(model)
    params = [(m, "weight") for _, m in weight_layers(model)]
    torch.manual_seed(cfg.seed)
    method = tprune.L1Unstructured if cfg.method == "l1_unstructured" else tprune.RandomUnstructured
    tprune.global_unstructured(params, pruning_method=method, amount=cfg.amount)
    if finetune is not None:
        model = finetune(model)  # masks stay applied: pruned weights remain exactly zero
    for m, name in params_of(model):
        tprune.remove(m, name)
    return PruneResult(model.eval(), model_cfg, weight_sparsity(model), {})


def params_of(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for _, m in weight_layers(model) if tprune.is_pruned(m)]


def channels_to_remove(weight: torch.Tensor, amount: float) -> list[int]:
    """Output channels that ln_structured(n=2, dim=0) would zero at this amount."""
    mask = tprune.LnStructured(amount, n=2, dim=0).compute_mask(weight.detach(), torch.ones_like(weight))
    rows = mask.flatten(1).sum(dim=1)
    return [int(i) for i in torch.nonzero(rows == 0).flatten()]


def remove_channels(model: nn.Module, plan: dict[str, list[int]]) -> nn.Module:
    """Physically remove output channels `plan[layer]` from a copy of model, with all dependents."""
    import torch_pruning as tp

    model = copy.deepcopy(model).eval()
    example = torch.zeros(1, *IMAGE)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    modules = dict(model.named_modules())
    for name, idxs in plan.items():
        if not idxs:
            continue
        layer = modules[name]
        fn = tp.prune_conv_out_channels if isinstance(layer, nn.Conv2d) else tp.prune_linear_out_channels
        group = graph.get_pruning_group(layer, fn, idxs=idxs)
        group.prune()
    return model


def _structured(model, model_cfg, cfg, finetune) -> PruneResult:
    layers = weight_layers(model)
    prunable = layers[:-1]  # never the output layer
    plan = {name: channels_to_remove(m.weight, cfg.amount) for name, m in prunable}
    for name, idxs in plan.items():
        if len(idxs) >= dict(prunable)[name].weight.shape[0]:
            raise ConfigError(f"pruning amount {cfg.amount} would remove every channel of {name}: use a smaller amount")
    pruned = remove_channels(model, plan)
    if finetune is not None:
        pruned = finetune(pruned)
    hidden, channels = widths(pruned)
    return PruneResult(
        pruned.eval(),
        model_cfg.with_widths(hidden, channels),
        weight_sparsity(pruned),
        {name: len(idxs) for name, idxs in plan.items()},
    )
