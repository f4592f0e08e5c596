"""Fused tensor routines; each has a plain-torch definition it must match (see tests/kernels)."""
