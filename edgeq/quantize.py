"""int8 quantization in PyTorch for any model torch.fx can trace: one verb, `quantize`, with the
mode in its config.

This module is the only place that touches `torch.ao.quantization`. It uses FX graph mode
(`prepare_fx` / `prepare_qat_fx` / `convert_fx`): the model is traced symbolically and FX finds
what to fuse (Conv-BN-ReLU, Linear-ReLU) and what to quantize from the graph and the x86 backend
config, so nothing here knows a model by name, layer name or input size. Eager mode (QuantStub,
hand-written fuse lists) is gone; QuantStub/DeQuantStub left in a model are harmless identities.

A model FX cannot trace or convert (Python control flow on tensor values, unsupported ops) raises
`QuantizeError`, one line naming the code or graph node and the fix. Deprecation chatter from
torch.ao, FX and TorchScript is silenced here: users cannot act on it.
"""

from __future__ import annotations

import contextlib
import copy
import os
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx, nn

from edgeq.errors import ConfigError, ExportError, QuantizeError, first_line
from edgeq.recipe import MODES

ENGINES = ("x86", "fbgemm", "qnnpack")
_TWIN = "edgeq.qat_float"  # key of the QAT float twin in the int8 GraphModule's `meta`
_ENGINE = "edgeq.quantized_engine"  # key of the engine an int8 GraphModule was built in, in its `meta`
_TORCH_DIR = os.path.dirname(torch.__file__)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence torch.ao / FX / TorchScript deprecation chatter for the duration of a call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def engine(name: str | None) -> Iterator[None]:
    """Select torch's quantized engine (process-wide in torch) for this block only; None keeps it.

    An int8 model runs in the engine it was built in: its packed weights and its activations'
    quantization follow the engine, so the same model gives other outputs in another one.
    """
    previous = torch.backends.quantized.engine
    if name is not None and name != previous:
        torch.backends.quantized.engine = name
    try:
        yield
    finally:
        if torch.backends.quantized.engine != previous:
            torch.backends.quantized.engine = previous


def built_in(model: nn.Module) -> str | None:
    """The quantized engine an int8 model from `quantize` was built in (None for any other model)."""
    return getattr(model, "meta", {}).get(_ENGINE)


@dataclass(frozen=True)
class QuantConfig:
    mode: str
    engine: str = "x86"
    calibration_samples: int = 512  # static: at most this many samples run through the observers

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"unknown quantization mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.engine not in ENGINES:
            raise ConfigError(f"unknown quantized engine {self.engine!r}: choose one of {', '.join(ENGINES)}")
        if self.calibration_samples < 1:
            raise ConfigError(f"calibration_samples must be positive, got {self.calibration_samples}")

    def qconfig_mapping(self):
        """The torch.ao QConfigMapping this config quantizes with."""
        from torch.ao.quantization import (QConfigMapping, default_dynamic_qconfig, get_default_qat_qconfig_mapping,
                                           get_default_qconfig_mapping)

        match self.mode:
            case "dynamic":
                # global, so that FX fuses Linear-ReLU; ops without dynamic int8 kernels ignore it
                return QConfigMapping().set_global(default_dynamic_qconfig)
            case "static":
                return get_default_qconfig_mapping(self.engine)
            case "qat":
                return get_default_qat_qconfig_mapping(self.engine)
        raise AssertionError(self.mode)

    def describe(self) -> dict:
        """The manifest's `quantization` entry for a torch int8 artifact, read off the qconfig used."""
        with quiet():
            mapping = self.qconfig_mapping()
            qconfig = mapping.global_qconfig
            act, weight = qconfig.activation(), qconfig.weight()
        act = getattr(act, "activation_post_process", act)  # QAT: the observer inside the fake-quant
        weight = getattr(weight, "activation_post_process", weight)
        per_channel = weight.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine)
        common = {"method": self.mode, "runtime": "torch", "framework": "torch.ao FX graph mode", "engine": self.engine,
                  "weights": str(weight.dtype).removeprefix("torch."), "per_channel": per_channel}
        if self.mode == "dynamic":
            return {**common, "activations": "fp32, quantized per batch at run time", "calibration": None,
                    "reduce_range": True,  # torch's dynamic Linear kernels quantize activations to 7 bits
                    "layers": ("Linear, LSTM and GRU (FX dynamic qconfig); convolutions and every other op "
                               "stay fp32")}
        return {**common, "activations": str(act.dtype).removeprefix("torch."),
                "calibration": (f"{type(act).__name__} on at most {self.calibration_samples} calibration samples"
                                if self.mode == "static" else "learned during quantization-aware fine-tuning"),
                "reduce_range": bool(act.reduce_range),
                "layers": (f"all Conv/Linear and the ops between them supported by the {self.engine} FX qconfig "
                           "mapping, fused with a following BatchNorm/ReLU by FX; other ops run in fp32")}


