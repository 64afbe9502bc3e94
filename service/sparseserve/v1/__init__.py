"""sparseserve's own gRPC API (package ``sparseserve.v1``): stubs generated from
``protos/sparseserve/v1/service.proto`` by ``make protos`` and committed; do not edit
them by hand. Like the v2 stubs (see ``sparseserve.protocol``) they register in
sparseserve's private descriptor pool, which server reflection answers from.
"""
