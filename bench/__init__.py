"""Benchmarks that print tables (see BENCHMARKS.md); not tests, not an importable API."""
