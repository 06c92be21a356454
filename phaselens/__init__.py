"""phaselens: per-phase (prefill/decode) GPU observability for LLM inference.

The shared types live here: :class:`~phaselens.phase.Phase`, the trace records of DESIGN.md
(:mod:`phaselens.trace`) and the GPU spec table (:mod:`phaselens.gpus`).
"""

__version__ = "0.1.0"
