"""sparseserve's benchmarks. Each script runs as `python -m bench.<script>` from the
repository root (or as `python bench/<script>.py`); the shared parts are report.py,
measure.py, workload.py and peer_servers.py. See bench/README.md."""
