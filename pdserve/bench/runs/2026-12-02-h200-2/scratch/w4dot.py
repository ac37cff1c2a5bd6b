"""Scratch: 4-bit weight matmul on tensor cores with the dequantization kept cheap.
Per group (K8 packed rows = group_size / 8): load packed [K8, BN] once; nibble j -> exact (q - zero) in
fp32 by the 2^(23-s) trick (LOP3 + FADD), to the dot dtype; dot with x; the group's scale multiplies the
[BM, BN] partial once. Variants: JOIN (8 nibbles joined into [8 K8, BN], one dot, natural k order),
NIB (8 dots of K = K8, x gathered at stride 8).
python3 exp/w4dot.py [--check]"""
import sys

import torch
import triton
import triton.language as tl

_EXP_2_23 = 150 << 23


@triton.jit
def _nib(bits, zero, exp_2_23, SHIFT: tl.constexpr):
    value = ((bits & (0xF << SHIFT)) | (exp_2_23 - (SHIFT << 23))).to(tl.float32, bitcast=True)
    return value - (zero + (1 << (23 - SHIFT)))


@triton.jit
def _w(packed, high, zero, exp_2_23, J: tl.constexpr):
    if J < 5:
        w = _nib(packed, zero, exp_2_23, 4 * J)
    else:
        w = _nib(high, zero, exp_2_23, 4 * J - 12)
    return w


@triton.jit
def _kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, out_ptr, M, N, num_groups,
    stride_xm, stride_qk, stride_sg, stride_zg, stride_om, exp_2_23,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, K8: tl.constexpr, G: tl.constexpr,
    JOIN: tl.constexpr, NUM_STAGES: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    k8 = tl.arange(0, K8)
    offs_k = tl.arange(0, 8 * K8)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g0 in tl.range(0, num_groups, G, num_stages=NUM_STAGES):
        for gg in tl.static_range(G):
            g = g0 + gg
            packed = tl.load(qweight_ptr + (g * K8 + k8)[:, None] * stride_qk + offs_n[None, :], mask=mask_n[None, :], other=0)
            zero = tl.load(zeros_ptr + g * stride_zg + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
            scale = tl.load(scales_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            high = packed >> 12
            if JOIN:
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + g * 8 * K8 + offs_k[None, :], mask=mask_m[:, None], other=0.0)
                w01 = tl.join(_w(packed, high, zero, exp_2_23, 0), _w(packed, high, zero, exp_2_23, 1))
                w23 = tl.join(_w(packed, high, zero, exp_2_23, 2), _w(packed, high, zero, exp_2_23, 3))
                w45 = tl.join(_w(packed, high, zero, exp_2_23, 4), _w(packed, high, zero, exp_2_23, 5))
                w67 = tl.join(_w(packed, high, zero, exp_2_23, 6), _w(packed, high, zero, exp_2_23, 7))
                w = tl.join(tl.join(w01, w23), tl.join(w45, w67))  # [K8, BN, b0, b1, b2]
                w = tl.permute(w, (0, 4, 3, 2, 1))
                w = tl.reshape(w, (8 * K8, BLOCK_N))
                part = tl.dot(x, w.to(x.dtype), input_precision=DOT_PRECISION)
            else:
                part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for j in tl.static_range(8):
                    xj = tl.load(x_ptr + offs_m[:, None] * stride_xm + g * 8 * K8 + 8 * k8[None, :] + j, mask=mask_m[:, None], other=0.0)
                    part = tl.dot(xj, _w(packed, high, zero, exp_2_23, j).to(xj.dtype), part, input_precision=DOT_PRECISION)
            acc = tl.fma(part, scale[None, :], acc)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def w4dot(x, qweight, scales, zeros, group_size, bm=16, bn=32, g=1, join=True, num_warps=4, num_stages=4):
    m, k = x.shape
    n = qweight.shape[1]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    num_groups = k // group_size
    assert num_groups % g == 0
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm))
    _kernel[grid](
        x, qweight, scales, zeros, out, m, n, num_groups,
        x.stride(0), qweight.stride(0), scales.stride(0), zeros.stride(0), out.stride(0), _EXP_2_23,
        BLOCK_M=bm, BLOCK_N=bn, K8=group_size // 8, G=g, JOIN=join, NUM_STAGES=num_stages,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=num_warps,
    )
    return out


