"""What `python -m edgeq.device check` found: per file its status and figures, the bundle's own problems,
and how it is shown (the summary lines, one FAIL line per problem, the JSON report)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class FileResult:
    """One artifact as the checker found it: its status, what failed, and what was measured."""

    name: str
    file: str
    format: str
    precision: str
    status: str = "ok"  # ok | failed | not_checked
    problems: list[str] = field(default_factory=list)
    note: str = ""
    bytes: int | None = None  # of the copy that was run (its sha256 checked against the manifest)
    sha256: str | None = None
    fidelity: dict | None = None
    speed: dict | None = None
    accuracy: dict | None = None

    def fail(self, problem: str) -> None:
        """Mark the file failed, with one more line saying why."""
        self.status, self.problems = "failed", [*self.problems, problem]


@dataclass
class CheckResult:
    """The whole check: the device, the runtimes, the threads each file ran at, every file's result."""

    directory: str
    cpu: dict
    runtime: dict
    threads: dict
    files: list[FileResult]
    bundle_problems: list[str] = field(default_factory=list)  # files that are no artifact: eval.npz, plan.json
    notes: list[str] = field(default_factory=list)  # settings changed to fit this device (threads capped)
    signature: dict | None = None
    claims: str = ""  # the accuracy rule applied (edgeq.policy.claim_ok): exact, or within the slack
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.bundle_problems and all(f.status != "failed" for f in self.files)

    def failure_lines(self) -> list[str]:
        lines = [f"FAIL {p}" for p in self.bundle_problems]
        for f in self.files:
            lines += [f"FAIL {f.file} ({f.name}): {p}" for p in f.problems]
        return lines

    def to_dict(self) -> dict:
        return {"passed": self.passed, **asdict(self)}


def summary(result: CheckResult) -> list[str]:
    """The lines printed before the verdict: the device, then one line per file."""
    cpu = result.cpu
    flags = ", ".join(cpu["int8_flags"]) or "no int8 flags"
    emulated = f"; {cpu['emulated']}" if "emulated" in cpu else ""
    lines = [f"{cpu['model']} ({cpu['machine']}, {flags}){emulated}; onnxruntime {result.runtime['onnxruntime']}"]
    for f in result.files:
        parts = [f"{f.status:<11} {f.file}"]
        if f.fidelity:
            parts.append(f"golden: logit error {f.fidelity['max_logit_error']:.2g}, top-1 "
                         f"{f.fidelity['top1_agreement']:.4f}{' (bit-equal)' if f.fidelity['bit_equal'] else ''}")
        if f.speed:
            parts += [f"{b}: {s['ratio']:.2f}x {f.speed['vs']}" for b, s in f.speed["batches"].items()]
        if f.accuracy:
            parts.append(f"accuracy {f.accuracy['accuracy']:.4f} (manifest {f.accuracy['manifest_accuracy']})")
        if f.note:
            parts.append(f.note)
        lines.append("  " + "; ".join(parts))
    from edgeq.limits import describe

    sandbox = describe(result.runtime.get("confinement"), "the files ran in a child process")
    return lines + [f"note: {n}" for n in result.notes] + [sandbox]


def verdict(result: CheckResult) -> str:
    count = lambda status: sum(f.status == status for f in result.files)
    return (f"{'passed' if result.passed else 'failed'}: {count('ok')} files checked, {count('failed')} failed, "
            f"{count('not_checked')} not checked here ({result.seconds:.1f} s)")


def write_json(result: CheckResult, path: Path) -> None:
    """The JSON report, to a path the caller has checked (edgeq.bundle.output_problem)."""
    path.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
