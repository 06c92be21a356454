"""A decode engine takes hand-offs only while its batch has room (``max_num_seqs``)."""

from __future__ import annotations

from phaselens.engine.config import BYTE_BOS_ID
from phaselens.engine.llm_engine import EngineConfig, LLMEngine
from phaselens.phase import Role
from phaselens.engine.sampling_params import SamplingParams


def _drain(engine: LLMEngine) -> None:
    while engine.has_unfinished_requests():
        engine.step()


def test_hand_offs_wait_for_a_batch_slot_and_all_finish() -> None:
    prefill = LLMEngine(EngineConfig(model="tiny", engine_id="p0", role=Role.PREFILL, shim_enabled=False))
    decode = LLMEngine(EngineConfig(model="tiny", engine_id="d0", role=Role.DECODE, max_num_seqs=2,
                                    shim_enabled=False))
    try:
        source = prefill.kv_handle()
        decode.set_role(Role.DECODE, (source,))
        params = SamplingParams(max_tokens=6, ignore_eos=True)
        for i in range(5):
            prefill.add_request(f"r{i}", [BYTE_BOS_ID] + [40 + i] * 20, params, handoff=True)
        _drain(prefill)
        handoffs = prefill.take_handoffs()
        assert len(handoffs) == 5
        waiting, taken, refused = list(handoffs), 0, 0
        while waiting or decode.has_unfinished_requests():
            while waiting:
                if decode.add_transferred(waiting[0], source) is None:
                    # refused only for want of a slot: the batch is at its cap, nothing changed
                    assert not decode.can_attach()
                    assert len(decode.scheduler.running) == 2
                    refused += 1
                    break
                prefill.release(waiting.pop(0).request_id)
                taken += 1
            assert len(decode.scheduler.running) <= 2
            if decode.has_unfinished_requests():
                decode.step()
        assert taken == 5 and refused > 0
        assert decode.block_manager.num_free_blocks == decode.block_manager.num_blocks
    finally:
        prefill.close()
        decode.close()
