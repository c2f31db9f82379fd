"""The Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

One plain PyTorch module, read top to bottom. Parameter names follow the official release exactly
(`x_embedder.proj`, `t_embedder.mlp.0`, `y_embedder.embedding_table`, `blocks.N.adaLN_modulation.1`,
`final_layer.linear`, ...): they are an interface, since official checkpoints load with `strict=True`.

Optional block variants (LightningDiT, Yao et al. 2025, "Reconstruction vs. Generation"), each a
`DiTConfig` field that is off by default; with all of them off the module is the official one, weight
for weight and output for output:
* `norm="rmsnorm"`: RMSNorm (Zhang & Sennrich 2019) instead of the affine-free LayerNorms (blocks and
  final layer);
* `mlp="swiglu"`: a SwiGLU MLP (Shazeer 2020) of 2/3 the width, so the parameter count matches;
* `rope=True`: 2-D axial rotary position embedding on q and k (Su et al. 2021; axial as in EVA-02),
  on top of the absolute sin-cos table, which stays (as in LightningDiT);
* `qk_norm=True`: a learnable norm over each head's q and k before attention (Dehghani et al. 2023).

Optional scalar conditions beside t (`SCALAR_CONDITIONS`, one row each; off by default, and then absent:
no parameter, no operation). Each is embedded by a `TimestepEmbedder` of its own and added to t's
embedding; `forward` then takes it by its keyword:
* `gap=` (`time_gap_embedding=True`, `gap_embedder`): the gap h = t − r of MeanFlow's average velocity
  u(z, r, t) (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"), the paper's (t, t − r)
  conditioning (its Table 1c).
* `guidance=` (`guidance_embedding=True`, `guidance_embedder`, of ω − 1 so that 0 is unguided): the
  classifier-free guidance scale ω as an input, as improved MeanFlow conditions on it (Geng et al.
  2025b, arXiv 2512.02012, section 4): one network serves every scale, sampled in one call.

Shapes: N batch, C latent channels, H/W latent height/width, p patch size, T = (H/p)(W/p) tokens,
D hidden size, h heads, d = D/h head dimension, G = H/p grid side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from .routing import TokenRoute

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
# The block options (LightningDiT) as DiTConfig fields; all at their defaults is the official block.
BLOCK_OPTIONS = ("norm", "mlp", "rope", "qk_norm")


@dataclass(frozen=True)
class ScalarCondition:
    """A scalar input beside t: `forward(..., keyword=values (N,))` when the DiTConfig field `switch` is
    on; embedded by the module `embedder` (its state-dict prefix) at `values + offset`."""

    keyword: str
    switch: str
    embedder: str
    offset: float = 0.0
    what: str = ""  # what it is, for messages
    example: str = ""  # what to pass, for messages


# In this order (their embedders are built, initialised and summed in it). A new condition is a row.
SCALAR_CONDITIONS = (
    ScalarCondition("gap", "time_gap_embedding", "gap_embedder", what="a time gap (MeanFlow's)", example="t - r"),
    ScalarCondition("guidance", "guidance_embedding", "guidance_embedder", offset=-1.0,
                    what="its guidance scale as an input", example="the scale"),
)


@dataclass
class DiTConfig:
    input_size: int = 32  # latent side (image side / 8 for the SD VAE)
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1  # > 0 adds the null class used by classifier-free guidance
    num_classes: int = 1000
    learn_sigma: bool = True  # predict the variance interpolation too (Nichol & Dhariwal 2021)
    # Block options (module docstring); the defaults are the official DiT.
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    mlp: str = "gelu"  # "gelu" | "swiglu"
    rope: bool = False  # 2-D rotary position embedding on q and k
    qk_norm: bool = False  # normalise each head's q and k (with the kind of `norm`)
    # MeanFlow's second time input: embed the gap t − r too (module docstring); off is the official DiT.
    time_gap_embedding: bool = False
    # Improved MeanFlow's guidance scale as an input (module docstring); off is the official DiT.
    guidance_embedding: bool = False
    # RAE's wide, shallow DDT head (`fastdit.models.ddt`, DiT^DH): `head_depth` blocks of width
    # `head_hidden_size` with `head_num_heads` heads after the `depth` blocks above; 0 is no head (a DiT).
    head_depth: int = 0
    head_hidden_size: int = 0
    head_num_heads: int = 0

    def __post_init__(self) -> None:
        if self.input_size <= 0 or self.input_size % self.patch_size:
            raise UserError(
                f"input size {self.input_size} is not divisible by the patch size {self.patch_size}; "
                f"use a multiple of {self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise UserError(f"hidden size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_classes < 1:
            raise UserError(f"num_classes must be >= 1, got {self.num_classes}")
        if not 0 <= self.class_dropout_prob < 1:
            raise UserError(f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")
        if self.norm not in NORMS:
            raise UserError(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.mlp not in MLPS:
            raise UserError(f"mlp must be one of {', '.join(MLPS)}, got {self.mlp!r}")
        for name in ("rope", "qk_norm", *(condition.switch for condition in SCALAR_CONDITIONS)):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.rope and self.head_dim % 4:
            raise UserError(
                f"rope needs a head dimension (hidden_size / num_heads = {self.hidden_size} / {self.num_heads} "
                f"= {self.head_dim}) divisible by 4: rotary pairs need an even count, and 2-D RoPE gives half the "
                f"pairs to rows and half to columns; change hidden_size or num_heads, or turn rope off"
            )
        if self.head_depth or self.head_hidden_size or self.head_num_heads:
            self._check_head()

    def _check_head(self) -> None:
        """The DDT head's fields (DiT^DH, `fastdit.models.ddt`): all three set, and what RAE's head needs."""
        for name in ("head_depth", "head_hidden_size", "head_num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"a DDT head needs {name} >= 1 (or all three head fields 0 for a DiT), got {value!r}")
        if self.head_hidden_size % self.head_num_heads or (self.head_hidden_size // self.head_num_heads) % 4:
            raise UserError(
                f"the DDT head's width {self.head_hidden_size} over {self.head_num_heads} heads must give a head "
                f"dimension divisible by 4 (2-D RoPE rotates pairs, half by rows, half by columns); change "
                f"head_hidden_size or head_num_heads")
        if not self.rope:
            raise UserError("DiT^DH rotates q and k in every block (RoPE), as RAE's DDT does: leave rope on")
        inputs = [condition.switch for condition in SCALAR_CONDITIONS if getattr(self, condition.switch)]
        if inputs:
            raise UserError(f"DiT^DH takes t and the label only, not {', '.join(inputs)} (MeanFlow's inputs): "
                            f"train MeanFlow with a DiT preset")

    @property
    def has_head(self) -> bool:
        """Whether this is a DiT^DH: a DiT with RAE's DDT head (`fastdit.models.ddt`)."""
        return self.head_depth > 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def null_class(self) -> int:
        """Label of the unconditional ("null") class: one past the last real class."""
        return self.num_classes


