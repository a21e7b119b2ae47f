"""`itk fetch`: exactly the files a preset needs from the three Hugging Face repos, verified, once.

First a plan (every file, its size and checksum from the hub at a resolved commit, what is already present and
verified, the bytes to download, the free disk), then parallel downloads through huggingface_hub's
`hf_hub_download(local_dir=...)` (so HF_ENDPOINT mirrors, HF_TOKEN and gated repos work as in `hf download`),
each file hashed against the hub's checksum as it lands and its verdict recorded for the doctor. A verified
file is never downloaded again, so a rerun after an interruption only fetches what is still missing.

huggingface_hub 2.x writes each download to a process-unique `*.incomplete` file and deletes it on failure,
so a partial file never sits under its final name; after a hard kill, the next run removes the leftovers.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from itk.checks.disk import MARGIN  # the doctor's disk check and fetch agree on the margin
from itk.runtime.manifest import Manifest, Repo, WeightFile, load_manifest
from itk.runtime.paths import existing_parent, free_bytes
from itk.runtime.protocol import EXIT_BAD_INPUT, EXIT_INTERRUPTED, UserError
from itk.runtime.verify import NAME_FIX, Expected, FileStatus, VerdictStore, local_path, verify_file

BACKOFF_S = (0.5, 1.0, 2.0)  # waits between attempts after a connection error
OFFLINE_FIX = ("check the network and rerun later (finished files are kept); behind a firewall, point "
               "HF_ENDPOINT at a Hugging Face mirror")
# When HF_ENDPOINT itself names the hub that failed, pointing it at a mirror is not the fix.
MIRROR_DOWN_FIX = ("HF_ENDPOINT names this mirror: check that it is up and reachable, or unset HF_ENDPOINT to "
                   "use huggingface.co; rerun later (finished files are kept)")
AUTH_FIX = ("log in with `hf auth login` (or set HF_TOKEN) using a token whose account has accepted the "
            "repo's terms on its Hugging Face page")
# A server that answers but misbehaves (redirect loops, more bytes than it advertised): the network is fine.
SERVER_FIX = ("huggingface.co (or a proxy on the way) is misbehaving: rerun later (finished files are kept); "
              "behind a proxy, tell its operator, or point HF_ENDPOINT at a Hugging Face mirror")
MIRROR_FAULT_FIX = ("HF_ENDPOINT names this mirror and it is misbehaving: tell whoever runs it, or unset HF_ENDPOINT "
                    "to use huggingface.co; rerun later (finished files are kept)")
# A body that sends nothing: the client's read timeout (HF_HUB_DOWNLOAD_TIMEOUT, 10 s by default) ends each wait,
# and the client resumes the download 5 times before it gives up; we add no retries of our own on top (they made a
# stalled body take 266 s to fail), so a stall fails after about 6 x (timeout + 1 s), a minute by default. A slow
# download is never cut: the timeout is per read, and every byte that arrives restarts it.
CLIENT_RESUMES = 5
CONSISTENCY = re.compile(r"should be of size (\d+) but has size (\d+)")


@dataclass
class Item:
    """One file of the plan. state: verified (skip) | check (present, hash before deciding) | download."""

    file: WeightFile
    expected: Expected
    state: str
    note: str = ""

    @property
    def size(self) -> int:
        return self.expected.size or 0

    def to_json(self) -> dict[str, Any]:
        f = self.file
        return {"file": f.label, "repo": f.repo.id, "path": f.path, "revision": f.revision,
                "commit": self.expected.commit, "size": self.size, "sha256": self.expected.sha256,
                "sha1": self.expected.sha1, "state": self.state, "note": self.note, "why": f.why}


@dataclass
class FetchPlan:
    endpoint: str
    weights_dir: Path
    source: str
    items: list[Item]
    free: int
    where: Path
    results: dict[str, str] = field(default_factory=dict)  # label -> downloaded | kept
    offline: str = ""  # why the hub could not be asked: sizes are then the manifest's approximate ones

    @property
    def download_bytes(self) -> int:
        return sum(i.size for i in self.items if i.state != "verified")

    @property
    def total_bytes(self) -> int:
        return sum(i.size for i in self.items)

    @property
    def need(self) -> int:
        missing = sum(i.size for i in self.items if i.state == "download")
        return missing + MARGIN if missing else 0

    def to_json(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "weights_dir": str(self.weights_dir), "source": self.source,
                "total_bytes": self.total_bytes, "download_bytes": self.download_bytes,
                "free_bytes": self.free, "margin_bytes": MARGIN, "files": [i.to_json() for i in self.items],
                "results": self.results, "approximate": bool(self.offline), "offline": self.offline}


# -- errors ---------------------------------------------------------------------------------------------
class Unreachable(UserError):
    """The hub could not be reached: a dry run still shows the plan, from the manifest's sizes."""


