"""`itk ui`: a web page (Gradio) for people who would rather click than type.

The page is a client of the toolkit's functions, as the terminal is: the Generate view calls itk.run's
plan_run + run_job (the same checks, supervisor and advice as `itk run`), the Machine view calls itk.doctor's
run_doctor and runs `itk fetch` as a child. One job at a time (the queue's concurrency is 1): two tabs must
not load two 14B models onto one GPU. Job work that needs no Gradio lives in itk.ui_jobs.
"""

from __future__ import annotations

import html
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from itk.runtime.protocol import EXIT_BAD_INPUT, Flag, UserError, settable
from itk.ui_jobs import Fetching, Progress, Running, Staged, multi_speaker, page_error, repeat_command, stage_job

DEFAULT_PORT = 8418  # the official app.py's port, which the doctor's port check watches
MAX_UPLOAD = "2gb"
POLL_S = 0.25
SEED_FLAG = "base_seed"


def advanced_flags() -> list[Flag]:
    """The settings the page offers: those `--set` and presets may give (the protocol's table), less the
    refused ones, path flags and the seed (which has its own control)."""
    return [f for f in settable().values() if not f.refused and not f.path and f.name != SEED_FLAG]


@dataclass
class Page:
    """The server's settings and its one running job."""

    output_dir: Path
    weights_dir: Path
    weights_option: str | None  # as given on the command line (for the commands the page prints)
    grace_s: float
    running: Running | None = None
    fetching: Fetching | None = None

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
    def sets(self, seed: Any, values: list[Any]) -> list[str]:
        """The page's fields as `--set` items (blank = the preset's value); checked by plan_run."""
        items = [] if seed in (None, "") else [f"{SEED_FLAG}={int(seed)}"]
        for flag, value in zip(advanced_flags(), values, strict=True):
            text = str(value).strip() if value is not None else ""
            if text:
                items.append(f"{flag.name}={text}")
        return items

    def generate(self, face: str | None, speech1: str | None, speech2: str | None, mode: str, box1: str | None,
                 box2: str | None, prompt: str, preset: str, seed: Any,
                 *values: Any) -> Iterator[tuple[str, str, Any, Any, str]]:
        """Stage, plan and run one job; yields (progress, error, video, download, repeat line)."""
        from itk.run import plan_run
        from itk.spec import RunSpec

        staged: Staged | None = None
        try:
            staged = stage_job(self.output_dir, face, [speech1, speech2], prompt or "", mode or "add", (box1, box2))
            sets = self.sets(seed, list(values))
            plan = plan_run(RunSpec.from_options(input_json=str(staged.job_file), output=staged.output,
                                                 preset=preset, sets=sets, weights_dir=self.weights_dir))
            plan.require_weights()
        except Exception as exc:  # noqa: BLE001 - every failure is one line + fix on the page
            error = page_error(exc)
            yield "", error_html(staged.explain(error) if staged else error), None, None, ""
            return
        repeat = f"Repeat from the command line: `{repeat_command(staged, preset, sets, self.weights_option)}`"
        notes = "".join(f"<p class='itk-warning'>{html.escape(w)}</p>" for w in plan.media.warnings)
        head = (f"<p>{html.escape(plan.estimate)}; {plan.media.clips} clip(s), {plan.media.video_s:.1f} s of "
                f"video</p>{notes}")
        job = self.running = Running(plan).start()
        progress = Progress()
        yield head + progress_html(progress), "", None, None, repeat
        while not job.done.wait(POLL_S):
            changed = False
            while not job.events.empty():
                progress.add(job.events.get(), time.monotonic())
                changed = True
            if changed:
                yield head + progress_html(progress), "", None, None, repeat
        self.running = None
        result = job.result
        if job.cancelled.is_set():
            # the job's thread ends only once its Supervisor found no process of the group left
            yield "<p id='itk-cancelled'>cancelled: no process of the job is left</p>", "", None, None, repeat
        elif job.error is not None:
            yield "", error_html(staged.explain(job.error)), None, None, repeat
        elif result is not None and result.ok:
            done = (f"<p id='itk-done'>done in {result.elapsed_s:.0f} s: {html.escape(str(result.output))}"
                    + (f", GPU memory peak {result.gpu_peak_gb:.1f} GB" if result.gpu_peak_gb else "") + "</p>")
            yield done, "", str(result.output), str(result.output), repeat
        else:
            yield "", verdict_html(result), None, None, repeat

    def cancel(self) -> str:
        job = self.running
        if job is None:
            return "<p>no job is running</p>"
        job.cancel()
        return "<p>cancelling: stopping every process of the job</p>"

    # -- machine -----------------------------------------------------------------------------------------
    def doctor(self) -> str:
        from itk.doctor import run_doctor

        try:
            report = run_doctor(weights_dir=self.weights_dir)
        except Exception as exc:  # noqa: BLE001
            return error_html(page_error(exc))
        rows = "".join(
            f"<tr class='itk-check itk-{r.status.value}'><td>{r.status.value}</td><td>{html.escape(r.id)}</td>"
            f"<td>{html.escape(r.summary)}</td><td>{html.escape(r.fix)}</td></tr>" for r in report.results)
        return (f"<p>preset {html.escape(report.preset_reason)}; {html.escape(report.summary)}</p>"
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


# -- rendering -------------------------------------------------------------------------------------------------
def error_html(error: UserError) -> str:
    """The one-line error and its fix, as `itk run` prints them."""
    fix = f"<p class='itk-fix'>fix: {html.escape(error.fix)}</p>" if error.fix else ""
    return f"<div id='itk-error'><p class='itk-message'>error: {html.escape(error.message)}</p>{fix}</div>"


def verdict_html(result: Any) -> str:
    """A failed run: the advice rules' diagnosis and numbered fixes, and where the log is."""
    verdict = getattr(result, "verdict", None)
    if verdict is None:
        return error_html(UserError("the run failed", f"read its log: {getattr(result, 'log', '?')}"))
    fixes = "".join(f"<li>{html.escape(f)}</li>" for f in verdict.fixes)
    return (f"<div id='itk-error'><p class='itk-message'>{html.escape(verdict.title)}: "
            f"{html.escape(verdict.diagnosis)}</p><ol>{fixes}</ol><p>log: {html.escape(str(result.log))}</p></div>")


def progress_bar(fraction: float, line: str) -> str:
    return (f"<div id='itk-progress'><progress max='1000' value='{int(fraction * 1000)}'></progress> "
            f"{fraction * 100:.0f}%<p>{html.escape(line)}</p></div>")


def progress_html(progress: Progress) -> str:
    return progress_bar(progress.fraction, progress.line)


def flag_field(gr: Any, flag: Flag, preset: dict[str, Any]) -> Any:
    return gr.Textbox(label=flag.name, info=flag.help, placeholder=placeholder(flag, preset),
                      elem_id=f"itk-set-{flag.name}")


def placeholder(flag: Flag, preset: dict[str, Any]) -> str:
    if flag.name in preset:
        return f"preset: {preset[flag.name]}"
    if flag.choices:
        return f"default: {flag.default} (one of {', '.join(map(str, flag.choices))})"
    return f"default: {flag.default}" if flag.default is not None else "default"


# -- the page ----------------------------------------------------------------------------------------------------
def build(page: Page) -> Any:
    import gradio as gr

    choices, chosen = page.presets()
    preset_values = page.preset_settings(chosen)
    flags = advanced_flags()
    multi, multi_note = multi_speaker(page.weights_dir)
    with gr.Blocks(title="itk: InfiniteTalk") as demo:
        gr.Markdown("# itk: talking-head videos with InfiniteTalk")
        with gr.Tab("Generate", elem_id="itk-tab-generate"):
            with gr.Row():
                with gr.Column():
                    face = gr.File(label="Portrait image (PNG/JPEG) or source video (mp4) to dub", type="filepath",
                                   elem_id="itk-face")
                    speech1 = gr.File(label="Speech (wav/mp3/m4a)", type="filepath", elem_id="itk-speech1")
                    speech2 = gr.File(label="Second speaker's speech", type="filepath", interactive=multi,
                                      elem_id="itk-speech2")
                    gr.Markdown(multi_note, elem_id="itk-multi-note")
                    with gr.Row():
                        mode = gr.Radio(["add", "para"], value="add", label="Two speakers: add (turns) / para "
                                        "(together)", interactive=multi, elem_id="itk-audio-mode")
                        box1 = gr.Textbox(label="Speaker 1's box (optional)", placeholder="row_min,col_min,row_max,"
                                          "col_max", interactive=multi, elem_id="itk-bbox1")
                        box2 = gr.Textbox(label="Speaker 2's box (optional)", placeholder="row_min,col_min,row_max,"
                                          "col_max", interactive=multi, elem_id="itk-bbox2")
                    prompt = gr.Textbox(label="Prompt", placeholder="A person is talking.", elem_id="itk-prompt")
                    preset = gr.Dropdown(choices=choices, value=chosen, label="Preset", elem_id="itk-preset")
                    seed = gr.Number(label="Seed", value=42, precision=0, elem_id="itk-seed")
                    with gr.Accordion("Advanced settings (blank: the preset's value)", open=False,
                                      elem_id="itk-advanced"):
                        fields = [flag_field(gr, f, preset_values) for f in flags]
                    with gr.Row():
                        go = gr.Button("Generate", variant="primary", elem_id="itk-generate")
                        stop = gr.Button("Cancel", variant="stop", elem_id="itk-cancel")
                with gr.Column():
                    status = gr.HTML(elem_id="itk-status")
                    error = gr.HTML(elem_id="itk-error-box")
                    video = gr.Video(label="Video", interactive=False, elem_id="itk-video")
                    download = gr.File(label="Download", interactive=False, elem_id="itk-download")
                    repeat = gr.Markdown(elem_id="itk-repeat")
                    cancel_note = gr.HTML(elem_id="itk-cancel-note")
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

        preset.change(lambda name: [gr.update(placeholder=placeholder(f, page.preset_settings(name))) for f in flags],
                      preset, fields, queue=False)
        go.click(page.generate, [face, speech1, speech2, mode, box1, box2, prompt, preset, seed, *fields],
                 [status, error, video, download, repeat], concurrency_limit=1, concurrency_id="gpu",
                 api_name="generate")
        stop.click(page.cancel, None, cancel_note, queue=False, api_name="cancel")
        refresh.click(page.doctor, None, table, api_name="doctor")
        fetch_preset.change(lambda name: page.weights_plan(name)[0], fetch_preset, plan, queue=False)
        fetch.click(page.download, fetch_preset, fetch_status, concurrency_limit=1, concurrency_id="fetch",
                    api_name="fetch")
        fetch_stop.click(page.cancel_download, None, fetch_status, queue=False, api_name="cancel_fetch")
        demo.load(page.doctor, None, table)
        demo.load(lambda: page.weights_plan(chosen)[0], None, plan)
    return demo


def port_in_use(port: int, host: str) -> UserError | None:
    """The doctor's port check, for the address the page binds: one line naming the process holding it."""
    from itk.checks.port import _owner, port_free

    if port_free(port, host):
        return None
    return UserError(f"port {port} is in use by {_owner(port)}", f"stop it, or start the page on another port: "
                     f"itk ui --port {port + 1}", EXIT_BAD_INPUT)


def serve(port: int = DEFAULT_PORT, listen: bool = False, auth: str | None = None,
          output_dir: str | Path = "outputs", weights_dir: str | None = None) -> int:
    """Start the page and serve until interrupted. UserError for a busy port or a malformed --auth."""
    from itk.runtime.paths import weights_dir as resolve_weights_dir
    from itk.supervisor import GRACE_S

    host = "0.0.0.0" if listen else "127.0.0.1"
    credentials = None
    if auth is not None:
        user, sep, password = auth.partition(":")
        if not (sep and user and password):
            raise UserError("--auth expects USER:PASS", "e.g. --auth me:a-long-password", EXIT_BAD_INPUT)
        credentials = (user, password)
    if problem := port_in_use(port, host):
        raise problem
    out = Path(output_dir).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    page = Page(out, resolve_weights_dir(weights_dir).absolute(), weights_dir, GRACE_S)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves this machine
    demo = build(page)
    if listen:
        print(f"warning: --listen: anyone who can reach this machine on port {port} can use its GPU"
              + ("" if credentials else "; add --auth USER:PASS"), file=sys.stderr)
    print(f"itk ui: http://{'127.0.0.1' if not listen else host}:{port} (outputs in {out}); Ctrl-C stops it",
          file=sys.stderr)
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, auth=credentials, allowed_paths=[str(out)],
                max_file_size=MAX_UPLOAD, share=False, inbrowser=False, quiet=True)
    return 0

