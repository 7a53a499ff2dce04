"""Image-to-video sampling with a reference video: CogVideoX schedulers, the I2V pipeline, the CLI.

    python sample.py ref.mp4 img.png --prompt "..." --model DIR [--ckpt hypernet.safetensors] --out out.mp4

Without a reference (or with --no-ref) the result equals diffusers' CogVideoXImageToVideoPipeline for the
same seed and settings. Latents are in the DiT layout B F C H W; the VAE takes B C T H W.
"""
import math

import torch

# ---------------------------------------------------------------------------------------------------------
# Schedulers (diffusers' CogVideoXDDIMScheduler / CogVideoXDPMScheduler, which mirror SAT's samplers).
# Scalars stay 0-dim float64 tensors indexed from the table, as in diffusers, so the latents keep their dtype
# and the numbers are bit-identical.


def alphas_cumprod(cfg):
    """Cumulative alphas from scheduler_config.json: scaled-linear betas, SD3-style SNR shift, then the
    zero-terminal-SNR rescale (alpha_bar[-1] = 0)."""
    for key, want in (("beta_schedule", "scaled_linear"), ("prediction_type", "v_prediction"),
                      ("timestep_spacing", "trailing")):
        if cfg.get(key, want) != want:
            raise ValueError(f"scheduler config: {key}={cfg[key]!r} is not supported (only {want!r})")
    betas = torch.linspace(cfg.get("beta_start", 0.00085) ** 0.5, cfg.get("beta_end", 0.012) ** 0.5,
                           cfg.get("num_train_timesteps", 1000), dtype=torch.float64) ** 2
    a = torch.cumprod(1.0 - betas, dim=0)
    s = cfg.get("snr_shift_scale", 3.0)  # diffusers' default when the key is absent
    a = a / (s + (1 - s) * a)
    if cfg.get("rescale_betas_zero_snr", False):
        r = a.sqrt()
        r0, rT = r[0].clone(), r[-1].clone()
        a = ((r - rT) * (r0 / (r0 - rT))) ** 2
    return a


def trailing_timesteps(n, T=1000):
    """round(arange(T, 0, -T/n)) - 1: [999, 979, ..., 19] for n=50."""
    if not 1 <= n <= T:
        raise ValueError(f"steps must be in 1..{T}, got {n}")
    return [int(t) for t in torch.arange(T, 0, -T / n, dtype=torch.float64).round() - 1]


def _alpha(A, t):
    # The reference looks the previous alpha up at t - T//n, not at the next scheduled timestep (the two
    # differ when n does not divide T; diffusers PR #13125). Below zero it is final_alpha_cumprod = 1.
    return A[t] if t >= 0 else A.new_tensor(1.0)


def ddim_step(A, v, x, t, t_prev):
    """Deterministic DDIM step (v-prediction, eta = 0) from timestep t to t_prev."""
    at, ap = A[t], _alpha(A, t_prev)
    x0 = at ** 0.5 * x - (1 - at) ** 0.5 * v
    a = ((1 - ap) / (1 - at)) ** 0.5
    return a * x + (ap ** 0.5 - at ** 0.5 * a) * x0


def dpm_step(A, v, x, t, t_prev, t_back, old_x0, generator):
    """CogVideoX's stochastic DPM-Solver++(2M) step -> (x_prev, x0). t_back = the previous (larger) timestep,
    None at the first step. Noise draws match the reference exactly: one at the first and the last step, two
    at every other step (the first of the two is discarded), all in x's dtype on the generator's device."""
    at, ap = A[t], _alpha(A, t_prev)
    x0 = at ** 0.5 * x - (1 - at) ** 0.5 * v
    lam = lambda a: ((a / (1 - a)) ** 0.5).log()  # half log-SNR; -inf at t=999, +inf at alpha 1
    h = lam(ap) - lam(at)
    m1, m2 = ((1 - ap) / (1 - at)) ** 0.5 * (-h).exp(), (-2 * h).expm1() * ap ** 0.5
    mn = (1 - ap) ** 0.5 * (1 - (-2 * h).exp()) ** 0.5
    noise = lambda: torch.randn(x.shape, generator=generator, dtype=x.dtype,
                                device=generator.device if generator is not None else x.device).to(x.device)
    x_prev = m1 * x - m2 * x0 + mn * noise()
    if old_x0 is None or t_prev < 0:
        return x_prev, x0
    r = (lam(at) - lam(A[t_back])) / h
    d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * old_x0
    return m1 * x - m2 * d + mn * noise(), x0
