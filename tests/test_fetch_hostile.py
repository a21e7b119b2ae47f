"""A hostile hub (or mirror) cannot touch anything outside the weights folder: `itk fetch --all` with the real
huggingface_hub client against hfserver's hostile mode refuses a bad file name in one line, before any
filesystem call, and a sentinel file outside the folder survives each kind of bad name untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
from hfserver import ITK, HubServer, hostile_hub
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
