"""Model runtimes behind one :class:`~service.core.predictor.Predictor` interface: ONNX and the heuristic fallback."""
