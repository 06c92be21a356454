from __future__ import annotations

import pytest

from phaselens.gpus import UnknownGpuError, find_gpu_spec, gpu_spec
from phaselens.phase import Phase


def test_known_and_unknown_gpus() -> None:
    assert gpu_spec("NVIDIA H100 80GB HBM3").peak_dram_bytes_per_s == 3.35e12
    assert gpu_spec("nvidia h200").name == "NVIDIA H200"
    assert find_gpu_spec("Voodoo 5") is None
    with pytest.raises(UnknownGpuError, match="Voodoo 5"):
        gpu_spec("Voodoo 5")


def test_phase_parse_names_bad_value() -> None:
    assert Phase.parse("PREFILL") is Phase.PREFILL
    with pytest.raises(ValueError, match="'warmup'"):
        Phase.parse("warmup")
