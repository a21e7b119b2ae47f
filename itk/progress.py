"""Progress bars for the generator's events: "clip 2 of 5, step 13 of 40, ETA" instead of a tqdm bar that
restarts for every clip (which people read as the same work done again)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

SLOW_FACTOR = 3  # a step this many times slower than the preset's measured time is worth saying early
SLOW_AFTER = 3  # steps measured before judging


def slow_step_note(step_times: list[float], expected_s: float | None) -> str | None:
    """A warning when the first steps run far slower than the preset's measured time (P11: WSL/Windows
    sysmem fallback turns an OOM into a 100x slowdown; narrow PCIe risers do the same, silently)."""
    if expected_s is None or len(step_times) < SLOW_AFTER:
        return None
    typical = sorted(step_times)[len(step_times) // 2]
    if typical <= SLOW_FACTOR * expected_s:
        return None
    return (f"steps take {typical:.0f} s, {typical / expected_s:.0f}x the {expected_s:.0f} s measured for this preset: "
            "the GPU may be spilling to system memory (Windows/WSL 'CUDA - Sysmem Fallback Policy') or sit on a "
            "narrow PCIe link; `itk doctor --only gpu` shows the GPU, and a real OOM is better than this")


class ProgressView:
    """Two bars: the whole run in denoising steps (with the ETA) and the current clip's steps."""

    def __init__(self, console: Console, clips: int, steps: int, expected_step_s: float | None = None):
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False,
        )
        self.clips, self.steps = clips, steps
        self.total = self.progress.add_task("starting", total=clips * steps)
        self.clip = self.progress.add_task("clip", total=steps, visible=False)
        self.stage = "starting"
        self.expected_step_s = expected_step_s
        self.step_times: list[float] = []
        self.last_step_at: float | None = None
        self.warned = False

    def __enter__(self) -> ProgressView:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def handle(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        self.clips = int(event.get("clips") or self.clips)
        self.steps = int(event.get("steps") or self.steps)
        if event.get("stage"):
            self.stage = str(event["stage"])
        clip = int(event.get("clip") or 1)
        if kind == "step":
            step = int(event.get("step") or 0)
            self._time_step(step, event.get("elapsed_s"))
            self.progress.update(self.total, total=self.clips * self.steps,
                                 completed=(clip - 1) * self.steps + step, description=f"[bold]{self.stage}")
            self.progress.update(self.clip, total=self.steps, completed=step, visible=True,
                                 description=f"clip {clip} of {self.clips}")
        elif kind == "clip":
            self.progress.update(self.clip, total=self.steps, completed=0, visible=True,
                                 description=f"clip {clip} of {self.clips}")
            self.progress.update(self.total, total=self.clips * self.steps, completed=(clip - 1) * self.steps)
        elif kind == "done":
            self.progress.update(self.total, completed=self.clips * self.steps, description="[green]done")
        else:
            self.progress.update(self.total, description=f"[bold]{self.stage}")

    def _time_step(self, step: int, elapsed: float | None) -> None:
        if elapsed is None:
            return
        if self.last_step_at is not None and step > 1:  # a clip's first step also holds the clip's setup
            self.step_times.append(float(elapsed) - self.last_step_at)
        self.last_step_at = float(elapsed)
        note = None if self.warned else slow_step_note(self.step_times, self.expected_step_s)
        if note:
            self.warned = True
            self.progress.console.print(f"[yellow]warning:[/] {note}", highlight=False, soft_wrap=True)
