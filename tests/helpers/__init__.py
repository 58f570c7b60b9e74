"""Shared test helpers (plain modules, importable from subprocesses too)."""
