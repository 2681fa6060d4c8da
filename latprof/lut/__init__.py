"""Latency lookup tables: schema, reading/validation, building from raw samples, interpolation."""

from latprof.lut.table import SCHEMA_VERSION, LutTable, read_lut, write_lut

__all__ = ["SCHEMA_VERSION", "LutTable", "read_lut", "write_lut"]
