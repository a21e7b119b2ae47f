"""`itk doctor`: pick the preset from the machine's facts, run every check, render like flutter doctor."""

from __future__ import annotations

import importlib
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from itk.checks import CHECKS
from itk.checks.base import Context, Result, Status
from itk.console import EXIT_FAILED, EXIT_OK, EXIT_USAGE, UserError, console, print_json
from itk.paths import weights_dir as resolve_weights_dir
from itk.presets import MachineFacts, Preset, choose_preset, get_preset

SYMBOLS = {Status.OK: "[green]✓[/]", Status.WARN: "[yellow]![/]", Status.FAIL: "[red]✗[/]", Status.SKIP: "[dim]-[/]"}


def machine_facts() -> MachineFacts:
    """What the preset choice needs, from NVML and the RAM/cgroup facts (both cheap)."""
    from itk.checks import gpu, ram

    g, r = gpu.gather(), ram.gather()
    best = g.best
    return MachineFacts(
        vram_gb=best.total_mib / 1024 if best else None,
        compute_capability=best.compute_capability if best else None,
        ram_gb=r.usable / 2**30,
    )


def resolve_preset(name: str | None) -> tuple[Preset, str]:
    if name:
        try:
            return get_preset(name), f"{name} (chosen with --preset)"
        except KeyError as exc:
            raise UserError(str(exc.args[0]), "`itk presets` lists them", EXIT_USAGE) from None
    return choose_preset(machine_facts())


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


def render(results: list[Result], preset_line: str, verbose: bool, elapsed: float) -> None:
    from rich.table import Table

    console.print(f"[bold]preset[/] {preset_line}", highlight=False)
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    table.add_column("", width=1)
    table.add_column("check")
    table.add_column("result", overflow="fold")
    for r in results:
        table.add_row(SYMBOLS[r.status], r.id, r.summary)
    console.print(table)
    problems = [r for r in results if r.status in (Status.WARN, Status.FAIL)]
    for r in results:
        if verbose or r in problems:
            for line in r.details:
                console.print(f"  [dim]{r.id}:[/] {line}", highlight=False)
    for r in problems:
        if r.fix:
            console.print(f"{SYMBOLS[r.status]} [bold]{r.id}[/] fix: {r.fix}", highlight=False)
    console.print(f"[bold]{summary_line(results)}[/] [dim]({elapsed:.1f} s)[/]", highlight=False)


def run_doctor(only: list[str] | None, deep: bool, preset_name: str | None, weights_dir: str | None,
               as_json: bool, verbose: bool) -> int:
    start = time.perf_counter()
    ids = only or list(CHECKS)
    unknown = [i for i in ids if i not in CHECKS]
    if unknown:
        raise UserError(f"unknown check id(s): {', '.join(unknown)}", f"known: {', '.join(CHECKS)}", EXIT_USAGE)
    preset, why = resolve_preset(preset_name)
    ctx = Context(
        preset_name=preset.name,
        preset_components=preset.components,
        min_ram_gb=preset.min_ram_gb,
        min_vram_gb=preset.min_vram_gb,
        weights_dir=resolve_weights_dir(weights_dir),
        deep=deep,
    )
    results = run_checks(ids, ctx)
    elapsed = time.perf_counter() - start
    failed = any(r.status is Status.FAIL for r in results)
    if as_json:
        print_json({
            "preset": preset.name,
            "preset_reason": why,
            "weights_dir": str(Path(ctx.weights_dir).absolute()),
            "results": [r.to_json() for r in results],
            "summary": summary_line(results),
            "ok": not failed,
            "elapsed_s": round(elapsed, 3),
        })
    else:
        render(results, why, verbose, elapsed)
    return EXIT_FAILED if failed else EXIT_OK
