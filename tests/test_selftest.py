"""The tiny official layout (runtime.tiny) and `itk selftest`, the end-to-end run on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from itk import selftest
from itk.runtime import tiny

from golden import GOLDENS

META = json.loads((GOLDENS / "pipeline_A.json").read_text())


def _shapes(name: str) -> dict:
    return {k: tuple(v.shape) for k, v in load_file(GOLDENS / f"pipeline_A.{name}.safetensors").items()}


def test_the_dit_key_schema_equals_the_official_checkpoint_keys_at_pipeline_a_sizes():
    c, patched = META["dit_config"], META["dit_hardcoded_patched"]
    d = {"dim": c["dim"], "ffn_dim": c["ffn_dim"], "num_layers": c["num_layers"], "text_dim": c["text_dim"],
         "audio_intermediate_dim": c["intermediate_dim"], "audio_output_dim": c["output_dim"],
         "audio_context_tokens": c["context_tokens"], **patched}
    assert {**tiny._dit_shapes(d), **tiny._adapter_shapes(d)} == _shapes("dit")


def test_the_t5_and_full_clip_key_schemas_equal_the_official_files():
    t, c = META["t5_overrides"], META["clip_overrides"]
    t5 = {"vocab_size": t["vocab_size"], "dim": t["dim"], "dim_attn": t["dim_attn"], "dim_ffn": t["dim_ffn"],
          "num_heads": t["num_heads"], "num_layers": t["encoder_layers"]}
    assert tiny._t5_shapes(t5) == _shapes("t5")
    text = {"dim": c["text_dim"], "heads": c["text_heads"], "layers": c["text_layers"], "vocab": c["vocab_size"],
            "max_len": c["max_text_len"], "embed_dim": c["embed_dim"]}
    assert tiny._clip_shapes({"width": c["vision_dim"], "layers": c["vision_layers"]}, text) == _shapes("clip")


def test_the_tiny_tokenizer_folder_loads_with_transformers_and_ends_with_eos(tmp_path):
    from transformers import AutoTokenizer

    size = tiny._tokenizer(tmp_path / "umt5", 0)
    tok = AutoTokenizer.from_pretrained(tmp_path / "umt5")
    ids = tok(["a person is talking"], padding="max_length", max_length=16, truncation=True)["input_ids"][0]
    assert sorted(p.name for p in (tmp_path / "umt5").iterdir()) == [
        "special_tokens_map.json", "spiece.model", "tokenizer.json", "tokenizer_config.json"]
    assert 1 in ids and max(ids) < size and ids[ids.index(1) + 1:] == [0] * (15 - ids.index(1))


def test_selftest_writes_the_official_layout_and_a_checked_video(tmp_path):
    # No time limit here: speed targets live in bench/ (the selftest's time is printed by the command itself).
    for module in ("dit", "vae", "t5", "clip", "audio"):
        pytest.importorskip(f"itk.runtime.models.{module}")
    proc = subprocess.run([sys.executable, "-m", "itk", "selftest", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert f"video: {tmp_path / 'selftest.mp4'}" in lines
    # make setup's closing line (.ci/run greps it): on this GPU-less machine it says what cannot run here
    assert lines[-1].startswith("selftest passed") and "no NVIDIA GPU" in lines[-1]
    # its stages, as lines in a pipe, in words rather than the generator's internal names
    assert "selftest: generator clip 1, step 1 of 4" in lines and "selftest: reading the speech" in lines
    assert not any("_" in line for line in lines if line.startswith("selftest: "))
    ckpt = tmp_path / "weights" / "Wan2.1-I2V-14B-480P"
    for name in ("config.json", "Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth",
                 "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
                 "diffusion_pytorch_model.safetensors.index.json", "google/umt5-xxl/spiece.model",
                 "xlm-roberta-large/sentencepiece.bpe.model", "xlm-roberta-large/tokenizer.json",
                 *[f"diffusion_pytorch_model-0000{i}-of-00007.safetensors" for i in range(1, 8)]):
        assert (ckpt / name).is_file(), name
    for name in ("chinese-wav2vec2-base/config.json", "chinese-wav2vec2-base/preprocessor_config.json",
                 "chinese-wav2vec2-base/model.safetensors", "InfiniteTalk/single/infinitetalk.safetensors"):
        assert (tmp_path / "weights" / name).is_file(), name
    # the same way as `itk run`: planned, supervised (the log of events in its run folder), weights recorded
    log = (tmp_path / "selftest.run" / "generate.log").read_text()
    assert log.startswith("# itk run: ") and "--num_persistent_param_in_dit 0" in log.splitlines()[0]
    assert '"event": "done"' in log and (tmp_path / "selftest.run" / "job.json").is_file()
    verified = json.loads((tmp_path / "weights" / ".itk" / "verified.json").read_text())["files"]
    assert verified["InfiniteTalk/quant_models/infinitetalk_single_fp8.safetensors"]["verdict"] == "ok"


def needs_the_models() -> None:
    for module in ("dit", "vae", "t5", "clip", "audio"):
        pytest.importorskip(f"itk.runtime.models.{module}")


def run_selftest_cli(cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "TMPDIR": str(cache.parent / "tmp")}
    (cache.parent / "tmp").mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", "itk", "selftest", *args], capture_output=True, text=True, env=env,
                          timeout=240)


@pytest.fixture(scope="module")
def cached_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One cache folder: the single-speaker selftest, the two-speaker one, then the single-speaker one again,
    with the top-level listing of the cache after each."""
    needs_the_models()
    cache = tmp_path_factory.mktemp("selftest-cache") / "cache"
    root = cache / "itk" / "selftest"
    runs = {}
    for name, args in (("single", ()), ("two", ("--two-speakers",)), ("again", ())):
        proc = run_selftest_cli(cache, *args)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        runs[name] = {"lines": proc.stdout.splitlines(), "listing": sorted(p.name for p in root.iterdir()),
                      "mtimes": {p.name: p.stat().st_mtime_ns for p in root.glob("*.mp4")}}
    return {"cache": cache, "root": root, "runs": runs}


