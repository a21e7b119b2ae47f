"""An explicit attention kernel asked of a benchmark (--attention fa4|flash|sage) must be the one it measures.

The runtime falls back to torch SDPA when the chosen kernel does not import: right for a user's video, wrong
for a measurement, which would then record SDPA's time in a run made to measure FlashAttention-4 (the JSON's
"attention" said "sdpa", easy to miss). So a benchmark refuses, in one line naming the package, before it
measures anything. Torch-free and import-free: only the module's presence is looked up (importlib.util.find_spec),
then `refuse_fallback` compares what the runtime actually resolved.
"""

from __future__ import annotations

import importlib
import importlib.util

from itk.checks.flash_attn import FA4_DIST
from itk.runtime.options import ATTENTION_CHOICES, ATTENTION_MODULES

# The pip package of each optional kernel, as `itk doctor --only flash_attn` names it in its install commands.
PACKAGES = {"fa4": FA4_DIST, "flash": "flash-attn", "sage": "sageattention"}
FIX = "install it (`itk doctor --only flash_attn` prints the command) or pass --attention sdpa"


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # its parent package is missing
        return False


def require_attention(choice: str) -> None:
    """SystemExit (one line, exit 1) for an unknown choice or a kernel whose module is not installed."""
    if choice not in ATTENTION_CHOICES:
        raise SystemExit(f"--attention {choice}: expected one of {', '.join(ATTENTION_CHOICES)}")
    module = ATTENTION_MODULES.get(choice)  # auto and sdpa need nothing
    if module is not None and not installed(module):
        raise SystemExit(f"--attention {choice}: {module} is not installed (pip package {PACKAGES[choice]}), so the "
                         f"benchmark would measure torch SDPA instead; {FIX}")


def refuse_fallback(choice: str, resolved: str) -> None:
    """SystemExit when the runtime resolved another kernel than the one asked for (installed but not importing:
    built for another torch, an undefined symbol, half of a namespace package)."""
    if choice in ("auto", resolved):
        return
    module = ATTENTION_MODULES[choice]
    try:
        importlib.import_module(module)
        why = f"{module} imports but the runtime could not use it"
    except Exception as exc:  # noqa: BLE001 - whatever the import raised is the reason
        why = f"{module} does not import ({type(exc).__name__}: {exc})".replace("\n", " ")
    raise SystemExit(f"--attention {choice}: {why}, so the benchmark would measure {resolved} instead; {FIX}")
