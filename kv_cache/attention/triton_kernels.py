"""Triton kernels: split-K flash attention over paged K/V, dequantizing quantized blocks in registers.

One kernel serves decode and prefill. A program owns one (sequence, KV head), one split of the cached tokens and
one tile of query rows. The rows of a tile are the GQA group's query heads times a few query tokens, packed into
the M dimension of `tl.dot` (the instruction pads M to 16), so each KV head's bytes are read once per tile:

    row r  ->  head h = r % GROUP_PAD of the KV head's group,  query token i = tile * TOKENS + r // GROUP_PAD
               (TOKENS = BLOCK_M // GROUP_PAD query tokens per tile; rows with h >= GROUP or i >= q_len are padding)

A program of split s runs the online softmax over its share of the tiles and stores (acc, max, sum) per row; the
reduce kernel merges the splits with their log-sum-exp (a split that saw nothing has max -inf and sum 0, and is
weighted 0, never `exp(-inf - -inf)`). With one split the program writes the output directly. A second pass
(MODE_MASS) re-scores with the final log-sum-exp and adds each token's softmax weight into the mass.

Quantized blocks (keys share one scale/zero per channel over a block; a block is read in tiles of QTILE tokens,
unrolled, so that one warp holds a tile and no tensor crosses warps):
- keys, per channel c: q . (code * s + z) = (q * s) . (code + 1024) + (q . z - 1024 sum(q * s)), so q is scaled
  once per block, the dot reads the codes as the fp16 1024 + code (exact; one `prmt` per two codes), and the
  rest is a per-row bias.
- values, per token n and channel group g: sum_n p[n] (code * s + z) = sum_n (p[n] s[n, g]) code + sum_n p[n] z[n, g],
  so p is scaled per group before the dot (codes exact in fp16, the 1024 subtracted) and the rest is a per-row
  term; the channels go in chunks (<= 4) that each lie in one group and one packed part, each with its own
  accumulator.
- split-half packing: channel c sits in byte c % P at bit (c // P) * BITS (P = packed bytes per row), so part k
  (channels k * P ..) is one uint8 tile shifted by the constant k * BITS: no per-element shifts, no interleave.
Scores are kept in the log2 domain (scaled by softmax_scale * log2(e)) so the kernel uses exp2.
"""

from __future__ import annotations

import triton
import triton.language as tl

# The kernel's MODE (jit code reads globals only when they are tl.constexpr; launchers pass `.value`).
MODE_SPLIT = tl.constexpr(0)  # store each split's (acc, max, sum) for the reduce kernel
MODE_DIRECT = tl.constexpr(1)  # a single split: store the normalized output and the log-sum-exp
MODE_MASS = tl.constexpr(2)  # re-score with the final log-sum-exp and accumulate attention mass

# fmt: off
# Kernel argument lists stay packed (the formatter would put each of ~40 arguments on its own line).


@triton.jit
def _visible(index, pos, window, sinks, HAS_WINDOW: tl.constexpr):
    """[rows, tokens] bool: query at cache position `pos` sees cache index `index` (causal, window, sinks)."""
    seen = index[None, :] <= pos[:, None]
    if HAS_WINDOW:
        seen = seen & ((index[None, :] > pos[:, None] - window) | (index[None, :] < sinks))
    return seen


# Whether Triton's CPU interpreter built these functions (TRITON_INTERPRET=1 when this module was imported).
INTERPRETED = tl.constexpr(not isinstance(_visible, triton.runtime.JITFunction))


