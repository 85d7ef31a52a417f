"""One-token decode attention as one Pallas (Triton) kernel: RoPE, the cache write and the
attention of a layer's decode step in a single launch.

In a batch-1 decode step of Llama-3.2-1B on an H100 the XLA path ran, per layer, a RoPE fusion,
two cache-write fusions and cuDNN's paged flash attention (a kernel and its reduction): five
launches of 1-5 µs each for well under a microsecond of memory traffic. This kernel does the
same work in one launch. Program (b, k, p) takes sequence b's fused q/k/v row of KV head k (the
q/k/v projection's output, `[R, K, G + 2, H]`, read where the projection left it), rotates q and
k, and attends the group's G query heads, as the first rows of a 16-row tensor-core tile, over
split p of the keys `[0, kv_len_b)` in blocks of BLOCK_S keys with an online softmax in fp32. The
program whose split holds the new position writes k and v into the stacked cache at
`[layer, b, position_b, k]` (the cache is aliased, so the write is in place). Keys are split over
programs until there are about TARGET_PROGRAMS of them (flash-decoding); the splits' outputs are
then combined by their log-sum-exp in XLA, and a single split needs no combine.

A cache in FP8 (`CompileOptions(kv_cache_dtype="fp8")`) is read as it lies and widened in
registers, block by block, for the dots: to float16 where q is bfloat16 (`dot_dtype`), since
Hopper widens e4m3 to float16 in one instruction a pair and to bfloat16 only through float16
(Triton's conversion: two more a pair), and float16 holds every e4m3 value and q and the
probabilities to more digits than bfloat16 (q is clipped to float16's range). Dots on the FP8
blocks as they lie would not read them faster on Hopper: a 16-row tile is below wgmma's 64, and
Triton runs an FP8 `mma.sync` there as float16 after widening both operands (its
AccelerateMatmul pass: native only on sm_89 and sm_120). The new key and value are stored
saturated.

The layer index is read at run time, so every layer of an unrolled step shares one compiled
kernel and the cache is never sliced. `interpret=True` runs the same kernel through Pallas'
interpreter (any backend; the tests use it on CPU). Measurements: docs/performance.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from models import pdl

BLOCK_S = 64  # keys per loop step
NUM_WARPS = 4
MAX_SPLITS = 16  # at most this many programs per sequence and KV head
TARGET_PROGRAMS = 256  # split keys while batch * KV heads * splits is below this


def stages(batch: int, kv_heads: int) -> int:
    """Pipeline stages: 3 where every program walks a whole row of keys (no split: batch * KV
    heads reaches TARGET_PROGRAMS), else 2. By the sweep of benchmarks/decode_attention_speed.py
    on an H200 (results/decode_attention_speed_h200.jsonl, Llama-3-8B's 8 KV heads): batch 32,
    512 keys 30.8 -> 27.6 us a layer, 2,048 keys 91.5 -> 74.8; at batch 1 and 8 the sweep's
    spread between identical kernels was larger than any setting's difference."""
    return 3 if batch * kv_heads >= TARGET_PROGRAMS else 2


def supported(head_dim: int, interpret: bool = False) -> bool:
    """Whether the kernel takes this head size: a power of two (its tiles), and on GPU at least
    32 (each half of a head is a tensor-core dot's contraction, which needs 16)."""
    return head_dim >= (2 if interpret else 32) and head_dim & (head_dim - 1) == 0


def decode_attention(qkv_bkch, cos_bh, sin_bh, k_cache, v_cache, layer, positions_b, kv_len_b,
                     *, block_s: int | None = None, max_splits: int | None = None,
                     target_programs: int | None = None, num_stages: int | None = None,
                     num_warps: int | None = None, interpret: bool | None = None,
                     dot_dtype: str | None = None):
    """Returns (out [B, N, H] in q's dtype, k_cache, v_cache).

    qkv_bkch: [R, K, G + 2, H], per KV head its G query heads, then k, then v (un-rotated); the
    first B rows are the sequences' (R > B: the projection's row padding, left unread);
    cos_bh, sin_bh: the rotate-half RoPE tables at each sequence's new position (both halves
    alike; the kernel reads them as two halves, as it does q and k);
    k_cache, v_cache: [L, B, S, K, H]; layer: an int or an int32 array of one element;
    positions_b: the slot the new key goes to (< S); kv_len_b: keys visible after the write,
    slots [0, kv_len_b) (pass at most positions_b + 1 for causal attention). Query head
    k * G + j attends with KV head k. block_s, max_splits, target_programs, num_stages,
    num_warps: the tiling (default: the module's constants and `stages`;
    benchmarks/decode_attention_speed.py sweeps them). interpret: run through Pallas'
    interpreter (default: unless the default backend is a GPU). dot_dtype: the 16-bit dtype the
    dots take an FP8 cache's keys and values (and q) in (None: float16 where q is bfloat16,
    else q's dtype; the module docstring says why)."""
    from jax.experimental import pallas as pl

    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    b = positions_b.shape[0]
    r, k, c, h = qkv_bkch.shape
    block_s, max_splits = block_s or BLOCK_S, max_splits or MAX_SPLITS
    target_programs = target_programs or TARGET_PROGRAMS
    num_stages = num_stages or stages(b, k)
    n_layers, cb, s, ck, ch = k_cache.shape
    if (cb, ck, ch) != (b, k, h) or r < b or v_cache.shape != k_cache.shape or h % 2 or c < 3:
        raise ValueError(f"decode_attention: q/k/v {qkv_bkch.shape} does not fit the cache "
                         f"{k_cache.shape} / {v_cache.shape} (want [R >= B, K, G + 2, H] and "
                         f"[L, B, S, K, H], H even)")
    if block_s & (block_s - 1) or h & (h - 1):
        raise ValueError(f"decode_attention: block_s ({block_s}) and the head size ({h}) must be "
                         f"powers of two")
    block_s = min(block_s, s & -s)  # a power of two that divides S: no block runs past the end
    if block_s < 16 and not interpret:
        raise ValueError(f"decode_attention: the cache length ({s}) must be a multiple of 16 on "
                         f"GPU (blocks of keys are tensor-core dot operands)")
    blocks = s // block_s
    # split each sequence's keys over programs (flash-decoding) until there are about
    # target_programs of them, each split whole blocks (the last may have fewer: a cache of 13
    # blocks splits 4 + 4 + 4 + 1 rather than not at all); one split needs no combine
    want = max(1, min(max_splits, target_programs // (b * k), blocks))
    per_split = -(-blocks // want)
    splits = -(-blocks // per_split)
    g, rows = c - 2, max(16, pl.next_power_of_2(c - 2))
    scalars = (jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)),
               positions_b.astype(jnp.int32), kv_len_b.astype(jnp.int32))
    wide = jnp.dtype(dot_dtype or (jnp.float16 if k_cache.dtype.itemsize == 1
                                   and qkv_bkch.dtype == jnp.bfloat16 else qkv_bkch.dtype))
    if wide not in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16), qkv_bkch.dtype):
        raise ValueError(f"decode_attention: dot_dtype {wide.name} is not float16, bfloat16 or "
                         f"q's dtype ({qkv_bkch.dtype.name})")
    kernel = functools.partial(_kernel, g=g, rows=rows, block_s=block_s,
                               per_split=per_split, scale=h ** -0.5, wide=wide,
                               signal=pdl.enabled(interpret))
    f32 = jnp.float32
    part_dtype = qkv_bkch.dtype if splits == 1 else f32
    out_shapes = (jax.ShapeDtypeStruct((b, k, splits, rows, h), part_dtype),
                  jax.ShapeDtypeStruct((b, k, splits, rows), f32),
                  jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                  jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype))
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu
        params = plgpu.CompilerParams(num_warps=num_warps or NUM_WARPS, num_stages=num_stages)
    out, lse, k_cache, v_cache = pl.pallas_call(
        kernel, out_shape=out_shapes, grid=(b, k, splits), interpret=interpret,
        input_output_aliases={6: 2, 7: 3}, compiler_params=params,
        name="decode_attention")(*scalars, qkv_bkch, cos_bh.astype(f32), sin_bh.astype(f32),
                                 k_cache, v_cache)
    out, lse = out[:, :, :, :g], lse[:, :, :, :g]  # the group's rows of each tile
    if splits > 1:  # flash-decoding's combine: weight each split by its share of the softmax
        weight = jax.nn.softmax(lse, axis=2)[..., None]  # [B, K, P, G, 1]
        # no visible key at all (kv_len 0): zeros, as one split gives, not softmax's NaN
        weight = jnp.where(jnp.isfinite(jnp.max(lse, axis=2, keepdims=True))[..., None],
                           weight, 0.0)
        out = jnp.sum(weight * out, axis=2, keepdims=True)
    return out.reshape(b, k * g, h).astype(qkv_bkch.dtype), k_cache, v_cache


