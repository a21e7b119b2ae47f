"""itk.runtime.verify on real files: the hub's two checksums, the header probes, the verdict record."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from hfserver import tiny_pth, tiny_safetensors

from itk.runtime.manifest import load_manifest
from itk.runtime.protocol import UserError
from itk.runtime.verify import (
    BLOCK,
    Expected,
    Record,
    VerdictStore,
    check_files,
    expected_from_hub_metadata,
    file_digest,
    header_problem,
    length_problem,
    local_path,
    name_problem,
    verify_file,
)


def test_the_small_file_checksum_is_gits_blob_sha1(tmp_path):
    path = tmp_path / "hello.txt"
    path.write_bytes(b"hello\n")
    assert file_digest(path, "sha1") == "ce013625030ba8dba906f756967f9e9ca394464a"  # `git hash-object`


def test_sha256_over_several_blocks_equals_hashlib(tmp_path):
    path = tmp_path / "big.bin"
    data = os.urandom(BLOCK + 12345)
    path.write_bytes(data)
    assert file_digest(path, "sha256") == hashlib.sha256(data).hexdigest()


def test_header_probes_accept_good_files_and_name_the_damage(tmp_path):
    st, pth = tmp_path / "a.safetensors", tmp_path / "b.pth"
    st.write_bytes(tiny_safetensors(64, 1))
    pth.write_bytes(tiny_pth(1))
    assert header_problem(st) is None and header_problem(pth) is None
    st.write_bytes(tiny_safetensors(64, 1)[:-10])
    assert "truncated" in header_problem(st)
    st.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    assert "header longer than the file" in header_problem(st)
    pth.write_bytes(tiny_pth(1)[:-30])
    assert "not a readable zip archive" in header_problem(pth)


def test_verify_file_judges_size_then_header_then_hash(tmp_path):
    path = tmp_path / "m.safetensors"
    data = tiny_safetensors(64, 2)
    path.write_bytes(data)
    good = Expected(size=len(data), sha256=hashlib.sha256(data).hexdigest(), revision="main", commit="c" * 40)
    status, record = verify_file(path, good)
    assert status.state == "ok" and record.verdict == "ok" and record.commit == "c" * 40
    assert verify_file(path, Expected(size=len(data) + 1, sha256=good.sha256))[0].state == "truncated"
    status, record = verify_file(path, Expected(size=len(data), sha256="0" * 64))
    assert status.state == "corrupt" and record.verdict == "corrupt"


def test_a_verdict_is_trusted_only_while_size_and_mtime_are_unchanged(tmp_path):
    path = tmp_path / "f.json"
    path.write_bytes(b"{}")
    sha1 = file_digest(path, "sha1")
    _, record = verify_file(path, Expected(size=2, sha1=sha1))
    VerdictStore(tmp_path).put("f.json", record)
    store = VerdictStore(tmp_path)  # read back from disk
    assert store.trusted("f.json", path, Expected(sha1=sha1))
    assert not store.trusted("f.json", path, Expected(sha1="1" * 40))  # the hub moved on
    os.utime(path, ns=(0, 0))
    assert not store.trusted("f.json", path)
    assert json.loads((tmp_path / ".itk" / "verified.json").read_text())["files"]["f.json"]["verdict"] == "ok"
    assert sorted(p.name for p in (tmp_path / ".itk").iterdir()) == ["verified.json", "verified.json.lock"]  # no temp


def a_record(n: int) -> Record:
    return Record(size=n, mtime_ns=n, algo="sha1", digest="a" * 40, expected="a" * 40, revision="main",
                  commit="c" * 40, verdict="ok", verified_at=float(n))


def test_a_record_written_by_another_store_survives_this_stores_next_write(tmp_path):
    fetching, doctor = VerdictStore(tmp_path), VerdictStore(tmp_path)  # e.g. the page's doctor beside a fetch
    doctor.put("a", a_record(1))
    fetching.put("b", a_record(2))  # its records were read before "a" was written
    assert set(VerdictStore(tmp_path).records) == {"a", "b"}


RECORDER = """
import sys, threading
from pathlib import Path
from itk.runtime.verify import Record, VerdictStore
folder, proc, threads, each = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
go = threading.Barrier(threads)
def record(t):
    store = VerdictStore(folder)  # each thread its own view, as separate parts of a program would have
    go.wait()
    for n in range(each):
        store.put(f"p{proc}/t{t}/{n}", Record(size=n, mtime_ns=n, algo="sha1", digest="a" * 40, expected="a" * 40,
                                               revision="main", commit="c" * 40, verdict="ok", verified_at=0.0))
