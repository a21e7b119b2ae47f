"""The generator finds every weight file through the manifest (runtime/weights.py), torch-free."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from itk.runtime.manifest import load_manifest
from itk.runtime.weights import MissingWeights, QuantFile, official_map_path, resolve

RUNTIME = Path(__file__).resolve().parents[1] / "runtime"


def _layout(root: Path, components: tuple[str, ...]) -> tuple[Path, Path, Path]:
    """Empty stand-ins for the components' files under `root` (the manifest's local_dirs)."""
    m = load_manifest()
    for f in m.files_for(components):
        path = f.local_path(root)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    return (root / m.repos["wan"].local_dir, root / m.repos["wav2vec2"].local_dir,
            root / m.repos["infinitetalk"].local_dir)


UNQUANTISED = ("wan-base-common", "wan-base-dit", "wav2vec2", "infinitetalk-single")
FP8 = ("wan-base-common", "wav2vec2", "infinitetalk-single-fp8")


def test_an_unquantised_request_gets_the_shards_then_the_adapter_and_the_bf16_t5(tmp_path):
    ckpt, w2v, it = _layout(tmp_path, UNQUANTISED)
    files = resolve(ckpt, w2v, it / "single" / "infinitetalk.safetensors")
    assert isinstance(files.dit, tuple) and len(files.dit) == 8
    assert files.dit[-1].name == "infinitetalk.safetensors" and files.dit[0].parent == ckpt
    assert files.t5.parent == ckpt and files.t5.suffix == ".pth"
    assert files.tokenizer.is_dir() and files.wav2vec == w2v and files.wav2vec_weights.parent == w2v


def test_an_fp8_request_gets_the_fp8_dit_and_t5_each_with_its_manifest_map(tmp_path):
    ckpt, w2v, it = _layout(tmp_path, FP8)
    quant = it / "quant_models" / "infinitetalk_single_fp8.safetensors"
    files = resolve(ckpt, w2v, quant="fp8", quant_file=quant)
    assert files.dit == QuantFile(quant, quant.with_suffix(".json"))
    assert isinstance(files.t5, QuantFile) and files.t5.path.parent == quant.parent
    assert files.t5.map.name == "t5_map_fp8.json"  # not the official .json-for-.safetensors rule


def test_a_renamed_quant_file_finds_its_map_by_the_official_convention(tmp_path):
    ckpt, w2v, it = _layout(tmp_path, FP8)
    quant = it / "quant_models" / "mine.safetensors"
    quant.write_bytes(b"")
    with pytest.raises(MissingWeights, match=r"mine\.json"):
        resolve(ckpt, w2v, quant="fp8", quant_file=quant)
    assert official_map_path(quant) == quant.parent / "mine.json"


@pytest.mark.parametrize("gone", ["config.json", "diffusion_pytorch_model-00003-of-00007.safetensors",
                                  "google/umt5-xxl/spiece.model", "model.safetensors"])
def test_the_first_missing_file_is_named_with_itk_fetch(tmp_path, gone):
    ckpt, w2v, it = _layout(tmp_path, UNQUANTISED)
    (w2v / gone if gone == "model.safetensors" else ckpt / gone).unlink()
    with pytest.raises(MissingWeights) as err:
        resolve(ckpt, w2v, it / "single" / "infinitetalk.safetensors")
    assert gone in str(err.value) and "itk fetch" in str(err.value) and "\n" not in str(err.value)


def test_the_multi_speaker_files_are_in_the_manifest_with_the_fp8_map_attached():
    m = load_manifest()
    multi = m.component("infinitetalk-multi-fp8").files
    dit = next(f for f in multi if f.role == "dit")
    assert (dit.precision, dit.variant) == ("fp8", "multi") and dit.map is not None
    assert dit.map.path == "quant_models/infinitetalk_multi_fp8.json"
    paths = [f.path for f in m.files_for(["infinitetalk-multi-fp8"])]
    assert paths.index(dit.map.path) == paths.index(dit.path) + 1
    assert [f.path for f in m.files_for(["infinitetalk-multi"])] == ["multi/infinitetalk.safetensors"]
    assert [f.path for f in m.select("dit", "fp8", "multi")] == [dit.path]


def test_every_weight_file_the_generator_opens_has_a_role():
    m = load_manifest()
    roles = {f.role for c in m.components.values() for f in c.files}
    assert "" not in roles
    assert {"config", "vae", "clip", "tokenizer", "dit", "t5", "wav2vec"} <= roles


# Docstrings and a hint in the fast path's files (branch `fast`) still name files; to go at the next merge.
def test_no_weight_file_name_is_spelled_under_runtime():
    m = load_manifest()
    names = {Path(f.path).name for f in m.files_for(list(m.components))}
    names = {n for n in names if n.endswith((".safetensors", ".pth", ".bin"))}
    found = {(p.name, n) for p in RUNTIME.rglob("*.py") for n in names if n in p.read_text(encoding="utf-8")}
    assert found == set()


def test_resolving_weights_does_not_import_torch():
    code = "import sys, itk.runtime.weights; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
