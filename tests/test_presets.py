"""Which preset a machine gets, and the generator paths a preset resolves to."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from itk.machine import MachineFacts
from itk.presets import choose_preset, get_preset, listing, load_presets
from itk.runtime.sampling import passes_per_step

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
    assert "8.01 s per step measured on an H200" in fp8["provenance"] and fp8["measured_step_s"]["H100"] == 8.87
    assert rows["rtx4090-24g"]["status"] == "tested"  # the guide's run stays named beside ours
    assert "8.04 s per step" in rows["rtx4090-24g"]["provenance"] and "user guide" in rows["rtx4090-24g"]["provenance"]


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


def test_a_preset_for_two_gpus_says_a_one_gpu_machine_lacks_the_second_and_fits_two_big_enough_ones():
    p = get_preset("gpu80g-fp8-480p-x2")
    one = MachineFacts(vram_gb=139.8, compute_capability=9.0, usable_ram_gb=250.0, gpu_sizes_gb=(139.8,))
    assert p.unmet(one) == [f"1 GPU of {p.min_vram_gb:.0f} GB < 2"]
    mixed = MachineFacts(vram_gb=139.8, compute_capability=9.0, usable_ram_gb=250.0, gpu_sizes_gb=(139.8, 24.0))
    assert p.unmet(mixed) == [f"1 GPU of {p.min_vram_gb:.0f} GB < 2"]
    two = MachineFacts(vram_gb=139.8, compute_capability=9.0, usable_ram_gb=250.0, gpu_sizes_gb=(139.8, 139.8))
    assert p.unmet(two) == []


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
    assert [r["name"] for r in rows] == ["gpu80g-fp8-480p", "gpu80g-fp8-480p-fast", "gpu80g-fp8-480p-fusionx",
                                         "gpu80g-fp8-480p-x2", "gpu80g-fp8-480p-x4", "gpu80g-fp8-480p-x8",
                                         "gpu80g-480p", "gpu80g-720p", "rtx4090-24g", "rtx4090-24g-fast",
                                         "rtx4090-24g-fusionx"]  # best first, each fast variant after its base
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


FAST = {"rtx4090-24g-fast": ("rtx4090-24g", 4, "lightx2v:wan2.1_i2v_lora_rank64_lightx2v_4step.safetensors"),
        "rtx4090-24g-fusionx": ("rtx4090-24g", 8, "fusionx:FusionX_LoRa/Wan2.1_I2V_14B_FusionX_LoRA.safetensors"),
        "gpu80g-fp8-480p-fast": ("gpu80g-fp8-480p", 4, "lightx2v:wan2.1_i2v_lora_rank64_lightx2v_4step.safetensors"),
        "gpu80g-fp8-480p-fusionx": ("gpu80g-fp8-480p", 8,
                                    "fusionx:FusionX_LoRa/Wan2.1_I2V_14B_FusionX_LoRA.safetensors")}


@pytest.mark.parametrize("name", sorted(FAST))
def test_a_fast_preset_is_its_base_preset_with_the_readmes_distill_lora_settings(name):
    base_name, steps, lora = FAST[name]
    fast, base = get_preset(name), get_preset(base_name)
    assert fast.generator == {**base.generator, "sample_steps": steps, "sample_shift": 2.0,
                              "sample_text_guide_scale": 1.0, "sample_audio_guide_scale": 2.0}
    assert [(lo.file, lo.scale) for lo in fast.loras] == [(lora, 1.0)] and not base.loras
    assert set(base.components) < set(fast.components) and fast.paths == base.paths
    assert (fast.min_vram_gb, fast.min_ram_gb) == (base.min_vram_gb, base.min_ram_gb)
    assert fast.cost == f"{steps} steps x 2 passes" and base.cost == "40 steps x 3 passes"
    assert not fast.auto and fast.trade and base.auto and not base.trade
    repo, _, path = lora.partition(":")
    folder = {"lightx2v": "Wan2.1-Distill-Loras", "fusionx": "Wan14BT2VFusioniX"}[repo]
    assert fast.lora_files(Path("/w")) == [(Path("/w") / folder / path, 1.0)]


def test_the_fusionx_presets_say_they_worsen_the_colour_shift_past_a_minute():
    for name in ("rtx4090-24g-fusionx", "gpu80g-fp8-480p-fusionx"):
        p = get_preset(name)
        assert "colour shift past a minute" in p.trade and "colour shift" in p.long_video_warning
    assert "less faithful" in get_preset("rtx4090-24g-fast").trade


@pytest.mark.parametrize("facts", [RTX4090_64G, H100_80G, RTX3060_12G, CPU_ONLY])
def test_a_fast_preset_never_wins_the_automatic_choice(facts):
    preset, _ = choose_preset(facts)
    assert preset.auto and preset.steps == 40 and preset.passes == 3 and not preset.loras


def test_the_listing_shows_steps_x_passes_the_trade_and_offers_the_fast_presets_as_alternatives():
    result = listing(RTX4090_64G)
    rows = {r["name"]: r for r in result.rows}
    fast = rows["rtx4090-24g-fast"]
    assert (fast["steps"], fast["passes"], fast["cost"]) == (4, 2, "4 steps x 2 passes") and not fast["auto"]
    assert fast["summary"].endswith("4 steps x 2 passes") and "less faithful" in fast["trade"]
    assert "trades: distilled 4-step output is less faithful" in fast["provenance"]
    assert fast["loras"] == [{"file": "lightx2v:wan2.1_i2v_lora_rank64_lightx2v_4step.safetensors", "scale": 1.0}]
    assert rows["rtx4090-24g"]["cost"] == "40 steps x 3 passes" and rows["rtx4090-24g"]["trade"] == ""
    assert result.chosen.name == "rtx4090-24g"
    line = next(a for a in result.alternatives if a.startswith("rtx4090-24g-fusionx"))
    assert "8 steps x 2 passes (vs 40 steps x 3 passes)" in line and "colour shift" in line
    assert line.endswith("--preset rtx4090-24g-fusionx")


def test_a_measured_fast_preset_shows_its_step_time_in_the_listing(monkeypatch):
    from itk import measured

    row = measured.Measurement("rtx4090-24g-fast", "RTX 4090", 1.5, "fp8_streamed_budget0", "test", "2026-12-01")
    monkeypatch.setattr(measured, "load_measurements", lambda: (row,))
    fast = {r["name"]: r for r in listing(RTX4090_64G).rows}["rtx4090-24g-fast"]
    assert fast["measured_step_s"] == {"RTX 4090": 1.5} and fast["status"] == "measured"
    assert "1.5 s per step measured on an RTX 4090" in fast["provenance"]


@pytest.mark.parametrize(("text", "audio", "passes"), [(5.0, 4.0, 3), (1.0, 2.0, 2), (1.0, 1.0, 1), (2.0, 1.0, 3),
                                                       (1.0 + 1e-12, 1.0, 1)])
def test_a_presets_passes_are_the_runtimes_passes_for_its_guidance_scales(text, audio, passes):
    settings = {"sample_text_guide_scale": text, "sample_audio_guide_scale": audio}
    preset = replace(get_preset("rtx4090-24g"), generator=settings)
    assert preset.passes == len(passes_per_step(text, audio)) == passes


def test_the_default_guidance_is_three_passes():
    assert replace(get_preset("rtx4090-24g"), generator={}).passes == 3


def test_a_preset_lora_outside_its_own_components_or_not_a_lora_fails_when_presets_load(tmp_path):
    from itk.presets import PRESETS_DIR

    text = (PRESETS_DIR / "rtx4090-24g-fast.toml").read_text()
    for wrong in ('"fusionx:FusionX_LoRa/Wan2.1_I2V_14B_FusionX_LoRA.safetensors"',  # not in its components
                  '"infinitetalk:quant_models/infinitetalk_single_fp8.safetensors"'):  # not a LoRA
        bad = tmp_path / wrong[1:9]
        bad.mkdir()
        (bad / "x.toml").write_text(text.replace(
            '"lightx2v:wan2.1_i2v_lora_rank64_lightx2v_4step.safetensors"', wrong))
        with pytest.raises(ValueError, match=r"x.toml: \[\[lora\]\] .* is not a LoRA file of its"):
            load_presets(bad)
