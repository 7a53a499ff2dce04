"""vae.py against diffusers' AutoencoderKLCogVideoX on tiny perturbed random models saved with
save_pretrained (fp32, CPU): encode (mean, logvar) and decode at several frame counts, tiled and
not, plus the error cases.  python -m pytest -q tests/test_vae.py"""
import copy
import json
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file

import vae as V
from conftest import TINY_VAE, perturb

# 4 blocks keep the official /8 spatial and /4 temporal compression. sample 96x80 -> 48x40 px tiles
# (6x5 latents), so every tile seam is blended (extent >= 1) in both directions at tiny sizes.
CFG = dict(block_out_channels=(8, 8, 16, 16), latent_channels=4, layers_per_block=1,
           norm_num_groups=4, sample_height=96, sample_width=80, scaling_factor=0.7)
TOL = 1e-4


def rel(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def make(tmp, cfg, seed):
    from diffusers import AutoencoderKLCogVideoX
    torch.manual_seed(seed)
    ref = perturb(AutoencoderKLCogVideoX(**cfg).eval(), seed, std=0.02)
    ref.save_pretrained(str(tmp), safe_serialization=True)
    return ref, V.load_vae(tmp)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make(tmp_path_factory.mktemp("vae"), CFG, 3)


def pixels(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("frames", [1, 9, 17, 25, 13])
def test_encode_matches_diffusers(pair, frames):
    ref, ours = pair
    x = pixels(2 if frames == 9 else 1, 3, frames, 16, 24, seed=frames)
    with torch.no_grad():
        post = ref.encode(x).latent_dist
    mean, logvar = ours.encode(x)
    assert mean.shape == (x.shape[0], 4, (frames - 1) // 4 + 1, 2, 3)
    assert rel(mean, post.mean) <= TOL and rel(logvar, post.logvar) <= TOL


@pytest.mark.parametrize("latents", [1, 2, 3, 4, 5, 7])
def test_decode_matches_diffusers(pair, latents):
    ref, ours = pair
    g = torch.Generator().manual_seed(latents)
    z = torch.randn(2 if latents == 3 else 1, 4, latents, 2, 3, generator=g)
    with torch.no_grad():
        want = ref.decode(z).sample
    got = ours.decode(z)
    assert got.shape == want.shape == (z.shape[0], 3, 4 * latents - 3 * (latents % 2), 16, 24)
    assert rel(got, want) <= TOL


def test_tiled_matches_diffusers(pair):
    ref, ours = pair
    # 2x2 tiles each way; 4 latents = two decode chunks per tile (the caches must restart per tile)
    g = torch.Generator().manual_seed(1)
    x, z = pixels(1, 3, 9, 64, 48), torch.randn(1, 4, 4, 8, 6, generator=g)
    ref.enable_tiling()
    try:
        spy = lambda name: mock.patch.object(ref, name, wraps=getattr(ref, name))
        with torch.no_grad(), spy("tiled_encode") as te, spy("tiled_decode") as td:
            post, want = ref.encode(x).latent_dist, ref.decode(z).sample
        assert te.called and td.called  # the reference really tiled
    finally:
        ref.disable_tiling()
    mean, logvar = ours.encode(x, tile=True)
    assert rel(mean, post.mean) <= TOL and rel(logvar, post.logvar) <= TOL
    assert rel(ours.decode(z, tile=True), want) <= TOL
    # below the tile size tile=True is the plain path
    assert torch.equal(ours.decode(z[..., :6, :5], tile=True), ours.decode(z[..., :6, :5]))


def test_tiled_unaligned_strides(tmp_path):
    """conftest's TINY_VAE (sample 64x96): encode strides 26/38 pixels are not multiples of 8 (so
    edge tiles are not), the vertical encode blend extent is 0: still diffusers'. 2x2 tiles."""
    ref, ours = make(tmp_path, TINY_VAE, 5)
    g = torch.Generator().manual_seed(2)
    x, z = pixels(1, 3, 1, 40, 56), torch.randn(1, 4, 1, 5, 7, generator=g)
    ref.enable_tiling()
    with torch.no_grad():
        post, want = ref.encode(x).latent_dist, ref.decode(z).sample
    mean, logvar = ours.encode(x, tile=True)
    assert mean.shape == post.mean.shape
    assert rel(mean, post.mean) <= TOL and rel(logvar, post.logvar) <= TOL
    # Decode tiles of this config do not add up: diffusers silently returns 43x63 pixels for 5x7
    # latents; we refuse with a clear error instead.
    assert list(want.shape[3:]) != [40, 56]
    with pytest.raises(ValueError, match="do not add up"):
        ours.decode(z, tile=True)


def test_config_properties_and_bf16(pair):
    _, ours = pair
    assert ours.spatial_compression == 8 and ours.temporal_compression == 4
    assert ours.config.scaling_factor == 0.7 and ours.config.invert_scale_latents is False
    assert V.VAE(V.presets["tiny"]).spatial_compression == 8
    z = torch.randn(1, 4, 3, 2, 3)
    want = ours.decode(z)
    got = copy.deepcopy(ours).to(torch.bfloat16).decode(z)  # fp32 input: cast to bf16
    assert got.dtype == torch.bfloat16 and rel(got.float(), want) < 0.05


def test_official_topology_keys_and_shapes():
    """The full-size preset (on meta) has exactly diffusers' keys and shapes (§2.2, §5.7)."""
    from diffusers import AutoencoderKLCogVideoX
    with torch.device("meta"):
        ours, ref = V.VAE(V.presets["cogvideox"]), AutoencoderKLCogVideoX()
    want = {k: v.shape for k, v in ref.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == want
    assert len(want) == 436 and sum(p.numel() for p in ours.parameters()) == 215_583_907


def test_chunking_is_causal(pair):
    """The first 9-frame chunk sees nothing later: appending frames leaves its latents unchanged."""
    _, ours = pair
    x = pixels(1, 3, 17, 16, 16)
    assert torch.equal(ours.encode(x[:, :, :9])[0], ours.encode(x)[0][:, :, :3])


def test_input_errors(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="1 or 4k\\+1 frames"):
        ours.encode(pixels(1, 3, 8, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        ours.encode(pixels(1, 3, 1, 20, 16))
    with pytest.raises(ValueError, match="B,3,frames,H,W"):
        ours.encode(pixels(1, 4, 1, 16, 16))
    with pytest.raises(ValueError, match="B,3,frames,H,W"):
        ours.encode(pixels(3, 1, 16, 16))
    with pytest.raises(ValueError, match="B,4,frames,H,W"):
        ours.decode(torch.randn(1, 16, 2, 2, 2))


def test_load_errors(pair, tmp_path):
    ref, _ = pair
    with pytest.raises(FileNotFoundError):
        V.load_vae(tmp_path / "nope")
    src = tmp_path / "vae"
    ref.save_pretrained(str(src), safe_serialization=True)
    cfg = json.loads((src / "config.json").read_text())
    for bad, msg in [({"use_quant_conv": True}, "quant_conv"), ({"act_fn": "relu"}, "act_fn"),
                     ({"down_block_types": ["DownEncoderBlock2D"] * 4}, "down_block_types"),
                     ({"fancy_new_option": 1}, "fancy_new_option")]:
        (src / "config.json").write_text(json.dumps({**cfg, **bad}))
        with pytest.raises(ValueError, match=msg):
            V.load_vae(src)
    (src / "config.json").write_text(json.dumps(cfg))
    sd = load_file(src / "diffusion_pytorch_model.safetensors")
    del sd["decoder.conv_out.conv.bias"]
    save_file(sd, src / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match="decoder.conv_out.conv.bias"):
        V.load_vae(src)


def test_loads_the_shared_pipeline_folder(tiny_pipe_and_dir):
    """The conftest I2V folder (the layout sample.py reads): same decode as the pipeline's VAE."""
    pipe, folder = tiny_pipe_and_dir
    ours = V.load_vae(folder / "vae")
    z = torch.randn(1, 4, 1, 8, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = pipe.vae.decode(z).sample
    assert rel(ours.decode(z), want) <= TOL
