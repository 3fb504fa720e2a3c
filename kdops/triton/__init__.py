"""Triton kernels of kdops (imported lazily by kdops.backend)."""
