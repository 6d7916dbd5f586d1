"""LaS attention: Local and Smooth attention, in one file.

Zimerman and Wolf, "Viewing Transformers Through the Lens of Long Convolutions Layers", ICML 2024
(PMLR 235:62815-62831; arXiv 2311.16620, "On the Long Range Abilities of Transformers").

Long-convolution layers (S4, Hyena, linear RNNs) owe much of their long-range skill to two inductive
biases: their kernels decay with distance (locality) and are smooth. LaS adds both to softmax
attention without any trainable parameter. For head c:

    LaS_c(Q, K, V) = AP( softmax( exp(-alpha_c * D_L) * (Q K^T / sqrt(D)) ) ) V

where D_L[i, j] = |i - j|, the product with the decay is elementwise (it scales the scores, it is not
an additive bias) and AP is a 1-D average pool along each attention row.

Shapes (one alphabet for the whole file):
    B batch, H heads, L sequence length, D head dimension, P pool size (odd), C chunk size,
    N number of chunks (ceil(L / C), or 1 without chunking).
    query, key, value: (B, H, L, D), as in torch.nn.functional.scaled_dot_product_attention.
    alphas: (H,), non-negative decay rates, one per head.
    key_padding_mask: (B, L) bool, True marks padding (as in torch.nn.MultiheadAttention).

Conventions (each is pinned by a test in test_las.py):
    * Excluded keys (padding, and j > i when causal) are removed with a select, never by multiplying
      -inf by the decay: the decay underflows to exactly 0 far from the diagonal, and 0 * -inf = NaN.
    * A row with no allowed key is all zeros, in the output and in every gradient (no NaN).
    * Attention dropout acts on the softmax probabilities, before smoothing.
    * Smoothing: odd window P, stride 1, zero padding at the ends, divisor P everywhere
      (count_include_pad=True), so the length stays L and weight near the ends partly falls off.
      Bidirectional: the window is centred, smoothed[i, j] = mean(a[i, j-(P-1)/2 .. j+(P-1)/2]).
      Causal: smoothed[i, j] = mean(a[i, j .. j+P-1]), which is zero for every j > i.
    * Padding keys get no weight after smoothing: their columns are zeroed after the pool, which equals
      zeroing value at padding positions. Whatever is stored there (NaN included) never leaks.
    * LaS-chunk (chunk_size=C): the sequence is cut into consecutive chunks of C positions (the last one
      may be shorter) and everything above happens inside each chunk alone. C >= L is full LaS.

Two forms of the same operator live side by side:
    las_attention_reference  materializes the attention matrix and pools its rows (the paper's form);
    las_attention            pools value instead (smoothed @ V == A @ (M V) for the banded pooling
                             matrix M), which costs O(L * D) instead of O(L^2) for the smoothing.
las_attention_flex runs the decay as a FlexAttention score_mod, so nothing of size L x L is stored.

Sections: helpers and argument checks, decay and smoothing, the functional attention, the fused
FlexAttention path, the module, the block.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "alpha_schedule",
    "decay_mask",
    "smooth_rows",
    "smooth_values",
    "las_attention_reference",
    "las_attention",
    "las_attention_flex",
    "LaSAttention",
    "LaSBlock",
    "MaskedBatchNorm1d",
    "convert_sync_batch_norm",
]

# Default rates. Head 0 keeps alpha = 0 (global); heads 1..H-1 are spaced evenly in log space between
# DEFAULT_MIN_ALPHA and DEFAULT_MAX_ALPHA. Their decay lengths 1/alpha then run from 10 to 1,000
# positions, which spans the local structure (a token's neighbours) up to the LRA lengths (1K-16K),
# and B = 0.1 lies inside the paper's range (0, 1).
DEFAULT_MAX_ALPHA = 0.1
DEFAULT_MIN_ALPHA = 0.001

# Paths LaSAttention can run: "eager" (las_attention), "compile" (torch.compile of it), "flex" (fused
# FlexAttention kernel, las_attention_flex), "reference" (materialized matrix), "auto" (flex on CUDA,
# eager elsewhere).
BACKENDS = ("auto", "eager", "compile", "flex", "reference")


# ----------------------------------------------------------------------------------------------------
# Argument checks


def _check_pool_size(pool_size) -> None:
    if isinstance(pool_size, bool) or not isinstance(pool_size, int):
        raise TypeError(f"pool_size must be an int, got {type(pool_size).__name__} ({pool_size!r})")
    if pool_size < 1 or pool_size % 2 == 0:
        raise ValueError(
            f"pool_size must be a positive odd integer (1, 3, 5, ...), got {pool_size}; "
            "an even window has no centre, and 1 means no smoothing"
        )


def _check_chunk_size(chunk_size) -> None:
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None (no chunking), got {chunk_size}")


def _check_alphas(alphas, num_heads: int) -> None:
    if not isinstance(alphas, torch.Tensor):
        raise TypeError(f"alphas must be a torch.Tensor of shape ({num_heads},), got {type(alphas).__name__}")
    if alphas.shape != (num_heads,):
        raise ValueError(
            f"alphas must have shape (H,) = ({num_heads},), one rate per head, got {tuple(alphas.shape)}"
        )
    if not alphas.is_floating_point():
        raise TypeError(f"alphas must be a floating-point tensor, got dtype {alphas.dtype}")
    # The value check reads the tensor, which a compiled graph cannot do without a break.
    if not torch.compiler.is_compiling() and not bool(((alphas >= 0) & alphas.isfinite()).all()):
        raise ValueError(f"alphas must be finite and non-negative, got {alphas.tolist()}")


def _check_key_padding_mask(mask, batch: int, length: int) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a bool tensor of shape (B, L), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"key_padding_mask must have dtype torch.bool (True marks padding), got {mask.dtype}; "
            "convert with mask.bool() after checking which value marks padding"
        )
    if mask.shape != (batch, length):
        raise ValueError(
            f"key_padding_mask must have shape (B, L) = ({batch}, {length}), got {tuple(mask.shape)}"
        )


def _check_qkv(query, key, value) -> None:
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, L, D), got {tuple(tensor.shape)}")
    if query.shape != key.shape:
        raise ValueError(
            f"query and key must have the same shape (B, H, L, D), got {tuple(query.shape)} and "
            f"{tuple(key.shape)}; LaS is self-attention, so the decay needs one length for both"
        )
    if value.shape[:3] != key.shape[:3]:
        raise ValueError(
            f"value must share (B, H, L) with key, got value {tuple(value.shape)} and key {tuple(key.shape)}"
        )
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")


def _check_dropout(dropout_p) -> None:
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


# ----------------------------------------------------------------------------------------------------
# Decay and smoothing


def alpha_schedule(
    num_heads: int, max_alpha: float = DEFAULT_MAX_ALPHA, min_alpha: float = DEFAULT_MIN_ALPHA
) -> torch.Tensor:
    """Return the per-head decay rates, shape (H,), float32.

    Head 0 gets alpha = 0 and stays global. Heads 1..H-1 get rates spaced evenly in log space from
    `min_alpha` to `max_alpha` (the paper's "exponential-uniform in [0, B]" with B = max_alpha, read
    deterministically because log(0) is undefined). A single extra head gets max_alpha.
    `max_alpha = 0` gives all zeros: no decay, plain attention scores.

    Defaults: B = 0.1 and min_alpha = 0.001, so the decay lengths 1/alpha of the local heads run from
    10 to 1,000 positions, from neighbouring tokens up to the LRA sequence lengths.
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if not (max_alpha >= 0 and math.isfinite(max_alpha)):
        raise ValueError(f"max_alpha must be finite and >= 0, got {max_alpha}")
    if max_alpha == 0:
        return torch.zeros(num_heads)
    if not 0 < min_alpha <= max_alpha:
        raise ValueError(
            f"min_alpha must be in (0, max_alpha] = (0, {max_alpha}], got {min_alpha}; "
            "the rates are spaced in log space, so the smallest must be positive"
        )
    alphas = torch.zeros(num_heads, dtype=torch.float64)
    if num_heads == 2:
        alphas[1] = max_alpha
    elif num_heads > 2:
        alphas[1:] = torch.logspace(math.log10(min_alpha), math.log10(max_alpha), num_heads - 1, dtype=torch.float64)
    return alphas.float()


