"""Failure rules (advice.toml) applied to a run's exit status, its log and this machine's facts.

The rules are data; this module only matches and fills them in. Facts come in as a plain dict (this
machine's from `itk.machine.gather().to_json()`, plus the run's own), so a test or `itk diagnose` on another
machine's log can feed recorded ones. When no rule
fits, the verdict says so and points at the log: a wrong diagnosis costs people more than none.
"""

from __future__ import annotations

import re
import signal
import string
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from itk.runtime.toml import read_toml

RULES = Path(__file__).with_name("advice.toml")
ITK_LOG_HEADER = "# itk run: "  # the first line itk.run writes into every generate.log
ERROR_LINE = re.compile(r"(Error|Exception|error:|Killed|Traceback|FAILED|Assertion)")


@dataclass(frozen=True)
class Rule:
    id: str
    kind: str  # "cause" or "hint"
    title: str
    diagnosis: tuple[str, ...]
    fixes: tuple[dict[str, Any], ...]
    details: tuple[dict[str, Any], ...] = ()
    check: str = ""
    exit_codes: tuple[int, ...] = ()
    signals: tuple[int, ...] = ()
    patterns: tuple[re.Pattern[str], ...] = ()
    extract: tuple[re.Pattern[str], ...] = ()
    facts: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()


def _lines(value: Any) -> tuple[dict[str, Any], ...]:
    return tuple({"text": v} if isinstance(v, str) else dict(v) for v in value)


@cache
def load_rules(path: Path = RULES) -> tuple[tuple[Rule, ...], dict[str, re.Pattern[str]]]:
    """The rules, and the log facts (named regexes; `official_log` among them, which tells an official
    script's log from itk's)."""
    data = read_toml(path)
    rules = []
    for r in data["rules"]:
        diagnosis = r["diagnosis"]
        rules.append(Rule(
            id=r["id"], kind=r["kind"], title=r["title"],
            diagnosis=(diagnosis,) if isinstance(diagnosis, str) else tuple(diagnosis),
            fixes=_lines(r.get("fixes", [])), details=_lines(r.get("details", [])), check=r.get("check", ""),
            exit_codes=tuple(r.get("exit_codes", [])), signals=tuple(r.get("signals", [])),
            patterns=tuple(re.compile(p) for p in r.get("patterns", [])),
            extract=tuple(re.compile(p) for p in r.get("extract", [])),
            facts=tuple(r.get("facts", [])), requires=tuple(r.get("requires", [])),
        ))
    log_facts = {k: re.compile(v) for k, v in data.get("log_facts", {}).items()}
    return tuple(rules), log_facts


def signal_of(exit_code: int | None) -> int | None:
    """The signal that ended a process: subprocess reports -9, a shell reports 137 (128 + 9)."""
    if exit_code is None:
        return None
    if exit_code < 0:
        return -exit_code
    if 128 < exit_code < 128 + 65:
        return exit_code - 128
    return None