def offline_fix() -> str:
    """The fix for a hub that did not answer; never "point HF_ENDPOINT at a mirror" when it already does."""
    return MIRROR_DOWN_FIX if os.environ.get("HF_ENDPOINT") else OFFLINE_FIX


def server_fault_fix() -> str:
    """The fix for a hub that answers wrongly; a mirror in HF_ENDPOINT is named as the one at fault."""
    return MIRROR_FAULT_FIX if os.environ.get("HF_ENDPOINT") else SERVER_FIX


def class_names(exc: BaseException) -> set[str]:
    """Judged by the transport library's class names so it holds whichever httpx flavour huggingface_hub ships."""
    return {c.__name__ for c in type(exc).__mro__}


def body_sizes(exc: BaseException) -> tuple[int, int] | None:
    """(advertised, received) from the client's "Consistency check failed" error, else None."""
    m = CONSISTENCY.search(str(exc)) if isinstance(exc, OSError) else None
    return (int(m[1]), int(m[2])) if m else None


def stalled(exc: BaseException) -> bool:
    """A read timeout: no byte for HF_HUB_DOWNLOAD_TIMEOUT seconds."""
    return "ReadTimeout" in class_names(exc)


def is_transient(exc: BaseException) -> bool:
    """Connection refused, DNS, timeouts, a connection dropped mid-body: worth a retry. Not a body longer than
    advertised (the server's fault, the same on every try)."""
    names = class_names(exc)
    if names & {"TransportError", "ConnectionError", "TimeoutError"}:
        return True
    if "LocalEntryNotFoundError" in names:  # the hub could not be reached and no local copy exists
        return True
    sizes = body_sizes(exc)
    return sizes is not None and sizes[1] < sizes[0]  # short: the connection ended early


