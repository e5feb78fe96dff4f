"""The exception family of edgeq. The CLI turns each into a one-line message and exit code 1."""


class EdgeqError(Exception):
    """A known failure with a message that names the problem and the fix."""


class DataError(EdgeqError):
    """The data set cannot be read, found or downloaded."""


class ConfigError(EdgeqError, ValueError):
    """An option or configuration value is invalid."""


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
