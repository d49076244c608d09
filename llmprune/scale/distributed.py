"""Data-parallel calibration on torch.distributed (gloo on CPUs, NCCL on GPUs), as torchrun launches it.

Every rank holds the model (or streams it) and a contiguous share of the calibration windows. For each
layer, every rank runs its share through it; each statistic's sums are added over the ranks with
all_reduce (statistics.py: a statistic is nothing but sums), rank 0 solves, and the pruned weights are
broadcast so that every rank propagates through the same layer. A structured prune broadcasts rank 0's choice of
units instead, and every rank cuts them out alike (from the same summed statistics). Only rank 0 writes the output.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta

import torch

from ..errors import LLMPruneError
from ..pruning.statistics import reduce_statistic


class DataParallel:
    """The hooks the runners call under torch.distributed: reduce(statistic), broadcast(modules); and for a
    structured prune sum(tensor) and decide(tensor)."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @classmethod
    def from_environment(cls, device: torch.device, timeout_s: float = 600.0) -> DataParallel | None:
        """None unless launched by torchrun / accelerate launch (WORLD_SIZE > 1); joins the process group."""
        import torch.distributed as dist

        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
        return cls()

    @staticmethod
    def device(requested: str | None) -> str | None:
        """On GPUs each rank takes the one torchrun assigned it (LOCAL_RANK)."""
        if torch.cuda.is_available() and requested in (None, "cuda"):
            return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        return requested

    def share(self, calibration: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of the windows (contiguous: with shares that are whole batches the
        sums equal a single process's bit for bit)."""
        if self.world > len(calibration):
            raise LLMPruneError(f"{self.world} ranks share {len(calibration)} calibration windows: use at most "
                                f"{len(calibration)} processes or raise --nsamples")
        return calibration.tensor_split(self.world)[self.rank]

    def reduce(self, statistic) -> None:
        reduce_statistic(statistic, lambda tensor: self._collective(self.dist.all_reduce, tensor))

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor summed over the ranks, in place."""
        self._collective(self.dist.all_reduce, tensor)
        return tensor

    def decide(self, decision: torch.Tensor) -> torch.Tensor:
        """Rank 0's `decision` (e.g. the units a structured prune keeps) on every rank, in place."""
        self._collective(lambda t: self.dist.broadcast(t, src=0), decision)
        return decision

    def broadcast(self, modules) -> None:
        for module in modules:
            self._collective(lambda t: self.dist.broadcast(t, src=0), module.weight.data)

    def barrier(self) -> None:
        self._collective(lambda _: self.dist.barrier(), None)

    def _collective(self, fn, tensor) -> None:
        try:
            fn(tensor)
        except (RuntimeError, ValueError) as err:  # gloo and NCCL report a lost peer as RuntimeError subclasses
            lines = str(err).strip().splitlines() or [type(err).__name__]
            detail = re.sub(r"^\[[^\]]*\]\s*", "", lines[0]).split(". ")[0]  # gloo prefixes its source line
            raise LLMPruneError(f"rank {self.rank}: another rank stopped answering ({detail}); the run is "
                                f"abandoned and no output was written") from None
