"""KServe model server for bench/compare_servers.py: one onnxruntime session per model.

The minimal custom Python runtime KServe's docs describe: a `kserve.Model` subclass
that loads in `load()` and answers v2 `InferRequest`s with an `InferResponse` in
`predict()`, served by `kserve.ModelServer` (REST and gRPC). Run in KServe's own venv:

    python kserve_onnx.py --model NAME=PATH [--model NAME=PATH ...] \
        --http_port P --grpc_port Q --enable_latency_logging false

KServe's own flags (ports, logging) are parsed by `kserve.model_server.parser`.
"""

import argparse

import kserve
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer


class OnnxRuntimeModel(Model):
    def __init__(self, name: str, path: str):
        super().__init__(name)
        self.path = path
        self.load()

    def load(self) -> bool:
        options = ort.SessionOptions()
        # Configured like sparseserve's backend in the benchmark: one core per run.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.outputs = [output.name for output in self.session.get_outputs()]
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        array = payload.inputs[0].as_numpy()
        results = self.session.run(self.outputs, {self.input: array})
        outputs = []
        for name, result in zip(self.outputs, results, strict=True):
            output = InferOutput(name=name, shape=list(result.shape), datatype="FP32")
            output.set_data_from_numpy(result)
            outputs.append(output)
        return InferResponse(response_id=payload.id, model_name=self.name, infer_outputs=outputs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[kserve.model_server.parser])
    parser.add_argument("--model", action="append", required=True, help="NAME=PATH")
    args, _ = parser.parse_known_args()
    models = [OnnxRuntimeModel(*spec.split("=", 1)) for spec in args.model]
    ModelServer(http_port=args.http_port, grpc_port=args.grpc_port).start(models)