def quantize(
    model: nn.Module,
    cfg: QuantConfig,
    example: torch.Tensor,
    calibration: list[np.ndarray] | None = None,
    finetune: Callable[..., nn.Module] | None = None,
) -> nn.Module:
    """Return a new int8 model (a converted FX GraphModule); `model` itself is never changed.

    `example` is a float batch of the model's input shape: it is traced with and the int8 model is
    checked to run on it. static needs `calibration` (float batches, at most
    `cfg.calibration_samples` samples are used); qat needs `finetune(prepared, on_epoch=...)`, which
    trains the prepared fake-quant model in place and returns it. A qat result also carries its
    float twin for ONNX: see `qat_float`. The result records `cfg.engine` (`built_in`): run it inside
    `engine(built_in(q))`; `to_torchscript` traces it there.
    """
    match cfg.mode:
        case "static" if not calibration:
            raise ConfigError("static quantization needs calibration data")
        case "qat" if finetune is None:
            raise ConfigError("quantization-aware training needs a fine-tuning function")
    from torch.ao.quantization import quantize_fx

    with quiet(), engine(cfg.engine):
        work = copy.deepcopy(model)
        prepare = quantize_fx.prepare_qat_fx if cfg.mode == "qat" else quantize_fx.prepare_fx
        work.train(cfg.mode == "qat")
        if cfg.mode == "qat":
            _trace_in_eval(work)
        try:
            prepared = prepare(work, cfg.qconfig_mapping(), (example,))
        except Exception as exc:
            raise QuantizeError(_trace_failure(exc, work)) from None
        twin = None
        match cfg.mode:
            case "static":
                with torch.no_grad():
                    for batch in _limit(calibration, cfg.calibration_samples):
                        _run(prepared, batch, "calibration of the traced model",
                             "calibration batches must be float batches shaped like `example`")
            case "qat":
                prepared = finetune(prepared, on_epoch=_qat_schedule)
                prepared.eval()
                twin = _float_twin(prepared)
        try:
            qmodel = quantize_fx.convert_fx(prepared.eval())
        except Exception as exc:
            raise QuantizeError(f"torch.ao FX cannot convert this model to int8: {first_line(exc)}") from None
        with torch.no_grad():
            _run(qmodel, example, "the int8 model",
                 "that op cannot take int8 input: quantize this model in dynamic mode, or keep that op in fp32")
    qmodel.meta[_ENGINE] = cfg.engine
    if twin is not None:
        qmodel.meta[_TWIN] = twin
    return qmodel


def qat_float(qmodel: nn.Module) -> nn.Module:
    """The float twin of a QAT int8 model returned by `quantize(..., QuantConfig("qat"), ...)`.

    A plain float GraphModule (no quantize/dequantize ops, BatchNorm folded into the convolutions,
    fused modules unfused into nn.Sequential) whose Conv/Linear weights are exactly the dequantized
    int8 weights QAT learned, biases in float. Activations are not quantized: onnxruntime
    re-quantizes it to QDQ after `torch.onnx.export`. A new copy on every call.
    """
    twin = getattr(qmodel, "meta", {}).get(_TWIN)
    if twin is None:
        raise QuantizeError("qat_float needs the int8 model that quantize() returned in qat mode; a static or "
                            "dynamic model has no QAT float weights")
    return copy.deepcopy(twin)


