"""lightlora.py + hypernet.py on the tiny I2V DiT (conftest): exact no-op at init, gradients,
per-sample LoRAs, LoRA path == materialised dW == merged == diffusers with our exported file,
save/load, 5B counts on meta. Run: python -m pytest -q tests/test_lora.py (-s: counts, errors)"""
import copy
from dataclasses import replace

import pytest
import torch

import hypernet
import lightlora
import model
from hypernet import Video2LoRA


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def dit(tiny_model_dir):
    return model.load_dit(tiny_model_dir / "transformer")


def dit_inputs(B=2, seed=0):  # tiny I2V: latents [B, 3, 8, 8, 12], 226 text tokens (learned PE)
    g = torch.Generator().manual_seed(seed)
    x, text = torch.randn(B, 3, 8, 8, 12, generator=g), torch.randn(B, 226, 32, generator=g)
    return x, text, torch.tensor([900, 321])[:B]


def refs(B=2, F=3, H=8, W=12, seed=1):  # reference latents: VAE channels (4), DiT layout
    return torch.randn(B, F, 4, H, W, generator=torch.Generator().manual_seed(seed))


def random_factors(lo, B, seed=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, lo.n_layers, lo.r, lo.a, generator=g) * 0.1,
            torch.randn(B, lo.n_layers, lo.b, lo.r, generator=g) * 0.1)


@torch.no_grad()
def test_init_is_exact_noop(dit):
    torch.manual_seed(0)
    v2l = Video2LoRA(dit, "tiny", layers="all")
    x, text, t = dit_inputs()
    lora = v2l(refs())
    assert all(up.abs().max() == 0 for _, up in lora.values())
    assert all(down.abs().max() > 0 for down, _ in lora.values())  # only B_pred is zero
    assert torch.equal(dit(x, text, t, lora=lora), dit(x, text, t))
    zero = v2l.lora.fold(*(torch.zeros_like(f) for f in random_factors(v2l.lora, 2)))
    assert torch.equal(dit(x, text, t, lora=zero), dit(x, text, t))


def grads(v2l, dit):
    v2l.zero_grad(set_to_none=False)
    x, text, t = dit_inputs()
    dit(x, text, t, lora=v2l(refs())).square().mean().backward()
    return {n: p.grad.abs().max().item() for n, p in v2l.named_parameters()}


def test_gradients_first_and_second_step(dit):
    """Step 1: only head_B has a gradient (HyperNet.init_weights says why). Step 2, after one AdamW
    step: every trainable tensor, hypernet and both aux factors of every shape group, has one."""
    torch.manual_seed(0)
    v2l = Video2LoRA(dit, "tiny", layers="all")
    g1 = grads(v2l, dit)
    assert g1["hypernet.head_B.weight"] > 0 and g1["hypernet.head_B.bias"] > 0
    assert all(g == 0 for n, g in g1.items() if not n.startswith("hypernet.head_B"))
    torch.optim.AdamW(v2l.parameters(), lr=1e-3).step()
    g2 = grads(v2l, dit)
    assert all(g > 0 for g in g2.values()), [n for n, g in g2.items() if g == 0]


@torch.no_grad()
def test_batch_of_two_loras_equals_one_by_one(dit):
    lo = lightlora.LightLoRA(dit, layers="all")
    x, text, t = dit_inputs()
    lora = lo.fold(*random_factors(lo, 2))
    both = dit(x, text, t, lora=lora)
    for i in range(2):
        one = dit(x[i:i + 1], text[i:i + 1], t[i:i + 1],
                  lora={n: (d[i:i + 1], u[i:i + 1]) for n, (d, u) in lora.items()})
        assert rel_err(both[i:i + 1], one) < 1e-5
    assert rel_err(both[0], dit(x, text, t)[0]) > 1e-3  # the LoRA does something


