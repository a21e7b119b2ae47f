"""The real generator with one rank failing on purpose at its first guidance gather.

tests/test_gpus_cli.py runs it through ITK_GENERATOR (`python tests/crash_rank_generator.py FLAGS...`, under
torchrun like the real one) to prove that a crash on one rank ends the whole job and names the rank. The
failure is injected here, on the test side: the runtime carries no test switch.
"""

from __future__ import annotations

from collections.abc import Callable

from itk.runtime import generate
from itk.runtime.parallel import Parallel

CRASH_RANK = 1
MESSAGE = f"rank {CRASH_RANK} crashed on purpose"


def crash_on_one_rank(gather: Callable) -> Callable:
    """`Parallel.gather_passes` that raises on CRASH_RANK and gathers as usual on every other rank."""

    def gather_or_crash(self: Parallel, preds, passes):
        if self.rank == CRASH_RANK:
            raise RuntimeError(MESSAGE)
        return gather(self, preds, passes)

    return gather_or_crash


if __name__ == "__main__":
    Parallel.gather_passes = crash_on_one_rank(Parallel.gather_passes)
    generate.exit_now(generate.main(lifeline=True))