@contextlib.contextmanager
def fresh_types() -> Iterator[torch.jit.CompilationUnit]:
    """Trace into a compilation unit and type store of its own.

    TorchScript names a class `___torch_mangle_N.<Class>` when a class of that name was traced
    before in the process: the same model traced twice in one process would give two different
    files. A fresh unit per trace makes the bytes depend on the model only. The process-wide
    unit is restored afterwards.
    """
    import torch.jit._recursive as recursive
    import torch.jit._state as state

    unit, store = state._python_cu, recursive.concrete_type_store
    state._python_cu, recursive.concrete_type_store = torch._C.CompilationUnit(), recursive.ConcreteTypeStore()
    try:
        yield state._python_cu
    finally:
        state._python_cu, recursive.concrete_type_store = unit, store


def to_torchscript(model: nn.Module, example: torch.Tensor, freeze: bool = True) -> torch.jit.ScriptModule:
    """Trace (works for any model that runs, int8 or fp32) and, by default, freeze for inference.

    Freezing makes weights constants and inlines submodule code: smaller files. Unfrozen, the
    parameters keep their names (a checkpoint's state dict loads into it). The frozen module
    is checked against the model on the example batch plus one more row, where a batch size or a
    branch baked into the trace would show. `model`'s train/eval flag is restored. An int8 model
    from `quantize` is traced and checked in the quantized engine it was built in.
    """
    name = type(model).__name__
    batch = torch.cat([example, example[:1]])
    was_training = model.training
    model.eval()
    try:
        with quiet(), torch.no_grad(), engine(built_in(model)):
            try:
                with fresh_types() as unit:  # type names independent of what this process traced before
                    traced = torch.jit.trace(model, example, check_trace=False, _compilation_unit=unit,
                                             _store_inputs=False)  # the example input is not shipped
                    frozen = torch.jit.freeze(traced) if freeze else traced
            except Exception as exc:
                raise ExportError(f"torch.jit.trace cannot export {name}: {first_line(exc)}") from None
            want = model(batch)
            try:
                got = frozen(batch)
            except Exception as exc:
                got = exc
    finally:
        model.train(was_training)
    if isinstance(got, Exception) or got.shape != want.shape or not torch.allclose(want, got, rtol=1e-4, atol=1e-5):
        raise ExportError(f"the TorchScript trace of {name} does not reproduce it on a batch of {len(batch)}: its "
                          "forward depends on the batch size or on input values in Python code; make it traceable")
    return frozen


def _trace_in_eval(model: nn.Module) -> None:
    """QAT trains the traced graph, so what FX traces through is fixed at trace time: a module it
    traces through (not a leaf: torchvision's StochasticDepth, a user's block) has its `self.training`
    branches baked in. Those are traced as in eval mode, or stochastic depth would drop rows at
    inference in every QAT file. Leaf modules (nn.Dropout, nn.BatchNorm2d, the Conv/BN/ReLU that FX fuses,
    which must share a mode) keep their flag, which the fine-tune switches."""
    from torch.fx import Tracer

    tracer = Tracer()
    for name, module in model.named_modules():
        if not tracer.is_leaf_module(module, name):
            module.training = False


def _qat_schedule(model: nn.Module, epoch: int) -> None:
    """From the second epoch on, freeze batch-norm statistics; observers keep adapting."""
    if epoch >= 1:
        model.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)


def _limit(batches: list[np.ndarray], samples: int) -> Iterator[torch.Tensor]:
    """The calibration batches, cut after `samples` samples."""
    for batch in batches:
        if samples <= 0:
            return
        yield torch.as_tensor(batch[:samples])
        samples -= len(batch)


