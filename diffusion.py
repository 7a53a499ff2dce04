"""The image-to-video objective and its conditioning, written once for train.py, sample.py and bench/toy.py.

Mirrors diffusers' examples/cogvideo/train_cogvideox_image_to_video_lora.py (training) and
pipelines/cogvideo/pipeline_cogvideox_image2video.py (prepare_latents). Free functions of tensors: every
random draw is the caller's (each keeps its own generator and draw order). Latents here are in the DiT
layout B F C H W unless a function says otherwise.
"""
import torch


def posterior(mean, logvar, eps):
    """A sample of the VAE's diagonal Gaussian (diffusers' DiagonalGaussianDistribution.sample), in the
    inputs' dtype; VAE.encode already clamped logvar to [-30, 20]."""
    return mean + (0.5 * logvar).exp() * eps


def noisy_image(first, z, eps):
    """First frames [B,3,H,W] in [-1,1] plus pixel noise of std exp(N(-3, 0.5^2)), as the training script
    adds before encoding the image. z [B]: standard normal draws for the log-std (on the CPU, where the
    std is computed); eps [B,3,H,W]: the pixel noise."""
    sigma = (z * 0.5 - 3).exp().to(first.device)
    return first + sigma[:, None, None, None] * eps


def scale_image_latent(z, vae_cfg):
    """The image latent's scale: 1/scaling_factor for 1.5-I2V (invert_scale_latents; diffusers' pipeline
    divides, SAT keeps the raw latent), else scaling_factor like the video latents."""
    sf = vae_cfg.scaling_factor
    return 1 / sf * z if getattr(vae_cfg, "invert_scale_latents", False) else sf * z


def frame_pad(n, dit_cfg):
    """Latent frames to add in front of n: CogVideoX 1.5 (patch_size_t=2) patches frame pairs, so an odd
    count gets one (the pipeline pads noise and drops it after; training duplicates frame 0)."""
    return (-n) % dit_cfg.patch_size_t if dit_cfg.patch_size_t else 0


def pad_video(x0, dit_cfg):
    """[B,F,C,h,w] -> [B,F+pad,C,h,w], the first latent frame repeated in front (frame_pad)."""
    pad = frame_pad(x0.shape[1], dit_cfg)
    return torch.cat([x0[:, :1]] * pad + [x0], 1) if pad else x0


def image_condition(img, n):
    """Image latent [B,1,C,h,w] zero-padded to the n latent frames of the video: the DiT's second input half."""
    return torch.cat([img, img.new_zeros(img.shape[0], n - 1, *img.shape[2:])], 1)


def add_noise(x0, eps, a):
    """-> (x_t, v target) at alpha_bar a [B] (v-prediction: v = sqrt(a) eps - sqrt(1-a) x0)."""
    a = a.view(-1, 1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps, a.sqrt() * eps - (1 - a).sqrt() * x0