workers = [threading.Thread(target=record, args=(t,)) for t in range(threads)]
for w in workers:
    w.start()
for w in workers:
    w.join()
"""


def test_many_threads_in_many_processes_recording_at_once_keep_every_record(tmp_path):
    procs, threads, each = 4, 6, 5
    running = [subprocess.Popen([sys.executable, "-c", RECORDER, str(tmp_path), str(p), str(threads), str(each)])
               for p in range(procs)]
    assert [r.wait(timeout=120) for r in running] == [0] * procs
    records = VerdictStore(tmp_path).records
    assert len(records) == procs * threads * each and {r.verdict for r in records.values()} == {"ok"}


def test_the_hf_clients_metadata_gives_the_expected_checksum(tmp_path):
    meta = tmp_path / ".cache" / "huggingface" / "download" / "quant_models"
    meta.mkdir(parents=True)
    (meta / "x.safetensors.metadata").write_text(f"{'a' * 40}\n{'b' * 64}\n1700000000.0\n")
    (meta / "x.json.metadata").write_text(f"{'a' * 40}\n{'c' * 40}\n1700000000.0\n")
    assert expected_from_hub_metadata(tmp_path, "quant_models/x.safetensors") == Expected(sha256="b" * 64,
                                                                                          commit="a" * 40)
    assert expected_from_hub_metadata(tmp_path, "quant_models/x.json").sha1 == "c" * 40
    assert expected_from_hub_metadata(tmp_path, "quant_models/none.json") is None


def test_a_digest_equal_only_in_its_first_characters_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    data = tiny_safetensors(64, 3)
    path.write_bytes(data)
    real = hashlib.sha256(data).hexdigest()
    for fake in (real[:12] + "0" * 52, real[:63] + ("0" if real[63] != "0" else "1"), real[:12], ""):
        status, record = verify_file(path, Expected(size=len(data), sha256=fake or None, sha1="0" * 40))
        assert status.state == "corrupt" and (record is None or record.verdict == "corrupt"), fake
    status, record = verify_file(path, Expected(size=len(data), sha256=real))
    assert status.state == "ok"
    VerdictStore(tmp_path).put("m", record)
    store = VerdictStore(tmp_path)
    assert store.trusted("m", path, Expected(sha256=real))
    assert not store.trusted("m", path, Expected(sha256=real[:12] + "f" * 52))
    assert not store.trusted("m", path, Expected(sha256=real[:12]))


def test_a_small_files_blob_sha1_is_compared_in_full_too(tmp_path):
    path = tmp_path / "c.json"
    path.write_bytes(b"{}")
    sha1 = file_digest(path, "sha1")
    assert verify_file(path, Expected(size=2, sha1=sha1))[0].state == "ok"
    assert verify_file(path, Expected(size=2, sha1=sha1[:39] + ("0" if sha1[39] != "0" else "1")))[0].state == "corrupt"


@pytest.mark.parametrize("name", ["../../x", "a/../../x", "/etc/passwd", "..\\..\\x", "dir\\x", "C:/x", "c:x",
                                  "a//b", "./a", "a/.", "", "nul\0byte", ".cache/huggingface/download/x.metadata"])
def test_a_name_that_could_leave_its_folder_is_refused_on_its_text(name):
    assert name_problem(name)


@pytest.mark.parametrize("name", ["config.json", "google/umt5-xxl/tokenizer.json", "quant_models/t5_fp8.safetensors",
                                  "..hidden", "a..b/c", ".gitattributes"])
def test_ordinary_repo_names_are_accepted(name):
    assert name_problem(name) is None


def test_a_name_part_over_the_file_systems_limit_is_refused_on_its_text_and_a_long_path_is_not():
    assert length_problem("a" * 246) is None and length_problem("/".join(["a" * 200] * 20)) is None
    assert "247 bytes" in length_problem("dir/" + "a" * 247) and "255" in length_problem("é" * 124)
    with pytest.raises(UserError, match="300 bytes"):
        local_path(Path("w"), manifest_file("quant_models/" + "a" * 300))


def manifest_file(path: str):
    f = next(f for f in load_manifest().files_for(["infinitetalk-single-fp8"]) if f.path.startswith("quant_models/"))
    return replace(f, path=path)


def test_a_local_path_is_refused_through_a_link_out_of_its_folder_but_a_linked_repo_folder_is_the_users_choice(
        tmp_path):
    weights, outside = tmp_path / "weights", tmp_path / "outside"
    outside.mkdir()
    (weights / "InfiniteTalk").mkdir(parents=True)
    (weights / "InfiniteTalk" / "quant_models").symlink_to(outside)
    f = manifest_file("quant_models/t5_fp8.safetensors")
    with pytest.raises(UserError, match="is a symlink leading out of"):
        local_path(weights, f)
    (weights / "InfiniteTalk" / "quant_models").unlink()
    (weights / "InfiniteTalk" / "quant_models").mkdir()
    (weights / "InfiniteTalk" / "quant_models" / "t5_fp8.safetensors").symlink_to(outside / "t5.safetensors")
    with pytest.raises(UserError, match="t5_fp8.safetensors is a symlink leading out of"):
        local_path(weights, f)
    elsewhere = tmp_path / "big-disk" / "InfiniteTalk"
    elsewhere.mkdir(parents=True)
    (weights / "InfiniteTalk").rename(tmp_path / "old")
    (weights / "InfiniteTalk").symlink_to(elsewhere)
    assert local_path(weights, f) == weights / "InfiniteTalk" / "quant_models" / "t5_fp8.safetensors"
    with pytest.raises(UserError, match=r"refusing MeiGen-AI/InfiniteTalk@main: '\.\./x': a '\.\.'"):
        local_path(weights, manifest_file("../x"))


def test_the_verifier_never_reads_a_file_behind_a_link_out_of_the_folder(tmp_path):
    weights, outside = tmp_path / "weights", tmp_path / "outside"
    outside.mkdir()
    (outside / "t5_fp8.safetensors").write_bytes(tiny_safetensors(64, 1))
    (weights / "InfiniteTalk").mkdir(parents=True)
    (weights / "InfiniteTalk" / "quant_models").symlink_to(outside)
    f = manifest_file("quant_models/t5_fp8.safetensors")
    for deep in (False, True):
        [status] = check_files(weights, [f], deep=deep)
        assert status.state == "unsafe" and "symlink leading out of" in status.detail and status.fix
    assert not (weights / ".itk").exists()  # nothing hashed, nothing recorded


def test_a_changed_file_is_changed_a_corrupt_one_corrupt_and_neither_is_missing(tmp_path):
    f = manifest_file("quant_models/t5_map_fp8.json")
    path = f.local_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"{}")
    _, record = verify_file(path, Expected(size=2, sha1=file_digest(path, "sha1")))
    VerdictStore(tmp_path).put(f.label, record)
    [ok] = check_files(tmp_path, [f], deep=False)
    assert ok.state == "ok" and ok.hashed_at == record.verified_at
    os.utime(path, ns=(0, 0))
    [changed] = check_files(tmp_path, [f], deep=False)
    assert changed.state == "changed" and "itk fetch" in changed.fix and "--deep" in changed.fix
    assert changed.hashed_at == record.verified_at
    path.write_bytes(b"[]")  # same size, other bytes: the deep re-hash records it as corrupt
    [corrupt] = check_files(tmp_path, [f], deep=True)
    assert corrupt.state == "corrupt"
    [still] = check_files(tmp_path, [f], deep=False)
    assert still.state == "corrupt" and still.hashed_at >= record.verified_at
