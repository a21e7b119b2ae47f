"""`itk doctor`: run every check against the preset (chosen by itk.presets) and return the report;
itk.console renders it like flutter doctor (or as JSON)."""

from __future__ import annotations

import importlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from itk.checks import CHECKS
from itk.checks.base import Context, Result, Status
from itk.measured import low_ram_mode
from itk.presets import Preset, resolve_preset
from itk.runtime.paths import weights_dir as resolve_weights_dir
from itk.runtime.protocol import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, UserError


def run_checks(ids: list[str], ctx: Context) -> list[Result]:
    def one(check_id: str) -> Result:
        try:
            return importlib.import_module(CHECKS[check_id]).check(ctx)
        except Exception as exc:  # noqa: BLE001 - a broken check must not hide the others
            return Result(check_id, Status.FAIL, f"the check itself failed: {type(exc).__name__}: {exc}",
                          fix="rerun with --debug and report it")

    # Checks wait on I/O (NVML, hashing, the import probe): threads overlap them.
    with ThreadPoolExecutor(max_workers=len(ids) or 1) as pool:
        return list(pool.map(one, ids))


def summary_line(results: list[Result]) -> str:
    counts = {s: sum(r.status == s for r in results) for s in Status}
    parts = [f"{counts[Status.OK]} ok"]
    for status, word in ((Status.WARN, "warning"), (Status.FAIL, "failure"), (Status.SKIP, "skipped")):
        n = counts[status]
        if n or status is not Status.SKIP:
            parts.append(f"{n} {word}{'s' if n != 1 and status is not Status.SKIP else ''}")
    return ", ".join(parts)


@dataclass
class DoctorReport:
    """What `itk doctor` found: the preset it judged against (and why), and one result per check."""

    preset: str
    preset_reason: str
    weights_dir: Path
    results: list[Result]
    elapsed_s: float

    @property
    def ok(self) -> bool:
        return not any(r.status is Status.FAIL for r in self.results)

    @property
    def summary(self) -> str:
        return summary_line(self.results)

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.ok else EXIT_FAILED

    def to_json(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "preset_reason": self.preset_reason,
            "weights_dir": str(self.weights_dir.absolute()),
            "results": [r.to_json() for r in self.results],
            "summary": self.summary,
            "ok": self.ok,
            "elapsed_s": round(self.elapsed_s, 3),
        }


def check_context(preset: Preset, weights_dir: str | Path | None, deep: bool = False) -> Context:
    """What the checks judge against: the preset's needs, and its measured low-RAM mode where it has one."""
    low_ram = low_ram_mode(preset.name)
    return Context(
        preset_name=preset.name,
        preset_components=preset.components,
        min_ram_gb=preset.min_ram_gb,
        min_vram_gb=preset.min_vram_gb,
        weights_dir=resolve_weights_dir(weights_dir),
        deep=deep,
        low_ram_gb=low_ram.peak_rss_gb if low_ram else None,
        low_ram_note=low_ram.statement if low_ram else "",
    )


def run_doctor(only: list[str] | None = None, deep: bool = False, preset_name: str | None = None,
               weights_dir: str | Path | None = None) -> DoctorReport:
    """Run the checks (all, or `only` these ids) without printing. UserError (exit 2) for an unknown id."""
    start = time.perf_counter()
    ids = only or list(CHECKS)
    unknown = [i for i in ids if i not in CHECKS]
    if unknown:
        raise UserError(f"unknown check id(s): {', '.join(unknown)}", f"known: {', '.join(CHECKS)}", EXIT_BAD_INPUT)
    preset, why = resolve_preset(preset_name)
    ctx = check_context(preset, weights_dir, deep)
    results = run_checks(ids, ctx)
    return DoctorReport(preset.name, why, ctx.weights_dir, results, time.perf_counter() - start)
