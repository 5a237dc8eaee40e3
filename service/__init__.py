"""Vigil's online path: everything a prediction request touches."""