def _kernel(layer_ref, pos_ref, len_ref, qkv_ref, cos_ref, sin_ref, k_in, v_in,
            out_ref, lse_ref, k_out, v_out, *, g, rows, block_s, per_split, scale, wide, signal):
    """Program (b, k, p): keys [p * per_split * block_s, (p + 1) * per_split * block_s) of
    the cache (the last split's end past the cache's: its loop stops at kv_len <= S) of
    sequence b, KV head k; the program whose keys hold the new position writes it. Writes the
    softmax-normalised output of its keys and their log-sum-exp, a tile of max(16, G rounded
    up to a power of two) rows each whose first G rows are the group's query heads."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    from models.cache import to_cache

    f32 = jnp.float32
    bi, ki, pi = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    h = qkv_ref.shape[-1]
    half = h // 2
    lo, hi, whole = pl.ds(0, half), pl.ds(half, half), pl.ds(0, h)
    layer = pdl.first_index(layer_ref, signal)
    pos, n_keys = pos_ref[bi], len_ref[bi]
    cos1, cos2 = cos_ref[bi, lo], cos_ref[bi, hi]
    sin1, sin2 = sin_ref[bi, lo], sin_ref[bi, hi]

    def rope(row):  # rotate-half RoPE of qkv row `row`, as its two halves
        x1, x2 = qkv_ref[bi, ki, row, lo].astype(f32), qkv_ref[bi, ki, row, hi].astype(f32)
        return x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2

    # the dots run in `wide` (q's dtype, or float16 over an FP8 cache: module docstring); an
    # FP8 cache is widened as it is read, and the new key and value are stored saturated
    # (models/cache.py to_cache) and attended as stored
    dtype = wide
    k1, k2 = (to_cache(part, k_out.dtype) for part in rope(g))
    v_new = to_cache(qkv_ref[bi, ki, g + 1, whole], v_out.dtype)
    first = pi * per_split * block_s

    @pl.when((pos >= first) & (pos < first + per_split * block_s))
    def _():
        k_out[layer, bi, pos, ki, lo] = k1
        k_out[layer, bi, pos, ki, hi] = k2
        v_out[layer, bi, pos, ki, whole] = v_new

    # the group's G query heads as the first rows of a tile of `rows` (>= 16) rows: tensor-core
    # dots need 16
    rows = jnp.arange(rows)

    def tile(parts):
        out = jnp.zeros((rows.size, half), f32)
        for j, part in enumerate(parts):
            out = jnp.where(rows[:, None] == j, part[None], out)
        if dtype == jnp.float16:  # q in bfloat16 may pass float16's range
            out = jnp.clip(out, -65504.0, 65504.0)
        return out.astype(dtype)

    qs = [rope(j) for j in range(g)]
    q1, q2 = tile([q[0] for q in qs]), tile([q[1] for q in qs])

    def step(i, carry):
        m, l, acc = carry
        start = first + i * block_s
        slots = start + jnp.arange(block_s)
        keep = (slots < n_keys)[None]
        new = (slots == pos)[:, None]
        keys = pl.ds(pl.multiple_of(start, block_s), block_s)
        # the new key and value come from registers: the store above need not be visible to
        # this program's loads
        kb1 = jnp.where(new, k1.astype(dtype)[None], k_in[layer, bi, keys, ki, lo].astype(dtype))
        kb2 = jnp.where(new, k2.astype(dtype)[None], k_in[layer, bi, keys, ki, hi].astype(dtype))
        vb = jnp.where(new, v_new.astype(dtype)[None],
                       v_in[layer, bi, keys, ki, whole].astype(dtype))
        scores = (plgpu.dot(q1, kb1, trans_b=True) + plgpu.dot(q2, kb2, trans_b=True)) * scale
        scores = jnp.where(keep, scores, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(scores, axis=1))
        p = jnp.where(keep, jnp.exp(scores - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(vb.dtype), vb)
        return m_new, l * alpha + jnp.sum(p, axis=1), acc

    init = (jnp.full((rows.size,), -1e30, f32), jnp.zeros((rows.size,), f32),
            jnp.zeros((rows.size, h), f32))
    n_blocks = jnp.clip((n_keys - first + block_s - 1) // block_s, 0, per_split)
    m, l, acc = jax.lax.fori_loop(0, n_blocks, step, init)
    every = pl.ds(0, rows.size)
    out_ref[bi, ki, pi, every, whole] = (acc / jnp.maximum(l, 1e-30)[:, None]).astype(
        out_ref.dtype)
    # no keys in this split: -inf, so the combine gives it no weight
    lse_ref[bi, ki, pi, every] = jnp.where(l > 0, m + jnp.log(jnp.maximum(l, 1e-30)), -jnp.inf)
