"""Progress bars for the generator's events: "clip 2 of 5, step 13 of 40, ETA" instead of a tqdm bar that
restarts for every clip (which people read as the same work done again).

The ETA comes from the step times measured in THIS run (a constant from a guide or another GPU is wrong by
a factor of several either way), plus the time each clip spends outside its steps (decode, encode), once a
clip boundary has been crossed."""

from __future__ import annotations

from statistics import median
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from itk.run import duration
from itk.runtime.protocol import stage_words

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


def eta_s(step_times: list[float], clip_overheads: list[float], steps_left: int, clips_left: int) -> float | None:
    """Seconds left: the typical step of this run times the steps left, plus the typical time a clip spent
    outside its steps times the clips whose decode is still to come. None before a step has been timed."""
    if not step_times:
        return None
    return steps_left * median(step_times) + clips_left * (median(clip_overheads) if clip_overheads else 0.0)


class ProgressView:
    """Two bars: the whole run in denoising steps (with the ETA) and the current clip's steps, with the
    clips done and the seconds of video written so far."""

    def __init__(self, console: Console, clips: int, steps: int, expected_step_s: float | None = None):
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[note]}"), console=console, transient=False,
        )
        self.clips, self.steps = clips, steps
        self.total = self.progress.add_task("starting", total=clips * steps, note="")
        self.clip = self.progress.add_task("clip", total=steps, visible=False, note="")
        self.stage = "starting"
        self.expected_step_s = expected_step_s
        self.step_times: list[float] = []  # seconds between consecutive steps of one clip, this run
        self.clip_overheads: list[float] = []  # a clip boundary's time beyond one step: decode, setup
        self.last_step_at: float | None = None
        self.current = 1
        self.done_clips = 0
        self.video_s: float | None = None
        self.warned = False
        self.resume_told = False
        self.finished = False

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
        if event.get("video_s") is not None:
            self.video_s = float(event["video_s"])
        if kind == "step":
            clip, step = int(event.get("clip") or self.current), int(event.get("step") or 0)
            self._enter_clip(clip)
            self._time_step(step, event.get("elapsed_s"))
            self.progress.update(self.total, total=self.clips * self.steps, completed=(clip - 1) * self.steps + step,
                                 description=f"[bold]{stage_words(self.stage)}")
            self.progress.update(self.clip, total=self.steps, completed=step, visible=True,
                                 description=f"clip {clip} of {self.clips}")
        elif kind == "clip":
            clip = int(event.get("clip") or self.current)
            self._enter_clip(clip)
            self.done_clips = int(event.get("clips_done", clip - 1))
            self.progress.update(self.clip, total=self.steps, completed=0, visible=True,
                                 description=f"clip {clip} of {self.clips}")
            self.progress.update(self.total, total=self.clips * self.steps, completed=(clip - 1) * self.steps)
        elif kind == "done":  # the whole length is said by the closing line, not a count from the last clip's start
            self.done_clips, self.finished, self.video_s = self.clips, True, None
            self.progress.update(self.total, completed=self.clips * self.steps, description="[green]done")
        elif kind == "stage" and self.stage == "resume":
            self._tell_resume(event)
        else:
            self.progress.update(self.total, description=f"[bold]{stage_words(self.stage)}")
        self._notes()

    def _enter_clip(self, clip: int) -> None:
        if clip != self.current:
            self.done_clips = max(self.done_clips, clip - 1)
            self.current = clip

    def _tell_resume(self, event: dict[str, Any]) -> None:
        """One line, once: itk's own (before launch, with the state folder's counts) or the generator's."""
        if self.resume_told:
            return
        line = event.get("message") or (f"resuming from clip {event['from_clip']} of {self.clips}"
                                         if event.get("from_clip") else "resuming the interrupted run")
        self.resume_told = True
        self.progress.console.print(str(line), highlight=False, soft_wrap=True)

    def _notes(self) -> None:
        completed = self.progress.tasks[self.total].completed
        left = eta_s(self.step_times, self.clip_overheads, int(self.clips * self.steps - completed),
                     self.clips - self.done_clips)
        self.progress.update(self.total, note="" if left is None or self.finished else f"ETA {duration(left)}")
        written = f", {self.video_s:.1f} s of video written" if self.video_s is not None else ""
        self.progress.update(self.clip, note=f"{self.done_clips} of {self.clips} clips done{written}")

    def _time_step(self, step: int, elapsed: float | None) -> None:
        if elapsed is None:
            return
        if self.last_step_at is not None:
            interval = float(elapsed) - self.last_step_at
            if step > 1:
                self.step_times.append(interval)
            elif self.step_times:  # a clip's first step also holds the last clip's decode and this one's setup
                self.clip_overheads.append(max(0.0, interval - median(self.step_times)))
        self.last_step_at = float(elapsed)
        note = None if self.warned else slow_step_note(self.step_times, self.expected_step_s)
        if note:
            self.warned = True
            self.progress.console.print(f"[yellow]warning:[/] {note}", highlight=False, soft_wrap=True)
