"""itk.verify on real files: the hub's two checksums, the header probes, the verdict record."""

from __future__ import annotations

import hashlib
import json
import os
import struct

from hfserver import tiny_pth, tiny_safetensors

from itk.verify import (
    BLOCK,
    Expected,
    VerdictStore,
    expected_from_hub_metadata,
    file_digest,
    header_problem,
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
    assert [p.name for p in (tmp_path / ".itk").iterdir()] == ["verified.json"]  # no temp file left


def test_the_hf_clients_metadata_gives_the_expected_checksum(tmp_path):
    meta = tmp_path / ".cache" / "huggingface" / "download" / "quant_models"
    meta.mkdir(parents=True)
    (meta / "x.safetensors.metadata").write_text(f"{'a' * 40}\n{'b' * 64}\n1700000000.0\n")
    (meta / "x.json.metadata").write_text(f"{'a' * 40}\n{'c' * 40}\n1700000000.0\n")
    assert expected_from_hub_metadata(tmp_path, "quant_models/x.safetensors") == Expected(sha256="b" * 64,
                                                                                          commit="a" * 40)
    assert expected_from_hub_metadata(tmp_path, "quant_models/x.json").sha1 == "c" * 40
    assert expected_from_hub_metadata(tmp_path, "quant_models/none.json") is None
