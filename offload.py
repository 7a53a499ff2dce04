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
    """t in host memory. From CUDA, a non_blocking copy lands in pinned memory (aten's _to_copy pins the destination
    of an asynchronous copy to the CPU): the host does not wait for it, and the GPU runs it in stream order between
    the kernels around it. On the CPU, t itself."""
    return t.to("cpu", non_blocking=True)


def to_device(t, device):
    return t.to(device, non_blocking=True)


def checkpoint(fn, x, c, *rest, on_host=False, **kw):
    """torch.utils.checkpoint.checkpoint(fn, x, c, *rest) (non-reentrant) for a DiT block; on_host: the copies of
    x and c (video and text tokens) that it keeps for the recompute wait in host memory. Checkpoint keeps its
    inputs as saved tensors made before its own saved-tensor hooks take over (torch/utils/checkpoint.py,
    _CheckpointFrame.save_inputs), so hooks opened around it see exactly those: x and c are packed to the host
    (the device tensors die with the forward's last use of them) and unpacked to the device when backward
    recomputes the block. Only that saved copy moves: the graph and the gradients stay on the device."""
    if not on_host:
        return torch.utils.checkpoint.checkpoint(fn, x, c, *rest, use_reentrant=False, **kw)

    big = (id(x), id(c))  # not x and c themselves: the hooks live as long as the saved tensors, and so would they

    def pack(t):
        return (t.device, to_host(t.detach())) if id(t) in big else t

    def unpack(p):
        return to_device(p[1], p[0]) if isinstance(p, tuple) else p
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return torch.utils.checkpoint.checkpoint(fn, x, c, *rest, use_reentrant=False, **kw)


def _tensors(module):
    return [*module.parameters(), *module.buffers()]


class BlockStream:
    """sample.py --offload-blocks: the blocks of a ModuleList run in order stay in host memory (pinned on CUDA).
    Before block i runs, block i+1 starts copying to the device on a side stream, the compute stream waits for
    block i's copy (an event), and block i leaves the device when it returns: two blocks on the device at a time,
    each copy hidden behind the block before it. The weights keep their bits, so the output is the model's on the
    device. diffusers' group offloading with use_stream does this too (diffusers/hooks/group_offloading.py); here
    one block per group, in forward hooks so every caller of the blocks (fast.run_blocks, T5Encoder) is served.
    keep: submodules of the blocks used outside their block's call (move() places them with the rest)."""

    def __init__(self, blocks, device, keep=()):
        self.device, kept = torch.device(device), {id(t) for m in keep for t in _tensors(m)}
        self.side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.tensors = [[t for t in _tensors(b) if id(t) not in kept] for b in blocks]
        self.ids = {id(t) for ts in self.tensors for t in ts}
        self.host, self.ready = [], {}  # host copies per block; block -> the event after its copy (None on CPU)
        for i, b in enumerate(blocks):
            host = [t.data.to("cpu") for t in self.tensors[i]]
            self.host.append([h.pin_memory() for h in host] if self.side else host)
            self.drop(i)  # the blocks' tensors are now the host copies
            b.register_forward_pre_hook(functools.partial(self._before, i))
            b.register_forward_hook(functools.partial(self._after, i))
        blocks.block_stream = self  # found by move()

    def fetch(self, i):
        """Start block i's copy to the device (side stream): nothing if it is there already or past the end."""
        if i in self.ready or i >= len(self.tensors):
            return
        with torch.cuda.stream(self.side) if self.side else nullcontext():
            for t, h in zip(self.tensors[i], self.host[i]):
                t.data = h.to(self.device, non_blocking=True)
            self.ready[i] = self.side.record_event() if self.side else None

    def drop(self, i):
        self.ready.pop(i, None)
        for t, h in zip(self.tensors[i], self.host[i]):
            t.data = h

    @torch.compiler.disable  # under --compile: runs eagerly between the blocks' graphs
    def _before(self, i, block, args):
        self.fetch(i)  # the first block (or one run out of turn)
        if self.side:
            now = torch.cuda.current_stream(self.device)
            now.wait_event(self.ready[i])
            for t in self.tensors[i]:  # made on the side stream, read on this one: reused only after these reads
                t.data.record_stream(now)
        self.fetch(i + 1)

    @torch.compiler.disable
    def _after(self, i, block, args, out):
        self.drop(i)


def move(module, device):
    """module.to(device) for one stage of sample.Pipeline, except the tensors BlockStreams serve: they stay in host
    memory (any block left on the device, e.g. one prefetched for a block the step cache skipped, goes back)."""
    streamed = set()
    for m in module.modules():
        if (s := getattr(m, "block_stream", None)) is not None:
            for i in list(s.ready):
                s.drop(i)
            streamed |= s.ids
    for m in module.modules():  # what module.to does (.data keeps each Parameter object), minus streamed tensors
        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]:
            if id(t) not in streamed:
                t.data = t.data.to(device)
    return module


def stream_blocks(dit, t5, device):
    """BlockStreams over the DiT's and T5's blocks (T5's relative position table, read by T5Encoder before its
    first block runs, stays with the rest of T5)."""
    rel = t5.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
    return [BlockStream(dit.transformer_blocks, device), BlockStream(t5.encoder.block, device, keep=[rel])]