@torch.no_grad()
def test_lora_path_equals_materialised_dw(dit):
    lo = lightlora.LightLoRA(dit, a=20, b=10, r=2, layers="all", scale=0.5)
    A, B = random_factors(lo, 1)
    x, text, t = dit_inputs(B=1)
    ref = copy.deepcopy(dit)
    mods = dict(ref.named_modules())
    for j, (name, (o, i)) in enumerate(zip(lo.names, lo.shapes)):
        key = f"{o}x{i}"
        k = lo.groups[key].index(name)
        dW = 0.5 * lo.B_aux[key][k] @ B[0, j] @ A[0, j] @ lo.A_aux[key][k]  # [d_out, d_in], eq. 3
        mods[name].weight += dW
    out = dit(x, text, t, lora=lo.fold(A, B))
    err = rel_err(out, ref(x, text, t))
    print(f"LoRA path vs materialised dW: rel err {err:.2e}")
    assert err < 1e-5
    merged = lightlora.merge(dit, lo.fold(A, B))
    assert rel_err(merged(x, text, t), out) < 1e-5
    q = merged.transformer_blocks[0].attn1.to_q.weight
    assert not torch.equal(q, dit.transformer_blocks[0].attn1.to_q.weight)


@torch.no_grad()
def test_native_round_trip(dit, tmp_path):
    lo = lightlora.LightLoRA(dit)
    lora = lo.fold(*random_factors(lo, 1))
    lightlora.save_native(tmp_path / "l.safetensors", lora)
    back = lightlora.load_native(tmp_path / "l.safetensors")
    assert list(back) == lo.names
    assert all(torch.equal(lora[n][0], back[n][0]) and torch.equal(lora[n][1], back[n][1])
               for n in lo.names)
    lightlora.export_diffusers(tmp_path / "d.safetensors", lora)
    with pytest.raises(ValueError, match="not a native"):
        lightlora.load_native(tmp_path / "d.safetensors")


@torch.no_grad()
@pytest.mark.parametrize("layers", ["attn", "all"])
def test_diffusers_loads_our_export(dit, tiny_model_dir, tmp_path, layers):
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
    lo = lightlora.LightLoRA(dit, layers=layers, scale=0.7)
    lora = lo.fold(*random_factors(lo, 1))
    lightlora.export_diffusers(tmp_path / "lora.safetensors", lora)
    ref = CogVideoXTransformer3DModel.from_pretrained(str(tiny_model_dir / "transformer")).eval()
    ref.load_lora_adapter(str(tmp_path / "lora.safetensors"), prefix="transformer")
    x, text, t = dit_inputs(B=1)
    rope = get_3d_rotary_pos_embed(16, get_resize_crop_region_for_grid((4, 6), 6, 4), (4, 6), 3)
    want = ref(x, text, t, image_rotary_emb=rope, return_dict=False)[0]
    err = rel_err(dit(x, text, t, lora=lora), want)
    print(f"diffusers + exported LoRA ({layers}) vs ours: rel err {err:.2e}")
    assert err < 1e-4 and rel_err(dit(x, text, t), want) > 1e-3


def test_counts_5b_i2v_on_meta():
    with torch.device("meta"):
        dit5 = model.DiT(model.presets["5b-i2v"])
        v2l = Video2LoRA(dit5)
        every = lightlora.LightLoRA(dit5, layers="all")
    c = v2l.count()
    print(f"\n5B-I2V attn: {c}\n{v2l.lora.extra_repr()}\nall linears: {every.extra_repr()}")
    assert c["layers"] == 168 and c["predicted_per_video"] == 168 * 150 == 25_200
    assert c["aux"] == 168 * (100 * 3072 + 3072 * 50) == 77_414_400
    assert 1e6 < c["hypernet"] < 1e7
    D = 3072
    per_block = [(6 * D, 512)] * 2 + [(D, D)] * 4 + [(4 * D, D), (D, 4 * D)]
    assert every.count()["aux"] == 42 * sum(100 * i + o * 50 for o, i in per_block)
    assert every.n_layers == 336


