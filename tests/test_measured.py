"""Measured step times are data, looked up per preset and GPU class; nothing is invented for other GPUs."""

from itk.measured import expected_step_s, for_preset, load_measurements


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
