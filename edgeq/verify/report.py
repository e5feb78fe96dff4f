"""Renderings of a VerifyResult: the terminal table, the JSON report (with its schema), Markdown.

The JSON report is the machine-readable record: one row per baseline and artifact, the gates, the
environment the numbers were measured in, and `passed`. REPORT_SCHEMA describes it.
"""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import asdict, fields
from pathlib import Path

from edgeq import evidence
from edgeq.clock import profile
from edgeq.signing import STATUSES, describe
from edgeq.verify.rows import FP32_SLOWDOWN_LIMIT, REFERENCES, UNLISTED, Row, VerifyResult

REPORT_VERSION = 1
WIDTH = 100
SHORT_RUNTIME = {"onnxruntime-cpu": "ort-cpu", "torch-cpu": "pt-cpu", "torch-cuda": "pt-cuda", "executorch-cpu": "et-cpu"}

_NUM = {"type": ["number", "null"]}
_INT = {"type": ["integer", "null"]}
_STR = {"type": ["string", "null"]}
_RATIOS = {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0}}
_ROW_PROPERTIES: dict = {
    "name": {"type": "string"}, "model": {"type": "string"},
    "format": {"enum": ["checkpoint", "torchscript", "onnx", "pte"]}, "precision": {"enum": ["fp32", "int8"]},
    "runtime": {"enum": list(SHORT_RUNTIME)}, "role": {"enum": ["baseline", "artifact"]},
    "stage": {"enum": ["original", "pruned", "quantized", "pruned + quantized"]},
    "parent": _STR, "file": _STR, "recommended": {"type": "boolean"},
    "status": {"enum": ["ok", "FAIL", "skipped"]},
    "reasons": {"type": "array", "items": {"type": "string"}},
    "warnings": {"type": "array", "items": {"type": "string"}},
    "n": _INT, "correct": _INT,
    "accuracy": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
    "manifest_accuracy": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
    "delta_pts": _NUM,
    "val_accuracy": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
    "bar_pts": {"description": "the bar the export built the file to: at most this many points below its parent on "
                               "the validation split (manifest contract)", "type": ["number", "null"]},
    "drop_vs_parent_pts": {"description": "points below its parent on the validation split, both measured here in "
                                          "the same runtime", "type": ["number", "null"]},
    "contract": {"description": "each bar and the agreement rule of the file's contract, re-measured here on the "
                                "validation split", "type": "array", "items": {"type": "object",
                                                                              "required": ["rule", "met"]}},
    "agreement": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
    "sqnr_db": {"description": "logit SQNR vs the fp32 baseline; the string inf for identical logits",
                "anyOf": [{"type": ["number", "null"]}, {"const": "inf"}]},
    "bytes": _INT, "gzip_bytes": _INT, "size_vs_fp32": _NUM, "size_vs_parent": _NUM,
    "params": _INT, "nonzero_params": _INT, "threads": _INT, "batch": _INT,
    "p50_ms_b1": _NUM, "p90_ms_b1": _NUM, "p50_ms_batch": _NUM, "samples_per_s": _NUM,
    "paired": {
        "description": "reference kind -> median and per-round ratios candidate/reference time (>1: slower)",
        "type": "object",
        "propertyNames": {"enum": list(REFERENCES)},
        "additionalProperties": {
            "type": "object",
            "required": ["reference", "runtime", "ratio_b1", "ratio_batch", "rounds_b1", "rounds_batch"],
            "properties": {"reference": {"type": "string"}, "runtime": {"type": "string"},
                           "ratio_b1": {"type": "number"}, "ratio_batch": {"type": "number"},
                           "rounds_b1": _RATIOS, "rounds_batch": _RATIOS},
        },
    },
    "speedup_vs_torch_fp32_b1": _NUM, "speedup_vs_torch_fp32_batch": _NUM,
    "speedup_vs_ort_fp32_b1": _NUM, "speedup_vs_ort_fp32_batch": _NUM,
    "slower_than_parent": {"type": ["boolean", "null"]},
    "slower_than_fp32_baseline": {
        "description": "an fp32 CPU artifact more than gates.fp32_slowdown_limit times slower than the fp32 "
                       "checkpoint baseline (paired, batch 1 or the large batch); null when not applicable",
        "type": ["boolean", "null"]},
}
assert set(_ROW_PROPERTIES) == {f.name for f in fields(Row)}, "REPORT_SCHEMA is out of step with Row"

