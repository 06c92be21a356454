"""Fuzz the dcgm-exporter text parser (through ``DcgmSampler.sample``, the path a scrape takes): no page
crashes it, and whatever it returns is a finite, non-negative reading, ratios within 0..1; a page it cannot
use fails the poll (``last_error``) rather than passing on nonsense."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from phaselens.agent.samplers.dcgm import DCGM_FIELDS, DcgmSampler
from phaselens.trace import UTILIZATION_KEYS

_values = st.sampled_from(["NaN", "+Inf", "-Inf", "-1", "1e400", "0", "0.5", "87", "1", "x", "", "0x10",
                           "1_000"]) | st.floats().map(repr)
_label_values = st.sampled_from(["GPU-0", "GPU-1", "", "node-a"]) | st.text(max_size=8)


@st.composite
def _line(draw) -> str:
    name = draw(st.sampled_from(sorted(DCGM_FIELDS)) | st.text(max_size=10))
    labels = draw(st.dictionaries(st.sampled_from(["UUID", "uuid", "gpu", "Hostname", "hostname", "x"]),
                                  _label_values, max_size=4))
    body = ",".join(f'{k}="{v}"' for k, v in labels.items())
    line = f"{name}{{{body}}} {draw(_values)}"
    if draw(st.booleans()):
        line = f"# TYPE {name} {draw(st.sampled_from(['gauge', 'counter', 'bogus']))}\n" + line
    return line


_pages = st.lists(_line(), max_size=12).map("\n".join) | st.text(max_size=300)


@given(_pages, st.booleans())
def test_no_page_crashes_the_dcgm_sampler_and_nothing_garbled_passes(page: str,
                                                                     trailing_newline: bool) -> None:
    text = page + ("\n" if trailing_newline else "")
    sampler = DcgmSampler(url="http://fuzz:9400/metrics", http_get=lambda url, timeout: text)
    for _ in range(2):  # the second poll exercises the "not refreshed" comparison
        for rec in sampler.sample():
            assert rec.source == "dcgm" and rec.gpu_uuid
            for key, v in rec.values.items():
                if v is None:
                    continue
                assert math.isfinite(v) and v >= 0, (key, v)
                if key in UTILIZATION_KEYS:
                    assert v <= 1.0, (key, v)
