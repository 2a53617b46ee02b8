"""Fuzzing polyvisor's disk format parsers (see fuzz/run.py)."""
