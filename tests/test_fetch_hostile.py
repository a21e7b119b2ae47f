"""A hostile hub (or mirror) cannot touch anything outside the weights folder: `itk fetch --all` with the real
huggingface_hub client against hfserver's hostile mode refuses a bad file name in one line, before any
filesystem call, and a sentinel file outside the folder survives each kind of bad name untouched. The other
hostile leftovers (a file where a folder must be, a name over the file system's limit, a redirect loop, a body
longer than advertised, a body that stalls) end in one line naming the file, with a fix that fits."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hfserver import BIG, ITK, HubServer, hostile_hub, standard_hub
from hubcli import run_itk

SENTINEL = b"precious bytes that live outside the weights folder\n"
HUB_BYTES = b"x" * len(SENTINEL)  # the hub's size: today's fetch would hash the sentinel before replacing it


def bad_names(tmp_path: Path, weights: Path) -> dict[str, tuple[str, Path]]:
    """kind -> (the name the hub lists, the sentinel it aims at)."""
    return {
        "dotdot": ("../../sentinel", tmp_path / "sentinel"),  # weights/InfiniteTalk/../../sentinel
        "absolute": (str(tmp_path / "sentinel"), tmp_path / "sentinel"),
        "backslash": ("..\\..\\sentinel", tmp_path / "sentinel"),
        "drive": ("C:/sentinel", tmp_path / "sentinel"),
        "symlink": ("linked/sentinel", tmp_path / "outside" / "sentinel"),  # weights/InfiniteTalk/linked -> outside
    }


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "backslash", "drive", "symlink"])
def test_a_bad_file_name_from_the_hub_is_refused_and_nothing_outside_the_folder_is_touched(tmp_path, kind):
    weights = tmp_path / "weights"
    name, sentinel = bad_names(tmp_path, weights)[kind]
    sentinel.parent.mkdir(parents=True, exist_ok=True)
    sentinel.write_bytes(SENTINEL)
    if kind == "symlink":
        (weights / "InfiniteTalk").mkdir(parents=True)
        (weights / "InfiniteTalk" / "linked").symlink_to(sentinel.parent)
    before = sentinel.stat()
    hub = hostile_hub(name, HUB_BYTES)
    with HubServer(hub) as server:
        proc = run_itk(server.endpoint, tmp_path / "hf-home", "fetch", "--all", "--weights-dir", str(weights))
    assert proc.returncode == 1, proc.stderr
    assert f"refusing {ITK}@main: {name!r}" in proc.stderr and "fix:" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 2
    assert sentinel.read_bytes() == SENTINEL and sentinel.stat().st_mtime_ns == before.st_mtime_ns
    assert not any(e["path"] for e in hub.log)  # no file was downloaded: refused while planning
    made = sorted(p.relative_to(weights) for p in weights.rglob("*")) if weights.exists() else []
    assert made == ([Path("InfiniteTalk"), Path("InfiniteTalk/linked")] if kind == "symlink" else [])


def test_a_preset_fetch_refuses_a_manifest_file_behind_a_link_out_of_the_folder(tmp_path):
    weights = tmp_path / "weights"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "t5_fp8.safetensors").write_bytes(SENTINEL)
    (weights / "InfiniteTalk").mkdir(parents=True)
    (weights / "InfiniteTalk" / "quant_models").symlink_to(outside)
    hub = hostile_hub("unused", b"")
    with HubServer(hub) as server:
        proc = run_itk(server.endpoint, tmp_path / "hf-home", "fetch", "--component", "infinitetalk-single-fp8",
                       "--weights-dir", str(weights))
    assert proc.returncode == 1
    assert "is a symlink leading out of" in proc.stderr and "quant_models" in proc.stderr
    assert (outside / "t5_fp8.safetensors").read_bytes() == SENTINEL and sorted(outside.iterdir()) == [
        outside / "t5_fp8.safetensors"]


# -- hostile names, loops and bodies: each ends in one line naming the file, with a fix that fits ----------
def fetch_from(hub, tmp_path: Path, *args: str, **env: str):
    weights = tmp_path / "weights"
    with HubServer(hub) as server:
        proc = run_itk(server.endpoint, tmp_path / "hf-home", "fetch", *args, "--weights-dir", str(weights), **env)
    return proc, weights


def error_and_fix(proc) -> tuple[str, str]:
    """The last two lines of stderr (the progress display, if any, comes before them), checked for shape."""
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and sum(line.startswith("error:") for line in lines) == 1, proc.stderr
    assert lines[-2].startswith("error: ") and lines[-1].startswith("fix: "), proc.stderr
    return lines[-2], lines[-1]


def test_a_name_listed_both_as_a_file_and_as_a_folder_is_refused_naming_both_before_any_download(tmp_path):
    hub = hostile_hub("single", HUB_BYTES)  # beside the real single/infinitetalk.safetensors
    proc, weights = fetch_from(hub, tmp_path, "--all")
    assert proc.returncode == 1
    error, fix = error_and_fix(proc)
    assert f"refusing {ITK}@main: 'single'" in error and "single/infinitetalk.safetensors" in error
    assert "report it" in fix and "--preset" in fix
    assert not any(e["path"] for e in hub.log)


def test_a_folder_on_disk_where_the_hub_has_a_file_is_named_with_the_way_out(tmp_path):
    in_the_way = tmp_path / "weights" / "InfiniteTalk" / "quant_models" / "t5_fp8.safetensors"
    in_the_way.mkdir(parents=True)
    proc, _ = fetch_from(standard_hub(), tmp_path, "--component", "infinitetalk-single-fp8")
    assert proc.returncode == 1
    error, fix = error_and_fix(proc)
    assert "InfiniteTalk/quant_models/t5_fp8.safetensors" in error and "folder" in error
    assert str(in_the_way) in fix and in_the_way.is_dir()


def test_a_file_on_disk_where_the_hub_needs_a_folder_is_named_with_the_way_out(tmp_path):
    in_the_way = tmp_path / "weights" / "InfiniteTalk" / "quant_models"
    in_the_way.parent.mkdir(parents=True)
    in_the_way.write_bytes(SENTINEL)
    proc, _ = fetch_from(standard_hub(), tmp_path, "--component", "infinitetalk-single-fp8")
    assert proc.returncode == 1
    error, fix = error_and_fix(proc)
    assert "InfiniteTalk/quant_models/" in error and f"{in_the_way} is a file" in error
    assert str(in_the_way) in fix and in_the_way.read_bytes() == SENTINEL


def test_a_name_longer_than_a_file_system_allows_is_refused_on_its_text(tmp_path):
    name = "a" * 300 + ".safetensors"
    hub = hostile_hub(name, HUB_BYTES)
    proc, _ = fetch_from(hub, tmp_path, "--all")
    assert proc.returncode == 1
    error, fix = error_and_fix(proc)
    assert f"refusing {ITK}@main: {name!r}" in error and "312 bytes" in error and "255" in error
    assert "report it" in fix
    assert not any(e["path"] for e in hub.log)


def test_a_redirect_loop_is_named_as_the_servers_fault_with_the_file(tmp_path):
    hub = standard_hub()
    hub.redirect_loop.add(BIG)
    proc, _ = fetch_from(hub, tmp_path, "--component", "infinitetalk-single-fp8")
    assert proc.returncode == 1
    error, fix = error_and_fix(proc)
    assert f"InfiniteTalk/{BIG}" in error and "redirect" in error and "loop" in error
    assert "HF_ENDPOINT" in fix and "network" not in fix


def test_a_body_longer_than_the_hub_advertised_is_the_servers_fault_not_the_network(tmp_path):
    hub = standard_hub()
    hub.longer[BIG] = 100
    proc, weights = fetch_from(hub, tmp_path, "--component", "infinitetalk-single-fp8")
    assert proc.returncode == 1
    error, fix = error_and_fix(proc)
    size = hub.repos[ITK]["main"][BIG].size
    assert f"InfiniteTalk/{BIG}" in error and f"{size + 100:,} bytes" in error and f"{size:,}" in error
    assert "cannot reach" not in error and "damaged" in fix or "more bytes" in fix
    assert len(hub.gets(BIG)) <= 2  # refused, not retried as if the network had dropped it
    assert not (weights / "InfiniteTalk" / BIG).exists()


def test_a_stalled_body_fails_after_the_stated_read_timeout_naming_the_file(tmp_path):
    hub = standard_hub()
    hub.stall_after[BIG] = 4096
    started = time.monotonic()
    proc, _ = fetch_from(hub, tmp_path, "--component", "infinitetalk-single-fp8", HF_HUB_DOWNLOAD_TIMEOUT="1")
    took = time.monotonic() - started
    assert proc.returncode == 1
    error, fix = error_and_fix(proc)
    assert f"InfiniteTalk/{BIG}" in error and "no data for 1 s" in error and "stopped sending" in error
    assert "HF_HUB_DOWNLOAD_TIMEOUT" in fix and "Trying to resume" not in proc.stderr
    assert took < 20, took  # the client's own resumes only (a read timeout, 6 times), not 4 rounds of them


def test_a_slow_but_moving_download_outlives_the_read_timeout(tmp_path):
    hub = standard_hub()
    hub.throttle[BIG] = 256 << 10  # 1 MiB at 256 KiB/s: ~4 s in all, a few KiB every 50 ms
    proc, weights = fetch_from(hub, tmp_path, "--component", "infinitetalk-single-fp8", HF_HUB_DOWNLOAD_TIMEOUT="1")
    assert proc.returncode == 0, proc.stderr
    assert (weights / "InfiniteTalk" / BIG).stat().st_size == hub.repos[ITK]["main"][BIG].size
