"""The descriptor pool that sparseserve's generated protocol stubs register in."""

from google.protobuf import descriptor_pool

# Why a private pool: tritonclient's generated stubs register the very same
# message names (``inference.ModelInferRequest``, ...) in protobuf's default
# pool, from a file with a different name and different contents. Two
# definitions of one name in a pool are a conflict, so importing both sets of
# stubs into one process (our tests, a client and server side by side, the Triton
# backend that is itself a tritonclient user) would fail. `make protos` rewrites
# the generated ``*_pb2.py`` to use this pool instead of the default one. The
# wire format does not depend on the pool: messages from either set of stubs
# serialise to identical bytes.
#
# This relies on protobuf's default (upb) backend. The pure-Python backend
# (PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python) also records every generated
# message class in the default pool, whatever pool its descriptor came from, so
# there our stubs and tritonclient's still clash when imported together.
POOL = descriptor_pool.DescriptorPool()
