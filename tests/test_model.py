"""model.py against diffusers / transformers on tiny random models saved in the official layout.
Run: python -m pytest -q tests/test_model.py  (add -s to see the measured errors)"""
import json
import shutil

import pytest
import torch
from conftest import TINY_T5, perturb

import model

TOL = 1e-4
L_TEXT = 13  # text tokens; the tiny configs below set max_text_seq_length to match


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


BASE = dict(num_attention_heads=2, attention_head_dim=16, out_channels=4, time_embed_dim=16, text_embed_dim=32,
            num_layers=2, sample_width=12, sample_height=8, sample_frames=9, max_text_seq_length=L_TEXT)
# name -> (diffusers config, another latent size F, H, W to try or None when only the config's size works)
VARIANTS = {
    "2b": (dict(BASE, in_channels=4), (2, 6, 10)),
    "5b": (dict(BASE, in_channels=4, use_rotary_positional_embeddings=True), (2, 10, 6)),
    "5b-i2v": (dict(BASE, in_channels=8, use_rotary_positional_embeddings=True,
                    use_learned_positional_embeddings=True), None),
    "1.5-t2v": (dict(BASE, in_channels=4, patch_size_t=2, patch_bias=False, sample_frames=13,
                     use_rotary_positional_embeddings=True), (2, 6, 8)),
    "1.5-i2v": (dict(BASE, in_channels=8, patch_size_t=2, patch_bias=False, sample_frames=13, ofs_embed_dim=16,
                     use_rotary_positional_embeddings=True), (6, 4, 12)),
}


