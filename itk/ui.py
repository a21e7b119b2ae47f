"""`itk ui`: a web page (Gradio) for people who would rather click than type.

The page is a client of the toolkit's functions, as the terminal is: the Generate view builds the same RunSpec
as `itk run` (itk.spec) and calls itk.run's plan_run + run_job (the same checks, supervisor and advice), the
Machine view calls itk.doctor's run_doctor and runs `itk fetch` as a child, and with `--queue DIR` a Queue view
reads the job store of a running `itk batch`/`itk serve`. One generator at a time, always: a job's processes
are gone before the next job's generator starts, however the job ended (itk.ui_jobs.GpuSlot). Job work that
needs no Gradio lives in itk.ui_jobs.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from itk.runtime.protocol import EXIT_BAD_INPUT, FLAG, Flag, UserError, is_video, settable, write_job
from itk.ui_jobs import (
    Fetching,
    GpuSlot,
    Progress,
    Running,
    Staged,
    Ticket,
    advanced_setting,
    drop_uploads,
    flag_choice_words,
    job_spec,
    multi_speaker,
    page_error,
    public_error,
    queue_rows,
    repeat_command,
    speech_from_text,
    stage_uploads,
    web_words,
)

DEFAULT_PORT = 8418  # the official app.py's port, which the doctor's port check watches
MAX_UPLOAD = "2gb"  # per file; Gradio refuses a larger upload before it is stored
UPLOAD_MAX_AGE_S = 24 * 3600  # an upload no job used is dropped after a day (and all of them when the server stops)
POLL_S = 0.5  # the job's view is redrawn (and a closed tab or Gradio's cancel noticed) this often
QUEUE_EVERY_S = 3.0
SEED_FLAG = "base_seed"
OWN_CONTROLS = (SEED_FLAG, "dub_region")  # settings with a control of their own, not in Advanced
PREVIEWABLE_VIDEO = (".mp4", ".webm")
STATUS_WORDS = {"ok": ("✓", "fine"), "warn": ("⚠", "warning"), "fail": ("✗", "problem"), "skip": ("–", "skipped")}
MAX_SESSIONS = 1024
STOP_WAIT_S = 120.0  # at most this long for the jobs' processes when the server stops
CSS = """
#itk-error-box:empty, #itk-cancel-note:empty { display: none; }
#itk-error { border: 1px solid #dc2626; border-left: 6px solid #dc2626; background: #fef2f2; color: #991b1b;
  border-radius: 6px; padding: 6px 12px; }
