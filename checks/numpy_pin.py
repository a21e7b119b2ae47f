"""NumPy: the guide pins numpy>=1.24,<2.2 because numba (which librosa needs) once refused newer NumPy.

The verdict rests on what actually imports together; the pin is only the explanation, a warn when the
installed set imports cleanly outside it.
"""

from __future__ import annotations

from packaging.specifiers import SpecifierSet

from itk.checks import probe
from itk.checks.base import Context, Result, Status

GUIDE_PIN = SpecifierSet(">=1.24,<2.2")
WHY = "numba, which librosa needs, only supports the NumPy versions it was built for"


def judge(facts: dict) -> Result:
    if "error" in facts:
        return Result("numpy", Status.SKIP, "not checked: " + facts["error"])
    np_v = facts["numpy"]["version"]
    if not np_v:
        return Result("numpy", Status.FAIL, "numpy is not installed", fix="run `make setup`")
    for dist in ("numpy", "numba", "librosa"):
        err = facts[dist].get("import_error")
        if err:
            return Result(
                "numpy", Status.FAIL, f"{dist} does not import with numpy {np_v}: {err}",
                details=[f"why it matters: {WHY}"],
                fix='pip install "numpy>=1.24,<2.2" (the guide\'s pin), then `itk doctor` again',
                facts={d: facts[d] for d in ("numpy", "numba", "librosa")},
            )
        if not facts[dist]["version"]:
            return Result("numpy", Status.FAIL, f"{dist} is not installed", fix="run `make setup`")
    summary = f"numpy {np_v}, numba {facts['numba']['version']}, librosa {facts['librosa']['version']} import together"
    if np_v not in GUIDE_PIN:
        return Result(
            "numpy", Status.WARN, f"{summary}, but numpy is outside the guide's pin {GUIDE_PIN}",
            details=[f"the pin exists because {WHY}; this set imports cleanly"],
            fix='only if librosa/numba errors appear: pip install "numpy>=1.24,<2.2"',
        )
    return Result("numpy", Status.OK, summary)


def check(ctx: Context) -> Result:
    return judge(probe.run_probe())
