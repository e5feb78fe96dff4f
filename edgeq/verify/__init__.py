"""`edgeq verify`: prove that exported artifacts are intact, accurate, faithful to fp32, small and fast.

Light to import: onnxruntime, torch and matplotlib are imported by the functions that use them.
The package itself is callable, so the public API reads `edgeq.verify(directory, **options)`
whether `edgeq.verify` is reached as the function or as this package.
"""

import sys
import types
from pathlib import Path

from edgeq.verify.core import verify as _verify
from edgeq.verify.rows import Row, VerifyConfig, VerifyResult

__all__ = ["Row", "VerifyConfig", "VerifyResult", "verify"]


def verify(directory: str | Path, cfg: VerifyConfig | None = None, worker=None, **options) -> VerifyResult:
    """Verify an artifacts directory: `options` are VerifyConfig fields (threads, batch,
    max_accuracy_drop, min_agreement, public_key, strict, time_limit_s, ...), or pass a `cfg`."""
    if cfg is None:
        cfg = VerifyConfig(**options)
    elif options:
        raise TypeError("pass either a VerifyConfig or keyword options, not both")
    return _verify(directory, cfg, worker)


class _CallablePackage(types.ModuleType):
    def __call__(self, directory: str | Path, cfg: VerifyConfig | None = None, worker=None, **options) -> VerifyResult:
        return verify(directory, cfg, worker, **options)


sys.modules[__name__].__class__ = _CallablePackage
