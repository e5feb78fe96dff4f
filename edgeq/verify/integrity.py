"""Is each file the one the manifest describes? Checked before anything is loaded.

A file must stay inside the artifacts directory (no absolute paths, no `..`, no symlink out of it),
exist, and match the manifest's byte count and sha256. Each problem is one line naming the file.
"""

from __future__ import annotations

from pathlib import Path

from edgeq.manifest import Artifact, Manifest, sha256_file

REEXPORT = "re-run `edgeq export`"


def resolve(directory: Path, file: str) -> tuple[Path | None, str | None]:
    """(path, None) for a file inside `directory`, or (None, problem) for one that leaves it."""
    if Path(file).is_absolute():
        return None, f"{file}: absolute path; manifest files must be relative to the artifacts directory"
    root = directory.resolve()
    path = (root / file).resolve()
    if not path.is_relative_to(root):
        return None, f"{file}: path leaves the artifacts directory {directory}; refusing to read it"
    return path, None


def check_artifact(directory: Path, art: Artifact) -> list[str]:
    """Problems with one artifact's file: empty when it is present, inside, and byte-identical."""
    path, problem = resolve(directory, art.file)
    if path is None:
        return [problem or art.file]
    if not path.exists():
        return [f"{art.file}: missing; {REEXPORT}"]
    if not path.is_file():
        return [f"{art.file}: not a regular file; {REEXPORT}"]
    size = path.stat().st_size
    if size != art.bytes:
        return [f"{art.file}: {size} bytes on disk, manifest says {art.bytes} (truncated or replaced); {REEXPORT}"]
    digest = sha256_file(path)
    if digest != art.sha256:
        return [f"{art.file}: sha256 {digest[:12]}... does not match the manifest's {art.sha256[:12]}... "
                f"(corrupted or modified); {REEXPORT}"]
    return []


def check_all(directory: Path, manifest: Manifest) -> dict[str, list[str]]:
    """Problems per artifact name, for every artifact the manifest lists."""
    return {a.name: check_artifact(Path(directory), a) for a in manifest.artifacts}
