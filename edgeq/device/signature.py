"""Check an export's signature (edgeq.sig, a Sigstore bundle written by model-signing) with the
`cryptography` package alone.

model-signing itself imports sigstore, pydantic and click (about 600 modules, a second to import):
too much for a device. Its bundle for a key signature is a DSSE envelope: an in-toto statement that
lists every signed file with its sha256, signed with ECDSA over DSSE's pre-authentication encoding.
So checking it needs only: the envelope signature against the public key, then every file under
the directory against the statement (none changed, added or missing). `cryptography` is imported
only when a key is given; without it the check fails with one line saying what to install.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from edgeq.errors import SignatureError
from edgeq.manifest import sha256_file

SIGNATURE_NAME = "edgeq.sig"
PREDICATE = "https://model_signing/signature/v1.0"


def _pae(payload_type: str, payload: bytes) -> bytes:
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def verify(directory: Path, public_key: Path) -> dict:
    """Raise SignatureError (one line) unless `directory`'s signature verifies with `public_key` and
    every file matches it; return {status, file, public_key, files}."""
    directory, public_key = Path(directory), Path(public_key)
    resources, ignored = statement(directory, public_key)
    files = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                   if (p.is_file() or p.is_symlink()) and p.relative_to(directory).as_posix() not in ignored)
    for name in files:  # every name first: a file the signature does not cover is refused before anything is read
        if name not in resources:
            raise SignatureError(f"{name}: not covered by the signature (added after signing); remove it or re-sign")
    for name in sorted(resized(directory, resources)):  # then sizes: a file is hashed only at its signed size
        raise SignatureError(f"{name}: changed since signing (its size is not the signed manifest's); restore it "
                             "or re-sign")
    for name in files:
        if (directory / name).is_symlink():
            raise SignatureError(f"{name}: a symbolic link; signed exports hold regular files only")
        if sha256_file(directory / name) != resources[name]:
            raise SignatureError(f"{name}: changed since signing (sha256 differs); restore it or re-sign")
    missing = sorted(set(resources) - set(files))
    if missing:
        raise SignatureError(f"{missing[0]}: signed but missing; restore it or re-sign")
    return {"status": "verified", "file": SIGNATURE_NAME, "public_key": str(public_key), "files": files}


def statement(directory: Path, public_key: Path) -> tuple[dict[str, str], set[str]]:
    """The signed statement's files (name -> sha256) and the names it leaves unhashed, once its envelope
    verifies with `public_key` (SignatureError in one line otherwise). Reads only the signature and the key:
    what the files must be is known before any of them is read."""
    try:
        from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
    except ImportError:
        raise SignatureError("--public-key needs the `cryptography` package on this device: "
                             "`pip install cryptography`, or check without --public-key") from None
    directory, public_key = Path(directory), Path(public_key)
    sig = directory / SIGNATURE_NAME
    if sig.is_symlink() or not sig.is_file():
        raise SignatureError(f"{sig}: no signature file; the export was not signed (drop --public-key)")
    try:
        key = serialization.load_pem_public_key(public_key.read_bytes())
    except OSError as exc:
        raise SignatureError(f"{public_key}: cannot read ({exc.strerror})") from None
    except (ValueError, UnsupportedAlgorithm):
        raise SignatureError(f"{public_key}: not a PEM public key; pass the signer's public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise SignatureError(f"{public_key}: not an elliptic-curve key; edgeq signs with P-256/P-384/P-521")
    digest = {256: hashes.SHA256, 384: hashes.SHA384, 521: hashes.SHA512}.get(key.curve.key_size, hashes.SHA256)
    try:
        bundle = json.loads(sig.read_text(encoding="utf-8"))
        envelope = bundle["dsseEnvelope"]
        payload = base64.b64decode(envelope["payload"])
        signatures = [base64.b64decode(s["sig"]) for s in envelope["signatures"]]
        statement = json.loads(payload)
        predicate = statement["predicate"]
        resources = {r["name"]: r["digest"] for r in predicate["resources"]}
        ignored = set(predicate.get("serialization", {}).get("ignore_paths", [SIGNATURE_NAME]))
        payload_type = envelope["payloadType"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise SignatureError(f"{sig}: not a model-signing bundle ({type(exc).__name__}); re-sign the export") from None
    if statement.get("predicateType") != PREDICATE:
        raise SignatureError(f"{sig}: predicate {statement.get('predicateType')!r} is not model-signing's; re-sign")
    message = _pae(payload_type, payload)
    for s in signatures:
        try:
            key.verify(s, message, ec.ECDSA(digest()))
            break
        except InvalidSignature:
            continue
    else:
        raise SignatureError(f"{sig}: does not verify with {public_key} (another key signed it, or the signature "
                             "was edited); pass the public key of the signing key, or re-sign")
    return resources, ignored


MAX_MANIFEST_BYTES = 64 << 20


def resized(directory: Path, resources: dict[str, str]) -> list[str]:
    """The signed files whose size on disk is not the one the manifest gives them, once manifest.json itself
    matches its signed sha256 (small: hashed first). A file replaced by another of any size, a sparse one
    that occupies nothing included, is then refused without reading it. [] when the manifest is not the
    signed one or cannot be read: the hashes decide."""
    path = directory / "manifest.json"
    if "manifest.json" not in resources or path.is_symlink() or not path.is_file() or \
            path.stat().st_size > MAX_MANIFEST_BYTES or sha256_file(path) != resources["manifest.json"]:
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return []
    out = []
    for item in _sized_entries(data):
        name, size = item.get("file"), item.get("bytes")
        if isinstance(name, str) and name in resources and isinstance(size, int) and not isinstance(size, bool):
            p = directory / name
            if not p.is_symlink() and p.is_file() and p.stat().st_size != size:
                out.append(name)
    return out


def _sized_entries(data: object) -> list[dict]:
    """Every entry of a manifest that gives a file and its bytes: artifacts, data sets, the plan, golden files."""
    if not isinstance(data, dict):
        return []
    as_dict = lambda v: v if isinstance(v, dict) else {}  # noqa: E731
    golden, dataset = as_dict(data.get("golden")), as_dict(data.get("dataset"))
    items = list(data.get("artifacts") or []) if isinstance(data.get("artifacts"), list) else []
    items += [dataset.get(k) for k in ("eval", "val", "calibration")] + [data.get("plan"), golden.get("input")]
    items += list(as_dict(golden.get("outputs")).values()) + list(as_dict(golden.get("reference")).values())
    return [i for i in items if isinstance(i, dict)]
