"""Advice rules on realistic logs (tests/fixtures/logs, in the shapes the official scripts print) and on
recorded machine facts: each failure names its rule, its numbers and this machine's way out."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import pytest
from run_media import LOGS, itk

from itk.advice import derived, diagnose, load_rules, signal_of
from itk.runtime.toml import read_toml

EXPECTED = read_toml(LOGS / "expected.toml")

# Recorded facts: a 4090 box with 64 GB RAM, no swap, inside a container limited to 16 GB, with two other
# processes holding VRAM.
BOX_4090 = {
    "total_ram_gb": 62.7, "usable_ram_gb": 16.0, "available_ram_gb": 14.2, "swap_gb": 0.0,
    "cgroup_limit_gb": 16.0, "oom_kills_during_run": 1, "wsl": False,
    "gpu_name": "NVIDIA GeForce RTX 4090", "vram_gb": 23.99, "gpu_free_gb": 8.9,
    "gpu_processes": [{"pid": 2211, "name": "Xorg", "used_mib": 412},
                      {"pid": 3342, "name": "python3", "used_mib": 14800}],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_realistic_log_names_its_rule(name):
    case = EXPECTED[name]
    text = (LOGS / f"{name}.log").read_text()
    verdict = diagnose(text, case.get("exit_code"), case.get("facts", {}), f"{name}.log")
    assert verdict.rule == case["rule"], verdict.to_json()
    said = "\n".join([verdict.diagnosis, *verdict.details, *verdict.fixes])
    if verdict.rule not in ("ok", "unknown"):
        assert verdict.fixes, f"{verdict.rule} gives no fix"
        assert "{" not in said
    for text_it_must_hold in case.get("contains", []):
        assert text_it_must_hold in said, (text_it_must_hold, said)
    assert [h["rule"] for h in verdict.hints] == case.get("hints", [])


def test_every_rule_in_the_table_is_named_by_a_fixture_as_its_cause_or_a_hint():
    covered = {case["rule"] for case in EXPECTED.values()}
    covered |= {hint for case in EXPECTED.values() for hint in case.get("hints", [])}
    rules, _ = load_rules()
    assert {r.id for r in rules} <= covered
    assert {r.id for r in rules if r.kind == "hint"} <= {h for c in EXPECTED.values() for h in c.get("hints", [])}


def test_the_cuda_oom_numbers_and_the_process_the_error_names_are_quoted():
    text = (LOGS / "official_cuda_oom_fp8_without_persistent0.log").read_text()
    verdict = diagnose(text, 1, BOX_4090)
    assert "26.00 MiB" in verdict.diagnosis and "18.38 MiB free of 23.51 GiB" in verdict.diagnosis
    assert "pid 20417 with 3.78 GiB" in verdict.details[0]
    assert "pid 3342 python3 (14800 MiB)" in verdict.details[1]
    # the official args said quant='fp8' and no persistent setting: close others, then persistent 0; no fp8 advice
    assert verdict.fixes[0].startswith("close the other programs") and "kill 3342  # python3" in verdict.fixes[0]
    assert verdict.fixes[1].endswith("--num_persistent_param_in_dit 0")  # the official script's own flag
    assert not any("FP8 weights" in f for f in verdict.fixes)
    assert verdict.check == "gpu"


def test_an_unquantised_oom_of_the_official_script_suggests_its_fp8_flags_and_the_fetch_command():
    verdict = diagnose((LOGS / "guide_cuda_oom_644mib.log").read_text(), 1, {})
    assert "644.00 MiB" in verdict.diagnosis
    fp8 = "--quant fp8 --quant_dir weights/InfiniteTalk/quant_models/infinitetalk_single_fp8.safetensors"
    assert any(f"{fp8} (after itk fetch --preset rtx4090-24g)" in f for f in verdict.fixes)
    assert not any("--set " in f or "--preset" in f.split("(after")[0] for f in verdict.fixes)


def test_the_same_oom_in_an_itk_log_suggests_the_fp8_preset_and_itk_settings():
    official = (LOGS / "guide_cuda_oom_644mib.log").read_text()
    verdict = diagnose("# itk run: python -m itk.runtime.generate --size infinitetalk-720\n" + official, 1,
                       {"preset": "gpu80g-480p"})
    assert any("--preset rtx4090-24g (after itk fetch --preset rtx4090-24g)" in f for f in verdict.fixes)
    assert any("--set num_persistent_param_in_dit=0" in f for f in verdict.fixes)
    assert not any("--quant_dir" in f or "--frame_num 41" in f for f in verdict.fixes)


def test_a_kill_in_a_limited_container_names_the_limit_the_oom_counter_and_swap():
    log = "# itk run: python -m itk.runtime.generate --size infinitetalk-480\n"
    verdict = diagnose(log, -9, {**BOX_4090, "preset": "gpu80g-480p"})
    assert verdict.rule == "host-oom" and "16.0 GB of RAM is usable" in verdict.diagnosis
    assert any("only 16.0 GB of the machine's 62.7 GB" in d for d in verdict.details)
    assert any("recorded 1 kill(s)" in d for d in verdict.details)
    assert any("preset gpu80g-480p needs 64 GB of RAM; this machine has 16.0 GB usable" in d for d in verdict.details)
    # unquantised preset: fp8 first, and in the mapped low-RAM mode, since 16 GB cannot hold its pinned 32 GB
    assert "ITK_PIN=0 itk run --preset rtx4090-24g" in verdict.fixes[0] and "low-RAM mode" in verdict.fixes[0]
    assert not any("needs about 32 GB" in f for f in verdict.fixes)
    assert any("memory limit" in f for f in verdict.fixes) and any("swapon" in f for f in verdict.fixes)
    assert not any("wslconfig" in f for f in verdict.fixes)


def test_a_kill_under_the_fp8_preset_on_wsl_skips_fp8_and_explains_the_wsl_limit():
    facts = {"total_ram_gb": 31.2, "usable_ram_gb": 31.2, "swap_gb": 8.0, "wsl": True, "preset": "rtx4090-24g"}
    verdict = diagnose("", 137, facts)
    assert verdict.rule == "host-oom" and verdict.evidence == "exit status 137"
    assert not any("FP8 preset" in f for f in verdict.fixes)
    assert any(".wslconfig" in f and "wsl --shutdown" in f for f in verdict.fixes)


def test_a_container_oom_kill_counter_alone_is_enough_to_name_host_oom():
    verdict = diagnose("Traceback ...\n", 1, {"oom_kills_during_run": 2, "total_ram_gb": 64.0})
    assert verdict.rule == "host-oom"


def test_an_oom_in_the_decode_stage_gets_the_allocator_advice_first():
    text = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.33 GiB. GPU 0 has a total capacity of " \
           "23.55 GiB of which 912.00 MiB is free."
    verdict = diagnose(text, 1, {"phase": "decode"})
    assert verdict.rule == "cuda-oom-decode" and "expandable_segments:True" in verdict.fixes[0]
    assert diagnose(text, 1, {"phase": "denoise"}).rule == "cuda-oom"


def test_a_warning_is_a_hint_beside_the_real_cause_never_the_cause():
    verdict = diagnose((LOGS / "xformers_warning_then_cuda_oom.log").read_text(), 1, {})
    assert verdict.rule == "cuda-oom"
    assert [h["rule"] for h in verdict.hints] == ["xformers-mismatch"]


def test_the_failure_that_comes_last_in_the_log_wins():
    text = (LOGS / "hf_download_not_enough_disk.log").read_text() + (LOGS / "no_nvidia_driver.log").read_text()
    assert diagnose(text, 1, {}).rule == "no-cuda"


def test_the_missing_int8_t5_is_named_and_explained():
    verdict = diagnose((LOGS / "official_quant_int8_t5_missing.log").read_text(), 1, {})
    assert "t5_int8.safetensors" in verdict.diagnosis
    assert any("no int8 T5" in d for d in verdict.details)
    assert verdict.fixes[0].endswith("itk fetch --preset rtx4090-24g")


def test_an_unknown_failure_says_so_and_points_at_the_log_with_its_last_error_line():
    verdict = diagnose((LOGS / "unknown_key_error.log").read_text(), 1, {}, "/runs/x/generate.log")
    assert verdict.rule == "unknown" and "does not recognise" in verdict.diagnosis
    assert "/runs/x/generate.log" in verdict.diagnosis
    assert verdict.details == ["last error line: KeyError: 'blocks.12.audio_cross_attn.q_linear.weight'"]


def test_signals_read_the_same_from_subprocess_and_from_a_shell():
    assert signal_of(-9) == signal_of(137) == 9 and signal_of(1) is None and signal_of(None) is None
    assert "SIGSEGV" in diagnose("", -11, {}).diagnosis


def test_itk_diagnose_prints_json_for_an_official_log_and_exits_0():
    proc = itk("diagnose", str(LOGS / "official_killed_loading_wsl.log"), "--exit-code", "137", "--json")
    assert proc.returncode == 0, proc.stderr
    verdict = json.loads(proc.stdout)
    assert verdict["rule"] == "host-oom" and verdict["check"] == "ram" and verdict["exit_code"] == 137
    assert verdict["evidence"] == "Killed"


def test_itk_diagnose_renders_the_fixes_and_exits_1_when_it_does_not_know(tmp_path):
    proc = itk("diagnose", str(LOGS / "multitalk_torch_load_cve.log"))
    assert proc.returncode == 0 and "what to do:" in proc.stdout and "itk doctor --only weights" in proc.stdout
    proc = itk("diagnose", str(LOGS / "unknown_key_error.log"), "--exit-code", "1")
    assert proc.returncode == 1 and "does not recognise" in proc.stdout
    proc = itk("diagnose", str(tmp_path / "nope.log"))
    assert proc.returncode == 2 and "cannot read" in proc.stderr and "Traceback" not in proc.stderr


def test_rules_stay_data_with_no_import_of_heavy_modules():
    proc = itk("diagnose", str(LOGS / "official_success.log"), "--exit-code", "0")
    assert proc.returncode == 0 and "finished" in proc.stdout
    code = "import itk.advice, itk.diagnose, itk.run, itk.supervisor, sys; " \
           "print(sorted(m for m in ('torch', 'numpy', 'transformers') if m in sys.modules))"
    import subprocess

    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


def test_an_argparse_refusal_of_an_official_script_is_bad_input():
    text = "usage: generate_infinitetalk.py [-h] [--task {infinitetalk-14B}]\n" \
           "generate_infinitetalk.py: error: unrecognized arguments: --preset rtx4090-24g\n"
    verdict = diagnose(text, 2, {})
    assert verdict.rule == "bad-input" and verdict.diagnosis.endswith("unrecognized arguments: --preset rtx4090-24g")


def test_an_interrupted_run_is_named_as_such():
    assert diagnose("", 130, {}).rule == diagnose("", -2, {}).rule == "interrupted"


def test_an_oom_on_a_12_gb_card_says_the_card_is_below_what_the_preset_is_made_for():
    facts = {"gpu_name": "NVIDIA GeForce RTX 3060", "vram_gb": 12.0, "preset": "rtx4090-24g"}
    verdict = diagnose((LOGS / "guide_cuda_oom_644mib.log").read_text(), 1, facts)
    assert "this NVIDIA GeForce RTX 3060 has 12.0 GB; preset rtx4090-24g is made for 20 GB or more" in verdict.details
    assert not any("num_persistent_param_in_dit=0" in f for f in verdict.fixes)  # the preset already streams


def test_a_kill_never_first_suggests_a_preset_this_machines_ram_cannot_hold():
    roomy = {"total_ram_gb": 64.0, "usable_ram_gb": 64.0, "swap_gb": 8.0, "preset": "gpu80g-480p"}
    verdict = diagnose("", 137, roomy)
    assert verdict.fixes[0].startswith("use the FP8 preset") and "ITK_PIN=0" not in verdict.fixes[0]
    at_limit = {**roomy, "usable_ram_gb": 32.0}  # exactly the FP8 preset's minimum: it fits
    assert diagnose("", 137, at_limit).fixes[0].startswith("use the FP8 preset")
    tight = {**roomy, "usable_ram_gb": 31.9}
    assert diagnose("", 137, tight).fixes[0].startswith("31.9 GB cannot hold the 32 GB")


# Syntax only itk's own runtime understands: an official script's log must never be told to use it.
ITK_ONLY = re.compile(r"\bitk (?:run|ui|batch|serve)\b|\bITK_[A-Z_]+=|--set |--weights-dir|(?<!itk fetch )--preset ")
SMALL_BOX = {"total_ram_gb": 16.0, "usable_ram_gb": 16.0, "available_ram_gb": 14.0, "swap_gb": 0.0}
BIG_BOX = {"total_ram_gb": 128.0, "usable_ram_gb": 128.0, "available_ram_gb": 120.0, "swap_gb": 8.0}


@pytest.mark.parametrize("box", [SMALL_BOX, BIG_BOX, BOX_4090], ids=["16gb", "128gb", "4090-container"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_an_official_scripts_log_never_gets_itk_only_syntax(name, box):
    text = (LOGS / f"{name}.log").read_text()
    _, conditions = derived(box, text, load_rules()[1])
    if not conditions["official_log"]:
        pytest.skip("an itk log (or one that does not say)")
    verdict = diagnose(text, EXPECTED[name].get("exit_code"), box)
    assert not [fix for fix in verdict.fixes if ITK_ONLY.search(fix)], verdict.fixes  # the diagnosis may quote the log


def test_a_kill_while_the_official_script_loads_the_bf16_shards_names_fp8_first_on_any_box():
    text = (LOGS / "official_killed_loading_bf16_shards.log").read_text()
    fp8 = "--quant fp8 --quant_dir weights/InfiniteTalk/quant_models/infinitetalk_single_fp8.safetensors"
    for box in (SMALL_BOX, BIG_BOX):
        verdict = diagnose(text, 137, box)
        assert verdict.rule == "host-oom-bf16-load" and "diffusion_pytorch_model-00004-of-00007" in verdict.diagnosis
        assert fp8 in verdict.fixes[0] and "itk fetch --preset rtx4090-24g" in verdict.fixes[0]
    small = diagnose(text, 137, SMALL_BOX)
    assert any("16.0 GB" in d and "32 GB" in d for d in small.details) and any("swapon" in f for f in small.fixes)


def test_the_tail_of_that_log_alone_is_still_known_as_the_official_scripts():
    tail = "".join((LOGS / "official_killed_loading_bf16_shards.log").read_text().splitlines(True)[-3:])
    verdict = diagnose(tail, None, SMALL_BOX)
    assert verdict.rule == "host-oom-bf16-load" and "--quant fp8 --quant_dir" in verdict.fixes[0]
    assert not any(ITK_ONLY.search(f) for f in verdict.fixes)


def test_the_same_kill_in_an_itk_log_gets_the_fp8_preset_and_on_a_small_box_the_low_ram_mode():
    from itk.measured import low_ram_mode

    text = "# itk run: python -m itk.runtime.generate --size infinitetalk-480\n" + \
        (LOGS / "official_killed_loading_bf16_shards.log").read_text()
    verdict = diagnose(text, 137, SMALL_BOX)
    assert verdict.rule == "host-oom-bf16-load"
    assert any(low_ram_mode("rtx4090-24g").statement in f and "ITK_PIN=0 itk run" in f for f in verdict.fixes)
    assert not any("--quant_dir" in f for f in verdict.fixes)


def test_the_ram_below_preset_detail_sits_on_the_limit():
    def detail(usable: float) -> bool:
        verdict = diagnose("", 137, {"usable_ram_gb": usable, "total_ram_gb": 64.0, "preset": "rtx4090-24g"})
        return any("preset rtx4090-24g needs 32 GB" in d for d in verdict.details)

    assert not detail(32.0) and detail(31.99)


def test_a_real_interpreters_missing_flash_attn_import_names_flash_attn_missing(tmp_path):
    """The log is what a real Python prints when a script imports flash-attn unconditionally (as MultiTalk-derived
    scripts do) on a machine without it, not a hand-written imitation of that traceback."""
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here: its missing-module traceback cannot be produced")
    script = tmp_path / "generate_infinitetalk.py"
    script.write_text("import sys\nfrom flash_attn import flash_attn_func\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 1 and "ModuleNotFoundError" in proc.stderr
    verdict = diagnose(proc.stderr, proc.returncode, {}, "generate.log")
    assert verdict.rule == "flash-attn-missing", verdict.to_json()
    assert any("itk doctor --only flash_attn" in fix for fix in verdict.fixes)
