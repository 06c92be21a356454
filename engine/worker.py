"""One device's share of the engine: the model, the KV cache tensor and the runner.

The cache is sized here: on a GPU from the memory left after the weights and a measured activation peak
(``gpu_memory_utilization`` of the card in all, as vLLM does), on the CPU from ``num_kv_blocks``. On CUDA
the worker then captures the decode CUDA graphs (engine/cuda_graphs.py) for batches up to ``max_num_seqs``.
"""

from __future__ import annotations

import logging
import os

import torch

from phaselens.engine.loader import ModelSource
from phaselens.engine.model import LlamaModel, default_dtype
from phaselens.engine.model_runner import ModelRunner
from phaselens.engine.sampling_params import SamplingParams
from phaselens.engine.scheduler import ScheduledSeq, SchedulerOutput
from phaselens.engine.sequence import Sequence
from phaselens.kernels import uses_triton

log = logging.getLogger(__name__)

#: CPU default: this much memory for the KV cache when ``num_kv_blocks`` is not given
CPU_KV_BUDGET_BYTES = 1 << 30
#: CPU models smaller than this run on one torch thread unless ``cpu_threads`` says otherwise: their ops are
#: too small to split, and on a shared 2-core machine the default 2 threads made each `tiny` decode step
#: 51.6 ms instead of 0.41 ms (OpenMP barriers waiting on a thread the OS had preempted; measured here).
SMALL_MODEL_PARAMS = 100_000_000


