"""torch: installed, its CUDA build against what the driver supports, and whether it sees the GPU."""

from __future__ import annotations

from itk.checks import gpu, probe
from itk.checks.base import Context, Result, Status

# CUDA variants PyTorch publishes wheels for (download.pytorch.org/whl/cuXYZ), oldest first.
CUDA_WHEELS = ("11.8", "12.1", "12.4", "12.6", "12.8", "12.9", "13.0")


def _v(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def wheel_for_driver(driver_cuda: str) -> str | None:
    """The newest PyTorch CUDA variant this driver can run, as 'cu124'; None if none can."""
    fitting = [c for c in CUDA_WHEELS if _v(c) <= _v(driver_cuda)]
    return "cu" + fitting[-1].replace(".", "") if fitting else None


def install_command(torch_version: str | None, driver_cuda: str) -> str:
    variant = wheel_for_driver(driver_cuda) or "cu118"
    pin = f"torch=={torch_version.split('+')[0]}" if torch_version else "torch"
    return f"pip install --force-reinstall '{pin}' --index-url https://download.pytorch.org/whl/{variant}"


def judge(facts: dict, gpu_facts: gpu.GpuFacts) -> Result:
    if "error" in facts:
        return Result("torch", Status.FAIL, facts["error"], fix="run `python -c 'import torch'` to see the error")
    t = facts["torch"]
    if not t["version"]:
        return Result("torch", Status.FAIL, "torch is not installed", fix="run `make setup` (or `pip install torch`)")
    if t.get("import_error"):
        return Result(
            "torch", Status.FAIL, f"torch {t['version']} does not import: {t['import_error']}",
            fix="reinstall torch: " + install_command(t["version"], gpu_facts.cuda_driver_version or "12.4"),
            facts=t,
        )
    has_gpu = bool(gpu_facts.gpus)
    build = t.get("cuda_build")
    details = [f"torch {t['version']}, CUDA build {build or 'none (CPU)'}, cuda.is_available() = {t['cuda_available']}"]
    if not has_gpu:
        return Result("torch", Status.OK, f"torch {t['version']} (no GPU here: CPU only, fine for `itk selftest`)",
                      details, facts=t)
    driver = gpu_facts.cuda_driver_version or "0.0"
    if not build:
        return Result(
            "torch", Status.FAIL, f"torch {t['version']} is a CPU build on a machine with an NVIDIA GPU",
            details, "install the CUDA build: " + install_command(t["version"], driver), facts=t,
        )
    if _v(build) > _v(driver):
        return Result(
            "torch", Status.FAIL,
            f"torch is built for CUDA {build} but the driver supports only up to CUDA {driver}",
            details, f"update the NVIDIA driver, or install a matching build: {install_command(t['version'], driver)}",
            facts=t,
        )
    if not t["cuda_available"]:
        return Result(
            "torch", Status.FAIL, "torch.cuda.is_available() is False although a GPU is present",
            details, "check CUDA_VISIBLE_DEVICES and that this user can open /dev/nvidia*; then `nvidia-smi`",
            facts=t,
        )
    return Result("torch", Status.OK, f"torch {t['version']}, CUDA {build} (driver supports {driver})", details,
                  facts=t)


def check(ctx: Context) -> Result:
    return judge(probe.run_probe(), gpu.gather())