def explain(exc: BaseException, what: str, endpoint: str, weights_dir: Path, size: int = 0,
            body: bool = False) -> UserError:
    """One line + fix for everything a download can hit. `what` names the repo or file; body: the error came
    from downloading a file's bytes (where the client resumes a silent body CLIENT_RESUMES times)."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, GatedRepoError) or status in (401, 403):
        return UserError(f"{what}: access denied by {endpoint} ({status}): the repo is gated or the token "
                         "is missing or invalid", AUTH_FIX)
    if isinstance(exc, RevisionNotFoundError):
        return UserError(f"{what}: revision not found on {endpoint} (404)",
                         "the branch or PR may have been merged or deleted: update itk, or report it")
    if isinstance(exc, EntryNotFoundError) and not is_transient(exc):
        return UserError(f"{what}: file not found on {endpoint} (404)",
                         "the repo changed its files: update itk, or report it")
    if isinstance(exc, RepositoryNotFoundError):
        return UserError(f"{what}: repository not found on {endpoint} (404)",
                         "check HF_ENDPOINT (a mirror may lack it) or whether the repo was renamed")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return UserError(f"disk full while writing {what}: it needs {size:,} bytes at {existing_parent(weights_dir)}"
                         " (the partial file was removed)",
                         "free space there (or use --weights-dir on a bigger disk) and rerun")
    names = class_names(exc)
    if "TooManyRedirects" in names:
        return UserError(f"{what}: {endpoint} answers with redirects in a loop", server_fault_fix())
    if body and stalled(exc):
        from huggingface_hub import constants

        timeout = constants.HF_HUB_DOWNLOAD_TIMEOUT
        return UserError(f"{what}: {endpoint} stopped sending it: no data for {timeout:g} s, "
                         f"{CLIENT_RESUMES + 1} times in a row",
                         f"on a link that pauses longer than {timeout:g} s, raise HF_HUB_DOWNLOAD_TIMEOUT; "
                         f"{offline_fix()}")
    if (sizes := body_sizes(exc)) and sizes[1] > sizes[0]:
        return UserError(f"{what}: {endpoint} sent {sizes[1]:,} bytes, more than the {sizes[0]:,} it advertised",
                         f"the server sends damaged or different bytes: {server_fault_fix()}")
    if is_transient(exc):
        cause = exc.__cause__ or exc.__context__ or exc
        return Unreachable(f"cannot reach {endpoint} for {what}: {type(cause).__name__}: {cause}", offline_fix())
    if isinstance(exc, HfHubHTTPError):
        return UserError(f"{what}: {endpoint} answered {status}: {exc}", offline_fix())
    raise exc


def with_retries(fn: Callable[[], Any], on_retry: Callable[[BaseException], None] | None = None,
                 retry_if: Callable[[BaseException], bool] = is_transient) -> Any:
    for wait in (*BACKOFF_S, None):
        try:
            return fn()
        except Exception as exc:
            if wait is None or not retry_if(exc):
                raise
            if on_retry:
                on_retry(exc)
            time.sleep(wait)


# -- the plan -------------------------------------------------------------------------------------------
def hub_api():
    from huggingface_hub import HfApi

    return HfApi()


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def resolve_commits(api, pairs: set[tuple[Repo, str]], ep: str) -> dict[tuple[str, str], str]:
    """Each (repo, revision) -> its commit, once: every file is then fetched from that exact commit."""
    commits = {}
    for repo, rev in sorted(pairs, key=lambda p: (p[0].key, p[1])):
        try:
            commits[(repo.key, rev)] = with_retries(lambda r=repo, v=rev: api.repo_info(r.id, revision=v).sha)
        except Exception as exc:
            raise explain(exc, f"{repo.id}@{rev}", ep, Path(".")) from None
    return commits


def full_repo_files(api, manifest: Manifest, ep: str) -> list[WeightFile]:
    """--all: what the guide's whole-repo downloads get (every file of each of its repos at its revision; the
    LoRA collections are left out: fetch a LoRA with its preset or --component), plus the manifest's files
    from other revisions (wav2vec2's model.safetensors from refs/pr/1). Each listing is taken
    at the commit its revision resolves to; resolving first also fails fast when the hub cannot be reached
    (the listing call has the client's own long backoff)."""
    commits = resolve_commits(api, {(r, r.revision) for r in manifest.whole_repos}, ep)
    files = []
    for repo in manifest.whole_repos:
        commit = commits[(repo.key, repo.revision)]
        try:
            tree = with_retries(lambda r=repo, c=commit: list(api.list_repo_tree(r.id, revision=c, recursive=True)))
        except Exception as exc:
            raise explain(exc, f"{repo.id}@{repo.revision}", ep, Path(".")) from None
        files += [WeightFile(repo=repo, path=e.path, size=e.size, revision=repo.revision)
                  for e in tree if hasattr(e, "size")]
    listed = {(f.repo.key, f.path, f.revision) for f in files}
    for comp in manifest.components.values():
        for f in comp.files:
            if f.repo.whole and (f.repo.key, f.path, f.revision) not in listed:
                files.append(f)
                listed.add((f.repo.key, f.path, f.revision))
    return files


def refuse_file_folder_clash(files: list[WeightFile]) -> None:
    """A listing with both `a` and `a/b` in one folder cannot be written: `a` would be a file and a folder."""
    names = {(f.repo.local_dir, f.path): f for f in files}
    for f in files:
        parts = f.path.split("/")
        for n in range(1, len(parts)):
            if (file := names.get((f.repo.local_dir, "/".join(parts[:n])))) is not None:
                raise UserError(f"refusing {file.repo.id}@{file.revision}: {file.path!r} is listed as a file and "
                                f"as the folder of {f.path!r}", NAME_FIX)


def refuse_local_clash(path: Path, f: WeightFile, folder: Path) -> None:
    """Something of the user's on disk where the file or one of its folders must go."""
    if path.is_dir():
        raise UserError(f"{f.label}: {path} is a folder, where the hub has a file",
                        f"move or remove the folder {path}, then rerun")
    for parent in (folder / p for p in path.relative_to(folder).parents):  # the repo folder itself last
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{f.label}: {parent} is a file, where {f.label} needs a folder",
                            f"move or remove the file {parent}, then rerun")


def make_plan(files: list[WeightFile], weights_dir: Path, source: str, api=None) -> FetchPlan:
    for f in files:  # every name the hub listed, before anything on disk is touched
        local_path(weights_dir, f)
    refuse_file_folder_clash(files)
    api = api or hub_api()
    ep = endpoint()
    commits = resolve_commits(api, {(f.repo, f.revision) for f in files}, ep)
    infos: dict[tuple[str, str, str], Any] = {}
    by_rev: dict[tuple[Repo, str], list[str]] = {}
    for f in files:
        by_rev.setdefault((f.repo, f.revision), []).append(f.path)
    for (repo, rev), paths in by_rev.items():
        commit = commits[(repo.key, rev)]
        try:
            entries = with_retries(lambda r=repo, p=paths, c=commit: api.get_paths_info(r.id, p, revision=c))
        except Exception as exc:
            raise explain(exc, f"{repo.id}@{rev}", ep, weights_dir) from None
        for e in entries:
            infos[(repo.key, rev, e.path)] = e
    store = VerdictStore(weights_dir)
    items = []
    for f in files:
        info = infos.get((f.repo.key, f.revision, f.path))
        if info is None:
            raise UserError(f"{f.repo.id}@{f.revision}: {f.path} not found on {ep} (404)",
                            "the repo changed its files: update itk, or report it")
        lfs = getattr(info, "lfs", None)
        expected = Expected(size=info.size, sha256=lfs.sha256 if lfs else None,
                            sha1=None if lfs else info.blob_id, revision=f.revision,
                            commit=commits[(f.repo.key, f.revision)])
        items.append(judge(f, expected, weights_dir, store))
    return FetchPlan(endpoint=ep, weights_dir=weights_dir, source=source, items=items,
                free=free_bytes(weights_dir), where=existing_parent(weights_dir))


def judge(f: WeightFile, expected: Expected, weights_dir: Path, store: VerdictStore) -> Item:
    """A present file is skipped only on a recorded ok verdict whose size and mtime still describe it and
    whose digest is the hub's; any other present file of the hub's size is hashed before it is kept."""
    path = local_path(weights_dir, f)
    refuse_local_clash(path, f, weights_dir / f.repo.local_dir)
    if store.trusted(f.label, path, expected):
        return Item(f, expected, "verified", "present, verified")
    if path.is_file() and path.stat().st_size == expected.size:
        rec = store.get(f.label)
        why = ("not verified yet" if rec is None else "verified against an older hub checksum"
               if rec.describes(path) else "changed since it was verified")
        return Item(f, expected, "check", f"present, {why}: hashed before deciding")
    if path.is_file():
        return Item(f, expected, "download", f"present but {path.stat().st_size:,} bytes: downloaded again")
    return Item(f, expected, "download", "missing")


def offline_plan(files: list[WeightFile], weights_dir: Path, source: str, why: str) -> FetchPlan:
    """What a dry run can say without the hub: the manifest's approximate sizes and what is on disk."""
    store = VerdictStore(weights_dir)
    items = []
    for f in files:
        path = local_path(weights_dir, f)
        refuse_local_clash(path, f, weights_dir / f.repo.local_dir)
        expected = Expected(size=f.size, revision=f.revision)
        if store.trusted(f.label, path):
            items.append(Item(f, expected, "verified", "present, verified (against the hub's checksum then)"))
        elif path.is_file():
            items.append(Item(f, expected, "check", "present, not verified: hashed when fetched"))
        else:
            items.append(Item(f, expected, "download", "missing"))
    return FetchPlan(endpoint=endpoint(), weights_dir=weights_dir, source=source, items=items,
                free=free_bytes(weights_dir), where=existing_parent(weights_dir), offline=why)


def refuse_if_disk_short(plan: FetchPlan) -> None:
    if plan.need and plan.free < plan.need:
        raise UserError(
            f"not enough disk at {plan.where}: {plan.need - MARGIN:,} bytes to download + {MARGIN:,} margin,"
            f" {plan.free:,} free",
            f"free {plan.need - plan.free:,} bytes there, or download elsewhere with --weights-dir DIR")


# -- the downloads --------------------------------------------------------------------------------------
class ByteCounter:
    """Stands in for the tqdm bar huggingface_hub would draw: forwards byte counts to our progress."""

    def __init__(self, on_bytes: Callable[[int], None], initial: int = 0, **_: Any):
        self.on_bytes = on_bytes
        if initial:
            on_bytes(initial)

    def __enter__(self) -> ByteCounter:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def update(self, n: int) -> None:
        self.on_bytes(n)


def fetch_lock(weights_dir: Path) -> AbstractContextManager[None]:
    """One `itk fetch` per weights folder, naming its holder's pid (itk.locking): it makes removing a killed run's
    *.incomplete files safe."""
    from itk.locking import held

    return held(weights_dir / ".itk" / "fetch.lock", lambda holder: UserError(
        f"another `itk fetch` is writing to {weights_dir} ({holder})", "wait for it to finish, or stop it first"))


def remove_leftovers(plan: FetchPlan) -> None:
    """Partial downloads of a killed run: huggingface_hub 2.x never resumes them across processes."""
    for local in {plan.weights_dir / i.file.repo.local_dir for i in plan.items}:
        downloads = local / ".cache" / "huggingface" / "download"
        if not downloads.resolve().is_relative_to(local.resolve()):
            continue  # a link out of the folder: nothing there is ours to delete
        for stale in downloads.rglob("*.incomplete"):  # rglob does not descend into linked folders
            stale.unlink(missing_ok=True)


class Downloader:
    def __init__(self, plan: FetchPlan, progress: Callable[[str, str, int], None]):
        self.plan = plan
        self.store = VerdictStore(plan.weights_dir)
        self.progress = progress  # (label, event: start|bytes|reset|done, n)

    def download(self, item: Item, force: bool) -> None:
        from huggingface_hub import hf_hub_download

        f = item.file
        local_dir = self.plan.weights_dir / f.repo.local_dir
        local_path(self.plan.weights_dir, f).unlink(missing_ok=True)

        def once() -> None:
            self.progress(f.label, "reset", 0)
            hf_hub_download(f.repo.id, f.path, revision=item.expected.commit, local_dir=local_dir,
                            force_download=force,
                            tqdm_class=functools.partial(ByteCounter, lambda n: self.progress(f.label, "bytes", n)))

        try:  # a stalled body is not tried again: the client has already resumed it CLIENT_RESUMES times
            with_retries(once, retry_if=lambda exc: is_transient(exc) and not stalled(exc))
        except Exception as exc:
            raise explain(exc, f.label, self.plan.endpoint, self.plan.weights_dir, item.size, body=True) from None

    def verify(self, item: Item) -> FileStatus:
        status, record = verify_file(local_path(self.plan.weights_dir, item.file), item.expected)
        self.store.put(item.file.label, record)
        return status

    def run(self, item: Item) -> str:
        """Bring one file to a verified state: 'kept' when it already was intact, else 'downloaded'."""
        try:
            return self.bring(item)
        except OSError as exc:  # the disk can fill in our own writes (verdicts, metadata) as well
            if exc.errno != errno.ENOSPC:
                raise
            raise explain(exc, item.file.label, self.plan.endpoint, self.plan.weights_dir, item.size) from None

    def bring(self, item: Item) -> str:
        f, path = item.file, local_path(self.plan.weights_dir, item.file)
        self.progress(f.label, "start", item.size)
        if item.state == "check" and self.verify(item).state == "ok":
            self.progress(f.label, "done", item.size)
            return "kept"
        self.download(item, force=False)
        if self.verify(item).state != "ok":
            self.download(item, force=True)  # one more try: the bytes may have been damaged on the way
            if (status := self.verify(item)).state != "ok":
                path.unlink(missing_ok=True)
                raise UserError(f"{f.label} is not intact after two downloads from {self.plan.endpoint}: "
                                f"{status.detail}",
                                "the server or mirror is sending damaged bytes: try again later or unset/"
                                "change HF_ENDPOINT")
        self.progress(f.label, "done", item.size)
        return "downloaded"


def execute(plan: FetchPlan, jobs: int, progress: Callable[[str, str, int], None],
            tick: Callable[[], None] = lambda: None) -> None:
    """Download with `jobs` worker threads. Workers are daemon threads: Ctrl-C ends the process at once
    (huggingface_hub keeps partial bytes under *.incomplete names only), and the rerun carries on."""
    todo = [i for i in plan.items if i.state != "verified"]
    for i in plan.items:
        if i.state == "verified":
            plan.results[i.file.label] = "kept"
    if not todo:
        return
    # Our preflight already compared free space with what is missing; the client's own warning repeats it.
    warnings.filterwarnings("ignore", message="Not enough free disk space")
    # Its "Trying to resume download..." lines (several lines each) break the progress display; a download that
    # fails for good ends in our one line, which says what the client tried.
    logging.getLogger("huggingface_hub.file_download").setLevel(logging.ERROR)
    with fetch_lock(plan.weights_dir):
        remove_leftovers(plan)
        downloader = Downloader(plan, progress)
        queue = list(reversed(sorted(todo, key=lambda i: i.size)))  # biggest first: the slowest set the pace
        lock = threading.Lock()
        failures: list[BaseException] = []
        done = threading.Event()

        def worker() -> None:
            while not failures:
                with lock:
                    if not queue:
                        break
                    item = queue.pop(0)
                try:
                    plan.results[item.file.label] = downloader.run(item)
                except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                    failures.append(exc)
            done.set()

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, min(jobs, len(todo))))]
        for t in threads:
            t.start()
        try:
            while any(t.is_alive() for t in threads):
                done.wait(0.1)
                done.clear()
                tick()
        except KeyboardInterrupt:
            raise UserError(f"interrupted: {len(plan.results)} of {len(plan.items)} files complete and verified",
                            "rerun the same `itk fetch`: it keeps finished files and fetches only the rest",
                            EXIT_INTERRUPTED) from None
        if failures:
            raise failures[0]


