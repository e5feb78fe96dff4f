"""The exception family of edgeq. The CLI turns each into a one-line message and exit code 1."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, whitespace folded, cut at `limit` characters (its type
    name when it has no message): what one-line errors quote of a library's own error."""
    text = str(exc).strip().splitlines()
    line = " ".join(text[0].split()) if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


class EdgeqError(Exception):
    """A known failure with a message that names the problem and the fix."""


class DataError(EdgeqError):
    """The data set cannot be read, found or downloaded."""


class ConfigError(EdgeqError, ValueError):
    """An option or configuration value is invalid."""


class TrialError(EdgeqError):
    """A trial could not be run: the worker running it died on every try (edgeq.trials)."""


class FinetuneError(ConfigError):
    """The caller's finetune callable broke its contract: stops the whole export."""


class ExportError(EdgeqError):
    """An artifact could not be built or written."""


class PruneError(ExportError):
    """A model cannot be pruned: it cannot be traced, or it has no single output layer."""


class ManifestError(EdgeqError):
    """A manifest is missing, not JSON, or does not match its schema."""


class IntegrityError(EdgeqError):
    """A file on disk is not the file the manifest describes."""


class SignatureError(IntegrityError):
    """A signed artifacts directory does not match its signature, or the signature cannot be checked."""


class QuantizeError(ExportError):
    """A model torch.ao FX cannot quantize: the message names the op, layer or module and the fix."""