REPORT_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "edgeq verify report",
    "type": "object",
    "required": ["report_version", "directory", "passed", "failures", "gates", "measurement", "dataset",
                 "environment", "rows", "not_built", "wall_s"],
    "additionalProperties": False,
    "properties": {
        "report_version": {"const": REPORT_VERSION},
        "directory": {"type": "string"},
        "passed": {"type": "boolean"},
        "failures": {"type": "array", "items": {"type": "string"}},
        "gates": {
            "type": "object",
            "required": ["max_accuracy_drop", "min_agreement", "fail_on_slower", "slower_margin"],
            "properties": {"fp32_slowdown_limit": {"type": "number", "exclusiveMinimum": 1}},  # optional in v1
        },
        "measurement": {
            "type": "object",
            "required": ["threads", "batch", "rounds", "window_s", "method"],
            "properties": {  # optional in v1
                "time_limit_s": {"type": "number", "exclusiveMinimum": 0},
                "memory_limit_gb": {"description": "GiB of memory (RLIMIT_DATA) the worker could add; null: not capped",
                                    "type": ["number", "null"]},
            },
        },
        "dataset": {"type": "object", "required": ["source", "eval", "samples"]},
        "environment": {
            "type": "object",
            "required": ["cpu", "threads", "providers", "torch", "onnxruntime", "python", "cuda"],
            "properties": {
                "cpu": {"type": "object", "required": ["model", "cores", "isa"]},
                "threads": {"type": "integer", "minimum": 1},
                "providers": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            },
        },
        "rows": {
            "type": "array",
            "minItems": 1,
            "items": {"type": "object", "required": list(_ROW_PROPERTIES), "additionalProperties": False,
                      "properties": _ROW_PROPERTIES},
        },
        "not_built": {"type": "array", "items": {"type": "object", "required": ["name", "reason"]}},
        "wall_s": {"type": "number", "minimum": 0},
        "phases": {"type": "object", "additionalProperties": {"type": "number", "minimum": 0}},  # optional in v1
        # optional in v1, always written: the signature, and what the directory holds beyond the manifest
        "signature": {
            "type": "object",
            "required": ["status", "file", "public_key"],
            "properties": {
                "status": {"enum": list(STATUSES)},
                "file": _STR,
                "public_key": _STR,
                "files": {"description": "the files the verified signature covers",
                          "type": "array", "items": {"type": "string"}},
            },
        },
        "unlisted": {"description": f"names {UNLISTED}; they fail the run under --strict",
                     "type": "array", "items": {"type": "string"}},
        "directory_problems": {"description": "symlinks and special files in the directory; each fails the run",
                               "type": "array", "items": {"type": "string"}},
        "families": {"description": "per model family, from the manifest: accuracy bar, recommended files, "
                                    "calibration chosen, per-layer sensitivity", "type": "object"},
    },
}


def to_json(result: VerifyResult) -> dict:
    """The JSON report as a dict (valid against REPORT_SCHEMA)."""
    cfg = result.config
    return {
        "report_version": REPORT_VERSION,
        "directory": result.directory,
        "passed": result.passed,
        "failures": result.failures,
        "gates": {"max_accuracy_drop": cfg.max_accuracy_drop, "min_agreement": cfg.min_agreement,
                  "fail_on_slower": cfg.fail_on_slower, "slower_margin": cfg.slower_margin, "strict": cfg.strict,
                  "fp32_slowdown_limit": FP32_SLOWDOWN_LIMIT},
        "measurement": {
            "threads": cfg.threads, "batch": cfg.batch, "rounds": cfg.rounds, "window_s": cfg.window_s,
            "time_limit_s": cfg.time_limit_s, "memory_limit_gb": result.memory_cap_gb,
            "method": "each artifact timed in alternating windows with its references (parent, torch fp32 CPU, "
                      "onnxruntime fp32), order reversed every round; ratios are medians of per-round "
                      "median-time ratios; accuracy pass with threads=1 at the exporter's batch",
        },
        "dataset": result.dataset,
        "environment": result.environment,
        "rows": [{k: _finite(v) for k, v in asdict(r).items()} for r in result.rows],
        "not_built": result.not_built,
        "wall_s": result.wall_s,
        "phases": result.phases,
        "families": result.families,
        "signature": result.signature,
        "unlisted": result.unlisted,
        "directory_problems": result.directory_problems,
    }


def _finite(value: object) -> object:
    """JSON has no infinity: an infinite SQNR (identical logits) is written as the string "inf"."""
    return "inf" if isinstance(value, float) and math.isinf(value) else value


def write_json(result: VerifyResult, path: Path) -> None:
    _parent(path).write_text(json.dumps(to_json(result), indent=2) + "\n", encoding="utf-8")


