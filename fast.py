"""Faster sampling for sample.py: regional torch.compile of the DiT blocks, a first-block residual step cache, and
one video on many processes (CFG parallel x Ulysses sequence parallel) under torchrun.

    python sample.py ref.mp4 img.png --compile --cache-threshold          # one GPU
    torchrun --nproc_per_node 8 sample.py ref.mp4 img.png --compile       # 8 GPUs (gloo on CPU), rank 0 writes

Layout: DiT latents B F C H W; inside the blocks video tokens [B, N, D] in (f, h, w) order after the L text tokens.
Checked by tests/test_fast.py (compiled = eager, no recompiles; N processes = one process) and bench/fast_bench.py.
"""
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

# sample.py --cache-threshold alone: the smallest threshold in bench/FAST.md's table that skips >= 1/3 of the DiT
# calls (52 % on the toy model) while moving the effect measures far less than a change of seed (issue 16's rule).
CACHE_THRESHOLD = 0.1


# ----------------------------------------------------------------------------------------------------------------
# Compile and attention backend


def compile_blocks(dit, **kw):
    """Regional compilation (as diffusers' compile_repeated_blocks): each transformer block compiled in place,
    so module names and the state dict stay as they are. The blocks run the same code with the same guards
    (their LoRA comes keyed by short names), so one graph serves all of them; the LoRA values, the prompt, the
    seed and the timestep are tensor inputs and recompile nothing. Compile time is that of one block."""
    for b in dit.transformer_blocks:
        b.compile(**kw)
    return dit


def attention_backends(device):
    """On CUDA, SDPA tries cuDNN attention first (437 TFLOP/s vs flash's 326 on an H100 at 5B-I2V size, issue 16),
    then flash, memory-efficient, math: each one falls through when it cannot take the inputs."""
    if torch.device(device).type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


# ----------------------------------------------------------------------------------------------------------------
# Step cache


class StepCache:
    """First-block residual cache (ParaAttention's FBCache, diffusers' FirstBlockCache): block 0 always runs; when
    its residual (output - input, video tokens) differs from the one of the last fully computed step by less than
    `threshold` in relative L1, the other blocks are skipped and their residual from that step is added instead.
    The reference residual moves only on computed steps, so slow drift still triggers a full step. One decision
    per DiT call for the whole CFG batch; under parallel sampling the sums are reduced over all ranks first, so
    every rank decides the same as one process would."""

    def __init__(self, threshold):
        self.threshold, self.prev, self.rest = threshold, None, None
        self.calls = self.skipped = 0

    def hit(self, r, group=None):
        self.calls += 1
        ok = False
        if self.prev is not None:
            d = torch.stack([(r - self.prev).abs().sum(dtype=torch.float64), self.prev.abs().sum(dtype=torch.float64)])
            if group is not None:
                dist.all_reduce(d, group=group)
            ok = bool(d[0] < self.threshold * d[1])
        if not ok:
            self.prev = r
        self.skipped += ok
        return ok


def run_blocks(dit, v, c, temb, rope, loras, attend=None, cache=None, group=None):
    """The transformer blocks -> video tokens; with a cache, block 0 decides whether the others run."""
    blocks = list(zip(dit.transformer_blocks, loras))
    if cache is not None:
        v0 = v
        v, c = blocks[0][0](v, c, temb, rope, blocks[0][1], attend)
        if cache.hit(v - v0, group):
            return v + cache.rest
        v1, blocks = v, blocks[1:]
    for block, lo in blocks:
        v, c = block(v, c, temb, rope, lo, attend)
    if cache is not None:
        cache.rest = v - v1
    return v


# ----------------------------------------------------------------------------------------------------------------
# Parallel sampling


