"""Scheduling between the DataPlane and the backends: the dynamic batcher."""
