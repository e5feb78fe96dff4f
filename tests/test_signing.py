"""Signed artifacts directories (model-signing, EC keys, offline): sign, verify, and every way to break one.

Keys are throwaway, made with `cryptography` in a temp dir; the export is the real fixture. No mocks.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner

from edgeq.errors import ConfigError, ExportError, SignatureError
from edgeq.manifest import sha256_file
from edgeq.signing import SIGNATURE_NAME, check_private_key, sign_directory, verify_signature
from edgeq.verify import VerifyConfig, verify
from edgeq.verify.command import verify as verify_command
from edgeq.verify.report import REPORT_SCHEMA, markdown, table, to_json

FAST = VerifyConfig(batch=32, rounds=2, window_s=0.003, progress=False)


def write_key(path: Path, key) -> Path:
    """Write a private key (unencrypted PEM) to `path`; return the path."""
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def write_public(path: Path, key) -> Path:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A P-256 signing key and its public key, and the public key of another P-256 key."""
    from cryptography.hazmat.primitives.asymmetric import ec

    d = tmp_path_factory.mktemp("keys")
    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    return {"key": write_key(d / "key.pem", key), "pub": write_public(d / "pub.pem", key),
            "other_pub": write_public(d / "other.pub", other)}


@pytest.fixture(scope="module")
def signed_once(mlp_artifacts: Path, keys: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    art = Path(shutil.copytree(mlp_artifacts, tmp_path_factory.mktemp("signed") / "art"))
    assert sign_directory(art, keys["key"]) == art / SIGNATURE_NAME
    return art


@pytest.fixture
def signed(signed_once: Path, tmp_path: Path) -> Path:
    """A signed copy of the fixture export, free to damage."""
    return Path(shutil.copytree(signed_once, tmp_path / "art"))


def cli(*args: str):
    return CliRunner().invoke(verify_command, [str(a) for a in args])


def one_error_line(result) -> str:
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeq: error: "), result.output
    return lines[0]


def rehash(directory: Path, file: str) -> None:
    """Record a file's new bytes and sha256 in manifest.json, so the manifest is consistent again."""
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    entry = next(a for a in data["artifacts"] if a["file"] == file)
    entry.update(bytes=(directory / file).stat().st_size, sha256=sha256_file(directory / file))
    path.write_text(json.dumps(data, indent=2) + "\n")


# a signed export ------------------------------------------------------------------------------------


def test_signed_export_verifies_after_it_is_moved(signed: Path, keys: dict[str, Path], tmp_path: Path) -> None:
    moved = Path(shutil.move(signed, tmp_path / "published" / "renamed"))  # the exporter publishes by rename
    result = verify(moved, replace(FAST, public_key=str(keys["pub"])))
    assert result.passed, result.failures
    sig = result.signature
    assert sig["status"] == "verified" and sig["file"] == SIGNATURE_NAME and sig["public_key"] == str(keys["pub"])
    assert set(sig["files"]) == {p.relative_to(moved).as_posix() for p in moved.rglob("*")
                                 if p.is_file() and p.name != SIGNATURE_NAME}
    assert f"signature: signed, verified with {keys['pub']}" in table(result).replace("\n", " ")
    assert "Signature: signed, verified with" in markdown(result) and result.unlisted == []
    jsonschema.validate(json.loads(json.dumps(to_json(result))), REPORT_SCHEMA)


def test_empty_gitkeep_added_after_signing_is_accepted(signed: Path, keys: dict[str, Path]) -> None:
    (signed / ".gitkeep").touch()  # what the exporter's publish step adds to a git-tracked directory
    assert verify_signature(signed, keys["pub"])["status"] == "verified"
    (signed / ".gitkeep").write_text("payload")
    with pytest.raises(SignatureError, match=r"^\.gitkeep: not an empty file"):
        verify_signature(signed, keys["pub"])


# the acceptance case: a backdoored model behind a re-hashed, consistent manifest -------------------------


def _plant_trigger(path: Path, blank: float) -> tuple[np.ndarray, np.ndarray]:
    """Edit one weight and one bias of the fp32 ONNX: a lit top-left pixel (always blank in digits)
    drives one hidden unit hard towards a chosen class, and the bias cancels the edit on a blank
    pixel, so clean inputs score as before. Returns (original, tampered) predictions on a clean and
    a triggered input."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    clean = np.full((2, 1, 28, 28), blank, dtype=np.float32)
    clean[1, 0, 0, 0] = 2.8  # the trigger: the top-left pixel lit
    before = ort.InferenceSession(str(path)).run(None, {"input": clean})[0].argmax(1)
    model = onnx.load(str(path))
    init = {i.name: i for i in model.graph.initializer}
    w1, b1, w2 = (numpy_helper.to_array(init[n]).copy() for n in ("fc1.weight", "fc1.bias", "fc2.weight"))
    target = (before[1] + 1) % w2.shape[0]
    unit = int(np.argmax(w2[target] - np.delete(w2, target, axis=0).max(axis=0)))
    w1[unit, 0] += 64.0
    b1[unit] -= np.float32(64.0 * blank)
    for name, value in (("fc1.weight", w1), ("fc1.bias", b1)):
        init[name].CopyFrom(numpy_helper.from_array(value, name))
    onnx.save(model, str(path))
    after = ort.InferenceSession(str(path)).run(None, {"input": clean})[0].argmax(1)
    return before, after


def test_tampered_onnx_with_a_rehashed_manifest_fails_only_on_the_signature(
        signed: Path, keys: dict[str, Path]) -> None:
    pre = json.loads((signed / "manifest.json").read_text())["preprocessing"]
    before, after = _plant_trigger(signed / "mlp-fp32.onnx", (0 - pre["mean"]) / pre["std"])
    assert after[0] == before[0] and after[1] != before[1]  # same on a clean input, hijacked by the trigger
    rehash(signed, "mlp-fp32.onnx")

    unchecked = cli(signed, "--quiet", "--batch", "32", "--rounds", "1")  # manifest and files agree: a key can tell
    assert "signature: signed (not checked: pass --public-key)." in unchecked.stdout
    assert unchecked.exit_code == 0, unchecked.output

    line = one_error_line(cli(signed, "--quiet", "--public-key", keys["pub"]))
    assert "manifest.json: changed since it was signed" in line
    assert "mlp-fp32.onnx: changed since it was signed" in line
    assert "(signature edgeq.sig, key pub.pem)" in line


# every other way to break a signed directory ---------------------------------------------------------


def _edit_manifest(d: Path) -> None:
    data = json.loads((d / "manifest.json").read_text())
    data["artifacts"][0]["accuracy"] = 0.999
    (d / "manifest.json").write_text(json.dumps(data))


def _edit_signed_payload(d: Path) -> None:
    bundle = json.loads((d / SIGNATURE_NAME).read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    statement["predicate"]["resources"][0]["digest"] = "0" * 64
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    (d / SIGNATURE_NAME).write_text(json.dumps(bundle))


@pytest.mark.parametrize(("damage", "key", "expected"), [
    (_edit_manifest, "pub", "manifest.json: changed since it was signed (signature edgeq.sig, key pub.pem)"),
    (lambda d: shutil.copy(d / "mlp-static.onnx", d / "extra.onnx"), "pub", "extra.onnx: added after it was signed"),
    (lambda d: (d / ".gitignore").write_text("*\n"), "pub", ".gitignore: added after it was signed"),
    (lambda d: (d / "mlp-fp32.ts.pt").unlink(), "pub", "mlp-fp32.ts.pt: removed after it was signed"),
    (lambda d: os.symlink("/etc/passwd", d / "passwd"), "pub", "passwd: a symlink"),
    (lambda d: None, "other_pub", "edgeq.sig: signed with another key than"),
    (_edit_signed_payload, "pub", "edgeq.sig: does not verify with"),
    (lambda d: (d / SIGNATURE_NAME).write_bytes(os.urandom(64)), "pub", "edgeq.sig: not a model_signing signature"),
    (lambda d: (d / SIGNATURE_NAME).write_text("{}"), "pub", "edgeq.sig: not a model_signing signature"),
    (lambda d: (d / SIGNATURE_NAME).unlink(), "pub", "edgeq.sig: no signature file"),
], ids=["manifest", "added", "gitignore", "removed", "symlink", "wrong-key", "edited-signature", "garbage-signature",
        "empty-signature", "no-signature"])
def test_any_change_fails_before_the_manifest_is_read(signed: Path, keys: dict[str, Path], damage, key: str,
                                                      expected: str) -> None:
    damage(signed)
    (signed / "manifest.json").write_text((signed / "manifest.json").read_text() + "{not json")  # never parsed
    line = one_error_line(cli(signed, "--public-key", keys[key]))
    assert expected in line, line
    with pytest.raises(SignatureError):
        verify(signed, replace(FAST, public_key=str(keys[key])))


def test_a_private_key_given_as_public_key(signed: Path, keys: dict[str, Path]) -> None:
    line = one_error_line(cli(signed, "--public-key", keys["key"]))
    assert "key.pem: not a PEM public key (this is a private key)" in line and "-pubout" in line


# keys -----------------------------------------------------------------------------------------------


def _key(kind: str, path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    match kind:
        case "garbage":
            path.write_text("not a key\n")
        case "public":
            write_public(path, ec.generate_private_key(ec.SECP256R1()))
        case "rsa":
            write_key(path, rsa.generate_private_key(public_exponent=65537, key_size=1024))
        case "secp256k1":
            write_key(path, ec.generate_private_key(ec.SECP256K1()))
        case "encrypted":
            path.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret")))


@pytest.mark.parametrize(("kind", "expected"), [
    ("missing", "no such private key file; make one with `openssl ecparam"),
    ("garbage", "not a PEM private key"),
    ("public", "not a PEM private key"),
    ("rsa", "RSA private key; edgeq signs with elliptic-curve keys"),
    ("secp256k1", "elliptic curve secp256k1 is not supported; use one of secp256r1"),
    ("encrypted", "the private key is encrypted"),
])
def test_check_private_key_names_the_file_and_the_fix(tmp_path: Path, kind: str, expected: str) -> None:
    path = tmp_path / "key.pem"
    if kind != "missing":
        _key(kind, path)
    with pytest.raises(ConfigError) as caught:
        check_private_key(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message


def test_p384_and_p521_keys_sign_and_verify(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "model.bin").write_bytes(b"\x00" * 100)
    for curve in (ec.SECP384R1(), ec.SECP521R1()):
        key = ec.generate_private_key(curve)
        sign_directory(tmp_path / "d", write_key(tmp_path / "k.pem", key))
        assert verify_signature(tmp_path / "d", write_public(tmp_path / "p.pem", key))["files"] == ["model.bin"]


def test_sign_directory_refuses_a_symlink(tmp_path: Path, keys: dict[str, Path]) -> None:
    (tmp_path / "d").mkdir()
    os.symlink("/etc/passwd", tmp_path / "d" / "passwd")
    with pytest.raises(ExportError, match=r"^passwd: a symlink"):
        sign_directory(tmp_path / "d", keys["key"])


def test_importing_edgeq_loads_no_signing_library() -> None:
    code = ("import sys, edgeq, edgeq.signing, edgeq.verify, edgeq.verify.command; "
            "print(sorted(m for m in ('model_signing', 'cryptography') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_export_sign_key_signs_the_published_directory(keys: dict[str, Path], tmp_path: Path) -> None:
    """`edgeq export --sign-key` end to end: the published directory verifies with the public key, and
    a re-hashed tampered file in it fails on the signature, named."""
    from edgeq.cli import main

    out = tmp_path / "art"
    r = CliRunner().invoke(main, ["export", "--out", str(out), "--model", "mlp", "--variants", "none",
                                  "--epochs", "1", "--quiet", "--sign-key", str(keys["key"])])
    assert r.exit_code == 0, r.output
    assert (out / SIGNATURE_NAME).is_file()
    assert cli(out, "--public-key", keys["pub"], "--quiet", "--rounds", "1").exit_code == 0
    onnx_file = out / "mlp-fp32.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[-100] ^= 0xFF  # inside the last initializer's raw data
    onnx_file.write_bytes(bytes(data))
    manifest = json.loads((out / "manifest.json").read_text())
    entry = next(a for a in manifest["artifacts"] if a["file"] == onnx_file.name)
    entry.update(sha256=sha256_file(onnx_file))
    (out / "manifest.json").write_text(json.dumps(manifest))
    line = one_error_line(cli(out, "--public-key", keys["pub"], "--quiet"))
    assert "mlp-fp32.onnx" in line


def test_export_refuses_a_bad_sign_key_before_any_work(tmp_path: Path) -> None:
    from edgeq.cli import main

    bad = tmp_path / "key.pem"
    bad.write_text("not a key")
    r = CliRunner().invoke(main, ["export", "--out", str(tmp_path / "art"), "--model", "mlp", "--quiet",
                                  "--sign-key", str(bad)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"edgeq: error: {bad}: not a PEM private key; ")
    assert "openssl ecparam" in lines[0]
    assert not (tmp_path / "art").exists()
