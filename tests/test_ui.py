"""`itk ui` driven as a person drives it: the server started as a subprocess on a free port with the
selftest's tiny weights, and a REAL headless chromium (Debian's chromium + chromium-driver, installed by
.ci/run; without them this module is skipped with the install command, except in CI) uploading files and
pressing buttons: a real generation, refusals in the page's words styled as errors, the layout at 1366x768, the
Advanced fields, Cancel and a closed tab stopping the job's processes, speech from text with a chosen voice, the
dub region of a source video, and the Queue view of a batch behind --auth's login page. The same page through
its API (no browser): tests/test_ui_api.py.

Screenshots of each view are saved in the test's tmp folder (the path is printed; run with -s to see it)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from run_media import write_wav
from ui_page import (
    FAKE_GENERATOR,
    RUN_S,
    Server,
    alive,
    click,
    css,
    error_line,
    find_chromium,
    headless_browser,
    open_accordion,
    open_page,
    set_advanced,
    shot,
    skip_without_a_browser,
    start_browser,
    tiny_files,
    tiny_inputs,
    upload,
    video_seconds,
    wait_for,
)

skip_without_a_browser()
_chromium = pytest.fixture(scope="session", name="chromium")(find_chromium)
_browser = pytest.fixture(name="browser")(headless_browser)
_tiny = pytest.fixture(scope="module", name="tiny")(tiny_files)


@pytest.fixture(scope="module")
def server(tiny: dict[str, Path]) -> Iterator[Server]:
    srv = Server(tiny["root"], tiny["weights"])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def hanging(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    """A page whose generator hangs until stopped; it appends each start (its pids) to the file given."""
    root = tmp_path_factory.mktemp("ui-hang")
    starts = root / "starts.jsonl"
    srv = Server(root, tiny["weights"], env={"ITK_GENERATOR": FAKE_GENERATOR, "FAKE_MODE": "hang",
                                             "FAKE_PIDS": str(root / "pids.json"), "FAKE_STARTS": str(starts)})
    yield srv, starts
    srv.stop()


@pytest.fixture(scope="module")
def speaking(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    """A page with Kokoro's tiny weights beside the generator's, and a stand-in generator recording its flags."""
    pytest.importorskip("kokoro", reason="speech from text needs the tts extra: pip install 'itk[tts]'")
    from test_tts import write_tiny_tts

    root = tmp_path_factory.mktemp("ui-speech")
    weights = tiny_inputs(root)["weights"]
    write_tiny_tts(weights)
    argv = root / "argv.json"
    srv = Server(root, weights, env={"ITK_GENERATOR": FAKE_GENERATOR, "FAKE_MODE": "ok", "FAKE_ARGV": str(argv),
                                     "HF_HUB_OFFLINE": "1"})
    yield srv, argv
    srv.stop()


def reddish(colour: str) -> bool:
    """A CSS rgb()/rgba() colour whose red clearly dominates (an error's border)."""
    r, g, b = (int(float(x)) for x in colour[colour.index("(") + 1:colour.index(")")].split(",")[:3])
    return r > 150 and r > g + 60 and r > b + 60


def starts_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def test_the_page_turns_a_portrait_and_speech_into_a_playable_video_and_shows_the_doctor(
        server: Server, tiny: dict[str, Path], browser: Any, tmp_path: Path) -> None:
    open_page(browser, server.url)
    upload(browser, "itk-face", tiny["image"])
    upload(browser, "itk-speech1", tiny["speech"])
    set_advanced(browser, "sample_steps", "2")
    click(browser, "#itk-generate")
    seconds = wait_for("a playable video", lambda: video_seconds(browser), RUN_S, every=1.0)
    assert seconds > 0
    assert "itk run --input-json" in css(browser, "#itk-repeat")[0].text
    shot(browser, tmp_path, "generate", "#itk-status")
    job_files = list(server.outputs.glob("*/job.json"))
    assert len(job_files) == 1 and (job_files[0].parent / "image.png").is_file()
    assert list(job_files[0].parent.glob("*.mp4"))

    click(browser, "#itk-tab-machine-button, button[id*='itk-tab-machine']")
    rows = wait_for("the doctor's rows", lambda: css(browser, "#itk-doctor-table tr.itk-check"), 120)
    cells = [[td.text for td in r.find_elements("css selector", "td")] for r in rows]
    assert {"gpu", "torch", "port"} <= {c[1] for c in cells}
    assert not {c[0].lower() for c in cells} & {"ok", "warn", "fail", "skip"}  # words with a symbol, not the enum
    assert "`" not in css(browser, "#itk-doctor")[0].text  # code is shown as code
    shot(browser, tmp_path, "machine")


def test_a_text_file_named_png_is_refused_with_one_line_before_any_run(
        server: Server, tiny: dict[str, Path], browser: Any, tmp_path: Path) -> None:
    open_page(browser, server.url)
    upload(browser, "itk-face", tiny["text"])
    upload(browser, "itk-speech1", tiny["speech"])
    click(browser, "#itk-generate")
    message = error_line(browser)
    shot(browser, tmp_path, "error", "#itk-error")
    assert "notes.png is not a readable image" in message and "\n" not in message
    assert str(server.outputs) not in message  # named as uploaded, not by the staged copy
    assert "Traceback" not in browser.page_source
    box = css(browser, "#itk-error")[0]
    assert reddish(box.value_of_css_property("border-left-color"))  # styled as an error, not as plain text


def test_generate_is_in_view_at_1366x768_and_the_uploads_show_as_an_image_and_a_player(
        server: Server, tiny: dict[str, Path], chromium: tuple[str, str], tmp_path: Path) -> None:
    driver = start_browser(chromium, "1366,768")
    try:
        open_page(driver, server.url)

        def in_view() -> bool:
            return driver.execute_script(
                "const r = document.querySelector('#itk-generate').getBoundingClientRect();"
                "return r.height > 0 && r.top >= 0 && r.bottom <= window.innerHeight && r.right <= window.innerWidth;")

        assert in_view(), "Generate is below the fold at 1366x768"
        upload(driver, "itk-face", tiny["image"])
        upload(driver, "itk-speech1", tiny["speech"])
        image = wait_for("the portrait shown", lambda: [e for e in css(driver, "#itk-face-preview img")
                                                        if e.is_displayed()], 30)[0]
        assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) > 0
        wait_for("the speech's player", lambda: [e for e in css(driver, "#itk-speech-player button")
                                                 if e.is_displayed()], 30)
        shot(driver, tmp_path, "1366x768")
        assert in_view(), "Generate went below the fold once the uploads are shown"
    finally:
        driver.quit()


