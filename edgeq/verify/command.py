"""The `verify` click command: options -> VerifyConfig -> verify() -> table, reports, exit code.

Registered in edgeq/cli.py with `main.add_command(verify)`; also runnable as
`python -m edgeq.verify.command DIR`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from edgeq import evidence
from edgeq.errors import EdgeqError
from edgeq.verify.rows import DEFAULT_TIME_LIMIT_S, FP32_SLOWDOWN_LIMIT, VerifyConfig


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("directory", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="Threads for torch and onnxruntime (intra-op) while timing.")
@click.option("--batch", type=click.IntRange(min=1), default=256, show_default=True,
              help="Batch size for the throughput measurement.")
@click.option("--max-accuracy-drop", type=click.FloatRange(min=0), default=None, metavar="POINTS",
              help="A rule of your own besides each file's contract: fail an artifact whose accuracy on the "
                   "evaluation data is more than POINTS below its family's fp32 baseline.")
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=None,
              help="A rule of your own besides each file's contract: fail an artifact whose top-1 agreement with "
                   "the fp32 baseline on the evaluation data is lower.")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write the JSON report here.")
@click.option("--markdown", "markdown_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write a Markdown comparison report here.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write a PNG: accuracy vs size and vs latency, with the Pareto front.")
@click.option("--data", type=click.Path(path_type=Path, dir_okay=False), default=None, metavar="FILE.npz",
              help="Measure on this .npz (arrays `inputs`, `labels`, shaped as the manifest's input) instead of "
                   "the eval.npz the export shipped, e.g. a larger set.")
@click.option("--fail-on-slower", is_flag=True,
              help=f"Fail (not just warn) when an int8 artifact is slower than its fp32 parent, or an fp32 artifact "
                   f"is more than {FP32_SLOWDOWN_LIMIT:g}x slower than its family's fp32 checkpoint baseline.")
@click.option("--time-limit", type=float, default=DEFAULT_TIME_LIMIT_S, show_default=True, metavar="SECONDS",
              help="Fail an artifact whose load and accuracy pass, warm-up, or timing takes longer than SECONDS "
                   "(each step); the other artifacts are still verified.")
@click.option("--rounds", type=click.IntRange(min=1), default=VerifyConfig.rounds, show_default=True,
              help=f"Alternating timing rounds per row and batch size. The slower flags read the "
                   f"{evidence.RULE.confidence:.0%} interval of the paired ratios, which needs "
                   f"{evidence.fewest_rounds()}; with fewer, latencies are reported and nothing is flagged slower "
                   "(a quicker check of everything else).")
@click.option("--memory-limit", type=float, default=None, metavar="GIB",
              help="Memory (GiB) that the files being run may add to the verify worker process (one file, or one "
                   "timed row, at a time); an artifact that needs more fails. Default: half this machine's memory. "
                   "Not applied with CUDA.")
@click.option("--public-key", type=click.Path(path_type=Path, dir_okay=False), default=None, metavar="PUB",
              help="Check DIR's signature (edgeq.sig, from `edgeq export --sign-key`) with this PEM "
                   "elliptic-curve public key before anything else; any changed, added or removed file fails.")
@click.option("--strict", is_flag=True,
              help="Fail (not just warn) on a file or directory in DIR that manifest.json does not list.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def verify(directory: Path, threads: int, batch: int, max_accuracy_drop: float | None, min_agreement: float | None,
           json_path: Path | None, markdown_path: Path | None, plot_path: Path | None, data: Path | None,
           fail_on_slower: bool, time_limit: float, rounds: int, memory_limit: float | None,
           public_key: Path | None, strict: bool, quiet: bool) -> None:
    """Check every artifact in DIR: signature, integrity, accuracy, fidelity, size and speed.

    With --public-key, the signature over every file in DIR is checked first. Files are then
    checked against manifest.json (size, sha256) before anything is loaded; any other file in DIR
    is a warning (a failure with --strict), and a symlink anywhere in DIR fails. Each artifact then
    runs in its own runtime on the test split (reported, compared with the fp32 PyTorch baseline of
    its model family) and on the validation split the export decided on, where the contract it was
    shipped with is checked again: its bars against its parent and its family's fp32 file, and for
    post-training int8 its agreement with its parent. Golden outputs and the model's own reference
    outputs are checked too. With no option, verify checks exactly what the export promised. Artifacts run in a separate worker process: one that hangs past
    --time-limit or runs out of memory becomes a FAIL row naming its file. Exit code 0 when every
    artifact passes, 1 otherwise.

    \b
    Example:
      edgeq verify artifacts
      edgeq verify artifacts --threads 2 --json reports/verify.json --plot reports/verify.png
      edgeq verify artifacts --public-key pub.pem --strict
      edgeq verify untrusted-artifacts --time-limit 30 --memory-limit 2
    """
    from edgeq.verify import core, report

    try:
        _outputs_outside(directory, json_path, markdown_path, plot_path)
        cfg = core.VerifyConfig(threads=threads, batch=batch, max_accuracy_drop=max_accuracy_drop,
                                min_agreement=min_agreement, data=str(data) if data else None,
                                fail_on_slower=fail_on_slower, time_limit_s=time_limit, rounds=rounds,
                                memory_limit_gb=memory_limit, strict=strict,
                                public_key=str(public_key) if public_key else None, progress=not quiet)
        try:
            result = core.verify(directory, cfg)
        except OSError as exc:  # verify only reads DIR: a file that vanished or changed under it
            _fail(f"{exc.filename or directory}: cannot read ({exc.strerror}); if an export is replacing "
                  f"{directory}, run verify again once it has finished")
        for path, write in ((json_path, report.write_json), (markdown_path, report.write_markdown),
                            (plot_path, _write_plot)):
            if path is not None:
                _write_report(write, result, path)
    except EdgeqError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        from edgeq.bundle import end_interrupted

        sys.exit(end_interrupted("edgeq: interrupted"))
    click.echo(report.table(result))
    for warning in result.directory_warnings:
        click.echo(f"warning: {warning}", err=True)
    for row in result.rows:
        for warning in row.warnings:
            click.echo(f"warning: {row.label}: {warning}", err=True)
    for line in result.failures:
        click.echo(f"FAIL {line}", err=True)
    sys.exit(0 if result.passed else 1)


def _outputs_outside(directory: Path, json_path: Path | None, markdown_path: Path | None,
                     plot_path: Path | None) -> None:
    """Refuse, before anything runs, a report path inside DIR (it would overwrite the bundle being verified, its
    manifest included), a directory, or a read-only place."""
    from edgeq import bundle
    from edgeq.errors import ConfigError

    plots = [plot_path, plot_path.with_name(f"{plot_path.stem}-sensitivity{plot_path.suffix}")] if plot_path else []
    for flag, path in [("--json", json_path), ("--markdown", markdown_path)] + [("--plot", p) for p in plots]:
        problem = None if path is None else bundle.output_problem(path, directory)
        if problem is not None:
            raise ConfigError(f"{flag} {path}: {problem}")


def _write_report(write, result, path: Path) -> None:
    try:
        write(result, path)
    except OSError as exc:  # a report path that cannot be written
        _fail(f"{exc.filename or path}: cannot write ({exc.strerror}); choose a writable path")


def _write_plot(result, path: Path) -> None:
    from edgeq.verify.plot import write_plot, write_sensitivity_plot

    write_plot(result, path)
    write_sensitivity_plot(result, path.with_name(f"{path.stem}-sensitivity{path.suffix}"))


def _fail(message: str) -> None:
    click.echo(f"edgeq: error: {message}", err=True)
    sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    verify()