def _parent(path: Path) -> Path:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return Path(path)


def _f(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else format(value, spec)


def _kib(size: int | None) -> str:
    return _f(None if size is None else size / 1024, ".1f")


def _rate(value: float | None) -> str:
    """Samples/s in at most 6 characters."""
    if value is None:
        return "-"
    return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.0f}k" if value >= 1e4 else f"{value:.0f}"


def _flags(row: Row) -> str:
    flags = ["base"] * (row.role == "baseline") + ["rec"] * row.recommended
    flags += ["slow"] * bool(row.slower_than_parent) + ["slowbase"] * bool(row.slower_than_fp32_baseline)
    if row.bar_pts is not None and row.drop_vs_parent_pts is not None:
        flags.append(f"bar{row.bar_pts:g}:{row.drop_vs_parent_pts:+.2f}")
    flags += ["FAIL"] * (row.status == "FAIL")
    return ",".join(flags)


def table(result: VerifyResult) -> str:
    """The terminal table, readable at 100 columns, with a legend and a one-line verdict."""
    name_w = max(len("artifact"), *(len(r.name) for r in result.rows))
    head = (f"{'artifact':<{name_w}} {'runtime':<7} {'acc%':>5} {'dpts':>5} {'agree':>5} {'SQNR':>5} {'KiB':>6} "
            f"{'xfp32':>5} {'p50ms':>6} {'smp/s':>6} {'xpt32':>5} flags")
    lines = [head, "-" * min(WIDTH, len(head) + 5)]
    for r in result.rows:
        left = f"{r.name:<{name_w}} {SHORT_RUNTIME[r.runtime]:<7} "
        if r.accuracy is None:
            why = r.reasons[0] if r.status == "skipped" else f"FAIL: {'; '.join(r.reasons)}"
            lines.append(left + textwrap.shorten(why, max(20, WIDTH - len(left)), placeholder="..."))
            continue
        acc = 100 * r.accuracy
        lines.append(
            left + f"{acc:>5.2f} {_f(r.delta_pts, '+.2f'):>5} {_f(r.agreement, '.3f'):>5} {_f(r.sqnr_db, '.1f'):>5} "
            f"{_kib(r.bytes):>6} {_f(r.size_vs_fp32, '.2f'):>5} "
            f"{_f(r.p50_ms_b1, '.3f'):>6} {_rate(r.samples_per_s):>6} {_f(r.speedup_vs_torch_fp32_b1, '.2f'):>5} "
            f"{_flags(r)}".rstrip()
        )
    cfg = result.config
    legend = (
        f"dpts: accuracy change vs the family's fp32 checkpoint run eagerly on CPU (base), in points; agree, "
        f"SQNR: top-1 agreement and logit SQNR (dB) vs the same; xfp32: file size vs the fp32 file of the same "
        f"format; p50ms: median latency at batch 1; smp/s: samples/s at batch {cfg.batch}; xpt32: speed-up vs "
        f"torch fp32 CPU at batch 1 (paired); slow: int8 more than {100 * cfg.slower_margin:g}% slower than its "
        f"fp32 parent (paired, batch 1 or {cfg.batch}); slowbase: fp32 more than {FP32_SLOWDOWN_LIMIT:g}x slower "
        f"than base (same); barB:D: built to lose at most B points against its parent on the validation split, loses "
        f"D here (the row fails on any bar of its contract it breaks). "
        f"Threads: {cfg.threads}; time limit {cfg.time_limit_s:g} s per step; {cfg.rounds} timing "
        f"round{'s' * (cfg.rounds != 1)}"
        + (f" (the slow flags need {evidence.fewest_rounds()}: none was looked for)."
           if cfg.rounds < evidence.fewest_rounds() else ".")
    )
    counts = {s: sum(r.status == s for r in result.rows) for s in ("ok", "FAIL", "skipped")}
    directory = len(result.directory_failures)
    verdict = (f"{'PASSED' if result.passed else 'FAILED'}: {counts['ok']} ok, {counts['FAIL']} FAIL, "
               f"{counts['skipped']} skipped{f', {directory} directory FAIL' * bool(directory)}; "
               f"verified in {result.wall_s:.1f} s")
    claims = textwrap.fill(f"claims checked: {result.environment.get('claims', 'exact')}.", WIDTH)
    sandbox = textwrap.fill(confinement(result.environment), WIDTH)
    return "\n".join([*lines, "", textwrap.fill(legend, WIDTH), claims, sandbox, *_families(result.families),
                      *_not_built(result.not_built),
                      *_directory(result), verdict, *_profile(result.phases)])


