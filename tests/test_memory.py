"""bench/memory.py: the fake-tensor estimate of peak memory against the CPU allocator's own record of a real
run (torch.profiler's [memory] events), and the estimator's sample/train paths on the tiny model folder."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import memory  # noqa: E402

import hypernet  # noqa: E402
import model  # noqa: E402

# Bigger than the tiny preset so activations, not bookkeeping, dominate; no learned table (any size works).
CFG = dict(num_attention_heads=4, attention_head_dim=32, in_channels=8, out_channels=4, time_embed_dim=32,
           text_embed_dim=64, num_layers=1, sample_width=24, sample_height=16, sample_frames=9,
           use_rotary_positional_embeddings=True)


def build(train):
    dit = model.DiT(model.DiTConfig(**CFG)).eval().requires_grad_(False)
    v2l = hypernet.Video2LoRA(dit, hypernet.HyperNetConfig(width=32, depth=1, heads=2, iters=1))
    x, text = torch.randn(2, 3, 8, 16, 24), torch.randn(2, 30, 64)
    ref = torch.randn(1, 3, 4, 16, 24)
    if train:
        for blk in dit.transformer_blocks:  # as train.wrap with --checkpointing
            blk.forward = memory.functools.partial(torch.utils.checkpoint.checkpoint, blk.forward,
                                                   use_reentrant=False)
    return dit, v2l, x, text, ref


def step(dit, v2l, x, text, ref, train):
    with torch.set_grad_enabled(train):
        out = dit(x, text, torch.tensor([999, 10]), lora=v2l(ref))
        if train:
            out.float().square().mean().backward()


def real_peak(train):
    dit, v2l, x, text, ref = build(train)
    step(dit, v2l, x, text, ref, train)  # warm-up: lazily made state (grads) exists before we measure
    v2l.zero_grad(set_to_none=False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step(dit, v2l, x, text, ref, train)
    live = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def fake_peak(train):
    with memory.fake() as (_, tr):
        dit, v2l, x, text, ref = build(train)
        step(dit, v2l, x, text, ref, train)
        v2l.zero_grad(set_to_none=False)
        base = tr.live
        tr.reset_peak()
        step(dit, v2l, x, text, ref, train)
        return tr.peak - base


@pytest.mark.parametrize("train", [False, True], ids=["inference", "train-checkpointing"])
def test_estimate_matches_cpu_allocator(train):
    torch.manual_seed(0)
    real, est = real_peak(train), fake_peak(train)
    assert real > 1e6
    assert abs(est / real - 1) < 0.05, (est, real)


def test_estimator_runs_the_pipeline_and_train_step(tiny_model_dir):
    f32 = torch.float32
    plain = memory.sample_peaks(tiny_model_dir, dtype=f32)
    off = memory.sample_peaks(tiny_model_dir, offload=True, dtype=f32)
    assert set(plain) == {"text", "image encode", "denoise", "decode", "ref->lora"}
    assert all(off[k] < plain[k] for k in plain)  # only the running stage's model is resident
    ckpt = memory.train_peaks(tiny_model_dir, ("--checkpointing", "--cache", "-"), dtype=f32)
    full = memory.train_peaks(tiny_model_dir, ("--no-checkpointing", "--cache", "-"), dtype=f32)
    assert len(ckpt) == 2 and ckpt[1] >= ckpt[0] * 0.99  # step 2 holds AdamW's state
    assert ckpt[1] < full[1]


def test_gelu_linear_is_autograd_bit_for_bit():
    """model.gelu_linear (GELU's backward written into the matmul's gradient) = F.gelu + F.linear under autograd."""
    torch.manual_seed(0)
    for dt in (torch.float32, torch.bfloat16):
        lin = torch.nn.Linear(64, 16).to(dt).requires_grad_(False)
        h0, g = torch.randn(2, 37, 64, dtype=dt), torch.randn(2, 37, 16, dtype=dt)
        h1, h2 = h0.clone().requires_grad_(), h0.clone().requires_grad_()
        y1 = torch.nn.functional.linear(torch.nn.functional.gelu(h1, approximate="tanh"), lin.weight, lin.bias)
        y2 = model.gelu_linear(lin, h2)
        y1.backward(g)
        y2.backward(g)
        assert y2.grad_fn.name() == "_GeluLinearBackward"
        assert torch.equal(y1, y2) and torch.equal(h1.grad, h2.grad), dt


def test_checkpointing_changes_no_number():
    """train.wrap --checkpointing (DiT blocks, hypernet blocks and the whole Video2LoRA call, nested) against
    --no-checkpointing: the same loss and every gradient bit for bit."""
    import copy
    import contextlib
    import train
    torch.manual_seed(0)
    base = model.DiT(model.DiTConfig(**model.DIT_PRESETS["tiny"])).eval().requires_grad_(False)
    v0 = hypernet.Video2LoRA(base, "tiny", a=8, b=4)
    with torch.no_grad():  # B_pred != 0, so every parameter gets a gradient
        v0.hypernet.head_B.weight.normal_(std=0.1)
    batch = (torch.randn(2, 3, 8, 8, 12), torch.randn(2, 226, 32), torch.tensor([999, 10]), None,
             torch.randn(2, 3, 4, 8, 12), torch.randn(2, 3, 4, 8, 12))
    out = []
    for flag in ("--checkpointing", "--no-checkpointing"):
        dit, v2l = copy.deepcopy(base), copy.deepcopy(v0)
        train.wrap(dit, memory.train_args("-", flag), torch.float32, v2l)
        loss = train.step_loss(v2l, dit, batch, contextlib.nullcontext())
        loss.backward()
        out.append((loss.detach(), {n: p.grad for n, p in v2l.named_parameters()}))
    (l1, g1), (l2, g2) = out
    assert torch.equal(l1, l2)
    assert all(g1[k].abs().sum() > 0 and torch.equal(g1[k], g2[k]) for k in g1)
