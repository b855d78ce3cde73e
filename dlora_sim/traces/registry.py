"""The registry of public traces (`traces/registry.yaml`), where their files are, and fetching them.

The registry lives at the repository root (`traces/registry.yaml`) and is found relative to this
package, which works for the editable install the project uses; set `$DLORA_TRACE_REGISTRY` to use
another file (e.g. with a non-editable install).

A trace file is looked up, in order: an explicit path; `$DLORA_TRACE_DIR/<folder>/<file>`; the user
cache (`$XDG_CACHE_HOME/dlora/traces` or `~/.cache/dlora/traces`); then `$DLORA_SHARED_TRACES/<folder>/<file>`
if that is set (empty: nowhere else, as in a fresh clone), else the repository's sibling
`../shared/traces/<folder>/<file>`. `dlora-trace fetch NAME` downloads
into the first of `$DLORA_TRACE_DIR` / user cache, verifying each file's sha256; a file is written to
a temporary name and renamed only once its checksum matches, so nothing half-written is ever read.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dlora_sim.core.errors import UserError
from dlora_sim.core.errors import TraceNotFoundError

REPO_ROOT = Path(__file__).resolve().parents[2]


def registry_path() -> Path:
    return Path(os.environ.get("DLORA_TRACE_REGISTRY", REPO_ROOT / "traces" / "registry.yaml"))


@dataclass(frozen=True)
class TraceFile:
    """One published file: its path inside the trace folder, download URL, checksum and size."""

    path: str
    url: str
    sha256: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class TraceEntry:
    """A registered trace: where it comes from, its licence, and the files that make it up."""

    name: str
    format: str
    folder: str
    description: str = ""
    licence: str = ""
    citation: str = ""
    source: str = ""
    root: str = ""
    files: tuple[TraceFile, ...] = field(default_factory=tuple)
    note: str = ""

    @property
    def main(self) -> TraceFile:
        return self.files[0]


def load_registry(path: Path | None = None) -> dict[str, TraceEntry]:
    """Parse the registry; manifests (sha256sum-format files) expand into per-file entries."""
    path = Path(path) if path else registry_path()
    with open(path, encoding="utf-8") as fh:
        doc = yaml.safe_load(fh) or {}
    entries: dict[str, TraceEntry] = {}
    for name, e in (doc.get("traces") or {}).items():
        files = [TraceFile(path=f["path"], url=f["url"], sha256=_checksum(path, name, f.get("sha256")),
                           size=f.get("size")) for f in e.get("files", [])]
        if e.get("manifest"):
            files += _read_manifest(path.parent / e["manifest"], e["url_base"])
        entries[name] = TraceEntry(
            name=name, format=e["format"], folder=e["folder"], description=e.get("description", ""),
            licence=e.get("licence", ""), citation=e.get("citation", ""), source=e.get("source", ""),
            root=e.get("root", ""), files=tuple(files), note=e.get("note", ""))
    return entries


def _checksum(path: Path, name: str, value) -> str | None:
    """A sha256 as 64 lowercase hex digits (quote it in YAML), or None when unknown."""
    if value is None:
        return None
    text = str(value).lower()
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise ValueError(f"{path}: trace {name!r}: sha256 must be 64 hex digits (quoted), got {value!r}")
    return text


def _read_manifest(path: Path, url_base: str) -> list[TraceFile]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip() and not line.startswith("#"):
                parts = line.split()
                rel = parts[-1]
                digest = _checksum(path, rel, parts[0])
                size = int(parts[1]) if len(parts) == 3 else None
                out.append(TraceFile(path=rel, url=url_base.rstrip("/") + "/" + rel, sha256=digest, size=size))
    return out


def get_entry(name: str) -> TraceEntry:
    reg = load_registry()
    if name not in reg:
        raise KeyError(f"unknown trace {name!r}; registered: {sorted(reg)} (see {registry_path()})")
    return reg[name]


def user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dlora" / "traces"


def search_dirs() -> list[Path]:
    """Folders that may hold trace folders, in lookup order."""
    dirs = []
    if os.environ.get("DLORA_TRACE_DIR"):
        dirs.append(Path(os.environ["DLORA_TRACE_DIR"]))
    dirs.append(user_cache_dir())
    shared = os.environ.get("DLORA_SHARED_TRACES")
    if shared is None:   # set but empty: no shared folder at all (a fresh clone, as a user has it)
        dirs.append(REPO_ROOT.parent / "shared" / "traces")
    elif shared:
        dirs.append(Path(shared))
    return dirs


def resolve(name: str, relpath: str | None = None, path: str | os.PathLike | None = None) -> Path:
    """The local path of a registered trace's file or folder (`relpath` inside its folder).

    `path`, when given, wins and must exist. Otherwise the first existing candidate of
    `search_dirs()` is returned; if none exists the error lists every place tried.
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise TraceNotFoundError(f"trace path {p} does not exist")
        return p
    entry = get_entry(name)
    rel = relpath if relpath is not None else entry.main.path
    tried = []
    for d in search_dirs():
        cand = d / entry.folder / rel
        if cand.exists():
            return cand
        tried.append(str(cand))
    unverified = " --allow-unverified" if any(f.sha256 is None for f in entry.files) else ""
    raise TraceNotFoundError(
        f"trace {name!r} not found (looked in {', '.join(tried)}): run `dlora-trace fetch {name}{unverified}`, "
        "or set $DLORA_TRACE_DIR to a folder that holds it, or give the workload a path")


