"""Helpers for tests/test_megatron.py: multi-process (gloo/NCCL) megatron checks."""
