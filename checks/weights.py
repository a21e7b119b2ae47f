"""Weights: every file the preset needs, present and intact (the same verdicts `itk fetch` records).

Default: presence, size and mtime against the recorded verdict, safetensors/.pth header probes and the
recorded hash verdict; a file changed since its verdict fails until it is re-hashed. With --deep every file is
re-hashed against the hub's checksum (recorded at fetch time, or left by `hf download --local-dir` in its
metadata) and the new verdict is recorded. The details say when each file was last hashed.
"""

from __future__ import annotations

import time
from collections import Counter

from itk.checks.base import Context, Result, Status
from itk.runtime.manifest import load_manifest
from itk.runtime.verify import UNUSABLE, FileStatus, check_files


def when(hashed_at: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(hashed_at)) if hashed_at else "never"


def detail(s: FileStatus) -> str:
    state = s.state.replace("_", " ") + (f" ({s.detail})" if s.detail else "")
    return f"{s.label}: {state}; last hashed {when(s.hashed_at)}"


def check(ctx: Context) -> Result:
    files = load_manifest().files_for(ctx.preset_components)
    statuses = check_files(ctx.weights_dir, files, ctx.deep)
    facts = {"files": [{"file": s.label, "state": s.state, "detail": s.detail,
                        "hashed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(s.hashed_at))
                        if s.hashed_at else None} for s in statuses]}
    counts = Counter(s.state for s in statuses)
    problems = [detail(s) for s in statuses if s.state != "ok"]
    n = len(statuses)
    if broken := sum(counts[k] for k in UNUSABLE):
        what = ", ".join(f"{counts[k]} {k.replace('_', ' ')}" for k in UNUSABLE if counts[k])
        fix = f"itk fetch --preset {ctx.preset_name} --weights-dir {ctx.weights_dir}"
        if counts["changed"]:
            fix += " (re-hashes changed files, re-downloads only those that differ; or only check: itk doctor --deep)"
        if counts["unsafe"]:
            fix = next(s.fix for s in statuses if s.state == "unsafe")
        return Result("weights", Status.FAIL, f"{broken} of {n} files of {ctx.preset_name} not usable: {what}",
                      problems, fix=fix, facts=facts)
    if counts["not_verified"]:
        return Result("weights", Status.WARN,
                      f"{n} files of {ctx.preset_name} present; {counts['not_verified']} not verified",
                      problems, fix="itk doctor --deep (hashes them once and records the verdict)", facts=facts)
    how = "re-hashed" if ctx.deep else "verified"
    return Result("weights", Status.OK, f"all {n} files of {ctx.preset_name} present and {how}",
                  [detail(s) for s in statuses], facts=facts)
