"""Integrity of weight files: the hub's checksums, cheap header probes, and the verdicts fetch records.

A 20 GB file takes about a minute to hash, so each verdict is recorded in `<weights_dir>/.itk/verified.json`
with the file's size and mtime: the doctor trusts a verdict while both are unchanged and re-hashes only with
--deep. What a file should hash to comes from the hub (fetch asks it) or, for a tree fetched by hand with
`hf download --local-dir`, from the client's own `.cache/huggingface/download/<path>.metadata` (its etag is
the sha256 of an LFS file and the git blob sha1 of a small one).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import zipfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from itk.runtime.atomic import atomic_write_text
from itk.runtime.manifest import WeightFile
from itk.runtime.protocol import UserError
from itk.runtime.safetensors_header import HeaderError, read_header

BLOCK = 16 << 20  # large reads: hashing runs at disk speed, not at syscall speed
HASH_THREADS = 4  # hashlib releases the GIL, so files hash in parallel
SHA256 = re.compile(r"[0-9a-f]{64}")
SHA1 = re.compile(r"[0-9a-f]{40}")
FETCH_FIX = "run `itk fetch`: it re-downloads only the files that are not intact"
CHANGED_FIX = "run `itk fetch` (it re-hashes the file and re-downloads it only if it differs) or `itk doctor --deep`"
DRIVE = re.compile(r"[A-Za-z]:")
# The longest name one folder entry can have: 255 bytes on ext4, xfs, btrfs, zfs and APFS (255 UTF-16 units on
# NTFS). The download client keeps `<name>.metadata` beside each file, so a repo file's name must leave room for it.
NAME_MAX = 255
CLIENT_SUFFIX = ".metadata"
NAME_FIX = ("the hub or mirror lists a file name no repo can have: report it, and fetch with --preset or "
            "--component, which take only the manifest's names")


@dataclass(frozen=True)
class Expected:
    """What the hub says a file is. sha256 for LFS files, the git blob sha1 for small ones."""

    size: int | None = None
    sha256: str | None = None
    sha1: str | None = None
    revision: str = ""
    commit: str = ""

    @property
    def algo(self) -> str | None:
        return "sha256" if self.sha256 else "sha1" if self.sha1 else None

    @property
    def digest(self) -> str | None:
        return self.sha256 or self.sha1


@dataclass
class Record:
    """One verdict in verified.json. size + mtime_ns say whether it still describes the file on disk."""

    size: int
    mtime_ns: int
    algo: str
    digest: str  # what the file hashed to
    expected: str  # what the hub said
    revision: str
    commit: str
    verdict: str  # "ok" or "corrupt"
    verified_at: float

    def describes(self, path: Path) -> bool:
        st = path.stat()
        return st.st_size == self.size and st.st_mtime_ns == self.mtime_ns


# States a run cannot start with. changed: size or mtime differ from the recorded verdict, so that verdict no
# longer describes the file; unsafe: its path leads out of its folder through a symlink.
UNUSABLE = ("missing", "truncated", "corrupt", "bad_header", "changed", "unsafe")


@dataclass(frozen=True)
class FileStatus:
    label: str
    state: str  # ok | not_verified | one of UNUSABLE
    detail: str = ""
    fix: str = ""
    hashed_at: float | None = None  # when the recorded verdict was made (None: never hashed)


# -- remote names -> local paths ------------------------------------------------------------------------
def name_problem(name: str) -> str | None:
    """Why a repo file name cannot become a path under its folder, judged on the text alone (no filesystem
    call): the hub (or a mirror) sends these names, and a hostile one must not reach outside the folder."""
    if not name:
        return "an empty name"
    if "\\" in name:
        return "a backslash"
    if "\0" in name:
        return "a NUL byte"
    if name.startswith("/"):
        return "an absolute path"
    if DRIVE.match(name):
        return "a drive letter"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "a '..', '.' or empty path segment"
    if name.split("/")[0] == ".cache":
        return "a path inside the download client's own .cache folder"
    return None


def length_problem(name: str) -> str | None:
    """Why a repo file name cannot be created on a common file system: a path segment over NAME_MAX bytes."""
    longest = max((len(part.encode()) for part in name.split("/")), default=0)
    if longest + len(CLIENT_SUFFIX) > NAME_MAX:
        return (f"a part of {longest} bytes, over the {NAME_MAX} a file system allows in one name (with the "
                f"download client's {CLIENT_SUFFIX!r} added)")
    return None


def escaping_link(folder: Path, name: str) -> Path | None:
    """The first symlink on the way from `folder` to `folder/name` that leads out of `folder`, if any."""
    root = folder.resolve()
    path = folder
    for part in name.split("/"):
        path = path / part
        if path.is_symlink() and not path.resolve().is_relative_to(root):
            return path
    return None


def local_path(weights_dir: Path, f: WeightFile) -> Path:
    """The ONE way a repo file name becomes a local path (fetch, the verifier, the doctor). A name that could
    lead outside its repo folder is refused, naming the file, before anything is read, written or deleted:
    first on its text, then through symlinks. The repo folder itself may be a link (the user's placement)."""
    what = f"{f.repo.id}@{f.revision}: {f.path!r}"
    for name in (f.repo.local_dir, f.path):
        if why := name_problem(name):
            raise UserError(f"refusing {what}: {why} could put it outside {weights_dir}", NAME_FIX)
        if why := length_problem(name):
            raise UserError(f"refusing {what}: {why}", NAME_FIX)
    folder = weights_dir / f.repo.local_dir
    # The download client also writes the file's metadata and partial bytes under its .cache folder.
    if link := escaping_link(folder, f.path) or escaping_link(folder, f".cache/huggingface/download/{f.path}"):
        raise UserError(f"refusing {what}: {link} is a symlink leading out of {folder}",
                        f"replace the link {link} with a real folder or file, then rerun")
    return folder / f.path


# -- hashing and probes ---------------------------------------------------------------------------------
def file_digest(path: Path, algo: str) -> str:
    """sha256 of the bytes, or the git blob sha1 (sha1 of "blob <size>\\0" + bytes) that the hub lists."""
    h = hashlib.sha256() if algo == "sha256" else hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(BLOCK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def safetensors_problem(path: Path) -> str | None:
    """None when the header parses and the data it describes ends exactly at the end of the file."""
    try:
        header = read_header(path)
    except HeaderError as exc:
        return str(exc)
    size = path.stat().st_size
    if header.data_end != size:
        return f"{size} bytes, its header describes {header.data_end}: bytes appended or damaged"
    return None


def header_problem(path: Path) -> str | None:
    """A cheap structural probe: safetensors header vs file length; .pth zip central directory."""
    if path.suffix == ".safetensors":
        return safetensors_problem(path)
    if path.suffix == ".pth":  # torch.save's format: a zip archive, whose directory sits at the very end
        try:
            with zipfile.ZipFile(path) as z:
                z.infolist()
        except (zipfile.BadZipFile, OSError) as exc:
            return f"not a readable zip archive, truncated or corrupt .pth ({exc})"
    return None


def expected_from_hub_metadata(local_dir: Path, path: str) -> Expected | None:
    """What `hf download --local-dir` recorded for a file: commit and etag (sha256 or blob sha1)."""
    meta = local_dir / ".cache" / "huggingface" / "download" / f"{path}.metadata"
    try:
        commit, etag = meta.read_text().splitlines()[:2]
    except (OSError, ValueError):
        return None
    etag = etag.strip().strip('"')
    if SHA256.fullmatch(etag):
        return Expected(sha256=etag, commit=commit.strip())
    if SHA1.fullmatch(etag):
        return Expected(sha1=etag, commit=commit.strip())
    return None


# -- the record -----------------------------------------------------------------------------------------
class VerdictStore:
    """`<weights_dir>/.itk/verified.json`, keyed by the file's path under weights_dir; written atomically.

    Several writers share the file: fetch's download threads, a doctor --deep, the page's doctor beside a
    fetch, a fetch interrupted while its threads still record next to the fetch that replaced it. Each store
    reads the file once, so writing its own copy back would drop what the others recorded since (a kill storm
    once left 17 ok records of 18). `put` therefore re-reads the file under a lock held across threads and
    processes (filelock: an OS lock, released when its holder dies) and changes only its own label."""

    def __init__(self, weights_dir: Path):
        self.path = weights_dir / ".itk" / "verified.json"
        self.lock = threading.Lock()
        self.records = self.read()

    def read(self) -> dict[str, Record]:
        try:
            raw = json.loads(self.path.read_text())
            return {k: Record(**v) for k, v in raw.get("files", {}).items()}
        except (OSError, ValueError, TypeError):
            return {}

    def get(self, label: str) -> Record | None:
        return self.records.get(label)

    def put(self, label: str, record: Record | None) -> None:
        from filelock import FileLock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.lock, FileLock(self.path.with_name(self.path.name + ".lock")):
            records = self.read()
            if record is None:
                records.pop(label, None)
            else:
                records[label] = record
            atomic_write_text(self.path, json.dumps({"files": {k: asdict(v) for k, v in sorted(records.items())}},
                                                    indent=1))
            self.records = records

    def trusted(self, label: str, path: Path, expected: Expected | None = None) -> bool:
        """A recorded ok verdict that still describes the file (and, if given, matches the hub's digest)."""
        rec = self.get(label)
        return (rec is not None and rec.verdict == "ok" and path.is_file() and rec.describes(path)
                and (expected is None or expected.digest is None or same_digest(expected.digest, rec.expected)))


def verify_file(path: Path, expected: Expected) -> tuple[FileStatus, Record | None]:
    """Size, header, then the hash against the hub's. The Record is None when nothing was hashed."""
    label = str(path)
    size = path.stat().st_size
    if expected.size is not None and size != expected.size:
        state = "truncated" if size < expected.size else "corrupt"
        return FileStatus(label, state, f"{size} bytes, the hub says {expected.size}", FETCH_FIX), None
    if why := header_problem(path):
        return FileStatus(label, "bad_header", why, FETCH_FIX), None
    if expected.algo is None:
        return FileStatus(label, "not_verified", "no hub checksum known for it",
                          "run `itk fetch`, which asks the hub and records it"), None
    before = path.stat()
    digest = file_digest(path, expected.algo)
    ok = same_digest(digest, expected.digest)
    record = Record(size=before.st_size, mtime_ns=before.st_mtime_ns, algo=expected.algo, digest=digest,
                    expected=expected.digest or "", revision=expected.revision, commit=expected.commit,
                    verdict="ok" if ok else "corrupt", verified_at=time.time())
    if ok:
        return FileStatus(label, "ok", f"{expected.algo} matches the hub", hashed_at=record.verified_at), record
    return FileStatus(label, "corrupt", f"{expected.algo} {digest[:12]}… but the hub says {expected.digest[:12]}…",
                      FETCH_FIX, record.verified_at), record


def same_digest(a: str | None, b: str | None) -> bool:
    """Two hex digests are the same file only when both are whole and equal in every character: a shown
    prefix (12 characters in messages) is never enough."""
    return bool(a and b) and len(a) in (40, 64) and a.lower() == b.lower()


# -- the doctor's view ----------------------------------------------------------------------------------
def check_files(weights_dir: Path, files: Iterable[WeightFile], deep: bool) -> list[FileStatus]:
    """Per-file status for the doctor and `itk run`. Default: presence, recorded size and mtime, header,
    recorded verdict; a file changed since its verdict is `changed` (unusable until re-hashed).
    deep: re-hash against the recorded hub digest (or the hf client's metadata) and record the verdict."""
    store = VerdictStore(weights_dir)

    def one(f: WeightFile) -> FileStatus:
        try:
            path = local_path(weights_dir, f)
        except UserError as exc:
            return FileStatus(f.label, "unsafe", exc.message, exc.fix)
        if not path.is_file():
            return FileStatus(f.label, "missing", "", "run `itk fetch` to download it")
        rec = store.get(f.label)
        at = rec.verified_at if rec is not None else None
        size = path.stat().st_size
        if rec is not None and size != rec.size:
            state = "truncated" if size < rec.size else "corrupt"
            return FileStatus(f.label, state, f"{size} bytes, {rec.size} when verified", FETCH_FIX, at)
        if why := header_problem(path):
            return FileStatus(f.label, "bad_header", why, FETCH_FIX, at)
        if not deep:
            if rec is None:
                return FileStatus(f.label, "not_verified", "never verified", "run `itk doctor --deep` to hash it")
            if not rec.describes(path):
                return FileStatus(f.label, "changed", "changed since it was verified (modified time differs)",
                                  CHANGED_FIX, at)
            if rec.verdict == "ok":
                return FileStatus(f.label, "ok", f"verified ({rec.algo})", hashed_at=at)
            return FileStatus(f.label, "corrupt", f"{rec.algo} does not match the hub", FETCH_FIX, at)
        if rec is not None:
            expected = Expected(size=rec.size, revision=rec.revision, commit=rec.commit,
                                **{rec.algo: rec.expected})
        else:
            expected = expected_from_hub_metadata(weights_dir / f.repo.local_dir, f.path) or Expected()
            expected = Expected(sha256=expected.sha256, sha1=expected.sha1, revision=f.revision,
                                commit=expected.commit)
        status, record = verify_file(path, expected)
        if record is not None:
            store.put(f.label, record)
        return FileStatus(f.label, status.state, status.detail, status.fix, status.hashed_at or at)

    with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
        return list(pool.map(one, list(files)))
