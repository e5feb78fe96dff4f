"""Signed artifacts directories: OpenSSF model-signing with an elliptic-curve key pair, offline.

`sign_directory` hashes every file under the directory (sha256 per file, paths relative to it, so
the directory can be renamed or moved) and writes a Sigstore bundle, SIGNATURE_NAME, inside it.
`verify_signature` checks that bundle with the public key and re-hashes the directory: any file
changed, added or removed since signing (manifest.json included) fails with one line naming it.
Two names are not hashed: the signature itself and an empty `.gitkeep`, which the exporter may add
after signing so that a git-tracked artifacts directory survives; a non-empty one fails the check.

model_signing and cryptography are imported inside the functions, so `import edgeq` stays light.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from edgeq.errors import ConfigError, ExportError, SignatureError

SIGNATURE_NAME = "edgeq.sig"
GITKEEP = ".gitkeep"  # may be added after signing; must then be empty
UNSIGNED_BY_DESIGN = (SIGNATURE_NAME, GITKEEP)  # the names the signature does not hash
# model_signing's key signer accepts these curves (Sigstore's key specs): P-256, P-384, P-521
SUPPORTED_CURVES = ("secp256r1", "secp384r1", "secp521r1")
MAKE_KEY = ("make one with `openssl ecparam -name prime256v1 -genkey -noout -out key.pem` "
            "and its public key with `openssl ec -in key.pem -pubout -out pub.pem`")
KEY_MAX_BYTES = 1 << 20  # a PEM key is a few hundred bytes
KEY_READ_S = 10.0  # seconds a key may take to arrive through a pipe
RESIGN = "restore the signed files, or re-export with `edgeq export --sign-key KEY`"

# signature status in a verify result
UNSIGNED, NOT_CHECKED, VERIFIED = "unsigned", "not_checked", "verified"
STATUSES = (UNSIGNED, NOT_CHECKED, VERIFIED)


def check_private_key(path: str | Path) -> bytes:
    """Refuse, with one line naming the file and the fix, a key that cannot sign a directory; returns
    its bytes, read once (a pipe such as `<(cat key.pem)` cannot be read twice)."""
    path = Path(path)
    data = read_key(path, "private")
    private_key_bytes(data, path)
    return data


def private_key_bytes(data: bytes, path: Path) -> None:
    """Refuse PEM bytes that are not an unencrypted EC private key on a supported curve (one line naming `path`)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(f"{path}: the private key is encrypted; edgeq signs with an unencrypted PEM key: "
                          f"decrypt a copy with `openssl ec -in {path.name} -out plain.pem`") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{path}: not a PEM private key; {MAKE_KEY}") from None
    _check_curve(path, key.public_key(), "private")


def check_public_key(path: str | Path) -> bytes:
    """Refuse, with one line naming the file and the fix, a key that cannot check a signature; returns
    its bytes, read once."""
    path = Path(path)
    data = read_key(path, "public")
    public_key_bytes(data, path)
    return data


def public_key_bytes(data: bytes, path: Path) -> None:
    """Refuse PEM bytes that are not an EC public key on a supported curve (one line naming `path`)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        hint = " (this is a private key)" if b"PRIVATE KEY" in data else ""
        raise ConfigError(f"{path}: not a PEM public key{hint}; pass the public half of the signing key, "
                          f"made with `openssl ec -in key.pem -pubout -out pub.pem`") from None
    _check_curve(path, key, "public")


def read_key(path: Path, kind: str) -> bytes:
    """A key file's bytes, read once and with bounds: at most KEY_MAX_BYTES, and within KEY_READ_S seconds
    from a pipe (`<(cat key.pem)`, a FIFO), so that a FIFO nobody writes to or an endless device fails
    with one line instead of hanging. Directories and sockets are refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {kind} key file; {MAKE_KEY}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {kind} key ({exc.strerror}); check the path and its "
                          "permissions") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ConfigError(f"{path}: is a directory, not a {kind} key file; pass the PEM file")
        data = _read_bounded(fd, path, kind)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {kind} key ({exc.strerror}); check the path and its "
                          "permissions") from None
    finally:
        os.close(fd)
    if not data.strip():
        pipe = " (a pipe or FIFO that nothing wrote to?)" if not stat.S_ISREG(mode) else ""
        raise ConfigError(f"{path}: the {kind} key file is empty{pipe}; pass the PEM file itself")
    return data


def _read_bounded(fd: int, path: Path, kind: str) -> bytes:
    import select

    deadline = time.monotonic() + KEY_READ_S
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:  # a pipe whose writer has not written yet
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise ConfigError(f"{path}: nothing to read from it in {KEY_READ_S:g} s (a FIFO or pipe that "
                                  f"nothing writes to?); pass the {kind} key's PEM file") from None
            continue
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > KEY_MAX_BYTES:
            raise ConfigError(f"{path}: more than {KEY_MAX_BYTES >> 10} KiB, far larger than a PEM key; "
                              f"pass the {kind} key's PEM file")
        if time.monotonic() > deadline:
            raise ConfigError(f"{path}: still being written after {KEY_READ_S:g} s; pass the {kind} key's PEM file")


