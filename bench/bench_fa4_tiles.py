"""FlashAttention-4's tile sizes on this GPU at the video self-attention's shapes (issue 17, attention).

FA4 picks 128 queries x 128 keys per tile at head dim 128 on Hopper; FA3's C++ kernel takes 128 x 176 for the
same case. Each candidate tile (and the two pipeline switches at the default tile) is timed on
[1, L, 40, 128] bf16 at 480p (L = 33,600) and 720p (L = 75,600), with its output cosine vs SDPA. A tile that
does not build on this GPU (registers, shared memory) is recorded with its error. The last line printed is
`BEST QxK` (the fastest at 480p whose cosine is >= 0.99999).

Run on the device (FlashAttention-4 installed):  python bench/bench_fa4_tiles.py --out $OUT/fa4-tiles-h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from bench_speed import cosine, median_ms  # noqa: E402

from itk.runtime.atomic import atomic_write_text  # noqa: E402

SEQUENCES = {"480p": 33600, "720p": 75600}
# name -> _flash_attn_fwd keyword arguments
CANDIDATES: dict[str, dict] = {
    "128x128": {}, "128x176": {"tile_mn": (128, 176)}, "128x160": {"tile_mn": (128, 160)},
    "128x192": {"tile_mn": (128, 192)}, "128x144": {"tile_mn": (128, 144)}, "128x112": {"tile_mn": (128, 112)},
    "128x128_no_overlap": {"intra_wg_overlap": False}, "128x128_pv_ss": {"mma_pv_is_rs": False},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results/fa4-tiles-h200.json")
    opts = parser.parse_args()
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from flash_attn.cute.interface import _flash_attn_fwd

    result: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": {}}
    for size, seq in SEQUENCES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, seq, 40, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        flops = 4 * seq * seq * 40 * 128
        for name, kwargs in CANDIDATES.items():
            try:
                run = lambda kwargs=kwargs, q=q, k=k, v=v: _flash_attn_fwd(q, k, v, **kwargs)[0]  # noqa: E731
                got = run()
                ms = median_ms(run)
                result["runs"][f"{size}.{name}"] = {"ms": round(ms, 2), "tflops": round(flops / ms / 1e9, 1),
                                                    "cosine_vs_sdpa": round(cosine(got, ref), 6)}
            except Exception as exc:  # noqa: BLE001 - a tile that does not build here
                result["runs"][f"{size}.{name}"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            print(size, name, result["runs"][f"{size}.{name}"], flush=True)
            atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    tiles = [name for name, kwargs in CANDIDATES.items() if "tile_mn" in kwargs or not kwargs]
    runs = {name: result["runs"][f"480p.{name}"] for name in tiles}
    fine = {name: run["ms"] for name, run in runs.items() if "ms" in run and run["cosine_vs_sdpa"] >= 0.99999}
    result["best_480p"] = min(fine, key=fine.get) if fine else None
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"BEST {result['best_480p']}")


if __name__ == "__main__":
    main()
