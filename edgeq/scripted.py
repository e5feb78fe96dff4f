"""What a TorchScript file may do when edgeq loads and runs it: a TorchScript file is a program.

`torch.jit.load` unpickles the file's objects (a custom C++ class's state is restored by its own code) and
runs any `__setstate__` the file's code defines; a module's `forward` may call any operator torch has
registered, and some of those touch the filesystem (`aten::from_file` maps a file read-write and creates it,
`aten::save` writes one). A bundle is input, so every TorchScript file edgeq loads, its own included, is held
to what a traced classifier needs, and refused in one line otherwise:

- before loading (`archive_problem`): its pickles name only tensor storages, torch's tensor rebuilders,
  TorchScript modules (`__torch__.*`) and the quantized packed parameters (`torch.classes.quantized`); its
  code defines no `__setstate__`;
- after loading, before any call (`graph_problem`): every method of the module, with the submodule methods
  and functions it calls inlined, runs only operators of the `aten`, `prim` and `quantized` namespaces, none of DENIED, and
  calls no method left un-inlined but those of the quantized packed parameters.
"""

from __future__ import annotations

import pickletools
import zipfile
from pathlib import Path

NAMESPACES = ("aten", "prim", "quantized")
DENIED = ("aten::from_file", "aten::save", "aten::set_", "prim::PythonOp", "prim::IgnoredPythonOp")
CALLS = ("prim::CallMethod", "prim::CallFunction")
CUSTOM_CLASSES = "__torch__.torch.classes."
ALLOWED_CLASSES = ("__torch__.torch.classes.quantized.",)
MAX_MEMBER_BYTES = 64 << 20  # a pickle or code member: object references and source, never tensor data
STRINGS = ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8", "SHORT_BINSTRING", "BINSTRING", "STRING")


def archive_problem(path: Path) -> str | None:
    """Why a TorchScript archive is refused before `torch.jit.load` runs anything of it, or None."""
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        return None  # no archive: torch.jit.load refuses it, in its own words
    with z:
        for info in z.infolist():
            name = info.filename
            if (name.endswith(".pkl") or name.endswith(".py")) and info.file_size > MAX_MEMBER_BYTES:
                return f"its {Path(name).name} unpacks to {info.file_size} bytes, more than a traced model's"
            try:
                if name.endswith(".pkl"):
                    for found in _globals(z.read(name)):
                        if not _allowed_global(found):
                            return f"its {Path(name).name} names {found[:120]!r}, which no traced model holds"
                elif "/code/" in f"/{name}" and name.endswith(".py") and b"__setstate__" in z.read(name):
                    return f"its code ({name.split('/code/', 1)[-1]}) defines __setstate__, which loading would run"
            except Exception as exc:  # noqa: BLE001 - a member that cannot be read or parsed is refused, not run
                return f"its {Path(name).name} cannot be read ({type(exc).__name__})"
    return None


def _globals(data: bytes) -> list[str]:
    """'module name' of every global a pickle refers to (GLOBAL and STACK_GLOBAL, strings through the memo)."""
    out, strings, memo = [], [], {}
    for op, arg, _ in pickletools.genops(data):
        if op.name in STRINGS:
            strings.append(arg)
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
            memo[arg] = strings[-1]
        elif op.name == "MEMOIZE" and strings:
            memo[len(memo)] = strings[-1]
        elif op.name in ("BINGET", "LONG_BINGET", "GET") and arg in memo:
            strings.append(memo[arg])
        elif op.name == "GLOBAL":
            out.append(str(arg))
        elif op.name == "STACK_GLOBAL":
            out.append(" ".join(strings[-2:]) if len(strings) >= 2 else "?")
    return out


def _allowed_global(found: str) -> bool:
    module, _, name = found.partition(" ")
    if module.startswith(CUSTOM_CLASSES):
        return any(f"{module}.".startswith(c) for c in ALLOWED_CLASSES)
    return (module == "__torch__" or module.startswith("__torch__.") or found == "collections OrderedDict" or module == "torch.jit._pickle"
            or (module == "torch._utils" and name.startswith("_rebuild_"))
            or (module == "torch" and (name.endswith("Storage") or name.endswith("_affine"))))


def graph_problem(module) -> str | None:
    """Why a loaded TorchScript module is refused before it is called, or None (see the module docstring)."""
    import torch

    # the module's own methods, with every submodule method and function they call inlined: what any call into
    # it can run (a submodule's method nobody calls never runs; a call left un-inlined is refused below)
    for method in module._c._method_names():
        graph = module._c._get_method(method).graph.copy()
        torch._C._jit_pass_inline(graph)
        if why := _block_problem(graph.block()):
            return f"its {method} runs {why}, which no traced model runs"
    return None


def _block_problem(block) -> str | None:
    for node in block.nodes():
        kind = node.kind()
        if kind in CALLS:
            callee = str(node.inputs().__next__().type()) if kind == "prim::CallMethod" else "a function"
            if not callee.startswith(tuple(c.rstrip(".") for c in ALLOWED_CLASSES)):
                return f"{kind} on {callee[:80]}"
        elif kind.split("::")[0] not in NAMESPACES or kind in DENIED:
            return kind
        for inner in node.blocks():
            if why := _block_problem(inner):
                return why
    return None
