"""`sparseserve compare`: put the variants of a family side by side on a running server.

`loadgen` drives load through the server with the rows of the family's `eval.npz`, a
`--data` file or random ones; `server_metrics` reads what the server says about itself
(its Prometheus endpoint); `verdict` turns the per-round measurements into words by a
stated rule; `report` and `plots` write report.md / report.html / report.json and the
slide-sized plots; `screenshot` renders a report in headless Chromium; and `run` ties
them together. Needs the `[compare]` extra (tritonclient,
matplotlib); the serving path never imports this package.
"""
