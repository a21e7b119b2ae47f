"""The attention kernel: which one this machine's runtime uses, and flash-attn's health where it matters.

flash-attn, SageAttention and FlashAttention-4 are optional for our runtime (it falls back to torch SDPA), so
absent is a warn, broken a fail; and only where the runtime would use them: `preferred_attention` is the ONE
per-GPU choice, read by this check and by the runtime's attention (torch-free, so both sides can import it).
Every summary names the kernel the runtime will use here.

The classic break is `undefined symbol` after a torch upgrade: the wheel was built against another torch ABI.
PyPI only has a source build that takes hours, so the fix names a prebuilt release wheel for this stack.
"""

from __future__ import annotations

from importlib import metadata

from itk.checks import gpu, probe
from itk.checks.base import Context, Result, Status
from itk.runtime.options import attention_order, preferred_attention

FA_RELEASE = "2.8.3"
SAGE_INSTALL = "pip install sageattention==1.0.6 (Triton only: nothing to compile)"
FA4_DIST = "flash-attn-4"


def fa4_install(facts: dict) -> str:
    """pip command for FlashAttention-4: Python + NVIDIA's CUTLASS DSL wheels (the CUDA 13 ones for a CUDA 13
    torch); its kernels compile at first use, so nothing builds at install."""
    cuda_major = ((facts.get("torch") or {}).get("cuda_build") or "12").split(".")[0]
    extra = "[cu13]" if cuda_major == "13" else ""
    return f'pip install "{FA4_DIST}{extra}" (nothing to compile)'


def wheel_command(facts: dict) -> str:
    """pip command for the flash-attn release wheel matching this torch, CUDA major, Python and C++ ABI."""
    t = facts.get("torch", {})
    torch_mm = ".".join((t.get("version") or "2.8").split("+")[0].split(".")[:2])
    cuda_major = (t.get("cuda_build") or "12").split(".")[0]
    py = "cp" + "".join(facts.get("python", "3.11").split(".")[:2])
    abi = "TRUE" if t.get("cxx11_abi", True) else "FALSE"
    name = f"flash_attn-{FA_RELEASE}+cu{cuda_major}torch{torch_mm}cxx11abi{abi}-{py}-{py}-linux_x86_64.whl"
    return (
        f"pip install https://github.com/Dao-AILab/flash-attention/releases/download/v{FA_RELEASE}/{name} "
        "(if that wheel does not exist for this torch, keep SDPA: it computes the same)"
    )


def installed_kernels(facts: dict) -> set[str]:
    """The optional kernels that import here, from the probe's facts (sageattention's version read by check)."""
    kernels = {"sage"} if facts.get("sageattention", {}).get("version") else set()
    fa = facts["flash-attn"]
    return kernels | ({"flash"} if fa["version"] and not fa.get("import_error") else set())


def judge(facts: dict, gpu_facts: gpu.GpuFacts) -> Result:
    if "error" in facts:
        return Result("flash_attn", Status.SKIP, "not checked: " + facts["error"])
    fa = facts["flash-attn"]
    best = gpu_facts.best
    if best is not None and "fa4" in attention_order(best.compute_capability):
        return _fa4_here(facts, best)
    if best is not None and "flash" not in attention_order(best.compute_capability):
        return _not_used_here(fa, best)
    if best is not None and preferred_attention(best.compute_capability, installed_kernels(facts)) == "sage":
        return _sage_used(facts, best)
    if not fa["version"]:
        if best is None:
            return Result("flash_attn", Status.SKIP, "not installed (no GPU here: not used)")
        sage = "sage" in attention_order(best.compute_capability)
        return Result(
            "flash_attn", Status.WARN, "not installed: the runtime uses torch SDPA (same math, often slower)",
            fix=(SAGE_INSTALL + ", the fastest here; or " if sage else "") + wheel_command(facts), facts=fa,
        )
    if fa.get("import_error"):
        abi = "undefined symbol" in fa["import_error"]
        summary = (
            f"flash-attn {fa['version']} was built for another torch (ABI break): {fa['import_error']}"
            if abi else f"flash-attn {fa['version']} does not import: {fa['import_error']}"
        )
        return Result(
            "flash_attn", Status.FAIL, summary,
            fix="pip uninstall -y flash-attn, then " + wheel_command(facts), facts=fa,
        )
    return Result("flash_attn", Status.OK, f"flash-attn {fa['version']} imports: the runtime uses it here",
                  facts=fa)


