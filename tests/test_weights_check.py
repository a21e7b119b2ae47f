"""The doctor's weights check (`itk doctor --only weights`) on trees that `itk fetch` or `hf download` made
from the test hub, then damaged the ways downloads really go wrong."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hfserver import BIG, HubServer, standard_hub
from hubcli import doctor_weights, itk_env, run_itk

from itk.presets import get_preset
from itk.runtime.manifest import load_manifest

PRESET = "rtx4090-24g"
T5 = "InfiniteTalk/quant_models/t5_fp8.safetensors"
W2V_ST = "chinese-wav2vec2-base/model.safetensors"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One hub and one fetched tree for the module; each test damages its own copy."""
    hub = standard_hub(big_floats=1 << 14)
    base = tmp_path_factory.mktemp("fetched")
    with HubServer(hub) as server:
        proc = run_itk(server.endpoint, base / "hf-home", "fetch", "--preset", PRESET,
                       "--weights-dir", str(base / "weights"), "--json")
        assert proc.returncode == 0, proc.stderr
        yield server.endpoint, base / "weights", json.loads(proc.stdout), hub


@pytest.fixture
def tree(served, tmp_path) -> Path:
    weights = tmp_path / "weights"
    shutil.copytree(served[1], weights)  # copy2 keeps mtimes, so the recorded verdicts still describe the files
    return weights


def weights_check(served, tmp_path, weights, *flags):
    return doctor_weights(served[0], tmp_path / "hf-home", weights, PRESET, *flags)


def states(result) -> dict[str, str]:
    return {f["file"]: f["state"] for f in result["facts"]["files"]}


def flip_byte(path: Path, keep_mtime: bool) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_the_weights_check_agrees_with_fetch_on_every_file(served, tmp_path, tree):
    fetched = served[2]["results"]
    assert len(fetched) == 18 and set(fetched.values()) == {"downloaded"}
    for flags in ((), ("--deep",)):
        result = weights_check(served, tmp_path, tree, *flags)
        assert result["status"] == "ok", result
        assert states(result) == dict.fromkeys(fetched, "ok")


def test_a_truncated_file_is_reported_with_its_size(served, tmp_path, tree):
    path = tree / "InfiniteTalk" / BIG
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    result = weights_check(served, tmp_path, tree)
    assert result["status"] == "fail" and "1 truncated" in result["summary"]
    assert states(result)["InfiniteTalk/" + BIG] == "truncated"
    assert any(f"{size // 2} bytes, {size} when verified" in d for d in result["details"])
    assert result["fix"].startswith("itk fetch --preset " + PRESET)


def test_a_flipped_byte_is_caught_by_deep(served, tmp_path, tree):
    flip_byte(tree / T5, keep_mtime=True)  # same size and mtime: only hashing can tell
    assert weights_check(served, tmp_path, tree)["status"] == "ok"
    result = weights_check(served, tmp_path, tree, "--deep")
    assert result["status"] == "fail" and states(result)[T5] == "corrupt"
    assert "1 corrupt" in result["summary"]
    after = weights_check(served, tmp_path, tree)  # the deep verdict is recorded
    assert after["status"] == "fail" and states(after)[T5] == "corrupt"


def test_a_file_changed_since_its_verdict_is_unusable_until_re_hashed(served, tmp_path, tree):
    # Issue 18 item 5: a changed file used to be a warn (not_verified); `itk run` must refuse it, so it fails.
    flip_byte(tree / T5, keep_mtime=False)
    result = weights_check(served, tmp_path, tree)
    assert result["status"] == "fail" and states(result)[T5] == "changed"
    assert "1 changed" in result["summary"]
    assert any("changed since it was verified" in d for d in result["details"])
    assert "--deep" in result["fix"] and result["fix"].startswith("itk fetch --preset " + PRESET)
    deep = weights_check(served, tmp_path, tree, "--deep")  # re-hashing settles it: the bytes differ
    assert deep["status"] == "fail" and states(deep)[T5] == "corrupt"


def test_the_same_bytes_with_a_new_mtime_are_ok_again_after_deep(served, tmp_path, tree):
    os.utime(tree / T5, ns=(0, 0))
    assert states(weights_check(served, tmp_path, tree))[T5] == "changed"
    assert weights_check(served, tmp_path, tree, "--deep")["status"] == "ok"
    assert weights_check(served, tmp_path, tree)["status"] == "ok"


def test_each_file_says_when_it_was_last_hashed(served, tmp_path, tree):
    ok = weights_check(served, tmp_path, tree)
    assert all(f["hashed_at"] for f in ok["facts"]["files"])
    assert len(ok["details"]) == 18 and all(re.search(r"last hashed \d{4}-\d\d-\d\d \d\d:\d\d$", d)
                                            for d in ok["details"])
    shutil.rmtree(tree / ".itk")
    never = weights_check(served, tmp_path, tree)
    assert all(f["hashed_at"] is None for f in never["facts"]["files"])
    assert all(d.endswith("last hashed never") for d in never["details"])


def test_a_missing_model_safetensors_is_reported(served, tmp_path, tree):
    (tree / W2V_ST).unlink()
    result = weights_check(served, tmp_path, tree)
    assert result["status"] == "fail" and states(result)[W2V_ST] == "missing"
    assert "1 missing" in result["summary"]


def test_a_corrupt_safetensors_header_is_reported(served, tmp_path, tree):
    path = tree / "InfiniteTalk" / BIG
    data = bytearray(path.read_bytes())
    data[8:16] = b"\xff" * 8  # the JSON header now starts with garbage
    path.write_bytes(bytes(data))
    result = weights_check(served, tmp_path, tree)
    assert result["status"] == "fail" and states(result)["InfiniteTalk/" + BIG] == "bad_header"


def test_a_truncated_pth_archive_is_reported(served, tmp_path, tree):
    path = tree / "Wan2.1-I2V-14B-480P" / "Wan2.1_VAE.pth"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])  # the zip's central directory is at the end
    shutil.rmtree(tree / ".itk")  # no recorded size to compare with: only the probe can tell
    result = weights_check(served, tmp_path, tree)
    assert states(result)["Wan2.1-I2V-14B-480P/Wan2.1_VAE.pth"] == "bad_header"


def test_a_tree_downloaded_by_hand_with_hf_download_is_verified_by_deep(served, tmp_path):
    endpoint = served[0]
    weights = tmp_path / "by-hand"
    env = itk_env(endpoint, tmp_path / "hf-home")
    groups: dict[tuple[str, str, str], list[str]] = {}
    for f in load_manifest().files_for(get_preset(PRESET).components):
        groups.setdefault((f.repo.id, f.revision, f.repo.local_dir), []).append(f.path)
    hf = str(Path(sys.executable).with_name("hf"))
    for (repo, rev, local), files in groups.items():  # the guide's way, one `hf download` per repo and revision
        subprocess.run([hf, "download", repo, *files, "--revision", rev, "--local-dir", str(weights / local)],
                       env=env, check=True, capture_output=True)
    first = weights_check(served, tmp_path, weights)
    assert first["status"] == "warn" and set(states(first).values()) == {"not_verified"}
    deep = weights_check(served, tmp_path, weights, "--deep")
    assert deep["status"] == "ok", deep
    assert weights_check(served, tmp_path, weights)["status"] == "ok"  # recorded by the deep run
