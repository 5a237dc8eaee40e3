"""The Open Inference Protocol (/v2) against the real service, with KServe's own ``InferenceRESTClient``.

A second client no one here wrote, beside ``tritonclient`` in test_oip.py: it
builds its requests with ``InferRequest.to_rest`` (JSON, or the binary tensor
extension when an input was set from numpy with ``binary_data=True``) and reads
the answers with ``InferResponse.from_bytes``. Both example models are called
with both input conventions (one ``[N, F]`` tensor; one input per feature with
``content_type: "pd"``), and every answer is compared with onnxruntime on the
same rows.

The client is asynchronous; each test runs its calls with ``asyncio.run`` and
opens its own client inside that loop (an ``httpx.AsyncClient`` belongs to the
loop that made it).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, TypeVar
from unittest import mock

import httpx
import numpy as np
import pytest

from tests.integration.test_oip import features, onnx_run
from tests.servers import VigilServer, vigil_server

# kserve parses sys.argv when it is imported (kserve/model_server.py, ``parser.parse_known_args()``), and argparse
# takes prefixes: pytest's ``--co`` would be read as kserve's ``--configure_logging`` and end collection with exit 2.
# It is imported with argv emptied so that only pytest reads pytest's options.
with mock.patch.object(sys, "argv", sys.argv[:1]):
    from kserve import InferenceRESTClient, InferInput, InferRequest, InferResponse, RESTConfig
    from kserve.protocol.infer_type import RequestedOutput

pytestmark = pytest.mark.integration

T = TypeVar("T")
OUTPUTS = {"cancer": ["label", "probabilities"], "diabetes": ["value"]}
"""The outputs each example model answers with (service/oip.py)."""


@pytest.fixture(scope="module")
def server(example_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VigilServer]:
    deploy = tmp_path_factory.mktemp("kserve-deploy") / "deploy.yaml"  # absent: every model serves its one version
    with vigil_server(example_registry, env={"VIGIL_DEPLOY": str(deploy)}) as srv:
        yield srv


def call(calls: Callable[[InferenceRESTClient], Awaitable[T]]) -> T:
    """Run ``calls`` with a fresh V2 client in a fresh event loop, and close the client after."""

    async def run() -> T:
        async with InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=60)) as client:
            return await calls(client)

    return asyncio.run(run())


def tensor(name: str, values: np.ndarray, datatype: str, binary: bool) -> InferInput:
    infer_input = InferInput(name, list(values.shape), datatype)
    infer_input.set_data_from_numpy(values, binary_data=binary)
    return infer_input


def request(model: str, x: np.ndarray, columns: list[str], per_feature: bool, binary: bool,
            request_id: str) -> InferRequest:
    """An inference request for rows ``x`` in either convention, outputs asked for as binary data when ``binary``."""
    datatype = "FP64" if x.dtype == np.float64 else "FP32"
    if per_feature:
        inputs = [tensor(c, np.ascontiguousarray(x[:, i]), datatype, binary) for i, c in enumerate(columns)]
        parameters: dict[str, Any] | None = {"content_type": "pd"}
    else:
        inputs, parameters = [tensor("input", x, datatype, binary)], None
    wanted = [RequestedOutput(name, {"binary_data": binary}) for name in OUTPUTS[model]]
    return InferRequest(model, inputs, request_id=request_id, parameters=parameters, request_outputs=wanted)


def output(answer: InferResponse, name: str) -> np.ndarray:
    found = answer.get_output_by_name(name)
    assert found is not None, f"no output {name!r} in {[o.name for o in answer.outputs]}"
    return found.as_numpy()


def test_health_and_readiness_through_the_kserve_client(server: VigilServer) -> None:
    async def health(client: InferenceRESTClient) -> tuple[bool, ...]:
        return (await client.is_server_live(server.url), await client.is_server_ready(server.url),
                await client.is_model_ready(server.url, "cancer"), await client.is_model_ready(server.url, "diabetes"),
                await client.is_model_ready(server.url, "nope"))

    assert call(health) == (True, True, True, True, False)


CASES = [(model, per_feature, binary) for model in ("cancer", "diabetes") for per_feature in (False, True)
         for binary in (False, True)]


@pytest.mark.parametrize(("model", "per_feature", "binary"), CASES,
                         ids=[f"{m}-{'per-feature' if p else 'tensor'}-{'binary' if b else 'json'}" for m, p, b in CASES])
def test_predictions_through_the_kserve_client_equal_onnxruntime(server: VigilServer, example_registry: Path,
                                                                 model: str, per_feature: bool, binary: bool) -> None:
    frame = features(example_registry, model, 48)
    x = frame.to_numpy(np.float32 if model == "cancer" else np.float64)  # the diabetes rows go as FP64
    request_id = f"kserve-{model}-{int(per_feature)}{int(binary)}"
    infer = request(model, x, list(frame.columns), per_feature, binary, request_id)
    answer = call(lambda client: client.infer(server.url, infer, model_name=model))
    assert (answer.id, answer.model_name) == (request_id, model)
    assert answer.parameters["variants"] == ["stable"] * len(x) and answer.parameters["reasons"] == [None] * len(x)
    expected = onnx_run(example_registry, model, {"input": x.astype(np.float32)})
    if model == "cancer":
        labels, probabilities = expected
        np.testing.assert_array_equal(output(answer, "label"), labels)
        np.testing.assert_array_equal(output(answer, "probabilities"), probabilities)
    else:
        (values,) = expected
        np.testing.assert_array_equal(output(answer, "value"), values[:, 0].astype(np.float64))


def test_a_refusal_reaches_the_kserve_client_with_vigils_error(server: VigilServer, example_registry: Path) -> None:
    x = features(example_registry, "cancer", 2).to_numpy(np.float32)[:, :29]  # one feature short
    infer = InferRequest("cancer", [tensor("input", x, "FP32", binary=True)])
    with pytest.raises(httpx.HTTPStatusError) as info:
        call(lambda client: client.infer(server.url, infer, model_name="cancer"))
    assert info.value.response.status_code == 400
    assert "input 'input' has shape [2, 29]; it takes [N, 30]" in str(info.value)
