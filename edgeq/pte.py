"""ExecuTorch programs (`.pte`) with the XNNPACK delegate: torch.export -> PT2E int8 -> lowering.

The chain is ExecuTorch's own, one small step per function, each returning a new object:
`torch.export` captures the model; `quantize` runs PT2E with XNNPACK's quantizer (symmetric int8,
per-channel weights) and returns the converted torch model; `export_fp32` / `lower_int8` lower a
model with `to_edge_transform_and_lower(partitioner=[XnnpackPartitioner()])` -> `to_executorch()`
and write the file. Each returns what the manifest records: how much of the graph XNNPACK runs,
the versions, the input shape the program takes and how its threads are set.

A program has a fixed batch, the example's. A dynamic batch dimension is not used: in torch 2.14
the fake convolution re-run during XNNPACK lowering guards on the batch size (`_select_conv_backend`
refines the batch range to [2, 15] for an example of 2, to [16, max] for one of 16 or more), so
every convolutional program is cut to one side of 16, and a program whose range is widened back
segfaults at run time. `runtime.load(path, "pte")` splits a larger batch into calls of the
program's batch and pads the last one (docs/executorch.md has the measurements behind the choice).

Threads: ExecuTorch's XNNPACK delegate runs on one process-wide pthreadpool, sized by
`portable_lib._unsafe_reset_threadpool(n)` (n threads in all, the caller's included: 1 means no
worker thread); `runtime.load` sets it. Nothing reads an environment variable.

torch, torchao and executorch are imported inside the functions: `import edgeq.pte` is cheap and
works without ExecuTorch installed (`available()` then says how to install it).
"""

from __future__ import annotations

import contextlib
import copy
import operator
import os
import re
import sys
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from edgeq.errors import ExportError, IntegrityError, first_line
from edgeq.recipe import PTE_OBSERVERS

if TYPE_CHECKING:
    import torch

INSTALL = "pip install 'edgeq[executorch]'"
BACKEND = "XnnpackBackend"
THREADS_HOW = ("executorch.extension.pybindings.portable_lib._unsafe_reset_threadpool(n): one "
               "process-wide pthreadpool for the XNNPACK delegate, n threads including the caller's")
Mode = Literal["static", "qat"]


def available(runtime_only: bool = False) -> str | None:
    """None when ExecuTorch (with its XNNPACK-enabled runtime) imports; else the one-line reason.
    `runtime_only`: only what running a `.pte` needs (the runtime bindings, not the exporter, whose
    import takes seconds)."""
    try:
        with _quiet():  # a deprecation warning at import (PYTHONWARNINGS=error) is not a missing package
            portable_lib = bindings()
            if not runtime_only:
                from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner  # noqa: F401
    except Exception as exc:  # ImportError, or a binary that does not load against this torch
        return f"ExecuTorch is not installed ({first_line(exc, 120)}): {INSTALL}"
    if not portable_lib._is_available(BACKEND):
        return f"this ExecuTorch runtime has no XNNPACK backend: {INSTALL}"
    return None


def bindings():
    """ExecuTorch's runtime bindings (the module `executorch.extension.pybindings.portable_lib`
    re-exports). Its compiled module is imported directly: `portable_lib` also imports all of
    `executorch.exir`, the exporter (4 s here), for an ExperimentalWarning; running a `.pte` needs
    none of it. Where the compiled module is not where this ExecuTorch keeps it, `portable_lib`."""
    import executorch  # noqa: F401
    import torch  # noqa: F401  (the bindings link against libtorch: it must be loaded first)

    try:
        from executorch.extension.pybindings import _C
    except ImportError:
        from executorch.extension.pybindings import portable_lib as _C
    return _C


def versions() -> dict:
    """ExecuTorch's version and commit; XNNPACK is linked into its runtime at that commit (XNNPACK
    publishes no version number of its own)."""
    from executorch import version

    return {"executorch": version.__version__, "executorch_git": version.git_version,
            "xnnpack": f"linked into executorch {version.__version__} (git {str(version.git_version)[:12]})"}


# -- capture ----------------------------------------------------------------------------------------


