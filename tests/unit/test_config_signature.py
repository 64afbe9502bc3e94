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
    ],
    ids=["empty", "batched", "fixed-dynamic", "output-subset", "reshape", "no-datatype"],
)
def test_configs_that_agree_with_the_model(text: str) -> None:
    assert mismatches(text) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            'input [{ name: "nope" data_type: TYPE_FP32 dims: [-1, 4] }]',
            ["input 'nope' is not one of the model's inputs ['x', 'ids']",
             "the model's inputs ['ids', 'x'] are not listed"],
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
            'input [{ name: "x" data_type: TYPE_FP32 dims: [-1, 4] }]',
            ["the model's inputs ['ids'] are not listed"],
        ),
    ],
    ids=["unknown-input", "datatype", "rank", "config-dynamic-where-fixed", "missing-input"],
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


def test_a_tensor_of_unknown_rank_takes_any_dims() -> None:
    signature = ModelSignature(
        inputs=(TensorSpec("x", TYPES["FP32"], (-1,), rank_known=False),), outputs=()
    )
    assert mismatches('input [{ name: "x" data_type: TYPE_FP32 dims: [3, 4, 5] }]', signature) == []
