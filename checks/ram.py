"""Host RAM against the preset: total, available, swap, and the container (cgroup) memory limit.

A cgroup limit below the machine's RAM is the most common hidden cause of `Killed` (exit 137): `free -h`
shows 64 GB while the container may only use 16. Both cgroup v1 and v2 are read.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

from itk.checks.base import Context, Result, Status, gathered_once

GiB = 2**30
UNLIMITED = 2**60  # cgroup files spell "no limit" as "max" (v2) or a huge number (v1)
CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class RamFacts:
    total: int
    available: int
    swap_total: int
    cgroup_version: int | None = None
    cgroup_limit: int | None = None  # bytes; None = no limit
    cgroup_usage: int | None = None
    oom_kills: int | None = None  # kills the cgroup's OOM killer has made so far

    @property
    def usable(self) -> int:
        """The most memory a process here can get."""
        return min(self.total, self.cgroup_limit) if self.cgroup_limit else self.total

    def to_json(self) -> dict:
        return asdict(self)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= UNLIMITED else value


def _read_keyed(path: Path, key: str) -> int | None:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        return None
    return None


class Cgroup(NamedTuple):
    """This process's memory cgroup as mounted in the container (None: not known)."""

    version: int | None
    limit: int | None
    usage: int | None
    oom_kills: int | None  # processes the kernel's OOM killer ended in this cgroup so far


def read_cgroup(root: Path = CGROUP_ROOT) -> Cgroup:
    """The memory cgroup's version, limit, usage and OOM kills."""
    if (root / "cgroup.controllers").exists():
        return Cgroup(
            2,
            _read_int(root / "memory.max"),
            _read_int(root / "memory.current"),
            _read_keyed(root / "memory.events", "oom_kill"),
        )
    mem = root / "memory"
    if (mem / "memory.limit_in_bytes").exists():
        return Cgroup(
            1,
            _read_int(mem / "memory.limit_in_bytes"),
            _read_int(mem / "memory.usage_in_bytes"),
            _read_keyed(mem / "memory.oom_control", "oom_kill"),
        )
    return Cgroup(None, None, None, None)


@gathered_once
def gather(root: Path = CGROUP_ROOT) -> RamFacts:
    import psutil

    vm = psutil.virtual_memory()
    version, limit, usage, kills = read_cgroup(root)
    return RamFacts(vm.total, vm.available, psutil.swap_memory().total, version, limit, usage, kills)


def judge(facts: RamFacts, min_ram_gb: float, preset_name: str, low_ram_gb: float | None = None,
          low_ram_note: str = "") -> Result:
    """The ram verdict for recorded facts: pure, so a 64 GB box or a 16 GB container can be tested.

    low_ram_gb / low_ram_note: the preset's measured low-RAM mode (None: it has none). Below the preset's minimum
    the runtime falls back to it by itself, so a machine that holds that mode's peak runs, only slower: a warn.
    """
    gb = lambda n: n / GiB  # noqa: E731
    details = [
        f"total {gb(facts.total):.1f} GiB, available {gb(facts.available):.1f} GiB, swap {gb(facts.swap_total):.1f} GiB"
    ]
    if facts.cgroup_limit:
        details.append(f"container (cgroup v{facts.cgroup_version}) memory limit {gb(facts.cgroup_limit):.1f} GiB")
    if facts.oom_kills:
        details.append(f"the container's OOM killer has already killed {facts.oom_kills} process(es)")
    usable = gb(facts.usable)
    capped = facts.cgroup_limit is not None and facts.cgroup_limit < facts.total
    where = (f"the container limit is {usable:.1f} GiB (the machine has {gb(facts.total):.1f})" if capped
             else f"this machine has {usable:.1f} GiB")
    if usable < min_ram_gb and low_ram_gb is not None and facts.usable >= low_ram_gb * 1e9:
        return Result(
            "ram", Status.WARN,
            f"{where}; preset {preset_name} pins its DiT in {min_ram_gb:.0f} GB, so it runs in its low-RAM mode",
            [*details, low_ram_note],
            (f"nothing to do to run it; for full speed, raise the container's memory limit to {min_ram_gb:.0f} GB"
             if capped else f"nothing to do to run it; for full speed, use a machine with {min_ram_gb:.0f} GB of RAM"),
            facts.to_json(),
        )
    if usable < min_ram_gb:
        if low_ram_gb is not None:  # even the low-RAM mode does not fit
            need = math.ceil(low_ram_gb)
            summary = (f"{where}; preset {preset_name} needs {min_ram_gb:.0f} GB, and {low_ram_gb:.1f} GB even in its "
                       "low-RAM mode: loading would end in `Killed` (exit 137)")
            fix = (f"raise the container's memory limit to at least {need} GB ({min_ram_gb:.0f} GB for full speed): "
                   f"docker run --memory={need}g, or the pod's resources.limits.memory" if capped
                   else f"use a machine with at least {need} GB of RAM ({min_ram_gb:.0f} GB for full speed), or add "
                   "swap (slow, but avoids `Killed`)")
            return Result("ram", Status.FAIL, summary, [*details, low_ram_note], fix, facts.to_json())
        fix = (
            f"raise the container's memory limit to at least {min_ram_gb:.0f} GB "
            f"(docker run --memory={min_ram_gb:.0f}g, or the pod's resources.limits.memory)"
            if capped
            else f"use a machine with at least {min_ram_gb:.0f} GB of RAM, or add swap (slow, but avoids `Killed`)"
        )
        return Result(
            "ram",
            Status.FAIL,
            f"{where}; preset {preset_name} needs {min_ram_gb:.0f} GB: loading would end in `Killed` (exit 137)",
            details,
            fix,
            facts.to_json(),
        )
    available = gb(facts.available)
    if available < min_ram_gb:
        return Result(
            "ram",
            Status.WARN,
            f"only {available:.1f} GiB available of {usable:.1f}; preset {preset_name} needs {min_ram_gb:.0f} GB",
            details,
            "close memory-heavy programs (browsers, other model servers) before `itk run`",
            facts.to_json(),
        )
    summary = f"{usable:.1f} GiB usable, {available:.1f} GiB available (preset needs {min_ram_gb:.0f} GB)"
    return Result("ram", Status.OK, summary, details, "", facts.to_json())


def check(ctx: Context) -> Result:
    return judge(gather(), ctx.min_ram_gb, ctx.preset_name, ctx.low_ram_gb, ctx.low_ram_note)