def _sage_used(facts: dict, best: gpu.Gpu) -> Result:
    """An Ada GPU with SageAttention installed: the runtime's kernel; a broken flash-attn only matters to the
    official scripts (which import it)."""
    fa, version = facts["flash-attn"], facts["sageattention"]["version"]
    summary = f"the runtime uses SageAttention {version} (8-bit) on {best.name} (cc {best.compute_capability})"
    if fa.get("import_error"):
        return Result("flash_attn", Status.WARN, f"{summary}; flash-attn {fa['version']} does not import "
                      f"({fa['import_error']})", fix="pip uninstall -y flash-attn", facts=fa)
    return Result("flash_attn", Status.OK, summary, facts=fa)


def _fa4_here(facts: dict, best: gpu.Gpu) -> Result:
    """Hopper / Blackwell: FlashAttention-4 is the runtime's kernel when installed, else SDPA (cuDNN); the
    FlashAttention-2 wheel is never advised here and a broken one only matters to the official scripts."""
    fa, version = facts["flash-attn"], (facts.get(FA4_DIST) or {}).get("version")
    where = f"{best.name} (cc {best.compute_capability})"
    broken = f"; flash-attn {fa['version']} does not import ({fa['import_error']})" if fa.get("import_error") else ""
    uninstall = "pip uninstall -y flash-attn" if broken else ""
    if version:
        return Result("flash_attn", Status.WARN if broken else Status.OK,
                      f"the runtime uses FlashAttention-4 {version} on {where}{broken}", fix=uninstall, facts=fa)
    return Result("flash_attn", Status.WARN,
                  f"the runtime uses torch SDPA (cuDNN) on {where}: FlashAttention-4 is not installed, about 1.2x "
                  f"faster per attention here (33.9 vs 40.4 ms at 480p on an H200){broken}",
                  fix=" && ".join(filter(None, (uninstall, fa4_install(facts)))), facts=fa)


def _not_used_here(fa: dict, best: gpu.Gpu) -> Result:
    """A GPU where the runtime uses SDPA: flash-attn is never advised; a broken one only matters to the
    official scripts (which import it), so its fix is to remove it."""
    why = (f"FlashAttention-2 is slower than SDPA's cuDNN kernel on {best.name} (cc {best.compute_capability})"
           if best.compute_capability >= 9 else
           f"{best.name} (cc {best.compute_capability}) is not supported by FlashAttention-2")
    if fa.get("import_error"):
        return Result("flash_attn", Status.WARN,
                      f"flash-attn {fa['version']} does not import ({fa['import_error']}); itk's runtime does not "
                      f"use it here: {why}",
                      fix="pip uninstall -y flash-attn (the runtime uses torch SDPA on this GPU)", facts=fa)
    state = f"flash-attn {fa['version']} installed" if fa["version"] else "not installed"
    return Result("flash_attn", Status.OK, f"{state}; not needed: the runtime uses torch SDPA here ({why})",
                  facts=fa)


def _version(dist: str) -> str | None:
    """An installed distribution's version, read from its metadata (importing FlashAttention-4 takes ~10 s)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def check(ctx: Context) -> Result:
    facts = probe.run_probe()
    if "error" not in facts:
        facts["sageattention"] = {"version": _version("sageattention")}
        facts[FA4_DIST] = {"version": _version(FA4_DIST)}
    return judge(facts, gpu.gather())
