"""Triton kernels for the connections' stream-sized passes (CUDA; CPU under ``TRITON_INTERPRET=1`` for tests).

One program per token (or per row of the normalised projection) loops over the channels in blocks: the n streams of a
token are read once and written once per pass, with fp32 accumulation for fp32 and bf16 inputs. Small dims
(``n``, ``J = k + n``, the projection width) are padded to powers of two and masked.

* :func:`mix_fwd` / :func:`mix_bwd`: HC Eqs. 3-4, ``out_j = sum_i mix_ij H_i`` and its two gradients;
* :func:`depth_fwd` / :func:`depth_bwd`: Eq. 5, ``H'_i = R_i + B_i y_(i)`` (``y`` one row for HC, one per fraction for
  FC) and ``grad y``, ``grad B``;
* :func:`normed_proj_fwd` / :func:`normed_proj_bwd`: ``rstd (x W^T - mu s^T)`` over rows of ``x`` (DHC/DFC Eqs. 10-13
  with LayerNorm/RMSNorm folded in; mHC Eq. 7 over ``vec(H)``) and its input gradient;
* :func:`mhc_coeff_fwd` / :func:`mhc_coeff_bwd`: mHC Eqs. 8-9 per token: gates, sigmoids and Sinkhorn-Knopp in the
  log domain (finite for any finite logits), with the exact backward through every iteration from the saved
  normalisers.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def mix_fwd(H, M, OUT, c, m_tok_stride, N: tl.constexpr, J: tl.constexpr, NP: tl.constexpr, JP: tl.constexpr,
            BC: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, NP)
    j = tl.arange(0, JP)
    m = tl.load(M + t * m_tok_stride + i[:, None] * J + j[None, :], mask=(i[:, None] < N) & (j[None, :] < J),
                other=0.0).to(tl.float32)
    for c0 in range(0, c, BC):
        cc = c0 + tl.arange(0, BC)
        h = tl.load(H + t * N * c + i[:, None] * c + cc[None, :], mask=(i[:, None] < N) & (cc[None, :] < c),
                    other=0.0).to(tl.float32)
        out = tl.sum(m[:, :, None] * h[:, None, :], axis=0)  # (JP, BC)
        tl.store(OUT + t * J * c + j[:, None] * c + cc[None, :], out.to(OUT.dtype.element_ty),
                 mask=(j[:, None] < J) & (cc[None, :] < c))


@triton.jit
def mix_bwd(H, M, GIN, GRES, GH, GM, c, m_tok_stride, N: tl.constexpr, K: tl.constexpr, NP: tl.constexpr,
            JP: tl.constexpr, BC: tl.constexpr, NEED_H: tl.constexpr, NEED_M: tl.constexpr, ACCUM: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    J: tl.constexpr = K + N
    i = tl.arange(0, NP)
    j = tl.arange(0, JP)
    m = tl.load(M + t * m_tok_stride + i[:, None] * J + j[None, :], mask=(i[:, None] < N) & (j[None, :] < J),
                other=0.0).to(tl.float32)
    gm = tl.zeros((NP, JP), dtype=tl.float32)
    for c0 in range(0, c, BC):
        cc = c0 + tl.arange(0, BC)
        cm = cc[None, :] < c
        # G = [g_in; g_res], rows j < K from g_in, the others from g_res
        g_in = tl.load(GIN + t * K * c + j[:, None] * c + cc[None, :], mask=(j[:, None] < K) & cm, other=0.0)
        g_res = tl.load(GRES + t * N * c + (j[:, None] - K) * c + cc[None, :],
                        mask=(j[:, None] >= K) & (j[:, None] < J) & cm, other=0.0)
        G = g_in.to(tl.float32) + g_res.to(tl.float32)  # (JP, BC)
        hmask = (i[:, None] < N) & cm
        if NEED_H:
            gh = tl.sum(m[:, :, None] * G[None, :, :], axis=1)  # (NP, BC)
            ptr = GH + t * N * c + i[:, None] * c + cc[None, :]
            if ACCUM:
                gh += tl.load(ptr, mask=hmask, other=0.0).to(tl.float32)
            tl.store(ptr, gh.to(GH.dtype.element_ty), mask=hmask)
        if NEED_M:
            h = tl.load(H + t * N * c + i[:, None] * c + cc[None, :], mask=hmask, other=0.0).to(tl.float32)
            gm += tl.sum(h[:, None, :] * G[None, :, :], axis=2)  # (NP, JP)
    if NEED_M:
        tl.store(GM + t * N * J + i[:, None] * J + j[None, :], gm, mask=(i[:, None] < N) & (j[None, :] < J))


@triton.jit
def depth_fwd(R, B, Y, OUT, c, b_tok_stride, N: tl.constexpr, K: tl.constexpr, NP: tl.constexpr, BC: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, NP)
    b = tl.load(B + t * b_tok_stride + i, mask=i < N, other=0.0).to(tl.float32)
    yi = i if K > 1 else i * 0  # FC: fraction i of y; HC: the one row
    for c0 in range(0, c, BC):
        cc = c0 + tl.arange(0, BC)
        msk = (i[:, None] < N) & (cc[None, :] < c)
        r = tl.load(R + t * N * c + i[:, None] * c + cc[None, :], mask=msk, other=0.0).to(tl.float32)
        y = tl.load(Y + t * K * c + yi[:, None] * c + cc[None, :], mask=msk, other=0.0).to(tl.float32)
        tl.store(OUT + t * N * c + i[:, None] * c + cc[None, :], (r + b[:, None] * y).to(OUT.dtype.element_ty),
                 mask=msk)


@triton.jit
def depth_bwd(G, B, Y, GY, GB, c, b_tok_stride, N: tl.constexpr, K: tl.constexpr, NP: tl.constexpr,
              BC: tl.constexpr, NEED_Y: tl.constexpr, NEED_B: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, NP)
    b = tl.load(B + t * b_tok_stride + i, mask=i < N, other=0.0).to(tl.float32)
    yi = i if K > 1 else i * 0
    gb = tl.zeros((NP,), dtype=tl.float32)
    for c0 in range(0, c, BC):
        cc = c0 + tl.arange(0, BC)
        msk = (i[:, None] < N) & (cc[None, :] < c)
        g = tl.load(G + t * N * c + i[:, None] * c + cc[None, :], mask=msk, other=0.0).to(tl.float32)
        if NEED_Y:
            gy = b[:, None] * g  # (NP, BC)
            if K == 1:
                tl.store(GY + t * c + cc, tl.sum(gy, axis=0).to(GY.dtype.element_ty), mask=cc < c)
            else:
                tl.store(GY + t * N * c + i[:, None] * c + cc[None, :], gy.to(GY.dtype.element_ty), mask=msk)
        if NEED_B:
            y = tl.load(Y + t * K * c + yi[:, None] * c + cc[None, :], mask=msk, other=0.0).to(tl.float32)
            gb += tl.sum(g * y, axis=1)
    if NEED_B:
        tl.store(GB + t * N + i, gb, mask=i < N)


@triton.jit
def normed_proj_fwd(X, W, WSUM, P, MEAN, RSTD, D, eps, J: tl.constexpr, JP: tl.constexpr, BD: tl.constexpr,
                    NORM: tl.constexpr, CENTER: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, JP)
    acc = tl.zeros((JP,), dtype=tl.float32)
    s1 = tl.zeros((BD,), dtype=tl.float32)
    s2 = tl.zeros((BD,), dtype=tl.float32)
    for d0 in range(0, D, BD):
        dd = d0 + tl.arange(0, BD)
        x = tl.load(X + r * D + dd, mask=dd < D, other=0.0).to(tl.float32)
        w = tl.load(W + j[:, None] * D + dd[None, :], mask=(j[:, None] < J) & (dd[None, :] < D),
                    other=0.0).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1)
        s1 += x
        s2 += x * x
    if NORM:
        ms = tl.sum(s2, axis=0) / D
        mean = tl.sum(s1, axis=0) / D
        if CENTER:
            ms = tl.maximum(ms - mean * mean, 0.0)
            wsum = tl.load(WSUM + j, mask=j < J, other=0.0).to(tl.float32)
            acc -= mean * wsum
            tl.store(MEAN + r, mean)
        rstd = 1.0 / tl.sqrt(ms + eps)
        acc = acc * rstd
        tl.store(RSTD + r, rstd)
    tl.store(P + r * J + j, acc, mask=j < J)


@triton.jit
def normed_proj_bwd(X, W, WSUM, GP, P, MEAN, RSTD, GX, GU, D, J: tl.constexpr, JP: tl.constexpr, BD: tl.constexpr,
                    NORM: tl.constexpr, CENTER: tl.constexpr, NEED_X: tl.constexpr, ACCUM: tl.constexpr):
    """``grad u = g rstd`` (for ``grad W = grad_u^T x - ...``, summed over rows outside) and ``grad x``:
    ``grad_u W + grad_mu / D + 2 grad_var (x - ...) / D`` with ``grad_var = -sum(g p) rstd^2 / 2``."""
    r = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, JP)
    g = tl.load(GP + r * J + j, mask=j < J, other=0.0).to(tl.float32)
    gu = g
    gvar = 0.0
    gmean = 0.0
    if NORM:
        rstd = tl.load(RSTD + r)
        p = tl.load(P + r * J + j, mask=j < J, other=0.0)
        gu = g * rstd
        gvar = tl.sum(g * p, axis=0) * rstd * rstd * -0.5
        if CENTER:
            wsum = tl.load(WSUM + j, mask=j < J, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + r)
            gmean = -tl.sum(gu * wsum, axis=0) - 2.0 * mean * gvar
    tl.store(GU + r * J + j, gu, mask=j < J)
    if NEED_X:
        for d0 in range(0, D, BD):
            dd = d0 + tl.arange(0, BD)
            w = tl.load(W + j[:, None] * D + dd[None, :], mask=(j[:, None] < J) & (dd[None, :] < D),
                        other=0.0).to(tl.float32)
            gx = tl.sum(gu[:, None] * w, axis=0)
            if NORM:
                x = tl.load(X + r * D + dd, mask=dd < D, other=0.0).to(tl.float32)
                gx += gmean / D + gvar * 2.0 / D * x
            ptr = GX + r * D + dd
            if ACCUM:
                gx += tl.load(ptr, mask=dd < D, other=0.0).to(tl.float32)
            tl.store(ptr, gx.to(GX.dtype.element_ty), mask=dd < D)


@triton.jit
def _masked_lse(L, valid, axis: tl.constexpr):
    """``log sum exp`` of the valid entries along ``axis`` (0 where a whole line is padding)."""
    Lm = tl.where(valid, L, float("-inf"))
    mx = tl.max(Lm, axis=axis)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    if axis == 0:
        s = tl.sum(tl.where(valid, tl.exp(Lm - mx[None, :]), 0.0), axis=0)
    else:
        s = tl.sum(tl.where(valid, tl.exp(Lm - mx[:, None]), 0.0), axis=1)
    return mx + tl.log(tl.where(s > 0.0, s, 1.0))


@triton.jit
def mhc_coeff_fwd(P, GATE, BIAS, MIX, POST, LOGS, iters, N: tl.constexpr, NP: tl.constexpr):
    """Per token: ``H_pre = sigmoid(a_pre p_pre + b_pre)``, ``H_post = 2 sigmoid(...)``, ``H_res = SK(a_res p_res +
    b_res)`` in the log domain; writes ``[H_pre^T | H_res^T]`` ``(n, 1 + n)``, ``H_post`` and the normalisers
    ``LOGS (iters, 2, n)`` (column then row log-sums) that the backward rebuilds the iterates from."""
    t = tl.program_id(0).to(tl.int64)
    K: tl.constexpr = 2 * N + N * N
    i = tl.arange(0, NP)
    vi = i < N
    pre = tl.load(P + t * K + i, mask=vi, other=0.0) * tl.load(GATE + i, mask=vi, other=0.0) \
        + tl.load(BIAS + i, mask=vi, other=0.0)
    post = tl.load(P + t * K + N + i, mask=vi, other=0.0) * tl.load(GATE + N + i, mask=vi, other=0.0) \
        + tl.load(BIAS + N + i, mask=vi, other=0.0)
    h_pre = 1.0 / (1.0 + tl.exp(-pre))
    h_post = 2.0 / (1.0 + tl.exp(-post))
    valid = vi[:, None] & vi[None, :]
    off = 2 * N + i[:, None] * N + i[None, :]  # row-major vec(H~_res)
    L = tl.load(P + t * K + off, mask=valid, other=0.0) * tl.load(GATE + off, mask=valid, other=0.0) \
        + tl.load(BIAS + off, mask=valid, other=0.0)
    for it in range(0, iters):
        c = _masked_lse(L, valid, 0)  # (NP,) per column
        L = tl.where(valid, L - c[None, :], 0.0)
        r = _masked_lse(L, valid, 1)  # (NP,) per row
        L = tl.where(valid, L - r[:, None], 0.0)
        tl.store(LOGS + (t * iters + it) * 2 * N + i, c, mask=vi)
        tl.store(LOGS + (t * iters + it) * 2 * N + N + i, r, mask=vi)
    h_res = tl.where(valid, tl.exp(L), 0.0)
    # [A_m | A_r]: row i holds H_pre[i] and column i of H_res (A_r = H_res^T), so MIX[i, 1 + j] = H_res[j, i]
    base = MIX + t * N * (N + 1)
    tl.store(base + i * (N + 1), h_pre, mask=vi)
    tl.store(base + i[None, :] * (N + 1) + 1 + i[:, None], h_res, mask=valid)
    tl.store(POST + t * N + i, h_post, mask=vi)


@triton.jit
def mhc_coeff_bwd(P, GATE, BIAS, MIX, POST, LOGS, GMIX, GPOST, GL, iters, N: tl.constexpr, NP: tl.constexpr):
    """Gradient of the logits (``GL (tokens, 2n + n^2)``, before the gates) from those of ``MIX`` and ``H_post``.

    Sinkhorn backward, exact through all iterations: with ``G`` the gradient with respect to ``log M``, each
    normalisation ``L - lse(L)`` has ``G_in = G_out - exp(L_out) * sum(G_out)`` along its axis. The log iterates are
    rebuilt from the logits and the saved normalisers (``L_T = L_0 - sum_t (c_t + r_t)``, then backwards by adding
    each back), so nothing of size ``iters n^2`` is stored."""
    t = tl.program_id(0).to(tl.int64)
    K: tl.constexpr = 2 * N + N * N
    i = tl.arange(0, NP)
    vi = i < N
    valid = vi[:, None] & vi[None, :]
    gbase = GMIX + t * N * (N + 1)
    h_pre = tl.load(MIX + t * N * (N + 1) + i * (N + 1), mask=vi, other=0.0)
    g_pre = tl.load(gbase + i * (N + 1), mask=vi, other=0.0).to(tl.float32)
    s_post = tl.load(POST + t * N + i, mask=vi, other=0.0) * 0.5
    g_post = tl.load(GPOST + t * N + i, mask=vi, other=0.0).to(tl.float32)
    tl.store(GL + t * K + i, g_pre * h_pre * (1.0 - h_pre), mask=vi)
    tl.store(GL + t * K + N + i, g_post * 2.0 * s_post * (1.0 - s_post), mask=vi)
    off = 2 * N + i[:, None] * N + i[None, :]
    L = tl.load(P + t * K + off, mask=valid, other=0.0) * tl.load(GATE + off, mask=valid, other=0.0) \
        + tl.load(BIAS + off, mask=valid, other=0.0)
    for it in range(0, iters):
        c = tl.load(LOGS + (t * iters + it) * 2 * N + i, mask=vi, other=0.0)
        r = tl.load(LOGS + (t * iters + it) * 2 * N + N + i, mask=vi, other=0.0)
        L = tl.where(valid, L - c[None, :] - r[:, None], 0.0)
    g = tl.load(gbase + i[None, :] * (N + 1) + 1 + i[:, None], mask=valid, other=0.0).to(tl.float32)  # d/d H_res
    G = tl.where(valid, g * tl.exp(L), 0.0)
    for k in range(0, iters):
        it = iters - 1 - k
        c = tl.load(LOGS + (t * iters + it) * 2 * N + i, mask=vi, other=0.0)
        r = tl.load(LOGS + (t * iters + it) * 2 * N + N + i, mask=vi, other=0.0)
        G = tl.where(valid, G - tl.exp(L) * tl.sum(G, axis=1)[:, None], 0.0)  # through the row normalisation
        L = tl.where(valid, L + r[:, None], 0.0)
        G = tl.where(valid, G - tl.exp(L) * tl.sum(G, axis=0)[None, :], 0.0)  # through the column normalisation
        L = tl.where(valid, L + c[None, :], 0.0)
    tl.store(GL + t * K + off, G, mask=valid)