@contextlib.contextmanager
def key_copy(data: bytes) -> Iterator[Path]:
    """The key's bytes in a private temporary file (0600), removed afterwards: what model_signing reads,
    so that the key is read from the user's path once only."""
    fd, name = tempfile.mkstemp(prefix="edgeq-key-", suffix=".pem")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield Path(name)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)


def _check_curve(path: Path, public_key: object, kind: str) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        algorithm = type(public_key).__name__.removesuffix("PublicKey")
        raise ConfigError(f"{path}: {algorithm} {kind} key; edgeq signs with "
                          f"elliptic-curve keys ({', '.join(SUPPORTED_CURVES)}): {MAKE_KEY}")
    if public_key.curve.name not in SUPPORTED_CURVES:
        raise ConfigError(f"{path}: elliptic curve {public_key.curve.name} is not supported; use one of "
                          f"{', '.join(SUPPORTED_CURVES)}: {MAKE_KEY}")


def _hashing():
    """sha256 per file, no symlinks, git files included: every name but UNSIGNED_BY_DESIGN is hashed."""
    from model_signing import hashing

    return (hashing.Config()
            .use_file_serialization(hashing_algorithm="sha256", allow_symlinks=False)
            .set_ignored_paths(paths=list(UNSIGNED_BY_DESIGN), ignore_git_paths=False))


def sign_directory(directory: str | Path, private_key: str | Path) -> Path:
    """Sign every file under `directory` with an EC private key; the signature goes to SIGNATURE_NAME."""
    from model_signing import signing

    directory, private_key = Path(directory), Path(private_key)
    data = check_private_key(private_key)
    if not directory.is_dir():
        raise ExportError(f"{directory}: no such directory to sign")
    out = directory / SIGNATURE_NAME
    try:
        with key_copy(data) as key:
            signing.Config().use_elliptic_key_signer(private_key=key).set_hashing_config(_hashing()).sign(
                directory, out)
    except ValueError as exc:  # a symlink or special file in the directory
        raise ExportError(f"{_file_problem(str(exc), directory) or exc}; cannot sign {directory}") from None
    return out


def verify_signature(directory: str | Path, public_key: str | Path, key_data: bytes | None = None) -> dict:
    """Check SIGNATURE_NAME in `directory` with `public_key`: raises SignatureError naming what differs.

    `key_data`: the key's bytes when the caller has already read (and checked) them: a key is read
    once, so that `--public-key <(cat pub.pem)` works. Returns the verify report's signature record:
    status, the signature file, the key, and the files the signature covers.
    """
    from cryptography.exceptions import InvalidSignature
    from model_signing import verifying

    directory, public_key = Path(directory), Path(public_key)
    data = check_public_key(public_key) if key_data is None else key_data  # first: the key is the user's input
    if not directory.is_dir():
        raise SignatureError(f"{directory}: no such directory; nothing to verify")
    sig = directory / SIGNATURE_NAME
    if sig.is_symlink() or not sig.is_file():
        raise SignatureError(f"{sig}: no signature file; sign the export with `edgeq export --sign-key KEY`, "
                             "or drop --public-key to verify it unsigned")
    where = f"(signature {SIGNATURE_NAME}, key {public_key.name})"
    try:
        with key_copy(data) as key:
            _names_first(directory, key, where)
            verifying.Config().use_elliptic_key_verifier(public_key=key).set_hashing_config(_hashing()).verify(
                directory, sig)
    except InvalidSignature:
        raise SignatureError(f"{sig}: does not verify with {public_key} (another key signed it, or the signature "
                             "was edited); pass the public key of the signing key, or re-sign") from None
    except ValueError as exc:
        raise SignatureError(_explain(str(exc), directory, sig, public_key, where)) from None
    except (KeyError, TypeError, IndexError, AttributeError) as exc:
        raise SignatureError(_corrupt(sig, f"{type(exc).__name__}: {exc}")) from None
    except OSError as exc:
        raise SignatureError(f"{exc.filename}: cannot read ({exc.strerror}) {where}") from None
    _check_gitkeep(directory, where)
    files = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                   if p.is_file() and p.relative_to(directory).as_posix() not in UNSIGNED_BY_DESIGN)
    return {"status": VERIFIED, "file": SIGNATURE_NAME, "public_key": str(public_key), "files": files}


