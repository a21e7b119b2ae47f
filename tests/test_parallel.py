"""Several GPUs on the CPU: torchrun with the gloo backend runs the tiny pipeline split over 2 and 4 processes
(sequence parallel, guidance parallel, both) and must give the single process's video within DESIGN.md's
float32 tolerance; the layout rules refuse what the heads cannot split."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from itk.runtime.layout import Layout, LayoutError, choose_layout, valid_gpu_counts
from itk.runtime.parallel import split_frames

sys.path.insert(0, str(Path(__file__).parent))
import parallel_worker  # noqa: E402

WORKER = Path(__file__).parent / "parallel_worker.py"
VIDEO_TOLERANCE = 1e-3  # DESIGN.md: the final video within 1e-3 max abs
CALL_TOLERANCE = 1e-4  # DESIGN.md: one DiT call within 1e-4 of the output scale


def single(text: float, audio: float) -> dict[str, torch.Tensor]:
    dit, vae = parallel_worker.models()
    return {"video": parallel_worker.video(dit, vae, None, text, audio), "speakers": parallel_worker.speakers(dit)}


def torchrun(tmp_path: Path, processes: int, *scales: tuple[float, float]) -> list[dict[str, torch.Tensor]]:
    out = tmp_path / f"{processes}.pt"
    pairs = [str(v) for pair in scales for v in pair]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={processes}", str(WORKER), str(out), *pairs],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


def assert_same(ours: dict[str, torch.Tensor], one: dict[str, torch.Tensor]) -> None:
    assert ours["video"].shape == one["video"].shape
    assert (ours["video"] - one["video"]).abs().max() <= VIDEO_TOLERANCE
    scale = one["speakers"].abs().max()
    assert (ours["speakers"] - one["speakers"]).abs().max() / scale <= CALL_TOLERANCE


def test_two_processes_make_the_single_process_video_in_sequence_and_in_guidance_parallel(tmp_path):
    three, two = (5.0, 4.0), (1.0, 4.0)  # text guidance 1 drops a pass
    assert choose_layout(2, 3, 2) == Layout(groups=1, sp=2)  # three passes cannot share two GPUs
    assert choose_layout(2, 2, 2) == Layout(groups=2, sp=1)  # two passes: one per GPU
    sequence, guidance = torchrun(tmp_path, 2, three, two)
    assert_same(sequence, single(*three))
    assert_same(guidance, single(*two))


def test_four_processes_make_it_in_guidance_and_sequence_parallel_at_once(tmp_path):
    assert choose_layout(4, 2, 2) == Layout(groups=2, sp=2)
    (both,) = torchrun(tmp_path, 4, (1.0, 4.0))
    assert_same(both, single(1.0, 4.0))


def test_the_passes_get_their_own_gpus_only_when_they_divide_the_count():
    assert choose_layout(2, 3, 40) == choose_layout(2, 1, 40)  # 1 group x 2
    assert (choose_layout(6, 3, 40).groups, choose_layout(6, 3, 40).sp) == (3, 2)
    assert (choose_layout(8, 2, 40).groups, choose_layout(8, 2, 40).sp) == (2, 4)
    assert valid_gpu_counts(3, 40) == [1, 2, 3, 4, 5, 6, 8, 10, 12, 15]


def test_a_gpu_count_the_heads_do_not_divide_is_refused_with_the_valid_counts():
    with pytest.raises(LayoutError) as err:
        choose_layout(3, 2, 40)
    assert str(err.value) == ("--gpus 3: the model's 40 attention heads do not divide by the sequence-parallel "
                              "degree 3 (2 guidance passes per step); valid GPU counts: 1, 2, 4, 5, 8, 10, 16")


def test_latent_frames_split_as_evenly_as_whole_frames_allow():
    assert split_frames(21, 2) == [11, 10]
    assert split_frames(21, 8) == [3, 3, 3, 3, 3, 2, 2, 2]
    with pytest.raises(ValueError, match="3 latent frames cannot be split over 4"):
        split_frames(3, 4)
