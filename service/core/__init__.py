"""The shared vocabulary: the card, the predictor interface, errors, settings and atomic file writes.

Nothing here imports any other Vigil module.
"""
