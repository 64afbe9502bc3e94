"""Backends run a loaded model: a small async interface, implementations picked by name."""
