"""sample.py: schedulers vs diffusers, the I2V pipeline vs diffusers' on the tiny folder, CLI."""
import numpy as np
import pytest
import torch
from dataclasses import replace

import diffusion
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
        A, ts = diffusion.alphas_cumprod(cfg), sample.trailing_timesteps(n)
        for i, t in enumerate(ts):
            if kind == "ddim":
                x = sample.ddim_step(A, vs[i], x, t, t - 1000 // n)
            else:
                prev = ts[i - 1] if i else None
                x, old = sample.dpm_step(A, vs[i], x, t, t - 1000 // n, prev, old, g)
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
    ours = diffusion.alphas_cumprod(cfg)
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
    """The pipeline runs the sample in bf16 and the model output in fp32: dtypes must mix the same
    way."""
    for kind in ("ddim", "dpm"):
        ours, _ = _trajectory(kind, 1.0, 10, True, torch.bfloat16)
        ref, _ = _trajectory(kind, 1.0, 10, False, torch.bfloat16)
        assert torch.equal(ours, ref)


# ------------------------------------------------------------------------------------------------
# Pipeline


def _image(h=64, w=96, seed=0):
    """A smooth [3,H,W] image in [0,1] (already at the target size, so neither side resamples
    it)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, h // 16, w // 16, generator=g)
    return torch.nn.functional.interpolate(small, (h, w), mode="bilinear", align_corners=False)[0]


def _video(f=9, h=64, w=96, seed=1):
    return torch.stack([_image(h, w, seed + i) for i in range(f)])


@pytest.fixture(scope="module")
def ours(tiny_model_dir):
    return sample.load(tiny_model_dir, torch.float32, "cpu")


@pytest.mark.parametrize("scheduler,dynamic", [("ddim", False), ("dpm", False), ("ddim", True),
                                               ("dpm", True)])
def test_pipeline_matches_diffusers(tiny_pipe_and_dir, ours, scheduler, dynamic):
    from diffusers import CogVideoXDPMScheduler
    pipe = tiny_pipe_and_dir[0]
    image = _image()
    kw = dict(num_frames=9, height=64, width=96, num_inference_steps=3, guidance_scale=6.0)
    saved = pipe.scheduler
    if scheduler == "dpm":
        pipe.scheduler = CogVideoXDPMScheduler.from_config(saved.config)
    try:
        # a [3,H,W] tensor in [0,1] at the target size: diffusers' VideoProcessor only does 2x-1
        ref = pipe(image=image, prompt="a cat runs", use_dynamic_cfg=dynamic,
                   generator=torch.Generator().manual_seed(7), output_type="pt", **kw).frames[0]
    finally:
        pipe.scheduler = saved
    out = ours.generate(image, "a cat runs", frames=9, height=64, width=96, steps=3, guidance=6.0,
                        dynamic_cfg=dynamic, scheduler=scheduler, seed=7)
    assert out.shape == ref.shape == (9, 3, 64, 96)
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    print(f"{scheduler} dynamic_cfg={dynamic}: max rel err {err:.2e}")
    assert err <= 1e-4


def test_empty_prompt_runs_one_branch(tiny_pipe_and_dir, ours, monkeypatch):
    """With an empty prompt both CFG branches see the same input, so guidance cannot change the video: ours runs
    the conditional branch alone (batch 1) and must still give the video diffusers makes with both branches."""
    pipe, image = tiny_pipe_and_dir[0], _image()
    ref = pipe(image=image, prompt="", num_frames=9, height=64, width=96, num_inference_steps=3, guidance_scale=6.0,
               generator=torch.Generator().manual_seed(7), output_type="pt").frames[0]
    batches, call = [], sample.fast.dit_call
    counted = lambda dit, x, *a, **k: batches.append(x.shape[0]) or call(dit, x, *a, **k)  # noqa: E731
    monkeypatch.setattr(sample.fast, "dit_call", counted)
    out = ours.generate(image, "", frames=9, height=64, width=96, steps=3, guidance=6.0, seed=7)
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    print(f"empty prompt, one branch: max rel err {err:.2e}")
    assert batches == [1, 1, 1] and err <= 1e-4
    ours.generate(image, "a cat runs", frames=9, height=64, width=96, steps=1, guidance=6.0, seed=7)
    assert batches[-1] == 2  # a prompt keeps both branches


def test_tiled_decode(tiny_model_dir, ours):
    """tile_vae reaches the decode: the pipeline's video is exactly VAE.decode(tile=True) of its
    latents, which tests/test_vae.py checks against diffusers' tiling. The fixture's VAE tiles
    (sample 64x96 -> 32x48) do not add up at this size: 96x80 ones (6x5 latents), as test_vae.py."""
    pipe = sample.load(tiny_model_dir, torch.float32, "cpu", tile_vae=True)
    pipe.vae.config.sample_height, pipe.vae.config.sample_width = 96, 80
    decode, seen = pipe.vae.decode, []
    pipe.vae.decode = lambda z, tile=False: seen.append((z.clone(), tile)) or decode(z, tile=tile)
    kw = dict(frames=9, height=64, width=96, steps=1, seed=2)
    tiled, full = pipe.generate(_image(), **kw), ours.generate(_image(), **kw)
    (z, tile), = seen
    want = (decode(z, tile=True) / 2 + 0.5).clamp(0, 1)[0].permute(1, 0, 2, 3)
    assert tile and torch.equal(tiled, want)
    assert tiled.shape == full.shape and 0 < (tiled - full).abs().mean() < 0.1  # random: big seams


def test_pipeline_checks_sizes(ours):
    with pytest.raises(ValueError, match="8k\\+1"):
        ours.generate(_image(), frames=13, steps=1)
    with pytest.raises(ValueError, match="multiples of 16"):
        ours.generate(_image(72, 96), height=72, steps=1)
    with pytest.raises(ValueError, match="learned positional"):
        ours.generate(_image(128, 192), height=128, width=192, steps=1)


@pytest.fixture(scope="module")
def ckpts(tiny_model_dir, tmp_path_factory):
    """Video2LoRA checkpoints for the tiny DiT: fresh (a zero LoRA), perturbed, another DiT's."""
    import hypernet
    import model
    from conftest import perturb
    tmp = tmp_path_factory.mktemp("ckpt")
    dit = model.load_dit(tiny_model_dir / "transformer")
    torch.manual_seed(0)
    hypernet.save(tmp / "zero.safetensors", hypernet.Video2LoRA(dit, "tiny"))
    hypernet.save(tmp / "random.safetensors", perturb(hypernet.Video2LoRA(dit, "tiny"), std=0.5))
    with torch.device("meta"):
        other = model.DiT(replace(model.presets["tiny"], num_layers=3))
    hypernet.save(tmp / "other.safetensors", hypernet.Video2LoRA(other, "tiny"))
    return tmp


KW = dict(frames=9, height=64, width=96, steps=2, seed=3)


@pytest.fixture(scope="module")
def base(ours):
    return ours.generate(_image(), "a dog", **KW)


def test_zero_hypernet_is_the_base_model(tiny_model_dir, base, ckpts):
    pipe = sample.load(tiny_model_dir, torch.float32, "cpu", ckpt=ckpts / "zero.safetensors")
    assert torch.equal(pipe.generate(_image(), "a dog", ref=_video(), **KW), base)
    blend = pipe.reference_lora([(_video(1), 1), (_video(1, seed=5), 2)])
    assert all(torch.equal(up, torch.zeros_like(up)) for _, up in blend.values())  # a no-op too


def test_reference_lora_and_blend(tiny_model_dir, base, ckpts):
    pipe = sample.load(tiny_model_dir, torch.float32, "cpu", ckpt=ckpts / "random.safetensors")
    r1, r2 = _video(1), _video(1, seed=5)  # one-frame references keep the VAE cheap
    a, b = pipe.reference_lora(r1), pipe.reference_lora(r2)
    mix, half = pipe.reference_lora([(r1, 1.0), (r2, 3.0)]), pipe.reference_lora(r1, scale=0.5)
    x = torch.randn(1, 7, 32, dtype=torch.float64)
    eff = lambda lora, k: x @ lora[k][0].double() @ lora[k][1].double()
    close = lambda u, v: ((u - v).abs().max() / v.abs().max()).item() < 1e-6
    for k in a:  # a blend of k rank-1 LoRAs is the rank-k LoRA with the weighted effect, exactly
        assert mix[k][0].shape[-1] == 2 and close(eff(mix, k), 0.25 * eff(a, k) + 0.75 * eff(b, k))
        assert close(eff(half, k), 0.5 * eff(a, k))
    assert not torch.allclose(pipe.generate(_image(), "a dog", lora=mix, **KW), base)  # reaches it


def test_offload_blocks_same_video(tiny_model_dir, ours, ckpts, monkeypatch):
    """offload="blocks" (--offload-blocks): the DiT's and T5's blocks live in host memory and come to the
    device one block ahead of use (offload.BlockStream; on the CPU its copies are no-ops): the same video
    bit for bit, with a reference's LoRA and the step cache skipping blocks; at most two blocks of a model
    on the device at a time, none after a stage."""
    import offload
    most, fetch = {}, offload.BlockStream.fetch

    def counted(self, i):
        fetch(self, i)
        most[id(self)] = max(most.get(id(self), 0), len(self.ready))
    monkeypatch.setattr(offload.BlockStream, "fetch", counted)
    ck = ckpts / "random.safetensors"
    pipe = sample.load(tiny_model_dir, torch.float32, "cpu", ckpt=ck, offload="blocks")
    plain = sample.load(tiny_model_dir, torch.float32, "cpu", ckpt=ck)
    kw = dict(KW, steps=4, cache_threshold=1.0)
    video = pipe.generate(_image(), "a dog", ref=_video(1), **kw)
    assert pipe.cache.skipped > 0
    assert torch.equal(video, plain.generate(_image(), "a dog", ref=_video(1), **kw))
    assert len(pipe.streams) == 2 and sorted(most.values()) == [2, 2]
    assert all(not s.ready for s in pipe.streams)
    # the LoRA reached the streamed DiT
    assert not torch.equal(video, ours.generate(_image(), "a dog", **kw))


# ------------------------------------------------------------------------------------------------
# CLI


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import data
    from PIL import Image
    tmp = tmp_path_factory.mktemp("cli")
    Image.fromarray((_image(80, 100).permute(1, 2, 0) * 255).byte().numpy()).save(tmp / "img.png")
    data.write_video(tmp / "ref.mp4", _video(12, 64, 96))
    data.write_video(tmp / "short.mp4", _video(3, 64, 96))
    (tmp / "bad.mp4").write_bytes(b"\x00not a video" * 100)
    return tmp


def _frames(path):
    import av
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_cli_end_to_end(capsys, tiny_model_dir, ckpts, files, tmp_path):
    out = tmp_path / "out.mp4"
    lora, diffusers_lora = tmp_path / "l.safetensors", tmp_path / "d.safetensors"
    code = sample.main([str(files / "ref.mp4"), str(files / "img.png"), "--model",
                        str(tiny_model_dir), "--ckpt", str(ckpts / "random.safetensors"), "--out",
                        str(out), "--steps", "2", "--device", "cpu", "--ref",
                        f"{files / 'ref.mp4'}:0.5", "--save-lora", str(lora), "--export-lora",
                        str(diffusers_lora), "--scheduler", "dpm", "--dynamic-cfg", "--offload"])
    stdout = capsys.readouterr().out
    print(stdout)
    last = stdout.strip().splitlines()[-1]  # the lines before it: a line per slow stage
    assert code == 0 and last.startswith(f"wrote {out} (9x64x96, 8 fps), ") and "denoise" in last
    assert f"{lora} (LoRA for --lora)" in last and f"{diffusers_lora}" in last
    assert "loading " in stdout and "\ndecode ... " in stdout
    frames = _frames(out)  # decodes back with PyAV
    assert len(frames) == 9 and frames[0].shape == (64, 96, 3)
    assert (tmp_path / "l.safetensors").is_file() and (tmp_path / "d.safetensors").is_file()


def test_cli_lora_round_trip(capsys, tiny_model_dir, ckpts, files, tmp_path):
    """--save-lora writes what --lora reads: the same video from the LoRA file alone (no
    hypernetwork, and streaming the blocks: --offload-blocks), bit for bit; --lora files blend with
    references by weight, as references do."""
    import data
    import lightlora
    data.write_video(tmp_path / "ref2.mp4", _video(12, 64, 96, seed=5))
    opts = ["--model", str(tiny_model_dir), "--steps", "2", "--device", "cpu"]
    run = lambda *a: sample.main([*map(str, a), *opts])
    ck, ref, img = ckpts / "random.safetensors", files / "ref.mp4", files / "img.png"
    ref2 = tmp_path / "ref2.mp4"
    mp4, st = lambda n: tmp_path / f"{n}.mp4", lambda n: tmp_path / f"{n}.safetensors"
    assert run(ref, img, "--ckpt", ck, "--out", mp4("a"), "--save-lora", st("a")) == 0
    assert run(img, "--lora", st("a"), "--out", mp4("b"), "--offload-blocks") == 0
    assert run(ref2, img, "--ckpt", ck, "--out", mp4("c"), "--save-lora", st("c")) == 0
    assert run(ref2, img, "--ckpt", ck, "--lora", f"{st('a')}:3", "--out", mp4("m"),
               "--save-lora", st("m"), "--lora-scale", "0.5") == 0
    assert run(img, "--no-ref", "--out", tmp_path / "base.mp4") == 0
    video = lambda n: torch.from_numpy(np.stack(_frames(tmp_path / f"{n}.mp4")))
    a, b, c, base = (video(n) for n in ("a", "b", "c", "base"))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, base)
    la, lc, mix = (lightlora.load_native(tmp_path / f"{n}.safetensors") for n in ("a", "c", "m"))
    x = torch.randn(1, 7, 32, dtype=torch.float64)
    eff = lambda lora, k: x @ lora[k][0].double() @ lora[k][1].double()
    for k in la:  # weights 1 (the reference) and 3 (the file), normalised; --lora-scale halves both
        want = 0.5 * (0.25 * eff(lc, k) + 0.75 * eff(la, k))
        err = (eff(mix, k) - want).abs().max() / want.abs().max()
        assert mix[k][0].shape[-1] == 2 and err < 1e-6
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith(f"wrote {tmp_path / 'base.mp4'}") and "ref->lora" not in out[-1]


def test_cli_script_error(files, tmp_path):
    """As a script: exit code 2 and a single line on stderr, no traceback."""
    import subprocess
    import sys
    argv = [sys.executable, sample.__file__, str(files / "ref.mp4"), str(tmp_path / "nope.png")]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    one_line = r.stderr.strip().count("\n") == 0
    assert r.returncode == 2 and one_line and "nope.png" in r.stderr, r.stderr


def _fails(capsys, argv, out, match):
    code = sample.main(argv + ["--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    one_line = err.startswith("error:") and len(err.splitlines()) == 1
    assert code == 2 and one_line and match in err, err
    assert "Traceback" not in err
    assert not out.exists() or out.read_bytes() == b"old"


@pytest.mark.parametrize("case", ["missing image", "missing ref", "bad video", "short ref",
                                  "frames", "size", "learned pe", "no model", "no ckpt",
                                  "wrong ckpt", "not a ckpt", "out folder", "no ref",
                                  "lora other model", "lora not a lora", "lora unreadable",
                                  "missing lora"])
def test_cli_errors(capsys, tiny_model_dir, ckpts, files, tmp_path, case):
    out = tmp_path / "out.mp4"
    if case in ("frames", "size"):
        out.write_bytes(b"old")  # an existing output is left alone
    ref, img = str(files / "ref.mp4"), str(files / "img.png")
    m, ck = str(tiny_model_dir), str(ckpts / "zero.safetensors")
    if case == "lora other model":  # a LoRA for a DiT of width 7 instead of 32
        import lightlora
        lightlora.save_native(tmp_path / "other.safetensors", {"transformer_blocks.0.attn1.to_q": (
            torch.zeros(1, 7, 1), torch.zeros(1, 1, 7))})
    argv, match = {
        "missing image": ([ref, str(files / "nope.png"), "--model", m, "--ckpt", ck], "nope.png"),
        "missing ref": ([str(files / "nope.mp4"), img, "--model", m, "--ckpt", ck], "nope.mp4"),
        "bad video": ([str(files / "bad.mp4"), img, "--model", m, "--ckpt", ck], "bad.mp4"),
        "short ref": ([str(files / "short.mp4"), img, "--model", m, "--ckpt", ck], "too short"),
        "frames": ([ref, img, "--model", m, "--ckpt", ck, "--frames", "13"], "8k+1"),
        "size": ([ref, img, "--model", m, "--ckpt", ck, "--height", "72"], "multiple of 16"),
        "learned pe": ([ref, img, "--model", m, "--ckpt", ck, "--height", "128", "--width", "192"],
                       "only takes"),
        "no model": ([ref, img, "--model", str(tmp_path / "nowhere")], "no model at"),
        "no ckpt": ([ref, img, "--model", m], "--no-ref"),
        "wrong ckpt": ([ref, img, "--model", m, "--ckpt", str(ckpts / "other.safetensors")],
                       "adapted layers"),
        "not a ckpt": ([ref, img, "--model", m, "--ckpt", str(files / "bad.mp4")], "bad.mp4"),
        "out folder": ([ref, img, "--model", m, "--ckpt", ck], "folder"),
        "no ref": ([img, "--model", m], "--lora FILE or --no-ref"),
        "lora other model": ([img, "--model", m, "--lora", str(tmp_path / "other.safetensors")],
                             "does not fit"),
        "lora not a lora": ([img, "--model", m, "--lora", ck], "not a native video2lora LoRA"),
        "lora unreadable": ([img, "--model", m, "--lora", str(files / "bad.mp4")],
                            "not a readable LoRA"),
        "missing lora": ([img, "--model", m, "--lora", str(files / "nope.safetensors:2")],
                         "nope.safetensors"),
    }[case]
    if case == "out folder":
        out = tmp_path / "missing" / "out.mp4"
    _fails(capsys, argv, out, match)


def test_pipeline_matches_diffusers_1_5(tmp_path):
    """CogVideoX1.5-I2V-like tiny model: patch_size_t=2 (one padding latent frame, dropped before
    decoding), ofs embedding, invert_scale_latents, RoPE without learned positions."""
    import shutil
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler,
                           CogVideoXImageToVideoPipeline, CogVideoXTransformer3DModel)
    from transformers import T5Config, T5EncoderModel, T5Tokenizer
    from conftest import TINY_DIT_I2V, TINY_T5, TINY_VAE, make_tokenizer_dir, perturb
    torch.manual_seed(0)
    tok = T5Tokenizer.from_pretrained(str(make_tokenizer_dir(tmp_path / "tok")))
    dit = CogVideoXTransformer3DModel(**dict(TINY_DIT_I2V, use_learned_positional_embeddings=False,
                                             patch_size_t=2, ofs_embed_dim=16, patch_bias=False))
    t5 = perturb(T5EncoderModel(T5Config(**TINY_T5)).eval(), 1)
    dit = perturb(dit.eval(), 2)
    vae = AutoencoderKLCogVideoX(**dict(TINY_VAE, invert_scale_latents=True)).eval()
    vae = perturb(vae, 3, std=0.02)
    pipe = CogVideoXImageToVideoPipeline(tokenizer=tok, text_encoder=t5, transformer=dit, vae=vae,
                                         scheduler=CogVideoXDDIMScheduler(**DDIM_CONFIG))
    pipe.save_pretrained(str(tmp_path / "m"), safe_serialization=True)
    shutil.copy(tmp_path / "tok" / "spiece.model", tmp_path / "m" / "tokenizer" / "spiece.model")
    kw = dict(num_frames=9, height=64, width=96, num_inference_steps=2, guidance_scale=5.0)
    g = torch.Generator().manual_seed(1)
    ref = pipe(image=_image(), prompt="fox", generator=g, output_type="pt", **kw).frames[0]
    ours = sample.load(tmp_path / "m", torch.float32, "cpu")
    kw = dict(frames=9, height=64, width=96, steps=2, guidance=5.0, seed=1)
    out = ours.generate(_image(), "fox", **kw)
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    print(f"1.5-I2V-like: max rel err {err:.2e}")
    assert out.shape == ref.shape == (9, 3, 64, 96) and err <= 1e-4
