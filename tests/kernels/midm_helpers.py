"""Shared pieces of the sdpa_midm tests: an independent float64 reference, case builders, and the
Triton-interpreter check (run as a script in its own process: ``TRITON_INTERPRET=1 python midm_helpers.py``,
because TRITON_INTERPRET must be set before triton is imported).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import replace

import torch

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


class CachedAttn(torch.nn.Module):
    """q from a Linear, index_copy_ into k/v cache buffers, slice by kv_window length, call the op (which
    rotates q): the smallest module that exports the op the way the models use it. `flat` returns
    [1, M, Hq*D] (the transposed layout o_proj reads), else the op's own [1, Hq, M, D]. `op`: the
    etspec op it calls (sdpa_midm, or sdpa_chunk for prefill-sized calls)."""

    def __init__(self, hq=8, hkv=2, d=64, max_seq=128, flat=False, op="sdpa_midm"):
        super().__init__()
        self.hq, self.hkv, self.d, self.flat, self.op = hq, hkv, d, flat, op
        self.wq = torch.nn.Linear(d, hq * d, bias=False)
        self.wk = torch.nn.Linear(d, hkv * d, bias=False)
        self.wv = torch.nn.Linear(d, hkv * d, bias=False)
        self.register_buffer("k_cache", torch.zeros(1, hkv, max_seq, d))
        self.register_buffer("v_cache", torch.zeros(1, hkv, max_seq, d))
        self.register_buffer("inv_freq", make_freq(d))

    def forward(self, x, input_pos, kv_window):
        m = x.shape[1]
        q = self.wq(x).view(1, m, self.hq, self.d).transpose(1, 2)
        k = self.wk(x).view(1, m, self.hkv, self.d).transpose(1, 2)
        v = self.wv(x).view(1, m, self.hkv, self.d).transpose(1, 2)
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        n = kv_window.shape[0]
        k, v = self.k_cache[:, :, :n], self.v_cache[:, :, :n]
        o = getattr(torch.ops.etspec, self.op)(q, k, v, self.inv_freq, input_pos, 1.0 / math.sqrt(self.d))
        return o.transpose(1, 2).reshape(1, m, self.hq * self.d) if self.flat else o


def cached_attn_inputs(d, m, pos0, bucket=0, gen=None):
    """CachedAttn's bf16 CUDA inputs for `m` rows at pos0, kv_window `bucket` positions past them."""
    x = torch.randn(1, m, d, device="cuda", generator=gen).to(torch.bfloat16)
    pos = torch.arange(pos0, pos0 + m, device="cuda")
    kvw = torch.empty(pos0 + m + bucket, device="cuda", dtype=torch.int8)
    return x, pos, kvw


def lower_cached_attn(out_dir, op, hq, hkv, d, max_seq, most_rows, method):
    """A bf16 CachedAttn calling `op`, exported with up to `most_rows` rows and lowered through the
    CudaPartitioner as `method`; returns (model, .pte path)."""
    from tests.kernels.aoti_helpers import lower_for_cuda

    torch.manual_seed(0)
    model = CachedAttn(hq, hkv, d, max_seq, flat=True, op=op).to("cuda", torch.bfloat16).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    dm = torch.export.Dim("m", min=1, max=most_rows)
    dkv = torch.export.Dim("kv", min=1, max=max_seq)
    example = cached_attn_inputs(d, most_rows, 0)
    with torch.no_grad():
        ep = torch.export.export(model, example, dynamic_shapes=({1: dm}, {0: dm}, {0: dkv}), strict=True)
    return model, lower_for_cuda(ep, method, out_dir)


def check_delegate_against_eager(model, pte_path, out_dir, plan):
    """Run the lowered delegate through the AOTI container on the calls of `plan` ((rows, kv_window
    bucket) in turn, positions following on) and compare each output with the eager model's."""
    from tests.kernels.aoti_helpers import AotiMethod, delegate_input_order, named_blobs

    program, blobs = named_blobs(pte_path, out_dir)
    so_key = next(k for k in blobs if k.endswith("so_blob"))
    w_key = next(k for k in blobs if k.endswith("weights_blob"))
    meth = AotiMethod(blobs[so_key], blobs[w_key])
    try:
        order = delegate_input_order(program, meth.ni)
        model.k_cache.zero_()
        model.v_cache.zero_()
        gen = torch.Generator(device="cuda").manual_seed(3)
        pos0 = 0
        for m, bucket in plan:
            args = cached_attn_inputs(model.d, m, pos0, bucket, gen)
            got = meth(*[args[i] for i in order])[0]
            want = model(*args)
            assert got.shape == want.shape
            assert torch.isfinite(got).all()
            err = rel_err(got, want.double())
            assert err < 1e-2, (m, pos0, err)
            pos0 += m
    finally:
        meth.close()


