"""Independent float64 oracles and the per-dtype tolerance table shared by the kernel tests.

The rotation is written as complex multiplication, (x1 + i x2) * exp(i * position * inv_freq), in float64 — a
different formulation from the package's real-arithmetic kernels and reference, and exact enough (position * inv_freq
is exact in float64) to judge fp32 results to ~1e-7.
"""

import torch

# (rtol, atol) for a result rounded once to the dtype: one ulp relative, plus a floor for values near zero. fp32's
# allows the kernels' angle error (~3e-7 on cos/sin) times |x| <= ~5.
TOLERANCES = {
    torch.float32: (4e-6, 4e-6),
    torch.float16: (2.0**-10, 1e-5),
    torch.bfloat16: (2.0**-7, 1e-4),
}


def rope_oracle(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0,
                interleaved: bool = False) -> torch.Tensor:
    """Rotate x `[B, S, H, D]` (float64 math) at positions `[B, S]` by inv_freq `[R/2]`; dims >= R pass through."""
    x = x.to(torch.float64)
    rotary = 2 * inv_freq.numel()
    xr, rest = x[..., :rotary], x[..., rotary:]
    if interleaved:
        z = torch.view_as_complex(xr.reshape(*xr.shape[:-1], -1, 2).contiguous())
    else:
        z = torch.complex(xr[..., : rotary // 2], xr[..., rotary // 2 :])
    angle = positions.to(torch.float64)[:, :, None, None] * inv_freq.to(torch.float64)
    z = z * torch.polar(torch.full_like(angle, scaling), angle)
    if interleaved:
        yr = torch.view_as_real(z).flatten(-2)
    else:
        yr = torch.cat((z.real, z.imag), dim=-1)
    return torch.cat((yr, rest), dim=-1)


def assert_close_to_oracle(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.to(torch.float64), expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")
