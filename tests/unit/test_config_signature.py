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


@pytest.mark.parametrize("listed", [True, False], ids=["listed", "unlisted"])
def test_max_batch_size_needs_a_dynamic_first_dimension(listed: bool) -> None:
    """Listed or not (ModelConfig would describe an unlisted one without its first
    dimension, as batches the model refuses), and for an OpenVINO IR too: Triton's
    OpenVINO backend reshapes an IR to the batch, sparseserve serves its own shapes."""
    signature = ModelSignature(
        inputs=(TensorSpec("x", TYPES["FP32"], (1, 4)),),
        outputs=(TensorSpec("y", TYPES["FP32"], (1, 4)),),
    )
    listing = ' input [{ name: "x" data_type: TYPE_FP32 dims: [%s] }]'
    assert mismatches("max_batch_size: 8" + (listing % "4" if listed else ""), signature) == [
        "max_batch_size is 8, but input 'x' has shape [1, 4]; every input and output needs "
        "a dynamic (-1) leading dimension to batch on (set max_batch_size: 0 for a model of "
        "fixed shapes; sparseserve does not reshape a model to a batch)"
    ]
    assert mismatches("max_batch_size: 0" + (listing % "1, 4" if listed else ""), signature) == []


def test_a_tensor_of_unknown_rank_takes_any_dims() -> None:
    signature = ModelSignature(
        inputs=(TensorSpec("x", TYPES["FP32"], (-1,), rank_known=False),), outputs=()
    )
    assert mismatches('input [{ name: "x" data_type: TYPE_FP32 dims: [3, 4, 5] }]', signature) == []
