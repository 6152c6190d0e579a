"""Unit lower triangular block systems (I - W) s = rhs in Triton: the inverses of the diagonal
blocks (no GPU-sized product in registers: built from 16 x 16 pieces, no spills when compiled for
sm_90), and block forward / transposed back substitution with them.

    inverse_kernel[(blocks, batch)](W, INV, blk0, nblk, nrows, col0, swb, swr, BT=64)
    solve_kernel[(cdiv(D, BD), batch)](RHS, W, INV, S, ...)      # s_i = INV_i (rhs_i + sum_{c<i} W_ic s_c)
    solve_t_kernel[(cdiv(D, BD), batch)](RHS, W, INV, U, ...)    # u_j = INV_j^T (rhs_j + sum_{c>j} W_cj^T u_c)

For a strictly lower N (a diagonal block of W, rows past nrows masked), (I - N)^-1 is exact up to
float32 rounding when the powers of N vanish (they do: N^BT = 0); well conditioned when
||N||_inf < 1, as in the feedback solve (|gamma| < 1, rows of alpha summing to 1).
"""

from __future__ import annotations

from kernels.triton_utils import autotune, jit, mma, tl

# arguments that change from group to group: never specialised on
_SOLVE_LENGTHS = ["blk0", "nblk", "nrows", "ncols", "col0", "row0", "ssb"]


@jit
def _sub_block(W, b, swb, swr, i0, j0, nrows, col0, LOWER: tl.constexpr):
    """N[i0:i0+16, j0:j0+16] of the diagonal block's N = W[b, rows, col0 + rows] as (16, 16) fp32; rows
    (and columns) >= nrows read as 0; LOWER keeps only the strictly lower triangle (diagonal sub-blocks)."""
    a = tl.arange(0, 16)
    r = i0 + a
    c = j0 + a
    keep = (r[:, None] < nrows) & (c[None, :] < nrows)
    if LOWER:
        keep = keep & (a[:, None] > a[None, :])
    return tl.load(W + b * swb + r[:, None] * swr + (col0 + c)[None, :], mask=keep, other=0.0)


@jit
def _inverse16(n):
    """(I - n)^-1 of a strictly lower (16, 16) n: (I + n)(I + n^2)(I + n^4)(I + n^8), exact fp32 products."""
    a = tl.arange(0, 16)
    inv = tl.where(a[:, None] == a[None, :], 1.0, 0.0) + n
    power = n
    for _ in tl.static_range(3):
        power = mma(power, power, tl.float32)
        inv = inv + mma(inv, power, tl.float32)
    return inv


@jit
def _store16(INV, base, BT: tl.constexpr, i: tl.constexpr, j: tl.constexpr, x):
    a = tl.arange(0, 16)
    tl.store(INV + base + (i * 16 + a[:, None]) * BT + j * 16 + a[None, :], x)


@jit(do_not_specialize=["blk0", "nblk", "nrows", "col0"])
def inverse_kernel(W, INV, blk0, nblk, nrows, col0, swb, swr, BT: tl.constexpr):
    """INV[b, blk0 + i] = (I - N)^-1 for N = W[b, i*BT:(i+1)*BT, col0 + i*BT : col0 + (i+1)*BT] (strictly lower).

    Built from 16 x 16 pieces, so no BT x BT product is ever held in registers: the four diagonal
    inverses D_k = (I - N_kk)^-1 by repeated squaring, then the blocks below the diagonal by block
    forward substitution, X_kj = D_k sum_{j <= m < k} N_km X_mj (X_jj = D_j)."""
    tl.static_assert(BT == 16 or BT == 64, "BT must be 16 or 64")
    i = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    r0 = i * BT
    base = (b * nblk + blk0 + i) * BT * BT
    d0 = _inverse16(_sub_block(W, b, swb, swr, r0, r0, nrows, col0, True))
    _store16(INV, base, BT, 0, 0, d0)
    if BT == 64:
        zero = tl.zeros((16, 16), dtype=tl.float32)
        d1 = _inverse16(_sub_block(W, b, swb, swr, r0 + 16, r0 + 16, nrows, col0, True))
        d2 = _inverse16(_sub_block(W, b, swb, swr, r0 + 32, r0 + 32, nrows, col0, True))
        d3 = _inverse16(_sub_block(W, b, swb, swr, r0 + 48, r0 + 48, nrows, col0, True))
        n10 = _sub_block(W, b, swb, swr, r0 + 16, r0, nrows, col0, False)
        n20 = _sub_block(W, b, swb, swr, r0 + 32, r0, nrows, col0, False)
        n21 = _sub_block(W, b, swb, swr, r0 + 32, r0 + 16, nrows, col0, False)
        n30 = _sub_block(W, b, swb, swr, r0 + 48, r0, nrows, col0, False)
        n31 = _sub_block(W, b, swb, swr, r0 + 48, r0 + 16, nrows, col0, False)
        n32 = _sub_block(W, b, swb, swr, r0 + 48, r0 + 32, nrows, col0, False)
        x10 = mma(d1, mma(n10, d0, tl.float32), tl.float32)
        x21 = mma(d2, mma(n21, d1, tl.float32), tl.float32)
        x32 = mma(d3, mma(n32, d2, tl.float32), tl.float32)
        x20 = mma(d2, mma(n20, d0, tl.float32) + mma(n21, x10, tl.float32), tl.float32)
        x31 = mma(d3, mma(n31, d1, tl.float32) + mma(n32, x21, tl.float32), tl.float32)
        x30 = mma(d3, mma(n30, d0, tl.float32) + mma(n31, x10, tl.float32) + mma(n32, x20, tl.float32), tl.float32)
        _store16(INV, base, BT, 0, 1, zero)
        _store16(INV, base, BT, 0, 2, zero)
        _store16(INV, base, BT, 0, 3, zero)
        _store16(INV, base, BT, 1, 0, x10)
        _store16(INV, base, BT, 1, 1, d1)
        _store16(INV, base, BT, 1, 2, zero)
        _store16(INV, base, BT, 1, 3, zero)
        _store16(INV, base, BT, 2, 0, x20)
        _store16(INV, base, BT, 2, 1, x21)
        _store16(INV, base, BT, 2, 2, d2)
        _store16(INV, base, BT, 2, 3, zero)
        _store16(INV, base, BT, 3, 0, x30)
        _store16(INV, base, BT, 3, 1, x31)
        _store16(INV, base, BT, 3, 2, x32)
        _store16(INV, base, BT, 3, 3, d3)