def capture(model: torch.nn.Module, example: torch.Tensor, dynamic_batch: bool = False):
    """torch.export of `model` on `example` -> ExportedProgram; ExportError in one line on failure.

    `dynamic_batch` marks dim 0 dynamic (used for the PT2E graph, which calibrates and trains on
    batches of any size; the lowered program has a fixed batch, see the module docstring)."""
    import torch

    args = (example,)
    shapes = None
    if dynamic_batch:
        if example.shape[0] < 2:  # torch.export specialises a dimension whose example size is 1
            args = (example.expand(2, *example.shape[1:]).contiguous(),)
        shapes = ({0: torch.export.Dim("batch", min=1, max=1 << 16)},)
    try:
        with _quiet():
            return torch.export.export(model, args, dynamic_shapes=shapes)
    except Exception as exc:
        raise ExportError(f"{type(model).__name__}: torch.export cannot capture it ({construct(exc)}); "
                          "the .pte variants are skipped") from None


def construct(exc: BaseException) -> str:
    """The construct torch.export failed on, in a few words, from its exception."""
    text = str(exc)
    name = type(exc).__name__
    if ("data-dependent" in text or "data dependent" in text or "GuardOnDataDependent" in name
            or "DataDependent" in name):
        where = _user_frame(text)
        at = f" at {where}" if where else ""
        return f"data-dependent control flow{at}; rewrite it with torch.cond or move it out of forward"
    if "Unsupported" in name or "unsupported" in text.lower():
        return f"unsupported construct: {first_line(exc, 160)}"
    return f"{name}: {first_line(exc, 160)}"


def _user_frame(text: str) -> str | None:
    """`file.py:line` of the user's code in torch.export's message, when it names one."""
    import re

    for found in re.finditer(r'File "([^"]+)", line (\d+)', text):
        path = found.group(1)
        if "site-packages" not in path and "/torch/" not in path:
            return f"{Path(path).name}:{found.group(2)}"
    return None


# -- padding taps -----------------------------------------------------------------------------------


def crop_padding(model: torch.nn.Module, example: torch.Tensor) -> tuple[torch.nn.Module, list[str]]:
    """A copy of `model` whose 2-d convolutions keep only the kernel taps that ever read their input at
    the example's spatial size, and the names of those cut (the ONNX path's `crop_padding_taps`, applied
    before `torch.export`). A program has a fixed input shape, so a tap that only ever lands on zero
    padding multiplies zeros at every output position: dropping it changes no output beyond the order of
    a float sum. resnet18 at 32x32 runs layer4's 3x3 convolutions on 1x1 and 2x2 maps, where most taps
    read padding. A cut that needs unequal padding on the two sides pads explicitly first (`F.pad`). Left
    alone: dilated, non-zero-padded or string-padded convolutions, and those whose input size is unknown."""
    import torch
    from torch import nn

    from edgeq.onnx_quant import kept_taps

    model = copy.deepcopy(model).eval()
    sizes: dict[str, tuple[int, ...]] = {}
    def seen(name: str):
        def hook(module, args) -> None:
            sizes.setdefault(name, tuple(args[0].shape[2:]))
        return hook

    hooks = [m.register_forward_pre_hook(seen(name)) for name, m in model.named_modules() if type(m) is nn.Conv2d]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    cut = []
    for name, conv in [(n, m) for n, m in model.named_modules() if n in sizes]:
        if (conv.padding_mode != "zeros" or isinstance(conv.padding, str) or any(d != 1 for d in conv.dilation)):
            continue
        taps = [kept_taps(size, k, s, p, p) for size, k, s, p in
                zip(sizes[name], conv.kernel_size, conv.stride, conv.padding)]
        if any(t is None for t in taps) or all(t[0].stop - t[0].start == k for t, k in zip(taps, conv.kernel_size)):
            continue
        with torch.no_grad():
            weight = conv.weight[:, :, taps[0][0], taps[1][0]].clone()
        conv.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
        conv.kernel_size = tuple(weight.shape[2:])
        if all(b == e for _, b, e in taps):
            conv.padding = tuple(b for _, b, _ in taps)
        else:
            conv.padding = (0, 0)
            conv.forward = _padded_forward(conv, (taps[1][1], taps[1][2], taps[0][1], taps[0][2]))
        cut.append(name)
    return model, cut


def _padded_forward(conv, pads: tuple[int, int, int, int]):
    """conv.forward with explicit zero padding (left, right, top, bottom) before it."""
    import torch.nn.functional as F

    plain = conv.forward

    def forward(x):
        return plain(F.pad(x, pads))

    return forward


