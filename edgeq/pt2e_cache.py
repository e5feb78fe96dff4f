"""Pattern graphs of PT2E, traced once per process.

torchao's PT2E (`prepare_pt2e`, `convert_pt2e`, `move_exported_model_to_eval`) and XNNPACK's quantizer
match small pattern graphs (conv-batchnorm[-relu], dropout and batch norm in train and eval form) that
they trace with `torch.export` on every call: about 1.7 s of a 2 s `prepare_pt2e` of the MNIST CNN, a
fixed cost that does not depend on the model. A pattern's graph depends only on its code, the values
it closes over and its example inputs' shapes, so `traced_once()` keeps each graph the first time it
is traced and hands out a copy afterwards. The programs are byte-identical with and without it
(tests/test_pte.py checks it)."""

from __future__ import annotations

import contextlib
import copy
import importlib
from collections.abc import Iterator
from typing import Any

# the modules that call torchao's tracer through a module attribute (looked up at call time)
_USERS = ("torchao.quantization.pt2e.utils", "torchao.quantization.pt2e.qat_utils",
          "executorch.backends.xnnpack.quantizer.xnnpack_quantizer_utils")
_NAME = "_get_aten_graph_module_for_pattern"
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

    saved = [(m, getattr(m, _NAME)) for m in modules]
    for m, _ in saved:
        setattr(m, _NAME, cached)
    try:
        yield
    finally:
        for m, fn in saved:
            setattr(m, _NAME, fn)
