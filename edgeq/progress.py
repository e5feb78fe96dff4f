"""Progress for long stages: a tqdm bar on a terminal, one line per stage anywhere else.

Off a terminal (a CI log, a pipe to a file) a bar's carriage-return frames fill the log, so a
stage prints a single line when it ends instead, the way pip and most CLIs behave.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any


def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "step", file: IO[str] | None = None):
    """tqdm when `file` (stderr) is a terminal, else a `StageLine`; nothing at all when disabled."""
    from tqdm import tqdm

    file = file or sys.stderr
    if enabled and not _is_terminal(file):
        return StageLine(total, desc, unit, file)
    return tqdm(total=total, desc=desc, unit=unit, file=file, disable=not enabled, leave=False)


def _is_terminal(file: IO[str]) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):
        return False


class StageLine:
    """The slice of tqdm's interface edgeq uses; prints `desc: N unit in X s (postfix)` once, at close."""

    def __init__(self, total: int, desc: str, unit: str, file: IO[str]):
        self.total, self.desc, self.unit, self.file = total, desc, unit, file
        self.n, self.postfix, self._t0, self._closed = 0, "", time.perf_counter(), False

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self._line()  # a new description is a new stage: report the one that ended
        self.desc, self.n, self._t0 = desc, 0, time.perf_counter()

    def set_postfix(self, **kwargs: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass  # per-item detail (which artifact is running) is noise in a log

    def reset(self, total: int | None = None) -> None:
        self.total, self.n = (self.total if total is None else total), 0

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._line()

    def _line(self) -> None:
        if self.n:
            extra = f" ({self.postfix})" if self.postfix else ""
            print(f"{self.desc}: {self.n} {self.unit} in {time.perf_counter() - self._t0:.1f} s{extra}",
                  file=self.file, flush=True)

    def __enter__(self) -> "StageLine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
