"""What the page's tests share: `itk ui` started as a real process on a free port (stopped with its whole group),
the selftest's tiny weights, a real headless chromium (Debian's chromium + chromium-driver: skipped with the
install command outside CI, an error in CI), and small helpers to drive the page.

The fixtures are plain functions here; each test module names them, e.g.
`_chromium = pytest.fixture(scope="session", name="chromium")(find_chromium)`."""

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

import pytest

from itk.runtime.tiny import write_tiny_weights
from itk.selftest import PRESET, record_tiny_verdicts, write_portrait, write_speech

ROOT = Path(__file__).resolve().parent.parent
FAKE_GENERATOR = f"{sys.executable} {ROOT / 'tests' / 'fake_generator.py'}"
BROWSER_INSTALL = "apt-get install chromium chromium-driver"
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


def alive(pids: list[int]) -> list[int]:
    import psutil

    live = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                live.append(pid)
        except psutil.Error:
            continue
    return live


class Server:
    """`itk ui` as a child in its own session (stopped with its whole group at the end). `serve` (keyword
    arguments of itk.ui.serve) starts it through that function instead of the command line."""

    def __init__(self, root: Path, weights: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = (),
                 serve: dict[str, Any] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.outputs = root / "outputs"
        self.log = root / "ui.log"
        if serve is None:
            argv = [str(Path(sys.executable).with_name("itk")), "ui", "--port", str(self.port), "--weights-dir",
                    str(weights), "--output-dir", str(self.outputs), *args]
        else:
            options = {"port": self.port, "weights_dir": str(weights), "output_dir": str(self.outputs), **serve}
            argv = [sys.executable, "-c", "import json, sys; from itk.ui import serve; "
                    "sys.exit(serve(**json.loads(sys.argv[1])))", json.dumps(options)]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, "ITK_STOP_GRACE_S": "1", **(env or {})},
                                         start_new_session=True, cwd=ROOT)
        deadline = time.monotonic() + START_S
        while not answers(self.url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"itk ui did not start: {self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)


def tiny_inputs(root: Path) -> dict[str, Path]:
    weights = root / "weights"
    write_tiny_weights(weights)
    record_tiny_verdicts(weights, PRESET)
    text = root / "notes.png"
    text.write_text("these are meeting notes, not a picture\n")
    return {"root": root, "weights": weights, "image": write_portrait(root / "portrait.png"),
            "speech": write_speech(root / "speech.wav"), "text": text}


def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """(module fixture `tiny`) the tiny weights, a portrait, speech and a text file named .png."""
    return tiny_inputs(tmp_path_factory.mktemp("ui-tiny"))


BROWSER_MISSING = f"the page's browser tests need Debian's chromium and chromium-driver: {BROWSER_INSTALL}"


def browser_paths() -> tuple[str, str] | None:
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def skip_without_a_browser() -> None:
    """Called at the top of a module of browser tests: without chromium and its driver the whole module is
    skipped with one reason naming the install command, except in CI (CI set), where they must run: there each
    test fails (the `chromium` fixture)."""
    if browser_paths() is None and not os.environ.get("CI"):
        pytest.skip(BROWSER_MISSING, allow_module_level=True)


def find_chromium() -> tuple[str, str]:
    """(session fixture `chromium`, so a missing browser is found before any server starts) Debian's chromium and
    its driver; a failure naming the install command when they are missing (CI: see skip_without_a_browser)."""
    paths = browser_paths()
    if paths is None:
        pytest.fail(f"{BROWSER_MISSING} (CI is set: these tests must run there)", pytrace=False)
    return paths


def start_browser(chromium: tuple[str, str], size: str = "1400,1800") -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={size}",
                "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(chromium[1]), options=options)
    driver.set_page_load_timeout(60)
    return driver


def headless_browser(chromium: tuple[str, str]) -> Iterator[Any]:
    """(fixture `browser`) a headless chromium for one test."""
    driver = start_browser(chromium)
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


def open_accordion(driver: Any, accordion: str, inside: str) -> None:
    """Open the accordion `accordion` (an element id) unless `inside` (a selector in it) is already shown."""
    if not any(e.is_displayed() for e in css(driver, inside)):
        css(driver, f"#{accordion} button, #{accordion} .label-wrap")[0].click()
    wait_for(inside, lambda: [e for e in css(driver, inside) if e.is_displayed()], 20)


def set_advanced(driver: Any, name: str, value: str) -> None:
    field = f"#itk-set-{name} textarea, #itk-set-{name} input"
    open_accordion(driver, "itk-advanced", field)
    box = [e for e in css(driver, field) if e.is_displayed()][0]
    box.clear()
    box.send_keys(value)


def click(driver: Any, selector: str) -> None:
    wait_for(selector, lambda: css(driver, selector), 20)[0].click()


def error_line(driver: Any) -> str:
    return wait_for("the error line", lambda: [e.text for e in css(driver, "#itk-error .itk-message") if e.text],
                    120)[0]


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


def form(face: Path | str | None, speech: Path | str | None, **values: Any) -> list[Any]:
    """The Generate endpoint's inputs in order (gradio_client), each the page's default unless given."""
    from gradio_client import handle_file

    from itk.presets import get_preset
    from itk.ui import advanced_flags, field_update

    inputs = {"face": handle_file(str(face)) if face else None, "speech1": handle_file(str(speech)) if speech
              else None, "speech2": None, "text": "", "voice": None, "voice2": None, "mode": "add", "box1": "",
              "box2": "", "dub_region": "full", "prompt": "", "preset": PRESET, "seed": 42}
    preset = dict(get_preset(values.get("preset", PRESET)).generator)
    advanced = {f.name: field_update(f, preset).get("value", "") for f in advanced_flags()}
    for key, value in values.items():
        (inputs if key in inputs else advanced)[key] = value
    return [*inputs.values(), *advanced.values()]
