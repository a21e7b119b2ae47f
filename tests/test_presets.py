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


def test_an_80_gb_h100_gets_the_fp8_everything_resident_480p_preset():
    preset, why = choose_preset(H100_80G)
    assert preset.name == "gpu80g-fp8-480p" and "meets its requirements" in why
    assert preset.generator["quant"] == "fp8" and preset.generator["size"] == "infinitetalk-480"
    assert "num_persistent_param_in_dit" not in preset.generator  # every weight resident, nothing streamed
    assert preset.components == ("wan-base-common", "wav2vec2", "infinitetalk-single-fp8")


def test_the_bf16_preset_is_still_offered_on_an_80_gb_card_with_its_download_and_its_slower_step():
    result = listing(H100_80G)
    assert result.chosen.name == "gpu80g-fp8-480p"
    bf16 = next(line for line in result.alternatives if line.startswith("gpu80g-480p"))
    assert "a 93.6 GB download (vs 31.9 GB)" in bf16 and "9.99 vs 8.87 s per step on an H100" in bf16
    assert bf16.endswith("--preset gpu80g-480p")


def test_a_preset_says_derived_until_a_device_run_measured_it_then_shows_that_step_time():
    rows = {r["name"]: r for r in listing(H100_80G).rows}
    assert rows["gpu80g-720p"]["status"] == "derived" and "not yet tested" in rows["gpu80g-720p"]["provenance"]
    fp8 = rows["gpu80g-fp8-480p"]
    assert fp8["status"] == "measured" and "not yet tested" not in fp8["provenance"]
    assert "8.34 s per step measured on an H200" in fp8["provenance"] and fp8["measured_step_s"]["H100"] == 8.87
    assert rows["rtx4090-24g"]["status"] == "tested"  # the guide's run stays named beside ours
    assert "8.47 s per step" in rows["rtx4090-24g"]["provenance"] and "user guide" in rows["rtx4090-24g"]["provenance"]


def test_an_80_gb_card_with_48_gb_ram_gets_an_fp8_preset_never_the_bf16_one_that_needs_64():
    preset, _ = choose_preset(MachineFacts(vram_gb=79.6, compute_capability=9.0, usable_ram_gb=48.0))
    assert preset.name == "gpu80g-fp8-480p" and preset.min_ram_gb <= 48


def test_a_machine_exactly_at_a_presets_vram_and_ram_minimum_fits_it_and_a_little_less_does_not():
    p = get_preset("rtx4090-24g")
    at = MachineFacts(vram_gb=p.min_vram_gb, compute_capability=8.9, usable_ram_gb=p.min_ram_gb)
    assert p.unmet(at) == []
    vram = p.unmet(MachineFacts(vram_gb=p.min_vram_gb - 0.01, compute_capability=8.9, usable_ram_gb=p.min_ram_gb))
    ram = p.unmet(MachineFacts(vram_gb=p.min_vram_gb, compute_capability=8.9, usable_ram_gb=p.min_ram_gb - 0.01))
    assert len(vram) == 1 and "VRAM <" in vram[0] and len(ram) == 1 and "RAM <" in ram[0]


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
    assert [r["name"] for r in rows] == ["gpu80g-fp8-480p", "gpu80g-480p", "gpu80g-720p", "rtx4090-24g"]  # best first
    assert result.alternatives == []  # nothing else fits a 12 GB card


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
