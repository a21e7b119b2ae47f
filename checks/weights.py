"""Weights: every file the preset needs, present and intact (the same verdicts `itk fetch` records).

Default: presence, size against the recorded size, safetensors/.pth header probes and the recorded hash
verdict. With --deep every file is re-hashed against the hub's checksum (recorded at fetch time, or left by
`hf download --local-dir` in its metadata) and the new verdict is recorded.
"""

from __future__ import annotations

from collections import Counter

from itk.checks.base import Context, Result, Status
from itk.manifest import load_manifest
from itk.verify import UNUSABLE, check_files


def check(ctx: Context) -> Result:
    files = load_manifest().files_for(ctx.preset_components)
    statuses = check_files(ctx.weights_dir, files, ctx.deep)
    facts = {"files": [{"file": s.label, "state": s.state, "detail": s.detail} for s in statuses]}
    counts = Counter(s.state for s in statuses)
    details = [f"{s.label}: {s.state.replace('_', ' ')}" + (f" ({s.detail})" if s.detail else "")
               for s in statuses if s.state != "ok"]
    n = len(statuses)
    if broken := sum(counts[k] for k in UNUSABLE):
        what = ", ".join(f"{counts[k]} {k.replace('_', ' ')}" for k in UNUSABLE if counts[k])
        return Result("weights", Status.FAIL, f"{broken} of {n} files of {ctx.preset_name} not usable: {what}",
                      details, fix=f"itk fetch --preset {ctx.preset_name} --weights-dir {ctx.weights_dir}",
                      facts=facts)
    if counts["not_verified"]:
        return Result("weights", Status.WARN,
                      f"{n} files of {ctx.preset_name} present; {counts['not_verified']} not verified",
                      details, fix="itk doctor --deep (hashes them once and records the verdict)", facts=facts)
    how = "re-hashed" if ctx.deep else "verified"
    return Result("weights", Status.OK, f"all {n} files of {ctx.preset_name} present and {how}", facts=facts)