def select_files(preset: str | None, components: tuple[str, ...], all_files: bool,
                 offline: bool = False, variant: str = "single") -> tuple[list[WeightFile], str]:
    """offline: --all without the hub can only name the manifest's files (the full listing is the hub's).
    variant: a preset's InfiniteTalk DiT in that variant (multi: two speakers), the rest of its files as they are."""
    manifest = load_manifest()
    if all_files and offline:
        return ([f for f in manifest.files_for(list(manifest.components)) if f.repo.whole],
                "--all (only the manifest's files: listing every file of the three repos needs the hub)")
    if all_files:
        return full_repo_files(hub_api(), manifest, endpoint()), "--all: every file of the three repos"
    if components:
        try:
            return manifest.files_for(components), "components " + ", ".join(components)
        except KeyError as exc:
            raise UserError(str(exc.args[0]), "see runtime/manifest.toml for the components", EXIT_BAD_INPUT) from None
    from itk.presets import resolve_preset
    from itk.variants import swap_components

    chosen, line = resolve_preset(preset)
    wanted = swap_components(chosen.components, variant, manifest)
    suffix = f" ({variant}-speaker DiT)" if variant != "single" else ""
    return manifest.files_for(wanted), f"preset {line}{suffix}"


# -- the command ----------------------------------------------------------------------------------------
def render_plan(plan: FetchPlan) -> None:
    """The plan as a table in a terminal; outside one (a pipe, a CI log) one line per file, and no line is ever
    wrapped, so a file name or a path reads whole (table_or_lines: the rule every command follows)."""
    from rich.filesize import decimal
    from rich.markup import escape

    from itk.console import say, table_or_lines

    say(f"[bold]plan[/] {escape(plan.source)}, from {escape(plan.endpoint)} into {escape(str(plan.weights_dir))}")
    if plan.offline:
        say(f"[yellow]the hub did not answer[/] ({escape(plan.offline)}): sizes are the manifest's approximate"
            " figures; the exact sizes and checksums come from the hub when it is reachable")
    rows = [[escape(i.file.label), decimal(i.size), escape(i.file.revision), escape(i.note)] for i in plan.items]
    table_or_lines(["file", "size", "revision", "state"], rows)
    for i in plan.items:
        if i.file.why:
            say(f"[dim]note:[/] {escape(i.file.label)} comes from {escape(i.file.revision)}: {escape(i.file.why)}")
    say(f"{len(plan.items)} files, {decimal(plan.total_bytes)}; to download {decimal(plan.download_bytes)};"
        f" {decimal(plan.free)} free at {escape(str(plan.where))}")