def confinement(environment: dict) -> str:
    """One sentence: what the worker that ran the files could not do (edgeq.limits.confine)."""
    from edgeq.limits import describe

    return describe(environment.get("worker_confinement"), "the files ran in a worker")


def _families(families: dict) -> list[str]:
    """Per family: the bar, the recommended files, the calibration chosen, the most sensitive layers."""
    text = []
    for name, fam in families.items():
        rec = fam.get("recommended") or {}
        parts = [f"{name}: bars {fam.get('max_accuracy_drop', '?')} pts (int8), {fam.get('max_pruning_drop', '?')} pts "
                 "(pruning)",
                 f"recommended fastest {rec.get('fastest')}, smallest {rec.get('smallest')}"]
        for parent, cal in (fam.get("calibration") or {}).items():
            parts.append(f"calibration ({parent}) {cal['method']}/{cal['samples']}")
        for parent, sens in ((fam.get("sensitivity") or {}).get("quantization") or {}).items():
            rows = {r["node"]: r for r in sens["layers"]}
            top = [f"{n} {rows[n]['gain_points']:+.2f}" for n in sens["ranking"][:3]]
            parts.append(f"most int8-sensitive ({parent}, pts won back in fp32): {', '.join(top)}")
        groups = ((fam.get("sensitivity") or {}).get("pruning") or {}).get("groups") or []
        if groups:
            worst = sorted(groups, key=lambda g: -g["drop_points"])[:3]
            parts.append("most prune-sensitive groups: " + ", ".join(f"{g['group']} {-g['drop_points']:+.2f}"
                                                                       for g in worst))
        text.append("; ".join(parts) + ".")
    return [line for t in text for line in textwrap.wrap(t, WIDTH, break_on_hyphens=False, subsequent_indent="  ")]


def _directory(result: VerifyResult) -> list[str]:
    """The signature status, the unlisted names and the directory's failures, wrapped to WIDTH."""
    text = [f"signature: {describe(result.signature)}."]
    if result.unlisted:
        verdict = "FAIL (--strict)" if result.config.strict else "warning"
        text.append(f"unlisted, {verdict}: {', '.join(result.unlisted)} (not in manifest.json, not verified).")
    text += [f"FAIL {line}" for line in result.directory_problems]
    return [line for t in text for line in textwrap.wrap(t, WIDTH, break_on_hyphens=False, subsequent_indent="  ")]


def _not_built(skipped: list[dict]) -> list[str]:
    """The export's `skipped` list in two groups, names only (the reasons are in the manifest)."""
    slower = [s["name"] for s in skipped if s.get("kind") == "slower_than_parent"]
    below = [s["name"] for s in skipped if s.get("kind") == "below_accuracy_bar"]
    other = [s["name"] for s in skipped if s.get("kind") not in ("slower_than_parent", "below_accuracy_bar")]
    text = []
    if slower:
        text.append(f"not shipped, slower than their fp32 parent when exported: {', '.join(slower)}.")
    if below:
        text.append(f"not shipped, no int8 plan within the accuracy bar: {', '.join(below)}.")
    if other:
        text.append(f"not built: {', '.join(other)} (reasons in manifest.json `skipped`).")
    return [line for t in text for line in textwrap.wrap(t, WIDTH, break_on_hyphens=False)]


def _profile(phases: dict) -> list[str]:
    """Where verify's time went, largest first, as wrapped lines (none when nothing was timed)."""
    return textwrap.wrap(profile({k.replace("_", " "): v for k, v in phases.items()}), WIDTH) if phases else []


