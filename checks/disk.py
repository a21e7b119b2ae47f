"""Disk: free space where the weights go against the bytes the preset still needs."""

from __future__ import annotations

from itk.checks.base import Context, Result, Status
from itk.runtime.manifest import load_manifest, missing_bytes
from itk.runtime.paths import existing_parent, free_bytes

GB = 10**9
MARGIN = 2 * GB  # room for .incomplete files and the run's outputs


def judge(free: int, missing: int, where: str, preset_name: str) -> Result:
    facts = {"free_bytes": free, "missing_bytes": missing, "where": where}
    if missing == 0:
        return Result("disk", Status.OK, f"all weights of {preset_name} present; {free / GB:.1f} GB free", facts=facts)
    need = missing + MARGIN
    if free < need:
        return Result(
            "disk", Status.FAIL,
            f"{free / GB:.1f} GB free at {where}, {preset_name} still needs {missing / GB:.1f} GB"
            f" (+{MARGIN // GB} GB margin)",
            fix=f"free {(need - free) / GB:.1f} GB there, or put the weights elsewhere: "
            "--weights-dir DIR (or ITK_WEIGHTS)",
            facts=facts,
        )
    return Result("disk", Status.OK, f"{free / GB:.1f} GB free, {missing / GB:.1f} GB still to download", facts=facts)


def check(ctx: Context) -> Result:
    files = load_manifest().files_for(ctx.preset_components)
    where = existing_parent(ctx.weights_dir)
    return judge(free_bytes(ctx.weights_dir), missing_bytes(files, ctx.weights_dir), str(where), ctx.preset_name)
