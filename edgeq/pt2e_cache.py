"""Pattern graphs of PT2E, traced once per process.

torchao's PT2E (`prepare_pt2e`, `convert_pt2e`, `move_exported_model_to_eval`) and XNNPACK's quantizer
match small pattern graphs (conv-batchnorm[-relu], dropout and batch norm in train and eval form) that
they trace with `torch.export` on every call: about 1.7 s of a 2 s `prepare_pt2e` of the MNIST CNN, a
fixed cost that does not depend on the model. A pattern's graph depends only on its code, the values
it closes over and its example inputs' shapes, so `traced_once()` keeps each graph the first time it
is traced and hands out a copy afterwards. The programs are byte-identical with and without it
(tests/test_pte.py checks it).

QAT's `convert_pt2e` folds batch norm into the convolutions of four kinds (conv1d, conv2d and their
transposes), each against 12 pattern pairs it traces: 48 traces, about 17 s, the first time in a process.
`prepare_qat_pt2e` does the same twice over: XNNPACK's quantizer annotates conv-bn[-relu] against patterns
of conv1d and conv2d, then of their transposes, and torchao fuses conv-bn for each of the four kinds.
Within the block a kind the graph has no call of is not traced: its patterns could not match, and each
step does to the graph what it does when none matches (`_fold_without_patterns`, `_fuse_without_patterns`,
and an annotation that finds nothing)."""

from __future__ import annotations

import contextlib
import copy
import importlib
from collections.abc import Iterator
from typing import Any

from edgeq.library_patches import ops_called, patched

# the modules that call torchao's tracer through a module attribute (looked up at call time)
_USERS = ("torchao.quantization.pt2e.utils", "torchao.quantization.pt2e.qat_utils",
          "executorch.backends.xnnpack.quantizer.xnnpack_quantizer_utils")
_NAME = "_get_aten_graph_module_for_pattern"
_QAT_UTILS, _FOLD = "torchao.quantization.pt2e.qat_utils", "_fold_conv_bn_qat_helper"
_FUSE = "_fuse_conv_bn_qat_helper"
_XNNPACK_UTILS, _ANNOTATE = _USERS[2], "_do_annotate_conv_bn"
# the convolutions the fold has patterns for, by the name of the aten op their pattern traces to; a graph
# with a generic aten.convolution could match any of them, so it is never shortcut
_CONVS = {"conv1d", "conv2d", "conv_transpose1d", "conv_transpose2d"}
_GENERIC = {"convolution", "_convolution"}
_graphs: dict[tuple, Any] = {}


def _key(pattern: Any, example_inputs: tuple, is_cuda: bool, kwargs: dict) -> tuple | None:
    """What a pattern's traced graph depends on, or None where that cannot be told (traced every time)."""
    import torch

    def value(x: Any) -> Any:  # a tensor is a graph input: its shape counts, not its values; others are literals
        return ("tensor", tuple(x.shape), x.dtype, x.device.type) if isinstance(x, torch.Tensor) else x

    fn = getattr(pattern, "fn", pattern)  # torchao's WrapperModule keeps the callable as .fn
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    try:
        cells = tuple(c.cell_contents for c in fn.__closure__ or ())
        key = (code, cells, fn.__defaults__, is_cuda, tuple(value(x) for x in example_inputs),
               tuple(sorted((k, value(v)) for k, v in kwargs.items())))
        hash(key)
    except (TypeError, ValueError):  # an unhashable or empty cell
        return None
    return key


