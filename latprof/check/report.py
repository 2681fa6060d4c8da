"""Render a :class:`CheckResult`: terminal table, Markdown (for a PR comment or the job summary),
JUnit XML (one testcase per unit x token count, CI systems show failures natively) and JSON."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET

from latprof.check import stats
from latprof.check.run import CheckResult

FORMATS = ("terminal", "markdown", "junit", "json")
_MARK = {stats.REGRESSION: "REGRESSION", stats.IMPROVEMENT: "improved", stats.UNCHANGED: "ok", stats.NOISY: "noisy"}
_ORDER = {stats.REGRESSION: 0, stats.NOISY: 1, stats.IMPROVEMENT: 2, stats.UNCHANGED: 3}


def _p(v: float) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    return f"{v:.1e}" if v < 1e-3 else f"{v:.3f}"


def _rows(result: CheckResult) -> list[list[str]]:
    rows = []
    pts = sorted(result.points, key=lambda p: _ORDER[p.verdict.status])  # stable: network order within a status
    for p in pts:
        v = p.verdict
        note = f"~{v.repeats_needed} repeats/side would decide" if v.repeats_needed else ""
        rows.append([
            _MARK[v.status], p.model, p.label, str(p.tokens), f"{v.baseline_ms:.4g}", f"{v.candidate_ms:.4g}",
            f"{v.change_pct:+.1f}%", f"{v.ci_low:.3f}..{v.ci_high:.3f}", _p(v.p_adjusted) if v.method != "ci-overlap" else "ci",
            f"{v.n_baseline} pairs" if v.method == "sign-test" else f"{v.n_baseline}/{v.n_candidate}", note,
        ])
    return rows


HEADER = ["status", "model", "unit", "tokens", "base ms", "new ms", "change", "ratio CI", "p (Holm)", "n", "note"]


def terminal(result: CheckResult) -> str:
    rows = [HEADER] + _rows(result)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    out = lines + [""] + [f"warning: {w}" for w in result.warnings] + [result.summary()]
    return "\n".join(out) + "\n"


def markdown(result: CheckResult) -> str:
    head = "### latprof check: " + ("regression" if result.regressions else "no regression")
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = [head, "", result.summary(), "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in _rows(result):
        r = list(r)
        if r[0] == "REGRESSION":
            r[0] = "**REGRESSION**"
        lines.append("| " + " | ".join(esc(c) for c in r) + " |")
    if result.warnings:
        lines += [""] + [f"- warning: {esc(w)}" for w in result.warnings]
    base, cand = result.baseline, result.candidate
    lines += ["", f"Baseline: `{base.get('path')}` ({base.get('device')}, {base.get('engine')}, {base.get('tuning')}, "
              f"created {base.get('created')}); candidate: `{cand.get('path') or 'fresh measurement'}` "
              f"(created {cand.get('created')})."]
    return "\n".join(lines) + "\n"


def junit(result: CheckResult) -> str:
    suite = ET.Element("testsuite", name="latprof check", tests=str(len(result.points)),
                       failures=str(sum(1 for p in result.points if _fails(result, p))),
                       skipped=str(sum(1 for p in result.points if p.verdict.status == stats.NOISY and not result.strict)),
                       errors="0")
    props = ET.SubElement(suite, "properties")
    for k in ("device", "engine", "target", "tuning"):
        ET.SubElement(props, "property", name=k, value=str(result.baseline.get(k)))
    ET.SubElement(props, "property", name="tolerance", value=str(result.tolerance))
    ET.SubElement(props, "property", name="alpha", value=f"{result.alpha:g}")
    for p in result.points:
        v = p.verdict
        case = ET.SubElement(suite, "testcase", classname=f"latprof.check.{p.model}", name=f"{','.join(p.units)}@{p.tokens}",
                             time=f"{v.candidate_ms / 1000:.6f}")
        if _fails(result, p):
            ET.SubElement(case, "failure", message=v.reason, type=v.status).text = _detail(p)
        elif v.status == stats.NOISY:
            ET.SubElement(case, "skipped", message=v.reason)
        ET.SubElement(case, "system-out").text = _detail(p)
    return ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"


def _fails(result: CheckResult, p) -> bool:
    return p.verdict.status == stats.REGRESSION or (result.strict and p.verdict.status == stats.NOISY)


def _detail(p) -> str:
    v = p.verdict
    return (f"{p.model}/{','.join(p.units)} at {p.tokens} tokens: {v.reason}; {v.baseline_ms:.4g} ms -> {v.candidate_ms:.4g} ms, "
            f"ratio {v.ratio:.4f} CI {v.ci_low:.4f}..{v.ci_high:.4f}, method {v.method}, p {_p(v.p_value)} "
            f"(Holm {_p(v.p_adjusted)}), n {v.n_baseline}/{v.n_candidate}")


def to_json(result: CheckResult) -> str:
    return json.dumps(result.to_dict(), indent=2, sort_keys=True, default=str) + "\n"


def render(result: CheckResult, fmt: str) -> str:
    try:
        return {"terminal": terminal, "markdown": markdown, "junit": junit, "json": to_json}[fmt](result)
    except KeyError:
        from latprof.errors import UsageError

        raise UsageError(f"unknown report format '{fmt}'", f"use one of {', '.join(FORMATS)}") from None