def test_advanced_switches_and_choices_are_checkboxes_and_dropdowns_and_a_bad_value_names_its_field(
        server: Server, tiny: dict[str, Path], browser: Any, tmp_path: Path) -> None:
    open_page(browser, server.url)
    open_accordion(browser, "itk-advanced", "#itk-set-sample_steps textarea, #itk-set-sample_steps input")
    for name in ("use_apg", "t5_cpu"):
        assert css(browser, f"#itk-set-{name} input[type=checkbox]"), f"{name} is not a checkbox"
    assert not css(browser, "#itk-set-use_apg textarea")
    for name in ("size", "mode", "lora_alpha"):
        assert css(browser, f"#itk-set-{name} input[role=listbox], #itk-set-{name} [role=combobox], "
                            f"#itk-set-{name} .wrap input"), f"{name} is not a dropdown"
        assert not css(browser, f"#itk-set-{name} textarea")
    upload(browser, "itk-face", tiny["image"])
    upload(browser, "itk-speech1", tiny["speech"])
    set_advanced(browser, "sample_steps", "0")
    runs = set(server.outputs.glob("*/*.run"))
    click(browser, "#itk-generate")
    message = error_line(browser)
    shot(browser, tmp_path, "advanced-error", "#itk-error")
    assert message.startswith("error: Advanced: sample_steps must be a whole number of at least 1")
    assert "--set" not in css(browser, "#itk-error")[0].text and "--sample_steps" not in message
    assert set(server.outputs.glob("*/*.run")) == runs  # refused before any run


