"""Measured step times are data, looked up per preset and GPU class; nothing is invented for other GPUs. The
low-RAM mode's cost is one row too, the numbers of its bench results, stated in the same words by the doctor
and by the advice rules."""

import json
from pathlib import Path

from itk.measured import expected_step_s, for_preset, load_measurements, low_ram_mode

RESULTS = Path(__file__).parents[1] / "bench" / "results"


def test_a_preset_measured_on_this_gpu_class_gets_that_measurement():
    m = expected_step_s("rtx4090-24g", "NVIDIA H200")
    assert m is not None and m.seconds == 8.04 and "H200" in m.label


def test_a_gpu_nobody_measured_gets_no_number_and_neither_does_a_cpu_box():
    assert expected_step_s("rtx4090-24g", "NVIDIA GeForce RTX 4090") is None
    assert expected_step_s("rtx4090-24g", None) is None


def test_every_row_names_a_known_preset_and_a_positive_time():
    from itk.presets import load_presets

    presets = load_presets()
    assert load_measurements() and all(m.preset in presets and m.seconds > 0 for m in load_measurements())
    assert for_preset("no-such-preset") == []


def test_the_4090_presets_low_ram_mode_is_one_row_whose_numbers_are_its_bench_results():
    mode = low_ram_mode("rtx4090-24g")
    unpinned = json.loads((RESULTS / "whole-run-h200-pagecache.json").read_text())
    pinned = json.loads((RESULTS / "whole-run-h200.json").read_text())
    assert unpinned["pin"].startswith("ITK_PIN=0") and pinned["pin"].startswith("ITK_PIN unset")
    assert mode.peak_rss_gb == round(unpinned["peak_rss_gb"], 1)
    assert mode.pinned_peak_rss_gb == round(pinned["peak_rss_gb"], 1)
    assert mode.step_factor == round(unpinned["step_s_measured"] / pinned["step_s_measured"], 2)
    assert all(name in mode.source for name in ("whole-run-h200-pagecache.json", "whole-run-h200.json"))
    assert "about 12 GB" in mode.statement and "about 22 GB" in mode.statement and "1.6x" in mode.statement
    assert low_ram_mode("gpu80g-480p") is None  # a resident DiT has no such mode


def test_the_doctor_and_the_advice_rules_state_the_low_ram_mode_in_the_same_words(tmp_path):
    from itk.advice import diagnose
    from itk.doctor import check_context
    from itk.presets import get_preset

    statement = low_ram_mode("rtx4090-24g").statement
    ctx = check_context(get_preset("rtx4090-24g"), tmp_path)
    assert ctx.low_ram_note == statement and ctx.low_ram_gb == low_ram_mode("rtx4090-24g").peak_rss_gb
    verdict = diagnose("Killed\n", 137, {"total_ram_gb": 16.0, "usable_ram_gb": 16.0, "preset": "rtx4090-24g"})
    assert any(statement in f and "ITK_PIN=0 itk run --preset rtx4090-24g" in f for f in verdict.fixes)
    assert not any("7.4 GB" in f or "4%" in f for f in verdict.fixes)