def test_a_passing_selftest_leaves_its_cached_tiny_weights_and_the_mp4_and_nothing_else(cached_runs):
    root, single = cached_runs["root"], cached_runs["runs"]["single"]
    assert single["listing"] == sorted([selftest.tiny_key(), "selftest.mp4"])  # no portrait, speech or run folder
    assert f"video: {root / 'selftest.mp4'}" in single["lines"]
    assert any("writing them" in line for line in single["lines"])
    # No temp folder per run; torch's own compile cache folder (one per user, reused) may appear.
    tmp = cached_runs["cache"].parent / "tmp"
    assert [p for p in tmp.iterdir() if not p.name.startswith("torchinductor_")] == []


def test_the_two_speaker_selftest_keeps_its_own_weights_and_video_beside_the_single_speaker_ones(cached_runs):
    root, runs = cached_runs["root"], cached_runs["runs"]
    assert runs["two"]["listing"] == sorted([selftest.tiny_key(), selftest.tiny_key(multi=True), "selftest.mp4",
                                             "selftest-two-speakers.mp4"])
    assert f"video: {root / 'selftest-two-speakers.mp4'}" in runs["two"]["lines"]
    assert runs["two"]["mtimes"]["selftest.mp4"] == runs["single"]["mtimes"]["selftest.mp4"]  # not overwritten
    again = runs["again"]
    assert any("reusing the cached set" in line for line in again["lines"])  # the single set survived
    assert not any("writing them" in line for line in again["lines"])
    assert again["listing"] == runs["two"]["listing"]  # nothing piles up


