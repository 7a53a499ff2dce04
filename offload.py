"""Host memory standing in for device memory: train.py --offload-activations (the checkpointed DiT blocks' inputs
wait in host memory between forward and recompute) and sample.py --offload-blocks (the DiT's and T5's blocks live
in host memory and stream to the device one block ahead of use). Both move bytes only: the numbers are unchanged
(tests/test_memory.py, tests/test_sample.py). On a CPU every copy is a no-op. bench/memory.py models both.
"""
import functools
from contextlib import nullcontext

import torch
import torch.utils.checkpoint


def to_host(t):
    """t in host memory. From CUDA a non_blocking copy lands in pinned memory (aten's _to_copy pins the destination
    of an asynchronous copy to the CPU), so it overlaps nothing but blocks nothing either; on the CPU, t itself."""
    return t.to("cpu", non_blocking=True)


def to_device(t, device):
    return t.to(device, non_blocking=True)


def checkpoint(fn, x, c, *rest, on_host=False, **kw):
    """torch.utils.checkpoint.checkpoint(fn, x, c, *rest) (non-reentrant) for a DiT block; on_host: the copies of
    x and c (video and text tokens) that it keeps for the recompute wait in host memory. Checkpoint keeps its
    inputs as saved tensors made before its own saved-tensor hooks take over (torch/utils/checkpoint.py,
    _CheckpointFrame.save_inputs), so hooks opened around it see exactly those: x and c are packed to the host
    (the device copies die with the forward's last use) and unpacked to the device when backward recomputes the
    block. Gradients never leave the device (this is not the input of the graph, only its saved copy)."""
    if not on_host:
        return torch.utils.checkpoint.checkpoint(fn, x, c, *rest, use_reentrant=False, **kw)

    big = (id(x), id(c))  # not x and c themselves: the hooks live as long as the saved tensors, and so would they

    def pack(t):
        return (t.device, to_host(t.detach())) if id(t) in big else t

    def unpack(p):
        return to_device(p[1], p[0]) if isinstance(p, tuple) else p
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return torch.utils.checkpoint.checkpoint(fn, x, c, *rest, use_reentrant=False, **kw)