class Worker:
    """Owns the device, the model, the KV cache and the model runner."""

    def __init__(self, source: ModelSource, device: str | torch.device, *, block_size: int,
                 num_kv_blocks: int | None, gpu_memory_utilization: float, max_num_batched_tokens: int,
                 max_num_seqs: int, max_model_len: int, seed: int, cpu_threads: int | None = None,
                 cuda_graphs: bool = True) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device {device!r}: CUDA is not available on this machine")
            if (self.device.index or 0) >= torch.cuda.device_count():
                raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
            torch.cuda.set_device(self.device)
            # SDPA's cuDNN backend builds an execution plan per new shape: a generate run with growing
            # contexts took 1.1 s for its first step after warm-up (bench/RESULTS.md, 03:10); the flash and
            # memory-efficient backends need no plan
            torch.backends.cuda.enable_cudnn_sdp(False)
        elif self.device.type != "cpu":
            raise ValueError(f"device {device!r}: expected 'cpu' or 'cuda:N'")
        else:
            self._set_cpu_threads(cpu_threads, source.config.num_parameters())
        self.dtype = default_dtype(self.device)
        self.dtype_bytes = torch.finfo(self.dtype).bits // 8
        self.model_config = source.config
        self.block_size = block_size
        self._check_weights_fit()
        self.model: LlamaModel = source.build(self.device, self.dtype, seed, max_model_len)
        self.block_bytes = block_size * self.model_config.kv_bytes_per_token(self.dtype_bytes)
        self.num_kv_blocks = self._size_cache(num_kv_blocks, gpu_memory_utilization, max_num_batched_tokens,
                                              max_num_seqs, max_model_len)
        c = self.model_config
        # zeroed: padded slots are masked but still multiplied, and 0 * NaN of stale garbage is NaN
        self.kv_cache = torch.zeros(c.num_layers, 2, self.num_kv_blocks, block_size, c.num_kv_heads,
                                    c.head_dim, device=self.device, dtype=self.dtype)
        self.runner = ModelRunner(self.model, self.kv_cache, block_size)
        if self.device.type == "cuda":
            self._warm_up(min(256, max_model_len - 1))
            if cuda_graphs and uses_triton(self.device):
                max_blocks = min(-(-max_model_len // block_size), self.num_kv_blocks)
                self.runner.capture_decode_graphs(max_num_seqs, max_blocks)
            elif cuda_graphs:
                log.info("decode CUDA graphs off: the torch reference attention cannot be captured")
        log.info("worker on %s: %s in %s, %d KV blocks of %d tokens (%.2f GiB)", self.device, c.name,
                 self.dtype, self.num_kv_blocks, block_size, self.num_kv_blocks * self.block_bytes / 2**30)

    def _check_weights_fit(self) -> None:
        """ValueError, before allocating, when the weights alone exceed the device's free memory (an
        out-of-memory kill halfway through building the model explains nothing)."""
        need = self.model_config.num_parameters() * self.dtype_bytes
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
        else:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if need > free:
            raise ValueError(f"model {self.model_config.name!r} needs {need / 2**30:.1f} GiB of weights in "
                             f"{self.dtype} but {self.device} has {free / 2**30:.1f} GiB free")

    @staticmethod
    def _set_cpu_threads(cpu_threads: int | None, num_params: int) -> None:
        """Torch intra-op threads of this process (the worker owns it): as given, or 1 for small models."""
        if cpu_threads is not None:
            if isinstance(cpu_threads, bool) or not isinstance(cpu_threads, int) or cpu_threads < 1:
                raise ValueError(f"cpu_threads must be an integer >= 1, got {cpu_threads!r}")
            torch.set_num_threads(cpu_threads)
        elif num_params < SMALL_MODEL_PARAMS and torch.get_num_threads() != 1:
            log.info("small model (%d parameters) on CPU: 1 torch thread (was %d); set cpu_threads to change",
                     num_params, torch.get_num_threads())
            torch.set_num_threads(1)

    def _size_cache(self, num_kv_blocks: int | None, utilization: float, max_batched: int, max_seqs: int,
                    max_model_len: int) -> int:
        if num_kv_blocks is not None:
            if num_kv_blocks < 1:
                raise ValueError(f"num_kv_blocks must be >= 1, got {num_kv_blocks}")
            return num_kv_blocks
        if self.device.type == "cpu":
            useful = max_seqs * -(-max_model_len // self.block_size)
            return max(1, min(useful, CPU_KV_BUDGET_BYTES // self.block_bytes))
        if not 0.0 < utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
        peak = self._activation_peak(min(max_batched, max_model_len))
        free, total = torch.cuda.mem_get_info(self.device)
        used = total - free
        avail = total * utilization - used - peak
        blocks = int(avail // self.block_bytes)
        if blocks < 1:
            raise ValueError(f"gpu_memory_utilization={utilization}: no memory left for the KV cache "
                             f"({used / 2**30:.1f} GiB used of {total / 2**30:.1f} GiB, activations "
                             f"{peak / 2**30:.1f} GiB)")
        return blocks

    def _warm_up(self, prompt_len: int) -> None:
        """A paged prefill, a mixed step (one decode next to a new prompt's chunk) and a decode step, so the
        first requests do not pay for lazy library initialisation (cuBLAS handles, attention kernels' set-up:
        about 0.9 s measured on an H100) nor for compiling the mixed step's kernels."""
        blocks = -(-(prompt_len + 1) // self.block_size)
        if prompt_len < 2 or self.num_kv_blocks < 2 * blocks:
            return
        first = Sequence("warm-up-0", [0] * (prompt_len + 1), SamplingParams(max_tokens=1), 0)
        second = Sequence("warm-up-1", [0] * prompt_len, SamplingParams(max_tokens=1), 0)
        first.block_table = list(range(blocks))
        second.block_table = list(range(blocks, 2 * blocks))
        # an odd-length chunk after the decode: the mixed step's metadata land at every offset parity
        steps = ([ScheduledSeq(first, prompt_len, 0, True)],
                 [ScheduledSeq(first, 1, prompt_len, False), ScheduledSeq(second, prompt_len - 1, 0, True)],
                 [ScheduledSeq(first, 1, prompt_len, False)])
        for scheduled in steps:
            out = SchedulerOutput(scheduled=scheduled)
            self.runner.run(out, self.runner.prepare(out)).tolist()
        # the blocks it wrote hold finite values and belong to nobody: the block manager starts them free
        torch.cuda.synchronize(self.device)

    def _activation_peak(self, num_tokens: int) -> int:
        """Bytes a forward of ``num_tokens`` tokens needs beyond the weights (measured once, dense path)."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        self.model.forward_dense(ids)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        torch.cuda.empty_cache()
        return peak
