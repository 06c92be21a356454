"""Hypothesis settings of the fuzz tests: deterministic in CI (``derandomize``: the same examples every run,
so a failure is reproducible), no per-example deadline (two shared cores), and more examples on demand:
``PHASELENS_FUZZ_EXAMPLES=20000 pytest tests/fuzz`` fuzzes for real with random seeds."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_EXAMPLES = os.environ.get("PHASELENS_FUZZ_EXAMPLES")
settings.register_profile(
    "phaselens",
    max_examples=int(_EXAMPLES) if _EXAMPLES else 300,
    derandomize=not _EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)
settings.load_profile("phaselens")