def rope64(x, positions, inv_freq):
    """Float64 RoPE of x [1, H, N, D] at `positions` [N], written independently of the kernel module:
    the pair (d, d + D/2) as one complex number, turned by the angle position * inv_freq[d] (inv_freq
    [R]: the first R pairs rotate, the others keep their values)."""
    x = x[0].to(torch.float64)
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half], x[..., half:])
    freq = torch.zeros(half, dtype=torch.float64, device=x.device)
    freq[: inv_freq.shape[0]] = inv_freq.to(freq)
    angle = positions.to(x.device, torch.float64)[:, None] * freq
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat((z.real, z.imag), dim=-1)[None]


def ref64(q, k, v, input_pos, inv_freq, scale, window=0, softcap=0.0):
    """Float64 attention of the queries q (rotated here at input_pos, :func:`rope64`) over keys k,
    written independently of the kernel module: per query head, per row; `softcap` > 0 caps the scores
    as Gemma 2 does (cap * tanh(s / cap))."""
    hq, m_rows, d = q.shape[1], q.shape[2], q.shape[3]
    hkv = k.shape[1]
    grp = hq // hkv
    pos = [int(p) for p in input_pos.tolist()]
    L = pos[-1] + 1
    out = torch.empty((1, hq, m_rows, d), dtype=torch.float64, device=q.device)
    kk = k[0, :, :L].to(torch.float64)
    vv = v[0, :, :L].to(torch.float64)
    qq = rope64(q, input_pos, inv_freq)[0]
    for h in range(hq):
        kh = h // grp
        for i in range(m_rows):
            lo = max(0, pos[i] - window + 1) if window > 0 else 0
            hi = pos[i] + 1
            s = (kk[kh, lo:hi] @ qq[h, i]) * scale
            if softcap:
                s = softcap * torch.tanh(s / softcap)
            p = torch.softmax(s, dim=0)
            out[0, h, i] = p @ vv[kh, lo:hi]
    return out


def shared_keys64(kv, k_weight, inv_freq):
    """Float64 keys of a K = V layer: k_weight * value, key j rotated at position j."""
    x = kv.to(torch.float64) * k_weight.to(device=kv.device, dtype=torch.float64)
    return rope64(x, torch.arange(kv.shape[2], device=kv.device), inv_freq)


