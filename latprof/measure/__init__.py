"""Measurement: compiled graphs timed on a device session; every raw sample appended with provenance."""
