"""A minimal MLServer runtime for one ONNX model: the MLServer side of ``benchmarks/oip_vs_mlserver.py``.

It runs inside MLServer's own venv (``benchmarks/README.md`` says how to make
it), never in Vigil's. ``load`` opens an onnxruntime session on the file that
``parameters.uri`` in ``model-settings.json`` names, with the session options
Vigil uses (one intra-op and one inter-op thread); ``predict`` decodes the one
``[N, F]`` FP32 or FP64 tensor with MLServer's ``NumpyCodec``, runs every
output of the model, and encodes each one back with the same codec. It is what
a user writes to serve an ONNX file on MLServer, which ships no ONNX runtime
of its own, and nothing more: no validation, fallback or monitoring.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.errors import InferenceError
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxRuntime(MLModel):
    """One onnxruntime session per MLServer inference worker, answering the Open Inference Protocol."""

    async def load(self) -> bool:
        """Open the session; MLServer reports the model ready once this returns True."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self._session = ort.InferenceSession(await get_model_uri(self._settings), options,
                                             providers=["CPUExecutionProvider"])
        (feed,) = self._session.get_inputs()
        self._input = feed.name
        self._dtype = np.float64 if feed.type == "tensor(double)" else np.float32
        self._outputs = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        """Run the model on the request's one tensor; one output tensor per model output."""
        if len(payload.inputs) != 1:
            raise InferenceError(f"expected one [N, F] tensor, got {len(payload.inputs)} inputs")
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(self._dtype, copy=False)
        results = self._session.run(self._outputs, {self._input: x})
        return InferenceResponse(
            model_name=self.name, model_version=self.version, id=payload.id,
            outputs=[NumpyCodec.encode_output(name, value) for name, value in zip(self._outputs, results)],
        )
