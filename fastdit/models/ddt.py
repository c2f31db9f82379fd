"""DiT^DH: a DiT with RAE's wide, shallow DDT head (Zheng, Ma, Tong & Xie 2025, "Diffusion Transformers with
Representation Autoencoders", section 5; the head after Wang et al. 2025, "DDT: Decoupled Diffusion Transformer").

Representation-autoencoder latents are wide (DINOv2-B: 768 channels per token), wider than a DiT's blocks
can carry through a denoising step; RAE adds a head of a few wide blocks instead of widening the whole
network. Read top to bottom:

1. the **body**, a LightningDiT of `depth` blocks of width D, runs on the patch tokens of x_t plus the
   sin-cos position table, conditioned per sample on c = SiLU(t_emb + y_emb) through adaLN;
2. its output tokens, joined to the time again, z = SiLU(t_emb + s) (one vector per token), are
   projected to the head's width E;
3. the **head**, `head_depth` blocks of width E, runs on a second patch embedding of the same x_t (no
   position table: RoPE places the tokens), conditioned per *token* on z through adaLN;
4. a final layer (adaLN on z again) maps each token to its p·p·C outputs.

The parameter names are RAE's (`DiTwDDTHead` in its `stage2/models/DDT.py`), so a released RAE stage-2
checkpoint loads with `strict=True`: `s_embedder` and `x_embedder` are the body's and the head's patch
embeddings, `s_projector` the D -> E projection (absent when D = E), `t_embedder.W` the fixed Gaussian
Fourier frequencies, `enc_feat_rope`/`dec_feat_rope` the saved RoPE tables, and `blocks` holds the body's
blocks followed by the head's. The numerics follow RAE's too: RMSNorm in float32 with a learned gain,
SwiGLU of width int(2/3 · 4D), q and k rotated by EVA-02's 2-D RoPE, x · (1 + scale) + shift modulation.

The time is RAE's flow time on the linear path x_t = (1 − t) x + t ε (t = 1 is noise) and the output
its velocity ε − x: the `rae` objective (`fastdit.objectives.rae`) turns both into fastdit's conventions.
The block options of `DiTConfig` apply as in RAE's code: `norm` (rmsnorm, or affine-free LayerNorm),
`mlp` (swiglu, or a tanh-GELU MLP), `qk_norm`; RoPE is always on (RAE's head cannot run without it).
Patch sizes above 1 work here (RAE's own code runs patch 1 only, its 16×16 DINOv2 tokens).

Shapes: N batch, C channels, H/W latent side, p patch, G = H/p grid side, T = G² tokens, D body width,
E head width, h heads, d head dimension.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dit import DiTConfig, LabelEmbedder, Mlp, PatchEmbed, get_2d_sincos_pos_embed
from .routing import TokenRoute

# The Gaussian Fourier features of t: 256 fixed frequencies drawn from N(0, 1) (RAE's `GaussianFourierEmbedding`).
FOURIER_FEATURES = 256
ROPE_BASE = 10000


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · g over the last dim, computed in float32 whatever x's dtype (Zhang &
    Sennrich 2019), with a learned gain g (`weight`): RAE's blocks keep the gain that DiT's norms drop."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def block_norm(kind: str, dim: int) -> nn.Module:
    """A block's norm before adaLN: RMSNorm with a gain, or LayerNorm without one (eps 1e-6), as RAE's."""
    return RMSNorm(dim) if kind == "rmsnorm" else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def head_norm(kind: str, head_dim: int) -> nn.Module:
    """QK-norm over one head's q or k: RAE's RMSNorm, or a plain affine LayerNorm (PyTorch's eps 1e-5)."""
    return RMSNorm(head_dim) if kind == "rmsnorm" else nn.LayerNorm(head_dim)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # adaLN; shift and scale are (N, 1, D) per sample or (N, T, D) per token. -> (N, T, D)
    return x * (1 + scale) + shift


class FourierTimeEmbedder(nn.Module):
    """t -> [sin(2π t W), cos(2π t W)] with W (256,) fixed draws of N(0, 1), then a 2-layer MLP: RAE's
    Gaussian Fourier embedding of a real t (Tancik et al. 2020). W is a frozen parameter because RAE's
    checkpoints store it."""

    def __init__(self, hidden_size: int, num_features: int = FOURIER_FEATURES):
        super().__init__()
        self.W = nn.Parameter(torch.normal(0.0, 1.0, (num_features,)), requires_grad=False)
        self.mlp = nn.Sequential(
            nn.Linear(2 * num_features, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t[:, None] * self.W[None, :] * 2 * torch.pi  # (N, 256), in RAE's order of products
        return self.mlp(torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1))  # (N, D)


class AxialRope(nn.Module):
    """2-D axial rotary embedding as RAE applies it (EVA-02's `VisionRotaryEmbeddingFast`, Fang et al.
    2024): the first half of each head's d dims turn with the token's row, the second half with its
    column, in adjacent pairs (2i, 2i + 1), with RoFormer's frequencies 10000^(−2k / (d/2)) over each
    half (Su et al. 2021). The (T, d) tables of cos and sin (each angle written for both dims of its
    pair) are computed in float32 as EVA computes them and saved, as RAE's checkpoints hold them."""

    def __init__(self, head_dim: int, grid_size: int):
        super().__init__()
        half = head_dim // 2  # the dims of one axis
        freqs = 1.0 / (ROPE_BASE ** (torch.arange(0, half, 2)[: half // 2].float() / half))  # (d/4,)
        positions = torch.arange(grid_size) / grid_size * grid_size  # (G,) float32, as EVA writes them
        angles = (positions[:, None] * freqs[None, :]).repeat_interleave(2, dim=-1)  # (G, d/2)
        rows = angles[:, None, :].expand(grid_size, grid_size, half)  # (G, G, d/2): by row i
        cols = angles[None, :, :].expand(grid_size, grid_size, half)  # by column j
        table = torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, head_dim)  # (T, d), row-major tokens
        self.register_buffer("freqs_cos", table.cos())
        self.register_buffer("freqs_sin", table.sin())

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.freqs_cos, self.freqs_sin


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x · cos + rot(x) · sin, rot turning each pair (x_2i, x_2i+1) into (−x_2i+1, x_2i): the elementwise
    form of RoFormer's block-diagonal rotation. x (N, h, T, d), cos/sin (T, d) or (N, 1, K, d)."""
    pairs = x.unflatten(-1, (-1, 2))  # (..., d/2, 2)
    turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos + turned * sin


class RopeAttention(nn.Module):
    """Multi-head self-attention with q and k normalised (optionally, Dehghani et al. 2023) and rotated."""

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: str | None = None):
        super().__init__()
        self.num_heads = num_heads
        head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=True)
        self.q_norm = head_norm(qk_norm, head_dim) if qk_norm else nn.Identity()
        self.k_norm = head_norm(qk_norm, head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(hidden_size, hidden_size, bias=True)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, h, T, d)
        q, k = rotate(self.q_norm(q), *rope), rotate(self.k_norm(k), *rope)
        # The float32 tables promote a half-precision q and k; SDPA takes them back in v's dtype, as RAE does.
        x = F.scaled_dot_product_attention(q.to(v.dtype), k.to(v.dtype), v)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class SwiGLU(nn.Module):
    """FFN_SwiGLU(x) = (SiLU(x W) * x V) W_2 (Shazeer 2020), W and V fused into `w12`, of width
    int(2/3 · mlp_hidden) exactly as RAE truncates it (2048: 5461, 1152·4: 3072)."""

    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        width = int(2 / 3 * mlp_hidden)
        self.w12 = nn.Linear(hidden_size, 2 * width, bias=True)  # [gate | value]
        self.w3 = nn.Linear(width, hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class DDTBlock(nn.Module):
    """A LightningDiT block (RAE's `LightningDDTBlock`): adaLN-Zero on a conditioning that is one vector
    per sample (N, D) in the body, or one per token (N, T, D) in the head."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, *, norm: str, mlp: str, qk_norm: bool):
        super().__init__()
        self.norm1 = block_norm(norm, hidden_size)
        self.attn = RopeAttention(hidden_size, num_heads, qk_norm=norm if qk_norm else None)
        self.norm2 = block_norm(norm, hidden_size)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = SwiGLU(hidden_size, mlp_hidden) if mlp == "swiglu" else Mlp(hidden_size, mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if c.ndim < x.ndim:
            c = c.unsqueeze(1)  # (N, 1, D): one conditioning per sample, for every token
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope) * gate_msa
        x = x + self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)) * gate_mlp
        return x


class DDTFinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, norm: str):
        super().__init__()
        self.norm_final = block_norm(norm, hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if c.ndim < x.ndim:
            c = c.unsqueeze(1)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C_out)


class DiTDH(nn.Module):
    """forward(x, t, y): x_t (N, C, H, W), RAE's flow time t (N,) in [0, 1] with 1 = noise, labels (N,)
    -> (N, C_out, H, W), RAE's velocity ε − x (then, with learn_sigma, C more channels). `route=`
    (training only, `fastdit.models.routing`) runs a span of the body's blocks on each sample's kept
    tokens (TREAD); the head always sees every token. `force_drop_ids` as in `DiT.forward`."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        if not config.has_head:
            raise ValueError("a DiT^DH needs a DDT head (head_depth >= 1): build a plain DiT for this config")
        self.config = config
        D, E, G = config.hidden_size, config.head_hidden_size, config.grid_size
        p, C = config.patch_size, config.in_channels
        self.x_embedder = PatchEmbed(p, C, E)  # the head's tokens of x_t
        self.s_embedder = PatchEmbed(p, C, D)  # the body's
        self.s_projector = nn.Linear(D, E) if D != E else nn.Identity()
        self.t_embedder = FourierTimeEmbedder(D)
        self.y_embedder = LabelEmbedder(config.num_classes, D, config.class_dropout_prob)
        self.final_layer = DDTFinalLayer(E, p, config.out_channels, config.norm)
        # Fixed sin-cos table of the body's tokens; a frozen Parameter because RAE's checkpoints store it.
        self.pos_embed = nn.Parameter(torch.zeros(1, G * G, D), requires_grad=False)
        self.enc_feat_rope = AxialRope(config.head_dim, G)
        self.dec_feat_rope = AxialRope(E // config.head_num_heads, G)
        options = dict(norm=config.norm, mlp=config.mlp, qk_norm=config.qk_norm)
        self.blocks = nn.ModuleList(
            [DDTBlock(D, config.num_heads, config.mlp_ratio, **options) for _ in range(config.depth)]
            + [DDTBlock(E, config.head_num_heads, config.mlp_ratio, **options) for _ in range(config.head_depth)]
        )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """RAE's initialisation: PyTorch's default for the linear layers, the patch embeddings as linear
        layers (Xavier), labels and the time MLP N(0, 0.02), adaLN and the output at zero (adaLN-Zero,
        DiT section 3.2: every block starts as the identity and the network outputs 0)."""
        self.pos_embed.data.copy_(torch.from_numpy(get_2d_sincos_pos_embed(self.config.hidden_size,
                                                                           self.config.grid_size)).float().unsqueeze(0))
        for embedder in (self.x_embedder, self.s_embedder):
            w = embedder.proj.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

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
        if conditions:
            raise TypeError(f"DiTDH.forward got unexpected keyword(s) {sorted(conditions)}")
        t_emb = self.t_embedder(t)  # (N, D)
        c = F.silu(t_emb + self.y_embedder(y, self.training, force_drop_ids))  # (N, D)
        s = self.s_embedder(x) + self.pos_embed  # (N, T, D)
        s = self._body(s, c, route)
        z = self.s_projector(F.silu(t_emb.unsqueeze(1) + s))  # (N, T, E): the head's per-token conditioning
        h = self.x_embedder(x)  # (N, T, E)
        rope = self.dec_feat_rope.tables()
        for block in self.blocks[self.config.depth:]:
            h = block(h, z, rope)
        return self.unpatchify(self.final_layer(h, z))

    def _body(self, s: torch.Tensor, c: torch.Tensor, route: TokenRoute | None) -> torch.Tensor:
        """The body's blocks; with a route, blocks[route.start:route.end] on the kept tokens only (TREAD:
        the routed tokens rejoin after the span with the values they left with, as in `DiT`)."""
        rope = self.enc_feat_rope.tables()
        body = self.blocks[: self.config.depth]
        if route is None:
            for block in body:  # (activation checkpointing wraps blocks from outside: fastdit.train.setup)
                s = block(s, c, rope)
            return s
        route.check(s.shape[0], s.shape[1], len(body))
        routed_rope = (route.rope_rows(rope[0]), route.rope_rows(rope[1]))  # (N, 1, K, d) each
        for index, block in enumerate(body):
            if index == route.start:
                before_span = s  # (N, T, D)
                s = route.gather(s)  # (N, K, D)
            s = block(s, c, routed_rope if route.covers(index) else rope)
            if index == route.end - 1:
                s = route.rejoin(before_span, s)
        return s
