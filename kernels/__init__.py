"""Kernels for the engine (paged attention), roofline probes; torch reference versions for CPU."""
