"""Vigil's observing path: metrics and (later) prediction log, drift and canary analysis."""