def test_without_text_to_speech_the_text_box_says_why_and_how_to_add_it(server: Server, browser: Any) -> None:
    open_page(browser, server.url)
    box = wait_for("the text box", lambda: css(browser, "#itk-text"), 30)[0]
    assert "text-to-speech weights missing" in box.text and "itk fetch --component tts" in box.text
    assert str(server.outputs.parent) not in box.text  # the weights folder's files, relative to it
    assert not css(browser, "#itk-text textarea")[0].is_enabled()


def test_cancel_stops_every_process_of_the_running_job(
        hanging: tuple[Server, Path], tiny: dict[str, Path], browser: Any, tmp_path: Path) -> None:
    srv, starts = hanging
    seen = len(starts_of(starts))
    open_page(browser, srv.url)
    upload(browser, "itk-face", tiny["image"])
    upload(browser, "itk-speech1", tiny["speech"])
    click(browser, "#itk-generate")
    pids = wait_for("the generator and its grandchild", lambda: starts_of(starts)[seen:], 120)[0]["pids"]
    assert alive(pids) == pids
    wait_for("the stage in words", lambda: "loading the models" in css(browser, "#itk-status")[0].text, 30)
    click(browser, "#itk-cancel")
    line = wait_for("the cancelled line", lambda: [e.text for e in css(browser, "#itk-cancelled") if e.text], 60)[0]
    shot(browser, tmp_path, "cancelled", "#itk-cancelled")
    assert "no process of the job is left" in line
    assert alive(pids) == []


def test_closing_the_tab_stops_the_job(hanging: tuple[Server, Path], tiny: dict[str, Path],
                                       chromium: tuple[str, str]) -> None:
    srv, starts = hanging
    seen = len(starts_of(starts))
    driver = start_browser(chromium)
    try:
        open_page(driver, srv.url)
        upload(driver, "itk-face", tiny["image"])
        upload(driver, "itk-speech1", tiny["speech"])
        click(driver, "#itk-generate")
        pids = wait_for("the generator", lambda: starts_of(starts)[seen:], 120)[0]["pids"]
    finally:
        driver.quit()
    wait_for("every process of the job to end after its tab closed", lambda: alive(pids) == [], 120, every=1.0)


def choose(driver: Any, component: str, value: str) -> None:
    """Pick `value` in a gr.Dropdown: open its list and click the entry."""
    click(driver, f"#{component} input")
    wait_for(f"{value} in {component}'s list", lambda: [o for o in listed(driver) if entry(o) == value], 20)[0].click()
    wait_for(f"{value} chosen", lambda: css(driver, f"#{component} input")[0].get_attribute("value") == value, 20)


def listed(driver: Any) -> list[Any]:
    """The entries of the open dropdown list."""
    return css(driver, "ul.option-list li")


def entry(option: Any) -> str:
    return option.text.strip().splitlines()[-1].strip() if option.text.strip() else ""


def received(argv: Path) -> list[str]:
    return wait_for("the generator's command line", lambda: argv.exists() and json.loads(argv.read_text()), 120)


def test_typed_text_is_spoken_with_the_chosen_voice_and_becomes_the_job_s_speech(
        speaking: tuple[Server, Path], tiny: dict[str, Path], browser: Any, tmp_path: Path) -> None:
    srv, argv = speaking
    argv.unlink(missing_ok=True)
    open_page(browser, srv.url)
    click(browser, "#itk-voice input")
    voices = {entry(o) for o in wait_for("the voices", lambda: listed(browser), 20)}
    assert {"af_heart", "am_adam", "bf_emma"} <= voices  # from the weights folder
    browser.find_element("css selector", "body").send_keys("\ue00c")  # Escape closes the list
    choose(browser, "itk-voice", "bf_emma")
    upload(browser, "itk-face", tiny["image"])
    css(browser, "#itk-text textarea")[0].send_keys("Hello there, welcome.")
    click(browser, "#itk-generate")
    wait_for("the done line", lambda: css(browser, "#itk-done"), 180)
    shot(browser, tmp_path, "text", "#itk-status")
    flags = received(argv)
    job = json.loads(Path(flags[flags.index("--input_json") + 1]).read_text())
    speech = Path(job["cond_audio"]["person1"])
    assert speech.name.endswith(".speech.wav") and speech.is_file()
    said = json.loads(speech.with_name(speech.name.replace(".wav", ".json")).read_text())
    assert said["text"] == "Hello there, welcome." and said["voice"] == "bf_emma"