def _number(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def derived(facts: dict[str, Any], log_text: str,
            log_facts: dict[str, re.Pattern[str]]) -> tuple[dict[str, Any], dict[str, bool]]:
    """Placeholders and conditions from the raw facts (and the official scripts' printed arguments)."""
    from itk.measured import low_ram_mode
    from itk.presets import FALLBACK, get_preset

    values = {k: v for k, v in facts.items() if v is not None}
    for key, pattern in log_facts.items():
        if key not in values and (found := pattern.findall(log_text)):
            values[key] = found[-1]  # the latest: a log's last stage event is the stage it ended in
    if "preset" in values:
        preset = get_preset(values["preset"])
        values.setdefault("quant", preset.generator.get("quant", "None"))
        values.setdefault("persistent", preset.generator.get("num_persistent_param_in_dit", "None"))
        values.setdefault("size", preset.generator.get("size"))
        values["preset_min_ram_gb"] = f"{preset.min_ram_gb:.0f}"
        values["preset_min_vram_gb"] = f"{preset.min_vram_gb:.0f}"
    fp8 = get_preset(FALLBACK)
    values.update(fp8_preset=fp8.name, fp8_min_ram_gb=f"{fp8.min_ram_gb:.0f}",
                  fp8_quant_dir=str(fp8.path_flags(Path("weights"))["quant_dir"]),
                  fetch_fp8_command=f"itk fetch --preset {fp8.name}",
                  fetch_command=f"itk fetch --preset {values.get('preset', fp8.name)}")
    low_ram = low_ram_mode(fp8.name)  # the doctor's ram check states it in the same words
    if low_ram is not None:
        values.update(low_ram_gb=f"{low_ram.peak_rss_gb:.0f}", low_ram_statement=low_ram.statement)
    others = values.get("gpu_processes", [])
    if others:
        values["gpu_process_list"] = ", ".join(f"pid {p['pid']} {p['name']} ({p['used_mib']} MiB)" for p in others)
        values["kill_commands"] = "; ".join(f"kill {p['pid']}  # {p['name']}" for p in others)
    cgroup, total = values.get("cgroup_limit_gb"), values.get("total_ram_gb")
    usable = values.get("usable_ram_gb")
    # Where the log came from decides the language of the fixes: official flags or itk commands.
    official = not log_text.startswith(ITK_LOG_HEADER) and "official_log" in values
    conditions = {
        "official_log": official,
        "itk_log": not official,
        # the FP8 preset's pinned streaming needs fp8_min_ram_gb; below it, only the mapped mode (ITK_PIN=0)
        "ram_below_fp8": usable is not None and usable < fp8.min_ram_gb,
        "ram_below_low_ram": usable is not None and low_ram is not None and usable < low_ram.peak_rss_gb,
        "cgroup_limited": bool(cgroup and total and cgroup < total - 0.5),
        "container_oom_kill": bool(values.get("oom_kills_during_run")),
        "no_swap": values.get("swap_gb") == 0,
        "wsl": bool(values.get("wsl")),
        "other_gpu_processes": bool(others),
        "not_fp8": str(values.get("quant", "")).strip("'") != "fp8",
        "persistent_not_zero": str(values.get("persistent", "")) != "0",
        "size_720": "720" in str(values.get("size", "")),
        "phase_decode": "decode" in str(values.get("phase", "")).lower(),
        "has_phase": bool(values.get("phase")),
        "ram_below_preset": "preset_min_ram_gb" in values and "usable_ram_gb" in values
        and values["usable_ram_gb"] < float(values["preset_min_ram_gb"]),
        "vram_below_preset": "preset_min_vram_gb" in values and "vram_gb" in values
        and values["vram_gb"] < float(values["preset_min_vram_gb"]),
    }
    for key in log_facts:  # a log fact the log (or the run) holds is a condition of the same name
        conditions.setdefault(key, bool(values.get(key)))
    return values, conditions


def fill(template: str, values: dict[str, Any]) -> str | None:
    """The template with every placeholder filled, or None when one is unknown."""
    names = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    if any(name not in values for name in names):
        return None
    return template.format(**{name: _number(values[name]) for name in names})


@dataclass
class Verdict:
    rule: str  # rule id, "unknown", or "ok"
    title: str
    diagnosis: str
    details: list[str] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)
    check: str = ""
    hints: list[dict[str, Any]] = field(default_factory=list)
    exit_code: int | None = None
    log: str = ""
    evidence: str = ""  # the log line that matched

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _match(rule: Rule, text: str, exit_code: int | None, conditions: dict[str, bool]) -> tuple[float, dict, str] | None:
    """(position of the latest evidence, regex groups, evidence line) when the rule fires, else None."""
    if not all(conditions.get(c, False) for c in rule.requires):
        return None
    by_exit = exit_code is not None and (exit_code in rule.exit_codes or signal_of(exit_code) in rule.signals)
    triggers = [f"exit status {exit_code}"] if by_exit else []
    triggers += [f"fact: {f}" for f in rule.facts if conditions.get(f, False)]
    log_position, groups, line = -1, {}, ""
    for pattern in rule.patterns:
        for m in pattern.finditer(text):
            groups.update({k: v for k, v in m.groupdict().items() if v})
            if m.start() > log_position:
                log_position = m.start()
                start, stop = text.rfind("\n", 0, m.start()) + 1, text.find("\n", m.end())
                line = text[start:stop if stop >= 0 else None].strip()
    if log_position < 0 and not triggers:
        return None
    # The exit status is the last word; a fact (an OOM kill somewhere in the container) only speaks when the
    # log says nothing more specific.
    position = len(text) + 1 if by_exit else max(log_position, -0.5)
    for pattern in rule.extract:
        for m in pattern.finditer(text):
            groups.update({k: v for k, v in m.groupdict().items() if v})
    return position, groups, line or "; ".join(triggers)


