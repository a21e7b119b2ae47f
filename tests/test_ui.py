"""`itk ui` driven as a person drives it: the server started as a subprocess on a free port with the
selftest's tiny weights, and a REAL headless chromium (Debian's chromium + chromium-driver, installed by
.ci/run) uploading files and pressing buttons; plus the same page through gradio_client's API.

Screenshots of each view are saved in the test's tmp folder (the path is printed; run with -s to see it)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from itk.runtime.tiny import write_tiny_weights
from itk.selftest import PRESET, record_tiny_verdicts, write_portrait, write_speech

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
START_S = 180  # gradio's import on a shared 2-core box
RUN_S = 420  # the tiny model on a CPU, loading included


def wait_for(what: str, probe: Callable[[], Any], timeout: float, every: float = 0.2) -> Any:
    """Poll until `probe` returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


class Server:
    """`itk ui` as a child in its own session (stopped with its whole group at the end)."""

    def __init__(self, root: Path, weights: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.outputs = root / "outputs"
        self.log = root / "ui.log"
        itk = Path(sys.executable).with_name("itk")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [str(itk), "ui", "--port", str(self.port), "--weights-dir", str(weights), "--output-dir",
                 str(self.outputs)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "ITK_STOP_GRACE_S": "1", **(env or {})}, start_new_session=True, cwd=ROOT)
        deadline = time.monotonic() + START_S
        while not answers(self.url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"itk ui did not start: {self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ui-tiny")
    weights = root / "weights"
    write_tiny_weights(weights)
    record_tiny_verdicts(weights, PRESET)
    text = root / "notes.png"
    text.write_text("these are meeting notes, not a picture\n")
    return {"root": root, "weights": weights, "image": write_portrait(root / "portrait.png"),
            "speech": write_speech(root / "speech.wav"), "text": text}


@pytest.fixture(scope="module")
def server(tiny: dict[str, Path]) -> Iterator[Server]:
    srv = Server(tiny["root"], tiny["weights"])
    yield srv
    srv.stop()


@pytest.fixture()
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800",
                "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def css(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def upload(driver: Any, component: str, path: Path) -> None:
    """Send a file to a gr.File's hidden file input, then wait until the page shows it uploaded."""
    wait_for(f"{component}'s file input", lambda: css(driver, f"#{component} input[type=file]"), 30)[0] \
        .send_keys(str(path))
    wait_for(f"{path.name} shown in {component}",
             lambda: path.name in css(driver, f"#{component}")[0].text.replace("\n", ""), 60)


def open_page(driver: Any, url: str) -> None:
    driver.get(url)
    wait_for("the Generate button", lambda: css(driver, "#itk-generate"), 60)


def set_advanced(driver: Any, name: str, value: str) -> None:
    field = f"#itk-set-{name} textarea, #itk-set-{name} input"
    if not any(e.is_displayed() for e in css(driver, field)):
        css(driver, "#itk-advanced button, #itk-advanced .label-wrap")[0].click()
    box = wait_for(f"the {name} field", lambda: [e for e in css(driver, field) if e.is_displayed()], 20)[0]
    box.clear()
    box.send_keys(value)


def click(driver: Any, selector: str) -> None:
    wait_for(selector, lambda: css(driver, selector), 20)[0].click()


def video_seconds(driver: Any) -> float:
    """The <video>'s duration once the browser has loaded a playable source, else 0."""
    value = driver.execute_script(
        "const v = document.querySelector('#itk-video video');"
        "return v && v.currentSrc && v.readyState >= 1 && isFinite(v.duration) ? v.duration : 0;")
    return float(value or 0)


def shot(driver: Any, folder: Path, name: str, at: str = "body") -> Path:
    """A screenshot of the page scrolled to `at` (the view's result, not wherever the last click left it)."""
    driver.execute_script("document.querySelector(arguments[0]).scrollIntoView({block: 'start'});", at)
    path = folder / f"{name}.png"
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


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
    checks = {r.find_elements("css selector", "td")[1].text for r in rows}
    assert {"gpu", "torch", "port"} <= checks
    shot(browser, tmp_path, "machine")


def test_a_text_file_named_png_is_refused_with_one_line_before_any_run(
        server: Server, tiny: dict[str, Path], browser: Any, tmp_path: Path) -> None:
    open_page(browser, server.url)
    upload(browser, "itk-face", tiny["text"])
    upload(browser, "itk-speech1", tiny["speech"])
    click(browser, "#itk-generate")
    message = wait_for("the error line", lambda: [e.text for e in css(browser, "#itk-error .itk-message")
                                                  if e.text], 60)[0]
    shot(browser, tmp_path, "error", "#itk-error")
    assert "notes.png is not a readable image" in message and "\n" not in message
    assert str(server.outputs) not in message  # named as uploaded, not by the staged copy
    assert "Traceback" not in browser.page_source


def test_the_api_answers_with_the_doctor_table_and_the_one_line_error(server: Server, tiny: dict[str, Path]) -> None:
    from gradio_client import Client, handle_file

    client = Client(server.url, verbose=False)
    table = client.predict(api_name="/doctor")
    assert "itk-doctor-table" in table and "itk-check" in table
    out = client.predict(handle_file(str(tiny["text"])), handle_file(str(tiny["speech"])), None, "add", "", "", "",
                         PRESET, 42, *[""] * len(advanced_names()), api_name="/generate")
    status, error = out[0], out[1]
    assert status == "" and "notes.png is not a readable image" in error


def advanced_names() -> list[str]:
    from itk.ui import advanced_flags

    return [f.name for f in advanced_flags()]


def test_cancel_stops_every_process_of_the_running_job(tiny: dict[str, Path], browser: Any, tmp_path: Path) -> None:
    pids_file = tmp_path / "pids.json"
    srv = Server(tmp_path, tiny["weights"], env={
        "ITK_GENERATOR": f"{sys.executable} {ROOT / 'tests' / 'fake_generator.py'}",
        "FAKE_MODE": "hang", "FAKE_PIDS": str(pids_file)})
    try:
        open_page(browser, srv.url)
        upload(browser, "itk-face", tiny["image"])
        upload(browser, "itk-speech1", tiny["speech"])
        click(browser, "#itk-generate")
        wait_for("the generator and its grandchild", pids_file.exists, 120)
        pids = json.loads(pids_file.read_text())
        assert all(psutil.pid_exists(p) for p in pids)
        click(browser, "#itk-cancel")
        line = wait_for("the cancelled line", lambda: [e.text for e in css(browser, "#itk-cancelled") if e.text],
                        60)[0]
        shot(browser, tmp_path, "cancelled", "#itk-cancelled")
        assert "no process of the job is left" in line
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert alive == []
    finally:
        srv.stop()
