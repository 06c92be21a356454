"""Kernels for the engine (paged attention), roofline probes; torch reference versions for CPU.

The engine imports attention from here, never from a file below: this is the seam where the Triton path
will replace the torch reference.
"""

from phaselens.kernels.attention import (AttentionMetadata, dense_attention, paged_attention,  # noqa: F401
                                         write_kv)
