"""sparseserve's own gRPC API (proto package ``sparseserve.v1``, the wire name clients
call): stubs generated from ``protos/sparseserve/api/service.proto`` by ``make protos``
and committed; do not edit them by hand. Like the v2 stubs (see ``sparseserve.protocol``)
they register in sparseserve's private descriptor pool, which server reflection answers
from.
"""
