"""The `edgeq` command line: each command maps its options onto one library call and echoes the result."""

from __future__ import annotations

import os
import sys

# torch's C++ side prints int8 deprecation notices straight to stderr, where Python's warnings
# filters cannot reach them; users cannot act on them. Must be set before torch is imported.
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
from pathlib import Path

import click

from edgeq.errors import EdgeqError


def _fail(exc: EdgeqError) -> None:
    click.echo(f"edgeq: error: {exc}", err=True)
    sys.exit(1)


def _csv(choices: tuple[str, ...]):
    def convert(ctx, param, value):
        if value is None:
            return choices
        if value.strip().lower() == "none":
            return ()
        items = tuple(v.strip() for v in value.split(",") if v.strip())
        bad = [v for v in items if v not in choices]
        if bad or not items:
            raise click.BadParameter(f"{','.join(bad) or value!r} is not one of {', '.join(choices)}")
        return items

    return convert


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgeq")
def main() -> None:
    """edgeq: compress a PyTorch model into verified edge artifacts.

    \b
    Example:
      edgeq export --out artifacts
      edgeq verify artifacts
    """


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("artifacts"), show_default=True,
              help="Output directory: new, empty or a previous edgeq export; replaced atomically when the "
                   "export succeeds.")
@click.option("--force", is_flag=True,
              help="Replace --out even when it holds files that are not a previous edgeq export (they are deleted).")
@click.option("--model", "models", type=click.Choice(["mlp", "cnn"]), multiple=True,
              help="Model family to build (repeatable). Default: mlp and cnn.")
@click.option("--variants", default=None, metavar="LIST",
              callback=_csv(("unstructured", "structured", "dynamic", "static", "qat")),
              help="Comma list of variants besides fp32: unstructured, structured, dynamic, static, qat, or none "
                   "(fp32 only). Default: all.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Full MNIST in torchvision layout (DIR/MNIST/raw). Default: the embedded 5,000 digits.")
@click.option("--download", is_flag=True, help="Download full MNIST into --data-dir (or ~/.cache/edgeq/mnist).")
@click.option("--prune-amount", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.8,
              show_default=True, help="Fraction of weights zeroed by unstructured pruning.")
@click.option("--prune-method", type=click.Choice(["l1", "random"]), default="l1", show_default=True,
              help="Unstructured pruning criterion: global L1 magnitude, or random.")
@click.option("--channel-amount", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.5,
              show_default=True, help="Fraction of hidden channels (filters, units) removed by structured pruning.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Training epochs (default per model).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for training, pruning and calibration.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="Threads the deployment runs with: int8-vs-fp32 decisions and the ship rule are timed at it.")
@click.option("--sign-key", type=click.Path(path_type=Path, dir_okay=False), default=None, metavar="KEY",
              help="EC private key (PEM) to sign the whole output directory with (OpenSSF model-signing); "
                   "check it with `edgeq verify DIR --public-key PUB`.")
@click.option("--quiet", is_flag=True, help="No progress bars or stage lines.")
def export(out, force, models, variants, data_dir, download, prune_amount, prune_method, channel_amount, epochs, seed,
           threads, sign_key, quiet):
    """Train, prune, quantize and export every variant, then write manifest.json.

    \b
    Example:
      edgeq export --out artifacts --model mlp --prune-amount 0.9
    """
    from edgeq.pipeline import ExportConfig, run_export, stage_profile, summary
    from edgeq.precision import SearchConfig

    try:
        cfg = ExportConfig(
            out=out, models=tuple(models) or ("mlp", "cnn"), variants=variants,
            data_dir=str(data_dir) if data_dir else None, download=download, seed=seed,
            unstructured_amount=prune_amount, unstructured_method=f"{prune_method}_unstructured",
            structured_amount=channel_amount, epochs=epochs, progress=not quiet, force=force, sign_key=sign_key,
            search=SearchConfig(threads=threads),
        )
        manifest = run_export(cfg)
    except EdgeqError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        click.echo(f"edgeq: interrupted; {out} is unchanged", err=True)
        sys.exit(130)
    click.echo(summary(manifest))
    click.echo(stage_profile(manifest))
    click.echo(f"wrote {len(manifest.artifacts)} artifacts and manifest.json to {out} "
               f"in {manifest.timings['total_s']:.1f} s")


def _register_verify() -> None:
    from edgeq.verify.command import verify

    main.add_command(verify)


_register_verify()

if __name__ == "__main__":  # pragma: no cover
    main()
