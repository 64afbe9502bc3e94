"""config.pbtxt against the model's own signature (`config_mismatches`): what Triton
refuses at load is refused here too, and what it allows is allowed."""

from __future__ import annotations

import pytest
from google.protobuf import text_format

from sparseserve.backends.base import ModelSignature, TensorSpec, config_mismatches
from sparseserve.codec import DATATYPES
from sparseserve.protocol import model_config_pb2

TYPES = {datatype.name: datatype for datatype in DATATYPES}
SIGNATURE = ModelSignature(
    inputs=(TensorSpec("x", TYPES["FP32"], (-1, 4)), TensorSpec("ids", TYPES["INT64"], (-1, -1))),
    outputs=(TensorSpec("y", TYPES["FP32"], (-1, 4)), TensorSpec("z", TYPES["FP32"], (-1,))),
)


def mismatches(text: str, signature: ModelSignature = SIGNATURE) -> list[str]:
    config = model_config_pb2.ModelConfig()
    text_format.Parse(text, config)
    return config_mismatches(signature, config)


@pytest.mark.parametrize(
    "text",
    [
        "",  # no tensors listed: filled in from the model
        'max_batch_size: 8 input [{ name: "x" data_type: TYPE_FP32 dims: [4] },'
        ' { name: "ids" data_type: TYPE_INT64 dims: [-1] }]',
        'input [{ name: "x" data_type: TYPE_FP32 dims: [-1, 4] },'
        ' { name: "ids" data_type: TYPE_INT64 dims: [1, 128] }]',  # fixes a dynamic dim
        'output [{ name: "z" data_type: TYPE_FP32 dims: [-1] }]',  # a subset of the outputs
        'max_batch_size: 8 output [{ name: "y" data_type: TYPE_FP32 dims: [2, 2]'
        " reshape { shape: [4] } }]",  # the reshape is what the model sees
        'output [{ name: "y" dims: [-1, 4] }]',  # no data_type: not compared
        'input [{ name: "x" data_type: TYPE_FP32 dims: [-1, 4] }]',  # the others: ModelConfig
    ],
    ids=[
        "empty",
        "batched",
        "fixed-dynamic",
        "output-subset",
        "reshape",
        "no-datatype",
        "input-subset",
    ],
)
def test_configs_that_agree_with_the_model(text: str) -> None:
    assert mismatches(text) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            'input [{ name: "nope" data_type: TYPE_FP32 dims: [-1, 4] }]',
            ["input 'nope' is not one of the model's inputs ['x', 'ids']"],
        ),
        (
            'output [{ name: "y" data_type: TYPE_INT64 dims: [-1, 4] }]',
            ["output 'y' is TYPE_FP32 in the model, TYPE_INT64 in config.pbtxt"],
        ),
        (
            'output [{ name: "y" data_type: TYPE_FP32 dims: [4] }]',  # batch dim kept
            ["output 'y' has dims [-1, 4] in the model (-1: any), [4] in config.pbtxt"],
        ),
        (
            'max_batch_size: 4 output [{ name: "y" data_type: TYPE_FP32 dims: [-1] }]',
            ["output 'y' has dims [4] in the model (batch dimension left out, "
             "max_batch_size > 0) (-1: any), [-1] in config.pbtxt"],
        ),
        (
            'output [{ name: "y" data_type: 99 dims: [-1, 4] }]',  # parses: the enum is open
            ["output 'y' has data_type 99, no type of Triton's"],
        ),
    ],
    ids=["unknown-input", "datatype", "rank", "config-dynamic-where-fixed", "unknown-datatype"],
)  # fmt: skip
def test_configs_that_contradict_the_model(text: str, expected: list[str]) -> None:
    assert mismatches(text) == expected


def test_max_batch_size_needs_a_dynamic_first_dimension() -> None:
    signature = ModelSignature(inputs=(TensorSpec("x", TYPES["FP32"], (1, 4)),), outputs=())
    assert mismatches('max_batch_size: 8 input [{ name: "x" data_type: TYPE_FP32 dims: [4] }]',
                      signature) == [
        "input 'x' has no dynamic first dimension in the model ([1, 4]), which "
        "max_batch_size > 0 batches along"
    ]  # fmt: skip


def test_an_openvino_config_follows_tritons_openvino_backend() -> None:
    """An IR with a fixed batch of 1 and `max_batch_size: 8` (Open Model Zoo's, say): the
    OpenVINO backend reshapes the batch and does not compare it, and an input's -1 takes
    any dimension; the onnxruntime rules refuse both."""
    signature = ModelSignature(
        inputs=(TensorSpec("x", TYPES["FP32"], (1, 3, 224, 224)),),
        outputs=(TensorSpec("y", TYPES["FP32"], (1, 1000)),),
    )
    text = (
        'max_batch_size: 8 input [{ name: "x" data_type: TYPE_FP32 dims: [3, -1, -1] }]'
        ' output [{ name: "y" data_type: TYPE_FP32 dims: [1000] }]'
    )
    config = model_config_pb2.ModelConfig()
    text_format.Parse(text, config)
    assert config_mismatches(signature, config, openvino=True) == []
    assert len(config_mismatches(signature, config)) == 2  # onnxruntime's rules
    output = 'max_batch_size: 8 output [{ name: "y" data_type: TYPE_FP32 dims: [-1] }]'
    config = model_config_pb2.ModelConfig()
    text_format.Parse(output, config)
    assert config_mismatches(signature, config, openvino=True) == [
        "output 'y' has dims [1000] in the model (batch dimension left out, max_batch_size > 0) "
        "(-1: any), [-1] in config.pbtxt"
    ]  # an output's -1 is still compared


def test_a_tensor_of_unknown_rank_takes_any_dims() -> None:
    signature = ModelSignature(
        inputs=(TensorSpec("x", TYPES["FP32"], (-1,), rank_known=False),), outputs=()
    )
    assert mismatches('input [{ name: "x" data_type: TYPE_FP32 dims: [3, 4, 5] }]', signature) == []
