"""An HF-compatible HTTP server on 127.0.0.1 for tests: the REAL huggingface_hub client talks to it through
HF_ENDPOINT, so `itk fetch` is exercised end to end without the network.

It speaks what huggingface_hub 2.x needs: `GET /api/models/{id}/revision/{R}`,
`GET /api/models/{id}/tree/{R}`, `POST /api/models/{id}/paths-info/{R}`, and `HEAD`/`GET /{id}/resolve/{R}/{path}`
with X-Repo-Commit, quoted ETags (git blob sha1 for regular files, sha256 for LFS files, plus X-Linked-Etag /
X-Linked-Size), Range requests answered 206, and X-Error-Code on 401/404. Knobs let a test corrupt one file's
bytes, require a token, throttle a file, or cut a connection mid-file; hostile ones send a file's body longer
than its advertised size, stall a body mid-file (the connection stays open, nothing more comes), or answer a
file with a redirect to itself; every request is logged. `hostile_hub` lists a file under any name, such as
one that would lead outside the weights folder (`../../x`, an absolute path, ...), one over the file system's
name limit, or a file where another listed name needs a folder.

Why the standard library: the kept packages considered were pytest-httpserver (werkzeug underneath; built
around request expectations, not a stateful hub with branches and byte-level knobs), pytest-localserver
(serves one canned answer) and werkzeug itself (would do, but adds a dependency for what ~200 lines of
http.server do, and throttling/cutting a body mid-stream is simpler with the raw socket file).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import struct
import threading
import time
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".pth", ".bin", ".pt", ".model")
CHUNK = 1 << 20


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class HubFile:
    """One file of a branch: bytes in memory, or a path on disk for big files (the benchmark)."""

    content: bytes | Path

    def __post_init__(self) -> None:
        h256 = hashlib.sha256()
        if isinstance(self.content, Path):
            self.size = self.content.stat().st_size
            with open(self.content, "rb") as f:
                while block := f.read(16 << 20):
                    h256.update(block)
            self.blob_sha1 = hashlib.sha1(f"pointer of {self.content.name}".encode()).hexdigest()
        else:
            self.size = len(self.content)
            h256.update(self.content)
            self.blob_sha1 = git_blob_sha1(self.content)
        self.sha256 = h256.hexdigest()

    def read(self, start: int, end: int) -> bytes:
        if isinstance(self.content, Path):
            with open(self.content, "rb") as f:
                f.seek(start)
                return f.read(end - start)
        return self.content[start:end]


@dataclass
class Hub:
    """Repos -> branches -> files, plus the knobs tests turn."""

    repos: dict[str, dict[str, dict[str, HubFile]]] = field(default_factory=dict)
    token: str | None = None  # when set, requests without `Authorization: Bearer <token>` get 401 GatedRepo
    corrupt: dict[str, int] = field(default_factory=dict)  # path -> how many more GETs send a flipped byte
    throttle: dict[str, float] = field(default_factory=dict)  # path -> bytes per second
    cut_after: dict[str, int] = field(default_factory=dict)  # path -> drop the connection after N bytes, once
    longer: dict[str, int] = field(default_factory=dict)  # path -> GET sends this many bytes more than listed
    stall_after: dict[str, int] = field(default_factory=dict)  # path -> after N bytes send nothing, keep it open
    redirect_loop: set[str] = field(default_factory=set)  # paths whose resolve answers 302 to itself
    stopped: threading.Event = field(default_factory=threading.Event)  # set when the server shuts down
    log: list[dict] = field(default_factory=list)
    sent: dict[str, int] = field(default_factory=dict)  # path -> body bytes written so far
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, repo_id: str, branch: str, files: dict[str, bytes | Path]) -> None:
        self.repos.setdefault(repo_id, {})[branch] = {p: HubFile(c) for p, c in files.items()}

    def commit(self, repo_id: str, branch: str) -> str:
        files = self.repos[repo_id][branch]
        seed = repo_id + branch + "".join(f"{p}{f.sha256}" for p, f in sorted(files.items()))
        return hashlib.sha1(seed.encode()).hexdigest()

    def resolve(self, repo_id: str, rev: str) -> str | None:
        """The branch a revision names (a branch name or one of the branches' commits)."""
        branches = self.repos.get(repo_id, {})
        if rev in branches:
            return rev
        return next((b for b in branches if self.commit(repo_id, b) == rev), None)

    def gets(self, path: str) -> list[dict]:
        return [e for e in self.log if e["method"] == "GET" and e["path"] == path]


def tree_entry(path: str, f: HubFile) -> dict:
    entry = {"type": "file", "path": path, "size": f.size, "oid": f.blob_sha1}
    if path.endswith(LFS_SUFFIXES):
        entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
    return entry


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: Hub  # set on the subclass made per server

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet: tests read hub.log instead
        pass

    # -- plumbing ---------------------------------------------------------------------------------------
    def send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def error(self, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self.send(status, body, {"X-Error-Code": code, "X-Error-Message": message,
                                 "Content-Type": "application/json"})

    def json(self, data, headers: dict[str, str] | None = None) -> None:
        self.send(200, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

    def authorised(self) -> bool:
        if self.hub.token is None or self.headers.get("Authorization") == f"Bearer {self.hub.token}":
            return True
        self.error(401, "GatedRepo", "Access to this model is restricted. You must be authenticated to access it.")
        return False

    def repo_and_branch(self, owner: str, name: str, raw_rev: str) -> tuple[str, str] | None:
        repo_id, rev = f"{owner}/{name}", unquote(raw_rev)
        if repo_id not in self.hub.repos:
            self.error(404, "RepoNotFound", f"Repository not found: {repo_id}")
            return None
        branch = self.hub.resolve(repo_id, rev)
        if branch is None:
            self.error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return repo_id, branch

    # -- routes -----------------------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self.route()

    def do_GET(self) -> None:
        self.route()

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        self.route()

    def route(self) -> None:
        url = urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        # This request's own entry: with parallel downloads, log[-1] may belong to another thread.
        self.entry = {"method": self.command, "url": url.path, "path": None, "range": self.headers.get("Range")}
        with self.hub.lock:
            self.hub.log.append(self.entry)
        if not self.authorised():
            return
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            owner, name, kind, raw_rev, rest = parts[2], parts[3], parts[4], parts[5], parts[6:]
            found = self.repo_and_branch(owner, name, raw_rev)
            if found is None:
                return
            repo_id, branch = found
            files = self.hub.repos[repo_id][branch]
            commit = self.hub.commit(repo_id, branch)
            if kind == "revision" and self.command == "GET":
                return self.json({"id": repo_id, "sha": commit, "private": False,
                                  "siblings": [{"rfilename": p} for p in files]})
            if kind == "tree" and self.command == "GET":
                prefix = "/".join(unquote(p) for p in rest)
                entries = [tree_entry(p, f) for p, f in files.items() if p.startswith(prefix)]
                return self.json(entries)
            if kind == "paths-info" and self.command == "POST":
                wanted = parse_qs(self.body.decode()).get("paths", [])
                return self.json([tree_entry(p, files[p]) for p in wanted if p in files])
        if len(parts) >= 5 and parts[2] == "resolve" and self.command in ("HEAD", "GET"):
            found = self.repo_and_branch(parts[0], parts[1], parts[3])
            if found is None:
                return
            return self.resolve_file(*found, "/".join(unquote(p) for p in parts[4:]))
        self.error(404, "EntryNotFound", f"no route for {url.path}")

    def resolve_file(self, repo_id: str, branch: str, path: str) -> None:
        files = self.hub.repos[repo_id][branch]
        if path not in files:
            return self.error(404, "EntryNotFound", f"{path} does not exist on {branch}")
        with self.hub.lock:
            self.entry["path"] = path
        if path in self.hub.redirect_loop:
            return self.send(302, headers={"Location": self.path, "X-Repo-Commit": self.hub.commit(repo_id, branch)})
        f = files[path]
        extra = self.hub.longer.get(path, 0) if self.command == "GET" else 0
        headers = {"X-Repo-Commit": self.hub.commit(repo_id, branch), "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if path.endswith(LFS_SUFFIXES):
            headers |= {"ETag": f'"{f.sha256}"', "X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)}
        else:
            headers["ETag"] = f'"{f.blob_sha1}"'
        start, end, status = 0, f.size + extra, 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            first, _, last = rng[6:].partition("-")
            start, end, status = int(first), (int(last) + 1 if last else f.size + extra), 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{f.size + extra}"
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        if self.command == "HEAD":
            return
        self.stream(path, f, start, end)

    def stream(self, path: str, f: HubFile, start: int, end: int) -> None:
        hub = self.hub
        with hub.lock:
            corrupt = hub.corrupt.get(path, 0) > 0
            if corrupt:
                hub.corrupt[path] -= 1
            cut = hub.cut_after.pop(path, None)
            stall = hub.stall_after.get(path)
        if stall is not None and start >= stall:  # a resumed request stalls at once, before any byte
            hub.stopped.wait()
            self.close_connection = True
            return
        if isinstance(f.content, Path) and not corrupt and cut is None and stall is None and path not in hub.throttle:
            self.wfile.flush()
            with open(f.content, "rb") as fh:  # big files on disk (the benchmark): the kernel copies them
                self.connection.sendfile(fh, start, end - start)
            with hub.lock:
                hub.sent[path] = hub.sent.get(path, 0) + end - start
            return
        flip_at = f.size // 2
        pos = start
        while pos < end:
            rate = hub.throttle.get(path)
            step = min(end - pos, CHUNK if rate is None else max(1024, int(rate / 20)))
            if cut is not None and pos + step > cut:
                step = max(0, cut - pos)
            if stall is not None and pos + step > stall:
                step = max(0, stall - pos)
            chunk = bytearray(f.read(pos, min(pos + step, f.size)) + b"\0" * max(0, pos + step - f.size))
            if corrupt and pos <= flip_at < pos + step:
                chunk[flip_at - pos] ^= 0xFF
            try:
                self.wfile.write(chunk)
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
                return
            pos += step
            with hub.lock:
                hub.sent[path] = hub.sent.get(path, 0) + step
            if cut is not None and pos >= cut:
                self.close_connection = True
                return
            if stall is not None and pos >= stall:
                hub.stopped.wait()  # the headers promised more; nothing comes until the server shuts down
                self.close_connection = True
                return
            if rate is not None:
                time.sleep(step / rate)


class HubServer:
    """`with HubServer(hub) as server:` -> server.endpoint ('http://127.0.0.1:PORT'), served from a thread."""

    def __init__(self, hub: Hub):
        handler = type("BoundHandler", (Handler,), {"hub": hub})
        self.hub = hub
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.hub.stopped.set()
        self.httpd.shutdown()
        self.httpd.server_close()


# -- tiny files under the real names --------------------------------------------------------------------
def tiny_safetensors(n_floats: int, seed: int) -> bytes:
    """A valid safetensors file: 8-byte little-endian header length, JSON header, then the data."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [n_floats], "data_offsets": [0, 4 * n_floats]}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + random.Random(seed).randbytes(4 * n_floats)


def tiny_lora(rank: int, seed: int, dim: int = 8) -> bytes:
    """A safetensors file shaped like a LoRA (official/Kijai keys: lora_down [rank, dim], lora_up [dim, rank])."""
    names = {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": [rank, dim],
             "diffusion_model.blocks.0.self_attn.q.lora_up.weight": [dim, rank]}
    header, offset = {}, 0
    for name, shape in names.items():
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + 4 * rank * dim]}
        offset += 4 * rank * dim
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + random.Random(seed).randbytes(offset)


def tiny_pth(seed: int, n: int = 2048) -> bytes:
    """A zip archive shaped like torch.save's (archive/data.pkl + archive/data/0)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        z.writestr("archive/data/0", random.Random(seed).randbytes(n))
    return buf.getvalue()


def text(s: str) -> bytes:
    return s.encode()


WAN = "Wan-AI/Wan2.1-I2V-14B-480P"
W2V = "TencentGameMate/chinese-wav2vec2-base"
ITK = "MeiGen-AI/InfiniteTalk"
BIG = "quant_models/infinitetalk_single_fp8.safetensors"
# The LoRA collections: itk takes only the manifest's file from each (never the whole repo).
KIJAI = "Kijai/WanVideo_comfy"
LIGHTX2V = "lightx2v/Wan2.1-Distill-Loras"
FUSIONX = "vrgamedevgirl84/Wan14BT2VFusioniX"
LORAS = {KIJAI: "Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors",
         LIGHTX2V: "wan2.1_i2v_lora_rank64_lightx2v_4step.safetensors",
         FUSIONX: "FusionX_LoRa/Wan2.1_I2V_14B_FusionX_LoRA.safetensors"}


def standard_hub(big_floats: int = 1 << 18) -> Hub:
    """The three repos and the three LoRA collections with the real ids, paths and branches, tiny contents (BIG
    is 1 MiB by default)."""
    hub = Hub()
    wan: dict[str, bytes | Path] = {
        ".gitattributes": text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n"),
        "README.md": text("# Wan2.1 I2V 14B 480P (test hub)\n"),
        "config.json": text(json.dumps({"_class_name": "WanModel", "dim": 5120})),
        "Wan2.1_VAE.pth": tiny_pth(1),
        "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth": tiny_pth(2),
        "models_t5_umt5-xxl-enc-bf16.pth": tiny_pth(3),
        "diffusion_pytorch_model.safetensors.index.json": text('{"weight_map": {}}'),
    }
    for i in range(1, 8):
        wan[f"diffusion_pytorch_model-0000{i}-of-00007.safetensors"] = tiny_safetensors(256, 10 + i)
    for tok in ("google/umt5-xxl/special_tokens_map.json", "google/umt5-xxl/tokenizer.json",
                "google/umt5-xxl/tokenizer_config.json", "xlm-roberta-large/special_tokens_map.json",
                "xlm-roberta-large/tokenizer.json", "xlm-roberta-large/tokenizer_config.json"):
        wan[tok] = text(json.dumps({"name": tok}))
    wan["google/umt5-xxl/spiece.model"] = random.Random(4).randbytes(3000)
    wan["xlm-roberta-large/sentencepiece.bpe.model"] = random.Random(5).randbytes(3000)
    hub.add(WAN, "main", wan)

    w2v_main: dict[str, bytes | Path] = {
        "config.json": text(json.dumps({"model_type": "wav2vec2", "hidden_size": 768})),
        "preprocessor_config.json": text(json.dumps({"sampling_rate": 16000})),
        "pytorch_model.bin": tiny_pth(6),
        "chinese-wav2vec2-base-fairseq-ckpt.pt": tiny_pth(7),
    }
    hub.add(W2V, "main", w2v_main)
    hub.add(W2V, "refs/pr/1", {**w2v_main, "model.safetensors": tiny_safetensors(512, 8)})

    hub.add(ITK, "main", {
        "README.md": text("# InfiniteTalk (test hub)\n"),
        "single/infinitetalk.safetensors": tiny_safetensors(512, 20),
        "multi/infinitetalk.safetensors": tiny_safetensors(512, 21),
        BIG: tiny_safetensors(big_floats, 22),
        "quant_models/infinitetalk_single_fp8.json": text(json.dumps({"blocks.0.q": "fp8"})),
        "quant_models/t5_fp8.safetensors": tiny_safetensors(1024, 23),
        "quant_models/t5_map_fp8.json": text(json.dumps({"t5.q": "fp8"})),
        "quant_models/infinitetalk_multi_fp8.safetensors": tiny_safetensors(1024, 24),
        "quant_models/infinitetalk_multi_fp8.json": text(json.dumps({"blocks.0.q": "fp8"})),
    })
    for i, (repo_id, path) in enumerate(LORAS.items()):
        hub.add(repo_id, "main", {"README.md": text(f"# {repo_id} (test hub)\n"), path: tiny_lora(4 + 4 * i, 30 + i),
                                  "other/not_for_itk.safetensors": tiny_safetensors(64, 40 + i)})
    return hub


def hostile_hub(name: str, content: bytes) -> Hub:
    """The standard hub whose InfiniteTalk repo also lists a file under `name`, a name a hostile hub or mirror
    might send: `../../x`, an absolute path, a backslash or drive letter, or a path through a local symlink.
    The name is listed by the tree and paths-info routes like any other file."""
    hub = standard_hub()
    hub.repos[ITK]["main"][name] = HubFile(content)
    return hub
