"""Benchmarks of the whole pipeline at 100x the platform's volume (issue #8): `python -m
benchmarks.run`, described in benchmarks/README.md."""