#itk-error p, #itk-error li { color: #991b1b; margin: 2px 0; }
.itk-note-problem { border-left: 4px solid #dc2626; padding-left: 8px; color: #991b1b; }
.itk-warning { border-left: 4px solid #d97706; padding-left: 8px; color: #92400e; }
.itk-ok td.itk-status { color: #15803d; } .itk-warn td.itk-status { color: #b45309; }
.itk-fail td.itk-status { color: #b91c1c; font-weight: 600; } .itk-skip td.itk-status { color: #6b7280; }
td.itk-status { white-space: nowrap; }
#itk-title h2 { margin: 0; }
"""


def advanced_flags() -> list[Flag]:
    """The settings the page offers: those `--set` and presets may give (the protocol's table), less the
    refused ones, path flags and those with a control of their own (the seed, the dub region)."""
    return [f for f in settable().values() if not f.refused and not f.path and f.name not in OWN_CONTROLS]


def session_of(request: Any) -> str:
    """The browser tab's (or API client's) session: its Cancel button stops its own job, never another's."""
    return str(getattr(request, "session_hash", None) or "")


@dataclass
class Page:
    """The server's settings, its one GPU slot and each session's current job."""

    output_dir: Path
    weights_dir: Path
    weights_option: str | None  # as given on the command line (for the commands the page prints)
    grace_s: float
    uploads: Path | None = None  # Gradio's temp folder for this server (its copies of the uploads)
    queue_dir: Path | None = None  # `--queue DIR`: the job store the Queue view reads
    fetching: Fetching | None = None
    slot: GpuSlot = field(default_factory=GpuSlot)
    tickets: dict[str, Ticket] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)  # sessions whose uploads a job has used and dropped
    stopping: threading.Event = field(default_factory=threading.Event)

    # -- presets ---------------------------------------------------------------------------------------
    def presets(self) -> tuple[list[tuple[str, str]], str]:
        """(label, name) for each preset this machine can run, with its measured speed and what it trades,
        and the automatic choice. A machine no preset fits gets only the fallback, saying what it lacks."""
        from itk import machine
        from itk.measured import expected_step_s
        from itk.presets import choose_preset, load_presets

        facts = machine.gather()
        chosen, why = choose_preset(facts)
        fit = [p for p in sorted(load_presets().values(), key=lambda p: -p.rank) if not p.unmet(facts)] or [chosen]
        choices = []
        for p in fit:
            here = expected_step_s(p.name, facts.gpu_name)
            if here:
                speed = here.label
            elif p.measured:
                speed = "not measured on this GPU; " + "; ".join(m.label for m in p.measured)
            else:
                speed = "speed not measured yet"
            lacks = f" [no preset fits: {'; '.join(p.unmet(facts))}]" if p.unmet(facts) else ""
            choices.append((f"{p.name}: {p.summary}; {speed}{lacks}", p.name))
        return choices, chosen.name

    def preset_settings(self, name: str) -> dict[str, Any]:
        from itk.presets import get_preset

        return dict(get_preset(name).generator)

    # -- generate ----------------------------------------------------------------------------------------
    def sets(self, preset: str, seed: Any, values: list[Any]) -> list[str]:
        """The page's fields as `--set` items, each checked here so that a refusal names the Advanced field
        (UserError in the page's words). A blank text field or dropdown is the preset's value; a checkbox is
        a setting only where it differs from the preset's value."""
        items = [] if seed in (None, "") else [f"{SEED_FLAG}={int(seed)}"]
        preset_values = self.preset_settings(preset) if preset else {}
        for flag, value in zip(advanced_flags(), values, strict=True):
            if flag.is_switch:
                if value is not None and bool(value) != bool(preset_values.get(flag.name, flag.default)):
                    items.append(f"{flag.name}={'true' if value else 'false'}")
                continue
            text = str(value).strip() if value is not None else ""
            if text:
                items.append(advanced_setting(flag, text))
        return items

    def public(self, error: UserError, names: dict[str, str], staged: Staged | None) -> UserError:
        """An error as the page shows it: the page's words, the files named as uploaded, no server folder."""
        error = staged.explain(error) if staged else error
        folders = {self.output_dir: "the output folder", self.weights_dir: "the weights folder"}
        if self.uploads is not None:
            folders[self.uploads] = "the upload folder"
        return public_error(error, names, folders)

    def generate(self, request: Any, face: str | None, speech1: str | None, speech2: str | None, text: str | None,
                 voice: str | None, voice2: str | None, mode: str, box1: str | None, box2: str | None,
                 dub_region: str | None, prompt: str, preset: str, seed: Any,
                 *values: Any) -> Iterator[tuple[str, str, Any, Any, str]]:
        """Stage, plan and run one job; yields (progress, error, video, download, repeat line). Whatever ends the
        generator (the job finishing, Gradio's cancel or a closed tab closing it) stops the job's processes,
        and the next job's generator starts only once they are gone (the GpuSlot)."""
        from itk.run import plan_run

        session = session_of(request)
        ticket = self.tickets[session] = Ticket()
        names = {str(p): Path(p).name for p in (face, speech1, speech2) if p}
        staged: Staged | None = None
        job: Running | None = None
        try:
            try:
                sets = self.sets(preset, seed, list(values))
                staged = stage_uploads(self.output_dir, face, [speech1, speech2], text or "")
                if (text or "").strip():
                    yield "<p>making the speech from the text</p>", "", None, None, ""
                spec = job_spec(staged, prompt=prompt or "", mode=mode, boxes=(box1, box2), text=text or "",
                                voices=(voice, voice2), dub_region=dub_region, preset=preset, sets=sets,
                                weights_dir=self.weights_dir)
                plan = plan_run(spec)
                plan.require_weights()
                write_job(plan.job, staged.job_file)
            except Exception as exc:  # noqa: BLE001 - every failure is one line + fix on the page
                yield "", error_html(self.public(page_error(exc), names, staged)), None, None, ""
                return
            repeat = ("Repeat from the command line: `"
                      f"{repeat_command(staged, preset, sets, self.weights_option, dub_region)}`")
            notes = "".join(f"<p class='itk-warning'>{html.escape(w)}</p>" for w in plan.media.warnings)
            head = (f"<p>{html.escape(plan.estimate)}; {plan.media.clips} clip(s), {plan.media.video_s:.1f} s of "
                    f"video</p>{notes}")
            while not self.slot.take(timeout=POLL_S):
                if ticket.cancelled.is_set() or self.stopping.is_set():
                    yield "<p id='itk-cancelled'>cancelled before it started</p>", "", None, None, repeat
                    return
                yield head + "<p>waiting for the job before it to end (one generator at a time)</p>", "", None, \
                    None, repeat
            try:
                job = ticket.job = Running(plan, self.slot.give_back)
            except BaseException:
                self.slot.give_back()
                raise
            if ticket.cancelled.is_set() or self.stopping.is_set():
                job.cancel()  # the Supervisor then never starts the generator
            job.start()
            if len(self.dropped) > MAX_SESSIONS:  # API clients never ask after_job: keep the set bounded
                self.dropped.clear()
            self.dropped.add(session)
            progress = Progress()
            while not job.done.wait(POLL_S):
                if job.cancelled.is_set():  # the progress stops where it was: only the stopping is left
                    yield "<p>cancelling: stopping every process of the job</p>", "", None, None, repeat
                    continue
                while not job.events.empty():
                    progress.add(job.events.get(), time.monotonic())
                yield head + progress_html(progress), "", None, None, repeat  # also where a cancel closes us
            yield from self.ending(job, staged, names, repeat)
        finally:
            if job is not None and not job.done.is_set():
                job.cancel()  # closed by Gradio: its thread stops the group and then gives the slot back
            if self.tickets.get(session) is ticket:
                del self.tickets[session]
            if job is not None:
                drop_uploads([face, speech1, speech2], self.uploads)

    def ending(self, job: Running, staged: Staged, names: dict[str, str],
               repeat: str) -> Iterator[tuple[str, str, Any, Any, str]]:
        result = job.result
        if job.cancelled.is_set():
            # the job's thread ends only once its Supervisor found no process of the group left
            yield "<p id='itk-cancelled'>cancelled: no process of the job is left</p>", "", None, None, repeat
        elif job.error is not None:
            yield "", error_html(self.public(job.error, names, staged)), None, None, repeat
        elif result is not None and result.ok:
            done = (f"<p id='itk-done'>done in {result.elapsed_s:.0f} s: {html.escape(Path(result.output).name)}"
                    + (f", GPU memory peak {result.gpu_peak_gb:.1f} GB" if result.gpu_peak_gb else "") + "</p>")
            yield done, "", str(result.output), str(result.output), repeat
        else:
            yield "", self.verdict_html(result, names, staged), None, None, repeat

    def verdict_html(self, result: Any, names: dict[str, str], staged: Staged | None) -> str:
        """A failed run: the advice rules' diagnosis and numbered fixes, and which log to read."""
        verdict = getattr(result, "verdict", None)
        log = str(getattr(result, "log", "?"))
        if verdict is None:
            return error_html(self.public(UserError("the run failed", f"read its log: {log}"), names, staged))
        head = self.public(UserError(f"{verdict.title}: {verdict.diagnosis}", f"log: {log}"), names, staged)
        fixes = "".join(f"<li>{code_html(self.public(UserError(f), names, staged).message)}</li>"
                        for f in verdict.fixes)
        return (f"<div id='itk-error'><p class='itk-message'>{code_html(head.message)}</p><ol>{fixes}</ol>"
                f"<p>{code_html(head.fix)}</p></div>")

    def after_job(self, request: Any) -> tuple[Any, Any, Any]:
        """Once a job that used the uploads ended they are dropped, so the upload fields are emptied too."""
        import gradio as gr

        session = session_of(request)
        if session in self.dropped and session not in self.tickets:
            self.dropped.discard(session)
            return None, None, None
        return gr.skip(), gr.skip(), gr.skip()

    def cancel(self, request: Any) -> str:
        ticket = self.tickets.get(session_of(request))
        if ticket is None:
            return "<p>no job of this page is running</p>"
        ticket.cancel()
        return "<p>cancelling: stopping every process of the job</p>"

    def stop_all(self, timeout: float = STOP_WAIT_S) -> bool:
        """The server is stopping: no job starts any more, every running one is stopped; True once no process
        of any job is left (the slot is free)."""
        self.stopping.set()
        for ticket in list(self.tickets.values()):
            ticket.cancel()
        if self.slot.take(timeout=timeout):
            self.slot.give_back()
            return True
        return False

    # -- previews and choices ----------------------------------------------------------------------------
    def face_preview(self, face: str | None) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """The uploaded portrait as an image (a source video as a video), and the dub region for a video."""
        suffix = Path(face).suffix.lower() if face else ""
        video_face = bool(face) and is_video(face)
        image = {"value": face if face and not video_face else None, "visible": bool(face) and not video_face}
        video = {"value": face if suffix in PREVIEWABLE_VIDEO else None, "visible": suffix in PREVIEWABLE_VIDEO}
        return image, video, {"visible": video_face}

    def preset_fields(self, name: str) -> list[dict[str, Any]]:
        """Each Advanced field for preset `name`: its placeholder, the first choice's label, the switch's value."""
        values = self.preset_settings(name)
        return [field_update(f, values) for f in advanced_flags()]

    # -- machine -----------------------------------------------------------------------------------------
    def doctor(self) -> str:
        from itk.doctor import run_doctor

        try:
            report = run_doctor(weights_dir=self.weights_dir)
        except Exception as exc:  # noqa: BLE001
            return error_html(page_error(exc))
        rows = "".join(
            f"<tr class='itk-check itk-{r.status.value}'>{status_cell(r.status.value)}<td>{html.escape(r.id)}</td>"
            f"<td>{code_html(r.summary)}</td><td>{code_html(r.fix)}</td></tr>" for r in report.results)
        summary = re.sub(r"\b(\d+) ok\b", r"\1 fine", report.summary)  # the table's words, not the status enum
        return (f"<p>preset {code_html(report.preset_reason)}; {code_html(summary)}</p>"
                "<table id='itk-doctor-table'><thead><tr><th>status</th><th>check</th><th>result</th><th>fix</th>"
                f"</tr></thead><tbody>{rows}</tbody></table>")

    def weights_plan(self, preset: str) -> tuple[str, int]:
        """The preset's weight files as they are here (no hashing, no network) and the bytes to download."""
        from itk.presets import get_preset
        from itk.runtime.manifest import load_manifest
        from itk.runtime.verify import check_files

        files = load_manifest().files_for(get_preset(preset).components)
        statuses = check_files(self.weights_dir, files, deep=False)
        pairs = list(zip(files, statuses, strict=True))
        missing = sum(f.size for f, st in pairs if st.state != "ok")
        rows = "".join(f"<tr><td>{html.escape(st.label)}</td><td>{f.size / 1e9:.2f} GB</td>"
                       f"<td>{html.escape(st.state.replace('_', ' '))}</td></tr>" for f, st in pairs)
        return (f"<p>preset {html.escape(preset)} into {html.escape(str(self.weights_dir))}: "
                f"{missing / 1e9:.1f} GB to download</p><table id='itk-weights-table'><thead><tr><th>file</th>"
                f"<th>size</th><th>state</th></tr></thead><tbody>{rows}</tbody></table>"), missing

    def download(self, preset: str) -> Iterator[str]:
        if self.fetching is not None and self.fetching.poll() is None:
            yield "<p>a download is already running</p>"
            return
        _, missing = self.weights_plan(preset)
        log = self.output_dir / f"fetch-{time.strftime('%Y%m%d-%H%M%S')}.log"
        fetch = self.fetching = Fetching(preset, self.weights_dir, missing, log, self.grace_s)
        while fetch.poll() is None:
            yield progress_bar(fetch.fraction, f"downloading the weights of {preset}")
            time.sleep(1.0)
        lines = "<br>".join(html.escape(ln) for ln in fetch.last_lines())
        word = "cancelled (finished files are kept)" if fetch.cancelled else "finished" if fetch.poll() == 0 \
            else "failed"
        yield f"<p id='itk-fetch-end'>download {word}</p><p>{lines}</p><p>log: {html.escape(str(log))}</p>"

    def cancel_download(self) -> str:
        if self.fetching is None or self.fetching.poll() is not None:
            return "<p>no download is running</p>"
        self.fetching.cancel()
        return "<p>download cancelled: finished files are kept; Download carries on from them</p>"

    # -- queue -------------------------------------------------------------------------------------------
    def queue_view(self) -> str:
        """The store of `--queue DIR` as a table (read-only), and when it was read."""
        from itk.store import StoreError

        assert self.queue_dir is not None
        when = time.strftime("%H:%M:%S")
        try:
            rows = queue_rows(self.queue_dir)
        except StoreError:
            return (f"<p id='itk-queue-empty'>no job queue in {html.escape(self.queue_dir.name)} yet: `itk batch` and "
                    f"`itk serve` make one there (read at {when})</p>")
        counts = {}
        for row in rows:
            counts[row["state"]] = counts.get(row["state"], 0) + 1
        summary = ", ".join(f"{n} {state}" for state, n in counts.items()) or "no jobs"
        body = "".join(
            f"<tr class='itk-job itk-job-{html.escape(r['state'])}'><td>{html.escape(r['name'])}</td>"
            f"<td>{html.escape(r['state'])}</td><td>{html.escape(r['worker'])}</td><td>{html.escape(r['where'])}</td>"
            f"<td>{html.escape(r['error'])}</td></tr>" for r in rows)
        return (f"<p>{len(rows)} job(s) in {html.escape(self.queue_dir.name)}: {summary} (read at {when}, again every "
                f"{QUEUE_EVERY_S:.0f} s)</p><table id='itk-queue-table'><thead><tr><th>job</th><th>state</th>"
                f"<th>worker</th><th>clip / step</th><th>error</th></tr></thead><tbody>{body}</tbody></table>")


# -- rendering -------------------------------------------------------------------------------------------------
def code_html(text: str) -> str:
    """Text for the page: escaped, `code` as <code> (no raw backticks)."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text)).replace("`", "")


def status_cell(status: str) -> str:
    symbol, word = STATUS_WORDS.get(status, ("", status))
    return f"<td class='itk-status'><span aria-hidden='true'>{symbol}</span> {word}</td>"


def error_html(error: UserError) -> str:
    """The one-line error and its fix, as `itk run` prints them, styled as an error."""
    fix = f"<p class='itk-fix'>fix: {code_html(error.fix)}</p>" if error.fix else ""
    return (f"<div id='itk-error' role='alert'><p class='itk-message'>error: {code_html(error.message)}</p>"
            f"{fix}</div>")


def progress_bar(fraction: float, line: str) -> str:
    return (f"<div id='itk-progress'><progress max='1000' value='{int(fraction * 1000)}'></progress> "
            f"{fraction * 100:.0f}%<p>{html.escape(line)}</p></div>")


def progress_html(progress: Progress) -> str:
    return progress_bar(progress.fraction, progress.line)


def placeholder(flag: Flag, preset: dict[str, Any]) -> str:
    if flag.name in preset:
        return f"preset: {preset[flag.name]}"
    return f"default: {flag.default}" if flag.default is not None else "default"


def field_update(flag: Flag, preset: dict[str, Any]) -> dict[str, Any]:
    """What an Advanced field shows for a preset: a switch its value, a choice its first entry (the preset's
    value), free text its placeholder."""
    if flag.is_switch:
        return {"value": bool(preset.get(flag.name, flag.default))}
    if flag.choices:
        return {"choices": [(placeholder(flag, preset), ""), *((str(c), str(c)) for c in flag.choices)]}
    return {"placeholder": placeholder(flag, preset)}


def flag_field(gr: Any, flag: Flag, preset: dict[str, Any]) -> Any:
    """A checkbox for a switch, a dropdown for choices, else a text field (blank: the preset's value)."""
    shown = field_update(flag, preset)
    common = {"label": flag.name, "info": web_words(flag.help), "elem_id": f"itk-set-{flag.name}"}
    if flag.is_switch:
        return gr.Checkbox(**common, **shown)
    if flag.choices:
        return gr.Dropdown(value="", **common, **shown)
    return gr.Textbox(**common, **shown)


# -- the page ----------------------------------------------------------------------------------------------------
def build(page: Page) -> Any:
    import gradio as gr

    choices, chosen = page.presets()
    preset_values = page.preset_settings(chosen)
    flags = advanced_flags()
    multi, multi_note = multi_speaker(page.weights_dir)
    voices, tts_problem = speech_from_text(page.weights_dir)
    from itk.runtime.tts import DEFAULT_VOICES

    def voice_of(n: int) -> str | None:
        return DEFAULT_VOICES[n] if DEFAULT_VOICES[n] in voices else (voices[0] if voices else None)

    with gr.Blocks(title="itk: InfiniteTalk", delete_cache=(3600, UPLOAD_MAX_AGE_S)) as demo:
        gr.Markdown("## itk: talking-head videos with InfiniteTalk", elem_id="itk-title")
        with gr.Tab("Generate", elem_id="itk-tab-generate"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=1, min_width=280):
                    face = gr.File(label="Portrait image (PNG/JPEG) or source video (mp4) to dub", type="filepath",
                                   height=110, elem_id="itk-face")
                    face_image = gr.Image(label="Portrait", type="filepath", interactive=False, visible=False,
                                          height=220, elem_id="itk-face-preview")
                    face_video = gr.Video(label="Source video", interactive=False, visible=False, height=220,
                                          elem_id="itk-face-video")
                    dub = FLAG["dub_region"]
                    dub_region = gr.Radio(list(dub.choices or ()), value=dub.default, label="Dub region",
                                          info=flag_choice_words(dub), visible=False, elem_id="itk-dub-region")
                    with gr.Accordion("Speaker boxes (optional)", open=False, elem_id="itk-boxes"):
                        box1 = gr.Textbox(label="Speaker 1's box (also the dub region's box)",
                                          placeholder="row_min,col_min,row_max,col_max", elem_id="itk-bbox1")
                        box2 = gr.Textbox(label="Speaker 2's box", placeholder="row_min,col_min,row_max,col_max",
                                          interactive=multi, elem_id="itk-bbox2")
                with gr.Column(scale=1, min_width=280):
                    speech1 = gr.File(label="Speech (wav/mp3/m4a)", type="filepath", height=90,
                                      elem_id="itk-speech1")
                    player = gr.Audio(label="Speech", type="filepath", interactive=False, visible=False,
                                      elem_id="itk-speech-player")
                    text = gr.Textbox(
                        label="or type what to say", lines=2, max_lines=8, elem_id="itk-text",
                        interactive=tts_problem is None,
                        placeholder="Hello! For two speakers: (s1) Hi. (s2) Hello." if tts_problem is None
                        else "speech from text is not available here",
                        info=None if tts_problem is None else f"{tts_problem.message}; fix: {tts_problem.fix}")
                    with gr.Row():
                        voice = gr.Dropdown(voices, value=voice_of(0), label="Voice", elem_id="itk-voice",
                                            interactive=tts_problem is None)
                        voice2 = gr.Dropdown(voices, value=voice_of(1), label="Speaker 2's voice ((s2) lines)",
                                             elem_id="itk-voice2", interactive=tts_problem is None)
                    with gr.Accordion("Second speaker", open=False, elem_id="itk-second"):
                        speech2 = gr.File(label="Second speaker's speech", type="filepath", interactive=multi,
                                          height=90, elem_id="itk-speech2")
                        mode = gr.Radio(["add", "para"], value="add", label="Two speakers: add (turns) / para "
                                        "(together)", interactive=multi, elem_id="itk-audio-mode")
                        gr.Markdown(multi_note, elem_id="itk-multi-note")
                with gr.Column(scale=1, min_width=300):
                    prompt = gr.Textbox(label="Prompt", placeholder="A person is talking.", elem_id="itk-prompt")
                    with gr.Row():
                        preset = gr.Dropdown(choices=choices, value=chosen, label="Preset", scale=3,
                                             elem_id="itk-preset")
                        seed = gr.Number(label="Seed", value=42, precision=0, scale=1, min_width=90,
                                         elem_id="itk-seed")
                    with gr.Accordion("Advanced settings (blank: the preset's value)", open=False,
                                      elem_id="itk-advanced"):
                        fields = [flag_field(gr, f, preset_values) for f in flags]
                    with gr.Row():
                        go = gr.Button("Generate", variant="primary", elem_id="itk-generate")
                        stop = gr.Button("Cancel", variant="stop", elem_id="itk-cancel")
                    status = gr.HTML(elem_id="itk-status")
                    error = gr.HTML(elem_id="itk-error-box")
                    cancel_note = gr.HTML(elem_id="itk-cancel-note")
                    video = gr.Video(label="Video", interactive=False, elem_id="itk-video")
                    download = gr.File(label="Download", interactive=False, elem_id="itk-download")
                    repeat = gr.Markdown(elem_id="itk-repeat")
        with gr.Tab("Machine", elem_id="itk-tab-machine"):
            refresh = gr.Button("Refresh the doctor's checks", elem_id="itk-refresh")
            table = gr.HTML(elem_id="itk-doctor")
            fetch_preset = gr.Dropdown(choices=choices, value=chosen, label="Weights for preset",
                                       elem_id="itk-fetch-preset")
            plan = gr.HTML(elem_id="itk-weights")
            with gr.Row():
                fetch = gr.Button("Download", variant="primary", elem_id="itk-download-weights")
                fetch_stop = gr.Button("Cancel download", variant="stop", elem_id="itk-cancel-download")
            fetch_status = gr.HTML(elem_id="itk-fetch-status")
        if page.queue_dir is not None:
            with gr.Tab("Queue", elem_id="itk-tab-queue"):
                queue_table = gr.HTML(elem_id="itk-queue")
            gr.Timer(QUEUE_EVERY_S).tick(page.queue_view, None, queue_table, queue=False,
                                         api_visibility="private")
            demo.load(page.queue_view, None, queue_table)

        def preview(path: str | None) -> tuple[Any, Any, Any]:
            return tuple(gr.update(**u) for u in page.face_preview(path))

        def generate(request: gr.Request, *inputs: Any) -> Iterator[tuple[str, str, Any, Any, str]]:
            yield from page.generate(request, *inputs)

        def cancel(request: gr.Request) -> str:
            return page.cancel(request)

        def after_job(request: gr.Request) -> tuple[Any, Any, Any, str]:
            return (*page.after_job(request), "")  # and the Cancel note goes: the status now says how it ended

        for fn in (generate, cancel, after_job):  # Gradio finds gr.Request by annotation, not by a string
            fn.__annotations__["request"] = gr.Request
        face.change(preview, face, [face_image, face_video, dub_region], queue=False, api_visibility="private")
        speech1.change(lambda p: gr.update(value=p, visible=bool(p)), speech1, player, queue=False,
                       api_visibility="private")
        preset.change(lambda name: [gr.update(**u) for u in page.preset_fields(name)], preset, fields, queue=False,
                      api_visibility="private")
        go.click(generate, [face, speech1, speech2, text, voice, voice2, mode, box1, box2, dub_region, prompt,
                            preset, seed, *fields],
                 [status, error, video, download, repeat], concurrency_limit=1, concurrency_id="gpu",
                 api_name="generate", show_progress_on=[status]) \
            .then(after_job, None, [face, speech1, speech2, cancel_note], queue=False, api_visibility="private")
        stop.click(cancel, None, cancel_note, queue=False, api_name="cancel")
        refresh.click(page.doctor, None, table, api_name="doctor")
        fetch_preset.change(lambda name: page.weights_plan(name)[0], fetch_preset, plan, queue=False,
                            api_visibility="private")
        fetch.click(page.download, fetch_preset, fetch_status, concurrency_limit=1, concurrency_id="fetch",
                    api_name="fetch")
        fetch_stop.click(page.cancel_download, None, fetch_status, queue=False, api_name="cancel_fetch")
        demo.load(page.doctor, None, table)
        demo.load(lambda: page.weights_plan(chosen)[0], None, plan)
    return demo


class HideApiBeforeLogin:
    """Gradio embeds its API description (every endpoint, every preset) in the page it serves, also in the login
    page a stranger gets with --auth; that page gets none. An ASGI middleware, inside Gradio's own (so it sees
    the page uncompressed); only HTML answers are read."""

    API_INFO = re.compile(rb"window\.gradio_api_info = .*?;</script>", re.S)

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "GET":
            await self.app(scope, receive, send)
            return
        start: dict[str, Any] | None = None
        chunks: list[bytes] = []

        async def hold(message: dict[str, Any]) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                if not headers.get(b"content-type", b"").startswith(b"text/html"):
                    await send(message)
                    return
                start = message
            elif start is None:
                await send(message)
            else:
                chunks.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                body = b"".join(chunks)
                if b'"auth_required":true' in body:
                    body = self.API_INFO.sub(b"window.gradio_api_info = null;</script>", body)
                headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
                await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, hold)


def port_in_use(port: int, host: str) -> UserError | None:
    """The doctor's port check, for the address the page binds: one line naming the process holding it."""
    from itk.checks.port import _owner, port_free

    if port_free(port, host):
        return None
    return UserError(f"port {port} is in use by {_owner(port)}", f"stop it, or start the page on another port: "
                     f"itk ui --port {port + 1}", EXIT_BAD_INPUT)


def upload_folder() -> Path:
    """A folder of this server's own for Gradio's copies of the uploads (inside $GRADIO_TEMP_DIR when set), so
    they can be dropped when a job has used them and all of it when the server stops. Gradio reads the variable
    when the page is built, so it is set before."""
    parent = os.environ.get("GRADIO_TEMP_DIR")
    if parent:
        Path(parent).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="itk-ui-uploads-", dir=parent or None)).resolve()
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    return folder


def serve(port: int = DEFAULT_PORT, listen: bool = False, auth: str | None = None,
          output_dir: str | Path = "outputs", weights_dir: str | None = None, queue_dir: str | Path | None = None,
          max_upload: str = MAX_UPLOAD) -> int:
    """Start the page and serve until interrupted (Ctrl-C, SIGTERM or SIGHUP: every job's processes are stopped
    and the uploads deleted first). UserError for a busy port, a malformed --auth or a --queue that is no folder."""
    from itk.runtime.paths import weights_dir as resolve_weights_dir
    from itk.supervisor import GRACE_S

    host = "0.0.0.0" if listen else "127.0.0.1"
    credentials = None
    if auth is not None:
        user, sep, password = auth.partition(":")
        if not (sep and user and password):
            raise UserError("--auth expects USER:PASS", "e.g. --auth me:a-long-password", EXIT_BAD_INPUT)
        credentials = (user, password)
    if listen and credentials is None:  # a GPU open to the network without a password: refused, not warned about
        raise UserError("--listen without --auth would let anyone who reaches this machine use its GPU",
                        "add --auth USER:PASS (or leave out --listen: the page then answers on 127.0.0.1 only)",
                        EXIT_BAD_INPUT)
    queue = Path(queue_dir).expanduser().absolute() if queue_dir is not None else None
    if queue is not None and not queue.is_dir():
        raise UserError(f"--queue {queue_dir}: no such folder", "give the output folder of `itk batch` or "
                        "`itk serve` (the one holding itk-jobs.sqlite)", EXIT_BAD_INPUT)
    if problem := port_in_use(port, host):
        raise problem
    out = Path(output_dir).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    uploads = upload_folder()
    page = Page(out, resolve_weights_dir(weights_dir).absolute(), weights_dir, GRACE_S, uploads=uploads,
                queue_dir=queue)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves this machine
    previous = {sig: signal.signal(sig, signal.default_int_handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        demo = build(page)
        if listen:
            print(f"itk ui: listening on every network interface, port {port}, behind --auth's password",
                  file=sys.stderr)
        print(f"itk ui: http://{'127.0.0.1' if not listen else host}:{port} (outputs in {out}); Ctrl-C stops it",
              file=sys.stderr)
        from starlette.middleware import Middleware

        demo.queue(default_concurrency_limit=1)
        demo.launch(server_name=host, server_port=port, auth=credentials, allowed_paths=[str(out)],
                    max_file_size=max_upload, share=False, inbrowser=False, quiet=True, css=CSS,
                    app_kwargs={"middleware": [Middleware(HideApiBeforeLogin)]})
    except KeyboardInterrupt:
        pass
    finally:
        page.stop_all()
        shutil.rmtree(uploads, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
