"""The doctor's decisions, fed with recorded facts of real machines (pure functions, no mocks)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from itk.checks import disk, flash_attn, gpu, numpy_pin, packages, port, ram, torch_cuda
from itk.checks.base import Status

GiB = 2**30

RTX4090 = gpu.GpuFacts(
    driver_version="550.54.15",
    cuda_driver_version="12.4",
    gpus=(
        gpu.Gpu(0, "NVIDIA GeForce RTX 4090", 24564, 9100, 8.9, (
            gpu.GpuProcess(2211, "Xorg", 412),
            gpu.GpuProcess(3342, "python3", 14800),
        )),
    ),
)
H100 = gpu.GpuFacts("570.124.06", "12.8", (gpu.Gpu(0, "NVIDIA H100 80GB HBM3", 81559, 81000, 9.0),))
RTX3060 = gpu.GpuFacts("535.0", "12.2", (gpu.Gpu(0, "NVIDIA GeForce RTX 3060", 12288, 12000, 8.6),))
NO_DRIVER = gpu.GpuFacts(error="NVMLError_LibraryNotFound: NVML Shared Library Not Found")


def test_a_4090_with_two_other_processes_warns_and_names_them_with_kill_commands():
    result = gpu.judge(RTX4090, min_vram_gb=20, own_pid=1)
    assert result.status is Status.WARN
    assert "other processes hold 15212 MiB" in result.summary
    assert "kill 3342  # python3" in result.fix and "kill 2211  # Xorg" in result.fix
    assert any("3342 python3 (14800 MiB)" in d for d in result.details)


def test_an_idle_h100_is_ok_and_reports_name_vram_cuda_and_capability():
    result = gpu.judge(H100, min_vram_gb=20, own_pid=1)
    assert result.status is Status.OK
    assert "H100" in result.summary and "CUDA 12.8" in result.summary and "cc 9.0" in result.summary


def test_a_12_gb_card_fails_the_vram_requirement_and_warns_about_missing_fp8():
    result = gpu.judge(RTX3060, min_vram_gb=20, own_pid=1)
    assert result.status is Status.FAIL
    assert "12.0 GiB, the preset needs 20 GiB" in result.summary
    assert "no FP8 tensor cores" in result.summary


def test_no_driver_fails_and_says_only_selftest_can_run():
    result = gpu.judge(NO_DRIVER, min_vram_gb=20)
    assert result.status is Status.FAIL
    assert "only `itk selftest` can run here" in result.summary
    assert "nvidia-smi" in result.fix


def test_a_container_capped_at_16_gb_fails_and_names_the_limit_not_the_machine():
    facts = ram.RamFacts(total=64 * GiB, available=60 * GiB, swap_total=0, cgroup_version=2,
                         cgroup_limit=16 * GiB, cgroup_usage=1 * GiB, oom_kills=2)
    result = ram.judge(facts, min_ram_gb=32, preset_name="rtx4090-24g")
    assert result.status is Status.FAIL
    assert "container limit is 16.0 GiB (the machine has 64.0)" in result.summary
    assert "docker run --memory=32g" in result.fix
    assert any("already killed 2" in d for d in result.details)


def test_a_64_gb_box_is_ok_and_a_busy_one_warns():
    ok = ram.judge(ram.RamFacts(64 * GiB, 58 * GiB, 8 * GiB), 32, "rtx4090-24g")
    busy = ram.judge(ram.RamFacts(64 * GiB, 20 * GiB, 0), 32, "rtx4090-24g")
    assert ok.status is Status.OK
    assert busy.status is Status.WARN and "close memory-heavy programs" in busy.fix


def test_a_machine_without_enough_ram_suggests_more_ram_or_swap():
    result = ram.judge(ram.RamFacts(24 * GiB, 23 * GiB, 0), 32, "rtx4090-24g")
    assert result.status is Status.FAIL and "exit 137" in result.summary and "swap" in result.fix


def test_cgroup_v2_limit_and_oom_kills_are_read(tmp_path: Path):
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    (tmp_path / "memory.max").write_text(f"{16 * GiB}\n")
    (tmp_path / "memory.current").write_text("1048576\n")
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert ram.read_cgroup(tmp_path) == (2, 16 * GiB, 1048576, 1)


def test_cgroup_v2_max_means_no_limit(tmp_path: Path):
    (tmp_path / "cgroup.controllers").write_text("memory\n")
    (tmp_path / "memory.max").write_text("max\n")
    assert ram.read_cgroup(tmp_path)[1] is None


def test_cgroup_v1_limit_is_read_and_its_huge_no_limit_value_ignored(tmp_path: Path):
    mem = tmp_path / "memory"
    mem.mkdir()
    (mem / "memory.limit_in_bytes").write_text(f"{8 * GiB}\n")
    (mem / "memory.usage_in_bytes").write_text("100\n")
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 4\n")
    assert ram.read_cgroup(tmp_path) == (1, 8 * GiB, 100, 4)
    (mem / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert ram.read_cgroup(tmp_path)[1] is None


def _probe(torch_version="2.8.0+cu128", cuda_build="12.8", available=True, fa=None, fa_error=None,
           numpy="1.26.4", numba_error=None, numba_numpy=None, librosa_error=None):
    return {
        "python": "3.12.3",
        "torch": {"version": torch_version, "import_error": None, "cuda_build": cuda_build,
                  "cuda_available": available, "device_count": int(available), "cxx11_abi": True},
        "flash-attn": {"version": fa, "import_error": fa_error},
        "numpy": {"version": numpy, "import_error": None},
        "numba": {"version": "0.60.0", "import_error": numba_error, "numpy_range": numba_numpy},
        "librosa": {"version": "0.10.2", "import_error": librosa_error},
    }


def test_a_cpu_torch_on_a_gpu_machine_fails_with_the_cuda_install_command_for_this_driver():
    result = torch_cuda.judge(_probe("2.8.0+cpu", None, False), RTX4090)
    assert result.status is Status.FAIL and "CPU build" in result.summary
    expected = "pip install --force-reinstall 'torch==2.8.0' --index-url https://download.pytorch.org/whl/cu124"
    assert expected in result.fix


def test_a_torch_built_for_a_newer_cuda_than_the_driver_fails():
    result = torch_cuda.judge(_probe(), RTX4090)
    assert result.status is Status.FAIL
    assert "built for CUDA 12.8 but the driver supports only up to CUDA 12.4" in result.summary


def test_a_matching_cuda_torch_is_ok_and_a_cpu_torch_without_gpu_is_ok():
    assert torch_cuda.judge(_probe(), H100).status is Status.OK
    assert torch_cuda.judge(_probe("2.13.0+cpu", None, False), NO_DRIVER).status is Status.OK


def test_the_wheel_variant_is_the_newest_the_driver_can_run():
    assert torch_cuda.wheel_for_driver("12.4") == "cu124"
    assert torch_cuda.wheel_for_driver("12.5") == "cu124"
    assert torch_cuda.wheel_for_driver("13.1") == "cu130"
    assert torch_cuda.wheel_for_driver("11.4") is None


def test_flash_attn_undefined_symbol_on_an_ada_card_is_a_failure_named_as_an_abi_break():
    err = "ImportError: flash_attn_2_cuda.cpython-312-x86_64-linux-gnu.so: undefined symbol: _ZN3c104cuda9SetDeviceEi"
    result = flash_attn.judge(_probe(fa="2.7.4.post1", fa_error=err), RTX4090)
    assert result.status is Status.FAIL and "ABI break" in result.summary
    assert "pip uninstall -y flash-attn" in result.fix
    assert "flash_attn-2.8.3+cu12torch2.8cxx11abiTRUE-cp312-cp312-linux_x86_64.whl" in result.fix


def test_flash_attn_absent_is_a_warning_on_an_ada_card_with_the_wheel_and_skipped_without_a_gpu():
    absent = flash_attn.judge(_probe(), RTX4090)
    assert absent.status is Status.WARN and "pip install https://github.com/Dao-AILab" in absent.fix
    assert flash_attn.judge(_probe(), NO_DRIVER).status is Status.SKIP
    assert flash_attn.judge(_probe(fa="2.8.3"), RTX4090).status is Status.OK


def test_on_hopper_flash_attention_4_is_advised_and_reported_and_flash_attn_2_never_is():
    absent = flash_attn.judge(_probe(), H100)
    assert absent.status is Status.WARN and "torch SDPA (cuDNN)" in absent.summary
    assert absent.fix == 'pip install "flash-attn-4" (nothing to compile)'
    cu13 = _probe("2.11.0+cu130", "13.0")
    assert flash_attn.judge(cu13, H100).fix.startswith('pip install "flash-attn-4[cu13]"')
    used = flash_attn.judge(_probe() | {"flash-attn-4": {"version": "4.0.0b36"}}, H100)
    assert used.status is Status.OK and "the runtime uses FlashAttention-4 4.0.0b36" in used.summary
    err = "ImportError: flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi"
    broken = flash_attn.judge(_probe(fa="2.7.4.post1", fa_error=err) | {"flash-attn-4": {"version": "4.0.0b36"}}, H100)
    assert broken.status is Status.WARN and broken.fix == "pip uninstall -y flash-attn"
    assert "github.com/Dao-AILab" not in flash_attn.judge(_probe(fa="2.7.4.post1", fa_error=err), H100).fix


def test_the_check_advises_each_kernel_exactly_where_the_runtime_would_use_it():
    for cc in (8.6, 8.9, 9.0, 12.0):
        facts = gpu.GpuFacts("570.0", "12.8", (gpu.Gpu(0, f"GPU cc {cc}", 81559, 81000, cc),))
        fix = flash_attn.judge(_probe(), facts).fix
        assert ("pip install https://" in fix) == ("flash" in flash_attn.attention_order(cc)), cc
        assert ("pip install sageattention" in fix) == (flash_attn.preferred_attention(cc) == "sage"), cc
        assert ("flash-attn-4" in fix) == (flash_attn.preferred_attention(cc) == "fa4"), cc


def test_an_ada_card_with_sageattention_reports_it_as_the_kernel_in_use():
    facts = _probe() | {"sageattention": {"version": "1.0.6"}}
    result = flash_attn.judge(facts, RTX4090)
    assert result.status is Status.OK and "the runtime uses SageAttention 1.0.6" in result.summary
    err = "ImportError: flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi"
    broken = flash_attn.judge(_probe(fa="2.7.4.post1", fa_error=err) | {"sageattention": {"version": "1.0.6"}},
                              RTX4090)
    assert broken.status is Status.WARN and broken.fix == "pip uninstall -y flash-attn"
    assert "torch SDPA (cuDNN)" in flash_attn.judge(facts, H100).summary  # Hopper: never Sage


def test_numba_refusing_this_numpy_fails_and_explains_the_pin():
    err = "ImportError: Numba needs NumPy 2.2 or less. Got NumPy 2.3."
    result = numpy_pin.judge(_probe(numpy="2.3.1", numba_error=err))
    assert result.status is Status.FAIL and "numba does not import with numpy 2.3.1" in result.summary
    assert 'numpy>=1.24,<2.2' in result.fix
    assert "librosa" in result.details[0]


def test_numpy_outside_the_guides_pin_but_inside_what_numba_declares_is_ok_with_the_pin_only_explained():
    result = numpy_pin.judge(_probe(numpy="2.4.6", numba_numpy="<2.6,>=1.22"))
    assert result.status is Status.OK and result.fix == ""
    assert any("<2.2" in d and "<2.6,>=1.22" in d for d in result.details)
    assert numpy_pin.judge(_probe(numpy="2.2.6")).status is Status.OK  # numba's range unknown: imports decide


def test_numpy_outside_the_range_numba_declares_warns_with_numbas_own_range_as_the_fix():
    result = numpy_pin.judge(_probe(numpy="2.3.1", numba_numpy="<2.3,>=1.24"))
    assert result.status is Status.WARN and "numba 0.60.0 declares numpy<2.3,>=1.24" in result.summary
    assert 'pip install "numpy<2.3,>=1.24"' in result.fix and "2.2" not in result.fix


def test_librosa_failing_to_import_fails_the_numpy_check_naming_it():
    err = "ImportError: cannot import name 'jit' from 'numba'"
    result = numpy_pin.judge(_probe(numpy="2.2.6", numba_numpy="<2.3,>=1.24", librosa_error=err))
    assert result.status is Status.FAIL and "librosa does not import" in result.summary
    assert 'pip install "numpy<2.3,>=1.24"' in result.fix


def test_the_probe_reads_the_numpy_range_numba_declares_here():
    from importlib import metadata

    from packaging.specifiers import SpecifierSet

    from itk.checks import probe

    declared = probe.declared_range("numba", "numpy")
    assert declared and SpecifierSet(declared).contains(metadata.version("numpy"))
    assert probe.declared_range("numba", "no-such-dist") is None


def test_a_probe_that_crashed_fails_the_torch_check_and_skips_the_others():
    crashed = {"error": "the import probe exited with -11: Segmentation fault"}
    assert torch_cuda.judge(crashed, H100).status is Status.FAIL
    assert flash_attn.judge(crashed, H100).status is Status.SKIP
    assert numpy_pin.judge(crashed).status is Status.SKIP


def test_disk_fails_with_the_numbers_when_the_missing_bytes_do_not_fit():
    result = disk.judge(free=20 * 10**9, missing=32 * 10**9, where="/data", preset_name="rtx4090-24g")
    assert result.status is Status.FAIL
    assert "20.0 GB free at /data, rtx4090-24g still needs 32.0 GB" in result.summary
    assert "free 14.0 GB there" in result.fix
    assert disk.judge(free=100 * 10**9, missing=32 * 10**9, where="/", preset_name="x").status is Status.OK


def test_this_environment_has_every_declared_dependency_and_no_conflicts():
    own, conflicts, seen = packages.find_problems()
    assert own == [] and conflicts == []
    assert seen > 10


def test_a_busy_gradio_port_is_a_warning_that_names_the_port():
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        busy = s.getsockname()[1]
        result = port.check(port=busy)
    assert result.status is Status.WARN and f"port {busy} is in use" in result.summary
    assert port.check(port=busy).status is Status.OK


def test_the_page_is_recognised_by_its_command_line_however_it_was_started():
    for cmdline in (["/srv/itk/.venv/bin/python", "/srv/itk/.venv/bin/itk", "ui", "--port", "8418"],
                    ["python3", "-m", "itk", "ui", "--listen"], ["itk", "ui"]):
        assert port.is_itk_ui(cmdline), cmdline
    for cmdline in (["python", "app.py", "--server_port", "8418"], ["itk", "run", "--prompt", "ui"],
                    ["python", "-m", "itk", "selftest"], ["python", "-m", "http.server", "8418"], []):
        assert not port.is_itk_ui(cmdline), cmdline


def test_the_port_held_by_this_very_page_is_its_own_not_a_warning_with_a_wrong_fix():
    own = port.Holder(pid=4242, name="python3", cmdline=("/x/.venv/bin/itk", "ui"))
    result = port.judge(8418, own, own_pid=4242)
    assert result.status is Status.OK and "this page" in result.summary and "pid 4242" in result.summary
    assert result.fix == "" and "app.py" in result.details[0]
    other = port.judge(8418, port.Holder(pid=77, name="python", cmdline=("python", "app.py")), own_pid=4242)
    assert other.status is Status.WARN and "stop pid 77" in other.fix and "--server_port" in other.fix


def test_a_port_held_by_a_running_itk_ui_is_reported_as_the_page(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    itk = Path(sys.executable).with_name("itk")
    page = subprocess.Popen([str(itk), "ui", "--port", str(free), "--weights-dir", str(tmp_path / "w"),
                             "--output-dir", str(tmp_path / "out")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while port.port_free(free) and page.poll() is None and time.monotonic() < deadline:
            time.sleep(0.3)
        result = port.check(port=free)
    finally:
        page.terminate()
        page.wait(timeout=30)
    assert result.status is Status.OK, result
    assert f"port {free} is in use by the itk page (`itk ui`, pid {page.pid})" in result.summary
    assert result.fix == "" and "--server_port" in result.details[0]


NOTE = "its low-RAM mode peaks at about 12 GB of RAM (measured)"


def test_a_16_gb_box_runs_the_4090_preset_in_its_low_ram_mode_a_warning_with_the_measured_cost():
    box = ram.RamFacts(total=16 * GiB, available=14 * GiB, swap_total=0)
    result = ram.judge(box, 32, "rtx4090-24g", low_ram_gb=12.1, low_ram_note=NOTE)
    assert result.status is Status.WARN and "low-RAM mode" in result.summary and "16.0 GiB" in result.summary
    assert NOTE in result.details and "swap" not in result.fix and "32 GB" in result.fix
    assert ram.judge(box, 32, "rtx4090-24g").status is Status.FAIL  # a preset without a measured low-RAM mode


def test_below_the_low_ram_modes_peak_the_ram_check_fails_naming_both_needs():
    box = ram.RamFacts(total=8 * GiB, available=7 * GiB, swap_total=0)
    result = ram.judge(box, 32, "rtx4090-24g", low_ram_gb=12.1, low_ram_note=NOTE)
    assert result.status is Status.FAIL and "12.1 GB" in result.summary
    assert "at least 13 GB" in result.fix and "32 GB for full speed" in result.fix and "swap" in result.fix
    capped = ram.RamFacts(total=64 * GiB, available=60 * GiB, swap_total=0, cgroup_version=2,
                          cgroup_limit=8 * GiB)
    assert "--memory=13g" in ram.judge(capped, 32, "rtx4090-24g", low_ram_gb=12.1, low_ram_note=NOTE).fix


def test_ram_exactly_at_the_preset_minimum_passes_and_a_byte_less_fails():
    at = ram.RamFacts(total=32 * GiB, available=32 * GiB, swap_total=0)
    below = ram.RamFacts(total=32 * GiB - 1, available=32 * GiB - 1, swap_total=0)
    assert ram.judge(at, min_ram_gb=32, preset_name="rtx4090-24g").status is Status.OK
    assert ram.judge(below, min_ram_gb=32, preset_name="rtx4090-24g").status is Status.FAIL
    busy_at = ram.RamFacts(total=64 * GiB, available=32 * GiB, swap_total=0)
    assert ram.judge(busy_at, min_ram_gb=32, preset_name="rtx4090-24g").status is Status.OK


def test_vram_exactly_at_the_preset_minimum_passes_and_a_mib_less_fails():
    def card(total_mib: int) -> gpu.GpuFacts:
        return gpu.GpuFacts("570.0", "12.8", (gpu.Gpu(0, "NVIDIA L40S", total_mib, total_mib, 8.9),))

    assert gpu.judge(card(20 * 1024), min_vram_gb=20, own_pid=1).status is Status.OK
    assert gpu.judge(card(20 * 1024 - 1), min_vram_gb=20, own_pid=1).status is Status.FAIL


def test_the_tts_check_is_a_skip_naming_the_fetch_command_while_kokoros_files_are_missing(tmp_path):
    from itk.checks import tts
    from itk.checks.base import Context

    ctx = Context(preset_name="rtx4090-24g", preset_components=(), min_ram_gb=32, min_vram_gb=20,
                  weights_dir=tmp_path)
    result = tts.check(ctx)
    assert result.status.value == "skip" and "itk fetch --component tts" in result.summary
    assert result.fix == "itk fetch --component tts"
