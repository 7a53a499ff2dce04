"""LightLoRA (Video2LoRA paper §3.2): per-video dW = B_aux·B_pred·A_pred·A_aux for the DiT's
frozen linears. A_aux [a, d_in], B_aux [d_out, b]: shared, fp32; A_pred [r, a], B_pred [b, r]:
from the hypernet. `fold` makes DiT.forward's `lora=` {name: (down [B,d_in,r], up [B,r,d_out])}."""
import copy
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

import common
from model import ATTN_LINEARS


def adapted_linears(dit, layers="attn"):
    """[(name, d_out, d_in)] of transformer_blocks' linears, in module (= weight token) order."""
    if layers not in ("attn", "all"):
        raise ValueError(f"layers must be 'attn' or 'all', got {layers!r}")
    out = [(n, m.out_features, m.in_features) for n, m in dit.named_modules()
           if isinstance(m, nn.Linear) and n.startswith("transformer_blocks.")
           and (layers == "all" or n.endswith(ATTN_LINEARS))]
    if not out:
        raise ValueError(f"the DiT has no linear layers to adapt for layers={layers!r}")
    return out


def orthogonal(n, rows, cols):
    """n random [rows, cols], orthonormal rows (rows <= cols) or columns. Cholesky-QR (Q = X R^-1):
    exact to ~1e-6 for a Gaussian X, ~6x faster than torch.linalg.qr on CPU (77 M params at 5B)."""
    x = torch.randn(n, max(rows, cols), min(rows, cols))
    R = torch.linalg.cholesky(x.mT @ x, upper=True)  # R^T R = X^T X
    q = torch.linalg.solve_triangular(R, x, upper=True, left=False)
    return (q if rows > cols else q.mT).contiguous()  # LAPACK returns column-major


class LightLoRA(nn.Module):
    """Aux factors stacked per (d_out, d_in), `A_aux.{o}x{i}` [n, a, d_in] and `B_aux.{o}x{i}`
    [n, d_out, b], so one einsum folds all layers of a shape. Orthonormal: ||down|| = ||A_pred||,
    ||up|| = scale ||B_pred||, so the hypernet's outputs alone set the LoRA's size."""

    def __init__(self, dit, a=100, b=50, r=1, layers="attn", scale=1.0):
        super().__init__()
        self.a, self.b, self.r, self.layers, self.scale = a, b, r, layers, scale
        linears = adapted_linears(dit, layers)
        self.names, self.shapes = [n for n, _, _ in linears], [(o, i) for _, o, i in linears]
        self.n_layers = len(self.names)
        self.A_aux, self.B_aux, self.groups = nn.ParameterDict(), nn.ParameterDict(), {}
        for o, i in dict.fromkeys(self.shapes):
            key, idx = f"{o}x{i}", [j for j, s in enumerate(self.shapes) if s == (o, i)]
            self.groups[key] = [self.names[j] for j in idx]
            self.A_aux[key] = nn.Parameter(orthogonal(len(idx), a, i))
            self.B_aux[key] = nn.Parameter(orthogonal(len(idx), o, b))
            # on cpu: stays real when built on "meta" (load() with assign=True)
            self.register_buffer("idx_" + key, torch.tensor(idx, device="cpu"), persistent=False)

    def count(self):
        per_video = self.n_layers * (self.a + self.b) * self.r
        aux = sum(p.numel() for p in self.parameters())
        return dict(layers=self.n_layers, predicted_per_video=per_video, aux=aux)

    def extra_repr(self):
        c, n = self.count(), self.count()["predicted_per_video"]
        return (f"{c['layers']} layers ({self.layers}), a={self.a} b={self.b} r={self.r}: {n:,} "
                f"predicted values/video ({n * 2 / 1e3:.1f} KB bf16), {c['aux']:,} aux params")

    def fold(self, A_pred, B_pred, scale=None):
        """A_pred [B,L,r,a], B_pred [B,L,b,r] -> {name: (down [B,d_in,r], up [B,r,d_out])} in fp32:
        down = (A_pred A_aux)^T, up = scale (B_aux B_pred)^T; dW itself is never formed."""
        scale, L, r = self.scale if scale is None else scale, self.n_layers, self.r
        if A_pred.shape[1:] != (L, r, self.a) or B_pred.shape[1:] != (L, self.b, r):
            raise ValueError(f"fold wants A_pred [B, {L}, {r}, {self.a}] and B_pred [B, {L}, "
                             f"{self.b}, {r}]; got {tuple(A_pred.shape)} and {tuple(B_pred.shape)}")
        out = {}
        for key, names in self.groups.items():
            idx, A_aux, B_aux = getattr(self, "idx_" + key), self.A_aux[key], self.B_aux[key]
            ap, bp = A_pred.index_select(1, idx), B_pred.index_select(1, idx)
            down = torch.einsum("nlra,lai->nlir", ap.to(A_aux.dtype), A_aux)
            up = torch.einsum("lok,nlkr->nlro", B_aux, bp.to(B_aux.dtype)) * scale
            out.update({n: (down[:, j], up[:, j]) for j, n in enumerate(names)})
        return {n: out[n] for n in self.names}