class LiveProgress:
    """A rich display on stderr: one bar for the total, one per file in flight, with speed and ETA."""

    def __init__(self, plan: FetchPlan):
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        from itk.console import err_console

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                            TimeRemainingColumn(), console=err_console, transient=False)
        self.total = self.bar.add_task("total", total=plan.download_bytes)
        self.tasks: dict[str, Any] = {}
        self.counted: dict[str, int] = {}
        self.lock = threading.Lock()

    def __call__(self, label: str, event: str, n: int) -> None:
        with self.lock:
            if event == "start":
                self.tasks[label] = self.bar.add_task(f"  {label}", total=n)
                self.counted[label] = 0
            elif event == "reset":
                self.bar.advance(self.total, -self.counted.get(label, 0))
                self.bar.reset(self.tasks[label])
                self.counted[label] = 0
            elif event == "bytes":
                self.bar.advance(self.tasks[label], n)
                self.bar.advance(self.total, n)
                self.counted[label] += n
            elif event == "done":
                self.bar.advance(self.total, n - self.counted.pop(label, 0))
                self.bar.remove_task(self.tasks.pop(label))


def run_fetch(preset: str | None, components: tuple[str, ...], all_files: bool, dry_run: bool,
              weights_dir_option: str | None, jobs: int, as_json: bool, variant: str = "single") -> int:
    from rich.markup import escape

    from itk.console import print_json, say
    from itk.runtime.paths import weights_dir as resolve_weights_dir

    weights_dir = resolve_weights_dir(weights_dir_option)
    try:
        files, source = select_files(preset, components, all_files, variant=variant)
        plan = make_plan(files, weights_dir, source)
    except Unreachable as exc:
        if not dry_run:
            raise
        files, source = select_files(preset, components, all_files, offline=True, variant=variant)
        plan = offline_plan(files, weights_dir, source, exc.message)
    if not as_json:
        render_plan(plan)
    if dry_run:
        if as_json:
            print_json(plan.to_json())
        elif plan.need and plan.free < plan.need:
            say(f"[yellow]the disk is short by {plan.need - plan.free:,} bytes (margin included)[/]")
        return 0
    refuse_if_disk_short(plan)
    if as_json or all(i.state == "verified" for i in plan.items):
        execute(plan, jobs, lambda *a: None)
    else:
        live = LiveProgress(plan)
        with live.bar:
            execute(plan, jobs, live)
    if as_json:
        print_json(plan.to_json())
        return 0
    fetched = sum(v == "downloaded" for v in plan.results.values())
    say(f"[green]done:[/] {fetched} files downloaded, {len(plan.results) - fetched} already intact;"
        f" all {len(plan.items)} match the hub's checksums (recorded in {escape(str(weights_dir))}/.itk/verified.json)")
    return 0
