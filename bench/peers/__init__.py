"""The peer servers' runtimes (run in their own venvs) and the bare v2 gRPC servers."""
