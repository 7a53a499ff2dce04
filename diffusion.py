"""The image-to-video objective, its noise schedule and its conditioning, written once for
train.py, sample.py and bench/toy.py.

Mirrors diffusers' examples/cogvideo/train_cogvideox_image_to_video_lora.py (training) and
pipelines/cogvideo/pipeline_cogvideox_image2video.py (prepare_latents). Free functions of tensors:
every random draw is the caller's (each keeps its own generator and draw order); batch_fn applies
them to train.py's batches. Latents are in the DiT layout B F C H W unless a function says not.
"""
import torch


def alphas_cumprod(cfg):
    """Cumulative alphas from scheduler_config.json: scaled-linear betas, SD3-style SNR shift, then
    the zero-terminal-SNR rescale (alpha_bar[-1] = 0)."""
    for key, want in (("beta_schedule", "scaled_linear"), ("prediction_type", "v_prediction"),
                      ("timestep_spacing", "trailing")):
        if cfg.get(key, want) != want:
            raise ValueError(f"scheduler config: {key}={cfg[key]!r} is not supported "
                             f"(only {want!r})")
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


def posterior(mean, logvar, eps):
    """A sample of the VAE's diagonal Gaussian (diffusers' DiagonalGaussianDistribution.sample), in
    the inputs' dtype; VAE.encode already clamped logvar to [-30, 20]."""
    return mean + (0.5 * logvar).exp() * eps


def noisy_image(first, z, eps):
    """First frames [B,3,H,W] in [-1,1] plus pixel noise of std exp(N(-3, 0.5^2)), as the training
    script adds before encoding the image. z [B]: standard normal draws for the log-std (on the CPU,
    where the std is computed); eps [B,3,H,W]: the pixel noise."""
    sigma = (z * 0.5 - 3).exp().to(first.device)
    return first + sigma[:, None, None, None] * eps


def scale_image_latent(z, vae_cfg):
    """The image latent's scale: 1/scaling_factor for 1.5-I2V (invert_scale_latents; diffusers'
    pipeline divides, SAT keeps the raw latent), else scaling_factor like the video latents."""
    sf = vae_cfg.scaling_factor
    return 1 / sf * z if getattr(vae_cfg, "invert_scale_latents", False) else sf * z


def frame_pad(n, dit_cfg):
    """Latent frames to add in front of n: CogVideoX 1.5 (patch_size_t=2) patches frame pairs, so an
    odd count gets one (the pipeline pads noise and drops it after; training duplicates frame 0)."""
    return (-n) % dit_cfg.patch_size_t if dit_cfg.patch_size_t else 0


def pad_video(x0, dit_cfg):
    """[B,F,C,h,w] -> [B,F+pad,C,h,w], the first latent frame repeated in front (frame_pad)."""
    pad = frame_pad(x0.shape[1], dit_cfg)
    return torch.cat([x0[:, :1]] * pad + [x0], 1) if pad else x0


def image_condition(img, n):
    """Image latent [B,1,C,h,w] zero-padded to n latent frames: the DiT's second input half."""
    return torch.cat([img, img.new_zeros(img.shape[0], n - 1, *img.shape[2:])], 1)


def add_noise(x0, eps, a):
    """-> (x_t, v target) at alpha_bar a [B] (v-prediction: v = sqrt(a) eps - sqrt(1-a) x0)."""
    a = a.view(-1, 1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps, a.sqrt() * eps - (1 - a).sqrt() * x0


def batch_fn(args, vae, cfg, A, cache, embed, empty, device, dtype):
    """train.py's step inputs: -> batch_inputs(items), one step's model inputs from the loader's
    items. Each sample draws from its own generator, seeded by (args.seed, its sample number n)."""
    sf = vae.config.scaling_factor

    @torch.no_grad()
    def batch_inputs(items):
        """-> (model input [B,F,2C,h,w], text, t, ofs, reference latents [B,F,C,h,w], v target)."""
        gens = [torch.Generator().manual_seed(args.seed * 1_000_003 + it["n"]) for it in items]
        draw = lambda shape: torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
        u = torch.stack([torch.rand((), generator=g) for g in gens])
        drop = u < args.caption_dropout  # a tensor: no host sync
        t = torch.stack([torch.randint(0, len(A), (), generator=g) for g in gens]).to(device)
        z = torch.stack([torch.randn((), generator=g) for g in gens])
        first = [it["first"] if cache else it["video"][0] for it in items]
        first = torch.stack(first).to(device)  # [B,3,H,W]
        first = noisy_image(first, z, draw(first.shape[1:]))
        if cache:
            stack = lambda k: torch.stack([it["video"][k] for it in items]).to(device)
            mean, logvar = stack("mean"), stack("logvar")
            ref = torch.stack([it["ref"]["mean"] for it in items]).to(device)
        else:
            # a clip at a time ([F,3,H,W] -> [1,3,F,H,W]): a 49x480x720 encode alone peaks at ~8 GiB
            enc = lambda v: vae.encode(v.to(device, dtype).transpose(0, 1)[None])
            mean, logvar = (torch.cat(parts) for parts in zip(*(enc(it["video"]) for it in items)))
            ref = torch.cat([enc(it["ref"])[0] for it in items])
        x0 = posterior(mean.float(), logvar.float(), draw(mean.shape[1:])) * sf
        im, iv = vae.encode(first.to(dtype)[:, :, None])  # [B,3,1,H,W] -> [B,C,1,h,w]
        img = scale_image_latent(posterior(im.float(), iv.float(), draw(im.shape[1:])), vae.config)
        x0, img = x0.transpose(1, 2), img.transpose(1, 2)  # VAE [B,C,F,h,w] -> DiT [B,F,C,h,w]
        ref = ref.float().transpose(1, 2) * sf  # posterior mean: the hypernet's input, no noise
        x0 = pad_video(x0, cfg)
        img = image_condition(img, x0.shape[1])
        x_t, v = add_noise(x0, draw(x0.shape[1:]), A[t])
        text = torch.stack([it["text"] if "text" in it else embed(it["caption"]) for it in items])
        text = torch.where(drop[:, None, None], empty, text).to(device, dtype)
        ofs = torch.full((len(items),), 2.0, device=device) if cfg.ofs_embed_dim else None
        return torch.cat([x_t, img], 2).to(dtype), text, t, ofs, ref, v
    return batch_inputs