def ref_rope(cfg, f, h, w):
    """What the diffusers pipelines pass as image_rotary_emb (their _prepare_rotary_positional_embeddings)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
    p = cfg.patch_size
    gh, gw, bh, bw = h // p, w // p, cfg.sample_height // p, cfg.sample_width // p
    if cfg.patch_size_t is None:
        crops = get_resize_crop_region_for_grid((gh, gw), bw, bh)
        return get_3d_rotary_pos_embed(cfg.attention_head_dim, crops, (gh, gw), f)
    return get_3d_rotary_pos_embed(cfg.attention_head_dim, None, (gh, gw), (f + 1) // 2, grid_type="slice",
                                   max_size=(bh, bw))


def ref_forward(ref, x, text, t, ofs=None):
    rope = ref_rope(ref.config, x.shape[1], x.shape[3], x.shape[4]) if ref.config.use_rotary_positional_embeddings else None
    with torch.no_grad():
        return ref(x, text, t, ofs=ofs, image_rotary_emb=rope, return_dict=False)[0]


def inputs(cfg, f, h, w, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, f, cfg["in_channels"], h, w, generator=g),
            torch.randn(B, L_TEXT, cfg["text_embed_dim"], generator=g), torch.tensor([999, 437])[:B])


@pytest.fixture(scope="module", params=list(VARIANTS))
def dit_pair(request, tmp_path_factory):
    from diffusers import CogVideoXTransformer3DModel
    name = request.param
    cfg, other = VARIANTS[name]
    torch.manual_seed(0)
    ref = CogVideoXTransformer3DModel(**cfg).eval()
    fixed = getattr(ref.patch_embed, "pos_embedding", None)
    fixed = fixed.clone() if fixed is not None and not cfg.get("use_learned_positional_embeddings") else None
    perturb(ref, seed=1)
    if fixed is not None:  # 2b's sin-cos table is a non-persistent buffer: not in the checkpoint, keep it exact
        ref.patch_embed.pos_embedding.copy_(fixed)
    out = tmp_path_factory.mktemp(name) / "transformer"
    ref.save_pretrained(str(out), safe_serialization=True, max_shard_size="20KB" if name == "1.5-i2v" else "10GB")
    return name, cfg, other, ref, out


def test_dit_matches_diffusers(dit_pair):
    name, cfg, other, ref, out = dit_pair
    ours = model.load_dit(out)
    if name == "1.5-i2v":
        assert len(list(out.glob("*.safetensors"))) > 1  # the sharded path was exercised
    f = ours.config.latent_frames + (ours.config.latent_frames % 2 if ours.config.patch_size_t else 0)
    sizes = [(f, cfg["sample_height"], cfg["sample_width"])] + ([other] if other else [])
    for size in sizes:
        x, text, t = inputs(cfg, *size)
        want = ref_forward(ref, x, text, t, ofs=torch.full((1,), 2.0) if cfg.get("ofs_embed_dim") else None)
        with torch.no_grad():
            got = ours(x, text, t)
        err = rel_err(got, want)
        print(f"DiT {name} F,H,W={size}: rel err {err:.2e}")
        assert got.shape == want.shape and err <= TOL


def test_dit_size_errors(dit_pair):
    name, cfg, other, ref, out = dit_pair
    ours = model.load_dit(out)
    if name == "5b-i2v":
        x, text, t = inputs(cfg, 2, 8, 12)
        with pytest.raises(ValueError, match=r"learned positional embedding only serves latents of F x H x W = 3 x 8 x 12"):
            ours(x, text, t)
    if name.startswith("1.5"):
        with pytest.raises(ValueError, match="even number of latent frames"):
            ours(*inputs(cfg, 3, 8, 12))
        with pytest.raises(ValueError, match="exceeds this checkpoint's RoPE grid 4x6"):
            ours(*inputs(cfg, 2, 10, 12))
    if name == "2b":
        x, text, t = inputs(cfg, 2, 8, 12)
        with pytest.raises(ValueError, match=f"exactly {L_TEXT} text tokens"):
            ours(x, text[:, :5], t)


def test_lora(dit_pair):
    name, cfg, other, ref, out = dit_pair
    if name != "5b":
        pytest.skip("one variant is enough")
    ours = model.load_dit(out)
    x, text, t = inputs(cfg, 2, 8, 12)
    with torch.no_grad():
        base = ours(x, text, t)
        assert torch.equal(base, ours(x, text, t, lora={}))
        assert torch.equal(base, ours(x, text, t, lora={"transformer_blocks.9.attn1.to_q": None}))
        g = torch.Generator().manual_seed(3)
        down, up = torch.randn(1, 32, 4, generator=g) * 0.1, torch.randn(1, 4, 32, generator=g) * 0.1
        got = ours(x, text, t, lora={"transformer_blocks.0.attn1.to_q": (down, up)})
        merged = model.load_dit(out)
        merged.transformer_blocks[0].attn1.to_q.weight += (down[0] @ up[0]).T
        want = merged(x, text, t)
        err = rel_err(got, want)
        print(f"LoRA vs merged weight: rel err {err:.2e}")
        assert err <= 1e-5 and rel_err(got, base) > 1e-3
        # per-sample factors: sample b gets its own (down, up); compare with B=1 runs
        downs, ups = torch.randn(2, 128, 2, generator=g) * 0.1, torch.randn(2, 2, 32, generator=g) * 0.1
        key = "transformer_blocks.1.ff.net.2"
        got = ours(x, text, t, lora={key: (downs.double(), ups.double())})
        for b in range(2):
            one = ours(x[b:b + 1], text[b:b + 1], t[b:b + 1], lora={key: (downs[b:b + 1], ups[b:b + 1])})
            assert rel_err(got[b:b + 1], one) <= 1e-5


def test_lora_linear_shapes():
    lin = torch.nn.Linear(6, 5)
    x2, x3 = torch.randn(3, 6), torch.randn(3, 4, 6)
    down, up = torch.randn(3, 6, 2), torch.randn(3, 2, 5)
    assert torch.equal(model.lora_linear(lin, x3), lin(x3))
    want = lin(x3) + x3 @ down @ up
    assert torch.allclose(model.lora_linear(lin, x3, (down, up)), want, atol=1e-5)
    assert torch.allclose(model.lora_linear(lin, x2, (down, up)), lin(x2) + (x2[:, None] @ down @ up)[:, 0], atol=1e-5)
    assert torch.allclose(model.lora_linear(lin, x3, (down[:1], up[:1])), lin(x3) + x3 @ down[:1] @ up[:1], atol=1e-5)
