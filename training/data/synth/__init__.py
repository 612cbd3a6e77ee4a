"""Procedural street scenes in two domains: a synthetic domain-adaptation benchmark (see config.py)."""