@torch.no_grad()
def test_refinement_passes(dit):
    torch.manual_seed(0)
    v2l = Video2LoRA(dit, "tiny")
    torch.nn.init.normal_(v2l.hypernet.head_B.weight, std=0.1)
    hn = v2l.hypernet
    outs = [hn(refs(), iters=k) for k in (1, 2, 3, 4)]
    for i in range(4):
        for j in range(i):
            assert rel_err(outs[i][0], outs[j][0]) > 1e-4 and rel_err(outs[i][1], outs[j][1]) > 1e-4
    # eq. 4: the passes only add residual updates to a state that starts at 0. Zero passes read the
    # heads off state 0; with the update layer zeroed every k gives exactly that.
    L, d = hn.weight_tokens.shape
    zero = hn.head_norm(torch.zeros(2, L, d))
    want = hn.head_A(zero).view(2, L, hn.r, hn.a), hn.head_B(zero).view(2, L, hn.b, hn.r)
    assert all(torch.equal(a, b) for a, b in zip(hn(refs(), iters=0), want))
    torch.nn.init.zeros_(hn.update.weight)
    torch.nn.init.zeros_(hn.update.bias)
    assert all(torch.equal(a, b) for k in (1, 3) for a, b in zip(hn(refs(), iters=k), want))


@torch.no_grad()
def test_padded_batch_and_sizes(dit):
    torch.manual_seed(0)
    hn = Video2LoRA(dit, "tiny").hypernet
    torch.nn.init.normal_(hn.head_B.weight, std=0.1)
    long, short = refs(1, 3, seed=3), refs(1, 2, seed=4)
    padded = torch.cat([short, 5 * refs(1, 1, seed=5)], 1)  # junk there must not matter
    A, B = hn(torch.cat([long, padded]), frames=torch.tensor([3, 2]))
    for i, alone in enumerate((long, short)):
        a, b = hn(alone)
        assert rel_err(A[i:i + 1], a) < 1e-5 and rel_err(B[i:i + 1], b) < 1e-5
    a, _ = hn(refs(1, 5, 9, 7))  # 17 frames at 72x56 pixels: odd latent sizes pad to the patch grid
    assert a.shape == A[:1].shape and a.isfinite().all()
    with pytest.raises(ValueError, match="reference latents"):
        hn(torch.randn(1, 3, 8, 8, 12))  # the DiT's input (image latents too), not the reference


def test_save_load(dit, tmp_path):
    torch.manual_seed(0)
    v2l = Video2LoRA(dit, "tiny", a=10, b=5, layers="all", scale=0.5)
    torch.nn.init.normal_(v2l.hypernet.head_B.weight, std=0.1)
    path = tmp_path / "ckpt.safetensors"
    opt = torch.optim.AdamW(v2l.parameters())
    sum(u.sum() for _, u in v2l(refs()).values()).backward()
    opt.step()
    hypernet.save(path, v2l, opt, meta={"step": 7})
    back, meta = hypernet.load(path, dit)
    opt2 = torch.optim.AdamW(back.parameters())
    hypernet.load_optimizer(path, back, opt2)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    same = all(torch.equal(s1[i][k], s2[i][k]) for i in s1 for k in s1[i])
    assert s1.keys() == s2.keys() and same
    assert meta == {"step": 7} and back.lora.scale == 0.5 and back.lora.names == v2l.lora.names
    assert all(p.device.type == "cpu" and p.requires_grad and p.dtype == torch.float32
               for p in back.parameters())
    sd, sd2 = v2l.state_dict(), back.state_dict()
    assert list(sd) == list(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    with torch.no_grad():
        r = refs()
        assert all(torch.equal(u, v) for (_, u), (_, v) in zip(v2l(r).values(), back(r).values()))
    other = model.DiT(replace(model.presets["tiny"], num_layers=3))
    with pytest.raises(ValueError, match="16 adapted layers.*this DiT has 24"):
        hypernet.load(path, other)
