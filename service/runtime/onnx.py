"""The ONNX runtime: a registered model served with onnxruntime, and the watchdog that enforces its time budget."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from service.core.card import ModelCard
from service.core.predictor import Batch, ModelTimeout, Predictions, Predictor


class Watchdog:
    """Cancels onnxruntime runs that outlive their budget, through ``RunOptions.terminate``.

    One daemon thread per process polls the runs in flight; a call pays only a
    dict insert and delete, and a cancelled run raises inside ``session.run``
    so the caller's thread is freed too.
    """

    def __init__(self, tick: float = 0.02) -> None:
        self.tick = tick
        self._runs: dict[int, tuple[float, Any]] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def watch(self, deadline: float, run_options: Any) -> int:
        """Register a run; returns a token for :meth:`done`."""
        token = next(self._ids)
        self._runs[token] = (deadline, run_options)
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="vigil-watchdog", daemon=True)
                    self._thread.start()
        return token

    def done(self, token: int) -> None:
        """Unregister a finished run."""
        self._runs.pop(token, None)

    def _run(self) -> None:
        while True:
            time.sleep(self.tick)
            now = time.monotonic()
            for token, (deadline, options) in list(self._runs.items()):
                if now >= deadline:
                    options.terminate = True
                    self._runs.pop(token, None)


WATCHDOG = Watchdog()


class OnnxPredictor(Predictor):
    """A registered ONNX model served with onnxruntime (one session per worker)."""

    def __init__(self, card: ModelCard, model_path: Path, intra_op_threads: int = 1) -> None:
        import onnxruntime as ort

        started = time.perf_counter()
        self.card = card
        self._ort = ort
        ort.set_default_logger_severity(3)  # run errors are reported by Vigil, once, with context
        options = ort.SessionOptions()
        # One intra-op thread per worker: workers already use the cores, and thread
        # pools fighting each other cost more than they give for small tabular models.
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        sig = card.signature
        self._tensor_input = next(iter(sig.inputs)) if sig.input_mode == "tensor" else None
        self._tensor_dtype = np.float64 if sig.inputs.get(self._tensor_input or "") == "double" else np.float32
        if card.task == "classification":
            self._outputs = [sig.probability_output]
        else:
            self._outputs = [sig.value_output]
        self._labels = list(card.labels or [])
        self.load_seconds = time.perf_counter() - started

    def _feeds(self, batch: Batch) -> dict[str, np.ndarray]:
        if self._tensor_input is not None:
            assert batch.matrix is not None
            return {self._tensor_input: batch.matrix.astype(self._tensor_dtype, copy=False)}
        assert batch.columns is not None
        feeds = {}
        for name, elem in self.card.signature.inputs.items():
            column = batch.columns[name]
            if elem == "string":
                arr = np.array(["" if v is None else v for v in column], dtype=object)
            elif elem in ("int64", "int32"):
                arr = np.array([0 if v is None else v for v in column], dtype=np.int64 if elem == "int64" else np.int32)
            else:
                arr = np.array([np.nan if v is None else v for v in column],
                               dtype=np.float64 if elem == "double" else np.float32)
            feeds[name] = arr.reshape(-1, 1)
        return feeds

    def predict(self, batch: Batch, budget_seconds: float | None = None) -> Predictions:
        """Run the whole batch through onnxruntime in one call; :class:`ModelTimeout` past the budget."""
        feeds = self._feeds(batch)
        if budget_seconds is None:
            (raw,) = self.session.run(self._outputs, feeds)
        else:
            options = self._ort.RunOptions()
            token = WATCHDOG.watch(time.monotonic() + budget_seconds, options)
            try:
                (raw,) = self.session.run(self._outputs, feeds, options)
            except Exception as exc:
                if options.terminate:
                    raise ModelTimeout(f"model call cancelled after {budget_seconds * 1000:.0f} ms") from exc
                raise
            finally:
                WATCHDOG.done(token)
        if self.card.task == "regression":
            return Predictions(values=np.asarray(raw, dtype=np.float64).reshape(batch.size, -1)[:, 0])
        if self.card.signature.probability_format == "zipmap":
            keys = self._labels
            probs = np.array([[row[k] for k in keys] for row in raw], dtype=np.float64)
        else:
            probs = np.asarray(raw, dtype=np.float64).reshape(batch.size, -1)
        labels = self._labels
        # Take the label from the probabilities so label and probabilities always agree
        # (and a NaN row shows up as non-finite probabilities, not as a silent class 0).
        return Predictions(labels=[labels[i] for i in probs.argmax(axis=1).tolist()], probabilities=probs)

    def close(self) -> None:
        """Drop the onnxruntime session; its memory is freed once no call holds it."""
        self.session = None  # type: ignore[assignment]
