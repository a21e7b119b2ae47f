"""The sampler against the official scheduler golden: timesteps, Euler+CFG step, APG."""

from __future__ import annotations

import json

import pytest
import torch

from itk.runtime.sampler import MomentumBuffer, Sampler, apg, euler_step, shifted_timesteps
from itk.runtime.sampling import Sampling

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
    sampler = Sampler(Sampling(text_scale=text_scale, audio_scale=4.0))
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


def test_apg_with_momentum_carried_over_two_steps_matches():
    buffer = MomentumBuffer(-0.75)
    one = apg(T["input.apg.diff_1"], T["input.apg.pred_cond_1"], buffer, 55.0)
    two = apg(T["input.apg.diff_2"], T["input.apg.pred_cond_2"], buffer, 55.0)
    plain = apg(T["input.apg.diff_1"], T["input.apg.pred_cond_1"], None, 0.0)
    assert rel_err(one, T["output.apg.step_1"]) == 0.0
    assert rel_err(two, T["output.apg.step_2"]) == 0.0
    assert rel_err(plain, T["output.apg.no_momentum_no_threshold"]) == 0.0


def _preds(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(1, 4, 2, 3, 3, generator=g) for k in ("cond", "drop_text", "uncond", "drop_audio")}


@pytest.mark.parametrize("use_apg", [False, True])
def test_the_text_scale_weighs_the_text_difference_and_the_audio_scale_the_audio_one(use_apg):
    # Official (wan/multitalk.py): text = cond - drop_text, audio = drop_text - uncond. Distinct scales and
    # APG's two momentum buffers carried over two steps: swapping either scales or buffers changes the result.
    text_scale, audio_scale, momentum, threshold = 5.0, 2.0, -0.75, 55.0
    sampler = Sampler(Sampling(text_scale=text_scale, audio_scale=audio_scale, use_apg=use_apg, apg_momentum=momentum,
                               apg_norm_threshold=threshold))
    text_buffer, audio_buffer = MomentumBuffer(momentum), MomentumBuffer(momentum)
    for step in range(2):
        p = _preds(step)
        text, audio = p["cond"] - p["drop_text"], p["drop_text"] - p["uncond"]
        if use_apg:
            text = apg(text, p["cond"], text_buffer, threshold)
            audio = apg(audio, p["cond"], audio_buffer, threshold)
            expected = p["cond"] + (text_scale - 1) * text + (audio_scale - 1) * audio
        else:
            expected = p["uncond"] + text_scale * text + audio_scale * audio
        ours = sampler.velocity({k: p[k] for k in sampler.passes()})
        assert torch.allclose(ours, expected, rtol=0, atol=1e-6), step


@pytest.mark.parametrize("use_apg", [False, True])
def test_with_an_audio_scale_of_one_the_audio_free_pass_has_no_effect_beyond_the_text_term(use_apg):
    # audio_scale 1 means no extra audio guidance: the velocity may depend on `uncond` only through the
    # text term, which does not contain it. A swapped scale would put (text_scale - 1) on the audio term.
    p = _preds()
    other = {**p, "uncond": p["uncond"] + 3.0 * torch.randn(p["uncond"].shape, generator=torch.Generator())}
    sampling = Sampling(text_scale=5.0, audio_scale=1.0, use_apg=use_apg)
    # (CFG: uncond + s_t (cond - drop_text) + s_a (drop_text - uncond) holds uncond with weight 1 - s_a.)
    assert torch.allclose(Sampler(sampling).velocity(p), Sampler(sampling).velocity(other), atol=1e-5)


def test_two_pass_apg_scales_the_audio_difference_by_the_audio_scale():
    p = _preds()
    sampler = Sampler(Sampling(text_scale=1.0, audio_scale=3.0, use_apg=True, apg_norm_threshold=0.0))
    expected = p["cond"] + 2.0 * apg(p["cond"] - p["drop_audio"], p["cond"], MomentumBuffer(-0.75), 0.0)
    assert torch.allclose(sampler.velocity({k: p[k] for k in sampler.passes()}), expected, atol=1e-6)


@pytest.mark.parametrize("text_scale,audio_scale,calls", [(1.0, 1.0, 1), (1.0, 2.0, 2), (5.0, 1.0, 3), (5.0, 4.0, 3)])
def test_each_step_runs_one_dit_call_per_needed_pass(text_scale, audio_scale, calls):
    """Both scales 1: one call (the official code runs two and discards one); text 1: two; otherwise three."""
    from itk.runtime.pipeline import StreamingPipeline

    seen: list[torch.Tensor] = []

    def dit(x, t, context, clip_fea, y, audio):
        seen.append(audio)
        return x * 0.5 + context.mean()

    steps = 4
    sampling = Sampling(steps=steps, shift=2.0, text_scale=text_scale, audio_scale=audio_scale)
    pipeline = StreamingPipeline(dit=dit, vae=None, sampling=sampling, noise=None)
    window = torch.ones(1, 9, 5, 2, 3)
    latent = pipeline._denoise(0, noise=torch.randn(16, 3, 2, 2), motion=torch.zeros(16, 1, 2, 2),
                               y=torch.zeros(1, 20, 3, 2, 2), window=window, clip_fea=torch.zeros(1, 4, 8),
                               context=torch.ones(3, 8), context_null=torch.zeros(3, 8),
                               timesteps=shifted_timesteps(steps, 2.0))
    assert len(seen) == steps * calls and torch.isfinite(latent).all()
    if calls == 1:  # the one call is the conditional one, and its prediction is the velocity
        assert all(torch.equal(a, window) for a in seen)