def _float_twin(prepared: fx.GraphModule) -> fx.GraphModule:
    """A float model from a fine-tuned QAT model: convert_to_reference_fx folds BN and gives
    reference modules (float weight + qparams); each becomes a plain module holding its
    quantize-dequantized weight, and the activation quantize/dequantize pairs are dropped."""
    from torch.ao.nn.intrinsic import _FusedModule
    from torch.ao.nn.quantized import reference
    from torch.ao.quantization.quantize_fx import convert_to_reference_fx

    ref = convert_to_reference_fx(copy.deepcopy(prepared))
    plain = {reference.Linear: nn.Linear, reference.Conv1d: nn.Conv1d, reference.Conv2d: nn.Conv2d,
             reference.Conv3d: nn.Conv3d, reference.ConvTranspose1d: nn.ConvTranspose1d,
             reference.ConvTranspose2d: nn.ConvTranspose2d, reference.ConvTranspose3d: nn.ConvTranspose3d}
    for name, module in list(ref.named_modules()):
        if type(module) in plain:
            _set_module(ref, name, _plain_copy(module, plain[type(module)]))
    for name, module in list(ref.named_modules()):
        if isinstance(module, _FusedModule):  # e.g. ConvReLU2d(conv, relu): a Sequential in all but name
            _set_module(ref, name, nn.Sequential(*module.children()))
    graph, used_before = ref.graph, {n.target for n in ref.graph.nodes if n.op == "get_attr"}
    for node in list(graph.nodes):
        if (node.op == "call_function" and node.target in (torch.quantize_per_tensor, torch.quantize_per_channel)
                or node.op == "call_method" and node.target == "dequantize"):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    graph.eliminate_dead_code()
    for target in used_before - {n.target for n in graph.nodes if n.op == "get_attr"}:
        if "." not in target and hasattr(ref, target):  # the activation scales and zero points
            delattr(ref, target)
    ref.delete_all_unused_submodules()
    ref.recompile()
    return ref.eval()


def _plain_copy(ref: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A plain float module of the reference module's shape, holding its int8-grid weight."""
    import inspect

    args = {k: getattr(ref, k) for k in inspect.signature(cls).parameters if k not in ("bias", "device", "dtype")}
    plain = cls(**args, bias=ref.bias is not None)
    with torch.no_grad():
        plain.weight.copy_(ref.get_weight())
        if ref.bias is not None:
            plain.bias.copy_(ref.bias)
    return plain


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _run(gm: fx.GraphModule, x: torch.Tensor, what: str, fix: str) -> torch.Tensor:
    """Run a traced model; on failure name the graph node that failed, and the fix."""
    try:
        return gm(x)
    except Exception:
        pass
    interpreter = _Locating(gm)
    try:
        return interpreter.run(x)
    except Exception as exc:
        node = interpreter.failed
        where = f"node {node.name} ({_describe_target(gm, node)})" if node is not None else "its forward"
        raise QuantizeError(f"{what} fails at {where}: {first_line(exc)}; {fix}") from None


class _Locating(fx.Interpreter):
    """An FX interpreter that remembers the node it failed on."""

    failed: fx.Node | None = None

    def run_node(self, n: fx.Node):
        try:
            return super().run_node(n)
        except Exception:
            self.failed = self.failed or n
            raise


def _describe_target(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target}: {type(gm.get_submodule(node.target)).__name__}"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return getattr(node.target, "__name__", str(node.target))


def _trace_failure(exc: Exception, model: nn.Module) -> str:
    """One line for a model FX could not prepare; a tracing failure points at the layer and line of
    the model's code that stopped it (the innermost frame whose `self` is one of its modules)."""
    names = dict((id(m), n) for n, m in model.named_modules())
    where = None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        this = frame.f_locals.get("self")
        path = frame.f_code.co_filename
        if id(this) in names and not path.startswith(_TORCH_DIR):
            line = (traceback.FrameSummary(path, lineno, frame.f_code.co_name).line or "").strip()
            kind = type(this).__name__
            layer = f"layer {names[id(this)]!r} ({kind})" if names[id(this)] else f"{kind}.forward"
            where = f"{layer}, {os.path.basename(path)}:{lineno} `{line}`"
    if where is None:
        return (f"torch.ao FX cannot prepare {type(model).__name__} for int8: {first_line(exc)}; "
                "quantize it in dynamic mode, or change the part of the model this names")
    return (f"torch.fx cannot trace {type(model).__name__} at {where}: {first_line(exc)}; rewrite that code "
            "without Python control flow or conversions on tensor values (e.g. torch.where)")