def _one(lora, what):
    for n, (down, up) in lora.items():
        if down.shape[0] != 1 or up.shape[0] != 1:
            raise ValueError(f"{what} takes one LoRA (batch 1); {n} has down {tuple(down.shape)}")
    return lora


@torch.no_grad()
def merge(dit, lora, inplace=False):
    """A DiT (a deep copy unless inplace) with adapted weights W + (down @ up)^T, summed in fp32."""
    dit = dit if inplace else copy.deepcopy(dit)
    mods = dict(dit.named_modules())
    for name, (down, up) in _one(lora, "merge").items():
        if name not in mods:
            raise ValueError(f"merge: the DiT has no module {name}")
        w = mods[name].weight
        w.copy_(w.float() + (down[0].float() @ up[0].float()).T.to(w.device))
    return dit


def export_diffusers(path, lora, dtype=None):
    """Rank-r LoRA for diffusers' load_lora_weights: `transformer.{name}.lora_A.weight` [r, d_in],
    `.lora_B.weight` [d_out, r]. No alpha, so peft's scaling is r/r = 1: lora_B holds the scale."""
    sd = {}
    for name, (down, up) in _one(lora, "export").items():
        sd[f"transformer.{name}.lora_A.weight"] = down[0].T.to(dtype or down.dtype)
        sd[f"transformer.{name}.lora_B.weight"] = up[0].T.to(dtype or up.dtype)
    common.save_safetensors(path, sd, {"format": "pt"})


def save_native(path, lora, dtype=torch.float32):
    """A self-contained file: each layer's folded `{name}.down` [B,d_in,r] and `.up` [B,r,d_out]."""
    sd = {f"{n}.{k}": t.to(dtype) for n, du in lora.items() for k, t in zip(("down", "up"), du)}
    meta = {"format": "video2lora-lora", "names": json.dumps(list(lora))}
    common.save_safetensors(path, sd, meta)


def load_native(path, device="cpu", dit=None):
    """A save_native file -> LoRA dict; with `dit`, ValueError unless it fits that DiT's linears."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    try:
        with safe_open(str(path), "pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("format") != "video2lora-lora":
                raise ValueError(f"{path} is not a native video2lora LoRA file (metadata format="
                                 f"{meta.get('format')!r})")
            names = json.loads(meta["names"])
            lora = {n: (f.get_tensor(n + ".down"), f.get_tensor(n + ".up")) for n in names}
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable LoRA file ({e})") from None
    want = {n: (1, i, o) for n, o, i in adapted_linears(dit, "all")} if dit is not None else {}
    for name, (down, up) in lora.items() if want else ():
        if want.get(name) != (*down.shape[:2], up.shape[2]) or up.shape[:2] != (1, down.shape[2]):
            raise ValueError(f"{path}: {name} (down {tuple(down.shape)}, up {tuple(up.shape)}) "
                             f"does not fit this model's DiT: the LoRA was made for another model")
    return lora


def blend(loras):
    """[(LoRA dict, weight)] -> one LoRA with effect sum_i w_i/sum(w) down_i up_i, exactly: factors
    are concatenated along r; a layer a LoRA lacks gets nothing from it. Run on one LoRA too: cat
    gives the fold's strided views a --lora file's layout, so a saved LoRA replays bit for bit."""
    total, names = sum(w for _, w in loras), dict.fromkeys(k for l, _ in loras for k in l)
    return {k: (torch.cat([l[k][0] * (w / total) for l, w in loras if k in l], dim=-1),
                torch.cat([l[k][1] for l, _ in loras if k in l], dim=1)) for k in names}
