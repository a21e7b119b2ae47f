"""Progress bars for the generator's events: "clip 2 of 5, step 13 of 40, ETA" instead of a tqdm bar that
restarts for every clip (which people read as the same work done again)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class ProgressView:
    """Two bars: the whole run in denoising steps (with the ETA) and the current clip's steps."""

    def __init__(self, console: Console, clips: int, steps: int):
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False,
        )
        self.clips, self.steps = clips, steps
        self.total = self.progress.add_task("starting", total=clips * steps)
        self.clip = self.progress.add_task("clip", total=steps, visible=False)
        self.stage = "starting"

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