def make_norm(kind: str, dim: int, affine: bool) -> nn.Module:
    """LayerNorm or RMSNorm over the last `dim` features, eps 1e-6 as in the official blocks."""
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=1e-6, elementwise_affine=affine)
    return nn.LayerNorm(dim, eps=1e-6, elementwise_affine=affine)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # adaLN: per-sample shift/scale broadcast over tokens. (N, T, D), (N, D) -> (N, T, D)
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ----------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Cut the latent into p×p patches and project each to D (a strided convolution)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, C, H, W) -> (N, T, D)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the (integer or real) timestep, then a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    @staticmethod
    def timestep_embedding(
        t: torch.Tensor, dim: int, max_period: float = 10000.0, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        # Transformer-style frequencies exp(-ln(max_period) k / half), k = 0..half-1, computed in
        # float32 as the official code does; the cosine half comes FIRST. (N,) -> (N, dim)
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].to(dtype) * freqs[None].to(dtype)  # float32: the official t.float() * freqs
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # A float64 module (the finite-difference tests of MeanFlow's derivatives in t) takes the
        # features in float64 as well: rounding t to float32 would make f(t ± h) a staircase of
        # float32 steps. Every float32/half module computes them exactly as the official code does.
        dtype = torch.float64 if self.mlp[0].weight.dtype == torch.float64 else torch.float32
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size, dtype=dtype)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels to vectors; in training, labels are replaced by the null class with probability
    `dropout_prob`, which trains the unconditional model used by classifier-free guidance
    (Ho & Salimans 2022)."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        has_null_class = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(has_null_class), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """`force_drop_ids` (bool or 0/1 per label) replaces the random draw, so a training loop can
        take the dropout decisions from its own seeded generator."""
        if force_drop_ids is not None:
            labels = torch.where(force_drop_ids.bool(), self.num_classes, labels)
        elif train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


# ----------------------------------------------------------------------------------------------
# Transformer
# ----------------------------------------------------------------------------------------------


def rope_2d_angles(rows: torch.Tensor, cols: torch.Tensor, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """Rotation angles of 2-D axial RoPE, in float64: (T,) row and column indices -> (T, d/2), one angle
    per pair of head dims. The first d/4 pairs (head dims 0..d/2-1) turn with the row index, the last
    d/4 pairs with the column index; each axis uses the 1-D frequencies of RoFormer (Su et al. 2021, sec. 3.2.2),
    theta_k = base^(-k / (d/4)), k = 0..d/4-1, over its d/2 dims."""
    freqs = base ** (-torch.arange(head_dim // 4, dtype=torch.float64) / (head_dim // 4))  # (d/4,)
    return torch.cat([rows.double()[:, None] * freqs, cols.double()[:, None] * freqs], dim=1)  # (T, d/2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair of adjacent dims (2i, 2i+1) of x by its token's angle i: the elementwise form of
    RoFormer's block-diagonal rotation matrix (Su et al. 2021, section 3.4.2).
    x (..., T, d), cos/sin (T, d/2) -> (..., T, d). Because rotations compose, the score between a
    query at position m and a key at n depends on m - n only: RoPE is a relative position code."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # each (..., T, d/2)
    rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, qk_norm: str | None = None):
        """`qk_norm`: None (official), or the norm kind ("layernorm" | "rmsnorm") applied over each
        head's q and k, with a learnable gain as in Dehghani et al. 2023 (ViT-22B, section 2)."""
        super().__init__()
        self.num_heads = num_heads
        head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, hidden_size * 3, bias=True)
        if qk_norm is not None:
            self.q_norm = make_norm(qk_norm, head_dim, affine=True)
            self.k_norm = make_norm(qk_norm, head_dim, affine=True)
        self.qk_norm = qk_norm is not None
        self.proj = nn.Linear(hidden_size, hidden_size, bias=True)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, heads, T, D/heads)
        if self.qk_norm:  # bounds the attention logits, which otherwise can grow and diverge
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # rope = (cos, sin), each (T, d/2); v is not rotated
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # Fused attention (flash / memory-efficient kernels where available).
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class Mlp(nn.Module):
    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden, hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def swiglu_hidden(mlp_hidden: int) -> int:
    """SwiGLU width that matches a GELU MLP of width `mlp_hidden` in parameters: three D×w matrices
    instead of two D×mlp_hidden ones gives w = 2/3 mlp_hidden (Shazeer 2020, section 2), rounded to the
    nearest multiple of 8 for matmul-friendly shapes (XL: 4608 -> 3072 exactly; T: 512 -> 344)."""
    return max(8, 8 * round(2 * mlp_hidden / 3 / 8))


