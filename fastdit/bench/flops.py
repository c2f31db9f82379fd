"""Model FLOPs of a DiT forward pass, for model FLOPs utilisation (MFU, Chowdhery et al. 2022, "PaLM",
appendix B): the FLOPs the model needs, counted as 2 per multiply-add, over the hardware's peak.
Recomputation under activation checkpointing is not counted, so MFU compares rows fairly."""

from __future__ import annotations

from ..models.dit import DiTConfig, swiglu_hidden

# Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s, no sparsity), matched by the name
# torch.cuda.get_device_name gives, most specific first ("H100 PCIe" before "H100"): the SXM parts are
# "NVIDIA H100 80GB HBM3" and "NVIDIA H800", the NVL one "NVIDIA H100 NVL", the PCIe one "NVIDIA H100 PCIe".
PEAK_BF16_TFLOPS = {
    "B200": 2250.0,
    "H200": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H800 PCIe": 756.0,
    "H100": 989.0,  # SXM5
    "H800": 989.0,  # SXM5
    "A100": 312.0,  # SXM and PCIe alike
    "A800": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
}

def forward_flops_per_image(config: DiTConfig, *, routed_span: tuple[int, int] | None = None,
                            kept_tokens: int | None = None) -> float:
    """FLOPs of one image through `DiT.forward`: every matmul and convolution, attention's two T×T
    products included (what torch.utils.flop_counter counts); norms, activations and the label lookup
    are not matmuls. DiT-XL/2 at 256 (T = 256, D = 1152, depth 28) gives 237 GFLOP: DiT's 118.6 Gflops
    (Table 4) doubled, since the paper counts multiply-adds. With token routing (TREAD), the blocks of
    `routed_span` (start, end) run on `kept_tokens` tokens: the FLOPs the routed forward needs."""
    D, T = config.hidden_size, config.grid_size**2
    patch = config.patch_size**2
    embed = 2 * T * patch * config.in_channels * D
    final = 2 * T * D * patch * config.out_channels + 2 * D * 2 * D
    timestep = 2 * 256 * D + 2 * D * D  # TimestepEmbedder's MLP on 256 frequencies
    routed = 0 if routed_span is None else routed_span[1] - routed_span[0]
    blocks = (config.depth - routed) * _block_flops(config, T) + routed * _block_flops(config, kept_tokens or T)
    return float(blocks + embed + final + timestep)


def _block_flops(config: DiTConfig, T: int) -> int:
    """One block on T tokens."""
    D = config.hidden_size
    mlp_hidden = int(D * config.mlp_ratio)
    if config.mlp == "swiglu":
        mlp = 2 * T * D * 3 * swiglu_hidden(mlp_hidden)  # fc_in (2w wide) and fc_out (w)
    else:
        mlp = 2 * T * D * 2 * mlp_hidden  # fc1 and fc2
    attention = 2 * T * D * 3 * D + 2 * 2 * T * T * D + 2 * T * D * D  # qkv, QK^T and AV, proj
    modulation = 2 * D * 6 * D
    return attention + mlp + modulation


def peak_tflops(device_name: str) -> float | None:
    for name, tflops in PEAK_BF16_TFLOPS.items():  # most specific names first ("H100 PCIe" before "H100")
        if name in device_name:
            return tflops
    return None


def jvp_flops_per_image(config: DiTConfig) -> float:
    """One forward-mode JVP of the model (`torch.func.jvp`, MeanFlow's target), as torch runs it: the
    primal forward, and for the tangent two products per matmul (the input's tangent times the weight,
    and the input times the weight's tangent, zeros that torch multiplies all the same), attention's
    products included: three forwards' FLOPs (tests/test_bench.py counts them with torch's counter)."""
    return 3 * forward_flops_per_image(config)


def vit_forward_flops(*, image_size: int, patch: int, width: int, depth: int, mlp: int, prefix_tokens: int = 1) -> float:
    """One image through a plain ViT (patch embedding, `depth` pre-norm blocks): REPA's frozen encoder."""
    patches = (image_size // patch) ** 2
    T = patches + prefix_tokens
    embed = 2 * patches * 3 * patch * patch * width
    block = 2 * T * width * 3 * width + 2 * 2 * T * T * width + 2 * T * width * width + 2 * 2 * T * width * mlp
    return float(embed + depth * block)


def mlp_flops(tokens: int, widths: list[int]) -> float:
    """A stack of linear layers widths[0] -> widths[1] -> ... on `tokens` tokens (REPA's projector)."""
    return float(sum(2 * tokens * a * b for a, b in zip(widths, widths[1:])))
