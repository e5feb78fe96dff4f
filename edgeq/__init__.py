"""edgeq: turn a trained PyTorch classifier into verified, deployable edge artifacts.

    manifest = edgeq.compress(model, train=(x_train, y_train), test=(x_test, y_test), out="artifacts-mine")
    result = edgeq.verify("artifacts-mine")  # result.passed, result.rows

The public API is `compress`, `verify`, `Recipe` and `Manifest`. They are imported on first use, so
`import edgeq` stays light (no torch, no onnxruntime).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.2.0"
__all__ = ["compress", "verify", "Recipe", "Manifest", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from edgeq.build import compress
    from edgeq.manifest import Manifest
    from edgeq.recipe import Recipe
    from edgeq.verify import verify


def __getattr__(name: str):
    match name:
        case "compress":
            from edgeq.build import compress

            return compress
        case "Recipe":
            from edgeq.recipe import Recipe

            return Recipe
        case "Manifest":
            from edgeq.manifest import Manifest

            return Manifest
        case "verify":
            import edgeq.verify  # the package is callable: edgeq.verify(directory, ...)

            return edgeq.verify
    raise AttributeError(f"module 'edgeq' has no attribute {name!r}")
