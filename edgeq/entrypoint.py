"""`FILE.py:FUNCTION` specs, the convention of uvicorn, gunicorn and Olive user scripts: how the CLI
reaches a user's model (`--model my_model.py:build`) and data (`--data my_model.py:load`)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from edgeq.errors import ConfigError, first_line


def is_spec(value: str) -> bool:
    return ":" in value


def load_callable(spec: str, option: str) -> Callable:
    """The function FUNCTION of the Python file FILE (or of an importable module) named by `FILE:FUNCTION`."""
    where, _, func = spec.rpartition(":")
    if not where or not func.isidentifier():
        raise ConfigError(f"{option} {spec}: expected FILE.py:FUNCTION, e.g. {option} my_model.py:build")
    if where.endswith(".py") or "/" in where:
        path = Path(where)
        if not path.is_file():
            raise ConfigError(f"{option} {spec}: {path} does not exist; check the file name")
        name = f"edgeq_user_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
        sys.modules[name] = module  # dataclasses and pickling look the module up by name
        try:
            module_spec.loader.exec_module(module)  # type: ignore[union-attr]
        except Exception as exc:
            del sys.modules[name]
            raise ConfigError(f"{option} {spec}: importing {path} raised {type(exc).__name__}: {first_line(exc)}") from None
    else:
        try:
            module = importlib.import_module(where)
        except Exception as exc:
            raise ConfigError(f"{option} {spec}: cannot import {where} ({type(exc).__name__}: {first_line(exc)})") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise ConfigError(f"{option} {spec}: {where} has no function {func!r}; check the name after the colon")
    return fn


def call(spec: str, option: str) -> object:
    """Load and call a `FILE:FUNCTION` spec with no arguments; what it raises becomes one line."""
    fn = load_callable(spec, option)
    try:
        return fn()
    except Exception as exc:
        raise ConfigError(f"{option} {spec}: {fn.__name__}() raised {type(exc).__name__}: {first_line(exc)}") from None
