"""model.py against diffusers / transformers on tiny random models saved in the official layout.
Run: python -m pytest -q tests/test_model.py  (add -s to see the measured errors)"""
import json
import shutil
from dataclasses import asdict

import pytest
import torch
from conftest import TINY_T5, perturb

import model

TOL = 1e-4
L_TEXT = 13  # text tokens; the tiny configs below set max_text_seq_length to match


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


BASE = dict(num_attention_heads=2, attention_head_dim=16, out_channels=4, time_embed_dim=16,
            text_embed_dim=32, num_layers=2, sample_width=12, sample_height=8, sample_frames=9,
            max_text_seq_length=L_TEXT)
# name -> (diffusers config, another latent size F, H, W to try; None: only the config's size works)
VARIANTS = {
    "2b": (dict(BASE, in_channels=4), (2, 6, 10)),
    "5b": (dict(BASE, in_channels=4, use_rotary_positional_embeddings=True), (2, 10, 6)),
    "5b-i2v": (dict(BASE, in_channels=8, use_rotary_positional_embeddings=True,
                    use_learned_positional_embeddings=True), None),
    "1.5-t2v": (dict(BASE, in_channels=4, patch_size_t=2, patch_bias=False, sample_frames=13,
                     use_rotary_positional_embeddings=True), (2, 6, 8)),
    "1.5-i2v": (dict(BASE, in_channels=8, patch_size_t=2, patch_bias=False, sample_frames=13,
                     ofs_embed_dim=16, use_rotary_positional_embeddings=True), (6, 4, 12)),
}