def depthwise_modules(model: torch.nn.Module) -> list[str]:
    """The depthwise convolutions (one filter per input channel: groups == in_channels > 1), by module name.
    XNNPACK's int8 depthwise kernel can be slower than its fp32 one on small maps (the MBConv network's
    first depthwise convolution: 34 us int8 against 29 us fp32 at batch 1 on an AVX2 EPYC)."""
    from edgeq.train import is_depthwise

    return [name for name, m in model.named_modules() if is_depthwise(m)]


def gate_modules(model: torch.nn.Module, example: torch.Tensor, graph: torch.fx.GraphModule | None = None) -> list[str]:
    """The modules that hold a squeeze-excitation gate, x * sigmoid|hardsigmoid(f(mean(x))), found in the
    captured graph by structure (edgeq.groups does the same on ONNX): for each such mul, the innermost
    module whose forward traced the whole gate (its pooling, its convolutions, the gate and the mul).
    Leaving one out of XNNPACK's quantizer keeps the gate's activations fp32. `graph`: the model's graph from
    `graph_for(model, example, "static")` when the caller has it (read, not changed), else it is captured."""
    graph = graph.graph if graph is not None else capture(copy.deepcopy(model).eval(), example).graph
    squeeze = ("adaptive_avg_pool2d", "mean")
    gates = ("sigmoid", "hardsigmoid")
    found: list[str] = []
    for mul in (n for n in graph.nodes if n.op == "call_function" and _op_name(n.target) in ("mul.Tensor", "mul")):
        args = [a for a in mul.args if hasattr(a, "op")]
        for x, g in ((args[0], args[1]), (args[1], args[0])) if len(args) == 2 else ():
            if g.op != "call_function" or _op_name(g.target).split(".")[0] not in gates or g.args[0] is x:
                continue
            path, stack, pooled = [mul, g], [g.args[0]], False
            while stack and len(path) < 64:
                node = stack.pop()
                if not hasattr(node, "op") or node.op != "call_function":
                    continue
                path.append(node)
                if _op_name(node.target).split(".")[0] in squeeze:
                    pooled = pooled or node.args[0] is x
                    continue
                stack.extend(a for a in node.args if hasattr(a, "op"))
            if pooled:
                name = _common_module(path)
                if name and name not in found:
                    found.append(name)
    return found


def _common_module(nodes) -> str:
    """The innermost module (qualified name) whose forward traced every one of `nodes`."""
    stacks = [[v[0] for v in (n.meta.get("nn_module_stack") or {}).values()] for n in nodes]
    common: list[str] = []
    for names in zip(*stacks):
        if len(set(names)) != 1:
            break
        common.append(names[0])
    return common[-1] if common else ""


def predict(converted: torch.nn.Module, x: np.ndarray, batch: int = 500) -> np.ndarray:
    """Logits of a `quantize`d (PT2E, converted) model in torch, before lowering: torch's reference int8
    arithmetic on the program's own scales, the cheap way to rank candidates before building programs."""
    import torch

    with torch.no_grad():
        return np.concatenate([converted(torch.from_numpy(np.array(x[i : i + batch], dtype=np.float32))).float().numpy()
                               for i in range(0, len(x), batch)])


# -- quantization -----------------------------------------------------------------------------------


# static activation observers (`quantize(observer=...)`), XNNPACK's default first: a histogram that
# picks the range minimising the L2 quantization error, or the plain running min/max
OBSERVERS = PTE_OBSERVERS


def quantization_config(qat: bool, observer: str = OBSERVERS[0]):
    """XNNPACK's symmetric per-channel config; for static int8, activations observed by `observer`."""
    import dataclasses

    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config
    from torchao.quantization.pt2e import MinMaxObserver

    if observer not in OBSERVERS:
        raise ExportError(f"pte quantize: unknown observer {observer!r}; choose {', '.join(OBSERVERS)}")
    config = get_symmetric_quantization_config(is_per_channel=True, is_qat=qat)
    if qat or observer == "histogram":  # QAT observes through its fake-quant modules
        return config
    act = dataclasses.replace(config.input_activation, observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12))
    return dataclasses.replace(config, input_activation=act, output_activation=act)