@contextlib.contextmanager
def traced_once() -> Iterator[None]:
    """Within the block, PT2E's pattern graphs are traced once per process and copied after."""
    modules = []
    for name in _USERS:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if callable(getattr(module, _NAME, None)):
            modules.append(module)
    if not modules:
        yield
        return
    original = getattr(importlib.import_module(_USERS[0]), _NAME)

    def cached(pattern, example_inputs, is_cuda=False, **kwargs):
        key = _key(pattern, tuple(example_inputs), is_cuda, kwargs)
        if key is None:
            return original(pattern, example_inputs, is_cuda, **kwargs)
        if key not in _graphs:
            _graphs[key] = original(pattern, example_inputs, is_cuda, **kwargs)
        return copy.deepcopy(_graphs[key])  # callers edit the graph they get (dead code, recompile)

    patches = [(m, _NAME, cached) for m in modules]
    qat_utils = next((m for m in modules if m.__name__ == _QAT_UTILS), None)
    if qat_utils is not None and callable(getattr(qat_utils, _FOLD, None)):
        patches.append((qat_utils, _FOLD, _per_kind_present_only(qat_utils, _FOLD, _fold_without_patterns)))
    if qat_utils is not None and callable(getattr(qat_utils, _FUSE, None)):
        patches.append((qat_utils, _FUSE, _per_kind_present_only(qat_utils, _FUSE, _fuse_without_patterns)))
    xnnpack_utils = next((m for m in modules if m.__name__ == _XNNPACK_UTILS), None)
    if xnnpack_utils is not None and callable(getattr(xnnpack_utils, _ANNOTATE, None)):
        patches.append((xnnpack_utils, _ANNOTATE, _annotate_present_only(xnnpack_utils)))
    with patched(patches):
        yield


def _absent(graph, kinds: set[str]) -> bool:
    """Whether `graph` calls none of these kinds of convolution (`_CONVS`), nor a generic one that could be any."""
    called = ops_called(graph)
    return kinds <= _CONVS and not called & (kinds | _GENERIC)


def _per_kind_present_only(qat_utils, name: str, without):
    """torchao's `name(m, conv_fn, example_inputs, is_cuda)` (the conv-bn fold or fuse of one kind of convolution),
    which traces its patterns only for a kind the graph calls; for another it does `without(qat_utils, m)`."""
    original = getattr(qat_utils, name)

    def helper(m, conv_fn, example_inputs, is_cuda):
        if _absent(m.graph, {getattr(conv_fn, "__name__", None)}):
            return without(qat_utils, m)
        return original(m, conv_fn, example_inputs, is_cuda)

    return helper


def _annotate_present_only(xnnpack_utils):
    """XNNPACK's `_do_annotate_conv_bn`, which traces its conv-bn[-relu] patterns (conv1d and conv2d, or their
    transposes) only when the graph calls one of those kinds. Where it calls none, no pattern could match, and
    the graph is left as the function leaves it then: dead code out, recompiled, nothing annotated."""
    original = getattr(xnnpack_utils, _ANNOTATE)

    def annotate(gm, quantization_config, filter_fn, has_relu, is_conv_transpose=False):
        kinds = {"conv_transpose1d", "conv_transpose2d"} if is_conv_transpose else {"conv1d", "conv2d"}
        if _absent(gm.graph, kinds):
            gm.graph.eliminate_dead_code()
            gm.recompile()
            return []
        return original(gm, quantization_config, filter_fn, has_relu=has_relu, is_conv_transpose=is_conv_transpose)

    return annotate


def _fold_without_patterns(qat_utils, m):
    """What torchao's `_fold_conv_bn_qat_helper` does to `m` when none of its patterns matches, step for step:
    dead code out, dequantize nodes duplicated, then each `replace_pattern_with_filters` that finds nothing
    recompiles and drops unused submodules, the duplicates are merged back, dead code out. tests/test_pte.py
    compares it with the installed torchao's own helper on a graph where nothing matches."""
    m.graph.eliminate_dead_code()
    m.recompile()
    qat_utils._duplicate_dequantize_node(m)
    m.recompile()
    m.delete_all_unused_submodules()
    m.recompile()
    qat_utils._remove_extra_dequantize(m)
    m.graph.eliminate_dead_code()
    m.recompile()
    return m


def _fuse_without_patterns(qat_utils, m):
    """What torchao's `_fuse_conv_bn_qat_helper` does to `m` when none of its patterns matches, step for step:
    dead code out; then twice, a `replace_pattern_with_filters` that finds nothing (it recompiles and drops
    unused submodules) and the helper's recompile; then every node's special qspecs rebuilt with no node
    replaced. tests/test_pte.py compares it with the installed torchao's own helper on a graph where nothing
    matches."""
    m.graph.eliminate_dead_code()
    m.recompile()
    for _ in range(2):
        m.recompile()
        m.delete_all_unused_submodules()
        m.recompile()
    for n in m.graph.nodes:
        qat_utils._update_special_qspecs_after_replacement(n, {})
    return m
