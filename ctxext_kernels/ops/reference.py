"""The pure-PyTorch RoPE reference (gpt-fast style): short, obviously right, used by tests and benchmarks.

The angle is formed in float64, where position * inv_freq is exact (a 24-bit integer times a 24-bit mantissa fits in
53 bits) and torch's float64 cos/sin reduce it accurately; the kernels reach the same values in fp32 through a
two-product and a Cody-Waite reduction. Rotation is done in fp32 and rounded once to the input dtype.
"""

from __future__ import annotations

import torch


def rope_angles_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0, *, exact: bool = True,
                        conjugate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every (position, frequency) pair, times `scaling`.

    Args:
        positions: integer `[...]`.
        inv_freq: fp32 `[R/2]` (R = rotary_dim).
        exact: angle from the exact product; False rounds position * inv_freq to fp32 first, as transformers does.
        conjugate: negate the angle (backward pass).
    Returns:
        cos, sin: fp32 `[..., R/2]`.
    """
    if exact:
        angle = positions.to(torch.float64)[..., None] * inv_freq.to(torch.float64)
    else:
        angle = (positions.to(torch.float32)[..., None] * inv_freq.to(torch.float32)).to(torch.float64)
    cos = angle.cos().to(torch.float32) * scaling
    sin = angle.sin().to(torch.float32) * scaling
    return cos, (-sin if conjugate else sin)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate the leading `R = 2 * cos.shape[-1]` dims of x; the rest pass through.

    Args:
        x: `[..., D]`, any float dtype.
        cos, sin: fp32, broadcastable to `[..., R/2]`.
        interleaved: pairs are (x[2i], x[2i+1]) (GPT-J) instead of (x[i], x[i + R/2]) (NeoX / transformers).
    Returns:
        `[..., D]` in x's dtype.
    """
    rotary_dim = 2 * cos.shape[-1]
    xr = x[..., :rotary_dim].float()
    x1, x2 = (xr[..., 0::2], xr[..., 1::2]) if interleaved else xr.chunk(2, dim=-1)
    y1, y2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    y = torch.stack((y1, y2), dim=-1).flatten(-2) if interleaved else torch.cat((y1, y2), dim=-1)
    return torch.cat((y.to(x.dtype), x[..., rotary_dim:]), dim=-1)


def rope_forward(q, k, q_out, k_out, positions, inv_freq, scaling: float, interleaved: bool, conjugate: bool,
                 exact: bool) -> None:
    """The launcher contract of every backend, in torch: rotate q `[B,S,Hq,D]` and k `[B,S,Hk,D]` at positions
    `[B,S]` into q_out / k_out (which may alias q / k)."""
    cos, sin = rope_angles_cos_sin(positions, inv_freq, scaling, exact=exact, conjugate=conjugate)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    q_out.copy_(rotate(q, cos, sin, interleaved))
    if k is not None:
        k_out.copy_(rotate(k, cos, sin, interleaved))
