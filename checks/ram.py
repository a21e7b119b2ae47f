"""Host RAM against the preset: total, available, swap, and the container (cgroup) memory limit.

A cgroup limit below the machine's RAM is the most common hidden cause of `Killed` (exit 137): `free -h`
shows 64 GB while the container may only use 16. Both cgroup v1 and v2 are read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

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


def read_cgroup(root: Path = CGROUP_ROOT) -> tuple[int | None, int | None, int | None, int | None]:
    """(version, limit, usage, oom_kills) of this process's memory cgroup as mounted in the container."""
    if (root / "cgroup.controllers").exists():
        return (
            2,
            _read_int(root / "memory.max"),
            _read_int(root / "memory.current"),
            _read_keyed(root / "memory.events", "oom_kill"),
        )
    mem = root / "memory"
    if (mem / "memory.limit_in_bytes").exists():
        return (
            1,
            _read_int(mem / "memory.limit_in_bytes"),
            _read_int(mem / "memory.usage_in_bytes"),
            _read_keyed(mem / "memory.oom_control", "oom_kill"),
        )
    return None, None, None, None


@gathered_once
def gather(root: Path = CGROUP_ROOT) -> RamFacts:
    import psutil

    vm = psutil.virtual_memory()
    version, limit, usage, kills = read_cgroup(root)
    return RamFacts(vm.total, vm.available, psutil.swap_memory().total, version, limit, usage, kills)


def judge(facts: RamFacts, min_ram_gb: float, preset_name: str) -> Result:
    """The ram verdict for recorded facts: pure, so a 64 GB box or a 16 GB container can be tested."""
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
    if usable < min_ram_gb:
        where = (
            f"the container limit is {usable:.1f} GiB (the machine has {gb(facts.total):.1f})"
            if capped
            else f"this machine has {usable:.1f} GiB"
        )
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
    return judge(gather(), ctx.min_ram_gb, ctx.preset_name)
