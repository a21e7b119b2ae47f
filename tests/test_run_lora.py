"""`itk run --lora FILE[:SCALE]` and the fast presets' LoRAs: checked before the model loads, passed as
--lora_dir / --lora_scale in zip order (the preset's first), and shown by --dry-run with the steps x passes."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from run_media import fake_env, itk, write_image, write_wav, write_weights

from itk.run import lora_pairs, plan_run
from itk.runtime.protocol import EXIT_BAD_INPUT, UserError
from itk.spec import RunSpec

FAST_LORA = "Wan2.1-Distill-Loras/wan2.1_i2v_lora_rank64_lightx2v_4step.safetensors"


def write_lora(path: Path, keys: tuple[str, ...] = ("lora_down.weight", "lora_up.weight"),
               prefix: str = "diffusion_model.blocks.0.self_attn.q.") -> Path:
    from safetensors.numpy import save_file

    save_file({prefix + k: np.zeros((4, 4), dtype=np.float32) for k in keys}, str(path))
    return path


@pytest.fixture()
def media(tmp_path):
    return ["--image", str(write_image(tmp_path / "face.png")), "--audio", str(write_wav(tmp_path / "s.wav", 6.0))]


def plan(tmp_path: Path, *loras: str, preset: str = "rtx4090-24g-fast", sets: tuple[str, ...] = (), audio_s=6.0):
    spec = RunSpec.from_options(image=str(write_image(tmp_path / "face.png")),
                                audio=str(write_wav(tmp_path / "s.wav", audio_s)), output=tmp_path / "out" / "talk.mp4",
                                preset=preset, weights_dir=tmp_path / "w", sets=sets, loras=loras)
    return plan_run(replace(spec, gpu_name="H200"))


def values_after(argv: list[str], flag: str) -> list[str]:
    """The values of a nargs='+' flag: every argument up to the next flag."""
    rest = argv[argv.index(flag) + 1:]
    return rest[:next((i for i, a in enumerate(rest) if a.startswith("--")), len(rest))]


def test_a_users_loras_follow_the_presets_own_in_zip_order_with_their_scales(tmp_path):
    mine, other = write_lora(tmp_path / "mine.safetensors"), write_lora(tmp_path / "other.safetensors")
    p = plan(tmp_path, f"{mine}:0.8", str(other))
    assert values_after(p.argv, "--lora_dir") == [str(tmp_path / "w" / FAST_LORA), str(mine), str(other)]
    assert values_after(p.argv, "--lora_scale") == ["1.0", "0.8", "1.0"]
    # the files go with the path flags, the scales after the preset's settings
    assert p.argv.index("--lora_dir") > p.argv.index("--quant_dir") and p.argv.index("--lora_dir") < p.argv.index(
        "--quant")
    assert p.argv.index("--lora_scale") > p.argv.index("--mode") and p.argv.index("--lora_scale") < p.argv.index(
        "--input_json")
    assert p.loras == [(tmp_path / "w" / FAST_LORA, 1.0), (mine, 0.8), (other, 1.0)]


def test_a_lora_on_a_preset_without_one_adds_both_flags_and_a_preset_without_any_adds_neither(tmp_path):
    mine = write_lora(tmp_path / "mine.safetensors")
    p = plan(tmp_path, f"{mine}:-0.5", preset="rtx4090-24g")
    assert values_after(p.argv, "--lora_dir") == [str(mine)] and values_after(p.argv, "--lora_scale") == ["-0.5"]
    p = plan(tmp_path, preset="rtx4090-24g")
    assert "--lora_dir" not in p.argv and "--lora_scale" not in p.argv and p.loras == []


@pytest.mark.parametrize("keys", [("lora_A.weight", "lora_B.weight"), ("diff",), ("diff_b",)])
def test_every_lora_key_convention_passes_the_check(tmp_path, keys):
    for prefix in ("diffusion_model.blocks.0.ffn.0.", "transformer.blocks.0.attn1.to_q.", "blocks.0.attn2.to_k."):
        mine = write_lora(tmp_path / "mine.safetensors", keys, prefix)
        assert plan(tmp_path, str(mine), preset="rtx4090-24g").loras == [(mine, 1.0)]


def test_a_file_whose_name_holds_a_colon_is_taken_whole(tmp_path):
    mine = write_lora(tmp_path / "v1:2.safetensors")
    assert plan(tmp_path, str(mine), preset="rtx4090-24g").loras == [(mine, 1.0)]


def bad_loras(tmp_path: Path) -> dict[str, tuple[str, str, str]]:
    """case -> (--lora value, what the one line says, what the fix says)."""
    (tmp_path / "notes.safetensors").write_text("these are not tensors")
    (tmp_path / "folder").mkdir()
    full = write_lora(tmp_path / "full.safetensors", ("weight", "bias"), "blocks.0.self_attn.q.")
    good = write_lora(tmp_path / "good.safetensors")
    return {
        "missing": (str(tmp_path / "gone.safetensors"), "no such file", "check the path"),
        "folder": (str(tmp_path / "folder"), "is a folder", ".safetensors file inside it"),
        "not safetensors": (str(tmp_path / "notes.safetensors"), "is not a safetensors file", "convert it"),
        "no lora keys": (str(full), "has 2 tensors but no LoRA keys (first: blocks.0.self_attn.q.",
                         "lora_down.weight"),
        "scale not a number": (f"{good}:strong", "the scale 'strong' is not a number", f"--lora {good}:0.8"),
        "scale not finite": (f"{good}:nan", "the scale must be a finite number", f"--lora {good}:1"),
    }


@pytest.mark.parametrize("case", ["missing", "folder", "not safetensors", "no lora keys", "scale not a number",
                                  "scale not finite"])
def test_a_bad_lora_is_one_line_and_a_fix_with_exit_2(tmp_path, case):
    value, says, fix = bad_loras(tmp_path)[case]
    with pytest.raises(UserError) as caught:
        plan(tmp_path, value)
    assert caught.value.exit_code == EXIT_BAD_INPUT and says in caught.value.message and fix in caught.value.fix
    assert "\n" not in caught.value.message


def test_a_bad_lora_stops_itk_run_before_anything_launches(tmp_path, media):
    write_weights(tmp_path / "w", "rtx4090-24g-fast")
    (tmp_path / "notes.safetensors").write_text("not tensors")
    argv_file = tmp_path / "argv.json"
    proc = itk("run", *media, "--preset", "rtx4090-24g-fast", "--weights-dir", str(tmp_path / "w"),
               "--lora", str(tmp_path / "notes.safetensors"), env=fake_env("ok", FAKE_ARGV=str(argv_file)),
               cwd=tmp_path)
    assert proc.returncode == 2 and "is not a safetensors file" in proc.stderr and "Traceback" not in proc.stderr
    assert not argv_file.exists()


def test_a_fast_preset_run_passes_its_lora_and_the_users_to_the_generator(tmp_path, media):
    write_weights(tmp_path / "w", "rtx4090-24g-fast")
    mine = write_lora(tmp_path / "mine.safetensors")
    argv_file = tmp_path / "argv.json"
    proc = itk("run", *media, "--preset", "rtx4090-24g-fast", "--weights-dir", str(tmp_path / "w"),
               "--lora", f"{mine}:0.7", "--output", str(tmp_path / "out" / "talk.mp4"),
               env=fake_env("ok", FAKE_ARGV=str(argv_file)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    argv = json.loads(argv_file.read_text())
    assert values_after(argv, "--lora_dir") == [str(tmp_path / "w" / FAST_LORA), str(mine)]
    assert values_after(argv, "--lora_scale") == ["1.0", "0.7"]
    assert values_after(argv, "--sample_steps") == ["4"] and values_after(argv, "--sample_text_guide_scale") == ["1.0"]


def test_dry_run_shows_the_steps_x_passes_and_every_lora(tmp_path, media):
    mine = write_lora(tmp_path / "mine.safetensors")
    proc = itk("run", "--dry-run", *media, "--preset", "rtx4090-24g-fast", "--lora", f"{mine}:0.8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert ("preset rtx4090-24g-fast (chosen with --preset); 4 steps x 2 passes, LoRA "
            "wan2.1_i2v_lora_rank64_lightx2v_4step.safetensors x1 + mine.safetensors x0.8") in proc.stderr
    assert "--lora_dir" in proc.stdout and str(mine) in proc.stdout
    data = json.loads(itk("run", "--dry-run", "--json", *media, "--preset", "rtx4090-24g-fast", "--lora",
                          f"{mine}:0.8", cwd=tmp_path).stdout)
    assert (data["steps"], data["passes"]) == (4, 2)
    assert [(Path(lo["file"]).name, lo["scale"]) for lo in data["loras"]] == [
        ("wan2.1_i2v_lora_rank64_lightx2v_4step.safetensors", 1.0), ("mine.safetensors", 0.8)]


def test_guidance_overrides_change_the_passes_the_plan_shows(tmp_path):
    p = plan(tmp_path, preset="rtx4090-24g", sets=("sample_text_guide_scale=1", "sample_audio_guide_scale=1"))
    assert p.passes == 1 and p.recipe == "40 steps x 1 passes"
    assert plan(tmp_path, preset="rtx4090-24g").passes == 3


def test_set_lora_scale_replaces_the_scales_only_one_per_file():
    a, b = Path("/w/a.safetensors"), Path("/m/b.safetensors")
    assert lora_pairs([(a, 1.0)], [(b, 0.5)], None) == [(a, 1.0), (b, 0.5)]
    assert lora_pairs([(a, 1.0)], [(b, 0.5)], [0.9, 0.4]) == [(a, 0.9), (b, 0.4)]
    with pytest.raises(UserError, match=r"gives 1 scale\(s\) for 2 LoRA file\(s\) \(a.safetensors, b.safetensors\)"):
        lora_pairs([(a, 1.0)], [(b, 0.5)], [0.9])


def test_fusionx_warns_about_colour_shift_on_a_video_past_a_minute(tmp_path):
    whole = ("max_frame_num=1600",)  # 61 s is 1525 frames: past the default cap of 1000 (40 s)
    p = plan(tmp_path, preset="rtx4090-24g-fusionx", audio_s=61.0, sets=whole)
    assert any("FusionX makes the colour shift past a minute worse" in w for w in p.media.warnings)
    assert not any("FusionX" in w for w in plan(tmp_path, preset="rtx4090-24g-fusionx", audio_s=59.0,
                                                   sets=whole).media.warnings)
    p = plan(tmp_path, preset="rtx4090-24g-fast", audio_s=61.0, sets=whole)
    assert not any("FusionX" in w for w in p.media.warnings)


def test_checking_a_lora_never_imports_torch(tmp_path):
    mine = write_lora(tmp_path / "mine.safetensors")
    code = (f"import sys; from itk.inputs import check_lora, parse_lora; "
            f"f = check_lora(*parse_lora({str(mine) + ':0.5'!r})); "
            "assert f.scale == 0.5 and f.tensors == 2; assert 'torch' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