def ref_rope(cfg, f, h, w):
    """The pipelines' image_rotary_emb (diffusers' _prepare_rotary_positional_embeddings)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
    p = cfg.patch_size
    gh, gw, bh, bw = h // p, w // p, cfg.sample_height // p, cfg.sample_width // p
    if cfg.patch_size_t is None:
        crops = get_resize_crop_region_for_grid((gh, gw), bw, bh)
        return get_3d_rotary_pos_embed(cfg.attention_head_dim, crops, (gh, gw), f)
    return get_3d_rotary_pos_embed(cfg.attention_head_dim, None, (gh, gw), (f + 1) // 2,
                                   grid_type="slice", max_size=(bh, bw))


def ref_forward(ref, x, text, t, ofs=None):
    rope = None
    if ref.config.use_rotary_positional_embeddings:
        rope = ref_rope(ref.config, x.shape[1], x.shape[3], x.shape[4])
    with torch.no_grad():
        return ref(x, text, t, ofs=ofs, image_rotary_emb=rope, return_dict=False)[0]


def inputs(cfg, f, h, w, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, f, cfg["in_channels"], h, w, generator=g),
            torch.randn(B, L_TEXT, cfg["text_embed_dim"], generator=g),
            torch.tensor([999, 437])[:B])


@pytest.fixture(scope="module", params=list(VARIANTS))
def dit_pair(request, tmp_path_factory):
    from diffusers import CogVideoXTransformer3DModel
    name = request.param
    cfg, other = VARIANTS[name]
    torch.manual_seed(0)
    ref = CogVideoXTransformer3DModel(**cfg).eval()
    fixed = getattr(ref.patch_embed, "pos_embedding", None)
    keep = fixed is not None and not cfg.get("use_learned_positional_embeddings")
    fixed = fixed.clone() if keep else None
    perturb(ref, seed=1)
    if fixed is not None:  # 2b's sin-cos table, a non-persistent buffer (unsaved): keep it exact
        ref.patch_embed.pos_embedding.copy_(fixed)
    out = tmp_path_factory.mktemp(name) / "transformer"
    shard = "20KB" if name == "1.5-i2v" else "10GB"
    ref.save_pretrained(str(out), safe_serialization=True, max_shard_size=shard)
    return name, cfg, other, ref, out


def test_dit_matches_diffusers(dit_pair):
    name, cfg, other, ref, out = dit_pair
    ours = model.load_dit(out)
    if name == "1.5-i2v":
        assert len(list(out.glob("*.safetensors"))) > 1  # the sharded path was exercised
    f = ours.config.latent_frames
    if ours.config.patch_size_t:
        f += f % 2
    sizes = [(f, cfg["sample_height"], cfg["sample_width"])] + ([other] if other else [])
    ofs = torch.full((1,), 2.0) if cfg.get("ofs_embed_dim") else None
    for size in sizes:
        x, text, t = inputs(cfg, *size)
        want = ref_forward(ref, x, text, t, ofs=ofs)
        with torch.no_grad():
            got = ours(x, text, t)
        err = rel_err(got, want)
        print(f"DiT {name} F,H,W={size}: rel err {err:.2e}")
        assert got.shape == want.shape and err <= TOL
    # bf16 as the pipelines run it: same kernels and op order as diffusers, so (near) bit-equal
    from diffusers import CogVideoXTransformer3DModel
    ref16 = CogVideoXTransformer3DModel.from_pretrained(str(out), torch_dtype=torch.bfloat16).eval()
    x, text, t = inputs(cfg, *sizes[0])
    x, text = x.bfloat16(), text.bfloat16()
    want = ref_forward(ref16, x, text, t, ofs=ofs)
    with torch.no_grad():
        got = model.load_dit(out, torch.bfloat16)(x, text, t)
    err = rel_err(got.float(), want.float())
    print(f"DiT {name} bf16: rel err {err:.2e}{' (bit-equal)' if torch.equal(got, want) else ''}")
    assert got.dtype == torch.bfloat16 and err <= 1e-3


def test_dit_size_errors(dit_pair):
    name, cfg, other, ref, out = dit_pair
    ours = model.load_dit(out)
    if name == "5b-i2v":
        x, text, t = inputs(cfg, 2, 8, 12)
        msg = r"learned positional embedding only serves latents of F x H x W = 3 x 8 x 12"
        with pytest.raises(ValueError, match=msg):
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
    # RoPE alone: no size error to raise; another frame count and size run, shaped like the input
    if name == "5b":
        x, text, t = inputs(cfg, 2, 10, 14)
        with torch.no_grad():
            out = ours(x, text, t)
        assert out.shape == (2, 2, cfg["out_channels"], 10, 14) and torch.isfinite(out).all()


@pytest.mark.parametrize("dit_pair", ["5b"], indirect=True)
def test_lora(dit_pair):
    name, cfg, other, ref, out = dit_pair
    ours = model.load_dit(out)
    x, text, t = inputs(cfg, 2, 8, 12)
    with torch.no_grad():
        base = ours(x, text, t)
        assert torch.equal(base, ours(x, text, t, lora={}))
        assert torch.equal(base, ours(x, text, t, lora={"transformer_blocks.1.attn1.to_q": None}))
        q9 = "transformer_blocks.9.attn1.to_q"
        with pytest.raises(ValueError, match=f"lora names no Linear of this DiT: {q9}"):
            ours(x, text, t, lora={q9: None})
        assert len(ours.lora_names) == 2 * 8
        assert "transformer_blocks.1.ff.net.0.proj" in ours.lora_names
        g = torch.Generator().manual_seed(3)
        down = torch.randn(1, 32, 4, generator=g) * 0.1
        up = torch.randn(1, 4, 32, generator=g) * 0.1
        q0 = "transformer_blocks.0.attn1.to_q"
        got = got_q = ours(x, text, t, lora={q0: (down, up)})
        merged = model.load_dit(out)
        merged.transformer_blocks[0].attn1.to_q.weight += (down[0] @ up[0]).T
        want = merged(x, text, t)
        err = rel_err(got, want)
        print(f"LoRA vs merged weight: rel err {err:.2e}")
        assert err <= 1e-5 and rel_err(got, base) > 1e-3
        # per-sample factors: sample b gets its own (down, up); compare with B=1 runs
        downs = torch.randn(2, 128, 2, generator=g) * 0.1
        ups = torch.randn(2, 2, 32, generator=g) * 0.1
        key = "transformer_blocks.1.ff.net.2"
        got = ours(x, text, t, lora={key: (downs.double(), ups.double())})
        for b in range(2):
            one = ours(x[b:b + 1], text[b:b + 1], t[b:b + 1],
                       lora={key: (downs[b:b + 1], ups[b:b + 1])})
            assert rel_err(got[b:b + 1], one) <= 1e-5
    # training path: gradients reach the factors; bf16 activations with fp32 factors
    down.requires_grad_(True)
    ours(x, text, t, lora={q0: (down, up)}).square().mean().backward()
    assert down.grad is not None and down.grad.abs().sum() > 0
    bf = model.load_dit(out, torch.bfloat16)
    with torch.no_grad():
        y = bf(x.bfloat16(), text.bfloat16(), t, lora={q0: (down, up)})
    assert y.dtype == torch.bfloat16 and rel_err(y.float(), got_q) < 0.05


def test_lora_linear_shapes():
    lin = torch.nn.Linear(6, 5)
    x2, x3 = torch.randn(3, 6), torch.randn(3, 4, 6)
    down, up = torch.randn(3, 6, 2), torch.randn(3, 2, 5)
    assert torch.equal(model.lora_linear(lin, x3), lin(x3))
    want = lin(x3) + x3 @ down @ up
    assert torch.allclose(model.lora_linear(lin, x3, (down, up)), want, atol=1e-5)
    want = lin(x2) + (x2[:, None] @ down @ up)[:, 0]
    assert torch.allclose(model.lora_linear(lin, x2, (down, up)), want, atol=1e-5)
    want = lin(x3) + x3 @ down[:1] @ up[:1]
    assert torch.allclose(model.lora_linear(lin, x3, (down[:1], up[:1])), want, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# T5

@pytest.fixture(scope="module")
def t5_pair(tmp_path_factory):
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(0)
    ref = perturb(T5EncoderModel(T5Config(**TINY_T5)).eval(), seed=2, std=0.5)
    out = tmp_path_factory.mktemp("t5") / "text_encoder"
    ref.save_pretrained(str(out), safe_serialization=True, max_shard_size="20KB")
    return ref, out


def test_t5_matches_transformers(t5_pair):
    ref, out = t5_pair
    assert len(list(out.glob("*.safetensors"))) > 1
    ours = model.load_t5(out)
    ids = torch.randint(0, TINY_T5["vocab_size"], (2, 226),
                        generator=torch.Generator().manual_seed(0))
    ids[1, 40:] = 0  # padding is attended to, as in the pipelines
    with torch.no_grad():
        want = ref(input_ids=ids).last_hidden_state
        got = ours(ids)
    err = rel_err(got, want)
    print(f"T5 (226 tokens): rel err {err:.2e}")
    assert err <= TOL
    from transformers import T5EncoderModel
    for dt in (torch.float16, torch.bfloat16):  # fp16 keeps wo in fp32 on both sides
        ref16 = T5EncoderModel.from_pretrained(str(out), dtype=dt).eval()
        with torch.no_grad():
            want, got = ref16(input_ids=ids).last_hidden_state, model.load_t5(out, dt)(ids)
        err = rel_err(got.float(), want.float())
        print(f"T5 {dt}: rel err {err:.2e}{' (bit-equal)' if torch.equal(got, want) else ''}")
        assert got.dtype == dt and err <= 1e-3


def test_t5_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention
    rel = torch.arange(300)[None] - torch.arange(300)[:, None]
    assert torch.equal(model.t5_buckets(300), T5Attention._relative_position_bucket(rel))


def test_t5_tied_embedding_copy_accepted(t5_pair, tmp_path):
    from safetensors.torch import save_file
    ref, out = t5_pair
    sd = model.read_state_dict(out)
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"].clone()
    save_file(sd, tmp_path / "model.safetensors")
    shutil.copy(out / "config.json", tmp_path / "config.json")
    ids = torch.tensor([[5, 7, 1, 0]])
    with torch.no_grad():
        assert torch.equal(model.load_t5(tmp_path)(ids), model.load_t5(out)(ids))


# ------------------------------------------------------------------------------------------------
# Tokenizer

AWKWARD = ["", " ", "a cat runs", "   leading and trailing   ", "extra    spaces  between",
           "new\nline\ttab\r\n", "héllo wörld — ünïcode 日本語 🎉 ﬁ ① ｆｕｌｌ",
           "x\u3000y\u00a0z", "the</s>cat", "the </s> cat </s>",
           "a<extra_id_5>b <extra_id_0><extra_id_99>", "a <pad> b <unk>",
           "<extra_id_100> <extra_id_7", "</s>", "the quick brown fox jumps " * 80,
           "zoom " * 224 + "</s> tail", "zoom " * 225]


def hf_ids(ref, texts, max_length):
    """transformers' T5 ids, padded to max_length as the pipelines ask."""
    kw = dict(padding="max_length", truncation=True, return_tensors="pt")
    return ref(texts, max_length=max_length, **kw).input_ids