def test_a_failing_selftest_keeps_its_inputs_and_run_folder_and_says_where(cached_runs, tmp_path):
    import shutil

    import torch

    cache = tmp_path / "cache"
    shutil.copytree(cached_runs["cache"], cache)
    root = cache / "itk" / "selftest"
    weights = root / selftest.tiny_key()
    torch.save({"not_a_vae_key": torch.zeros(1)}, weights / "Wan2.1-I2V-14B-480P" / "Wan2.1_VAE.pth")
    selftest.record_tiny_verdicts(weights)  # verified as written: only the generator's strict load finds it
    proc = run_selftest_cli(cache)
    assert proc.returncode != 0
    said = proc.stdout + proc.stderr
    assert (root / "selftest.run" / "generate.log").is_file() and (root / "selftest.inputs" / "portrait.png").is_file()
    assert (root / "selftest.inputs" / "speech.wav").is_file() and not (root / "selftest.mp4").exists()
    assert str(root / "selftest.run" / "generate.log") in said and f"the files are in {root}" in said


def _fake_writer(calls: list[Path], fail: bool = False):
    def write(root: Path, seed: int = 0, multi: bool = False) -> None:
        calls.append(Path(root))
        (Path(root) / "Wan2.1-I2V-14B-480P").mkdir(parents=True)
        (Path(root) / "Wan2.1-I2V-14B-480P" / "config.json").write_text("{}")
        if fail:
            raise KeyboardInterrupt

    return write


def test_tiny_weights_are_written_once_per_version_and_an_interrupted_write_is_never_reused(tmp_path, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(selftest, "record_tiny_verdicts", lambda folder, multi=False: 0)
    monkeypatch.setattr(tiny, "write_tiny_weights", _fake_writer(calls, fail=True))
    with pytest.raises(KeyboardInterrupt):
        selftest.cached_tiny_weights(tmp_path)
    assert list(tmp_path.iterdir()) == []  # Ctrl-C mid-write: the partial folder is gone
    monkeypatch.setattr(tiny, "write_tiny_weights", _fake_writer(calls))
    first = selftest.cached_tiny_weights(tmp_path)
    assert selftest.cached_tiny_weights(tmp_path) == first and len(calls) == 2  # reused, not rewritten
    assert first.name == selftest.tiny_key() and (first / "Wan2.1-I2V-14B-480P" / "config.json").is_file()
    assert calls[-1].name.startswith(first.name + ".partial-")  # written beside, renamed when complete


def test_stale_partials_of_dead_runs_and_old_tiny_versions_are_removed_and_live_ones_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(selftest, "record_tiny_verdicts", lambda folder, multi=False: 0)
    monkeypatch.setattr(tiny, "write_tiny_weights", _fake_writer([]))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    key = selftest.tiny_key()
    for name in (f"{key}.partial-{dead.pid}", "tiny-000000000000-seed0"):
        (tmp_path / name).mkdir()
    live = tmp_path / f"{key}.partial-{os.getppid()}"  # another selftest still writing: left alone
    live.mkdir()
    final = selftest.cached_tiny_weights(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([final.name, live.name])


def test_the_closing_line_says_what_works_here_and_what_to_do_next():
    from itk.machine import MachineFacts

    cpu = selftest.closing_line(MachineFacts(usable_ram_gb=24.0))
    assert cpu.startswith("selftest passed") and "no NVIDIA GPU" in cpu and "itk run" in cpu
    h100 = selftest.closing_line(MachineFacts(vram_gb=79.6, compute_capability=9.0, usable_ram_gb=251.0,
                                              gpu_name="NVIDIA H100 80GB HBM3"))
    assert h100.startswith("selftest passed on NVIDIA H100 80GB HBM3: ready") and "gpu80g-fp8-480p" in h100
    assert "`itk fetch` (31.9 GB), then `itk run --image" in h100 and "no NVIDIA GPU" not in h100
    small = selftest.closing_line(MachineFacts(vram_gb=12.0, compute_capability=8.6, usable_ram_gb=32.0,
                                               gpu_name="NVIDIA GeForce RTX 3060"))
    assert small.startswith("selftest passed on NVIDIA GeForce RTX 3060") and "itk presets" in small