@triton.jit
def _softmax_step(s, m_i, l_i):
    """One online-softmax step over log2 scores s [rows, tokens] (-inf where masked)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: p and alpha are 0, not NaN
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _tile_range(count, split, num_splits):
    """[lo, hi) of the `count` tiles that split `split` of `num_splits` owns."""
    per = tl.cdiv(count, num_splits)
    lo = split * per
    return lo, tl.minimum(lo + per, count)


# ------------------------------------------------------------------------------------------ full-precision tail
@triton.jit
def _fp_offsets(Table, tile, tail_len, kv_head, kv_heads, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
    HEAD_DIM: tl.constexpr):
    """Element offsets [TILE_N, HEAD_DIM] of a tile of the tail in the pool, and which of its tokens exist."""
    t = tile * TILE_N + tl.arange(0, TILE_N)
    live = t < tail_len
    block = tl.load(Table + t // BLOCK_SIZE, mask=live, other=0).to(tl.int64)
    slot = (block * BLOCK_SIZE + t % BLOCK_SIZE) * kv_heads + kv_head
    return slot[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :], t, live


@triton.jit
def _fp_scores(q, KCache, offsets, live, index, pos, qk_scale, window, sinks, HAS_WINDOW: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Masked log2 scores [rows, TILE_N] of a full-precision tile."""
    k = tl.load(KCache + offsets, mask=live[:, None], other=0.0).to(DOT_DTYPE)
    s = tl.dot(q.to(DOT_DTYPE), tl.trans(k), input_precision=PRECISION) * qk_scale
    seen = _visible(index, pos, window, sinks, HAS_WINDOW) & live[None, :]
    return tl.where(seen, s, float("-inf"))


