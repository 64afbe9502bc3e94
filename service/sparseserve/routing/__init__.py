"""Families, the traffic policy that routes them, and shadow traffic."""
