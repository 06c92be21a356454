"""A step record written straight to its JSON line, for the shim's hot path.

``phaselens.trace.dumps`` builds a :class:`~phaselens.trace.StepRecord`, a dict of its 15 fields and then
runs ``json.dumps``: about half of the shim's host time per step with an agent listening. The shim instead
formats the line with one f-string, the constant part (GPU, engine, role) prepared once. The text is exactly
what ``dumps`` gives (DESIGN.md's record contract: the same keys in the same order, compact separators,
strings escaped by ``json.dumps``, integers as they are, floats by ``repr`` as ``json`` writes them);
tests/serving_shim/test_step_line.py checks that. The record object is built only for a JSONL file.
"""

from __future__ import annotations

import json
import math

from phaselens.phase import Clock, Phase, Role
from phaselens.serving_shim.cost import StepFigures
from phaselens.trace import StepRecord, dumps


def step_head(gpu_uuid: str, engine_id: str, role: Role) -> str:
    """The start of every step line of one GPU, engine and role, up to the phase's value."""
    return (f'{{"type":"step","gpu_uuid":{json.dumps(gpu_uuid)},"engine_id":{json.dumps(engine_id)},'
            f'"role":{json.dumps(role.value)},"phase":')


class StepLine:
    """One finished step: :meth:`json` is its line (a :class:`~.emitter.LazyRecord`), :meth:`record` its
    :class:`~phaselens.trace.StepRecord`. ``head`` is :func:`step_head` of ``gpu_uuid``, ``engine_id`` and
    ``role``; ``figures`` is :func:`~.cost.step_figures` of the step."""

    __slots__ = ("head", "gpu_uuid", "engine_id", "role", "phase", "step", "t0_ns", "t1_ns", "clock",
                 "figures")

    def __init__(self, head: str, gpu_uuid: str, engine_id: str, role: Role, phase: Phase, step: int,
                 t0_ns: int, t1_ns: int, clock: Clock, figures: StepFigures) -> None:
        self.head = head
        self.gpu_uuid = gpu_uuid
        self.engine_id = engine_id
        self.role = role
        self.phase = phase
        self.step = step
        self.t0_ns = t0_ns
        self.t1_ns = t1_ns
        self.clock = clock
        self.figures = figures

    def json(self) -> str:
        """The record's line, as ``dumps(self.record())`` writes it."""
        prefill, decode, batch, context, _, flops, nbytes = self.figures
        if not (math.isfinite(flops) and math.isfinite(nbytes)):  # json writes Infinity/NaN, repr inf/nan
            return dumps(self.record())
        return (f'{self.head}"{self.phase.value}","step":{self.step},"t0_ns":{self.t0_ns},'
                f'"t1_ns":{self.t1_ns},"clock":"{self.clock.value}","prefill_tokens":{prefill},'
                f'"decode_tokens":{decode},"batch":{batch},"context_tokens":{context},'
                f'"flops":{flops!r},"bytes":{nbytes!r}}}')

    def record(self) -> StepRecord:
        prefill, decode, batch, context, _, flops, nbytes = self.figures
        return StepRecord(gpu_uuid=self.gpu_uuid, engine_id=self.engine_id, role=self.role, phase=self.phase,
                          step=self.step, t0_ns=self.t0_ns, t1_ns=self.t1_ns, clock=self.clock,
                          prefill_tokens=prefill, decode_tokens=decode, batch=batch, context_tokens=context,
                          flops=flops, bytes=nbytes)
