"""DeepSpeed's ZeRO-1/2 gradient checks, one multi-tensor operation each instead of a few per tensor.

Before each optimizer step, DeepSpeed's ZeRO-1/2 optimizer asks two things of its gradient
partition, one tensor at a time:
- is any gradient non-finite? (fp16 always, bf16 unless ``bf16.check_grad_overflow`` is false,
  fp32 never: a max, a min and two finiteness tests per tensor, 13 operations)
- what is the gradient norm? (a cast to fp64 and a norm per tensor, every precision).

At the 441M spec's 275 trained tensors that is about 4,200 operations per bf16 step, where a
plain fused AdamW step dispatches 8. On a GPU each is a kernel launch, and they run after a
host-device sync, so the device waits while the host issues them.

``fuse(engine)`` answers both with ``torch._foreach_norm``, one operation per question (on a GPU,
a few multi-tensor kernel launches; on a CPU, a loop over the tensors). It replaces two methods
on the engine's optimizer object only, where its setting is the one handled here; elsewhere
DeepSpeed's own methods run:
- ZeRO stage 1 or 2;
- no CPU offload;
- no model, expert or pipeline parallelism.

The decisions are DeepSpeed's:
- Overflow: the largest absolute value of each tensor (its inf-norm), which is non-finite exactly
  when the tensor holds a NaN or an infinity: DeepSpeed's max and min, in one.
- Norm: each tensor's L2 norm accumulates in fp32 (DeepSpeed: fp64, to fp32 before its sum over
  ranks), as ``torch.nn.utils.clip_grad_norm_`` does. Then, as in DeepSpeed, squares are summed
  over ranks and a non-finite norm is reported as -1.
"""

from __future__ import annotations

import math
from types import MethodType

import torch


def fuse(engine) -> None:
    """Swaps in the fused checks where they apply (see the module docstring)."""
    from deepspeed.runtime.pipe.engine import PipelineEngine
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    optimizer = engine.optimizer
    if (type(optimizer) is not DeepSpeedZeroOptimizer or isinstance(engine, PipelineEngine) or optimizer.cpu_offload
            or optimizer.model_parallel_group is not None or optimizer.has_moe_layers):
        return
    optimizer.has_overflow_partitioned_grads_serial = MethodType(_any_non_finite, optimizer)
    optimizer.get_grad_norm_direct = MethodType(_grad_norm, optimizer)


def _norms(gradients, order: float) -> torch.Tensor:
    """Each tensor's ``order``-norm, in fp32, as one tensor."""
    return torch.stack(torch._foreach_norm(list(gradients), order, dtype=torch.float32))


def _any_non_finite(self) -> torch.Tensor:
    """In place of DeepSpeedZeroOptimizer.has_overflow_partitioned_grads_serial: shape (1,),
    True if any gradient of the partition holds a NaN or an infinity."""
    gradients = [g for i in range(len(self.bit16_groups)) for g in self.averaged_gradients[i] if g is not None]
    if not gradients:
        return torch.zeros(1, dtype=torch.bool, device=self.device)
    return ~torch.isfinite(_norms(gradients, math.inf)).all().reshape(1)


def _grad_norm(self, gradients, params, norm_type=2):
    """In place of DeepSpeedZeroOptimizer.get_grad_norm_direct, L2 only (other norms go to
    DeepSpeed's): the norm over every rank's partition; -1 when it is not finite."""
    from deepspeed import comm as dist
    from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if float(norm_type) != 2.0:
        return DeepSpeedZeroOptimizer.get_grad_norm_direct(self, gradients, params, norm_type)
    gradients = [g for g in gradients if not getattr(g, "_zero_padding", False)]  # alignment, not gradients
    squares = (_norms(gradients, 2.0).pow(2).sum() if gradients
               else torch.zeros((), dtype=torch.float32, device=self.device))
    dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=self.dp_process_group)  # every rank, even one with none
    total = squares.sqrt()
    mask_nan_or_inf_with_val_inplace(total, device=self.device)
    return total
