"""Three fixed costs of ExecuTorch's lowering that do not depend on the program, skipped where they cannot
change it.

- XNNPACK's lowering rewrites decomposed bilinear upsampling and scaled dot-product attention back into single
  ops by matching pattern graphs it traces with `torch.export` and `to_edge` the first time in a process:
  about 2.6 s (1.5 s of them bilinear), before the first program's lowering can go on. A pattern matches only
  where the graph calls every op the pattern calls, so within `lean()` the pass that runs on a graph with no
  call of an op all of its patterns call (`_PASSES`) is given no patterns: it finds nothing, as it would
  have, and the rest of the pass runs as it does.
- `ExportedProgram.run_decompositions` (three calls per lowering) lists the CompositeImplicitAutograd ops of
  every op namespace, and for each of the 40-odd namespaces first looks up every such op the C++ dispatcher
  registers (`torch._export.utils._materialize_cpp_cia_ops`, which torch does not cache because Python can
  register more): about 0.15 s of a 1 s MNIST lowering. Within `lean()` the lookups run again only when the
  dispatcher's list of registrations differs from the one they last ran for in the block; they only fill
  `torch.ops`' lazy attributes, which a second run with the same list leaves as they are.
- Each of those calls then registers its decompositions for every such op under a dozen dispatch keys, and
  restores them after (`_override_composite_implicit_decomp`, about 0.2 s of each call on a 2-core AMD EPYC):
  12,000-odd `OperatorBase.py_impl` calls, most of whose time goes to evaluating the typing annotations of the
  function each call defines (`Callable[_P, _T]`). Within `lean()` a `py_impl` for a dispatch key registers as
  torch's does, without them (`_registering`); any other key goes to torch's own.

The programs are byte-identical with and without it (tests/test_pte.py checks each part)."""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import threading
from collections.abc import Iterator
from typing import Any

from edgeq.library_patches import ops_called, patched

# pass module, pass class, its pattern module and provider, an op every pattern the provider gives calls, and
# what the provider gives when there are no patterns
_PASSES = (
    ("executorch.backends.xnnpack._passes.convert_to_upsample_bilinear2d", "ConvertToUpsampleBilinear2d",
     "bilinear_2d", "get_graphs_dict", "upsample_bilinear2d", dict),
    ("executorch.backends.xnnpack._passes.convert_to_sdpa", "ConvertToSDPAPass", "sdpa", "get_graphs", "bmm", list),
)
_CIA_MODULE, _CIA_NAME = "torch._export.utils", "_materialize_cpp_cia_ops"
_graph: contextvars.ContextVar = contextvars.ContextVar("edgeq_lowered_graph", default=None)
_LOCK = threading.RLock()  # the patches are process-wide: one block at a time patches and restores them


@contextlib.contextmanager
def lean() -> Iterator[None]:
    """Within the block, ExecuTorch's lowering skips the pattern tracing, the op lookups and the typing work of
    `py_impl` that cannot change the program it gives (module docstring)."""
    with _LOCK, patched([*_pattern_patches(), *_cia_patches(), *_py_impl_patches()]):
        yield


def _pattern_patches() -> list[tuple[Any, str, Any]]:
    patches = []
    for module_name, cls_name, patterns_attr, provider_name, op, empty in _PASSES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        cls, patterns = getattr(module, cls_name, None), getattr(module, patterns_attr, None)
        provider = getattr(patterns, provider_name, None)
        if cls is None or not callable(getattr(cls, "call", None)) or not callable(provider):
            continue
        patches += [(cls, "call", _seen_by(cls.call)), (patterns, provider_name, _needing(provider, op, empty))]
    return patches


def _seen_by(call):
    """The pass's `call(self, graph_module)`, with the graph it runs on known to the pattern providers."""

    def seen(self, graph_module, *args, **kwargs):
        token = _graph.set(graph_module.graph)
        try:
            return call(self, graph_module, *args, **kwargs)
        finally:
            _graph.reset(token)

    return seen


def _needing(provider, op: str, empty):
    """`provider()`, or no patterns (`empty()`) for a pass running on a graph that never calls `op`."""

    def patterns():
        graph = _graph.get()
        if graph is not None and op not in ops_called(graph):
            return empty()
        return provider()

    return patterns


def _cia_patches() -> list[tuple[Any, str, Any]]:
    try:
        import torch

        module = importlib.import_module(_CIA_MODULE)
    except ImportError:
        return []
    original = getattr(module, _CIA_NAME, None)
    registrations = getattr(torch._C, "_dispatch_get_registrations_for_dispatch_key", None)
    if not callable(original) or not callable(registrations):
        return []
    done: list = [None]  # the registrations the lookups last ran for, within this block

    def materialize() -> None:
        now = registrations("CompositeImplicitAutograd")
        if now != done[0]:
            original()
            done[0] = now

    return [(module, _CIA_NAME, materialize)]


def _py_impl_patches() -> list[tuple[Any, str, Any]]:
    try:
        from torch._C import DispatchKey
        from torch._ops import OperatorBase
    except ImportError:
        return []
    original = getattr(OperatorBase, "py_impl", None)
    return [(OperatorBase, "py_impl", _registering(original, DispatchKey))] if callable(original) else []


def _registering(original, dispatch_key):
    """torch's `OperatorBase.py_impl(k)` for a dispatch key `k` (other than Python), as torch 2.14 writes it but
    for the annotations: the function it gives registers `fn` as the op's Python kernel for `k`, refusing a key
    the op has one for already. Any other `k` (a mode, a tensor class, a transform, Python) goes to `original`."""

    def py_impl(self, k):
        if type(k) is not dispatch_key or k == dispatch_key.Python:
            return original(self, k)

        def inner(fn):
            if k in self.py_kernels:
                raise RuntimeError(f"Trying to override a python impl for {k} on operator {self.name()}")
            self.py_kernels[k] = fn
            self._dispatch_cache.clear()
            return fn

        return inner

    return py_impl
