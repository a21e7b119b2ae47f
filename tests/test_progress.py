"""The run's progress as a person reads it: clips done of the total, seconds of video written, and an ETA
from the step times measured in this run (never a constant)."""

from __future__ import annotations

from rich.console import Console

from itk.progress import ProgressView, eta_s


def test_the_eta_is_the_typical_step_of_this_run_times_the_steps_left_plus_each_clips_decode():
    assert eta_s([], [], steps_left=100, clips_left=3) is None  # nothing measured yet: no number
    assert eta_s([10.0, 12.0, 11.0], [], steps_left=10, clips_left=2) == 110.0
    assert eta_s([10.0, 10.0, 1000.0], [30.0], steps_left=10, clips_left=2) == 160.0  # one hiccup: the median


def feed_clip(view: ProgressView, clip: int, clips: int, steps: int, start: float, step_s: float,
              video_s: float | None) -> float:
    event = {"event": "clip", "clip": clip, "clips": clips}
    if video_s is not None:
        event["video_s"] = video_s
    view.handle(event)
    t = start
    for step in range(1, steps + 1):
        t += step_s
        view.handle({"event": "step", "clip": clip, "step": step, "steps": steps, "elapsed_s": t})
    return t


def notes(view: ProgressView) -> tuple[str, str]:
    total, clip = view.progress.tasks
    return total.fields["note"], clip.fields["note"]


def test_the_clip_bar_shows_clips_done_and_video_written_and_the_eta_follows_this_runs_steps():
    view = ProgressView(Console(record=True, width=200), clips=4, steps=10)
    view.handle({"event": "stage", "stage": "generate", "clips": 4})
    t = feed_clip(view, 1, 4, 10, start=100.0, step_s=6.0, video_s=0.0)
    # 9 step intervals of 6 s measured; 30 steps left; no clip boundary crossed yet.
    assert notes(view) == ("ETA 3 min 00 s", "0 of 4 clips done, 0.0 s of video written")
    t = feed_clip(view, 2, 4, 10, start=t + 24.0, step_s=6.0, video_s=3.24)  # 24 s of decode + setup
    total, clip = notes(view)
    assert clip == "1 of 4 clips done, 3.2 s of video written"
    assert total == "ETA 3 min 12 s"  # 20 steps x 6 s + 3 clip boundaries x 24 s = 192 s
    view.handle({"event": "done", "path": "/x.mp4", "seconds": 400.0})
    assert notes(view) == ("", "4 of 4 clips done")  # the closing line says the whole length


def test_a_slower_gpu_gets_a_longer_eta_from_its_own_steps():
    fast, slow = (ProgressView(Console(record=True, width=200), clips=2, steps=10) for _ in range(2))
    feed_clip(fast, 1, 2, 10, start=0.0, step_s=8.0, video_s=None)
    feed_clip(slow, 1, 2, 10, start=0.0, step_s=70.0, video_s=None)
    assert notes(fast)[0] == "ETA 1 min 20 s" and notes(slow)[0] == "ETA 11 min 40 s"
    assert notes(fast)[1] == "0 of 2 clips done"  # no video_s in the events: nothing claimed


def test_a_resumed_run_is_said_once_and_its_bar_starts_at_the_clips_already_done():
    console = Console(record=True, width=200)
    with ProgressView(console, clips=5, steps=4) as view:
        view.handle({"event": "stage", "stage": "resume", "message": "resuming /v/talk.mp4: 3 of 5 clips already done",
                     "origin": "itk"})
        view.handle({"event": "stage", "stage": "resume", "from_clip": 4})  # the generator's own, later
        view.handle({"event": "clip", "clip": 4, "clips": 5, "clips_done": 3, "video_s": 9.0})
        assert view.progress.tasks[0].completed == 12 and notes(view)[1] == "3 of 5 clips done, 9.0 s of video written"
    text = console.export_text()
    assert text.count("resuming /v/talk.mp4: 3 of 5 clips already done") == 1 and "resuming from clip" not in text