def markdown(result: VerifyResult) -> str:
    """A comparison report per model family: original vs pruned vs quantized, accuracy, size, speed."""
    env, cfg = result.environment, result.config
    out = [
        f"# edgeq verify: `{result.directory}`",
        "",
        f"**{'PASSED' if result.passed else 'FAILED'}** — gates: each file's contract on the validation split "
        f"(its bars, and post-training int8's agreement with its parent), golden and reference outputs"
        f"{f', accuracy drop ≤ {cfg.max_accuracy_drop:g} pts vs the fp32 baseline' if cfg.max_accuracy_drop is not None else ''}"
        f"{f', top-1 agreement ≥ {cfg.min_agreement:g} vs the fp32 baseline' if cfg.min_agreement is not None else ''}"
        f"{', int8 not slower than its fp32 parent' if cfg.fail_on_slower else ''}"
        f"{f', fp32 within {FP32_SLOWDOWN_LIMIT:g}x of the fp32 baseline' if cfg.fail_on_slower else ''}"
        f"{', no file outside the manifest' if cfg.strict else ''}.",
        "",
        f"Signature: {describe(result.signature)}.",
        "",
        f"Measured on {env['cpu']['model']} ({env['cpu']['cores']} cores; "
        f"{', '.join(k for k, v in env['cpu']['isa'].items() if v) or 'no listed ISA extensions'}), "
        f"{cfg.threads} thread(s), torch {env['torch']}, onnxruntime {env['onnxruntime']}, "
        f"CUDA: {env['cuda'] or 'none'}. Evaluation set: {result.dataset['samples']} samples from "
        f"`{result.dataset['eval']}` ({result.dataset['description'] or result.dataset['source']}). Latency: batch 1 and "
        f"batch {cfg.batch}, each artifact timed in alternating windows with its references; speed-ups are "
        "paired ratios.",
        "",
        "S" + confinement(env)[1:],
    ]
    for model in dict.fromkeys(r.model for r in result.rows):
        rows = [r for r in result.rows if r.model == model]
        out += ["", f"## {model}", "",
                "| artifact | stage | runtime | acc % | Δ pts | agree | SQNR dB | KiB | × fp32 size | gzip KiB "
                f"| p50 ms b1 | p90 ms b1 | samples/s b{cfg.batch} | × torch fp32 b1 / b{cfg.batch} "
                f"| × ORT fp32 b1 / b{cfg.batch} | status |",
                "|" + "---|" * 16]
        for r in rows:
            status = "; ".join(r.reasons) if r.status != "ok" else "ok"
            status += "".join(f" ⚠ {w}" for w in r.warnings)
            out.append(
                f"| {r.name}{' (recommended)' if r.recommended else ''} | {r.stage} | {r.runtime} "
                f"| {_f(100 * r.accuracy if r.accuracy is not None else None, '.2f')} | {_f(r.delta_pts, '+.2f')} "
                f"| {_f(r.agreement, '.3f')} | {_f(r.sqnr_db, '.1f')} | {_kib(r.bytes)} | {_f(r.size_vs_fp32, '.2f')} "
                f"| {_kib(r.gzip_bytes)} | {_f(r.p50_ms_b1, '.3f')} | {_f(r.p90_ms_b1, '.3f')} "
                f"| {_f(r.samples_per_s, ',.0f')} "
                f"| {_f(r.speedup_vs_torch_fp32_b1, '.2f')} / {_f(r.speedup_vs_torch_fp32_batch, '.2f')} "
                f"| {_f(r.speedup_vs_ort_fp32_b1, '.2f')} / {_f(r.speedup_vs_ort_fp32_batch, '.2f')} | {status} |"
            )
        out += _highlights(rows)
    if result.not_built:
        out += ["", "## Not built by the exporter", ""]
        out += [f"- `{s['name']}`: {s['reason']}" for s in result.not_built]
    if result.unlisted or result.directory_problems:
        out += ["", "## Files outside the manifest", ""]
        kind = "FAIL (--strict)" if result.config.strict else "warning"
        out += [f"- `{name}`: {kind}, {UNLISTED}" for name in result.unlisted]
        out += [f"- FAIL: {line}" for line in result.directory_problems]
    return "\n".join(out) + "\n"


def _highlights(rows: list[Row]) -> list[str]:
    """The passing artifacts that are smallest, fastest at batch 1 and most accurate."""
    ok = [r for r in rows if r.status == "ok" and r.runtime != "torch-cuda" and r.p50_ms_b1 is not None]
    if not ok:
        return ["", "No artifact of this family passes the gates."]
    small = min(ok, key=lambda r: r.bytes or 0)
    fast = max(ok, key=lambda r: r.speedup_vs_torch_fp32_b1 or 0.0)
    best = max(ok, key=lambda r: r.accuracy or 0.0)
    return [
        "",
        f"- Smallest passing: **{small.name}**, {(small.bytes or 0) / 1024:.1f} KiB "
        f"({_f(small.size_vs_fp32, '.2f')}× its fp32 file), {100 * (small.accuracy or 0):.2f}%.",
        f"- Fastest passing at batch 1: **{fast.name}** ({fast.runtime}), "
        f"{_f(fast.speedup_vs_torch_fp32_b1, '.2f')}× torch fp32 (paired), p50 {_f(fast.p50_ms_b1, '.3f')} ms.",
        f"- Most accurate passing: **{best.name}**, {100 * (best.accuracy or 0):.2f}%.",
    ]


def write_markdown(result: VerifyResult, path: Path) -> None:
    _parent(path).write_text(markdown(result), encoding="utf-8")
