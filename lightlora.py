"""LightLoRA (Video2LoRA paper §3.2): per-video rank-r adapters dW = B_aux · B_pred · A_pred · A_aux for the
DiT's frozen linears. A_aux [a, d_in] and B_aux [d_out, b] are trainable, shared by all videos and kept in fp32;
A_pred [r, a] and B_pred [b, r] come from the hypernetwork per video. `fold` turns them into the `lora=`
argument of model.DiT.forward: {linear name: (down [B, d_in, r], up [B, r, d_out])}, y += x @ down @ up.
Also: merge into a weight copy, export for diffusers, and a small native file.  Tests: tests/test_lora.py
"""
import copy
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

ATTN = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")


def adapted_linears(dit, layers="attn"):
    """[(name, d_out, d_in)] of the linears inside transformer_blocks, in module order (= weight-token order)."""
    if layers not in ("attn", "all"):
        raise ValueError(f"layers must be 'attn' or 'all', got {layers!r}")
    out = [(n, m.out_features, m.in_features) for n, m in dit.named_modules() if isinstance(m, nn.Linear)
           and n.startswith("transformer_blocks.") and (layers == "all" or n.endswith(ATTN))]
    if not out:
        raise ValueError(f"the DiT has no linear layers to adapt for layers={layers!r}")
    return out


def orthogonal(n, rows, cols):
    """n random matrices [rows, cols] with orthonormal rows (rows <= cols) or orthonormal columns (rows > cols).
    Cholesky-QR: Q = X R^-1 with R^T R = X^T X, the Q of a QR with positive diagonal; exact to ~1e-6 for a
    Gaussian tall X and ~6x faster than torch.linalg.qr on CPU (77 M params for 5B)."""
    x = torch.randn(n, max(rows, cols), min(rows, cols))
    q = torch.linalg.solve_triangular(torch.linalg.cholesky(x.mT @ x, upper=True), x, upper=True, left=False)
    return (q if rows > cols else q.mT).contiguous()  # LAPACK returns column-major


class LightLoRA(nn.Module):
    """Aux factors stacked per distinct (d_out, d_in): `A_aux.{d_out}x{d_in}` [n, a, d_in] and `B_aux.…` [n,
    d_out, b], so one einsum folds every layer of a shape. Magnitude: exactly orthonormal (constant 1), which
    makes the aux maps isometries of the predicted factors: ||down|| = ||A_pred|| and ||up|| = scale·||B_pred||,
    so the LoRA's size is read off the hypernet's outputs (spectral norm of dW = scale·||A_pred||·||B_pred||
    for r=1) and the hypernet's head init alone sets it (hypernet.py: ||A_pred|| ~ 1, B_pred = 0)."""

    def __init__(self, dit, a=100, b=50, r=1, layers="attn", scale=1.0):
        super().__init__()
        self.a, self.b, self.r, self.layers, self.scale = a, b, r, layers, scale
        linears = adapted_linears(dit, layers)
        self.names = [n for n, _, _ in linears]
        self.shapes = [(o, i) for _, o, i in linears]
        self.n_layers = len(self.names)
        self.A_aux, self.B_aux, self.groups = nn.ParameterDict(), nn.ParameterDict(), {}
        for o, i in dict.fromkeys(self.shapes):
            key, idx = f"{o}x{i}", [j for j, s in enumerate(self.shapes) if s == (o, i)]
            self.groups[key] = [self.names[j] for j in idx]
            self.A_aux[key] = nn.Parameter(orthogonal(len(idx), a, i))
            self.B_aux[key] = nn.Parameter(orthogonal(len(idx), o, b))
            # explicit device: stays real when the module is built on "meta" to be loaded with assign=True
            self.register_buffer("idx_" + key, torch.tensor(idx, device="cpu"), persistent=False)

    def count(self):
        return dict(layers=self.n_layers, predicted_per_video=self.n_layers * (self.a + self.b) * self.r,
                    aux=sum(p.numel() for p in self.parameters()))

    def extra_repr(self):
        c = self.count()
        return (f"{c['layers']} layers ({self.layers}), a={self.a} b={self.b} r={self.r}: "
                f"{c['predicted_per_video']:,} predicted values/video ({c['predicted_per_video'] * 2 / 1e3:.1f} "
                f"KB bf16), {c['aux']:,} aux params")

    def fold(self, A_pred, B_pred, scale=None):
        """A_pred [B, L, r, a], B_pred [B, L, b, r] -> {name: (down [B, d_in, r], up [B, r, d_out])} in fp32.
        The small factors are folded into the aux ones first; dW itself is never formed."""
        scale, L = self.scale if scale is None else scale, self.n_layers
        if A_pred.shape[1:] != (L, self.r, self.a) or B_pred.shape[1:] != (L, self.b, self.r):
            raise ValueError(f"fold wants A_pred [B, {L}, {self.r}, {self.a}] and B_pred [B, {L}, {self.b}, {self.r}]; "
                             f"got {tuple(A_pred.shape)} and {tuple(B_pred.shape)}")
        out = {}
        for key, names in self.groups.items():
            idx, A_aux, B_aux = getattr(self, "idx_" + key), self.A_aux[key], self.B_aux[key]
            ap = A_pred.index_select(1, idx).to(A_aux.dtype)
            bp = B_pred.index_select(1, idx).to(B_aux.dtype)
            down = torch.einsum("nlra,lai->nlir", ap, A_aux)  # (A_pred A_aux)^T
            up = torch.einsum("lok,nlkr->nlro", B_aux, bp) * scale  # (scale B_aux B_pred)^T
            out.update({n: (down[:, j], up[:, j]) for j, n in enumerate(names)})
        return {n: out[n] for n in self.names}