def quantize(model: torch.nn.Module, example: torch.Tensor, calibration: Sequence[np.ndarray], mode: Mode,
             exclude: Collection[str] = (), finetune: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
             observer: str = OBSERVERS[0], captured: torch.fx.GraphModule | None = None) -> torch.nn.Module:
    """PT2E int8 of a copy of `model` with XNNPACK's quantizer (symmetric, per-channel weights):
    prepare (`prepare_pt2e`, or `prepare_qat_pt2e` for mode "qat"), `finetune` (QAT only: it trains
    the prepared model and returns it; it may call .train()/.eval() on it), calibrate on each batch
    of `calibration`, `convert_pt2e`. `exclude`: module names (e.g. "features.0") left in fp32 (every
    op traced inside them is left unannotated). `observer`: static int8's activation observer
    (OBSERVERS). Returns the converted torch model (a GraphModule with quantize/dequantize ops), ready
    for `lower_int8`. `captured`: `model`'s graph from `graph_for(model, example, mode)`, for callers that
    quantize one model many ways (a copy of it is prepared: the same graph a capture gives, without one)."""
    from edgeq.pt2e_cache import traced_once

    with traced_once():  # PT2E's pattern graphs traced once per process, not on every call
        return _quantize(model, example, calibration, mode, exclude, finetune, observer, captured)


def graph_for(model: torch.nn.Module, example: torch.Tensor, mode: Mode) -> torch.fx.GraphModule:
    """The graph `quantize` prepares: `model` captured with a dynamic batch, in training mode for QAT
    (batch norm only: it folds into the convolutions while it trains; dropout and stochastic depth would
    be traced as random ops, and torchvision's StochasticDepth leaves aten.bernoulli, which no program
    can hold)."""
    import torch

    qat = mode == "qat"
    float_model = copy.deepcopy(model).train(qat)
    if qat:
        for module in float_model.modules():
            if not isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.training = False
    return capture(float_model, example, dynamic_batch=True).module()


def _quantize(model, example, calibration, mode, exclude, finetune, observer, captured):
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer.utils import get_module_name_filter

    if mode not in ("static", "qat"):
        raise ExportError(f"pte quantize: unknown mode {mode!r}; expected 'static' or 'qat'")
    if not calibration:
        raise ExportError("pte quantize: no calibration batches; pass at least one")
    names = {name for name, _ in model.named_modules() if name}
    missing = sorted(set(exclude) - names)
    if missing:
        raise ExportError(f"pte quantize: exclude names modules the model does not have: {', '.join(missing)}")
    qat = mode == "qat"
    graph = copy.deepcopy(captured) if captured is not None else graph_for(model, example, mode)
    quantizer = XNNPACKQuantizer().set_global(quantization_config(qat, observer))
    if exclude:
        # XNNPACKQuantizer 1.5.1 refuses set_module_name(name, None) ("not supported yet"); its filter
        # function gates every pattern, so nodes traced from an excluded module are left unannotated
        inside = [get_module_name_filter(name) for name in sorted(exclude)]
        quantizer.set_filter_function(lambda node: not any(f(node) for f in inside))
    try:
        with _quiet():
            prepared = (prepare_qat_pt2e if qat else prepare_pt2e)(graph, quantizer)
    except Exception as exc:
        raise ExportError(f"{type(model).__name__}: PT2E cannot prepare it for XNNPACK int8 "
                          f"({first_line(exc, 160)}); the int8 .pte variants are skipped") from None
    if qat and finetune is not None:
        trained = finetune(trainable(prepared))
        prepared = trained.graph if hasattr(trained, "graph") and isinstance(trained.graph, torch.fx.GraphModule) \
            else trained  # the wrapper back, or the prepared graph itself
        if not isinstance(prepared, torch.fx.GraphModule):
            raise ExportError(f"pte quantize: finetune returned {type(trained).__name__}; it must return the "
                              "model it was given (trained)")
    move_exported_model_to_eval(prepared)
    with torch.no_grad():
        for batch in calibration:
            prepared(torch.from_numpy(np.array(batch, dtype=np.float32)))  # a writable copy for torch
    with _quiet():
        converted = convert_pt2e(prepared)
    move_exported_model_to_eval(converted)
    return converted


