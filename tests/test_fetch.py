"""`itk fetch` end to end: the real huggingface_hub client (in an `itk` subprocess) against the HF-compatible
server in hfserver.py, serving tiny files under the real repo ids, paths and branches."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from hfserver import BIG, ITK, LIGHTX2V, LORAS, W2V, WAN, HubServer, standard_hub
from hubcli import LOCAL_DIRS, hub_bytes, itk_cmd, itk_env, run_itk

PRESET = "rtx4090-24g"
T5 = "quant_models/t5_fp8.safetensors"


@pytest.fixture
def hub():
    hub = standard_hub()
    with HubServer(hub) as server:
        hub.endpoint = server.endpoint
        yield hub


@pytest.fixture
def weights(tmp_path) -> Path:
    return tmp_path / "weights"


def fetch(hub, tmp_path, *args: str, **env: str):
    return run_itk(hub.endpoint, tmp_path / "hf-home", "fetch", *args, **env)


def preset_plan(hub, tmp_path, weights) -> dict:
    proc = fetch(hub, tmp_path, "--preset", PRESET, "--weights-dir", str(weights), "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def downloads(hub) -> list[str]:
    return [e["path"] for e in hub.log if e["method"] == "GET" and e["path"]]


def finished_files(weights: Path) -> list[Path]:
    """Weight files under their final names (hidden folders such as the client's .cache and itk's .itk, lock
    files and the big file left out)."""
    if not weights.exists():
        return []
    return [p for p in weights.rglob("*") if p.is_file() and p.name != Path(BIG).name and p.suffix != ".lock"
            and not any(part.startswith(".") for part in p.relative_to(weights).parts)]


def incomplete_files(weights: Path) -> list[Path]:
    return list(weights.rglob("*.incomplete"))


def test_the_preset_fetch_gets_exactly_its_files_once_and_records_their_verdicts(hub, tmp_path, weights):
    proc = fetch(hub, tmp_path, "--preset", PRESET, "--weights-dir", str(weights))
    assert proc.returncode == 0, proc.stderr
    plan = preset_plan(hub, tmp_path, weights)
    assert len(plan["files"]) == 18 and {f["state"] for f in plan["files"]} == {"verified"}
    for f in plan["files"]:
        branch = "refs/pr/1" if f["revision"] == "refs/pr/1" else "main"
        assert (weights / f["file"]).read_bytes() == hub_bytes(hub, f["repo"], f["path"], branch)
    got = downloads(hub)
    assert sorted(got) == sorted(f["path"] for f in plan["files"])  # each once, nothing else
    assert "pytorch_model.bin" not in got and not any(p.startswith("diffusion_pytorch_model") for p in got)
    record = json.loads((weights / ".itk" / "verified.json").read_text())["files"]
    assert {k: v["verdict"] for k, v in record.items()} == {f["file"]: "ok" for f in plan["files"]}
    assert record[f"InfiniteTalk/{BIG}"]["expected"] == hub.repos[ITK]["main"][BIG].sha256
    assert record["chinese-wav2vec2-base/model.safetensors"]["commit"] == hub.commit(W2V, "refs/pr/1")
    assert not incomplete_files(weights)


def test_a_second_fetch_downloads_nothing(hub, tmp_path, weights):
    assert fetch(hub, tmp_path, "--preset", PRESET, "--weights-dir", str(weights)).returncode == 0
    hub.log.clear()
    proc = fetch(hub, tmp_path, "--preset", PRESET, "--weights-dir", str(weights))
    assert proc.returncode == 0, proc.stderr
    assert downloads(hub) == [] and "0 files downloaded, 18 already intact" in proc.stdout


def test_dry_run_shows_the_plan_with_hub_sizes_and_the_pr_revision_and_downloads_nothing(hub, tmp_path, weights):
    plan = preset_plan(hub, tmp_path, weights)
    sizes = {f["file"]: f["size"] for f in plan["files"]}
    assert sizes["InfiniteTalk/" + BIG] == hub.repos[ITK]["main"][BIG].size
    assert plan["download_bytes"] == sum(sizes.values()) and plan["free_bytes"] > 0
    w2v = next(f for f in plan["files"] if f["file"] == "chinese-wav2vec2-base/model.safetensors")
    assert w2v["revision"] == "refs/pr/1" and w2v["commit"] == hub.commit(W2V, "refs/pr/1")
    assert w2v["sha256"] == hub.repos[W2V]["refs/pr/1"]["model.safetensors"].sha256
    text = fetch(hub, tmp_path, "--preset", PRESET, "--weights-dir", str(weights), "--dry-run").stdout
    assert "model.safetensors comes from refs/pr/1" in text and "pytorch_model.bin" in text
    assert downloads(hub) == [] and not weights.exists()


def test_a_piped_dry_run_prints_one_line_per_file_and_never_wraps_a_name_or_a_path(hub, tmp_path):
    weights = tmp_path / ("a-rather-long-folder-name-for-the-weights-of-this-machine" * 2) / "weights"
    proc = fetch(hub, tmp_path, "--preset", PRESET, "--variant", "multi", "--weights-dir", str(weights), "--dry-run",
                 COLUMNS="80")  # what a pipe gets from a terminal 80 columns wide, as `itk fetch --dry-run | cat`
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    plan = json.loads(fetch(hub, tmp_path, "--preset", PRESET, "--variant", "multi", "--weights-dir", str(weights),
                            "--dry-run", "--json").stdout)
    for f in plan["files"]:
        row = [line for line in lines if line.startswith(f["file"] + " | ")]
        assert len(row) == 1 and f["revision"] in row[0] and "missing" in row[0], (f["file"], lines)
    assert "InfiniteTalk/quant_models/infinitetalk_multi_fp8.safetensors" in proc.stdout
    assert any(str(weights) in line for line in lines if line.startswith("plan "))
    assert any(line.endswith(f" free at {tmp_path}") for line in lines)  # the folder that exists so far


def test_all_reproduces_the_guides_full_download_of_every_repo(hub, tmp_path, weights):
    proc = fetch(hub, tmp_path, "--all", "--weights-dir", str(weights), "--jobs", "8")
    assert proc.returncode == 0, proc.stderr
    for repo_id, local in LOCAL_DIRS.items():
        for path in hub.repos[repo_id]["main"]:
            assert (weights / local / path).read_bytes() == hub_bytes(hub, repo_id, path)
    assert (weights / "chinese-wav2vec2-base/model.safetensors").is_file()
    assert (weights / "Wan2.1-I2V-14B-480P/diffusion_pytorch_model-00007-of-00007.safetensors").is_file()
    # the LoRA collections are never listed nor taken whole (Kijai's holds hundreds of GB)
    assert not [e for e in hub.log if any(repo_id in e["url"] for repo_id in LORAS)]


def test_a_fast_preset_fetch_pulls_its_lora_file_and_nothing_else_of_the_lora_repo(hub, tmp_path, weights):
    proc = fetch(hub, tmp_path, "--preset", "rtx4090-24g-fast", "--weights-dir", str(weights))
    assert proc.returncode == 0, proc.stderr
    lora = LORAS[LIGHTX2V]
    assert (weights / "Wan2.1-Distill-Loras" / lora).read_bytes() == hub_bytes(hub, LIGHTX2V, lora)
    assert downloads(hub).count(lora) == 1 and "other/not_for_itk.safetensors" not in downloads(hub)
    record = json.loads((weights / ".itk" / "verified.json").read_text())["files"]
    assert record[f"Wan2.1-Distill-Loras/{lora}"]["verdict"] == "ok"
    assert BIG in downloads(hub)  # and the rest of the FP8 preset's files with it


def start_slow_fetch(hub, tmp_path, weights) -> subprocess.Popen:
    hub.throttle[BIG] = 150_000  # bytes/s: the 1 MiB file takes ~7 s
    proc = subprocess.Popen(itk_cmd("fetch", "--preset", PRESET, "--weights-dir", str(weights), "--jobs", "2"),
                            env=itk_env(hub.endpoint, tmp_path / "hf-home"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    # Served is not finished: wait until every other file sits complete under its final name.
    while hub.sent.get(BIG, 0) < 200_000 or len(finished_files(weights)) < 17:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr and proc.stderr.read()
        time.sleep(0.05)
    return proc


def test_a_fetch_killed_mid_file_completes_on_rerun_without_refetching_finished_files(hub, tmp_path, weights):
    proc = start_slow_fetch(hub, tmp_path, weights)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert not (weights / "InfiniteTalk" / BIG).exists()  # nothing half-written under the final name
    finished = [p for p in downloads(hub) if p != BIG]
    assert len(finished) == 17
    hub.throttle.clear()
    hub.log.clear()
    rerun = fetch(hub, tmp_path, "--preset", PRESET, "--weights-dir", str(weights))
    assert rerun.returncode == 0, rerun.stderr
    assert downloads(hub) == [BIG], rerun.stdout  # the finished files were not fetched again
    assert (weights / "InfiniteTalk" / BIG).read_bytes() == hub_bytes(hub, ITK, BIG)
    assert not incomplete_files(weights)  # the killed run's partial file was cleared


def test_ctrl_c_stops_cleanly_with_exit_130_and_says_the_rerun_continues(hub, tmp_path, weights):
    proc = start_slow_fetch(hub, tmp_path, weights)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "rerun" in err and "Traceback" not in err
    assert not (weights / "InfiniteTalk" / BIG).exists()


def test_bytes_corrupted_on_the_way_are_caught_and_fetched_again_once(hub, tmp_path, weights):
    hub.corrupt[T5] = 1
    proc = fetch(hub, tmp_path, "--component", "infinitetalk-single-fp8", "--weights-dir", str(weights))
    assert proc.returncode == 0, proc.stderr
    assert downloads(hub).count(T5) == 2
    assert (weights / "InfiniteTalk" / T5).read_bytes() == hub_bytes(hub, ITK, T5)


def test_bytes_corrupted_twice_stop_with_a_clear_error_and_no_file(hub, tmp_path, weights):
    hub.corrupt[T5] = 2
    proc = fetch(hub, tmp_path, "--component", "infinitetalk-single-fp8", "--weights-dir", str(weights))
    assert proc.returncode == 1
    assert "t5_fp8.safetensors is not intact after two downloads" in proc.stderr
    assert "sha256" in proc.stderr and "but the hub says" in proc.stderr
    assert "fix:" in proc.stderr and "Traceback" not in proc.stderr
    assert not (weights / "InfiniteTalk" / T5).exists()


def test_a_gated_repo_without_a_token_says_how_to_log_in_and_works_with_hf_token(hub, tmp_path, weights):
    hub.token = "hf_test_token"
    proc = fetch(hub, tmp_path, "--component", "wav2vec2", "--weights-dir", str(weights))
    assert proc.returncode == 1
    assert "access denied" in proc.stderr and "(401)" in proc.stderr and "hf auth login" in proc.stderr
    ok = fetch(hub, tmp_path, "--component", "wav2vec2", "--weights-dir", str(weights), HF_TOKEN="hf_test_token")
    assert ok.returncode == 0, ok.stderr


def test_a_repo_or_revision_gone_is_a_404_with_its_name(hub, tmp_path, weights):
    del hub.repos[W2V]["refs/pr/1"]
    proc = fetch(hub, tmp_path, "--component", "wav2vec2", "--weights-dir", str(weights))
    assert proc.returncode == 1
    assert f"{W2V}@refs/pr/1: revision not found" in proc.stderr and "(404)" in proc.stderr
    del hub.repos[WAN]
    proc = fetch(hub, tmp_path, "--component", "wan-base-common", "--weights-dir", str(weights))
    assert f"{WAN}@main: repository not found" in proc.stderr and "(404)" in proc.stderr


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed once the block ends: connection refused


def test_a_mirror_in_hf_endpoint_that_cannot_be_reached_is_named_not_suggested_again(tmp_path, weights):
    port = closed_port()
    proc = run_itk(f"http://127.0.0.1:{port}", tmp_path / "hf-home", "fetch", "--component", "wav2vec2",
                   "--weights-dir", str(weights))
    assert proc.returncode == 1
    assert f"cannot reach http://127.0.0.1:{port}" in proc.stderr and "HF_ENDPOINT" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "point HF_ENDPOINT at" not in proc.stderr and "unset HF_ENDPOINT" in proc.stderr


def test_the_offline_fix_suggests_a_mirror_only_when_hf_endpoint_is_not_already_one(monkeypatch):
    from itk.fetch import offline_fix

    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert "point HF_ENDPOINT at a Hugging Face mirror" in offline_fix()
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example")
    assert "point HF_ENDPOINT at" not in offline_fix() and "unset HF_ENDPOINT" in offline_fix()


def test_a_dry_run_without_network_shows_the_plan_from_the_manifests_approximate_sizes(tmp_path, weights):
    from itk.presets import get_preset
    from itk.runtime.manifest import load_manifest

    endpoint = f"http://127.0.0.1:{closed_port()}"
    proc = run_itk(endpoint, tmp_path / "hf-home", "fetch", "--preset", PRESET, "--weights-dir", str(weights),
                   "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "approximate" in proc.stdout and f"cannot reach {endpoint}" in proc.stdout
    wanted = load_manifest().files_for(get_preset(PRESET).components)
    assert all(f.label in proc.stdout for f in wanted) and not weights.exists()
    proc = run_itk(endpoint, tmp_path / "hf-home", "fetch", "--all", "--weights-dir", str(weights), "--dry-run",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["approximate"] is True and plan["files"] and {f["state"] for f in plan["files"]} == {"download"}
    manifest = load_manifest()
    manifest_sizes = {f.label: f.size for f in manifest.files_for(list(manifest.components)) if f.repo.whole}
    assert {f["file"]: f["size"] for f in plan["files"]} == manifest_sizes


def test_a_present_file_of_the_hubs_size_with_other_bytes_is_hashed_and_fetched_again(hub, tmp_path, weights):
    assert fetch(hub, tmp_path, "--preset", PRESET, "--weights-dir", str(weights)).returncode == 0
    path = weights / "InfiniteTalk" / T5
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only a hash can tell
    for keep_verdicts in (False, True):
        path.write_bytes(bytes(data))  # a new mtime: any recorded verdict no longer describes the file
        if not keep_verdicts:
            (weights / ".itk" / "verified.json").unlink()
        plan = preset_plan(hub, tmp_path, weights)
        t5 = next(f for f in plan["files"] if f["file"] == "InfiniteTalk/" + T5)
        assert t5["state"] == "check" and ("changed since it was verified" in t5["note"]) == keep_verdicts
        hub.log.clear()
        proc = fetch(hub, tmp_path, "--preset", PRESET, "--weights-dir", str(weights), "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["results"]["InfiniteTalk/" + T5] == "downloaded"
        assert downloads(hub) == [T5] and path.read_bytes() == hub_bytes(hub, ITK, T5)


def test_a_second_fetch_into_the_same_folder_is_refused_while_the_first_holds_the_lock(hub, tmp_path, weights):
    from filelock import FileLock

    (weights / ".itk").mkdir(parents=True)
    with FileLock(weights / ".itk" / "fetch.lock"):
        proc = fetch(hub, tmp_path, "--component", "wav2vec2", "--weights-dir", str(weights))
    assert proc.returncode == 1 and f"another `itk fetch` is writing to {weights}" in proc.stderr
    assert downloads(hub) == []
    assert fetch(hub, tmp_path, "--component", "wav2vec2", "--weights-dir", str(weights)).returncode == 0


def test_a_disk_too_small_is_refused_before_downloading_with_the_numbers(hub, tmp_path, weights):
    proc = fetch(hub, tmp_path, "--preset", PRESET, "--weights-dir", str(weights), ITK_TEST_FREE_BYTES="5000")
    assert proc.returncode == 1
    assert "not enough disk" in proc.stderr and "5,000 free" in proc.stderr
    assert downloads(hub) == []


def test_a_disk_that_fills_mid_download_says_how_many_bytes_were_needed(hub, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        # The preflight is told there is room, so the real write runs out of it.
        proc = fetch(hub, tmp_path, "--component", "infinitetalk-single-fp8", "--weights-dir", str(small),
                     ITK_TEST_FREE_BYTES=str(10**12))
        assert proc.returncode == 1
        said = re.search(r"disk full while writing InfiniteTalk/(\S+): it needs ([\d,]+) bytes", proc.stderr)
        assert said, proc.stderr
        assert int(said[2].replace(",", "")) == hub.repos[ITK]["main"][said[1]].size
        assert not (small / "InfiniteTalk" / BIG).exists() and not incomplete_files(small)
    finally:
        subprocess.run(["umount", str(small)], check=False)
        os.sync()


def test_present_files_without_a_verdict_are_hashed_and_kept_and_only_a_wrong_one_is_fetched(hub, tmp_path, weights):
    assert fetch(hub, tmp_path, "--preset", PRESET, "--weights-dir", str(weights)).returncode == 0
    (weights / ".itk" / "verified.json").unlink()  # as if the files had been copied here by hand
    with open(weights / "InfiniteTalk" / T5, "r+b") as f:
        f.truncate(100)
    hub.log.clear()
    proc = fetch(hub, tmp_path, "--preset", PRESET, "--weights-dir", str(weights), "--json")
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)["results"]
    assert downloads(hub) == [T5]
    assert results.pop("InfiniteTalk/" + T5) == "downloaded" and set(results.values()) == {"kept"}


def test_a_connection_dropped_mid_file_resumes_with_a_range_request(tmp_path, weights):
    hub = standard_hub(big_floats=6 << 20)  # 24 MiB: the client writes in 10 MiB chunks
    hub.cut_after[BIG] = 15 << 20
    with HubServer(hub) as server:
        hub.endpoint = server.endpoint
        proc = fetch(hub, tmp_path, "--component", "infinitetalk-single-fp8", "--weights-dir", str(weights))
    assert proc.returncode == 0, proc.stderr
    ranges = [e["range"] for e in hub.gets(BIG)]
    assert ranges[0] is None and ranges[1] == f"bytes={10 << 20}-"  # the second GET got a 206
    assert (weights / "InfiniteTalk" / BIG).read_bytes() == hub_bytes(hub, ITK, BIG)
