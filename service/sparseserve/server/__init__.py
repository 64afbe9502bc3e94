"""The gRPC server: protocol adapters over the DataPlane, the error interceptor, lifecycle."""
