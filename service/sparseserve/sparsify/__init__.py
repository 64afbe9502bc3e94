"""Build sparse model variants with torch (``[sparsify]`` extra); the server never imports it."""