class SwiGLUMlp(nn.Module):
    """FFN_SwiGLU(x) = (Swish(x W) * x V) W_2 (Shazeer 2020, section 2), W and V fused into one `fc_in`.
    Its names differ from the GELU MLP's (`fc1`, `fc2`) so that neither loads into the other."""

    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        width = swiglu_hidden(mlp_hidden)
        self.fc_in = nn.Linear(hidden_size, 2 * width, bias=True)  # [gate | value]
        self.fc_out = nn.Linear(width, hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.fc_in(x).chunk(2, dim=-1)  # each (N, T, width)
        return self.fc_out(F.silu(gate) * value)


class DiTBlock(nn.Module):
    """A transformer block with adaLN-Zero conditioning (DiT section 3.2): the conditioning vector c
    regresses shift, scale and a residual gate for both the attention and the MLP branch."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        norm: str = "layernorm",
        mlp: str = "gelu",
        qk_norm: bool = False,
    ):
        super().__init__()
        # Affine-free: adaLN's per-sample shift and scale take the place of a learned gain and bias.
        self.norm1 = make_norm(norm, hidden_size, affine=False)
        self.attn = Attention(hidden_size, num_heads, qk_norm=norm if qk_norm else None)
        self.norm2 = make_norm(norm, hidden_size, affine=False)
        mlp_class = SwiGLUMlp if mlp == "swiglu" else Mlp
        self.mlp = mlp_class(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, norm: str = "layernorm"):
        super().__init__()
        self.norm_final = make_norm(norm, hidden_size, affine=False)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C_out)


class DiT(nn.Module):
    """forward(x, t, y): noisy latents (N, C, H, W), timesteps (N,) on the 0..999 scale, labels (N,)
    -> (N, C_out, H, W): the ε prediction, followed (learn_sigma) by C variance-interpolation values.
    (Other objectives give t on their own scale and read the output as theirs: `fastdit.objectives`.)
    A DiT with scalar conditions (`SCALAR_CONDITIONS`) takes each by its keyword, (N,): `gap=` with
    `time_gap_embedding` (MeanFlow's t − r), `guidance=` with `guidance_embedding` (the scale ω).
    `route=` (training only, `fastdit.models.routing`) runs a span of blocks on each sample's kept
    tokens (TREAD); without it every block sees every token, as in the official model."""

    def __init__(self, config: DiTConfig | None = None, **overrides):
        super().__init__()
        config = config or DiTConfig()
        if overrides:
            config = DiTConfig(**{**config.__dict__, **overrides})
        if config.has_head:  # a caller's bug: the layout and the forward are another module's
            raise ValueError("a config with a DDT head is a DiT^DH: build it with fastdit.models.build_from_config")
        self.config = config
        D = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        for condition in self.conditions:
            self.add_module(condition.embedder, TimestepEmbedder(D))
        self.y_embedder = LabelEmbedder(config.num_classes, D, config.class_dropout_prob)
        # Fixed sin-cos table; a frozen Parameter (not a buffer) because official checkpoints store it.
        self.pos_embed = nn.Parameter(torch.zeros(1, config.grid_size**2, D), requires_grad=False)
        if config.rope:
            # cos/sin of the RoPE angles, one row per token, filled by initialize_weights. Buffers that
            # are not saved (persistent=False): they follow the grid, so a state dict stays official.
            table_shape = (config.grid_size**2, config.head_dim // 2)
            self.register_buffer("rope_cos", torch.empty(table_shape), persistent=False)
            self.register_buffer("rope_sin", torch.empty(table_shape), persistent=False)
        self.blocks = nn.ModuleList(
            DiTBlock(D, config.num_heads, config.mlp_ratio, norm=config.norm, mlp=config.mlp, qk_norm=config.qk_norm)
            for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(D, config.patch_size, config.out_channels, norm=config.norm)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def xavier_linear(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(xavier_linear)
        pos = get_2d_sincos_pos_embed(self.config.hidden_size, self.config.grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        if self.config.rope:
            # Tokens are row-major (token n = i*G + j covers row i, column j), as in PatchEmbed.
            positions = torch.arange(self.config.grid_size)
            rows, cols = torch.meshgrid(positions, positions, indexing="ij")  # each (G, G)
            angles = rope_2d_angles(rows.flatten(), cols.flatten(), self.config.head_dim)
            self.rope_cos.copy_(torch.cos(angles))
            self.rope_sin.copy_(torch.sin(angles))
        # Patch projection initialised like a linear layer (as ViT/MAE do).
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for condition in self.conditions:  # initialised as t's embedder is
            embedder = getattr(self, condition.embedder)
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every residual branch and the output start at zero, so each block starts as
        # the identity (DiT section 3.2, "adaLN-Zero block").
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def conditions(self) -> tuple[ScalarCondition, ...]:
        """The scalar conditions this DiT takes beside t (`SCALAR_CONDITIONS` whose switch is on)."""
        return tuple(condition for condition in SCALAR_CONDITIONS if getattr(self.config, condition.switch))

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        # (N, T, p*p*C) -> (N, C, H, W); token n = i*G + j covers rows i*p.., columns j*p..
        c, p, g = self.config.out_channels, self.config.patch_size, self.config.grid_size
        x = x.reshape(x.shape[0], g, g, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, g * p, g * p)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        force_drop_ids: torch.Tensor | None = None,
        route: TokenRoute | None = None,
        **conditions: torch.Tensor,
    ) -> torch.Tensor:
        # The absolute positions are added before any routing: a kept token carries its own into the span.
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t)  # (N, D)
        c = self._add_conditions(c, conditions)
        c = c + self.y_embedder(y, self.training, force_drop_ids)  # (N, D)
        rope = (self.rope_cos, self.rope_sin) if self.config.rope else None
        if route is None:
            for block in self.blocks:  # (activation checkpointing wraps blocks from outside: fastdit.train.setup)
                x = block(x, c, rope)
        else:
            x = self._routed_blocks(x, c, rope, route)
        x = self.final_layer(x, c)  # (N, T, p*p*C_out)
        return self.unpatchify(x)

    def _add_conditions(self, c: torch.Tensor, conditions: dict) -> torch.Tensor:
        """c plus the embedding of each scalar condition this DiT takes (MeanFlow's (t, t − r)
        conditioning adds the gap's embedding to t's, Geng et al. 2025, Table 1c; ω's likewise)."""
        unknown = set(conditions) - {condition.keyword for condition in SCALAR_CONDITIONS}
        if unknown:
            raise TypeError(f"DiT.forward got unexpected keyword(s) {sorted(unknown)}")
        for condition in SCALAR_CONDITIONS:
            value = conditions.get(condition.keyword)
            if not getattr(self.config, condition.switch):
                if value is not None:
                    raise ValueError(f"this DiT takes no {condition.keyword} ({condition.switch}=False); call it "
                                     f"without {condition.keyword}")
                continue
            if value is None:
                raise ValueError(f"this DiT takes {condition.what} ({condition.switch}): pass "
                                 f"{condition.keyword}={condition.example}, shape (N,)")
            embedded = value + condition.offset if condition.offset else value
            c = c + getattr(self, condition.embedder)(embedded)
        return c

    def _routed_blocks(self, x: torch.Tensor, c: torch.Tensor, rope, route: TokenRoute) -> torch.Tensor:
        """The blocks with blocks[route.start:route.end] on the kept tokens only (TREAD): the
        routed tokens leave before the span and rejoin after it with the values they left with."""
        route.check(x.shape[0], x.shape[1], len(self.blocks))
        # Each kept token keeps its own RoPE rows: (T, d/2) -> (N, 1, K, d/2).
        routed_rope = None if rope is None else (route.rope_rows(rope[0]), route.rope_rows(rope[1]))
        for index, block in enumerate(self.blocks):
            if index == route.start:
                before_span = x  # (N, T, D)
                x = route.gather(x)  # (N, K, D)
            x = block(x, c, routed_rope if route.covers(index) else rope)
            if index == route.end - 1:
                x = route.rejoin(before_span, x)  # (N, T, D)
        return x

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """The official doubled-batch guidance call, kept for drop-in compatibility with DiT sampling
        code: the first half of `x` is run with `y`'s two halves (labels, then null labels) and only
        the first three channels are guided. New code uses `fastdit.sampling.ClassifierFreeGuidance`.

        Written out here, as in the official models.py, rather than calling the sampling layer's
        guidance: nothing under models/ depends on sampling."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        eps, rest = out[:, :3], out[:, 3:]  # the official three guided channels; the rest pass through
        cond_eps, uncond_eps = eps.chunk(2)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)


# ----------------------------------------------------------------------------------------------
# Fixed 2-D sin-cos position table (MAE, He et al. 2022), computed in float64
# ----------------------------------------------------------------------------------------------


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """(G*G, D) table for a G×G grid, row-major tokens. The first D/2 dims encode the column index,
    the last D/2 the row index (this is what the official numbers do)."""
    coords = np.arange(grid_size, dtype=np.float32)
    cols, rows = np.meshgrid(coords, coords)  # cols[i, j] = j, rows[i, j] = i
    emb_cols = _1d_sincos(embed_dim // 2, cols.reshape(-1))
    emb_rows = _1d_sincos(embed_dim // 2, rows.reshape(-1))
    return np.concatenate([emb_cols, emb_rows], axis=1)


def _1d_sincos(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    # omega_k = 1 / 10000^(k / (D/2)); the sine half comes FIRST (unlike the timestep embedding).
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    angles = np.einsum("m,d->md", positions.astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