def test_tokenizer_matches_transformers(tiny_tokenizer_dir):
    from transformers import T5Tokenizer
    ref = T5Tokenizer.from_pretrained(str(tiny_tokenizer_dir))
    ours = model.Tokenizer(tiny_tokenizer_dir)
    for max_length in (226, 16):
        want = hf_ids(ref, AWKWARD, max_length)
        got = ours(AWKWARD, max_length=max_length)
        for text, g, w in zip(AWKWARD, got, want):
            assert torch.equal(g, w), (text[:40], g.tolist(), w.tolist())
    assert ours([""])[0, :2].tolist() == [1, 0]
    # random mixtures of words, whitespace, punctuation and special tokens
    import random
    rng = random.Random(0)
    bits = ["cat", "dog ", " fox", "  ", "\n", "\t", ",", ".!?", "é", "日", "</s>", "<pad>",
            "<unk>", "<extra_id_3>", "<", ">", "_", "▁", "0", "zoom-in"]
    texts = ["".join(rng.choice(bits) for _ in range(rng.randint(0, 30))) for _ in range(200)]
    want = hf_ids(ref, texts, 40)
    assert torch.equal(ours(texts, max_length=40), want)


def test_tokenizer_json_only(tiny_tokenizer_dir, tmp_path):
    """A folder saved by current transformers (tokenizer.json, no spiece.model) is read with
    `tokenizers`; its ids equal transformers' there and our sentencepiece path's on the original."""
    from transformers import T5Tokenizer
    T5Tokenizer.from_pretrained(str(tiny_tokenizer_dir)).save_pretrained(str(tmp_path))
    assert (tmp_path / "tokenizer.json").is_file() and not (tmp_path / "spiece.model").exists()
    ref, ours = T5Tokenizer.from_pretrained(str(tmp_path)), model.Tokenizer(tmp_path)
    sp = model.Tokenizer(tiny_tokenizer_dir)
    assert ours.tj is not None and sp.tj is None
    import random
    rng = random.Random(1)
    bits = ["cat", "dog ", " fox", "  ", "\n", "\t", ",", "é", "日", "</s>", "<pad>", "<unk>",
            "<extra_id_3>", "<", "_"]
    texts = AWKWARD + ["".join(rng.choice(bits) for _ in range(rng.randint(0, 30)))
                       for _ in range(100)]
    for max_length in (226, 16):
        want = hf_ids(ref, texts, max_length)
        got = ours(texts, max_length=max_length)
        for text, g, w in zip(texts, got, want):
            assert torch.equal(g, w), (text[:40], g.tolist(), w.tolist())
        assert torch.equal(got, sp(texts, max_length=max_length))


