"""One rank of tests/test_parallel.py's collectives check: the sequence-parallel trades of runtime/parallel.py
(heads for tokens and back, the token gather, the mean over heads) on real gloo collectives, against what one
process computes from the same seeded tensors. Every rank asserts; a wrong trade exits non-zero."""

from __future__ import annotations

import torch

from itk.runtime import parallel
from itk.runtime.layout import choose_layout
from itk.runtime.options import Launch

HEADS, HEAD_DIM = 8, 4
GRID = (3, 7, 1)  # 3 latent frames of 7 tokens: 21 tokens, which no degree above 1 splits along frames


def main() -> None:
    launch = Launch.from_env()
    group = parallel.start(launch, choose_layout(launch.world_size, 1, HEADS))
    assert group is not None and group.layout.sp == launch.world_size
    checked = False  # every check passed: the ranks meet before leaving the group
    try:
        shard = group.shard(GRID)
        assert shard is not None
        tokens = GRID[0] * GRID[1] * GRID[2]
        x = torch.randn(1, tokens, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(0))
        local = shard.local_tokens(x, dim=1)
        part = HEADS // shard.sp
        mine = slice(group.sp_rank * part, (group.sp_rank + 1) * part)
        traded = shard.scatter_heads(local)
        assert torch.equal(traded, x[:, :, mine]), "scatter_heads: not all tokens of this rank's heads"
        assert torch.equal(shard.gather_heads(traded), local), "gather_heads does not undo scatter_heads"
        assert torch.equal(shard.gather_tokens(local.flatten(2)), x.flatten(2)), "gather_tokens lost the order"
        maps = torch.arange(3 * tokens, dtype=torch.float32).view(3, tokens) * (group.sp_rank + 1)
        expected = sum(torch.arange(3 * tokens, dtype=torch.float32).view(3, tokens) * (r + 1)
                       for r in range(shard.sp)) / shard.sp
        assert torch.allclose(shard.mean_over_heads(maps), expected), "mean_over_heads"
        checked = True
    finally:
        parallel.stop(group, wait=checked)


if __name__ == "__main__":
    main()
