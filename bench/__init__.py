"""Benchmarks that print tables (`python -m bench [name ...]`); speed lives here, not in unit tests."""