def trainable(graph: torch.fx.GraphModule) -> torch.nn.Module:
    """An nn.Module around a PT2E-prepared graph module that a training loop (edgeq.train.fit) uses
    as any model: `.train()` / `.eval()` switch the graph's batch norm and dropout ops (torchao's
    move_exported_model_to_train / _eval), which an exported graph's own methods refuse. The
    prepared graph is its `.graph`."""
    import torch
    from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train

    class Trainable(torch.nn.Module):
        def __init__(self, graph: torch.fx.GraphModule):
            super().__init__()
            self.graph = graph

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.graph(x)

        def train(self, mode: bool = True) -> Trainable:
            (move_exported_model_to_train if mode else move_exported_model_to_eval)(self.graph)
            self.training = mode
            return self

    return Trainable(graph)


# -- lowering ---------------------------------------------------------------------------------------


def export_fp32(model: torch.nn.Module, example: torch.Tensor, path: Path) -> dict:
    """Lower an eval-mode copy of `model` to an fp32 `.pte` at `path` (input shape: `example`'s);
    returns its manifest information (see `lower`)."""
    return lower(capture(copy.deepcopy(model).eval(), example), path)


def lower_int8(converted: torch.nn.Module, example: torch.Tensor, path: Path) -> dict:
    """Lower a `quantize`d model to an int8 `.pte` at `path`, as `export_fp32` does an fp32 one."""
    return lower(capture(converted, example), path)


def lower_int8_beside(converted: torch.nn.Module, example: torch.Tensor, path: Path, pool=None) -> Lowering:
    """`lower_int8`, run on a worker of `pool` (an edgeq.trials.Pool) while this process works on: the
    captured program travels as `torch.export.save` bytes and the worker sends the program's bytes back
    (the same bytes: lowering is deterministic, in any process). `Lowering.result()` waits for it, writes
    `path` and returns what `lower_int8` returns. Without a local pool (one job, or Ray) it is lowered here,
    now. Lowering is untimed work: edgeq.timing waits for it before any timed round. The build has the pool's
    workers import lowering beforehand (`import_lowering`, edgeq.trials.Pool.warm_up), so that even a small
    program (the MNIST ones lower in 1-2.5 s) does not wait for a worker's imports."""
    program = capture(converted, example)
    return _sent(program, path, pool) or Lowering(None, path, lower(program, path))


def lower_int8_ahead(converted: torch.nn.Module, example: torch.Tensor, path: Path, pool=None) -> Lowering | None:
    """`lower_int8_beside` for a program that may be wanted later (the speed step's first candidate, lowered
    while the program it starts from is lowered here): sent to a worker, or None, with nothing lowered or
    written, where `lower_int8_beside` would lower it here now. `path` is written when its result is taken."""
    if pool is None or pool.workers.backend != "pool":
        return None
    return _sent(capture(converted, example), path, pool)


def _sent(program, path: Path, pool) -> Lowering | None:
    """The captured program sent to a worker of `pool` to be lowered, or None (no local pool, or a pool whose
    worker died and that no job has restarted yet)."""
    import io
    from concurrent.futures.process import BrokenProcessPool

    import torch

    if pool is None or pool.workers.backend != "pool":
        return None
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    item = {"program": buffer.getvalue()}
    try:
        future = pool.beside(lowered_program, item)
    except BrokenProcessPool:  # the job that saw its worker die restarts the pool (Lowering.result)
        return None
    return Lowering((pool, item, future), path, _about(program))


class Lowering:
    """A program being lowered beside this process (`lower_int8_beside`), or lowered already."""

    def __init__(self, job, path: Path, info: dict) -> None:
        self._job, self.path, self._info = job, Path(path), info
        self.pid = os.getpid()  # the process that lowered it, once `result` returned

    @property
    def pending(self) -> bool:
        """Sent to a worker, and not taken yet."""
        return self._job is not None

    def result(self) -> dict:
        """Wait for the worker, write the program (atomically) and return its manifest information; the
        worker's ExportError is raised here. A worker that died has the program lowered here instead."""
        from concurrent.futures.process import BrokenProcessPool

        if self._job is not None:
            (pool, item, future), self._job = self._job, None
            try:
                done = future.result()
            except BrokenProcessPool:
                pool.restart()
                done = lowered_program({}, item)
            _write(self.path, done["buffer"])
            self.pid = done["pid"]
            self._info = {"delegation": done["delegation"], **self._info}  # as `lower` orders it
        return self._info


