"""Are two tables comparable? `latprof check` refuses to compare a Pixel's table with an S20's, a
tuned build with an untuned one, TVM with onnxruntime, and says which field differs.

Differences that *are* the change under test (TVM version, latprof version, creation date) are allowed
and reported; measurement settings that change what a sample means (repeats, inner loop count) are
reported as warnings: the test stays valid, its power does not.
"""

from __future__ import annotations

from latprof.errors import LutError, UsageError

# must be equal: a difference makes the comparison meaningless
REQUIRED = ("schema", "device", "target", "engine", "tuning", "emulated")
# may differ; reported so the reader knows what changed between the runs
INFORMATIONAL = ("tvm_version", "latprof_version", "transport")
# measurement settings: a difference changes the noise, not the quantity; warned about
SETTINGS_WARN = ("warmup", "repeats", "number", "min_repeat_ms", "cooldown_s", "threads")

FIX = ("compare tables measured on the same device with the same engine, target and tuning: re-measure "
       "the baseline with `latprof measure` or pick the matching table")


def _label(table, default: str) -> str:
    return str(getattr(table, "path", None) or default)


def check_comparable(baseline, candidate, rows_baseline=None, rows_candidate=None) -> list[str]:
    """Raise :class:`LutError` naming the first field that makes the two tables incomparable.

    ``baseline`` / ``candidate`` are :class:`LutTable` objects (provenance plus frame); the optional
    ``rows_*`` frames restrict the per-row check (engine and tuning columns) to the compared rows.
    Returns a list of warnings for allowed differences."""
    pb, pc = dict(baseline.provenance or {}), dict(candidate.provenance or {})
    nb, nc = _label(baseline, "baseline"), _label(candidate, "candidate")
    warnings: list[str] = []
    for key in REQUIRED:
        in_b, in_c = key in pb, key in pc
        if in_b and in_c:
            if _norm(pb[key]) != _norm(pc[key]):
                raise LutError(f"tables are not comparable: {key} differs ({nb}: {pb[key]!r}, {nc}: {pc[key]!r})", FIX)
        elif in_b != in_c:
            missing = nc if in_b else nb
            raise LutError(f"tables are not comparable: {missing} does not record '{key}' in its provenance", FIX)
        else:
            warnings.append(f"neither table records '{key}'; cannot verify it matches")
    rb = baseline.frame if rows_baseline is None else rows_baseline
    rc = candidate.frame if rows_candidate is None else rows_candidate
    for col in ("engine", "tuning"):
        vb, vc = sorted(set(map(str, rb[col]))), sorted(set(map(str, rc[col])))
        if vb != vc:
            raise LutError(f"tables are not comparable: column '{col}' differs ({nb}: {vb}, {nc}: {vc})", FIX)
    for key in INFORMATIONAL:
        if key in pb and key in pc and _norm(pb[key]) != _norm(pc[key]):
            warnings.append(f"{key} changed: {pb[key]} -> {pc[key]}")
    sb, sc = pb.get("settings") or {}, pc.get("settings") or {}
    if isinstance(sb, dict) and isinstance(sc, dict):
        for key in SETTINGS_WARN:
            if sb.get(key) != sc.get(key) and (key in sb or key in sc):
                warnings.append(f"measurement setting '{key}' differs ({sb.get(key)} -> {sc.get(key)}): "
                                "the samples are not equally precise")
    return warnings


def check_device(baseline, device: str | None) -> None:
    """The --device the user named must be the baseline's device."""
    recorded = (baseline.provenance or {}).get("device")
    if device and device.endswith((".yaml", ".yml")):  # a config path: compare the device's name
        from latprof.devices import load_config

        device = load_config(device).name
    if device and recorded and device != recorded:
        raise UsageError(f"--device {device} but the baseline {_label(baseline, 'table')} was measured on '{recorded}'",
                         f"use --device {recorded} or the baseline table of {device}")


def _norm(value):
    if isinstance(value, str):
        return value.strip()
    return value
