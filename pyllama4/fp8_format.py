"""The FP8 formats, e4m3fn and e4m3fnuz: their names, codes, torch dtypes, ranges, and the rules
that encode values into them and decode raw bits from them.

Each format has a name (`FP8_FORMATS`: "e4m3fn", "e4m3fnuz", as `--fp8-format` spells it) and a
code, the GPU kernels' `weight_format` argument: BF16 (0), E4M3FN (1: NVIDIA, MI355 and the CPU
reference) and E4M3FNUZ (2: MI300). `FP8_MAX` is a format's largest finite value (448 fn, 240
fnuz). fp8 weights travel to the kernels as raw uint8 bits; `decode` is the rule
hip/fused_moe.hip's decode_fp8x4 implements on the device (tests/test_fp8_formats.py checks it
against torch.float8_e4m3fn and torch.float8_e4m3fnuz for all 256 bit patterns):

  sign s = bit 7, exponent e = bits 6..3, mantissa m = bits 2..0;
  e4m3fn:   bias 7; e = 0: (-1)^s * m/8 * 2^-6 (zeros, subnormals), else (-1)^s * (1 + m/8) *
            2^(e - 7); no infinities; 0x7f and 0xff are NaN (so 0x80 is -0).
  e4m3fnuz: bias 8; e = 0: (-1)^s * m/8 * 2^-7, else (-1)^s * (1 + m/8) * 2^(e - 8); no
            infinities; 0x80 (where -0 would be) is the only NaN, so there is no -0.

`encode` rounds to nearest even and saturates at +-FP8_MAX (torch's cast after a clamp).
"""

from __future__ import annotations

import torch

BF16 = 0
E4M3FN = 1
E4M3FNUZ = 2

NAMES = {BF16: "bf16", E4M3FN: "e4m3fn", E4M3FNUZ: "e4m3fnuz"}
FP8_FORMATS: dict[str, torch.dtype] = {
    "e4m3fn": torch.float8_e4m3fn,
    "e4m3fnuz": torch.float8_e4m3fnuz,
}
FP8_MAX: dict[str, float] = {name: torch.finfo(dt).max for name, dt in FP8_FORMATS.items()}

_BIAS = {E4M3FN: 7, E4M3FNUZ: 8}


def check_format(fmt: str) -> torch.dtype:
    """The torch dtype of an FP8 format name; ValueError naming the choices otherwise."""
    if fmt not in FP8_FORMATS:
        raise ValueError(f"fp8 format {fmt!r}: expected one of {', '.join(FP8_FORMATS)}")
    return FP8_FORMATS[fmt]


def format_of(q: torch.Tensor) -> str:
    """The FP8 format name of a quantized tensor."""
    for name, dtype in FP8_FORMATS.items():
        if q.dtype == dtype:
            return name
    raise ValueError(f"{q.dtype} is not an FP8 format ({', '.join(FP8_FORMATS)})")


def torch_dtype(fmt: int) -> torch.dtype:
    """torch's float8 dtype of an fp8 format code."""
    return FP8_FORMATS[NAMES[fmt]]


def format_of_dtype(dtype: torch.dtype) -> int:
    """The fp8 format code of a torch float8 dtype (float8_e4m3fn or float8_e4m3fnuz)."""
    for fmt in _BIAS:
        if dtype == torch_dtype(fmt):
            return fmt
    raise ValueError(f"{dtype} is not an fp8 format the kernels take (e4m3fn, e4m3fnuz)")


def encode(v: torch.Tensor, fmt: str) -> torch.Tensor:
    """fp32 values already in units of the scale, rounded into format `fmt` (a name);
    out-of-range values saturate to +-FP8_MAX[fmt]."""
    fmax = FP8_MAX[fmt]
    return v.clamp(-fmax, fmax).to(FP8_FORMATS[fmt])


def is_nan(bits: torch.Tensor, fmt: int) -> torch.Tensor:
    """Which raw bytes are NaN in the format."""
    b = bits.to(torch.int32)
    return (b & 0x7F) == 0x7F if fmt == E4M3FN else b == 0x80


def decode(bits: torch.Tensor, fmt: int) -> torch.Tensor:
    """float32 values of raw fp8 bits (uint8) in format E4M3FN or E4M3FNUZ, by the definition."""
    if fmt not in _BIAS:
        raise ValueError(f"not an fp8 format code: {fmt}")
    if bits.dtype != torch.uint8:
        raise TypeError(f"fp8 bits must be uint8, not {bits.dtype}")
    b = bits.to(torch.int32)
    bias = _BIAS[fmt]
    e = (b >> 3) & 0xF
    m = (b & 0x7).to(torch.float32)
    subnormal = m / 8 * 2.0 ** (1 - bias)
    normal = (1 + m / 8) * torch.exp2((e - bias).to(torch.float32))
    magnitude = torch.where(e == 0, subnormal, normal)
    value = torch.where((b & 0x80) != 0, -magnitude, magnitude)
    return torch.where(is_nan(bits, fmt), torch.full_like(value, float("nan")), value)


def dequantize(q: torch.Tensor, scale: torch.Tensor, fmt: int | None = None) -> torch.Tensor:
    """float32 W = fp8 value * scale, scale broadcast against q (per column of input-major
    weights as it is, per row of [out, in] ones as scale[..., None]). q holds raw uint8 bits in
    format code `fmt`, or is a torch float8 tensor (fmt None: its dtype's); decoded by `decode`."""
    if fmt is None:
        fmt, q = format_of_dtype(q.dtype), q.view(torch.uint8)
    return decode(q, fmt) * scale.to(torch.float32)