def decay_mask(length: int, alphas: torch.Tensor) -> torch.Tensor:
    """Return the locality decay exp(-alphas[h] * |i - j|), shape (H, L, L).

    Values lie in (0, 1] in exact arithmetic (they underflow to 0 far from the diagonal), the diagonal
    is exactly 1, and an alpha of 0 gives all ones. Dtype and device follow `alphas`.
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    if not isinstance(alphas, torch.Tensor) or alphas.dim() != 1:
        raise ValueError(f"alphas must be a 1-D tensor of shape (H,), got {getattr(alphas, 'shape', alphas)}")
    # Distances are integers, exact in float32 up to 2**24, so they are built in the rates' dtype. The
    # in-place steps keep the peak at one (L, L) and one (H, L, L) tensor.
    positions = torch.arange(length, device=alphas.device, dtype=alphas.dtype)
    distance = (positions[:, None] - positions[None, :]).abs_()  # (L, L)
    return (-alphas[:, None, None] * distance).exp_()  # (H, L, L)


def smooth_rows(attn: torch.Tensor, pool_size: int, is_causal: bool = False) -> torch.Tensor:
    """Average-pool each row of `attn` along its last axis, keeping the length: (..., L) -> (..., L).

    Window P (odd), stride 1, zero padding, divisor P at every position (count_include_pad=True).
    Bidirectional: out[j] = (1/P) * sum_{m=-(P-1)/2}^{(P-1)/2} attn[j + m] (centred).
    Causal:        out[j] = (1/P) * sum_{m=0}^{P-1} attn[j + m], so a causal row (zero beyond the
                   diagonal) stays zero beyond the diagonal.
    Entries outside 0..L-1 count as 0: a one-hot row on the last key of L = 4 becomes [0, 0, 1/3, 1/3].
    """
    _check_pool_size(pool_size)
    if pool_size == 1:
        return attn
    shape = attn.shape
    rows = attn.reshape(-1, 1, shape[-1])  # (rows, 1, L)
    if is_causal:
        # Pad P-1 zeros on the right, then a window of P starting at j covers j .. j+P-1.
        rows = F.pad(rows, (0, pool_size - 1))
        pooled = F.avg_pool1d(rows, pool_size, stride=1)
    else:
        pooled = F.avg_pool1d(rows, pool_size, stride=1, padding=pool_size // 2, count_include_pad=True)
    return pooled.reshape(shape)


def _pool_sequence(value: torch.Tensor, pool_size: int, is_causal: bool) -> torch.Tensor:
    """Average-pool (..., L, D) along L with divisor P: centred, or over k-P+1 .. k when causal."""
    shape = value.shape
    rows = value.reshape(-1, shape[-2], shape[-1]).transpose(1, 2)  # (rows, D, L)
    if is_causal:
        rows = F.pad(rows, (pool_size - 1, 0))
        pooled = F.avg_pool1d(rows, pool_size, stride=1)
    else:
        pooled = F.avg_pool1d(rows, pool_size, stride=1, padding=pool_size // 2, count_include_pad=True)
    return pooled.transpose(1, 2).reshape(shape)  # (..., L, D)


def smooth_values(
    value: torch.Tensor,
    pool_size: int,
    is_causal: bool = False,
    key_padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pool `value` so that `A @ smooth_values(V) == smooth_rows(A) @ V` (the smoothing identity).

    value: (B, H, L, D) -> (B, H, L, D). Row pooling is a banded matrix M acting on the right of each
    attention row, so smoothed @ V = A @ (M V), and M V is a pool of value along the sequence:
    centred for bidirectional attention, over positions k-P+1 .. k (left zero padding) for causal
    attention, divisor P everywhere. Padding positions are set to 0 first (with a select, so NaN stored
    there is dropped), which is the same as zeroing the padding columns after row smoothing.
    """
    _check_pool_size(pool_size)
    if key_padding_mask is not None:
        _check_key_padding_mask(key_padding_mask, value.shape[0], value.shape[-2])
        value = value.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    if pool_size == 1:
        return value
    return _pool_sequence(value, pool_size, is_causal)


