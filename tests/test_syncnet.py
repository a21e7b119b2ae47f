"""SyncNet (syncnet_v2) on random weights written in the official checkpoint layout, its MFCC, its face crop and
the Sync-C / Sync-D scores, each checked against the reference implementation's definition."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from itk.runtime.models import syncnet
from itk.runtime.protocol import EXIT_MISSING_WEIGHTS, UserError

# The official syncnet_v2.model: conv / BatchNorm indices of each nn.Sequential and every tensor's shape, as
# joonson/syncnet_python's SyncNetModel.S defines them (no num_batches_tracked: saved by an old PyTorch).
CONV_AT = (0, 4, 8, 11, 14, 18)
AUDIO_CONVS = ((64, 1, 3, 3), (192, 64, 3, 3), (384, 192, 3, 3), (256, 384, 3, 3), (256, 256, 3, 3), (512, 256, 5, 4))
LIP_CONVS = ((96, 3, 5, 7, 7), (256, 96, 1, 5, 5), (256, 256, 1, 3, 3), (256, 256, 1, 3, 3), (256, 256, 1, 3, 3),
             (512, 256, 1, 6, 6))


def official_layout() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for tower, convs in (("netcnnaud", AUDIO_CONVS), ("netcnnlip", LIP_CONVS)):
        for at, shape in zip(CONV_AT, convs, strict=True):
            shapes[f"{tower}.{at}.weight"] = shape
            shapes[f"{tower}.{at}.bias"] = shape[:1]
            for stat in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"{tower}.{at + 1}.{stat}"] = shape[:1]
    for head in ("netfcaud", "netfclip"):
        shapes.update({f"{head}.0.weight": (512, 512), f"{head}.0.bias": (512,), f"{head}.3.weight": (1024, 512),
                       f"{head}.3.bias": (1024,)})
        for stat in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{head}.1.{stat}"] = (512,)
    return shapes


def random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in official_layout().items():
        if key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith(".weight") and len(shape) > 1:
            fan_in = int(np.prod(shape[1:]))
            state[key] = torch.randn(shape, generator=g) / fan_in ** 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.1
    return state


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple:
    path = tmp_path_factory.mktemp("syncnet") / "syncnet_v2.model"
    state = random_state()
    torch.save(state, path)
    return path, state


def test_random_weights_in_the_official_layout_load_strictly_and_embed_both_streams(weights):
    path, state = weights
    model = syncnet.load_syncnet(path)
    assert not model.training
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        audio = model.embed_audio(torch.randn(2, 1, 13, 20, generator=g))
        lips = model.embed_lips(torch.rand(2, 3, 5, 224, 224, generator=g) * 255)
    assert audio.shape == lips.shape == (2, 1024)
    assert torch.isfinite(audio).all() and torch.isfinite(lips).all()


@pytest.mark.parametrize("change", ["missing", "unexpected", "wrong shape", "not a state dict"])
def test_a_checkpoint_not_in_the_official_layout_is_refused_in_one_line(tmp_path, change):
    state = random_state()
    if change == "missing":
        del state["netcnnlip.18.weight"]
    elif change == "unexpected":
        state["netcnnaud.21.weight"] = torch.zeros(1)
    elif change == "wrong shape":
        state["netfcaud.3.weight"] = torch.zeros(512, 512)
    path = tmp_path / "syncnet_v2.model"
    torch.save([1, 2] if change == "not a state dict" else state, path)
    with pytest.raises(UserError) as caught:
        syncnet.load_syncnet(path)
    assert caught.value.exit_code == EXIT_MISSING_WEIGHTS
    assert "\n" not in caught.value.message and syncnet.FETCH_HINT in caught.value.fix


def test_mfcc_matches_python_speech_features_defaults():
    # Rows 0, 5 and 10 of python_speech_features 0.6's mfcc(x, 16000) for this signal (computed with it once).
    t = np.arange(2000) / 16000
    x = np.round(6000 * np.sin(2 * np.pi * (150 + 4000 * t) * t) + 1500 * np.sin(2 * np.pi * 2300 * t))
    expected = {
        0: [19.14101256, 8.870360143, -3.525392239, 42.03203165, 19.22572071, -47.09085849, -27.46803835,
            3.644587896, -36.36157226, -41.14229722, 8.258883141, 1.307127175, -26.95178401],
        5: [19.79735913, 15.63984314, -29.24526283, -10.26327408, -20.16559454, -52.04479861, 1.79354098,
            51.96073897, 10.0986337, -12.17292786, 15.40016414, -5.476543209, -34.08942611],
        10: [20.45542868, 9.277988322, -35.40988741, -16.8794461, 0.1996209896, -0.02659382973, 29.7196704,
             20.56745732, -45.30541164, -39.16453282, 29.42697525, 24.04354128, -18.72872242],
    }
    coeffs = syncnet.mfcc(x.astype(np.int16))
    assert coeffs.shape == (11, 13)  # 1 + ceil((2000 - 400) / 160) steps
    for row, values in expected.items():
        np.testing.assert_allclose(coeffs[row], values, rtol=1e-8, atol=1e-8)


def reference_scores(lips: np.ndarray, audio: np.ndarray, vshift: int) -> tuple[float, float, int]:
    """SyncNetInstance.evaluate's arithmetic, restated with torch: pad, pairwise_distance per window, mean,
    min, median."""
    feat1, feat2 = torch.from_numpy(lips), torch.from_numpy(audio)
    padded = torch.nn.functional.pad(feat2, (0, 0, vshift, vshift))
    win = 2 * vshift + 1
    dists = [torch.nn.functional.pairwise_distance(feat1[[i], :].repeat(win, 1), padded[i:i + win, :])
             for i in range(len(feat1))]
    mdist = torch.mean(torch.stack(dists, 1), 1)
    minval, minidx = torch.min(mdist, 0)
    return float(torch.median(mdist) - minval), float(minval), int(vshift - minidx)


def test_sync_scores_follow_the_reference_arithmetic():
    rng = np.random.default_rng(0)
    lips = rng.normal(size=(40, 1024)).astype(np.float32)
    audio = (lips + rng.normal(scale=0.5, size=lips.shape)).astype(np.float32)
    score = syncnet.sync_score(lips, audio)
    conf, dist, offset = reference_scores(lips, audio, syncnet.VSHIFT)
    assert score.confidence == pytest.approx(conf, rel=1e-5)
    assert score.distance == pytest.approx(dist, rel=1e-5)
    assert score.offset == offset == 0 and score.windows == 40


@pytest.mark.parametrize("delay", [-4, 3])
def test_a_planted_audio_delay_is_found_as_the_offset(delay):
    rng = np.random.default_rng(1)
    n = 60
    source = rng.normal(size=(n + 20, 256))
    lips = source[10:10 + n]
    audio = source[10 - delay:10 - delay + n]  # the sound of lip window i sits at audio window i + delay
    score = syncnet.sync_score(lips, audio)
    assert score.offset == -delay  # positive: the sound comes before the mouth
    # only the windows whose partner falls into the zero padding are apart at the best offset
    assert score.distance < 0.1 * (score.distance + score.confidence)


def test_the_face_crop_follows_the_reference_pipeline_geometry():
    frame = np.zeros((100, 120, 3), np.uint8)
    frame[..., 0] = 200  # red in RGB: the crop is BGR, so it lands in the last channel
    box = (30, 40, 70, 80)  # a 40x40 face at rows 30-70, columns 40-80: s = 20
    crop = syncnet.face_crop(frame, box)
    assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8
    assert crop[112, 112, 2] == 200 and crop[112, 112, 0] == 0
    # rows 30..86 and columns 32..88 of the frame, all inside it: no padding value anywhere
    assert (crop[..., 2] == 200).all()
    edge = syncnet.face_crop(frame, (0, 0, 40, 40))  # out of frame above and left: padded with 110
    assert (edge[0, 0] == syncnet.CROP_PAD_VALUE).all()


def test_embed_pairs_each_window_with_its_frames_and_mfcc_steps(weights):
    model = syncnet.load_syncnet(weights[0])
    rng = np.random.default_rng(2)
    crops = rng.integers(0, 255, (8, 224, 224, 3), dtype=np.uint8)
    coeffs = rng.normal(size=(40, 13))
    lips, audio = syncnet.embed(model, iter(crops), coeffs, windows=3, batch=2)
    assert lips.shape == audio.shape == (3, 1024)
    with torch.inference_mode():
        lip2 = model.embed_lips(torch.from_numpy(crops[2:7]).float().permute(3, 0, 1, 2)[None])
        aud2 = model.embed_audio(torch.from_numpy(coeffs[8:28].T.copy()).float()[None, None])
    np.testing.assert_allclose(lips[2], lip2[0].numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(audio[2], aud2[0].numpy(), rtol=1e-4, atol=1e-4)


def test_windows_are_counted_as_the_reference_counts_them():
    assert syncnet.window_count(frames=100, samples=100 * 640) == 95
    assert syncnet.window_count(frames=100, samples=50 * 640 + 639) == 45
    assert syncnet.window_count(frames=5, samples=10_000) == 0
