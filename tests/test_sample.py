"""sample.py: schedulers vs diffusers, the I2V pipeline vs diffusers' on the tiny folder, the CLI."""
import pytest
import torch

import sample
from conftest import DDIM_CONFIG


def _trajectory(kind, shift, n, ours, dtype=torch.float32):
    """Run n steps with fixed random model outputs; ours=True uses sample.py, else diffusers."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler
    cfg = dict(DDIM_CONFIG, snr_shift_scale=shift)
    vs = torch.randn(n, 2, 3, 4, 5, generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(2)).to(dtype)
    g = torch.Generator().manual_seed(3)
    old, out = None, []
    if ours:
        A, ts = sample.alphas_cumprod(cfg), sample.trailing_timesteps(n)
        for i, t in enumerate(ts):
            if kind == "ddim":
                x = sample.ddim_step(A, vs[i], x, t, t - 1000 // n)
            else:
                x, old = sample.dpm_step(A, vs[i], x, t, t - 1000 // n, ts[i - 1] if i else None, old, g)
            x = x.to(dtype)
            out.append(x)
        return torch.stack(out), ts
    s = (CogVideoXDDIMScheduler if kind == "ddim" else CogVideoXDPMScheduler)(**cfg)
    s.set_timesteps(n)
    for i, t in enumerate(s.timesteps):
        if kind == "ddim":
            x = s.step(vs[i], t, x, return_dict=False)[0]
        else:
            x, old = s.step(vs[i], old, t, s.timesteps[i - 1] if i else None, x, generator=g,
                            return_dict=False)
        x = x.to(dtype)
        out.append(x)
    return torch.stack(out), s.timesteps.tolist()


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_alphas_cumprod(shift):
    from diffusers import CogVideoXDDIMScheduler
    cfg = dict(DDIM_CONFIG, snr_shift_scale=shift)
    ref = CogVideoXDDIMScheduler(**cfg).alphas_cumprod
    ours = sample.alphas_cumprod(cfg)
    assert ours.dtype == torch.float64 and torch.equal(ours, ref)
    assert ours[-1] == 0


@pytest.mark.parametrize("kind", ["ddim", "dpm"])
@pytest.mark.parametrize("shift,n", [(1.0, 50), (3.0, 50), (1.0, 30), (3.0, 7), (1.0, 1), (1.0, 2)])
def test_scheduler_trajectory(kind, shift, n):
    ours, ts = _trajectory(kind, shift, n, True)
    ref, ts_ref = _trajectory(kind, shift, n, False)
    assert ts == ts_ref
    assert torch.equal(ours, ref), (ours - ref).abs().max()


def test_scheduler_bf16_sample():
    """The pipeline runs the sample in bf16 and the model output in fp32: dtypes must mix the same way."""
    for kind in ("ddim", "dpm"):
        ours, _ = _trajectory(kind, 1.0, 10, True, torch.bfloat16)
        ref, _ = _trajectory(kind, 1.0, 10, False, torch.bfloat16)
        assert torch.equal(ours, ref)