def test_a_source_video_offers_the_dub_region_in_the_flag_s_words_and_passes_the_choice_on(
        speaking: tuple[Server, Path], browser: Any, tmp_path: Path) -> None:
    from itk.runtime.video import write_mp4

    srv, argv = speaking
    argv.unlink(missing_ok=True)
    rows, cols = np.mgrid[0:64, 0:64].astype(np.float32)
    frames = np.stack([np.stack([rows * 2 + i, cols * 2, rows + cols], axis=-1) for i in range(25)]).astype(np.uint8)
    source = write_mp4(frames, None, 16000, tmp_path / "source.mp4")
    open_page(browser, srv.url)
    assert not [e for e in css(browser, "#itk-dub-region") if e.is_displayed()]  # not for a portrait
    upload(browser, "itk-face", source)
    region = wait_for("the dub region", lambda: [e for e in css(browser, "#itk-dub-region") if e.is_displayed()],
                      30)[0]
    assert "face: the speaker's face and mouth" in region.text and "itk only" not in region.text
    [label for label in region.find_elements("css selector", "label") if label.text.strip() == "face"][0].click()
    upload(browser, "itk-speech1", write_wav(tmp_path / "speech.wav", 0.84))
    click(browser, "#itk-generate")
    flags = received(argv)
    assert flags[flags.index("--dub_region") + 1] == "face"
    assert "dub-region face" in wait_for("the repeat line", lambda: css(browser, "#itk-repeat")[0].text, 60)


def test_behind_the_login_the_queue_view_shows_the_store_of_a_batch_and_follows_it(
        tiny: dict[str, Path], browser: Any, tmp_path: Path) -> None:
    from itk.store import JobStore

    batch = tmp_path / "season1"
    store = JobStore.open(batch)
    for name in ("anna-01", "anna-02", "ben-01"):
        store.add(name, {"prompt": name}, name)
    store.claim("GPU 0", ["anna-01"])
    store.progress("anna-01", clip=2, clips=5, step=3, steps=8)
    srv = Server(tmp_path, tiny["weights"], serve={"queue_dir": str(batch), "auth": "me:a-long-password"})
    try:
        browser.get(srv.url)  # the login page works without the API description it no longer carries
        wait_for("the login form", lambda: css(browser, "input[type=password]"), 60)
        css(browser, "input[type=text], input:not([type])")[0].send_keys("me")
        css(browser, "input[type=password]")[0].send_keys("a-long-password\n")
        click(browser, "#itk-tab-queue-button, button[id*='itk-tab-queue']")
        rows = wait_for("the queue's rows", lambda: css(browser, "#itk-queue-table tr.itk-job"), 60)
        cells = {tds[0]: tds for tds in ([td.text for td in r.find_elements("css selector", "td")] for r in rows)}
        assert cells["anna-01"][1:4] == ["running", "GPU 0", "clip 2 of 5, step 3 of 8"]
        assert cells["ben-01"][1] == "queued"

        store.fail("anna-01", "CUDA out of memory", "itk run --preset rtx4090-24g", 1)
        store.claim("GPU 0", ["anna-02"])
        started = time.monotonic()

        def failed_row() -> list[str]:
            for r in css(browser, "#itk-queue-table tr.itk-job"):
                tds = [td.text for td in r.find_elements("css selector", "td")]
                if tds and tds[0] == "anna-01" and tds[1] == "failed":
                    return tds
            return []

        row = wait_for("the failed job on the page", failed_row, 30, every=0.5)
        assert time.monotonic() - started < 15 and "CUDA out of memory" in row[4] and "itk run --preset" in row[4]
        shot(browser, tmp_path, "queue")
    finally:
        store.close()
        srv.stop()
