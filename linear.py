"""The DiT's linear layers: lora_linear (the frozen layer plus a per-sample LoRA), float8 weight storage
(train.py / sample.py --fp8-storage) cast to bf16 one layer at a time, and GELU -> linear with a backward that
reuses one buffer. Without a LoRA and float8 all of them are F.linear's bits. Checked by tests/test_model.py and
tests/test_memory.py (error of float8 against bf16; bit equality with autograd)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

def lora_linear(layer, x, ab=None):
    """layer(x), plus x[b] @ down[b] @ up[b] when ab = (down [B|1, d_in, r], up [B|1, r, d_out]).
    With ab None this is exactly F.linear (the base model's bits)."""
    y = frozen_linear(layer, x)
    if ab is None:
        return y
    down, up = ab[0].to(x.dtype), ab[1].to(x.dtype)
    if x.dim() == 2:
        return lora_linear(layer, x[:, None], ab)[:, 0]
    xd = torch.matmul(x, down)  # [B, N, r]; broadcasts a batch-1 down over the batch
    return y.baddbmm_(xd, up.expand(xd.shape[0], -1, -1))  # in place: F.linear's backward does not need y


FP8 = torch.float8_e4m3fn


@torch.no_grad()
def store_fp8(dit):
    """--fp8-storage: the weight matrix of every Linear inside the DiT's blocks (5.55 of its 5.57 B parameters at
    5B) kept as float8_e4m3fn, 1 byte instead of 2; lora_linear casts each back to the compute dtype just before
    its matmul, one layer at a time, as diffusers' layerwise casting does (diffusers/hooks/layerwise_casting.py,
    which also leaves norms, patch_embed and proj_out in the compute dtype; here the biases stay too). One
    difference: each matrix is stored times a power of two, 2^k with k = floor(log2(448 / max|w|)), so its values
    use e4m3's whole range instead of its subnormals (weights ~0.02 sit near 2^-6, e4m3's smallest normal); the
    cast back multiplies by 2^-k, exact in bf16. The error against bf16 weights: tests/test_memory.py."""
    for blk in dit.transformer_blocks:
        for m in blk.modules():
            if isinstance(m, nn.Linear) and m.weight.dtype != FP8:
                w = m.weight
                k = torch.floor(torch.log2(torch.finfo(FP8).max / w.abs().amax().float().clamp_min(2.0 ** -100)))
                m.weight = nn.Parameter((w.float() * torch.exp2(k)).to(FP8), requires_grad=False)
                m.register_buffer("fp8_scale", torch.exp2(-k), persistent=False)  # not in the state dict
    return dit


def compute_weight(layer, dtype):
    """layer.weight as it enters the matmul: itself, or (--fp8-storage) a fresh copy in `dtype`."""
    return _unfp8(layer.weight, getattr(layer, "fp8_scale", None), dtype)


def _unfp8(w, scale, dtype):
    return w.to(dtype).mul_(scale) if w.dtype == FP8 else w


class _Fp8Linear(torch.autograd.Function):
    """F.linear(x, compute_weight(layer), bias) for a frozen float8 layer in training: autograd would keep each
    layer's compute-dtype copy of the weight for backward (the whole model again without --checkpointing); this
    keeps the float8 one and casts it again in backward, for the same matmul as F.linear's backward (same bits)."""

    @staticmethod
    def forward(ctx, x, w8, scale, bias):  # x 2-D: the output is then not a view (lora_linear adds to it in place)
        ctx.save_for_backward(w8, scale)
        ctx.dtype = x.dtype
        return F.linear(x, _unfp8(w8, scale, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        w8, scale = ctx.saved_tensors
        return grad.mm(_unfp8(w8, scale, ctx.dtype)), None, None, None


def frozen_linear(layer, x):
    """F.linear(x, layer.weight, layer.bias) for a frozen layer, its weight possibly stored in float8."""
    if layer.weight.dtype != FP8:
        return F.linear(x, layer.weight, layer.bias)
    if x.requires_grad and torch.is_grad_enabled() and x.is_contiguous() and not torch.compiler.is_compiling():
        # as F.linear runs a contiguous input: flattened to 2-D, addmm, viewed back
        y = _Fp8Linear.apply(x.reshape(-1, x.shape[-1]), layer.weight, layer.fp8_scale, layer.bias)
        return y.view(*x.shape[:-1], y.shape[-1])
    return F.linear(x, compute_weight(layer, x.dtype), layer.bias)


class _GeluLinear(torch.autograd.Function):
    """F.linear(GELU_tanh(h), weight, bias) for a frozen layer, in training. Autograd saves h for GELU's backward,
    and its backward then holds two [B, S, 4D] gradients at once (the matmul's and GELU's, 0.41 GiB each at 5B);
    here GELU's backward writes into the matmul's gradient (aten gelu_backward's out= form, elementwise), same
    kernels, same bits. Only h's gradient is returned: the layer is frozen (no LoRA on it)."""

    @staticmethod
    def forward(ctx, h, weight, scale, bias):  # weight: as stored (float8 with --fp8-storage, see _Fp8Linear)
        ctx.save_for_backward(h, weight, scale)
        return F.linear(F.gelu(h, approximate="tanh"), _unfp8(weight, scale, h.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        h, weight, scale = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).mm(_unfp8(weight, scale, h.dtype)).view(h.shape)  # = addmm's backward
        return torch.ops.aten.gelu_backward.grad_input(g, h, approximate="tanh", grad_input=g), None, None, None


def gelu_linear(layer, h, ab=None):
    """lora_linear(layer, GELU_tanh(h), ab): in place at inference; through _GeluLinear in eager training when
    the layer has no LoRA and is frozen."""
    if not h.requires_grad:
        return lora_linear(layer, torch.ops.aten.gelu_(h, approximate="tanh"), ab)
    if ab is None and not layer.weight.requires_grad and not torch.compiler.is_compiling():
        return _GeluLinear.apply(h, layer.weight, getattr(layer, "fp8_scale", None), layer.bias)
    return lora_linear(layer, F.gelu(h, approximate="tanh"), ab)
