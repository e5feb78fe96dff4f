"""`FILE.py:FUNCTION` specs, the convention of uvicorn, gunicorn and Olive user scripts: how the CLI
reaches a user's model (`--model my_model.py:build`) and data (`--data my_model.py:load`)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from edgeq.errors import ConfigError, first_line


class _Exit(BaseException):
    """os._exit(code) called by the user's code while no_exit is active."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@contextlib.contextmanager
def no_exit(what: str) -> Iterator[None]:
    """Turn the user's sys.exit(), exit() and os._exit() into one ConfigError line: an export must never end,
    with exit code 0 or any other, without saying why. os._exit is swapped for the block and restored."""
    real = os._exit

    def refuse(code: int) -> None:
        raise _Exit(code)

    os._exit = refuse  # type: ignore[assignment]
    try:
        yield
    except (SystemExit, _Exit) as exc:
        how = "os._exit" if isinstance(exc, _Exit) else "sys.exit"
        raise ConfigError(f"{what} called {how}({exc.code!r}) instead of returning; edgeq needs it to return "
                          "(remove the exit, or guard it with `if __name__ == \"__main__\":`)") from None
    finally:
        os._exit = real  # type: ignore[assignment]


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
            with no_exit(f"{option} {spec}: importing {path}"):
                module_spec.loader.exec_module(module)  # type: ignore[union-attr]
        except Exception as exc:
            del sys.modules[name]
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"{option} {spec}: importing {path} raised {type(exc).__name__}: {first_line(exc)}") from None
    else:
        try:
            with no_exit(f"{option} {spec}: importing {where}"):
                module = importlib.import_module(where)
        except ConfigError:
            raise
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
        with no_exit(f"{option} {spec}: {fn.__name__}()"):
            return fn()
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{option} {spec}: {fn.__name__}() raised {type(exc).__name__}: {first_line(exc)}") from None