def _one(lora, what):
    for name, (down, up) in lora.items():
        if down.shape[0] != 1 or up.shape[0] != 1:
            raise ValueError(f"{what} takes one LoRA (batch 1); {name} has down {tuple(down.shape)}")
    return lora


@torch.no_grad()
def merge(dit, lora, inplace=False):
    """A DiT (a deep copy unless inplace) whose adapted weights are W + (down @ up)^T, summed in fp32."""
    dit = dit if inplace else copy.deepcopy(dit)
    mods = dict(dit.named_modules())
    for name, (down, up) in _one(lora, "merge").items():
        if name not in mods:
            raise ValueError(f"merge: the DiT has no module {name}")
        w = mods[name].weight
        w.copy_(w.float() + (down[0].float() @ up[0].float()).T.to(w.device))
    return dit


def save_atomic(tensors, path, metadata):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # per process: two writers never share a temp file
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    umask = os.umask(0o022)  # reading it means setting it (no threads write here); put it back at once
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates files 0600 whatever the umask; teammates must read them
    os.replace(tmp, path)


def export_diffusers(path, lora, dtype=None):
    """Standard rank-r LoRA for diffusers (CogVideoXLoraLoaderMixin.load_lora_weights / load_lora_adapter):
    `transformer.{name}.lora_A.weight` [r, d_in] and `.lora_B.weight` [d_out, r]. No alpha is written, so
    diffusers sets lora_alpha = r and peft's scaling alpha/r = 1: the scale already sits in lora_B."""
    sd = {}
    for name, (down, up) in _one(lora, "export").items():
        sd[f"transformer.{name}.lora_A.weight"] = down[0].T.to(dtype or down.dtype)
        sd[f"transformer.{name}.lora_B.weight"] = up[0].T.to(dtype or up.dtype)
    save_atomic(sd, path, {"format": "pt"})


def save_native(path, lora, dtype=torch.float32):
    """Our own file: the folded (down, up) of each adapted layer (`{name}.down` [B, d_in, r], `{name}.up`
    [B, r, d_out]) and the layer names in order; self-contained (no aux checkpoint needed to use it)."""
    sd = {f"{n}.{k}": t.to(dtype) for n, (d, u) in lora.items() for k, t in (("down", d), ("up", u))}
    save_atomic(sd, path, {"format": "video2lora-lora", "names": json.dumps(list(lora))})


def load_native(path, device="cpu"):
    if not Path(path).is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    with safe_open(str(path), "pt", device=str(device)) as f:
        meta = f.metadata() or {}
        if meta.get("format") != "video2lora-lora":
            raise ValueError(f"{path} is not a native video2lora LoRA file (metadata format={meta.get('format')!r})")
        return {n: (f.get_tensor(n + ".down"), f.get_tensor(n + ".up")) for n in json.loads(meta["names"])}
