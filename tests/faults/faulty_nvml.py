"""A fault-injecting NVML: the fake of tests/agent/fake_nvml.py, plus errors at random once armed.

Every device call may raise ``NVML_ERROR_TIMEOUT`` (transient: the next call may succeed) with probability
``timeout_rate``; :meth:`lose` makes a GPU answer ``NVML_ERROR_GPU_IS_LOST`` from then on; ``unsupported``
(per GPU, in FakeGpu) makes one field raise ``NVML_ERROR_NOT_SUPPORTED``. Each injected error is counted, so
a test can check that every one shows in the agent's health metrics.
"""

from __future__ import annotations

import random
from tests.agent.fake_nvml import FakeGpu, FakeNvml, NVMLError


class FaultyNvml(FakeNvml):
    # pynvml's value of NVML_ERROR_TIMEOUT
    ERRORS = {**FakeNvml.ERRORS, "NVML_ERROR_TIMEOUT": 10}

    def __init__(self, gpus: list[FakeGpu], seed: int, timeout_rate: float = 0.0):
        super().__init__(gpus)
        self.rng = random.Random(seed)
        self.timeout_rate = timeout_rate
        self.armed = False  # start-up (init, enumeration) is left alone; collection is not
        self.timeouts = 0

    def lose(self, gpu: FakeGpu) -> None:
        gpu.lost = True

    def _alive(self, gpu: FakeGpu) -> FakeGpu:
        gpu = super()._alive(gpu)
        if self.armed and self.rng.random() < self.timeout_rate:
            self.timeouts += 1
            raise NVMLError(10)
        return gpu
