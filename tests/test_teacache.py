"""TeaCache against the official run (goldens teacache_A: 3 passes, teacache_2pass_A: text guidance 1)."""

from __future__ import annotations

import logging

import pytest
import torch
from test_dit import golden_config

from itk.runtime.models.audio import audio_windows
from itk.runtime.models.dit import InfiniteTalkDiT, load_dit
from itk.runtime.pipeline import StreamingPipeline
from itk.runtime.sampler import Sampler, shifted_timesteps
from itk.runtime.sampling import Sampling
from itk.runtime.teacache import TeaCache, TeaCachedDiT

from golden import golden_weights_file, load_golden, rel_err

TOL = 1e-4


@pytest.fixture(scope="module")
def dit_a(tmp_path_factory):
    path = tmp_path_factory.mktemp("dit") / "dit_A.safetensors"
    meta, tensors = golden_weights_file("dit_A", path)
    return meta, tensors, path


def run_golden(dit_a, name: str, cycle: int | None = None):
    """Our pipeline's denoising loop on the golden's inputs, TeaCache on; returns what it recorded."""
    meta_a, dit_tensors, path = dit_a
    meta, t = load_golden(name)
    model: InfiniteTalkDiT = load_dit([path], golden_config(meta_a), dtype=torch.float32)
    model.time_embedding[0].weight.data.copy_(t["time_embedding.0.weight"])
    args = meta["arguments"]
    steps = args["sampling_steps"]
    sampling = Sampling(frame_num=args["frame_num"], steps=steps, shift=args["shift"],
                        text_scale=args["text_guide_scale"], audio_scale=args["audio_guide_scale"])
    passes = Sampler(sampling).passes()
    cache = TeaCache(args["extra_args"]["size"], thresh=args["extra_args"]["teacache_thresh"], steps=steps,
                     cycle=cycle or len(passes))
    preds: dict[str, list[torch.Tensor]] = {p: [] for p in passes}
    pipeline = StreamingPipeline(dit=TeaCachedDiT(model, model.run_blocks, cache), vae=None, sampling=sampling,
                                 noise=None, on_dit_call=lambda k, i, p, lat, ts, pred: preds[p].append(pred))
    window = audio_windows(t["input.audio_embedding.person1"], 0, args["frame_num"])[None]
    motion = dit_tensors["input.y"][0, 4:][:, :1]
    context_null = t.get("input.context_null", dit_tensors["input.context"])
    timesteps = shifted_timesteps(steps, args["shift"])
    with torch.no_grad():
        x0 = pipeline._denoise(0, noise=t["input.noise"].clone(), motion=motion, y=t["intermediate.y"], window=window,
                               clip_fea=dit_tensors["input.clip_fea"], context=dit_tensors["input.context"],
                               context_null=context_null, timesteps=timesteps)
    computed = torch.tensor(cache.computed).view(steps, len(passes))
    return meta, t, passes, preds, computed, x0


def pattern(column: torch.Tensor) -> str:
    return "".join("C" if c else "s" for c in column.tolist())


def test_three_pass_decisions_outputs_and_final_latent_match_the_official_teacache(dit_a):
    meta, t, passes, preds, computed, x0 = run_golden(dit_a, "teacache_A")
    assert torch.equal(computed, t["intermediate.teacache.computed"].bool())
    official = meta["teacache"]["pattern (C computed, s skipped; per pass over the steps)"]
    assert {p: pattern(computed[:, i]) for i, p in enumerate(passes)} == official
    for name in passes:
        assert rel_err(torch.stack(preds[name]), t[f"output.noise_pred.{name}"]) < TOL
    assert rel_err(x0, t["output.x0"]) < TOL


def test_with_text_guidance_1_the_official_slot_cycle_reproduces_the_official_drift(dit_a):
    meta, t, passes, preds, computed, x0 = run_golden(dit_a, "teacache_2pass_A", cycle=3)
    official = meta["teacache"]["pattern (C computed, s skipped; per pass over the steps)"]
    assert passes == ("cond", "drop_audio")
    assert {p: pattern(computed[:, i]) for i, p in enumerate(passes)} == official
    for name in passes:
        assert rel_err(torch.stack(preds[name]), t[f"output.noise_pred.{name}"]) < TOL
    assert rel_err(x0, t["output.x0"]) < TOL


def test_with_text_guidance_1_our_slots_follow_the_passes_and_both_decide_alike(dit_a):
    _, _, passes, _, computed, _ = run_golden(dit_a, "teacache_2pass_A")
    # One slot per pass: each compares with its own previous step (e0 depends only on t), so both passes
    # take the same decision every step, unlike the official drift (CCCCCCCCsC / CCCCCCCsCC).
    assert pattern(computed[:, 0]) == pattern(computed[:, 1])
    assert pattern(computed[:, 0]).startswith("CCCCC")


def test_teacache_never_skips_in_the_first_five_steps_and_says_so_for_four_steps(caplog):
    with caplog.at_level(logging.WARNING):
        cache = TeaCache("infinitetalk-480", thresh=1e9, steps=4, cycle=2)
    assert "changes nothing" in caplog.text
    run = cache.wrap(lambda tokens, e0: tokens + 1)
    for step in range(4):
        for _ in range(2):
            run(torch.zeros(2), torch.full((1, 6, 4), 1.0 + step * 1e-6))
    assert all(cache.computed)


def test_the_720p_coefficients_are_the_official_ones():
    from itk.runtime.teacache import COEFFICIENTS

    assert COEFFICIENTS["infinitetalk-720"][0] == pytest.approx(8107.05460)
    assert set(COEFFICIENTS) == {"infinitetalk-480", "infinitetalk-720"}
