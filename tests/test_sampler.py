"""The sampler against the official scheduler golden: timesteps, Euler+CFG step, add_noise, APG."""

from __future__ import annotations

import json

import pytest
import torch

from itk.runtime.sampler import Guidance, MomentumBuffer, Sampler, add_noise, apg, euler_step, shifted_timesteps

from golden import GOLDENS, load_golden, rel_err

META, T = load_golden("scheduler")
TABLE = json.loads((GOLDENS / "scheduler_table.json").read_text())


@pytest.mark.parametrize("name", sorted(TABLE))
def test_shifted_timesteps_equal_the_official_schedule_bit_for_bit(name):
    steps, shift = (int(x) for x in name.removeprefix("steps").split("_shift"))
    ours = torch.cat(shifted_timesteps(steps, float(shift)))
    assert ours.dtype == torch.float32
    assert torch.equal(ours, T[f"output.timesteps.{name}"])
    assert ours.tolist() == TABLE[name]["timesteps"]


def _step(text_scale):
    ts = shifted_timesteps(8, 7.0)
    preds = {k: T[f"input.step.pred_{k}"] for k in ("cond", "drop_text", "uncond", "drop_audio")}
    sampler = Sampler(Guidance(text_scale=text_scale, audio_scale=4.0))
    used = {k: preds[k] for k in sampler.passes()}
    return euler_step(T["input.step.latent"], sampler.velocity(used), ts[2], ts[3]), sampler.passes()


def test_a_three_pass_guided_euler_step_matches_the_official_step():
    ours, passes = _step(5.0)
    assert passes == ("cond", "drop_text", "uncond")
    assert rel_err(ours, T["output.step.latent_next"]) == 0.0


def test_a_text_scale_of_exactly_one_uses_two_passes_and_matches():
    ours, passes = _step(1.0)
    assert passes == ("cond", "drop_audio")
    assert rel_err(ours, T["output.step.latent_next_text_scale_1"]) == 0.0


def test_motion_frame_renoising_matches_add_noise():
    t = shifted_timesteps(8, 7.0)[2]
    ours = add_noise(T["input.add_noise.original"], T["input.add_noise.noise"], t)
    assert rel_err(ours, T["output.add_noise"]) == 0.0


def test_apg_with_momentum_carried_over_two_steps_matches():
    buffer = MomentumBuffer(-0.75)
    one = apg(T["input.apg.diff_1"], T["input.apg.pred_cond_1"], buffer, 55.0)
    two = apg(T["input.apg.diff_2"], T["input.apg.pred_cond_2"], buffer, 55.0)
    plain = apg(T["input.apg.diff_1"], T["input.apg.pred_cond_1"], None, 0.0)
    assert rel_err(one, T["output.apg.step_1"]) == 0.0
    assert rel_err(two, T["output.apg.step_2"]) == 0.0
    assert rel_err(plain, T["output.apg.no_momentum_no_threshold"]) == 0.0