@triton.jit
def _group_part(x_ptr, offs_m, mask_m, stride_xm, g, packed, zero, scale, exp_2_23, K8: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_k = tl.arange(0, 8 * K8)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + g * 8 * K8 + offs_k[None, :], mask=mask_m[:, None], other=0.0)
    zero = zero.to(tl.float32)[None, :]
    high = packed >> 12
    w01 = tl.join(_w(packed, high, zero, exp_2_23, 0).to(x.dtype), _w(packed, high, zero, exp_2_23, 1).to(x.dtype))
    w23 = tl.join(_w(packed, high, zero, exp_2_23, 2).to(x.dtype), _w(packed, high, zero, exp_2_23, 3).to(x.dtype))
    w45 = tl.join(_w(packed, high, zero, exp_2_23, 4).to(x.dtype), _w(packed, high, zero, exp_2_23, 5).to(x.dtype))
    w67 = tl.join(_w(packed, high, zero, exp_2_23, 6).to(x.dtype), _w(packed, high, zero, exp_2_23, 7).to(x.dtype))
    w = tl.join(tl.join(w01, w23), tl.join(w45, w67))
    w = tl.reshape(tl.permute(w, (0, 4, 3, 2, 1)), (8 * K8, BLOCK_N))
    part = tl.dot(x, w, input_precision=DOT_PRECISION)
    return part * scale.to(tl.float32)[None, :]