def import_lowering() -> None:
    """A pool worker's warm-up (edgeq.trials.Pool's `warm`, sent by `Pool.warm_up` as the `.pte` stage starts):
    what lowering a program imports (ExecuTorch, XNNPACK's partitioner, torchao's quantized ops; about 4.5 s and
    220 MB), imported while the exporting process trains its first QAT program, not when the first program
    sent to the worker waits for it. `lowered_program` calls it too: ExecuTorch's import registers the ops a saved
    program calls, torchao's the quantized ones; quietly, as a worker's first import of torchao logs a torch
    deprecation line to stderr. A worker forked from edgeq's fork server has them imported already (the server's
    imports, edgeq.worker_imports): there it returns at once; a spawned worker imports them here."""
    with _quiet():
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner  # noqa: F401
        from executorch.exir import to_edge_transform_and_lower  # noqa: F401
        from torchao.quantization.pt2e import quantize_pt2e  # noqa: F401


def lowered_program(shared, item: dict) -> dict:
    """A pool task (edgeq.trials): the ExportedProgram saved in `item["program"]` -> the program's bytes
    and its delegation counts."""
    import io

    import torch

    import_lowering()  # the ops a saved program calls registered; nothing again on a warmed worker
    buffer, counted = _lowered(torch.export.load(io.BytesIO(item["program"])))
    return {"buffer": buffer, "delegation": counted, "pid": os.getpid()}


def lower(program, path: Path) -> dict:
    """ExportedProgram -> XNNPACK-partitioned edge program -> ExecuTorch program written to `path`.

    Returns: `delegation` (nodes in XNNPACK subgraphs out of all op nodes, the subgraphs, the ops
    left to ExecuTorch's portable kernels), `input_shape` (the program's fixed input shape),
    `versions` and `threads` (how the thread count is set). ExportError in one line if lowering fails.
    """
    buffer, counted = _lowered(program)
    _write(Path(path), buffer)
    return {"delegation": counted, **_about(program)}


def _about(program) -> dict:
    """What the manifest records of a program besides its delegation: its fixed input shape, the versions,
    how its threads are set."""
    return {"input_shape": [int(d) for d in _user_input(program).meta["val"].shape], "versions": versions(),
            "threads": THREADS_HOW}


def _lowered(program) -> tuple[bytes, dict]:
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from edgeq.lowering_cache import lean

    try:
        # the caller's random state as it was: XNNPACK's pattern graphs draw from it where they are traced, so
        # whether and where a program is lowered never changes what the export draws after it
        with _quiet(), lean(), torch.random.fork_rng(devices=[]):
            edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
            counted = delegation(edge.exported_program().graph_module)  # before to_executorch rewrites it
            return edge.to_executorch().buffer, counted
    except Exception as exc:
        raise ExportError(f"ExecuTorch/XNNPACK lowering failed ({type(exc).__name__}: {first_line(exc, 160)}); "
                          "the .pte variant is skipped") from None


def _write(path: Path, buffer: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buffer)
    os.replace(tmp, path)


def _user_input(program):
    """The placeholder of the program's one user input (parameters and buffers are placeholders too)."""
    from torch.export.graph_signature import InputKind

    name = next(s.arg.name for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT)
    return next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == name)


def delegation(graph_module) -> dict:
    """Op nodes of a lowered edge graph: those inside XNNPACK subgraphs, all of them, and the names
    of the ops left outside (run by ExecuTorch's portable kernels). getitem and the delegate calls
    themselves are plumbing, not ops."""
    inside, outside, subgraphs = 0, [], 0
    for node in graph_module.graph.nodes:
        if node.op == "get_attr" and node.target.startswith("lowered_module_"):
            subgraphs += 1
            inside += sum(_is_op(n) for n in getattr(graph_module, node.target).original_module.graph.nodes)
        elif _is_op(node) and "executorch_call_delegate" not in str(node.target):
            outside.append(_op_name(node.target))
    return {"backend": BACKEND, "delegated_nodes": inside, "total_nodes": inside + len(outside),
            "subgraphs": subgraphs, "outside_ops": sorted(set(outside))}


def _is_op(node) -> bool:
    return node.op == "call_function" and node.target is not operator.getitem


