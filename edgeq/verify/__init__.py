"""`edgeq verify`: prove that exported artifacts are intact, accurate, faithful to fp32, small and fast.

Light to import: onnxruntime, torch and matplotlib are imported by the functions that use them.
"""

from edgeq.verify.core import verify
from edgeq.verify.rows import Row, VerifyConfig, VerifyResult

__all__ = ["Row", "VerifyConfig", "VerifyResult", "verify"]