@triton.jit
def _attend_fp(q, KCache, VCache, Table, tail_len, offset, kv_head, kv_heads, pos, lo, hi, qk_scale, window, sinks,
    BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_WINDOW: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over tail tiles [lo, hi): returns (max, sum) [rows] and acc [rows, HEAD_DIM] fp32."""
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    for tile in range(lo, hi):
        offsets, t, live = _fp_offsets(Table, tile, tail_len, kv_head, kv_heads, BLOCK_SIZE, TILE_N, HEAD_DIM)
        s = _fp_scores(q, KCache, offsets, live, offset + t, pos, qk_scale, window, sinks, HAS_WINDOW, DOT_DTYPE,
            PRECISION)
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i)
        v = tl.load(VCache + offsets, mask=live[:, None], other=0.0).to(DOT_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=PRECISION)
    return m_i, l_i, acc


# ------------------------------------------------------------------------------------------- quantized blocks
@triton.jit
def _query_part(q_rows, row_ok, PART: tl.constexpr, WIDTH: tl.constexpr):
    """Channels [PART * WIDTH, (PART + 1) * WIDTH) of the tile's queries, [rows, WIDTH] fp32 (0 in padding rows)."""
    d = PART * WIDTH + tl.arange(0, WIDTH)
    return tl.load(q_rows + d[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)


@triton.jit
def _codes(Codes, token_row, FIRST_BYTE: tl.constexpr, SHIFT: tl.constexpr, BITS: tl.constexpr,
    WIDTH: tl.constexpr, PACKED: tl.constexpr, OFFSET: tl.constexpr):
    """Codes + OFFSET [tokens, WIDTH] fp16 (OFFSET 0 or 1024): bits SHIFT.. of bytes FIRST_BYTE.. of each
    token's row (split-half layout)."""
    packed = tl.load(Codes + token_row[:, None] * PACKED + FIRST_BYTE + tl.arange(0, WIDTH)[None, :])
    if INTERPRETED:  # Triton's interpreter cannot run PTX: the same conversion in plain Triton
        if BITS < 8:
            packed = (packed >> SHIFT) & ((1 << BITS) - 1)
        return packed.to(tl.float16) + OFFSET
    return _codes_to_fp16(packed, SHIFT, BITS, OFFSET)


@triton.jit
def _codes_to_fp16(packed, SHIFT: tl.constexpr, BITS: tl.constexpr, OFFSET: tl.constexpr):
    """Bits SHIFT .. SHIFT + BITS of each uint8, plus OFFSET (0 or 1024), as fp16, four bytes per call (PTX).

    `prmt` places each code byte under the exponent byte 0x64: the fp16 0x64cc is exactly 1024 + cc, so two
    codes become an fp16 pair in one instruction (no int-to-float conversion, slow on Hopper); `sub.f16x2`
    removes the 1024 exactly where the caller does not fold it into a bias (OFFSET 0). Shifting the whole word
    and masking each byte extracts a field of every byte at once.
    """
    MASK: tl.constexpr = ((1 << BITS) - 1) * 0x01010101
    SUB: tl.constexpr = "sub.f16x2 $0, $0, bias; sub.f16x2 $1, $1, bias;" if OFFSET == 0 else ""
    return tl.inline_asm_elementwise(
        asm=f"""{{
        .reg .b32 w, exponent, bias;
        shr.b32 w, $2, {SHIFT};
        and.b32 w, w, {MASK};
        mov.b32 exponent, 0x64646464;
        mov.b32 bias, 0x64006400;
        prmt.b32 $0, w, exponent, 0x4140;
        prmt.b32 $1, w, exponent, 0x4342;
        {SUB}
        }}""",
        constraints="=r,=r,r",
        args=[packed],
        dtype=tl.float16,
        is_pure=True,
        pack=4,
    )


@triton.jit
def _scaled_query(q_part, KScale, KZero, stats, PART: tl.constexpr, PACKED: tl.constexpr):
    """A block's keys of channels PART * PACKED .. act as (code + 1024) * s + (z - 1024 s): returns q * s
    [rows, PACKED] fp16 and the bias q . z - 1024 * sum(q * s) [rows] fp32 (of the fp16 q * s, so it cancels
    exactly what the dot adds)."""
    channel = PART * PACKED + tl.arange(0, PACKED)
    scale = tl.load(KScale + stats + channel).to(tl.float32)
    zero = tl.load(KZero + stats + channel).to(tl.float32)
    scaled = (q_part * scale[None, :]).to(tl.float16)
    return scaled, tl.sum(q_part * zero[None, :] - 1024.0 * scaled.to(tl.float32), axis=1)


@triton.jit
def _quant_scores(k0, k1, k2, k3, bias, KCodes, token_row, index, pos, qk_scale, window, sinks, BITS: tl.constexpr,
    HEAD_DIM: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Masked log2 scores [rows, tokens] of a tile of one quantized block, from its scaled query parts k0..k3
    (`_scaled_query`, 8 // BITS used) and their summed bias [rows]."""
    PACKED: tl.constexpr = HEAD_DIM * BITS // 8
    s = tl.dot(k0, tl.trans(_codes(KCodes, token_row, 0, 0, BITS, PACKED, PACKED, 1024)))
    if BITS < 8:
        s = tl.dot(k1, tl.trans(_codes(KCodes, token_row, 0, BITS, BITS, PACKED, PACKED, 1024)), s)
    if BITS < 4:
        s = tl.dot(k2, tl.trans(_codes(KCodes, token_row, 0, 2 * BITS, BITS, PACKED, PACKED, 1024)), s)
        s = tl.dot(k3, tl.trans(_codes(KCodes, token_row, 0, 3 * BITS, BITS, PACKED, PACKED, 1024)), s)
    s = (s + bias[:, None]) * qk_scale
    return tl.where(_visible(index, pos, window, sinks, HAS_WINDOW), s, float("-inf"))


@triton.jit
def _block_keys(q0, q1, q2, q3, KScale, KZero, block, kv_head, kv_heads, BITS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The query parts q0..q3 [rows, PACKED] fp32 scaled for one quantized block's keys: k0..k3 [rows, PACKED]
    fp16 and their summed bias [rows] fp32 (see `_scaled_query`)."""
    PACKED: tl.constexpr = HEAD_DIM * BITS // 8
    stats = (block * kv_heads + kv_head) * HEAD_DIM
    k0, bias = _scaled_query(q0, KScale, KZero, stats, 0, PACKED)
    k1 = k0
    k2 = k0
    k3 = k0
    if BITS < 8:
        k1, bias_1 = _scaled_query(q1, KScale, KZero, stats, 1, PACKED)
        bias += bias_1
    if BITS < 4:
        k2, bias_2 = _scaled_query(q2, KScale, KZero, stats, 2, PACKED)
        k3, bias_3 = _scaled_query(q3, KScale, KZero, stats, 3, PACKED)
        bias += bias_2 + bias_3
    return k0, k1, k2, k3, bias


@triton.jit
def _value_chunk(p, VCodes, VScale, VZero, token_row, CHUNK: tl.constexpr, BITS: tl.constexpr,
    HEAD_DIM: tl.constexpr, VGROUP: tl.constexpr, VCHUNK: tl.constexpr):
    """p [rows, tokens] times the tile's values of channels CHUNK * VCHUNK .. (one part, one group): [rows, VCHUNK]."""
    PACKED: tl.constexpr = HEAD_DIM * BITS // 8
    FIRST: tl.constexpr = CHUNK * VCHUNK
    codes = _codes(VCodes, token_row, FIRST % PACKED, (FIRST // PACKED) * BITS, BITS, VCHUNK, PACKED, 0)
    stats = token_row * (HEAD_DIM // VGROUP) + FIRST // VGROUP
    scale = tl.load(VScale + stats).to(tl.float32)
    zero = tl.load(VZero + stats).to(tl.float32)
    scaled = (p * scale[None, :]).to(tl.float16)
    return tl.dot(scaled, codes) + tl.sum(p * zero[None, :], axis=1)[:, None]


@triton.jit
def _attend_quant(q0, q1, q2, q3, KCodes, KScale, KZero, VCodes, VScale, VZero, QTable, kv_head, kv_heads, pos, lo,
    hi, qk_scale, window, sinks, BLOCK_M: tl.constexpr, QBLOCK: tl.constexpr, QTILE: tl.constexpr,
    BITS: tl.constexpr, HEAD_DIM: tl.constexpr, VGROUP: tl.constexpr, VCHUNK: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Online softmax over quantized blocks [lo, hi), in tiles of QTILE tokens: (max, sum) [rows] and acc0..acc3
    [rows, VCHUNK] fp32.

    Values are accumulated per chunk of VCHUNK channels, each within one packed part and one scale group
    (HEAD_DIM // VCHUNK <= 4 chunks; unused accumulators stay zero and are dropped by the compiler).
    """
    CHUNKS: tl.constexpr = HEAD_DIM // VCHUNK
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc0 = tl.zeros((BLOCK_M, VCHUNK), tl.float32)
    acc1 = tl.zeros((BLOCK_M, VCHUNK), tl.float32)
    acc2 = tl.zeros((BLOCK_M, VCHUNK), tl.float32)
    acc3 = tl.zeros((BLOCK_M, VCHUNK), tl.float32)
    for j in range(lo, hi):
        block = tl.load(QTable + j).to(tl.int64)
        k0, k1, k2, k3, bias = _block_keys(q0, q1, q2, q3, KScale, KZero, block, kv_head, kv_heads, BITS, HEAD_DIM)
        # Unrolled: the loads of all the block's tiles are issued together (a dynamic loop measured 137 us
        # instead of 105 at INT4, B=8, T=16k: attention_notes.md, run 4).
        for tile in tl.static_range(QBLOCK // QTILE):
            n = tile * QTILE + tl.arange(0, QTILE)
            token_row = (block * QBLOCK + n) * kv_heads + kv_head
            s = _quant_scores(k0, k1, k2, k3, bias, KCodes, token_row, j * QBLOCK + n, pos, qk_scale, window, sinks,
                BITS, HEAD_DIM, HAS_WINDOW)
            p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i)
            acc0 = acc0 * alpha[:, None] + _value_chunk(p, VCodes, VScale, VZero, token_row, 0, BITS, HEAD_DIM,
                VGROUP, VCHUNK)
            if CHUNKS > 1:
                acc1 = acc1 * alpha[:, None] + _value_chunk(p, VCodes, VScale, VZero, token_row, 1, BITS, HEAD_DIM,
                    VGROUP, VCHUNK)
            if CHUNKS > 2:
                acc2 = acc2 * alpha[:, None] + _value_chunk(p, VCodes, VScale, VZero, token_row, 2, BITS, HEAD_DIM,
                    VGROUP, VCHUNK)
                acc3 = acc3 * alpha[:, None] + _value_chunk(p, VCodes, VScale, VZero, token_row, 3, BITS, HEAD_DIM,
                    VGROUP, VCHUNK)
    return m_i, l_i, acc0, acc1, acc2, acc3


# ------------------------------------------------------------------------------------------------ attention mass
@triton.jit
def _add_mass(Mass, p, index, live, mass_row, head_ok, GROUP_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    TILE: tl.constexpr):
    """Add p [rows, TILE] (already / q_len, 0 where masked), summed over each head's query tokens, into Mass."""
    per_head = tl.sum(tl.reshape(p, (BLOCK_M // GROUP_PAD, GROUP_PAD, TILE)), axis=0)  # [GROUP_PAD, TILE]
    tl.atomic_add(Mass + mass_row[:, None] + index[None, :], per_head, mask=head_ok[:, None] & live[None, :])


@triton.jit
def _mass_fp(Mass, q, lse, KCache, Table, tail_len, offset, kv_head, kv_heads, pos, lo, hi, qk_scale, window, sinks,
    mass_row, head_ok, inv_q_len, GROUP_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr):
    """Attention mass of the tail tiles [lo, hi), given each row's final log-sum-exp `lse` (log2)."""
    for tile in range(lo, hi):
        offsets, t, live = _fp_offsets(Table, tile, tail_len, kv_head, kv_heads, BLOCK_SIZE, TILE_N, HEAD_DIM)
        s = _fp_scores(q, KCache, offsets, live, offset + t, pos, qk_scale, window, sinks, HAS_WINDOW, DOT_DTYPE,
            PRECISION)
        p = tl.exp2(s - lse[:, None]) * inv_q_len
        _add_mass(Mass, p, offset + t, live, mass_row, head_ok, GROUP_PAD, BLOCK_M, TILE_N)


@triton.jit
def _mass_quant(Mass, q0, q1, q2, q3, lse, KCodes, KScale, KZero, QTable, kv_head, kv_heads, pos, lo, hi, qk_scale,
    window, sinks, mass_row, head_ok, inv_q_len, GROUP_PAD: tl.constexpr, BLOCK_M: tl.constexpr, QBLOCK: tl.constexpr,
    QTILE: tl.constexpr, BITS: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Attention mass of the quantized blocks [lo, hi), in tiles of QTILE tokens."""
    for j in range(lo, hi):
        block = tl.load(QTable + j).to(tl.int64)
        k0, k1, k2, k3, bias = _block_keys(q0, q1, q2, q3, KScale, KZero, block, kv_head, kv_heads, BITS, HEAD_DIM)
        for tile in tl.static_range(QBLOCK // QTILE):
            n = tile * QTILE + tl.arange(0, QTILE)
            token_row = (block * QBLOCK + n) * kv_heads + kv_head
            s = _quant_scores(k0, k1, k2, k3, bias, KCodes, token_row, j * QBLOCK + n, pos, qk_scale, window, sinks,
                BITS, HEAD_DIM, HAS_WINDOW)
            p = tl.exp2(s - lse[:, None]) * inv_q_len
            _add_mass(Mass, p, j * QBLOCK + n, n < QBLOCK, mass_row, head_ok, GROUP_PAD, BLOCK_M, QTILE)


# ------------------------------------------------------------------------------------------------------ stores
@triton.jit
def _store_rows(Out, Lse, Part, Stats, acc, m_i, l_i, row, row_ok, split, num_splits, HEAD_DIM: tl.constexpr,
    MODE: tl.constexpr):
    """Store a split's acc [rows, HEAD_DIM], max and sum (MODE_SPLIT), or the final output and LSE (MODE_DIRECT)."""
    d = tl.arange(0, HEAD_DIM)
    if MODE == MODE_DIRECT:
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = (acc / l_safe[:, None]).to(Out.dtype.element_ty)
        tl.store(Out + row[:, None] * HEAD_DIM + d[None, :], out, mask=row_ok[:, None])
        tl.store(Lse + row, tl.where(l_i > 0, m_i + tl.log2(l_safe), 0.0), mask=row_ok)
    else:
        part_row = row * num_splits + split
        tl.store(Part + part_row[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None])
        tl.store(Stats + part_row * 2, m_i, mask=row_ok)
        tl.store(Stats + part_row * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _store_chunk(Part, acc, part_row, row_ok, CHUNK: tl.constexpr, VCHUNK: tl.constexpr, HEAD_DIM: tl.constexpr):
    d = CHUNK * VCHUNK + tl.arange(0, VCHUNK)
    tl.store(Part + part_row[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _store_chunks(Part, Stats, acc0, acc1, acc2, acc3, m_i, l_i, row, row_ok, split, num_splits,
    HEAD_DIM: tl.constexpr, VCHUNK: tl.constexpr):
    """Store a quantized split's accumulators (chunks of VCHUNK channels), max and sum for the reduce kernel."""
    part_row = row * num_splits + split
    _store_chunk(Part, acc0, part_row, row_ok, 0, VCHUNK, HEAD_DIM)
    if HEAD_DIM // VCHUNK > 1:
        _store_chunk(Part, acc1, part_row, row_ok, 1, VCHUNK, HEAD_DIM)
    if HEAD_DIM // VCHUNK > 2:
        _store_chunk(Part, acc2, part_row, row_ok, 2, VCHUNK, HEAD_DIM)
        _store_chunk(Part, acc3, part_row, row_ok, 3, VCHUNK, HEAD_DIM)
    tl.store(Stats + part_row * 2, m_i, mask=row_ok)
    tl.store(Stats + part_row * 2 + 1, l_i, mask=row_ok)


# ---------------------------------------------------------------------------------------------------- programs
@triton.jit
def _tail_program(Out, Lse, Part, Stats, Mass, q_rows, KCache, VCache, Table, tail_len, quant_len, kv_head, kv_heads,
    pos, last, row, row_ok, mass_row, head_ok, inv_q_len, split, tail_splits, split_offset, num_splits, qk_scale,
    window, sinks, GROUP_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HAS_WINDOW: tl.constexpr, MODE: tl.constexpr, DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr):
    """The work of one split of the full-precision tail (cache indices quant_len + t)."""
    q = _query_part(q_rows, row_ok, 0, HEAD_DIM)
    seen = tl.maximum(tl.minimum(tail_len, last + 1 - quant_len), 0)  # tail tokens any row of the tile sees
    lo, hi = _tile_range(tl.cdiv(seen, TILE_N), split, tail_splits)
    if MODE == MODE_MASS:
        lse = tl.load(Lse + row, mask=row_ok, other=0.0)
        _mass_fp(Mass, q, lse, KCache, Table, tail_len, quant_len, kv_head, kv_heads, pos, lo, hi, qk_scale, window,
            sinks, mass_row, head_ok, inv_q_len, GROUP_PAD, BLOCK_M, BLOCK_SIZE, TILE_N, HEAD_DIM, HAS_WINDOW,
            DOT_DTYPE, PRECISION)
    else:
        m_i, l_i, acc = _attend_fp(q, KCache, VCache, Table, tail_len, quant_len, kv_head, kv_heads, pos, lo, hi,
            qk_scale, window, sinks, BLOCK_M, BLOCK_SIZE, TILE_N, HEAD_DIM, HAS_WINDOW, DOT_DTYPE, PRECISION)
        _store_rows(Out, Lse, Part, Stats, acc, m_i, l_i, row, row_ok, split_offset + split, num_splits, HEAD_DIM, MODE)


@triton.jit
def _quant_program(Lse, Part, Stats, Mass, q_rows, KCodes, KScale, KZero, VCodes, VScale, VZero, QTable, quant_len,
    kv_head, kv_heads, pos, last, row, row_ok, mass_row, head_ok, inv_q_len, split, quant_splits, num_splits,
    qk_scale, window, sinks, GROUP_PAD: tl.constexpr, BLOCK_M: tl.constexpr, QBLOCK: tl.constexpr, QTILE: tl.constexpr,
    BITS: tl.constexpr, HEAD_DIM: tl.constexpr, VGROUP: tl.constexpr, VCHUNK: tl.constexpr, HAS_WINDOW: tl.constexpr,
    MODE: tl.constexpr):
    """The work of one split of the quantized blocks (cache indices 0 .. quant_len - 1)."""
    PACKED: tl.constexpr = HEAD_DIM * BITS // 8
    q0 = _query_part(q_rows, row_ok, 0, PACKED)  # the query's parts, matching the packed parts of the codes
    q1 = q0
    q2 = q0
    q3 = q0
    if BITS < 8:
        q1 = _query_part(q_rows, row_ok, 1, PACKED)
    if BITS < 4:
        q2 = _query_part(q_rows, row_ok, 2, PACKED)
        q3 = _query_part(q_rows, row_ok, 3, PACKED)
    seen = tl.minimum(quant_len, last + 1)
    lo, hi = _tile_range(tl.cdiv(seen, QBLOCK), split, quant_splits)
    if MODE == MODE_MASS:
        lse = tl.load(Lse + row, mask=row_ok, other=0.0)
        _mass_quant(Mass, q0, q1, q2, q3, lse, KCodes, KScale, KZero, QTable, kv_head, kv_heads, pos, lo, hi, qk_scale,
            window, sinks, mass_row, head_ok, inv_q_len, GROUP_PAD, BLOCK_M, QBLOCK, QTILE, BITS, HEAD_DIM, HAS_WINDOW)
    else:
        m_i, l_i, acc0, acc1, acc2, acc3 = _attend_quant(q0, q1, q2, q3, KCodes, KScale, KZero, VCodes, VScale, VZero,
            QTable, kv_head, kv_heads, pos, lo, hi, qk_scale, window, sinks, BLOCK_M, QBLOCK, QTILE, BITS, HEAD_DIM,
            VGROUP, VCHUNK, HAS_WINDOW)
        _store_chunks(Part, Stats, acc0, acc1, acc2, acc3, m_i, l_i, row, row_ok, split, num_splits, HEAD_DIM, VCHUNK)


@triton.jit
def paged_attention_kernel(Q, Out, Lse, Part, Stats, Mass, KCache, VCache, Table, Lens, KCodes, KScale, KZero, VCodes,
    VScale, VZero, QTable, QLens, stride_qb, stride_qh, stride_qt, stride_table, stride_qtable, kv_heads, q_len,
    mass_len, qk_scale, window, sinks, quant_splits, tail_splits, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
    QBLOCK: tl.constexpr, BITS: tl.constexpr, VGROUP: tl.constexpr, VCHUNK: tl.constexpr, HAS_QUANT: tl.constexpr,
    HAS_WINDOW: tl.constexpr, MODE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (batch * kv_heads, quant_splits + tail_splits, query tiles). Arguments: see `triton_attention.launch`."""
    seq = tl.program_id(0) // kv_heads
    kv_head = tl.program_id(0) % kv_heads
    split = tl.program_id(1)
    TOKENS: tl.constexpr = BLOCK_M // GROUP_PAD  # query tokens per tile
    QTILE: tl.constexpr = TILE_N if TILE_N < QBLOCK else QBLOCK  # tokens per tile of a quantized block
    r = tl.arange(0, BLOCK_M)
    head = r % GROUP_PAD
    token = tl.program_id(2) * TOKENS + r // GROUP_PAD
    row_ok = (head < GROUP) & (token < q_len)
    row = ((seq * kv_heads + kv_head) * GROUP + head).to(tl.int64) * q_len + token
    tail_len = tl.load(Lens + seq)
    quant_len = tl.zeros_like(tail_len)
    if HAS_QUANT:
        quant_len = tl.load(QLens + seq).to(tail_len.dtype)
    total = quant_len + tail_len
    pos = tl.where(row_ok, total - q_len + token, -1)
    last = total - q_len + tl.minimum(q_len - 1, tl.program_id(2) * TOKENS + TOKENS - 1)
    q_rows = Q + seq.to(tl.int64) * stride_qb + ((kv_head * GROUP + head) * stride_qh + token * stride_qt)[:, None]
    g = tl.arange(0, GROUP_PAD)
    head_ok = g < GROUP
    mass_row = ((seq * kv_heads + kv_head) * GROUP + g).to(tl.int64) * mass_len
    num_splits = quant_splits + tail_splits
    inv_q_len = 1.0 / q_len
    table = Table + seq.to(tl.int64) * stride_table
    if HAS_QUANT:
        if split < quant_splits:
            _quant_program(Lse, Part, Stats, Mass, q_rows, KCodes, KScale, KZero, VCodes, VScale, VZero,
                QTable + seq.to(tl.int64) * stride_qtable, quant_len, kv_head, kv_heads, pos, last, row, row_ok,
                mass_row, head_ok, inv_q_len, split, quant_splits, num_splits, qk_scale, window, sinks, GROUP_PAD,
                BLOCK_M, QBLOCK, QTILE, BITS, HEAD_DIM, VGROUP, VCHUNK, HAS_WINDOW, MODE)
        else:
            _tail_program(Out, Lse, Part, Stats, Mass, q_rows, KCache, VCache, table, tail_len, quant_len, kv_head,
                kv_heads, pos, last, row, row_ok, mass_row, head_ok, inv_q_len, split - quant_splits, tail_splits,
                quant_splits, num_splits, qk_scale, window, sinks, GROUP_PAD, BLOCK_M, BLOCK_SIZE, TILE_N, HEAD_DIM,
                HAS_WINDOW, MODE, DOT_DTYPE, PRECISION)
    else:
        _tail_program(Out, Lse, Part, Stats, Mass, q_rows, KCache, VCache, table, tail_len, quant_len, kv_head,
            kv_heads, pos, last, row, row_ok, mass_row, head_ok, inv_q_len, split, tail_splits, 0, num_splits, qk_scale,
            window, sinks, GROUP_PAD, BLOCK_M, BLOCK_SIZE, TILE_N, HEAD_DIM, HAS_WINDOW, MODE, DOT_DTYPE, PRECISION)


@triton.jit
def reduce_splits_kernel(Part, Stats, Out, Lse, num_splits, HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr):
    """Grid (query rows,). Merge a row's splits by their log-sum-exp; a row that saw nothing gets 0."""
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, SPLITS_PAD)
    live = s < num_splits
    part_row = row * num_splits + s
    m = tl.load(Stats + part_row * 2, mask=live, other=float("-inf"))
    l = tl.load(Stats + part_row * 2 + 1, mask=live, other=0.0)  # noqa: E741
    m_max = tl.max(m, axis=0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    weight = tl.exp2(m - m_safe)  # 0 for empty splits (max -inf)
    total = tl.sum(weight * l, axis=0)
    total_safe = tl.where(total > 0, total, 1.0)
    d = tl.arange(0, HEAD_DIM)
    acc = tl.load(Part + part_row[:, None] * HEAD_DIM + d[None, :], mask=live[:, None], other=0.0)
    out = tl.sum(acc * weight[:, None], axis=0) / total_safe
    tl.store(Out + row * HEAD_DIM + d, out.to(Out.dtype.element_ty))
    tl.store(Lse + row, tl.where(total > 0, m_safe + tl.log2(total_safe), 0.0))
# fmt: on