def _render(rule: Rule, values: dict[str, Any], conditions: dict[str, bool]) -> tuple[str, list[str], list[str]]:
    diagnosis = next((s for t in rule.diagnosis if (s := fill(t, values)) is not None), rule.title)

    def holds(when: str | list[str]) -> bool:
        """A line's `when`: one condition or a list that must all hold; `!name` means name does not hold."""
        names = [when] if isinstance(when, str) else when
        return all(conditions.get(n.lstrip("!"), False) != n.startswith("!") for n in names)

    def shown(lines: tuple[dict[str, Any], ...]) -> list[str]:
        out = []
        for line in lines:
            if "when" in line and not holds(line["when"]):
                continue
            if (text := fill(line["text"], values)) is not None:
                out.append(text)
        return out

    return diagnosis, shown(rule.details), shown(rule.fixes)


def diagnose(log_text: str, exit_code: int | None = None, facts: dict[str, Any] | None = None,
             log_path: str = "") -> Verdict:
    rules, log_facts = load_rules()
    facts = dict(facts or {})
    facts.setdefault("log", log_path)
    values, conditions = derived(facts, log_text, log_facts)
    fired = []
    for order, rule in enumerate(rules):
        if (hit := _match(rule, log_text, exit_code, conditions)) is not None:
            fired.append((hit[0], -order, rule, hit[1], hit[2]))
    hints = []
    for _, _, rule, groups, evidence in fired:
        if rule.kind == "hint":
            diagnosis, _, fixes = _render(rule, {**values, **groups}, conditions)
            hints.append({"rule": rule.id, "diagnosis": diagnosis, "fixes": fixes, "evidence": evidence})
    causes = [f for f in fired if f[2].kind == "cause"]
    if causes:
        _, _, rule, groups, evidence = max(causes, key=lambda f: (f[0], f[1]))
        merged = {**values, **groups}
        conditions = {**conditions, "int8_t5": "t5_int8" in str(groups.get("missing_path", ""))}
        diagnosis, details, fixes = _render(rule, merged, conditions)
        return Verdict(rule.id, rule.title, diagnosis, details, fixes, rule.check, hints, exit_code, log_path,
                       evidence)
    if exit_code == 0:
        return Verdict("ok", "finished", "The run finished without an error.", hints=hints, exit_code=0,
                       log=log_path)
    last_error = next((ln.strip() for ln in reversed(log_text.splitlines()) if ERROR_LINE.search(ln)), "")
    how = f"exit status {exit_code}" if exit_code is not None else "no exit status given"
    sig = signal_of(exit_code)
    if sig:
        how += f" (signal {signal.Signals(sig).name})" if sig in signal.valid_signals() else f" (signal {sig})"
    details = [f"last error line: {last_error}"] if last_error else []
    return Verdict(
        "unknown", "unrecognised failure",
        f"itk does not recognise this failure ({how}); read the end of the log{': ' + log_path if log_path else ''}.",
        details,
        ["search the last error line in the InfiniteTalk issues; `itk doctor` checks the usual suspects"],
        "", hints, exit_code, log_path, last_error,
    )
