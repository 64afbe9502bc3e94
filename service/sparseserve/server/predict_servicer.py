"""sparseserve's own gRPC API (`sparseserve.v1.SparseServe`): families and variants.

A thin adapter like the v2 servicer: Predict decodes named tensors, calls the same
DataPlane (routing, validation, metrics, shadow sampling) and encodes the answer with
the variant that gave it; ListVariants and GetTrafficPolicy encode what the ControlPlane
answers. Errors are raised and mapped by the same interceptor.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import numpy as np

from sparseserve import codec
from sparseserve.api import service_pb2 as pb
from sparseserve.api import service_pb2_grpc as pb_grpc
from sparseserve.controlplane import ControlPlane, VariantStatus
from sparseserve.dataplane import DataPlane
from sparseserve.repository.manifest import VariantManifest
from sparseserve.routing.router import Family
from sparseserve.server.errors import ServicerContext
from sparseserve.server.v2_servicer import CODEC_THREAD_MIN_BYTES
from sparseserve.server.wire import PredictRequestMessage


# The generated base class is untyped (docs/typing.md); it answers UNIMPLEMENTED for the
# RPCs not defined here.
class PredictServicer(pb_grpc.SparseServeServicer):  # type: ignore[misc]
    def __init__(
        self,
        dataplane: DataPlane,
        control: ControlPlane,
        max_bytes_elements: int = codec.DEFAULT_MAX_BYTES_ELEMENTS,
    ):
        self._dataplane = dataplane
        self._control = control
        self._max_bytes_elements = max_bytes_elements

    async def Predict(
        self, request: pb.PredictRequest | PredictRequestMessage, context: ServicerContext
    ) -> pb.PredictResponse:
        """As ModelInfer, within the same limits: the request budget (in the message's
        deserializer), max_bytes_elements, and a large BYTES payload decoded on the codec
        thread rather than the event loop."""
        strings = sum(len(t.data) for t in request.inputs.values() if t.datatype == "BYTES")
        answer = await self._dataplane.infer(
            request.name,
            request.version,
            partial(decode_tensors, request.inputs, self._max_bytes_elements),
            list(request.outputs),
            decode_in_thread=strings >= CODEC_THREAD_MIN_BYTES,
        )
        model = answer.model
        response = pb.PredictResponse(
            model=model.name,
            version=model.version_label,
            family=model.family,
            variant=model.variant,
            id=request.id,
        )
        for name, array in answer.outputs.items():
            dtype, raw = codec.encode_raw(array)
            tensor = response.outputs[name]
            tensor.datatype, tensor.data = dtype.name, raw
            tensor.shape.extend(array.shape)
        if answer.shadow is not None:
            # Shadow runs start once the answer has been sent, never before. (types-grpcio
            # declares the callback's type as a class, not a Protocol: no function fits.)
            context.add_done_callback(
                lambda _: self._dataplane.after_sent(answer)  # type: ignore[arg-type]
            )
        return response

    async def ListVariants(
        self, request: pb.ListVariantsRequest, context: ServicerContext
    ) -> pb.ListVariantsResponse:
        variants = self._control.variants(request.family)
        return pb.ListVariantsResponse(variants=[_variant(v) for v in variants])

    async def GetTrafficPolicy(
        self, request: pb.GetTrafficPolicyRequest, context: ServicerContext
    ) -> pb.GetTrafficPolicyResponse:
        policy = self._control.traffic_policy(request.family)
        state = policy.state
        return pb.GetTrafficPolicyResponse(
            source=str(state.source) if state.source else "",
            loaded_at=state.loaded_at,
            error=state.error,
            policy_yaml=state.policy.to_yaml(),
            families=[_family_route(family) for family in policy.families],
        )


def decode_tensors(
    tensors: Mapping[str, pb.Tensor], max_bytes_elements: int = codec.DEFAULT_MAX_BYTES_ELEMENTS
) -> dict[str, np.ndarray]:
    """Predict's named tensors -> arrays, checking the wire format only (the model's own
    expectations are checked by the DataPlane). At most `max_bytes_elements` BYTES
    elements over all of them, as for ModelInfer."""
    arrays = {}
    bytes_left = max_bytes_elements
    for name, tensor in tensors.items():
        dtype = codec.datatype(tensor.datatype)
        shape = codec.validate_shape(name, tensor.shape, dtype.itemsize)
        arrays[name] = array = codec.decode_raw(name, dtype, shape, tensor.data, bytes_left)
        if dtype is codec.BYTES:
            bytes_left -= array.size
    return arrays


def _variant(status: VariantStatus) -> pb.Variant:
    variant = pb.Variant(
        model=status.name,
        state=status.state.value,
        reason=status.reason,
        ready_versions=status.ready_versions,
    )
    model = status.model
    if model is not None:
        variant.backend = model.backend.name
        variant.file_bytes = model.footprint.file_bytes
        variant.memory_bytes = model.footprint.memory_bytes
        variant.inflight_requests = model.inflight
    _describe(variant, status.name, status.manifest)
    return variant


def _describe(variant: pb.Variant, name: str, manifest: VariantManifest | None) -> None:
    """The manifest's summary; a model without one is its own family, variant default."""
    if manifest is None:
        variant.family, variant.variant, variant.is_baseline = name, "default", True
        return
    variant.has_manifest = True
    variant.family, variant.variant = manifest.family, manifest.variant
    variant.baseline = manifest.baseline or ""
    variant.is_baseline = manifest.is_baseline
    variant.task, variant.method = manifest.task.value, manifest.method
    variant.quantization = manifest.quantization or ""
    variant.description = manifest.description
    if manifest.parameters is not None:
        variant.parameters = manifest.parameters
    if manifest.nonzero_parameters is not None:
        variant.nonzero_parameters = manifest.nonzero_parameters
    if manifest.sparsity is not None:
        variant.sparsity = manifest.sparsity
    for quality in manifest.quality:
        entry = variant.quality.add(
            metric=quality.metric,
            value=quality.value,
            dataset=quality.dataset,
            samples=quality.samples,
        )
        if quality.baseline_value is not None:
            entry.baseline_value = quality.baseline_value


def _family_route(family: Family) -> pb.FamilyRoute:
    route = pb.FamilyRoute(
        family=family.name,
        baseline=family.baseline or "",
        loaded_variants=sorted(family.variants),
        problems=family.problems,
    )
    policy = family.policy
    if policy is not None:
        route.default = policy.default or ""
        route.split.update(policy.split or {})
        if policy.shadow is not None:
            route.shadow.variants.extend(policy.shadow.variants)
            route.shadow.fraction = policy.shadow.fraction
    variant = family.default_variant()
    if variant is not None and variant in family.variants:
        route.resolves_to, route.model = variant, family.variants[variant]
    return route