def is_present(name: str) -> bool:
    """True if every file of the trace is found locally."""
    entry = get_entry(name)
    try:
        for f in entry.files:
            resolve(name, f.path)
    except TraceNotFoundError:
        return False
    return True


class ChecksumError(ValueError, UserError):
    """A downloaded file whose sha256 differs from the registry's."""


class FetchError(RuntimeError, UserError):
    """A download that could not complete (offline, refused, not found): one line saying what to do."""


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: Path, sha256: str | None, allow_unverified: bool = False) -> str:
    """Download `url` to `dest` atomically, verifying sha256; returns the digest.

    The bytes go to a temporary file beside `dest`; it is renamed onto `dest` only after the
    checksum matches, and deleted otherwise. A file with no registered checksum is refused unless
    `allow_unverified` (then its digest is returned so it can be added to the registry).
    """
    if sha256 is None and not allow_unverified:
        raise ChecksumError(f"{url}: the registry has no sha256 for this file; refusing to trust it "
                            f"(pass --allow-unverified to download anyway and print its digest)")
    made = [p for p in (dest.parent, *dest.parent.parents) if not p.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    ok = False
    try:
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
                while block := resp.read(1 << 20):
                    h.update(block)
                    out.write(block)
        except (OSError, ValueError) as e:   # URLError, HTTPError, timeouts, refused connections, bad URLs
            reason = getattr(e, "reason", None) or e
            raise FetchError(f"could not download {url} ({reason}). Offline? Download it by hand and put it at "
                             f"{dest} (it is checked against the registry's sha256 when used), or point "
                             f"$DLORA_TRACE_DIR at a folder holding {dest.parent.name}/{dest.name}") from None
        digest = h.hexdigest()
        if sha256 is not None and digest != sha256.lower():
            raise ChecksumError(f"{url}: sha256 mismatch: expected {sha256}, got {digest}; nothing written to "
                                f"{dest}. The file changed upstream or the download was cut: retry, or compare with "
                                f"the registry's pinned commit")
        os.replace(tmp, dest)
        ok = True
        return digest
    finally:
        if tmp.exists():
            tmp.unlink()
        if not ok:   # leave nothing half-made: the folders this download created go again if empty
            for p in made:
                if p.exists() and not any(p.iterdir()):
                    p.rmdir()


def fetch(name: str, dest_root: Path | None = None, allow_unverified: bool = False,
          progress=None) -> tuple[Path, dict[str, str]]:
    """Download every file of a registered trace into `dest_root/<folder>`; verified files already there are kept.

    Returns the folder and the sha256 of each file downloaded without a registered checksum.
    Tar archives (.tar, .tar.gz, .tar.xz) are unpacked beside themselves once verified.
    """
    entry = get_entry(name)
    root = Path(dest_root) if dest_root else (
        Path(os.environ["DLORA_TRACE_DIR"]) if os.environ.get("DLORA_TRACE_DIR") else user_cache_dir())
    folder = root / entry.folder
    unverified: dict[str, str] = {}
    files = entry.files if progress is None else progress(entry.files)
    for f in files:
        dest = folder / f.path
        if dest.exists() and f.sha256 and sha256_of(dest) == f.sha256:
            continue
        digest = download(f.url, dest, f.sha256, allow_unverified)
        if f.sha256 is None:
            unverified[f.path] = digest
        if re.search(r"\.tar(\.(gz|xz|bz2))?$", dest.name):
            _untar(dest, folder)
    return folder, unverified


def _untar(archive: Path, folder: Path) -> None:
    import tarfile

    with tarfile.open(archive) as tf:
        tf.extractall(folder, filter="data")  # "data" refuses absolute paths and links out of folder
