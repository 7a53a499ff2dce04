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