# Decay tensors reused across calls with the same rates, length, device and dtype. Bounded, because a
# model trained on many lengths would otherwise keep one (H, L, L) tensor per length.
_DECAY_CACHE: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_DECAY_CACHE_SIZE = 8
# A decay larger than this is not cached but made per head when needed: at H = 8 and L = 16,384 it
# would be 8 GiB in fp32, as large as one sequence's scores.
_DECAY_CACHE_MAX_BYTES = 512 * 2**20


def _decay_in(length: int, alphas: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """Return scale * decay_mask(length, alphas) in `dtype`.

    Computed in float32, or float64 for float64 results (rounding the rates or the scale to float32
    would put float32 error into them), then rounded once to `dtype`.
    """
    work_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    decay = decay_mask(length, alphas.to(work_dtype))
    decay = decay.mul_(scale) if not decay.requires_grad else decay * scale
    return decay.to(dtype)


def _cached_decay(length: int, alphas: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """Return _decay_in(length, alphas, dtype, scale), computed once per rates, length, scale, device
    and dtype (and afresh while compiling, where the graph computes it once per call)."""
    if torch.compiler.is_compiling():
        return _decay_in(length, alphas, dtype, scale)
    # The rates are part of the key, so changing a buffer in place gives a fresh decay.
    key = (length, alphas.device, dtype, float(scale), tuple(alphas.tolist()))
    decay = _DECAY_CACHE.get(key)
    if decay is None:
        decay = _decay_in(length, alphas.detach(), dtype, scale)
        _DECAY_CACHE[key] = decay
        if len(_DECAY_CACHE) > _DECAY_CACHE_SIZE:
            _DECAY_CACHE.popitem(last=False)
    else:
        _DECAY_CACHE.move_to_end(key)
    return decay


# ----------------------------------------------------------------------------------------------------
# The functional attention


def _split_chunks(tensor: torch.Tensor, chunk_size: int, num_chunks: int) -> torch.Tensor:
    """(B, H, L, D) -> (B, H, N, C, D), zero-padding the tail chunk."""
    batch, heads, length, dim = tensor.shape
    padded = num_chunks * chunk_size
    if padded != length:
        tensor = F.pad(tensor, (0, 0, 0, padded - length))
    return tensor.view(batch, heads, num_chunks, chunk_size, dim)


def _layout(length: int, chunk_size: Optional[int]) -> tuple[int, int]:
    """Return (C, N): the chunk length actually used and the number of chunks."""
    if chunk_size is None or chunk_size >= length:
        return length, 1
    return chunk_size, -(-length // chunk_size)


def _chunked_padding_mask(
    key_padding_mask: Optional[torch.Tensor], batch: int, length: int, chunk: int, num_chunks: int, device
) -> Optional[torch.Tensor]:
    """Return the padding mask over chunked positions, (B, N, C), or None when nothing is padding.

    The positions added to fill the tail chunk count as padding.
    """
    padded = chunk * num_chunks
    if key_padding_mask is None and padded == length:
        return None
    if key_padding_mask is None:
        key_padding_mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
    if padded != length:
        key_padding_mask = F.pad(key_padding_mask, (0, padded - length), value=True)
    return key_padding_mask.view(batch, num_chunks, chunk)


def _allowed_keys(
    padding: Optional[torch.Tensor], chunk: int, is_causal: bool, device
) -> Optional[torch.Tensor]:
    """Return a bool mask of allowed (query, key) pairs broadcastable to (B, H, N, C, C), or None."""
    allowed = None
    if padding is not None:
        allowed = ~padding[:, None, :, None, :]  # (B, 1, N, 1, C)
    if is_causal:
        causal = torch.ones(chunk, chunk, dtype=torch.bool, device=device).tril()  # (C, C)
        allowed = causal if allowed is None else allowed & causal
    return allowed


def _masked_softmax(scores: torch.Tensor, allowed: Optional[torch.Tensor]) -> torch.Tensor:
    """Softmax over the last axis with excluded keys removed; rows with no allowed key become zeros."""
    if allowed is None:
        return torch.softmax(scores, dim=-1)
    # Excluded keys are selected away, never multiplied: the decay can be exactly 0 and 0 * -inf = NaN.
    scores = scores.masked_fill(~allowed, float("-inf"))
    # An empty row would be softmax of all -inf (NaN). It gets finite scores here and is zeroed below,
    # so neither the output nor the gradient contains a NaN.
    empty_row = ~allowed.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(empty_row, 0.0)
    return torch.softmax(scores, dim=-1).masked_fill(~allowed, 0.0)


class _DecayedSoftmax(torch.autograd.Function):
    """softmax(mask(q k^T * decay)) with in-place work and a hand-written backward.

    The plain autograd graph of these steps keeps an extra L x L tensor per step (scaled scores, decayed
    scores, masked scores). This function keeps only q, k and the probabilities, like plain attention,
    and reuses one L x L buffer for the scores, the decay, the masks and the softmax. decay already
    contains the scale. When it is None, because the decay is too large to cache, each head's (C, C)
    decay is computed from `alphas` and `scale` when needed. Shapes: q, k (B, H, N, C, D); decay (H, 1, C, C) or
    None; allowed broadcastable to (B, H, N, C, C); empty_rows broadcastable to (B, H, N, C, 1).
    Returns the probabilities (B, H, N, C, C).
    """

    @staticmethod
    def forward(ctx, q, k, decay, allowed, empty_rows, alphas, scale):
        scores = torch.matmul(q, k.transpose(-2, -1))  # (B, H, N, C, C)
        _apply_decay(scores, decay, alphas, scale)
        if allowed is not None:
            # A select, never a product: the decay can be exactly 0 and 0 * -inf = NaN.
            scores.masked_fill_(~allowed, float("-inf"))
            scores.masked_fill_(empty_rows, 0.0)  # finite scores for rows with no allowed key
        attn = _softmax_in_place(scores)
        if allowed is not None:
            attn.masked_fill_(empty_rows, 0.0)
        ctx.save_for_backward(q, k, decay, attn, empty_rows, alphas)
        ctx.scale = scale
        return attn

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_attn):
        q, k, decay, attn, empty_rows, alphas = ctx.saved_tensors
        # grad_attn is a fresh tensor from the backward of the matmul (or dropout) that consumes attn in
        # _las_core, so its buffer is reused for the score gradient.
        grad = grad_attn.contiguous()
        if empty_rows is not None:
            grad.masked_fill_(empty_rows, 0.0)
        grad = _softmax_backward_in_place(grad, attn)  # (B, H, N, C, C)
        _apply_decay(grad, decay, alphas, ctx.scale)
        grad_q = grad_k = None
        if ctx.needs_input_grad[0]:
            grad_q = torch.matmul(grad, k)  # (B, H, N, C, D)
        if ctx.needs_input_grad[1]:
            grad_k = torch.matmul(grad.transpose(-2, -1), q)  # (B, H, N, C, D)
        return grad_q, grad_k, None, None, None, None, None


def _apply_decay(scores: torch.Tensor, decay: Optional[torch.Tensor], alphas: torch.Tensor, scale: float) -> None:
    """Multiply (B, H, N, C, C) scores in place by the decay, or by each head's decay made on the fly."""
    if decay is not None:
        scores.mul_(decay)
        return
    length = scores.shape[-1]
    for head in range(scores.shape[1]):
        head_decay = _decay_in(length, alphas[head : head + 1], scores.dtype, scale)  # (1, C, C)
        scores[:, head].mul_(head_decay)


def _softmax_in_place(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis, written into `scores` on CPU (a new tensor elsewhere).

    The CPU kernel works row by row and reads each entry before writing it, so the output may alias the
    input. This skips a fresh L x L allocation, whose page faults cost as much as the softmax itself.
    The tests compare the result with the out-of-place reference path.
    """
    if scores.device.type == "cpu" and scores.is_contiguous():
        return torch.ops.aten._softmax.out(scores, -1, False, out=scores)
    return torch.softmax(scores, dim=-1)


def _softmax_backward_in_place(grad: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Return attn * (grad - sum(grad * attn)) over the last axis, written into `grad` on CPU."""
    if grad.device.type == "cpu" and attn.is_contiguous():
        return torch.ops.aten._softmax_backward_data.out(grad, attn, -1, attn.dtype, grad_input=grad)
    return torch.ops.aten._softmax_backward_data(grad, attn, -1, attn.dtype)


def _prepare(query, key, value, alphas, pool_size, is_causal, key_padding_mask, dropout_p, chunk_size):
    _check_qkv(query, key, value)
    _check_alphas(alphas, query.shape[1])
    _check_pool_size(pool_size)
    _check_chunk_size(chunk_size)
    _check_dropout(dropout_p)
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    _check_key_padding_mask(key_padding_mask, query.shape[0], query.shape[2])


def _las_core(
    query, key, value, alphas, *, pool_size, is_causal, key_padding_mask, dropout_p, scale, chunk_size,
    smooth_matrix: bool,
):
    """Shared body of the reference (smooth_matrix=True) and fast (False) paths."""
    batch, heads, length, dim = query.shape
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    chunk, num_chunks = _layout(length, chunk_size)

    # layout: chunks become a batch axis; without chunking N = 1 and C = L
    q = _split_chunks(query, chunk, num_chunks)  # (B, H, N, C, D)
    k = _split_chunks(key, chunk, num_chunks)  # (B, H, N, C, D)
    v = _split_chunks(value, chunk, num_chunks)  # (B, H, N, C, Dv)
    padding = _chunked_padding_mask(key_padding_mask, batch, length, chunk, num_chunks, query.device)
    allowed = _allowed_keys(padding, chunk, is_causal, query.device)
    if padding is not None:
        # A NaN or inf stored at padding would reach the gradients of real positions through 0 * NaN in
        # the backward matmuls. Keys at padding are excluded anyway, so they are zeroed; queries at
        # padding keep finite values, so their (unused) outputs stay those of ordinary attention.
        padding_rows = padding[:, None, :, :, None]  # (B, 1, N, C, 1)
        k = k.masked_fill(padding_rows, 0.0)
        q = q.masked_fill(padding_rows & ~q.isfinite(), 0.0)
        # Zeroing value at padding is the same as zeroing the padding columns after smoothing.
        v = v.masked_fill(padding_rows, 0.0)

    if smooth_matrix or alphas.requires_grad:
        # scores
        scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, N, C, C)

        # decay: a multiplication of the scores, per head
        decay = _decay_in(chunk, alphas, scores.dtype)  # (H, C, C)
        scores = scores * decay[:, None]  # (B, H, N, C, C)

        # mask and softmax
        attn = _masked_softmax(scores, allowed)  # (B, H, N, C, C)
    else:
        # The same three steps, fused: the decay (times the scale) is cached and applied in place.
        decay = None
        if heads * chunk * chunk * q.element_size() <= _DECAY_CACHE_MAX_BYTES:
            decay = _cached_decay(chunk, alphas, q.dtype, scale)[:, None]  # (H, 1, C, C)
        empty_rows = None if allowed is None else ~allowed.any(dim=-1, keepdim=True)
        attn = _DecayedSoftmax.apply(q, k, decay, allowed, empty_rows, alphas, scale)  # (B, H, N, C, C)

    # dropout, before smoothing
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p, training=True)

    # smooth, and keep padding keys at zero weight
    if smooth_matrix:
        attn = smooth_rows(attn, pool_size, is_causal)  # (B, H, N, C, C)
        if padding is not None:
            attn = attn.masked_fill(padding[:, None, :, None, :], 0.0)
    elif pool_size > 1:
        v = _pool_sequence(v, pool_size, is_causal)  # (B, H, N, C, Dv)

    # aggregate
    out = torch.matmul(attn, v)  # (B, H, N, C, Dv)
    out = out.reshape(batch, heads, num_chunks * chunk, v.shape[-1])
    return out[:, :, :length] if num_chunks * chunk != length else out  # (B, H, L, Dv)


def las_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    alphas: torch.Tensor,
    *,
    pool_size: int = 3,
    is_causal: bool = False,
    key_padding_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Compute LaS attention in the paper's literal form: materialize and smooth the attention matrix.

    query, key: (B, H, L, D); value: (B, H, L, Dv); alphas: (H,); key_padding_mask: (B, L) bool, True
    marks padding. Returns (B, H, L, Dv). Steps: scores (q k^T * scale, scale = 1/sqrt(D) unless
    given), decay (multiply by exp(-alphas[h] |i-j|)), mask (select), softmax (empty rows are zeros),
    dropout (training only, dropout_p > 0), smooth_rows, zero padding columns, multiply by value.
    With chunk_size = C all of it happens inside chunks of C positions. O(L^2) memory; kept for
    reading and testing. Use las_attention in models.
    """
    _prepare(query, key, value, alphas, pool_size, is_causal, key_padding_mask, dropout_p, chunk_size)
    return _las_core(
        query, key, value, alphas, pool_size=pool_size, is_causal=is_causal,
        key_padding_mask=key_padding_mask, dropout_p=dropout_p, scale=scale, chunk_size=chunk_size,
        smooth_matrix=True,
    )


def las_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    alphas: torch.Tensor,
    *,
    pool_size: int = 3,
    is_causal: bool = False,
    key_padding_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Compute LaS attention by smoothing `value` instead of the attention matrix (the fast path).

    Same arguments, shapes and result as las_attention_reference, to rounding. Because row pooling is
    a banded matrix M, smooth_rows(A) @ V = A @ (M V), and M V is smooth_values(V): the smoothing costs
    O(L * D) instead of O(L^2). The decay tensor is cached per rates, length, device and dtype, up to
    512 MiB; a larger decay is made one head at a time when it is needed.
    """
    _prepare(query, key, value, alphas, pool_size, is_causal, key_padding_mask, dropout_p, chunk_size)
    return _las_core(
        query, key, value, alphas, pool_size=pool_size, is_causal=is_causal,
        key_padding_mask=key_padding_mask, dropout_p=dropout_p, scale=scale, chunk_size=chunk_size,
        smooth_matrix=False,
    )


# ----------------------------------------------------------------------------------------------------
# The fused path: FlexAttention


# FlexAttention works on blocks of 128 positions. Lengths are padded up to a bucket (a multiple of 128
# up to 1,024, then four buckets per doubling, at most 25% extra), so a range of lengths shares one
# compiled kernel.
_FLEX_BLOCK = 128
_compiled_flex_attention = None
_warned: set = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _get_compiled_flex_attention():
    """Return torch.compile(flex_attention), built on first use.

    Static shapes: with torch 2.13 on CPU, dynamic=True fails to build the C++ kernel. Bucketed lengths
    keep the number of compilations small instead.
    """
    global _compiled_flex_attention
    if _compiled_flex_attention is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex_attention


_compiled_las_attention = None
_compiled_create_block_mask = None


def _get_compiled_create_block_mask():
    """Return torch.compile(create_block_mask), built on first use."""
    global _compiled_create_block_mask
    if _compiled_create_block_mask is None:
        from torch.nn.attention.flex_attention import create_block_mask

        _compiled_create_block_mask = torch.compile(create_block_mask, dynamic=False)
    return _compiled_create_block_mask


def _get_compiled_las_attention():
    """Return torch.compile(las_attention), built on first use; dynamic shapes, so lengths share it."""
    global _compiled_las_attention
    if _compiled_las_attention is None:
        _compiled_las_attention = torch.compile(las_attention, dynamic=True)
    return _compiled_las_attention


def _flex_bucket_length(length: int) -> int:
    """Round a length up to its FlexAttention bucket: 128, 256, ..., 1024, 1280, 1536, ..., 2048, 2560, ..."""
    step = _FLEX_BLOCK
    while length > 8 * step:
        step *= 2
    return -(-length // step) * step


# Block masks of calls without key_padding_mask, which depend on the layout only. Bounded like the decay.
_BLOCK_MASK_CACHE: "OrderedDict[tuple, object]" = OrderedDict()


def _flex_block_mask(key_padding_mask, batch, length, padded_length, is_causal, chunk, device):
    """Build the FlexAttention BlockMask for padding, causal order and chunks over L_padded positions.

    Every layout option is a tensor, not a Python constant, so causal, padded and chunked calls of one
    shape share one compiled graph. The mask is built blockwise by a compiled create_block_mask: the
    uncompiled builder evaluates all L x L pairs at once (about 3 GB at L = 16,384).
    """
    cache_key = None
    if key_padding_mask is None:
        cache_key = (batch, length, padded_length, is_causal, chunk, str(device))
        if cache_key in _BLOCK_MASK_CACHE:
            _BLOCK_MASK_CACHE.move_to_end(cache_key)
            return _BLOCK_MASK_CACHE[cache_key]
        # The same for every sequence: built for b = 0 only (mask batch size None).
        padding = torch.zeros(batch, length, dtype=torch.bool, device=device)
        mask_batch = None
    else:
        padding = key_padding_mask
        mask_batch = batch
    padding = F.pad(padding, (0, padded_length - length), value=True)  # (B or 1, L_padded)
    causal = torch.tensor(is_causal, device=device)
    chunk_length = torch.tensor(chunk if chunk < length else padded_length, device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        same_chunk = q_idx // chunk_length == kv_idx // chunk_length
        in_order = (kv_idx <= q_idx) | ~causal
        return same_chunk & in_order & ~padding[b, kv_idx]

    with torch._dynamo.config.patch(recompile_limit=64):
        block_mask = _get_compiled_create_block_mask()(
            mask_mod, mask_batch, None, padded_length, padded_length, device=device
        )
    if cache_key is not None:
        _BLOCK_MASK_CACHE[cache_key] = block_mask
        if len(_BLOCK_MASK_CACHE) > _DECAY_CACHE_SIZE:
            _BLOCK_MASK_CACHE.popitem(last=False)
    return block_mask


def _smooth_values_in_chunks(value, pool_size, is_causal, key_padding_mask, chunk_size):
    """smooth_values applied inside each chunk of C positions: (B, H, L, D) -> (B, H, L, D)."""
    batch, heads, length, _ = value.shape
    chunk, num_chunks = _layout(length, chunk_size)
    padding = _chunked_padding_mask(key_padding_mask, batch, length, chunk, num_chunks, value.device)
    v = _split_chunks(value, chunk, num_chunks)  # (B, H, N, C, D)
    if padding is not None:
        v = v.masked_fill(padding[:, None, :, :, None], 0.0)
    if pool_size > 1:
        v = _pool_sequence(v, pool_size, is_causal)  # (B, H, N, C, D)
    v = v.reshape(batch, heads, num_chunks * chunk, value.shape[-1])[:, :, :length]  # (B, H, L, D)
    return v.contiguous()


def las_attention_flex(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    alphas: torch.Tensor,
    *,
    pool_size: int = 3,
    is_causal: bool = False,
    key_padding_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Compute LaS attention with a compiled FlexAttention kernel; nothing of size L x L is stored.

    Same arguments (no dropout: FlexAttention has none), shapes and result as las_attention, to
    rounding. The decay is a score_mod, score * exp(-alphas[h] * |q_idx - kv_idx|), computed from the
    (H,) rates inside the kernel. Padding, causal order and chunks (block-diagonal, so LaS-chunk costs
    O(L * C)) are a block mask. Value is smoothed eagerly before the call: pooling inside the same
    compiled region as flex_attention gave wrong results with torch 2.13 on CPU. Lengths are padded to
    a multiple of 128 (the padding counts as key padding), so a range of lengths compiles once.

    On CPU, torch 2.13 has no FlexAttention backward: this path is for inference there, and a call
    that needs gradients raises RuntimeError. Use las_attention (or backend="eager"/"compile") to train.

    NOTE: the CUDA forward and backward are tested by test_compiled.py only on a machine with a GPU;
    the CPU forward is tested everywhere.
    """
    _prepare(query, key, value, alphas, pool_size, is_causal, key_padding_mask, 0.0, chunk_size)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if query.device.type == "cpu" and needs_grad:
        raise RuntimeError(
            "las_attention_flex cannot train on CPU: torch 2.13 has no FlexAttention backward there. "
            "Use las_attention (LaSAttention backend='eager' or 'compile') for training on CPU, or run "
            "this call under torch.no_grad() for inference."
        )
    if query.device.type == "cpu" and query.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            f"las_attention_flex on CPU supports float32, float16 and bfloat16 inputs, got {query.dtype}; "
            "convert the inputs or use las_attention"
        )
    if not needs_grad:
        # flex_attention on CPU rejects inputs that require grad even under torch.no_grad().
        query, key, value = query.detach(), key.detach(), value.detach()
    if key_padding_mask is not None:
        # As in las_attention: NaN or inf stored at padding positions must not reach anything real.
        padding_rows = key_padding_mask[:, None, :, None]  # (B, 1, L, 1)
        key = key.masked_fill(padding_rows, 0.0)
        query = query.masked_fill(padding_rows & ~query.isfinite(), 0.0)

    batch, heads, length, dim = query.shape
    if batch == 0:
        return value.new_zeros(value.shape)  # nothing to attend; the kernel cannot index an empty batch
    chunk, _ = _layout(length, chunk_size)
    smoothed = _smooth_values_in_chunks(value, pool_size, is_causal, key_padding_mask, chunk_size)

    # pad to the bucket length; the added positions are padding keys and their outputs are dropped
    padded_length = _flex_bucket_length(length)
    extra = padded_length - length
    if extra:
        query = F.pad(query, (0, 0, 0, extra))
        key = F.pad(key, (0, 0, 0, extra))
        smoothed = F.pad(smoothed, (0, 0, 0, extra))
    block_mask = _flex_block_mask(key_padding_mask, batch, length, padded_length, is_causal, chunk, query.device)

    rates = alphas.to(device=query.device, dtype=torch.float32)  # (H,)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score * torch.exp(-rates[h] * (q_idx - kv_idx).abs())

    # One compilation per (B, H, L_padded, D); allow more than dynamo's default of 8 before it falls back.
    with torch._dynamo.config.patch(recompile_limit=64):
        out = _get_compiled_flex_attention()(
            query.contiguous(), key.contiguous(), smoothed.contiguous(),
            score_mod=score_mod, block_mask=block_mask, scale=scale,
        )  # (B, H, L_padded, D)
    return out[:, :, :length]


# ----------------------------------------------------------------------------------------------------
# The module


class LaSAttention(nn.Module):
    """Multi-head LaS self-attention: (B, L, dim) -> (B, L, dim).

    Same projections as nn.MultiheadAttention(dim, num_heads) (one fused in-projection of 3 * dim and
    an out-projection), so the same number of trainable parameters: the rates are a buffer
    (`alphas`, shape (H,)), not a parameter. max_alpha = 0 with pool_size = 1 is plain softmax
    attention, the baseline for comparisons.

    backend selects the path. "auto" is FlexAttention on CUDA when attention dropout is off, else
    eager. "eager" is las_attention, "compile" is torch.compile of it, and "reference" is
    las_attention_reference. "flex" is las_attention_flex, which has no attention dropout and serves
    only inference on CPU. All compute the same function and differ in speed and memory.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        pool_size: int = 3,
        max_alpha: float = DEFAULT_MAX_ALPHA,
        min_alpha: float = DEFAULT_MIN_ALPHA,
        is_causal: bool = False,
        chunk_size: Optional[int] = None,
        dropout: float = 0.0,
        bias: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        if dim % num_heads != 0:
            raise ValueError(
                f"dim must be divisible by num_heads, got dim={dim} and num_heads={num_heads}; "
                f"head dimension would be {dim / num_heads:.3g}"
            )
        _check_pool_size(pool_size)
        _check_chunk_size(chunk_size)
        _check_dropout(dropout)
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.pool_size = pool_size
        self.is_causal = is_causal
        self.chunk_size = chunk_size
        self.dropout = dropout
        self.backend = backend
        self.in_proj = nn.Linear(dim, 3 * dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        self.register_buffer("alphas", alpha_schedule(num_heads, max_alpha, min_alpha))

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (B, L, {self.dim}), got {tuple(x.shape)}")
        batch, length, _ = x.shape
        qkv = self.in_proj(x).view(batch, length, 3, self.num_heads, self.head_dim)  # (B, L, 3, H, D)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, L, D)
        dropout_p = self.dropout if self.training else 0.0
        options = dict(
            pool_size=self.pool_size, is_causal=self.is_causal, key_padding_mask=key_padding_mask,
            chunk_size=self.chunk_size,
        )
        backend = self._resolve_backend(query, dropout_p)
        if backend == "flex":
            out = las_attention_flex(query, key, value, self.alphas, **options)
        elif backend == "compile":
            out = _get_compiled_las_attention()(query, key, value, self.alphas, dropout_p=dropout_p, **options)
        elif backend == "reference":
            out = las_attention_reference(query, key, value, self.alphas, dropout_p=dropout_p, **options)
        else:
            out = las_attention(query, key, value, self.alphas, dropout_p=dropout_p, **options)  # (B, H, L, D)
        out = out.transpose(1, 2).reshape(batch, length, self.dim)  # (B, L, dim)
        return self.out_proj(out)

    def _resolve_backend(self, query: torch.Tensor, dropout_p: float) -> str:
        """Pick the path for this call; "auto" is FlexAttention on CUDA and the eager fast path elsewhere."""
        backend = self.backend
        if backend == "flex" and dropout_p > 0:
            raise ValueError(
                f"backend='flex' has no attention dropout, but dropout={self.dropout} in training mode; "
                "set dropout=0.0 or use backend='eager' or 'compile'"
            )
        if backend != "auto":
            return backend
        if query.device.type == "cuda" and dropout_p == 0:
            return "flex"
        if query.device.type == "cuda":
            _warn_once(
                "auto-dropout",
                "LaSAttention(backend='auto') runs the eager path on CUDA because attention dropout is on "
                "(FlexAttention has none); set dropout=0.0 to use the fused kernel.",
            )
        return "eager"

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, pool_size={self.pool_size}, "
            f"is_causal={self.is_causal}, chunk_size={self.chunk_size}, dropout={self.dropout}, "
            f"backend={self.backend!r}"
        )


# ----------------------------------------------------------------------------------------------------
# The block


class _SumOverProcesses(torch.autograd.Function):
    """Sum a tensor over the processes of the default group. Its gradient is summed the same way."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        torch.distributed.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        torch.distributed.all_reduce(total)
        return total


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm over (B, L, dim) whose batch statistics use real (non-padding) positions only.

    With padding counted, the same example would normalize differently alone and inside a padded batch.
    Padding positions output 0. sync=True takes the training statistics over the real positions of
    every process in the default torch.distributed group (the role of nn.SyncBatchNorm, which takes no
    padding mask). Without an initialized group of two or more processes, sync changes nothing.
    """

    def __init__(self, num_features: int, *args, sync: bool = False, **kwargs):
        super().__init__(num_features, *args, **kwargs)
        self.sync = sync

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        dim = x.shape[-1]
        synced = self.sync and self.training and _world_size() > 1
        batch_statistics = self.training or not self.track_running_stats
        if not batch_statistics or (key_padding_mask is None and not synced):
            # nn.BatchNorm1d itself: running statistics act per position, and without padding every
            # position is real.
            if key_padding_mask is None:
                return super().forward(x.reshape(-1, dim)).view_as(x)
            # Zero padding first: NaN there would reach the weight gradient through 0 * NaN.
            padding = key_padding_mask[..., None]
            out = super().forward(x.masked_fill(padding, 0.0).reshape(-1, dim)).view_as(x)
            return out.masked_fill(padding, 0.0)
        return self._masked_batch_norm(x, key_padding_mask, synced)

    def _masked_batch_norm(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor], synced: bool):
        """Normalize x with the mean and variance of its real positions, summed over processes if synced."""
        if key_padding_mask is None:
            key_padding_mask = torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)
        real = ~key_padding_mask[..., None]  # (B, L, 1)

        # float32 statistics for half-precision input, as BatchNorm computes them. torch.where, not a
        # product, keeps NaN or inf stored at padding out of the sums and their gradients.
        values = torch.where(real, x.to(torch.promote_types(x.dtype, torch.float32)), 0.0)  # (B, L, dim)
        count = real.sum().reshape(1).to(values.dtype)
        count_and_sum = torch.cat([count, values.sum((0, 1))])  # (1 + dim,)
        if synced:
            count_and_sum = _SumOverProcesses.apply(count_and_sum)

        # clamp_min(1): a batch with no real position gives zeros, not NaN.
        real_count = count_and_sum[0]
        count = real_count.clamp_min(1)
        mean = count_and_sum[1:] / count  # (dim,)
        # Two passes (mean, then squared deviations) keep the variance accurate in float32.
        centred = torch.where(real, values - mean, 0.0)  # (B, L, dim)
        squares = (centred * centred).sum((0, 1))  # (dim,)
        if synced:
            squares = _SumOverProcesses.apply(squares)
        variance = squares / count  # (dim,), biased, as BatchNorm normalizes

        out = centred * torch.rsqrt(variance + self.eps)
        if self.affine:
            out = torch.where(real, out * self.weight + self.bias, 0.0)

        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                # At least float32: float16 turns counts above 65,504 into inf, and 1 / inf = 0 would
                # freeze the cumulative average. float64 buffers need a float64 momentum.
                compute_dtype = torch.promote_types(self.running_mean.dtype, torch.float32)
                if self.momentum is None:  # cumulative average, as in BatchNorm
                    momentum = 1.0 / self.num_batches_tracked.to(compute_dtype)
                else:
                    momentum = torch.full((), self.momentum, dtype=compute_dtype, device=x.device)
                # Fewer than two real positions give no variance, so the running statistics stay as they are.
                momentum = torch.where(real_count > 1, momentum, 0.0).to(self.running_mean.dtype)
                unbiased = variance * count / (count - 1).clamp_min(1)  # as BatchNorm stores it
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        return out.to(x.dtype)


def convert_sync_batch_norm(module: nn.Module) -> nn.Module:
    """Switch every MaskedBatchNorm1d inside module to statistics over all processes and return module."""
    for child in module.modules():
        if isinstance(child, MaskedBatchNorm1d):
            child.sync = True
    return module


class LaSBlock(nn.Module):
    """Pre-norm transformer encoder block with LaS attention: (B, L, dim) -> (B, L, dim).

    x = x + Dropout(LaSAttention(Norm(x)));  x = x + Dropout(MLP(Norm(x))), MLP = Linear-GELU-Linear.
    norm="layer" uses LayerNorm; norm="batch" uses BatchNorm whose statistics come from real positions
    only, so padding never changes a real example's output.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        pool_size: int = 3,
        max_alpha: float = DEFAULT_MAX_ALPHA,
        min_alpha: float = DEFAULT_MIN_ALPHA,
        is_causal: bool = False,
        chunk_size: Optional[int] = None,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        norm: str = "layer",
        bias: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        if norm not in ("layer", "batch"):
            raise ValueError(f"norm must be 'layer' or 'batch', got {norm!r}")
        _check_dropout(dropout)
        self.norm_kind = norm
        make_norm = nn.LayerNorm if norm == "layer" else MaskedBatchNorm1d
        self.norm1 = make_norm(dim)
        self.attention = LaSAttention(
            dim, num_heads, pool_size=pool_size, max_alpha=max_alpha, min_alpha=min_alpha,
            is_causal=is_causal, chunk_size=chunk_size, dropout=attention_dropout, bias=bias,
            backend=backend,
        )
        self.norm2 = make_norm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden, bias=bias), nn.GELU(), nn.Linear(hidden, dim, bias=bias))
        self.dropout = nn.Dropout(dropout)

    def _norm(self, norm: nn.Module, x: torch.Tensor, key_padding_mask) -> torch.Tensor:
        if self.norm_kind == "batch":
            return norm(x, key_padding_mask)
        return norm(x)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.dropout(self.attention(self._norm(self.norm1, x, key_padding_mask), key_padding_mask))
        x = x + self.dropout(self.mlp(self._norm(self.norm2, x, key_padding_mask)))
        return x
