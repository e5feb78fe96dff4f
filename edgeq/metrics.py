"""Fidelity and accuracy of a candidate's logits against a reference's: one implementation for the
exporter, the verifier and the benchmarks.

Quantization quality is measured as top-1 agreement and as the logits' SQNR,
20*log10(||ref|| / ||ref - cand||) in dB; accuracy as an integer count, so that two runs (or a
manifest and a verifier) agree to the last sample.
"""

from __future__ import annotations

import math

import numpy as np


def correct_count(logits: np.ndarray, labels: np.ndarray) -> int:
    """Number of top-1 hits."""
    return int((logits.argmax(axis=1) == labels).sum())


def agreement(ref: np.ndarray, cand: np.ndarray) -> float:
    """Fraction of samples on which both logit sets pick the same class."""
    return float((ref.argmax(axis=1) == cand.argmax(axis=1)).mean())


def sqnr_db(ref: np.ndarray, cand: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of the logits, 20*log10(||ref|| / ||ref - cand||); inf if equal."""
    ref64, diff = ref.astype(np.float64), ref.astype(np.float64) - cand.astype(np.float64)
    noise = float(np.linalg.norm(diff))
    return math.inf if noise == 0.0 else 20.0 * math.log10(float(np.linalg.norm(ref64)) / noise)


def drop_points(ref_correct: int, correct: int, n: int) -> float:
    """Accuracy lost against a reference on the same n samples, in points (negative: a gain)."""
    return round(100.0 * (ref_correct - correct) / n, 4)


def score(logits: np.ndarray, labels: np.ndarray, ref: np.ndarray) -> dict:
    """Accuracy (and the integer count behind it), agreement and SQNR against a reference's logits."""
    correct = correct_count(logits, labels)
    sqnr = sqnr_db(ref, logits)
    return {"correct": correct, "accuracy": round(correct / len(labels), 6), "agreement": round(agreement(ref, logits), 6),
            "sqnr_db": round(sqnr, 2) if np.isfinite(sqnr) else None}


def finite(logits: np.ndarray) -> bool:
    return bool(np.isfinite(logits).all())
