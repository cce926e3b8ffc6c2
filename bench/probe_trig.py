"""GPU box: how accurate the cosines of RoPE angles are in the kernels that compute them.

The split-K attention turns queries (and a K = V layer's keys) by `position * inv_freq` in fp32, with
angles up to ~131072 rad at 128K context. This prints the largest error, against float64 cosines of the
same fp32 angles, of Triton's `tl.cos`, libdevice's `cos`, an Inductor-compiled `torch.cos` and eager
`torch.cos`, for uniform angles below each bound.

    python bench/probe_trig.py
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

BOUNDS = (3.14, 300.0, 4096.0, 32768.0, 131072.0)


@triton.jit
def _cosines(x_ptr, tl_ptr, ld_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(tl_ptr + offs, tl.cos(x), mask=mask)
    tl.store(ld_ptr + offs, libdevice.cos(x), mask=mask)


def main() -> None:
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    compiled = torch.compile(torch.cos)
    for bound in BOUNDS:
        x = torch.rand(1 << 20, device="cuda") * bound
        tl_cos, ld_cos = torch.empty_like(x), torch.empty_like(x)
        _cosines[(triton.cdiv(x.numel(), 1024),)](x, tl_cos, ld_cos, x.numel(), BLOCK=1024)
        ref = torch.cos(x.double())
        errs = {
            "tl.cos": tl_cos,
            "libdevice.cos": ld_cos,
            "inductor": compiled(x),
            "torch eager": torch.cos(x),
        }
        cols = "  ".join(f"{k} {(v.double() - ref).abs().max().item():.2e}" for k, v in errs.items())
        print(f"angles < {bound:>8}: {cols}")


if __name__ == "__main__":
    main()