@triton.jit
def _kernel_pf(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, out_ptr, M, N, num_groups,
    stride_xm, stride_qk, stride_sg, stride_zg, stride_om, exp_2_23,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, K8: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Two groups an iteration ([K8, BN, 2] tiles), the next two loaded before these are computed."""
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    k8 = tl.arange(0, K8)[:, None, None]
    two = tl.arange(0, 2)
    w_offs = (two[None, None, :] * K8 + k8) * stride_qk + offs_n[None, :, None]
    w_mask = mask_n[None, :, None]
    sz_mask = mask_n[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    packed = tl.load(qweight_ptr + w_offs, mask=w_mask, other=0)
    zero = tl.load(zeros_ptr + two[None, :] * stride_zg + offs_n[:, None], mask=sz_mask, other=0)
    scale = tl.load(scales_ptr + two[None, :] * stride_sg + offs_n[:, None], mask=sz_mask, other=0.0)
    for g0 in range(0, num_groups, 2):
        nxt = tl.minimum(g0 + 2, num_groups - 2)  # the last pair again on the last iteration (an L2 hit)
        packed_n = tl.load(qweight_ptr + nxt * K8 * stride_qk + w_offs, mask=w_mask, other=0)
        zero_n = tl.load(zeros_ptr + (nxt + two[None, :]) * stride_zg + offs_n[:, None], mask=sz_mask, other=0)
        scale_n = tl.load(scales_ptr + (nxt + two[None, :]) * stride_sg + offs_n[:, None], mask=sz_mask, other=0.0)
        p0, p1 = tl.split(packed)
        z0, z1 = tl.split(zero)
        s0, s1 = tl.split(scale)
        acc += _group_part(x_ptr, offs_m, mask_m, stride_xm, g0, p0, z0, s0, exp_2_23, K8, BLOCK_N, DOT_PRECISION)
        acc += _group_part(x_ptr, offs_m, mask_m, stride_xm, g0 + 1, p1, z1, s1, exp_2_23, K8, BLOCK_N, DOT_PRECISION)
        packed, zero, scale = packed_n, zero_n, scale_n
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def w4dot_pf(x, qweight, scales, zeros, group_size, bm=16, bn=32, num_warps=4, num_stages=1):
    m, k = x.shape
    n = qweight.shape[1]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    num_groups = k // group_size
    assert num_groups % 2 == 0
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm))
    _kernel_pf[grid](
        x, qweight, scales, zeros, out, m, n, num_groups,
        x.stride(0), qweight.stride(0), scales.stride(0), zeros.stride(0), out.stride(0), _EXP_2_23,
        BLOCK_M=bm, BLOCK_N=bn, K8=group_size // 8,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=num_warps, num_stages=num_stages,
    )
    return out


def check(device):
    from pdserve.kernels.w4_matmul import w4_matmul_ref
    torch.manual_seed(0)
    for m, n, k, gs, dt in [(1, 64, 256, 128, torch.float32), (5, 48, 512, 128, torch.float32), (3, 32, 256, 128, torch.bfloat16), (17, 40, 256, 64, torch.float32)]:
        q = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32, device=device)
        s = (torch.rand(k // gs, n, device=device) * 0.01 + 0.001).half()
        z = torch.randint(0, 16, (k // gs, n), dtype=torch.uint8, device=device)
        x = torch.randn(m, k, device=device, dtype=dt)
        ref = w4_matmul_ref(x.float(), q, s, z, gs)
        for join in (True, False):
            if not join and gs // 8 < 16:
                continue
            for g in (1, 2):
                if (k // gs) % g:
                    continue
                out = w4dot(x, q, s, z, gs, bm=16, bn=16 if n < 64 else 32, g=g, join=join)
                err = (out.float() - ref).abs().max().item() / ref.abs().max().item()
                print(m, n, k, gs, dt, "join" if join else "nib", g, f"rel err {err:.2e}")
        if (k // gs) % 2 == 0:
            out = w4dot_pf(x, q, s, z, gs, bm=16, bn=16 if n < 64 else 32)
            print("pf", m, n, k, gs, dt, f"rel err {(out.float() - ref).abs().max().item() / ref.abs().max().item():.2e}")


def bench():
    from triton.testing import do_bench_cudagraph

    from pdserve import kernels
    from pdserve.bench.ceilings import copy_bandwidth_gbs
    copy = copy_bandwidth_gbs()
    print(f"copy {copy:.0f} GB/s", torch.cuda.get_device_name())
    shapes = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
    gs = 128
    for name, (n, k) in shapes.items():
        sets = max(2, (200 << 20) // (n * k // 2) + 1)
        ws = [(torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda"),
               (torch.rand(k // gs, n, device="cuda") * 0.004 + 0.001).half(),
               torch.randint(0, 16, (k // gs, n), dtype=torch.uint8, device="cuda")) for _ in range(sets)]
        torch.cuda.synchronize()
        nbytes = n * k // 2 + (k // gs) * n * 3
        st = {"i": 0}

        def pick():
            st["i"] = (st["i"] + 1) % len(ws)
            return ws[st["i"]]
        for m in (1, 16, 64):
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            ref = kernels.w4_matmul_ref(x.float(), *ws[0], gs)

            def rate(fn):
                ms = do_bench_cudagraph(fn, rep=50, return_mode="median")
                return 100 * nbytes / (ms * 1e-3) / 1e9 / copy
            base = {"w4_matmul": rate(lambda: kernels.w4_matmul(x, *pick(), gs))}
            if m <= 4:
                base["w4_gemv"] = rate(lambda: kernels.w4_gemv(x, *pick(), gs))
            results = []
            bms = (16,) if m <= 16 else (16, 64)
            cfgs = [("pf", dict(bm=bm, bn=bn, num_warps=nw, num_stages=ns)) for bm in bms for bn in (16, 32, 64) for nw in (4, 8) for ns in (1, 3)]
            cfgs.append(("old", dict(bm=bms[-1], bn=32, g=2, join=True, num_warps=4, num_stages=3)))
            for kind, cfg in cfgs:
                fn = w4dot_pf if kind == "pf" else w4dot
                cfg = dict(cfg, join=kind) if kind == "pf" else cfg
                call = (lambda fn=fn, cfg=cfg: fn(x, *pick(), gs, **{k_: v for k_, v in cfg.items() if k_ != "join" or fn is w4dot}))
                try:
                    out = fn(x, *ws[0], gs, **{k_: v for k_, v in cfg.items() if k_ != "join" or fn is w4dot})
                    err = (out.float() - ref).abs().max().item() / ref.abs().max().item()
                    if err > 2e-2:
                        results.append((0.0, cfg, f"ERR {err:.1e}"))
                        continue
                    results.append((rate(call), cfg, ""))
                except Exception as e:  # noqa: BLE001
                    results.append((0.0, cfg, type(e).__name__ + str(e)[:80]))
            results.sort(key=lambda r: -r[0])
            best = "; ".join(f"{r:.1f}% {c}" for r, c, _ in results[:3])
            errs = [f"{c} {e}" for _, c, e in results if e][:2]
            print(f"{name} m={m}: " + ", ".join(f"{k_} {v:.1f}%" for k_, v in base.items()) + f" | best: {best}", flush=True)
            for e in errs:
                print("   ", e)
            print("    old:", [f"{r:.1f}%" for r, c, _ in results if c.get("join") is True], flush=True)
        del ws
        torch.cuda.empty_cache()


if __name__ == "__main__":
    if "--check" in sys.argv:
        check("cuda" if torch.cuda.is_available() else "cpu")
    else:
        bench()
