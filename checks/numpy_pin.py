"""NumPy: the guide pins numpy>=1.24,<2.2 because numba (which librosa needs) once refused newer NumPy.

The verdict rests on the installed set: numba, librosa and NumPy importing together, and the NumPy range numba
itself declares (its package metadata). The guide's pin is only the explanation: a NumPy outside it that numba
declares it supports is fine. A warn only when numba's declared range excludes the installed NumPy; a fail when
something does not import.
"""

from __future__ import annotations

from packaging.specifiers import InvalidSpecifier, SpecifierSet

from itk.checks import probe
from itk.checks.base import Context, Result, Status

GUIDE_PIN_TEXT = ">=1.24,<2.2"
GUIDE_PIN = SpecifierSet(GUIDE_PIN_TEXT)
WHY = "numba, which librosa needs, only supports the NumPy versions it was built for"


def numba_range(facts: dict) -> SpecifierSet | None:
    try:
        declared = facts["numba"].get("numpy_range")
        return SpecifierSet(declared) if declared else None
    except InvalidSpecifier:
        return None


def judge(facts: dict) -> Result:
    if "error" in facts:
        return Result("numpy", Status.SKIP, "not checked: " + facts["error"])
    np_v = facts["numpy"]["version"]
    if not np_v:
        return Result("numpy", Status.FAIL, "numpy is not installed", fix="run `make setup`")
    declared = numba_range(facts)
    # numba's own range when it declares one; the guide's pin only when nothing better is known
    wanted = f"numpy{declared}" if declared else f"numpy{GUIDE_PIN_TEXT}"
    facts_json = {d: facts[d] for d in ("numpy", "numba", "librosa")}
    for dist in ("numpy", "numba", "librosa"):
        err = facts[dist].get("import_error")
        if err:
            return Result(
                "numpy", Status.FAIL, f"{dist} does not import with numpy {np_v}: {err}",
                details=[f"why it matters: {WHY}"],
                fix=f'pip install "{wanted}", then `itk doctor` again' if declared
                else f'pip install "numpy{GUIDE_PIN_TEXT}" (the guide\'s pin), then `itk doctor` again',
                facts=facts_json,
            )
        if not facts[dist]["version"]:
            return Result("numpy", Status.FAIL, f"{dist} is not installed", fix="run `make setup`")
    numba_v = facts["numba"]["version"]
    summary = f"numpy {np_v}, numba {numba_v}, librosa {facts['librosa']['version']} import together"
    if declared is not None and not declared.contains(np_v, prereleases=True):
        return Result(
            "numpy", Status.WARN, f"{summary}, but numba {numba_v} declares numpy{declared}: it may fail at run time",
            details=[f"why it matters: {WHY}"],
            fix=f'pip install "{wanted}"', facts=facts_json,
        )
    details = []
    if np_v not in GUIDE_PIN:
        supports = f"numba {numba_v} declares numpy{declared}" if declared else "this set imports cleanly"
        details.append(f"outside the guide's pin {GUIDE_PIN_TEXT}, which came from an older numba; {supports}")
    return Result("numpy", Status.OK, summary, details, facts=facts_json)


def check(ctx: Context) -> Result:
    return judge(probe.run_probe())