def _names_first(directory: Path, key: Path, where: str) -> None:
    """A file the signed statement does not name, a signed one that is gone, or one whose size is not the
    signed manifest's, refused before model_signing hashes every file (a sparse file of any apparent size
    would be read whole): the statement's envelope is checked with the key first (edgeq.device.signature).
    Anything else, a bad envelope included, is left to model_signing's verification and its messages."""
    from edgeq.device import signature as envelope

    try:
        signed, unhashed = envelope.statement(directory, key)
    except SignatureError:
        return
    entries = list(directory.rglob("*"))
    links = {p.relative_to(directory).as_posix() for p in entries if p.is_symlink()}
    files = {p.relative_to(directory).as_posix() for p in entries if p.is_file()} - links
    found = {name: "added after it was signed" for name in files - set(signed) - unhashed}  # links: model_signing's
    found |= {name: "removed after it was signed" for name in set(signed) - files - links}
    found |= {name: "changed since it was signed" for name in envelope.resized(directory, signed)}
    if found:
        raise SignatureError(f"{'; '.join(f'{n}: {w}' for n, w in sorted(found.items()))} {where}: {RESIGN}")


def signature_status(directory: str | Path, public_key: str | Path | None = None) -> dict:
    """The verify report's signature record; the signature is checked only when a key is given."""
    if public_key is not None:
        return verify_signature(directory, public_key)
    signed = (Path(directory) / SIGNATURE_NAME).exists()
    return {"status": NOT_CHECKED if signed else UNSIGNED, "file": SIGNATURE_NAME if signed else None,
            "public_key": None}


def describe(signature: dict) -> str:
    """One phrase for the table and the Markdown report."""
    if signature["status"] == VERIFIED:
        return f"signed, verified with {signature['public_key']}"
    if signature["status"] == NOT_CHECKED:
        return "signed (not checked: pass --public-key)"
    return UNSIGNED


def _explain(message: str, directory: Path, sig: Path, public_key: Path, where: str) -> str:
    """One line for a ValueError from model_signing's verify: mismatch, key, symlink or a corrupt signature."""
    if message.startswith("Signature mismatch"):
        return f"{'; '.join(_differences(directory, sig)) or message.splitlines()[0]} {where}: {RESIGN}"
    if message.startswith("Key mismatch"):
        return f"{sig}: signed with another key than {public_key}: pass the public key of the signing key, or re-sign"
    problem = _file_problem(message, directory)
    if problem:
        return f"{problem} {where}"
    return _corrupt(sig, message)


def _differences(directory: Path, sig: Path) -> list[str]:
    """`<file>: changed/added/removed ...` per file that differs from the signed payload, sorted by name.

    model_signing reports a mismatch as the repr of a list whose quoting changes with the digests'
    bytes, so the names are taken from the signed statement instead (in-toto in a DSSE envelope,
    already authenticated by model_signing when it reports a mismatch) and the files on disk.
    """
    import base64
    import json

    from edgeq.manifest import sha256_file

    statement = json.loads(base64.b64decode(json.loads(sig.read_text(encoding="utf-8"))["dsseEnvelope"]["payload"]))
    signed = {r["name"]: r["digest"] for r in statement["predicate"]["resources"]}
    unhashed = set(statement["predicate"]["serialization"].get("ignore_paths", []))
    on_disk = {p.relative_to(directory).as_posix(): p for p in directory.rglob("*") if p.is_file()}
    on_disk = {name: p for name, p in on_disk.items() if name not in unhashed}
    found = {name: "removed after it was signed" for name in signed.keys() - on_disk.keys()}
    found |= {name: "added after it was signed" for name in on_disk.keys() - signed.keys()}
    found |= {name: "changed since it was signed" for name in signed.keys() & on_disk.keys()
              if sha256_file(on_disk[name]) != signed[name]}
    return [f"{name}: {what}" for name, what in sorted(found.items())]


def _file_problem(message: str, directory: Path) -> str | None:
    """model_signing's refusal of a symlink or special file, as `<relative name>: <problem>`."""
    found = re.match(r"Cannot use '(.+)' (because it is a symlink|as file or directory)", message)
    if not found:
        return None
    name = _relative(Path(found.group(1)), directory)
    if found.group(2).startswith("because"):
        return f"{name}: a symlink; a signed directory holds regular files only: replace the link with the file"
    return f"{name}: not a regular file or directory (a socket, pipe or device?): remove it"


def _relative(path: Path, directory: Path) -> str:
    try:
        return path.relative_to(directory).as_posix()
    except ValueError:
        return str(path)


def _corrupt(sig: Path, detail: str) -> str:
    first = detail.strip().splitlines()[0] if detail.strip() else "empty"
    return (f"{sig}: not a model_signing signature bundle ({first[:120]}); re-sign with "
            "`edgeq export --sign-key KEY`")


def _check_gitkeep(directory: Path, where: str) -> None:
    """The one unhashed file besides the signature carries nothing: present or not, it must be empty."""
    gitkeep = directory / GITKEEP
    if gitkeep.is_symlink() or (gitkeep.exists() and (not gitkeep.is_file() or gitkeep.stat().st_size)):
        raise SignatureError(f"{GITKEEP}: not an empty file, and only an empty {GITKEEP} is left out of the "
                             f"signature {where}: empty or remove it")
