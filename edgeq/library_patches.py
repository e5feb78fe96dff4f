"""Library internals replaced for the length of a block and restored after it, and what a graph calls: the
mechanism edgeq.pt2e_cache (PT2E's pattern graphs) and edgeq.lowering_cache (ExecuTorch's lowering) share to skip
fixed costs that cannot change what the library gives."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any


@contextlib.contextmanager
def patched(patches: Sequence[tuple[Any, str, Any]]) -> Iterator[None]:
    """Within the block each `(owner, name, value)` sets `owner.name = value`; every one is restored after it, in
    reverse order, whatever the block raises (a patch that fails to apply restores those before it)."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def ops_called(graph) -> set[str]:
    """The names of the aten ops a graph calls (aten.conv2d.default -> "conv2d")."""
    names = set()
    for node in graph.nodes:
        packet = getattr(node.target, "overloadpacket", None) if node.op == "call_function" else None
        if packet is not None:
            names.add(getattr(packet, "__name__", "").rpartition(".")[2])
    return names
