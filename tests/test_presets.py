"""Which preset a machine gets, and the generator paths a preset resolves to."""

from __future__ import annotations

from pathlib import Path

import pytest

from itk.machine import MachineFacts
from itk.presets import choose_preset, get_preset, listing

RTX4090_64G = MachineFacts(vram_gb=24564 / 1024, compute_capability=8.9, usable_ram_gb=62.7)
H100_80G = MachineFacts(vram_gb=81559 / 1024, compute_capability=9.0, usable_ram_gb=251.0)
RTX3060_12G = MachineFacts(vram_gb=12.0, compute_capability=8.6, usable_ram_gb=32.0)
CPU_ONLY = MachineFacts(vram_gb=None, compute_capability=None, usable_ram_gb=24.0)


def test_a_24_gb_4090_with_64_gb_ram_gets_the_tested_fp8_low_vram_preset():
    preset, why = choose_preset(RTX4090_64G)
    assert preset.name == "rtx4090-24g" and preset.status == "tested"
    assert preset.generator["quant"] == "fp8" and preset.generator["num_persistent_param_in_dit"] == 0
    assert "meets its requirements" in why


def test_an_80_gb_h100_gets_the_everything_resident_480p_preset_marked_derived():
    preset, why = choose_preset(H100_80G)
    assert preset.name == "gpu80g-480p" and preset.status == "derived"
    assert "num_persistent_param_in_dit" not in preset.generator
    assert "not yet tested" in preset.provenance


def test_an_80_gb_card_with_48_gb_ram_falls_to_the_fp8_720p_preset_that_fits_its_ram():
    preset, _ = choose_preset(MachineFacts(vram_gb=79.6, compute_capability=9.0, usable_ram_gb=48.0))
    assert preset.name == "gpu80g-720p"


def test_a_12_gb_card_gets_the_fallback_and_the_reason_names_its_vram():
    preset, why = choose_preset(RTX3060_12G)
    assert preset.name == "rtx4090-24g"
    assert "fallback" in why and "12 GB VRAM < 20 GB" in why


def test_a_cpu_only_box_gets_the_fallback_because_it_has_no_nvidia_gpu():
    preset, why = choose_preset(CPU_ONLY)
    assert preset.name == "rtx4090-24g" and "no NVIDIA GPU" in why


def test_the_listing_marks_the_chosen_preset_and_says_what_each_one_lacks():
    result = listing(RTX3060_12G)
    rows, chosen = result.rows, result.chosen
    by_name = {r["name"]: r for r in rows}
    assert chosen.name == "rtx4090-24g" and by_name["rtx4090-24g"]["chosen"]
    assert by_name["gpu80g-480p"]["unmet"] == ["12 GB VRAM < 70 GB", "32 GB RAM < 64 GB"]
    assert [r["name"] for r in rows] == ["gpu80g-480p", "gpu80g-720p", "rtx4090-24g"]  # best rank first


def test_path_flags_name_the_manifest_folders_and_the_fp8_dit_file():
    flags = get_preset("rtx4090-24g").path_flags(Path("/w"))
    assert flags == {
        "ckpt_dir": Path("/w/Wan2.1-I2V-14B-480P"),
        "wav2vec_dir": Path("/w/chinese-wav2vec2-base"),
        "quant_dir": Path("/w/InfiniteTalk/quant_models/infinitetalk_single_fp8.safetensors"),
    }
    assert get_preset("gpu80g-480p").path_flags(Path("/w"))["infinitetalk_dir"] == Path(
        "/w/InfiniteTalk/single/infinitetalk.safetensors")


def test_a_preset_path_outside_its_own_weights_is_refused():
    import dataclasses

    outside = {"infinitetalk_dir": "infinitetalk:single/x.safetensors"}
    broken = dataclasses.replace(get_preset("rtx4090-24g"), paths=outside)
    with pytest.raises(KeyError, match="not among its weight files"):
        broken.path_flags(Path("/w"))