def _op_name(target) -> str:
    name = getattr(target, "__name__", str(target))
    return name.split("::")[-1]


def program_ops(path: Path) -> dict:
    """What a `.pte` file itself holds: the delegate calls per backend and the portable operators it
    calls outside them, read from the serialized program (a count independent of the lowering)."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    plan = deserialize_pte_binary(Path(path).read_bytes()).program.execution_plan[0]
    backends = [d.id for d in plan.delegates]
    ops = [f"{o.name}.{o.overload}" if o.overload else o.name for o in plan.operators]
    return {"delegates": {b: backends.count(b) for b in sorted(set(backends))}, "operators": sorted(ops)}


class _quiet:
    """Silence the warnings and log lines torch.export, PT2E and ExecuTorch print on every call."""

    def __enter__(self):
        import logging
        import warnings

        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")
        self._loggers = [(lg, lg.level) for lg in (logging.getLogger("torch"), logging.getLogger("executorch"),
                                                   logging.getLogger())]
        for lg, _ in self._loggers:
            lg.setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc):
        for lg, level in self._loggers:
            lg.setLevel(level)
        self._warnings.__exit__(*exc)
        return False


# -- the runtime ------------------------------------------------------------------------------------


def set_threads(threads: int) -> int:
    """Size ExecuTorch's process-wide XNNPACK threadpool to `threads` (the caller's thread included);
    returns the count in effect. A no-op when it is already that size."""
    portable_lib = bindings()
    if threads < 1:
        raise IntegrityError(f"ExecuTorch threads must be >= 1, got {threads}")
    with runtime_info_dropped():
        if portable_lib._threadpool_get_thread_count() != threads:
            portable_lib._unsafe_reset_threadpool(threads)
        return portable_lib._threadpool_get_thread_count()


_RUNTIME_INFO = re.compile(rb"\[(cpuinfo_utils|threadpool)\.cpp:\d+\] ")


@contextlib.contextmanager
def runtime_info_dropped() -> Iterator[None]:
    """ExecuTorch's runtime writes what it reads of the CPU when it creates its threadpool, and every
    resize, to the process's stderr at its info level (six lines in every export and check on x86):
    those lines are dropped; anything else written to stderr meanwhile passes through, after the block.
    Held in an anonymous in-memory file (memfd: no path, so a confined process may make one too); where
    there is none, nothing is filtered."""
    try:
        held = os.memfd_create("edgeq-stderr")
    except (AttributeError, OSError):
        yield
        return
    try:
        saved = os.dup(2)  # no stderr to filter (closed): nothing to do
    except OSError:
        os.close(held)
        yield
        return
    if sys.stderr is not None:
        sys.stderr.flush()
    os.dup2(held, 2)
    try:
        yield
    finally:
        if sys.stderr is not None:
            sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        with os.fdopen(held, "rb") as f:
            f.seek(0)
            kept = b"".join(line for line in f if not _RUNTIME_INFO.match(line))
        view = memoryview(kept)
        while view:
            view = view[os.write(2, view):]


def check_header(path: Path, data: bytes) -> None:
    """IntegrityError unless `data` starts like an ExecuTorch program whose sizes fit the file.

    ExecuTorch's loader verifies the flatbuffer, but it aborts the process (an uncaught C++
    exception) when the 4-byte file identifier is not text, and a program cut short can read past
    its end: both are refused here first, from the header ExecuTorch writes (file identifier
    `ETnn` at byte 4; extended header `eh00` at byte 8: its length, the program's size, the segments'
    offset and size, little-endian)."""
    import re
    import struct

    def bad(why: str) -> IntegrityError:
        return IntegrityError(f"{path.name}: not an ExecuTorch program ({why}); re-run `edgeq export`")

    if len(data) < 40:
        raise bad(f"{len(data)} bytes")
    if not re.fullmatch(rb"ET\d\d", data[4:8]):
        raise bad("no ExecuTorch file identifier")
    if data[8:12] != b"eh00":
        raise bad("no extended header")
    length, program_size, segment_offset, segment_size = struct.unpack_from("<IQQQ", data, 12)
    if length < 32 or program_size > len(data) or program_size < length:
        raise bad("its header gives a program size beyond the file")
    if segment_size and (segment_offset < program_size or segment_offset + segment_size > len(data)):
        raise bad(f"truncated: its data ends at byte {segment_offset + segment_size}, the file at {len(data)}")


def open_program(path: Path, threads: int = 1):
    """Load a `.pte` file in ExecuTorch's runtime, its `forward` method initialised (XNNPACK builds its
    subgraphs now, so a damaged delegate fails here, not on the first call) ->
    (forward, input shape, info). `forward` maps a float32 array of the input shape to the output. IntegrityError in one line for a file ExecuTorch refuses."""
    import torch

    portable_lib = bindings()
    path = Path(path)
    data = path.read_bytes()
    check_header(path, data)
    in_effect = set_threads(threads)
    try:
        program = portable_lib._load_program_from_buffer(
            data, program_verification=portable_lib.Verification.InternalConsistency)
        method = program.load_method("forward")
        meta = method.method_meta()
        shape = tuple(meta.input_tensor_meta(0).sizes())
        method([torch.zeros(shape)])  # a program whose delegate builds but cannot run fails here, once
    except Exception as exc:  # ExecuTorch raises RuntimeError("Failed to load ..., error: 0x..")
        raise IntegrityError(f"{path.name}: ExecuTorch cannot load it ({first_line(exc, 120)}); "
                             "re-run `edgeq export`") from None

    def forward(x: np.ndarray, _keep=(program, data)) -> np.ndarray:  # the method needs its program and bytes
        # the output tensor aliases the method's planned memory (not cloned: that costs more than the
        # copy of the logits), so its values are copied out before the next call overwrites them
        # torch wants a writable array (edgeq's checked arrays are read-only); ExecuTorch only reads it
        x = x if x.flags.writeable else x.copy()
        return method([torch.from_numpy(x)], clone_outputs=False)[0].numpy().copy()

    return forward, shape, {"threads": in_effect, "backends": portable_lib._get_registered_backend_names()}


def profile(path: Path, x: np.ndarray, calls: int = 50, threads: int = 1) -> dict:
    """ExecuTorch's own profile (ETDump) of `calls` runs of a program on `x` (its input shape): the
    median time of each XNNPACK operator, of the delegate call and of the whole method, in
    microseconds (the first call, where XNNPACK sets itself up, left out), and the median wall time of a
    call from Python through edgeq's runner (`open_program`, without ETDump's recording). What the
    method spends outside the delegate call is ExecuTorch's own work; what a call spends outside the
    method is the Python bindings'. XNNPACK's operator timer ticks coarsely: operators under a few
    microseconds read 0."""
    import tempfile
    import time

    import torch
    from executorch.devtools import Inspector

    portable_lib = bindings()

    path = Path(path)
    data = path.read_bytes()
    check_header(path, data)
    set_threads(threads)
    module = portable_lib._load_for_executorch_from_buffer(data, enable_etdump=True)
    inputs = [torch.from_numpy(np.array(x, dtype=np.float32))]
    for _ in range(calls + 1):  # the first call's events are left out below
        module.forward(inputs)
    forward, _, _ = open_program(path, threads)  # the call edgeq's runner makes, without ETDump's recording
    x = np.array(x, dtype=np.float32)
    forward(x)
    walls = []
    for _ in range(calls):
        t0 = time.perf_counter()
        forward(x)
        walls.append(time.perf_counter() - t0)
    wall_us = float(np.median(walls)) * 1e6
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "run.etdp"
        module.write_etdump_result_to_file(str(dump))
        with _quiet():
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "Output Buffer not found": no tensor debug data was asked for
                inspector = Inspector(etdump_path=str(dump))
    ops, totals = [], {}
    for block in inspector.event_blocks:
        if block.name != "Execute":
            continue
        for e in block.events:
            if e.perf_data is None:
                continue
            us = float(np.median(e.perf_data.raw[-calls:])) * 1e3  # the Inspector reports milliseconds
            if e.name in ("DELEGATE_CALL", "Method::execute"):
                totals[e.name] = totals.get(e.name, 0.0) + us
            else:
                ops.append({"op": e.name, "us": round(us, 2)})
    return {"file": path.name, "input_shape": list(x.shape), "calls": calls, "threads": threads,
            "wall_per_call_us": round(wall_us, 2), "method_us": round(totals.get("Method::execute", 0.0), 2),
            "delegate_us": round(totals.get("DELEGATE_CALL", 0.0), 2), "ops": ops}
