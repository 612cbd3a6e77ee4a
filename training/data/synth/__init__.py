"""Procedural street scenes in two domains: a synthetic domain-adaptation benchmark (see docs in config.py)."""
