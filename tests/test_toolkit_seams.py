"""The toolkit's seams for a web page: commands return results without printing, machine facts are one
typed object, preset choice lives with the presets, and the exit codes and events are the protocol's."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from run_media import FAKE, write_image, write_wav, write_weights

import itk
from itk.checks.gpu import Gpu, GpuFacts, GpuProcess
from itk.checks.ram import RamFacts
from itk.machine import MachineFacts, from_facts

ITK = Path(itk.__file__).parent
GiB = 2**30
BOX = from_facts(
    GpuFacts("550.54", "12.4", (Gpu(0, "NVIDIA GeForce RTX 4090", 24564, 9000, 8.9,
                                     (GpuProcess(3342, "python3", 14800),)),)),
    RamFacts(total=64 * GiB, available=14 * GiB, swap_total=0, cgroup_version=2, cgroup_limit=16 * GiB,
             oom_kills=0),
    wsl=False,
)


def test_machine_facts_carry_the_names_the_advice_rules_read():
    facts = BOX.to_json()
    assert facts["usable_ram_gb"] == 16.0 and facts["total_ram_gb"] == 64.0 and facts["cgroup_limit_gb"] == 16.0
    assert facts["gpu_name"] == "NVIDIA GeForce RTX 4090" and facts["vram_gb"] == pytest.approx(23.99, abs=0.01)
    assert facts["gpu_processes"] == [{"pid": 3342, "name": "python3", "used_mib": 14800}]
    from itk.advice import diagnose

    verdict = diagnose("Creating WanModel\n", 137, {**facts, "preset": "rtx4090-24g"})
    assert verdict.rule == "host-oom" and "16.0 GB of RAM is usable" in verdict.diagnosis


def test_a_gpu_less_machine_has_no_gpu_facts_and_gets_the_fallback_preset():
    from itk.presets import choose_preset

    bare = from_facts(GpuFacts(error="NVMLError_LibraryNotFound"), RamFacts(32 * GiB, 30 * GiB, 0), wsl=True)
    assert bare.vram_gb is None and bare.gpu_processes == () and bare.wsl
    assert "vram_gb" not in bare.to_json() and "cgroup_limit_gb" not in bare.to_json()
    assert choose_preset(bare)[0].name == "rtx4090-24g"


def _imports(path: Path) -> set[str]:
    """Modules a file imports when it runs (imports for type checkers only left out)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", "") == "TYPE_CHECKING" for n in ast.walk(node)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_only_the_front_ends_import_the_doctor_and_the_presets_import_neither_doctor_nor_console_at_load():
    importers = sorted(p.name for p in ITK.glob("*.py") if "itk.doctor" in _imports(p))
    assert importers == ["cli.py", "ui.py"]  # the terminal and the web page (its Machine view)
    code = "import sys, itk.presets, itk.machine; print(sorted(m for m in sys.modules if m in " \
           "('itk.doctor', 'itk.console', 'itk.run')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "[]", proc.stderr


def test_the_generators_bad_input_is_the_toolkits_user_error_with_exit_2():
    from itk.runtime.protocol import EXIT_BAD_INPUT, BadInput, UserError

    error = BadInput("cond_video x.png: file not found", "check the path")
    assert isinstance(error, UserError) and error.exit_code == EXIT_BAD_INPUT == 2
    assert (error.message, error.fix) == ("cond_video x.png: file not found", "check the path")


def test_run_doctor_returns_a_report_and_prints_nothing(tmp_path, capsys):
    from itk.doctor import run_doctor

    report = run_doctor(["packages", "ffmpeg"], weights_dir=tmp_path)
    assert capsys.readouterr() == ("", "")
    assert [r.id for r in report.results] == ["packages", "ffmpeg"] and report.ok and report.exit_code == 0
    assert json.loads(json.dumps(report.to_json()))["summary"] == "2 ok, 0 warnings, 0 failures"


def test_run_presets_and_run_diagnose_return_results_and_print_nothing(tmp_path, capsys):
    from itk.diagnose import run_diagnose
    from itk.presets import run_presets

    listing = run_presets(BOX)
    assert listing.chosen.name == "rtx4090-24g" and listing.to_json()["machine"]["gpu_name"] == BOX.gpu_name
    log = tmp_path / "run.log"
    log.write_text("Killed\n")
    verdict = run_diagnose(log, 137, "rtx4090-24g")
    assert verdict.rule == "host-oom" and verdict.log == str(log)
    assert capsys.readouterr() == ("", "")


def test_run_job_streams_events_to_the_callers_callback_and_returns_the_result(tmp_path, monkeypatch, capsys):
    from itk.run import plan_run, run_job
    from itk.spec import RunSpec

    monkeypatch.setenv("ITK_GENERATOR", f"{sys.executable} {FAKE}")
    monkeypatch.setenv("FAKE_MODE", "ok")
    write_weights(tmp_path / "w")
    plan = plan_run(RunSpec.from_options(
        image=str(write_image(tmp_path / "face.png")), audio=str(write_wav(tmp_path / "s.wav", 6.0)),
        output=tmp_path / "out" / "talk.mp4", preset="rtx4090-24g", sets=["sample_steps=3"],
        weights_dir=tmp_path / "w"))
    seen: list[dict] = []
    result = run_job(plan, on_event=seen.append)
    assert capsys.readouterr() == ("", "")
    assert result.ok and result.exit_code == 0 and result.output == tmp_path / "out" / "talk.mp4"
    assert [e["event"] for e in seen].count("step") == 6 and seen[-1]["event"] == "done"
    assert result.to_json()["gpu_peak_gb"] == 12.5 and (tmp_path / "out" / "talk.run" / "generate.log").is_file()


def test_a_preset_with_a_setting_the_generator_does_not_know_fails_when_the_presets_load(tmp_path):
    from itk.presets import PRESETS_DIR, load_presets

    text = (PRESETS_DIR / "rtx4090-24g.toml").read_text()
    (tmp_path / "typo.toml").write_text(text.replace("sample_steps = 40", "sample_step = 40"))
    with pytest.raises(ValueError, match="typo.toml: \\[generator\\] sample_step is not a generator setting"):
        load_presets(tmp_path)


def test_machine_facts_are_one_frozen_dataclass():
    with pytest.raises(AttributeError):
        MachineFacts().vram_gb = 1.0  # type: ignore[misc]
