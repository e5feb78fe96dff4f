"""Is each file the one the manifest describes, and is every file in the directory accounted for?

Checked before anything is loaded. An artifact's file must stay inside the artifacts directory (no
absolute paths, no `..`), be a regular file reached without a symlink, and match the manifest's
byte count and sha256; an ONNX file must hold all its tensors. Every other name in the directory is
either ours (manifest.json, the signature, an empty .gitkeep) or reported as unlisted; a symlink or
special file anywhere in it is a problem. Each problem is one line naming the file.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from edgeq.manifest import MANIFEST_NAME, Artifact, Manifest, sha256_file
from edgeq.signing import GITKEEP, SIGNATURE_NAME

REEXPORT = "re-run `edgeq export`"
OURS = (MANIFEST_NAME, SIGNATURE_NAME)  # expected in every artifacts directory besides the artifacts


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
    problems = check_file(directory, art.file, art.bytes, art.sha256)
    if not problems and art.format == "onnx":
        return external_data(directory / art.file, art.file)
    return problems


def check_file(directory: Path, file: str, size: int, sha256: str) -> list[str]:
    """Problems with a file the manifest vouches for: empty when it is a regular file inside the
    directory (no symlink on its path) with the manifest's byte count and sha256."""
    link = None if Path(file).is_absolute() else _symlink_on_path(directory, file)
    if link is not None:
        return [f"{file}: {link} is a symlink (to {os.readlink(directory / link)}); artifacts must be "
                f"regular files inside the directory: {REEXPORT}"]
    path, problem = resolve(directory, file)
    if path is None:
        return [problem or file]
    if not path.exists():
        return [f"{file}: missing; {REEXPORT}"]
    if not path.is_file():
        return [f"{file}: not a regular file; {REEXPORT}"]
    on_disk = path.stat().st_size
    if on_disk != size:
        return [f"{file}: {on_disk} bytes on disk, manifest says {size} (truncated or replaced); {REEXPORT}"]
    try:
        digest = sha256_file(path)
    except OSError as exc:
        return [f"{file}: cannot read ({exc.strerror}); check its permissions"]
    if digest != sha256:
        return [f"{file}: sha256 {digest[:12]}... does not match the manifest's {sha256[:12]}... "
                f"(corrupted or modified); {REEXPORT}"]
    return []


def _symlink_on_path(directory: Path, file: str) -> str | None:
    """The first component of `file` under `directory` that is a symlink (lstat, never followed)."""
    current = Path(directory)
    for part in Path(file).parts:
        current = current / part
        if current.is_symlink():
            return current.relative_to(directory).as_posix()
    return None


def external_data(path: Path, file: str) -> list[str]:
    """Refuse an ONNX file whose tensors live in a sidecar file: one problem naming both.

    Refused rather than hashed: the exporter always writes self-contained ONNX files, and a sidecar
    is not in the manifest, so its bytes are covered by no hash and could be edited freely while the
    .onnx still matches. Files onnx cannot parse are left to the runtime, which names the problem.
    """
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not a parsable model: the runtime load reports it
        return []
    external = [t for t in _tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        return []
    sidecars = sorted({e.value for t in external for e in t.external_data if e.key == "location"}) or ["(unnamed)"]
    return [f"{file}: tensors stored in external data file {', '.join(sidecars)}, which no manifest hash covers; "
            f"edgeq ships self-contained ONNX files: {REEXPORT}"]


def _tensors(model) -> list:
    """Every tensor of an ONNX model: initializers, sparse initializers and tensor attributes, in
    the main graph, in subgraphs (If/Loop/Scan bodies) and in local functions."""
    found: list = []

    def graph(g) -> None:
        found.extend(g.initializer)
        for sparse in g.sparse_initializer:
            found.extend((sparse.values, sparse.indices))
        nodes(g.node)

    def nodes(items) -> None:
        for node in items:
            for attr in node.attribute:
                if attr.HasField("t"):
                    found.append(attr.t)
                found.extend(attr.tensors)
                if attr.HasField("sparse_tensor"):
                    found.extend((attr.sparse_tensor.values, attr.sparse_tensor.indices))
                for sparse in attr.sparse_tensors:
                    found.extend((sparse.values, sparse.indices))
                if attr.HasField("g"):
                    graph(attr.g)
                for sub in attr.graphs:
                    graph(sub)

    graph(model.graph)
    for function in model.functions:
        nodes(function.node)
    return found


def check_all(directory: Path, manifest: Manifest) -> dict[str, list[str]]:
    """Problems per artifact name, for every artifact the manifest lists."""
    return {a.name: check_artifact(Path(directory), a) for a in manifest.artifacts}


def check_directory(directory: Path, manifest: Manifest) -> tuple[list[str], list[str]]:
    """(unlisted, problems) for everything in `directory`, recursively, without following links.

    Unlisted: files and directories (with a trailing /) that neither the manifest nor OURS names.
    Problems: symlinks and special files, except the manifest's own files, which fail their rows.
    """
    directory = Path(directory)
    files = {os.path.normpath(f) for f in manifest.listed_files() if not Path(f).is_absolute()}
    parents = {str(p) for f in files for p in Path(f).parents if str(p) != "."}
    unlisted: list[str] = []
    problems: list[str] = []

    def cannot_list(exc: OSError) -> None:
        problems.append(f"{exc.filename}: cannot list ({exc.strerror}); fix its permissions")

    for root, dirs, names in os.walk(directory, onerror=cannot_list):
        dirs.sort()
        for name in sorted(dirs + names):
            path = Path(root) / name
            rel = path.relative_to(directory).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                if rel not in files:  # an artifact's link fails its row
                    problems.append(f"{rel}: a symlink (to {os.readlink(path)}); an artifacts directory holds "
                                    "regular files only: remove it")
            elif not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                problems.append(f"{rel}: not a regular file or directory (a socket, pipe or device?): remove it")
            elif rel in files or rel in parents or rel in OURS or _empty_gitkeep(rel, path):
                continue
            else:
                unlisted.append(rel + "/" * stat.S_ISDIR(mode))
    return unlisted, problems


def _empty_gitkeep(rel: str, path: Path) -> bool:
    """The exporter keeps a git-tracked artifacts/.gitkeep: an empty regular file at the top."""
    return rel == GITKEEP and path.is_file() and path.stat().st_size == 0
