"""`itk ui` through its API and HTTP, no browser (gradio_client, as scripts use it): the doctor table and a
refusal in the page's words; one generator at a time whatever ends a job (a job cancelled through Gradio's cancel
endpoint, as `Job.cancel()` does, is stopped before the next job's generator starts, checked by the stand-in
generator as it starts) and a page's Cancel stopping its own job only; a stopped server stopping its job; Gradio's
copies of the uploads deleted once their job ended, with a size cap; with --auth, a stranger's page without the
API description, and refusals naming no server folder. The generator is tests/fake_generator.py."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ui_page import FAKE_GENERATOR, Server, alive, form, tiny_files, wait_for

_tiny = pytest.fixture(scope="module", name="tiny")(tiny_files)


@pytest.fixture(scope="module")
def server(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A page whose generator makes a small video at once; Gradio's temp folder under `root/gradio`; uploads up
    to 1 MB."""
    root = tmp_path_factory.mktemp("ui-api")
    srv = Server(root, tiny["weights"], env={"ITK_GENERATOR": FAKE_GENERATOR, "FAKE_MODE": "ok",
                                             "GRADIO_TEMP_DIR": str(root / "gradio")}, serve={"max_upload": "1mb"})
    yield srv
    srv.stop()


def starts_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def hanging(tmp_path: Path) -> dict[str, str]:
    return {"ITK_GENERATOR": FAKE_GENERATOR, "FAKE_MODE": "hang", "FAKE_PIDS": str(tmp_path / "pids.json"),
            "FAKE_STARTS": str(tmp_path / "starts.jsonl"), "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}


def page_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=20) as response:
        return response.read().decode("utf-8", errors="replace")


def test_the_api_answers_with_the_doctor_table_and_the_one_line_error(server: Server, tiny: dict[str, Path]) -> None:
    from gradio_client import Client

    client = Client(server.url, verbose=False)
    table = client.predict(api_name="/doctor")
    assert "itk-doctor-table" in table and "itk-check" in table and "`" not in table
    out = client.predict(*form(tiny["text"], tiny["speech"]), api_name="/generate")
    status, error = out[0], out[1]
    assert status == "" and "notes.png is not a readable image" in error
    assert str(server.outputs) not in error and "/gradio" not in error and "itk-ui-uploads" not in error


def test_uploads_are_deleted_once_their_job_ended_and_a_larger_one_is_refused(
        server: Server, tiny: dict[str, Path]) -> None:
    from gradio_client import Client

    gradio = server.outputs.parent / "gradio"
    status = Client(server.url, verbose=False).predict(*form(tiny["image"], tiny["speech"]), api_name="/generate")[0]
    assert "itk-done" in status
    assert not list(gradio.rglob("portrait.png")) and not list(gradio.rglob("speech.wav"))
    job = max(server.outputs.glob("*/job.json"), key=lambda p: p.stat().st_mtime).parent
    assert (job / "image.png").is_file() and (job / "speech1.wav").is_file() and list(job.glob("*.mp4"))

    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.wav\"\r\n"
            f"Content-Type: audio/wav\r\n\r\n").encode() + b"\0" * 2_000_000 + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{server.url}gradio_api/upload", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 413 and not list(gradio.rglob("big.wav"))


def test_a_job_cancelled_through_the_api_is_gone_before_the_next_starts_and_cancel_stays_with_its_page(
        tiny: dict[str, Path], tmp_path: Path) -> None:
    from gradio_client import Client

    starts = tmp_path / "starts.jsonl"
    srv = Server(tmp_path, tiny["weights"], env=hanging(tmp_path))
    try:
        first_page, second_page = Client(srv.url, verbose=False), Client(srv.url, verbose=False)
        first = first_page.submit(*form(tiny["image"], tiny["speech"]), api_name="/generate")
        wait_for("the first job's generator", lambda: starts_of(starts), 120)
        second = second_page.submit(*form(tiny["image"], tiny["speech"]), api_name="/generate")
        time.sleep(3)
        assert len(starts_of(starts)) == 1  # one generator at a time: the second job waits
        first.cancel()
        wait_for("the second job's generator", lambda: len(starts_of(starts)) == 2, 120)
        one, two = starts_of(starts)
        assert two["alive_before"] == [], "the second generator started beside the first job's processes"
        assert alive(one["pids"]) == []

        assert "no job of this page is running" in first_page.predict(api_name="/cancel")
        time.sleep(2)
        assert alive(two["pids"]) == two["pids"]  # the first page's Cancel did not stop the second page's job
        assert "cancelling" in second_page.predict(api_name="/cancel")
        status = second.result(timeout=90)[0]
        assert "no process of the job is left" in status and alive(two["pids"]) == []
    finally:
        srv.stop()


def test_stopping_the_server_stops_the_running_job_and_deletes_the_uploads(
        tiny: dict[str, Path], tmp_path: Path) -> None:
    from gradio_client import Client

    starts = tmp_path / "starts.jsonl"
    srv = Server(tmp_path, tiny["weights"], env=hanging(tmp_path))
    try:
        Client(srv.url, verbose=False).submit(*form(tiny["image"], tiny["speech"]), api_name="/generate")
        pids = wait_for("the generator", lambda: starts_of(starts), 120)[0]["pids"]
        assert list((tmp_path / "gradio").rglob("speech.wav"))
        os.kill(srv.proc.pid, signal.SIGTERM)  # the server alone, as a service manager stops it
        srv.proc.wait(timeout=90)
        assert alive(pids) == []
        assert not list((tmp_path / "gradio").rglob("*.*"))  # Gradio's copies of the uploads are deleted
        assert list(srv.outputs.glob("*/image.png"))  # the job's own folder is kept
    finally:
        srv.stop()


def test_with_auth_a_stranger_gets_no_api_description_and_refusals_name_no_server_folder(
        tiny: dict[str, Path], tmp_path: Path) -> None:
    from gradio_client import Client

    empty = tmp_path / "no-weights"
    empty.mkdir()
    srv = Server(tmp_path, empty, args=("--auth", "me:a-long-password"))
    try:
        login = page_text(srv.url)
        assert '"auth_required":true' in login and "window.gradio_api_info = null;" in login
        for secret in ("generate", "cancel_fetch", "rtx4090-24g", "sample_steps"):
            assert secret not in login, f"the login page tells a stranger about {secret}"

        client = Client(srv.url, auth=("me", "a-long-password"), verbose=False)
        error = client.predict(*form(tiny["image"], tiny["speech"]), api_name="/generate")[1]
        assert "weight file(s) not usable" in error and "itk fetch --preset" in error
        for folder in (str(empty), str(srv.outputs), str(tmp_path)):
            assert folder not in error, f"the refusal shows the server's folder {folder}"
    finally:
        srv.stop()


def test_the_page_refuses_to_listen_on_the_network_without_a_password_and_says_so_plainly_with_one(tmp_path):
    import subprocess
    import sys

    bare = subprocess.run([sys.executable, "-m", "itk", "ui", "--listen", "--port", "18455", "--output-dir",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert bare.returncode == 2 and "--listen without --auth" in bare.stderr and "fix: add --auth" in bare.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was made
