"""An MLServer model class serving one exported `model.onnx` with ONNX Runtime, for the KServe v2
compatibility tests: MLServer is an independent implementation of the protocol vitserve's Triton
runtime speaks.

Runs inside MLServer's own virtual environment (`make mlserver-env`), so it imports nothing from
vitserve. model-settings.json names it as `mlserver_model.OnnxModel` (with this folder on
PYTHONPATH) and gives the ONNX file as `parameters.uri`.
"""

from __future__ import annotations

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxModel(MLModel):
    """Every output the request names (all of the graph's outputs when it names none), as NumPy tensors."""

    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self._session = ort.InferenceSession(
            self.settings.parameters.uri, options, providers=["CPUExecutionProvider"]
        )
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {tensor.name: NumpyCodec.decode_input(tensor) for tensor in payload.inputs}
        names = [o.name for o in payload.outputs or []] or [o.name for o in self._session.get_outputs()]
        results = self._session.run(names, feeds)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            outputs=[
                NumpyCodec.encode_output(name, value) for name, value in zip(names, results, strict=True)
            ],
        )
