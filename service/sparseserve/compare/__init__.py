"""`sparseserve compare`: put the variants of a family side by side on a running server.

`loadgen` drives load through the server, `server_metrics` reads what the server says
about itself (its Prometheus endpoint), `report` turns both into report.md / report.html
with plots, and `run` ties them together. Needs the `[compare]` extra (tritonclient,
matplotlib); the serving path never imports this package.
"""
