"""Backends: the torch reference, the Triton kernel and the compiled (CPU / CUDA) libraries.

Every fused backend implements the same tiny interface (see `FusedBackend`): it receives the
launch tables of nvrm_ext.backends.tables and performs one launch per (device, dtype) bucket.
"""