@autotune([dict(num_warps=4), dict(num_warps=8)], key=["D"], interpret={})
@jit(do_not_specialize=_SOLVE_LENGTHS)
def solve_kernel(RHS, W, INV, S, blk0, nblk, nrows, col0, row0, D, srb, srr, swb, swr, ssb, sst,
                  BT: tl.constexpr, BD: tl.constexpr):
    """Block forward substitution inside a group: S[row0 + rows] = INV_i (RHS_i + sum_{c<i} W_ic S_c)."""
    pd = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    a = tl.arange(0, BT)
    dd = pd * BD + tl.arange(0, BD)
    for i in range(0, tl.cdiv(nrows, BT)):
        r = i * BT + a
        acc = tl.load(RHS + b * srb + r[:, None] * srr + dd[None, :],
                      mask=(r[:, None] < nrows) & (dd[None, :] < D), other=0.0)
        for c in range(0, i):
            cr = c * BT + a
            w = tl.load(W + b * swb + r[:, None] * swr + (col0 + cr)[None, :], mask=r[:, None] < nrows, other=0.0)
            s = tl.load(S + b * ssb + (row0 + cr)[:, None] * sst + dd[None, :], mask=dd[None, :] < D, other=0.0)
            acc += mma(w, s, tl.float32)
        inv = tl.load(INV + ((b * nblk + blk0 + i) * BT + a[:, None]) * BT + a[None, :])
        s_i = mma(inv, acc, tl.float32)
        tl.store(S + b * ssb + (row0 + r)[:, None] * sst + dd[None, :], s_i,
                 mask=(r[:, None] < nrows) & (dd[None, :] < D))
        tl.debug_barrier()  # the next block reads these rows from memory, maybe in other threads


@autotune([dict(num_warps=4), dict(num_warps=8)], key=["D"], interpret={})
@jit(do_not_specialize=_SOLVE_LENGTHS)
def solve_t_kernel(RHS, W, INV, U, blk0, nblk, ncols, row0, D, srb, srr, swb, swr, sub, sut,
                    BT: tl.constexpr, BD: tl.constexpr):
    """Transposed block back substitution inside a group of columns, last block first:
    U[row0 + cols] = INV_j^T (RHS_j + sum_{c > j} W_cj^T U_c); W holds rows row0.. and the group's columns."""
    pd = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    a = tl.arange(0, BT)
    dd = pd * BD + tl.arange(0, BD)
    nb = tl.cdiv(ncols, BT)
    for jj in range(0, nb):
        j = nb - 1 - jj
        r = j * BT + a
        acc = tl.load(RHS + b * srb + r[:, None] * srr + dd[None, :],
                      mask=(r[:, None] < ncols) & (dd[None, :] < D), other=0.0)
        for c in range(j + 1, nb):
            cr = c * BT + a
            w = tl.load(W + b * swb + cr[:, None] * swr + r[None, :], mask=cr[:, None] < ncols, other=0.0)
            u = tl.load(U + b * sub + (row0 + cr)[:, None] * sut + dd[None, :],
                        mask=(cr[:, None] < ncols) & (dd[None, :] < D), other=0.0)
            acc += mma(tl.trans(w), u, tl.float32)
        inv = tl.load(INV + ((b * nblk + blk0 + j) * BT + a[:, None]) * BT + a[None, :])
        u_j = mma(tl.trans(inv), acc, tl.float32)
        tl.store(U + b * sub + (row0 + r)[:, None] * sut + dd[None, :], u_j,
                 mask=(r[:, None] < ncols) & (dd[None, :] < D))
        tl.debug_barrier()
