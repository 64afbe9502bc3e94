"""MLServer custom runtime for bench/compare_servers.py: one onnxruntime session.

The minimal runtime MLServer's docs describe (an `MLModel` with `load` and `predict`,
tensors converted with `NumpyCodec`). `model-settings.json` names it as
`mlserver_onnx.OnnxRuntimeModel` and points `parameters.uri` at the ONNX file; the
benchmark puts this folder on the server's PYTHONPATH. Runs in MLServer's own venv.
"""

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxRuntimeModel(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        # Configured like sparseserve's backend in the benchmark: one core per run.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        path = await get_model_uri(self._settings)
        self._session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        array = NumpyCodec.decode_input(payload.inputs[0])
        names = [output.name for output in self._session.get_outputs()]
        results = self._session.run(names, {self._input: array})
        return InferenceResponse(
            model_name=self.name,
            outputs=[NumpyCodec.encode_output(n, r) for n, r in zip(names, results, strict=True)],
        )
