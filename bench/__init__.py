"""Benchmark suite of nvrm_ext: optimizer step time, state and peak memory against the original
NVRM algorithm and torch's own optimizers. Run `pytest bench/`; see bench/conftest.py.

A package, so that pytest puts the repository root on sys.path (nvrm_ext imports without
installing) and bench's conftest never collides with tests/conftest.py.
"""