# ------------------------------------------------------------------------------------------------
# The official folder layout (conftest's tiny I2V pipeline) and error cases

def test_official_layout(tiny_pipe_and_dir):
    pipe, root = tiny_pipe_and_dir
    dit = model.load_dit(root / "transformer")
    assert dit.config == model.presets["tiny"]
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 3, 8, 8, 12, generator=g), torch.randn(1, 226, 32, generator=g)
    t = torch.tensor([500])
    err = rel_err(dit(x, text, t), ref_forward(pipe.transformer, x, text, t))
    print(f"DiT tiny I2V (official layout, 226 text tokens): rel err {err:.2e}")
    assert err <= TOL
    ids = model.Tokenizer(root / "tokenizer")(["a cat runs", ""])
    want = pipe.tokenizer(["a cat runs", ""], padding="max_length", max_length=226, truncation=True,
                          return_tensors="pt").input_ids
    assert torch.equal(ids, want)
    with torch.no_grad():
        err = rel_err(model.load_t5(root / "text_encoder")(ids), pipe.text_encoder(ids)[0])
    print(f"T5 tiny (official layout): rel err {err:.2e}")
    assert err <= TOL


@pytest.fixture
def dit_folder(tmp_path):
    """Our tiny DiT saved the official way (config.json + diffusion_pytorch_model.safetensors)."""
    from dataclasses import asdict

    from safetensors.torch import save_file
    cfg = model.presets["tiny"]
    sd = model.DiT(cfg).state_dict()
    config = dict(asdict(cfg), _class_name="CogVideoXTransformer3DModel")
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(sd, tmp_path / "diffusion_pytorch_model.safetensors")
    return tmp_path, sd


