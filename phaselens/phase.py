"""The inference phases and worker roles (DESIGN.md, "Phases and clocks")."""

from __future__ import annotations

import enum


class Phase(str, enum.Enum):
    """What a GPU step was doing. Serialized lowercase (``Phase.PREFILL.value == "prefill"``)."""

    PREFILL = "prefill"
    DECODE = "decode"
    #: a chunked-prefill step that also carries decodes
    MIXED = "mixed"
    IDLE = "idle"

    @classmethod
    def parse(cls, value: str) -> "Phase":
        """Return the phase named ``value`` (case-insensitive); ValueError names the bad value."""
        try:
            return cls(value.lower())
        except (ValueError, AttributeError):
            names = ", ".join(p.value for p in cls)
            raise ValueError(f"unknown phase {value!r}; expected one of {names}") from None

    @classmethod
    def busy(cls) -> tuple["Phase", ...]:
        """The phases that run GPU work (all but IDLE), in a fixed order."""
        return (cls.PREFILL, cls.DECODE, cls.MIXED)


class Role(str, enum.Enum):
    """The pool a worker belongs to."""

    COLOCATED = "colocated"
    PREFILL = "prefill"
    DECODE = "decode"

    @classmethod
    def parse(cls, value: str) -> "Role":
        try:
            return cls(value.lower())
        except (ValueError, AttributeError):
            names = ", ".join(r.value for r in cls)
            raise ValueError(f"unknown role {value!r}; expected one of {names}") from None


class Clock(str, enum.Enum):
    """Where a step interval was measured: CUDA events (``gpu``) or the host clock (``host``)."""

    GPU = "gpu"
    HOST = "host"