def make_freq(d, rotated=1.0, theta=1e4):
    """The RoPE frequencies [R] of the first R = `rotated` x D/2 pairs (the others do not rotate, as in
    Gemma 4's proportional RoPE)."""
    n = max(1, int(rotated * (d // 2)))
    return theta ** -(torch.arange(n, dtype=torch.float32) * 2 / d)


def make_shared(d, seed, rotated=0.25):
    """k_weight [D] around 1 and the frequencies of a K = V layer (`make_freq`, Gemma 4's share)."""
    g = torch.Generator().manual_seed(seed)
    return 1 + 0.5 * torch.randn(d, generator=g), make_freq(d, rotated)


def make_case(hq, hkv, m, d, L, lb, dtype, device="cpu", seed=0, max_seq=None, q_strided=False):
    """q, k, v (views [1, Hkv, Lb, D] into a larger cache, NaN at positions >= L), input_pos."""
    assert L >= m and lb >= L
    g = torch.Generator(device=device).manual_seed(seed)
    max_seq = max_seq or lb + 7

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    kc = rnd(1, hkv, max_seq, d)
    vc = rnd(1, hkv, max_seq, d)
    kc[:, :, L:] = float("nan")  # never written: must never reach the output
    vc[:, :, L:] = float("nan")
    if q_strided:  # as produced by a Linear: [1, M, Hq, D] viewed as [1, Hq, M, D]
        q = rnd(1, m, hq, d).transpose(1, 2)
    else:
        q = rnd(1, hq, m, d)
    pos = torch.arange(L - m, L, dtype=torch.int64, device=device)
    return q, kc[:, :, :lb], vc[:, :, :lb], pos


def to_ring(cache, L, ring):
    """A sliding layer's ring cache of `ring` rows holding positions [0, L) of `cache` [1, H, >=L, D]:
    position p in row p % ring, the newest one kept; rows not yet written are NaN."""
    out = torch.full_like(cache[:, :, :1], float("nan")).repeat(1, 1, ring, 1)
    idx = torch.arange(max(0, L - ring), L, device=cache.device)
    out[:, :, idx % ring] = cache[:, :, idx]
    return out


def rel_err(out, ref):
    return ((out.to(torch.float64) - ref).norm() / ref.norm()).item()


# hq, hkv, M, D, L, Lb, window, dtype, n_sm, config fields changed from the default, note
INTERP_CASES = [
    (4, 1, 4, 64, 37, 64, 0, torch.float32, 4, {"block_n": 16}, "ragged L, GQA 4, tiles+tail"),
    (2, 2, 1, 64, 50, 50, 0, torch.bfloat16, 4, {"block_n": 16}, "M=1, GQA 1"),
    (8, 1, 3, 64, 5, 40, 0, torch.float32, 4, {}, "L < one block, Lb > L, GQA 8"),
    (4, 4, 4, 128, 4, 4, 0, torch.float16, 4, {"block_n": 16}, "L == M == Lb, D=128"),
    (8, 1, 8, 64, 100, 200, 0, torch.bfloat16, 4, {"block_n": 32}, "GQA 8 x M=8 (64 rows)"),
    (4, 2, 2, 256, 40, 48, 0, torch.bfloat16, 4, {"block_n": 16}, "D=256"),
    (4, 1, 4, 512, 40, 64, 0, torch.bfloat16, 4, {"block_n": 16}, "D=512 (Gemma 4 full layers)"),
    (4, 1, 4, 64, 150, 256, 16, torch.float32, 4, {"block_n": 16}, "sliding window 16"),
    (4, 1, 4, 64, 10, 256, 16, torch.float32, 4, {"block_n": 16}, "window > L"),
    (2, 1, 3, 64, 30, 64, 1, torch.float32, 4, {"block_n": 16}, "window 1"),
    (4, 2, 5, 64, 90, 128, 40, torch.bfloat16, 8, {"block_n": 16, "min_tiles": 1}, "window 40 over 3 splits"),
    (
        2,
        1,
        2,
        64,
        600,
        1024,
        0,
        torch.float32,
        64,
        {"block_n": 16, "min_tiles": 1},
        "64 splits (38 hold keys) > reduce chunk",
    ),
    (4, 1, 1, 128, 3, 300, 0, torch.float32, 4, {"block_n": 16}, "tiny L, big bucket"),
    (4, 2, 4, 64, 77, 128, 0, torch.float16, 4, {"block_n": 16}, "strided q (Linear layout)"),
    (8, 2, 5, 64, 70, 128, 0, torch.float32, 4, {"block_n": 16, "rows": 16}, "20 rows per head in 2 blocks"),
    (
        4,
        2,
        3,
        128,
        60,
        64,
        0,
        torch.float32,
        4,
        {"block_n": 16, "rotated": 0.25},
        "partial RoPE 16/64",
    ),
    (4, 1, 4, 64, 130000, 130016, 16, torch.bfloat16, 4, {"block_n": 16}, "positions ~130000, window 16"),
    (4, 1, 4, 64, 150, 256, 16, torch.float32, 4, {"block_n": 16, "ring": 40}, "ring 40, window 16, wrapped"),
    (4, 2, 3, 64, 20, 64, 16, torch.bfloat16, 4, {"block_n": 16, "ring": 40}, "ring 40, not yet wrapped"),
    (4, 1, 8, 64, 1000, 1024, 32, torch.bfloat16, 4, {"block_n": 16, "ring": 48, "min_tiles": 1}, "ring M=8"),
    # logit softcaps: Gemma 2's 50 (scores of random q, k barely reach it) and 0.5 (every score saturates)
    (8, 2, 4, 256, 300, 320, 0, torch.bfloat16, 4, {"block_n": 16, "softcap": 50.0}, "softcap 50, D=256"),
    (4, 2, 3, 64, 90, 128, 16, torch.float32, 8, {"block_n": 16, "softcap": 0.5}, "softcap 0.5, window"),
]


# "rotated" (not a config field) is the share of rotated pairs: default 1.0 for these, 0.25 (Gemma 4's)
# for the K = V layers below (one cached tensor, keys rebuilt in the kernel), which have the same fields
SHARED_CASES = [
    (4, 1, 4, 512, 40, 64, 0, torch.bfloat16, 4, {"block_n": 16}, "K=V D=512 (Gemma 4 full layer)"),
    (4, 1, 3, 512, 70, 80, 0, torch.float32, 4, {"block_n": 16, "min_tiles": 1}, "K=V D=512 fp32, splits"),
    (8, 1, 5, 512, 45, 64, 0, torch.bfloat16, 4, {"block_n": 16, "rows": 16}, "K=V D=512 40 rows, 3 blocks"),
    (8, 2, 2, 64, 33, 48, 0, torch.float32, 4, {"block_n": 16, "rotated": 1.0}, "K=V D=64 all rotate"),
    (4, 1, 4, 128, 150, 256, 16, torch.float16, 4, {"block_n": 16}, "K=V sliding window 16"),
    (4, 2, 3, 64, 30, 32, 0, torch.float32, 4, {"block_n": 16, "rotated": 0.1}, "K=V 3 of 32 pairs rotate"),
    (4, 1, 3, 128, 130000, 130016, 16, torch.bfloat16, 4, {"block_n": 16, "rotated": 1.0}, "K=V pos ~130000"),
]


# etspec::sdpa_chunk (many rows in row blocks of `rows`, each reading only its own rows' keys), same fields
CHUNK_CASES = [
    (4, 1, 48, 64, 48, 64, 0, torch.float32, 4, {"block_n": 16, "rows": 16}, "chunk: first chunk, 12 blocks"),
    (8, 2, 37, 64, 200, 256, 0, torch.bfloat16, 64, {"block_n": 16, "rows": 32}, "chunk: ragged, 6 splits"),
    (4, 2, 40, 64, 300, 320, 32, torch.float32, 32, {"block_n": 16, "rows": 16}, "chunk: window 32, splits"),
    (
        4,
        1,
        24,
        64,
        150,
        256,
        16,
        torch.float32,
        16,
        {"block_n": 16, "rows": 16, "ring": 48},
        "chunk: ring 48",
    ),
    (
        4,
        2,
        40,
        64,
        200,
        256,
        32,
        torch.float32,
        8,
        {"block_n": 16, "rows": 16, "softcap": 0.5},
        "chunk: softcap",
    ),
    (4, 2, 64, 128, 333, 400, 0, torch.float16, 4, {}, "chunk: D=128, default config"),
    (2, 1, 20, 256, 90, 96, 0, torch.bfloat16, 8, {}, "chunk: D=256, default config"),
    (8, 1, 20, 512, 60, 64, 0, torch.bfloat16, 4, {"rotated": 0.25}, "chunk: D=512, partial RoPE"),
    (4, 2, 9, 512, 40, 48, 0, torch.float32, 4, {"block_n": 16}, "chunk: D=512 fp32"),
    (
        4,
        1,
        30,
        64,
        130000,
        130016,
        64,
        torch.bfloat16,
        132,
        {"block_n": 16},
        "chunk: positions ~130000, window",
    ),
    (
        1,
        1,
        520,
        64,
        600,
        640,
        8,
        torch.float32,
        1320,
        {"block_n": 16, "rows": 16, "min_tiles": 1},
        "chunk: a row's keys past 32 splits",
    ),
]


def run_interp_cases() -> int:
    from etspec.kernels.launching import INTERPRET
    from etspec.kernels.sdpa_chunk import chunk_config, launch_chunk
    from etspec.kernels.sdpa_midm import default_config, launch

    assert INTERPRET, "set TRITON_INTERPRET=1 before importing triton"
    fails = 0
    cases = [(c, False) for c in INTERP_CASES] + [(c, True) for c in SHARED_CASES]
    cases += [(c, "chunk") for c in CHUNK_CASES]
    for i, ((hq, hkv, m, d, L, lb, win, dtype, n_sm, cfg, note), shared) in enumerate(cases):
        t0 = time.time()
        q, k, v, pos = make_case(hq, hkv, m, d, L, lb, dtype, seed=100 + i, q_strided="strided" in note)
        # the op's own output layout ([1, M, Hq, D] memory) on every other case, contiguous on the rest
        out = torch.full((1, m, hq, d) if i % 2 else (1, hq, m, d), float("nan"), dtype=dtype)
        out = out.transpose(1, 2) if i % 2 else out
        scale = 1.0 / math.sqrt(d)
        cfg = dict(cfg)
        rotated = cfg.pop("rotated", 0.25 if shared else 1.0)
        ring = cfg.pop("ring", 0)
        softcap = cfg.pop("softcap", 0.0)
        chunk, shared = shared == "chunk", shared is True
        w, freq = make_shared(d, seed=i, rotated=rotated)
        extra = {"k_weight": w} if shared else {}
        cfg = replace(chunk_config(d) if chunk else default_config(d), **cfg)
        k_in, v_in = k, v
        if ring:  # the kernel reads a ring cache; the reference the full one
            extra["ring"] = ring
            k_in, v_in = (to_ring(c, L, ring)[:, :, : min(ring, lb)] for c in (k, v))
        if softcap:
            extra["softcap"] = softcap
        run = launch_chunk if chunk else launch
        run(q, k_in, v_in, freq, pos, scale, win, out, n_sm=n_sm, config=cfg, **extra)
        keys = shared_keys64(v, w, freq) if shared else k
        ref = ref64(q, keys, v, pos, freq, scale, win, softcap)
        err = rel_err(out, ref)
        ok = bool(torch.isfinite(out).all()) and err < TOL[dtype]
        fails += not ok
        print(
            f"{'OK  ' if ok else 'FAIL'} {note:38s} hq={hq} hkv={hkv} M={m} D={d} L={L} Lb={lb} w={win} "
            f"{str(dtype)[6:]:8s} rel_err={err:.2e} ({time.time() - t0:.2f}s)",
            flush=True,
        )
    print(f"{len(cases) - fails}/{len(cases)} interpreter cases passed")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(run_interp_cases())