def _resave(folder, sd):
    from safetensors.torch import save_file
    save_file(sd, folder / "diffusion_pytorch_model.safetensors")


def test_load_errors(dit_folder, tmp_path_factory):
    folder, sd = dit_folder
    assert model.load_dit(folder, torch.bfloat16).proj_out.weight.dtype == torch.bfloat16
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        model.load_dit(folder / "nope")
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        model.load_dit(empty)
    shutil.copy(folder / "config.json", empty / "config.json")
    with pytest.raises(FileNotFoundError, match="no .safetensors file"):
        model.load_dit(empty)
    (empty / "diffusion_pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match="never unpickle"):
        model.load_dit(empty)
    (empty / "diffusion_pytorch_model.bin").unlink()
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", empty / "a.safetensors")
    (empty / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {**{k: "a.safetensors" for k in sd}, "extra.weight": "a.safetensors"}}))
    with pytest.raises(ValueError, match="1 keys absent from its shards: extra.weight"):
        model.load_dit(empty)
    (empty / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"proj_out.weight": "b.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="names the shard b.safetensors"):
        model.load_dit(empty)

    _resave(folder, {k: v for k, v in sd.items() if k != "proj_out.bias"})
    with pytest.raises(ValueError, match="1 missing keys: proj_out.bias"):
        model.load_dit(folder)
    _resave(folder, {**sd, "foo.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="1 unexpected keys: foo.weight"):
        model.load_dit(folder)
    _resave(folder, {**sd, "proj_out.weight": torch.zeros(3, 32)})
    with pytest.raises(ValueError,
                       match=r"proj_out.weight: checkpoint \[3, 32\] vs model \[16, 32\]"):
        model.load_dit(folder)
    _resave(folder, sd)
    for bad, msg in [(dict(activation_fn="gelu"), "activation_fn='gelu'"),
                     (dict(patch_size=1), "patch_size=1"),
                     (dict(patch_size_t=4), "patch_size_t=4")]:
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, **bad}))
        with pytest.raises(ValueError, match=f"unsupported CogVideoX transformer config: {msg}"):
            model.load_dit(folder)
        (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="feed_forward_proj='relu'"):
        model.T5Config.from_dict(dict(TINY_T5, feed_forward_proj="relu"))
    with pytest.raises(FileNotFoundError, match="no spiece.model or tokenizer.json"):
        model.Tokenizer(folder)


def test_compile_no_graph_break_no_recompile():
    """fullgraph torch.compile (counting backend, no codegen): new LoRAs or timesteps reuse it."""
    torch.manual_seed(0)
    dit = model.DiT(model.presets["tiny"]).eval().requires_grad_(False)
    graphs = []
    f = torch.compile(dit, backend=lambda gm, ex: graphs.append(gm) or gm.forward, fullgraph=True)
    x, text = torch.randn(2, 3, 8, 8, 12), torch.randn(2, 226, 32)
    for i in range(3):
        lora = {"transformer_blocks.0.attn1.to_q": (torch.randn(2, 32, 1), torch.randn(2, 1, 32))}
        t = torch.tensor([999 - i, 10 * i])
        assert torch.equal(f(x, text, t, lora=lora), dit(x, text, t, lora=lora))
    assert len(graphs) == 1


@pytest.mark.parametrize("name,keys,params", [("2b", 736, 1.694), ("5b", 1024, 5.570),
                                              ("5b-i2v", 1025, 5.570), ("1.5-5b", 1024, 5.571),
                                              ("1.5-5b-i2v", 1028, 5.572)])
def test_presets_match_official_key_counts(name, keys, params):
    """Spec §2.1: state-dict key and parameter counts of the official checkpoints (on meta)."""
    with torch.device("meta"):
        dit = model.DiT(model.presets[name])
    assert len(dit.state_dict()) == keys
    assert round(sum(p.numel() for p in dit.parameters()) / 1e9, 3) == params
