"""Hypothesis strategies shared by the fuzz tests: arbitrary JSON, and valid trace records to mutate."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from phaselens.phase import Clock, Phase, Role

#: any JSON value (what a sender can put in a datagram or a request body)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: (st.lists(children, max_size=4)
                      | st.dictionaries(st.text(max_size=12), children, max_size=5)),
    max_leaves=20,
)

_ids = st.text(min_size=1, max_size=40)
_counts = st.integers(min_value=0, max_value=2**53)  # phaselens.trace.MAX_COUNT
_times = st.integers(min_value=0, max_value=2**62)
_amounts = st.floats(min_value=0, max_value=1e18, allow_nan=False)


@st.composite
def step_dicts(draw: Any) -> dict[str, Any]:
    """A valid step record as a JSON object."""
    t0 = draw(_times)
    return {"type": "step", "gpu_uuid": draw(_ids), "engine_id": draw(_ids),
            "role": draw(st.sampled_from([r.value for r in Role])),
            "phase": draw(st.sampled_from([p.value for p in Phase.busy()])), "step": draw(_counts),
            "t0_ns": t0, "t1_ns": t0 + draw(st.integers(0, 10**12)),
            "clock": draw(st.sampled_from([c.value for c in Clock])),
            "prefill_tokens": draw(_counts), "decode_tokens": draw(_counts), "batch": draw(_counts),
            "context_tokens": draw(_counts), "flops": draw(_amounts), "bytes": draw(_amounts)}


@st.composite
def sample_dicts(draw: Any) -> dict[str, Any]:
    from phaselens.trace import METRIC_KEYS, SOURCES

    values = draw(st.dictionaries(st.sampled_from(METRIC_KEYS), st.none() | st.floats(0, 1e12), max_size=6))
    return {"type": "sample", "gpu_uuid": draw(_ids), "source": draw(st.sampled_from(SOURCES)),
            "t_ns": draw(_times), "values": values}


@st.composite
def mutated(draw: Any, base: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    """A valid record with some fields replaced by arbitrary JSON, deleted, or added."""
    obj = dict(draw(base))
    for key in draw(st.lists(st.sampled_from(sorted(obj)), max_size=3, unique=True)):
        action = draw(st.sampled_from(["replace", "delete"]))
        if action == "delete":
            del obj[key]
        else:
            obj[key] = draw(json_values)
    obj.update(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=2)))
    return obj