class Parallel:
    """Ranks of a torchrun job laid out for one video: with CFG (guidance > 1 and a prompt) and an even world, ranks
    [0, W/2) run the unconditional branch and [W/2, W) the conditional one, each half sequence-parallel over
    its W/2 ranks; otherwise all W ranks are sequence-parallel. new_group is collective: every rank makes
    both layouts' groups at start, in the same order."""

    def __init__(self):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        w = self.world
        self.halves = [dist.new_group(list(r)) for r in (range(w // 2), range(w // 2, w))] if w % 2 == 0 else None

    def layout(self, branches):
        """-> (my branch or None, the sequence-parallel group, its size, my rank in it)."""
        if branches == 2 and self.halves is not None:
            sp, b = self.world // 2, self.rank // (self.world // 2)
            return b, self.halves[b], sp, self.rank % sp
        return None, dist.group.WORLD, self.world, self.rank


def init_parallel():
    """Under torchrun (WORLD_SIZE > 1): the process group (NCCL on CUDA, else gloo) and this rank's device.
    -> (Parallel | None, device | None)."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return None, None
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Parallel(), device


def split_sizes(n, p):
    """n tokens over p ranks, contiguous, the first n % p ranks one more (5B-I2V: 17550 video tokens)."""
    return [n // p + (r < n % p) for r in range(p)]


def ulysses_attention(q, k, v, L, group, sizes):
    """Joint attention with the video tokens split over the ranks of `group` (DeepSpeed-Ulysses). q, k, v are
    [B, L + n_i, H, hd]: all L text tokens (every rank holds them) then this rank's n_i = sizes[i] video tokens.
    An all-to-all turns the video part into all tokens x H/P heads; the text part needs no traffic (this rank
    takes its own heads), so each rank attends over the full joint sequence for its heads: exact. Back the same
    way; the text output's heads are all-gathered (each rank keeps the whole text stream, as in one process)."""
    P, i = len(sizes), dist.get_rank(group)
    B, _, H, hd = q.shape
    h = H // P

    def scatter_heads(t):  # [B, L+n_i, H, hd] -> [B, L+N, h, hd]
        send = t[:, L:].reshape(B, sizes[i], P, h, hd).permute(2, 1, 0, 3, 4)  # [P(dest), n_i, B, h, hd]
        got = funcol.all_to_all_single(send.reshape(P * sizes[i], B, h, hd).contiguous(), sizes, [sizes[i]] * P,
                                       group)  # [N, B, h, hd], video tokens in rank order
        return torch.cat([t[:, :L, i * h:(i + 1) * h], funcol.wait_tensor(got).permute(1, 0, 2, 3)], dim=1)

    o = torch.nn.functional.scaled_dot_product_attention(*(scatter_heads(t).transpose(1, 2) for t in (q, k, v)))
    o = o.transpose(1, 2)  # [B, L+N, h, hd]
    back = funcol.all_to_all_single(o[:, L:].permute(1, 0, 2, 3).contiguous(), [sizes[i]] * P, sizes, group)
    ov = funcol.wait_tensor(back).reshape(P, sizes[i], B, h, hd).permute(2, 1, 0, 3, 4).reshape(B, sizes[i], H, hd)
    ot = funcol.wait_tensor(funcol.all_gather_single(o[:, :L].contiguous(), 0, group))  # [P*B, L, h, hd]
    ot = ot.reshape(P, B, L, h, hd).permute(1, 2, 0, 3, 4).reshape(B, L, H, hd)
    return torch.cat([ot, ov], dim=1)


def dit_call(dit, x, text, t, ofs=None, lora=None, cache=None, par=None):
    """= dit(x, text, t, ofs, lora) for the whole batch (the CFG pair [uncond, cond]), on every rank alike; with
    a StepCache, blocks 1.. may be skipped; with a Parallel, each rank computes its CFG branch and its share of
    the video tokens, and the patches are all-gathered before unpatchifying."""
    if par is None:
        v, c, temb, rope = dit.embed(x, text, t, ofs, lora)
        return dit.unpatchify(dit.head(run_blocks(dit, v, c, temb, rope, dit.block_loras(lora), cache=cache),
                                       temb), x.shape)
    B = x.shape[0]
    b, group, P, i = par.layout(B)
    xb, tb, lb = x, text, lora
    if b is not None:  # one branch; a per-sample LoRA (batch 2) gives this branch its own factors
        t = torch.as_tensor(t, device=x.device).reshape(-1)
        xb, tb, t = x[b:b + 1], text[b:b + 1], t[b:b + 1] if t.numel() > 1 else t
        pick = lambda f: f[b:b + 1] if f.shape[0] > 1 else f  # noqa: E731
        lb = {k: None if ab is None else tuple(pick(f) for f in ab) for k, ab in lora.items()} if lora else lora
    if dit.config.num_attention_heads % P:
        raise ValueError(f"sequence parallel over {P} ranks needs a head count divisible by {P}, this DiT has "
                         f"{dit.config.num_attention_heads}: use another number of processes")
    v, c, temb, rope = dit.embed(xb, tb, t, ofs, lb)
    sizes = split_sizes(v.shape[1], P)
    lo, hi = sum(sizes[:i]), sum(sizes[:i + 1])
    attend = None
    if P > 1:
        v, rope = v[:, lo:hi], rope and tuple(r[lo:hi] for r in rope)
        attend = lambda q, k, vv, L: ulysses_attention(q, k, vv, L, group, sizes)  # noqa: E731
    v = dit.head(run_blocks(dit, v, c, temb, rope, dit.block_loras(lb), attend, cache, dist.group.WORLD), temb)
    # every rank's patches, padded to the largest share; rank r = branch * P + position in its branch
    out = v.new_zeros(v.shape[0], max(sizes), v.shape[2])
    out[:, :hi - lo] = v
    got = [torch.empty_like(out) for _ in range(par.world)]
    dist.all_gather(got, out.contiguous())
    n_br = 2 if b is not None else 1
    full = torch.cat([torch.cat([got[br * P + r][:, :sizes[r]] for r in range(P)], dim=1) for br in range(n_br)])
    return dit.unpatchify(full, x.shape)
