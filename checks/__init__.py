"""Doctor checks, one module each. The registry maps a check id to its module; every module has
`check(ctx) -> Result`. Modules are imported only when their check runs, so `itk --help` stays light."""

from __future__ import annotations

CHECKS: dict[str, str] = {
    "gpu": "itk.checks.gpu",
    "torch": "itk.checks.torch_cuda",
    "ram": "itk.checks.ram",
    "disk": "itk.checks.disk",
    "flash_attn": "itk.checks.flash_attn",
    "numpy": "itk.checks.numpy_pin",
    "packages": "itk.checks.packages",
    "ffmpeg": "itk.checks.ffmpeg",
    "port": "itk.checks.port",
    "weights": "itk.checks.weights",
    "tts": "itk.checks.tts",
}
