"""Property tests for las.py: LaS attention checked against an independent float64 NumPy statement.

Run with `python -m pytest -q test_las.py` (about 15 s on an idle 2-core machine, 60 to 90 s when other jobs share the cores).

`numpy_las` below restates the operator from its equations, without calling las.py. For head h:

    out = AP( softmax( exp(-alphas[h] * |i - j|) * (q k^T * scale) ) ) v

with padding keys (and keys j > i when causal) excluded by a select, empty rows all zeros, AP an
average pool along each row with divisor P at every position (centred window, or keys j .. j+P-1 when
causal), padding columns zeroed after the pool, and everything done per chunk with chunk_size = C.
Hypothesis draws the shapes (L = 1, P > L and chunk sizes that do not divide L included), and every
counterexample it has found is pinned with @example.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import math
import re
from typing import Optional

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

import las

PATHS = {"reference": las.las_attention_reference, "fast": las.las_attention}
PATH_NAMES = sorted(PATHS)


# ----------------------------------------------------------------------------------------------------
# The operator in float64 NumPy


def numpy_smooth(attn: np.ndarray, pool_size: int, is_causal: bool) -> np.ndarray:
    """Average-pool the last axis with zero padding and divisor P at every position.

    Centred: out[j] = (1/P) * sum_{m=-(P-1)/2}^{(P-1)/2} a[j+m].
    Causal:  out[j] = (1/P) * sum_{m=0}^{P-1} a[j+m].
    """
    length = attn.shape[-1]
    half = (pool_size - 1) // 2
    offsets = range(0, pool_size) if is_causal else range(-half, half + 1)
    out = np.zeros(attn.shape, dtype=np.float64)
    for m in offsets:
        # out[..., j] += attn[..., j + m] for every j with 0 <= j + m < L
        lo, hi = max(0, -m), min(length, length - m)
        if lo < hi:
            out[..., lo:hi] += attn[..., lo + m : hi + m]
    return out / pool_size


def _numpy_las_chunk(q, k, v, alphas, pool_size, is_causal, padding, scale):
    """LaS attention on one chunk: q, k (B, H, L, D), v (B, H, L, Dv), padding (B, L) -> (B, H, L, Dv)."""
    length, dim = q.shape[-2:]
    scale = 1.0 / math.sqrt(dim) if scale is None else scale

    # scores and decay
    scores = np.einsum("bhid,bhjd->bhij", q, k) * scale  # (B, H, L, L)
    position = np.arange(length)
    distance = np.abs(position[:, None] - position[None, :])  # (L, L)
    decay = np.exp(-alphas[None, :, None, None] * distance)  # (1, H, L, L)
    z = scores * decay

    # allowed keys: real, and j <= i when causal
    allowed = np.broadcast_to(~padding[:, None, None, :], z.shape)
    if is_causal:
        allowed = allowed & (position[None, :] <= position[:, None])

    # softmax over the allowed keys; a row with none is all zeros
    z = np.where(allowed, z, -np.inf)
    row_max = z.max(axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    weights = np.where(allowed, np.exp(z - row_max), 0.0)
    total = weights.sum(axis=-1, keepdims=True)
    attn = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)

    # smooth, then zero the padding columns
    smoothed = numpy_smooth(attn, pool_size, is_causal)
    smoothed = np.where(padding[:, None, None, :], 0.0, smoothed)
    return smoothed @ v


def numpy_las(q, k, v, alphas, *, pool_size, is_causal, padding=None, chunk_size=None, scale=None):
    """LaS attention in float64: q, k (B, H, L, D), v (B, H, L, Dv), alphas (H,), padding (B, L) True = pad."""
    q, k, v = (np.asarray(t, dtype=np.float64) for t in (q, k, v))
    alphas = np.asarray(alphas, dtype=np.float64)
    batch, _, length, _ = q.shape
    if padding is None:
        padding = np.zeros((batch, length), dtype=bool)
    chunk = length if chunk_size is None else min(chunk_size, length)
    out = np.zeros(v.shape, dtype=np.float64)
    for start in range(0, length, chunk):
        part = slice(start, min(start + chunk, length))
        out[:, :, part] = _numpy_las_chunk(
            q[:, :, part], k[:, :, part], v[:, :, part], alphas, pool_size, is_causal, padding[:, part], scale
        )
    return out


# ----------------------------------------------------------------------------------------------------
# Generated cases


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention call: shapes, options and the seed of its inputs."""

    batch: int
    heads: int
    length: int
    dim: int
    pool_size: int
    is_causal: bool
    alphas: tuple
    # None (no mask), a tuple of real lengths (right padding), or "random" (any pattern of padding)
    padding: object = None
    chunk_size: Optional[int] = None
    scale: Optional[float] = None
    seed: int = 0

    def inputs(self, dtype=torch.float32):
        """Return query, key, value (B, H, L, D), alphas (H,) and the padding mask (B, L) or None."""
        rng = np.random.default_rng(self.seed)
        shape = (self.batch, self.heads, self.length, self.dim)
        q, k, v = (torch.from_numpy(rng.standard_normal(shape)).to(dtype) for _ in range(3))
        alphas = torch.tensor(self.alphas, dtype=torch.float32)
        mask = None
        if self.padding == "random":
            density = rng.uniform()
            mask = torch.from_numpy(rng.uniform(size=(self.batch, self.length)) < density)
        elif self.padding is not None:
            lengths = torch.tensor(self.padding)
            mask = torch.arange(self.length)[None, :] >= lengths[:, None]  # (B, L)
        return q, k, v, alphas, mask

    def options(self):
        return dict(
            pool_size=self.pool_size, is_causal=self.is_causal, chunk_size=self.chunk_size, scale=self.scale
        )


ALPHA_VALUES = [0.0, 0.01, 0.1, 0.5, 1.0, 2.0]


@st.composite
def cases(draw, max_length=64, is_causal=None, padding=True):
    batch = draw(st.integers(1, 3))
    heads = draw(st.integers(1, 4))
    length = draw(st.integers(1, max_length))
    padding_kind = draw(st.sampled_from(["none", "right", "random"])) if padding else "none"
    if padding_kind == "right":
        mask = tuple(draw(st.lists(st.integers(0, length), min_size=batch, max_size=batch)))
    else:
        mask = None if padding_kind == "none" else "random"
    return Case(
        batch=batch,
        heads=heads,
        length=length,
        dim=draw(st.integers(1, 16)),
        pool_size=draw(st.sampled_from([1, 3, 5, 7])),
        is_causal=draw(st.booleans()) if is_causal is None else is_causal,
        alphas=tuple(draw(st.lists(st.sampled_from(ALPHA_VALUES), min_size=heads, max_size=heads))),
        padding=mask,
        chunk_size=draw(st.one_of(st.none(), st.integers(1, length + 3))),
        scale=draw(st.sampled_from([None, None, 0.5, 2.0])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def real_positions(mask: Optional[torch.Tensor], batch: int, length: int) -> torch.Tensor:
    """Return (B, L) bool, True where a position is real (not padding)."""
    if mask is None:
        return torch.ones(batch, length, dtype=torch.bool)
    return ~mask


def at_real(out: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Select the rows of real positions: (B, H, L, D) -> (real positions, H, D)."""
    return out.transpose(1, 2)[real]


# Shapes on an edge: L = 1, P > L, all padding, chunks that do not divide L.
EDGE_CASES = [
    Case(1, 1, 1, 1, 7, False, (0.0,)),
    Case(1, 1, 1, 1, 7, True, (2.0,), padding=(0,)),
    Case(3, 2, 5, 4, 3, True, (0.0, 1.0), padding=(5, 2, 0), chunk_size=2),
    Case(2, 3, 9, 2, 5, False, (0.0, 0.1, 2.0), padding="random", chunk_size=4, seed=7),
    Case(1, 2, 64, 16, 7, True, (0.0, 2.0), padding=(40,), chunk_size=13, scale=2.0, seed=3),
]


def with_examples(*extra_cases, **arguments):
    """Pin the edge cases and `extra_cases` as hypothesis examples, with `arguments` for other parameters."""

    def decorate(test):
        for case in [*EDGE_CASES, *extra_cases]:
            test = example(case=case, **arguments)(test)
        return test

    return decorate


# ----------------------------------------------------------------------------------------------------
# Attention against the NumPy statement


@pytest.mark.parametrize("path", PATH_NAMES)
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@settings(deadline=None, max_examples=60)
@with_examples()
@given(case=cases())
def test_attention_matches_numpy(path, dtype, tolerance, case):
    # The rates are float32, as LaSAttention stores them, and float64 inputs still need float64 accuracy.
    q, k, v, alphas, mask = case.inputs(dtype)
    out = PATHS[path](q, k, v, alphas, key_padding_mask=mask, **case.options())
    expected = numpy_las(
        q.double().numpy(), k.double().numpy(), v.double().numpy(), alphas.double().numpy(),
        padding=None if mask is None else mask.numpy(), **case.options(),
    )
    assert out.shape == q.shape, f"{path}: output shape {tuple(out.shape)}, input shape {tuple(q.shape)}"
    assert out.dtype == dtype, f"{path}: output dtype {out.dtype}, inputs are {dtype}"
    real = real_positions(mask, case.batch, case.length)
    np.testing.assert_allclose(
        at_real(out, real).double().numpy(), at_real(torch.from_numpy(expected), real).numpy(),
        rtol=tolerance, atol=tolerance, err_msg=f"{path} ({dtype}) differs from the float64 NumPy statement",
    )


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@settings(deadline=None, max_examples=60)
@with_examples(Case(1, 1, 2, 2, 1, False, (0.0,)))
@given(case=cases())
def test_fast_matches_reference(dtype, tolerance, case):
    q, k, v, alphas, mask = case.inputs(dtype)
    fast = las.las_attention(q, k, v, alphas, key_padding_mask=mask, **case.options())
    reference = las.las_attention_reference(q, k, v, alphas, key_padding_mask=mask, **case.options())
    torch.testing.assert_close(
        fast, reference, rtol=tolerance, atol=tolerance,
        msg=lambda m: f"fast path differs from the reference ({dtype}): {m}",
    )


def test_fast_rates_dtype_order():
    # A float32 call must not leave a cached decay that a float64 call with the same rate values
    # reuses, because the float64 result would then carry float32 rounding.
    generator = torch.Generator().manual_seed(18)
    q, k, v = (torch.randn(2, 2, 9, 3, generator=generator, dtype=torch.float64) for _ in range(3))
    rates32 = torch.tensor([0.3, 0.7])
    rates64 = rates32.double()
    las.las_attention(q, k, v, rates32, pool_size=3)
    fast = las.las_attention(q, k, v, rates64, pool_size=3)
    reference = las.las_attention_reference(q, k, v, rates64, pool_size=3)
    torch.testing.assert_close(
        fast, reference, rtol=1e-12, atol=1e-12,
        msg=lambda m: f"float64 rates after a float32 call with the same values: {m}",
    )


@settings(deadline=None, max_examples=40)
@with_examples()
@given(case=cases(max_length=40))
def test_fast_gradients_match_reference(case):
    q, k, v, alphas, mask = case.inputs(torch.float64)
    alphas = alphas.double()
    weights = torch.from_numpy(np.random.default_rng(case.seed + 1).standard_normal(q.shape))
    grads = {}
    for path in PATH_NAMES:
        inputs = [tensor.clone().requires_grad_() for tensor in (q, k, v)]
        out = PATHS[path](*inputs, alphas, key_padding_mask=mask, **case.options())
        (out * weights).sum().backward()
        grads[path] = [tensor.grad for tensor in inputs]
    for name, fast, reference in zip(("query", "key", "value"), grads["fast"], grads["reference"]):
        torch.testing.assert_close(
            fast, reference, rtol=1e-10, atol=1e-10,
            msg=lambda m: f"{name} gradient of the fast path differs from the reference: {m}",
        )


# ----------------------------------------------------------------------------------------------------
# Decay and rates


@settings(deadline=None, max_examples=50)
@given(
    length=st.integers(1, 64),
    alphas=st.lists(st.floats(0.0, 5.0, width=32), min_size=1, max_size=4),
)
def test_decay_mask_values(length, alphas):
    rates = torch.tensor(alphas, dtype=torch.float32)
    decay = las.decay_mask(length, rates)
    assert decay.shape == (len(alphas), length, length), f"decay shape {tuple(decay.shape)}"
    assert bool((decay <= 1).all()), "decay exceeds 1"
    assert bool((decay >= 0).all()), "decay is negative"
    position = torch.arange(length)
    distance = (position[:, None] - position[None, :]).abs()
    # exp(-x) stays a normal float32 for x < 80, so it must be positive there.
    representable = rates[:, None, None] * distance < 80
    assert bool((decay[representable] > 0).all()), "decay is 0 where exp(-alpha * |i - j|) is representable"
    expected = np.exp(-np.asarray(alphas, dtype=np.float64)[:, None, None] * distance.numpy())
    np.testing.assert_allclose(decay.double().numpy(), expected, rtol=1e-5, atol=1e-30, err_msg="decay values")
    diagonal = decay.diagonal(dim1=-2, dim2=-1)
    assert bool((diagonal == 1).all()), f"diagonal is not exactly 1: {diagonal.tolist()}"
    assert torch.equal(decay, decay.transpose(-2, -1)), "decay is not symmetric"
    assert torch.equal(decay[:, 1:, 1:], decay[:, :-1, :-1]), "decay is not Toeplitz"


@settings(deadline=None, max_examples=50)
@given(alpha=st.floats(0.0625, 5.0, width=32), length=st.integers(2, 64))
def test_decay_mask_decreasing(alpha, length):
    decay = las.decay_mask(length, torch.tensor([alpha]))[0, 0]  # row 0: distance j
    steps = min(length, int(80 / alpha))  # distances before exp(-alpha * d) leaves normal float32
    row = decay[:steps]
    assert bool((row[1:] < row[:-1]).all()), f"decay not strictly decreasing in |i - j|: {row.tolist()}"


@pytest.mark.parametrize("length", [1, 2, 17])
def test_decay_mask_zero_rate(length):
    decay = las.decay_mask(length, torch.zeros(3))
    assert bool((decay == 1).all()), "alpha = 0 must give a decay of exactly 1 everywhere"


@settings(deadline=None, max_examples=50)
@given(
    heads=st.integers(1, 16),
    max_alpha=st.floats(1e-3, 1.0),
    ratio=st.floats(1e-3, 1.0),
)
def test_alpha_schedule(heads, max_alpha, ratio):
    min_alpha = max_alpha * ratio
    alphas = las.alpha_schedule(heads, max_alpha, min_alpha)
    assert alphas.shape == (heads,), f"schedule shape {tuple(alphas.shape)} for {heads} heads"
    assert alphas.dtype == torch.float32, f"schedule dtype {alphas.dtype}"
    assert alphas[0].item() == 0.0, f"first rate must be 0 (a global head), got {alphas[0].item()}"
    assert bool((alphas[1:] > 0).all()), f"local rates must be positive: {alphas.tolist()}"
    assert bool((alphas[1:] >= alphas[:-1]).all()), f"rates must not decrease: {alphas.tolist()}"
    limit = torch.tensor(max_alpha, dtype=torch.float32)
    assert bool((alphas <= limit).all()), f"rates exceed max_alpha = {max_alpha}: {alphas.tolist()}"
    if heads >= 2:
        assert alphas[-1].item() == pytest.approx(max_alpha, rel=1e-6), "last rate must be max_alpha"
    if heads >= 3:
        assert alphas[1].item() == pytest.approx(min_alpha, rel=1e-6), "second rate must be min_alpha"
        ratios = (alphas[2:].double() / alphas[1:-1].double()).numpy()
        np.testing.assert_allclose(ratios, ratios[0], rtol=1e-5, err_msg="rates are not evenly spaced in log space")
    assert torch.equal(alphas, las.alpha_schedule(heads, max_alpha, min_alpha)), "schedule is not deterministic"


def test_alpha_schedule_default_increasing():
    alphas = las.alpha_schedule(8)
    assert bool((alphas[1:] > alphas[:-1]).all()), f"default rates must increase strictly: {alphas.tolist()}"
    assert alphas[-1].item() == pytest.approx(las.DEFAULT_MAX_ALPHA), "last default rate"
    assert alphas[1].item() == pytest.approx(las.DEFAULT_MIN_ALPHA), "second default rate"


def test_alpha_schedule_zero_max():
    alphas = las.alpha_schedule(4, max_alpha=0.0)
    assert torch.equal(alphas, torch.zeros(4)), f"max_alpha = 0 must give all zeros, got {alphas.tolist()}"


# ----------------------------------------------------------------------------------------------------
# Smoothing


@settings(deadline=None, max_examples=60)
@given(
    length=st.integers(1, 40),
    pool_size=st.sampled_from([1, 3, 5, 7, 9]),
    is_causal=st.booleans(),
    rows=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_smooth_rows_matches_numpy(length, pool_size, is_causal, rows, seed):
    attn = torch.from_numpy(np.random.default_rng(seed).uniform(size=(rows, 2, length)))
    smoothed = las.smooth_rows(attn, pool_size, is_causal)
    assert smoothed.shape == attn.shape, f"smoothing changed the shape {tuple(attn.shape)} -> {tuple(smoothed.shape)}"
    np.testing.assert_allclose(
        smoothed.numpy(), numpy_smooth(attn.numpy(), pool_size, is_causal), rtol=1e-12, atol=1e-12,
        err_msg=f"smooth_rows(P={pool_size}, is_causal={is_causal}) differs from the pooling formula",
    )


@pytest.mark.parametrize("path", PATH_NAMES)
@pytest.mark.parametrize("length", [1, 2, 7, 64])
@pytest.mark.parametrize("pool_size", [1, 3, 5])
@pytest.mark.parametrize("is_causal", [False, True])
def test_pooling_keeps_length(path, length, pool_size, is_causal):
    attn = torch.rand(2, 3, length, length)
    value = torch.randn(2, 3, length, 4)
    rows = las.smooth_rows(attn, pool_size, is_causal)
    values = las.smooth_values(value, pool_size, is_causal)
    out = PATHS[path](value, value, value, torch.tensor([0.0, 0.1, 1.0]), pool_size=pool_size, is_causal=is_causal)
    assert rows.shape == attn.shape, f"smooth_rows: {tuple(attn.shape)} -> {tuple(rows.shape)}"
    assert values.shape == value.shape, f"smooth_values: {tuple(value.shape)} -> {tuple(values.shape)}"
    assert out.shape == value.shape, f"{path}: {tuple(value.shape)} -> {tuple(out.shape)}"


@pytest.mark.parametrize("pool_size", [0, -1, -3, 2, 4])
def test_pooling_rejects_pool_size(pool_size):
    value = torch.randn(1, 1, 4, 2)
    message = re.escape(str(pool_size))
    with pytest.raises(ValueError, match=f"pool_size.*{message}"):
        las.smooth_rows(torch.rand(4, 4), pool_size)
    with pytest.raises(ValueError, match=f"pool_size.*{message}"):
        las.smooth_values(value, pool_size)
    for path in PATH_NAMES:
        with pytest.raises(ValueError, match=f"pool_size.*{message}"):
            PATHS[path](value, value, value, torch.zeros(1), pool_size=pool_size)
    with pytest.raises(ValueError, match=f"pool_size.*{message}"):
        las.LaSAttention(8, 2, pool_size=pool_size)


def test_smooth_rows_edge_divisor():
    row = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    smoothed = las.smooth_rows(row, 3, is_causal=False)
    expected = torch.tensor([0.0, 0.0, 1 / 3, 1 / 3], dtype=torch.float64)
    assert torch.allclose(smoothed, expected, rtol=0, atol=1e-15), f"centred edge row {smoothed.tolist()}"
    # Causal: the window is j .. j+P-1, so the weight that falls off is at the left end.
    row = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    smoothed = las.smooth_rows(row, 3, is_causal=True)
    expected = torch.tensor([1 / 3, 0.0, 0.0, 0.0], dtype=torch.float64)
    assert torch.allclose(smoothed, expected, rtol=0, atol=1e-15), f"causal edge row {smoothed.tolist()}"


def _edge_divisor_inputs(is_causal: bool):
    """Return float32 inputs whose attention is one-hot on one key (last, or first when causal), L = 4.

    value is the identity, so output row i is smoothed attention row i.
    """
    target = 0 if is_causal else 3
    query = torch.ones(1, 1, 4, 1)
    key = torch.zeros(1, 1, 4, 1)
    key[..., target, 0] = 200.0  # score 200 against 0: exp(-200) rounds to 0 in float32
    value = torch.eye(4)[None, None]  # (1, 1, 4, 4)
    return query, key, value, torch.zeros(1)


@pytest.mark.parametrize("path", [*PATH_NAMES, "flex"])
def test_attention_edge_divisor(path):
    run = las.las_attention_flex if path == "flex" else PATHS[path]
    # Bidirectional: every row is one-hot on the last key, so every smoothed row is [0, 0, 1/3, 1/3].
    out = run(*_edge_divisor_inputs(False), pool_size=3, is_causal=False)
    expected = torch.tensor([0.0, 0.0, 1 / 3, 1 / 3]).expand(4, 4)
    torch.testing.assert_close(
        out[0, 0], expected, rtol=0, atol=1e-6, msg=lambda m: f"{path}, one-hot on the last key: {m}"
    )
    # Causal: every row is one-hot on key 0, so every smoothed row is [1/3, 0, 0, 0].
    out = run(*_edge_divisor_inputs(True), pool_size=3, is_causal=True)
    expected = torch.tensor([1 / 3, 0.0, 0.0, 0.0]).expand(4, 4)
    torch.testing.assert_close(
        out[0, 0], expected, rtol=0, atol=1e-6, msg=lambda m: f"{path}, causal one-hot on key 0: {m}"
    )


@settings(deadline=None, max_examples=60)
@given(
    length=st.integers(1, 40),
    pool_size=st.sampled_from([1, 3, 5, 7]),
    is_causal=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_smooth_rows_interior_sum(length, pool_size, is_causal, seed):
    # Weight at key k spreads over keys k-(P-1)/2 .. k+(P-1)/2 (centred) or k-P+1 .. k (causal).
    half = (pool_size - 1) // 2
    first, last = (pool_size - 1, length - 1) if is_causal else (half, length - 1 - half)
    rng = np.random.default_rng(seed)
    row = np.zeros((3, length))
    if first <= last:
        row[:, first : last + 1] = rng.uniform(size=(3, last + 1 - first))
    smoothed = las.smooth_rows(torch.from_numpy(row), pool_size, is_causal)
    np.testing.assert_allclose(
        smoothed.sum(-1).numpy(), row.sum(-1), rtol=1e-12, atol=1e-12,
        err_msg=f"an interior row lost weight (P={pool_size}, is_causal={is_causal})",
    )


@settings(deadline=None, max_examples=40)
@given(length=st.integers(1, 40), pool_size=st.sampled_from([1, 3, 5, 7]), seed=st.integers(0, 2**32 - 1))
def test_smooth_rows_causal_stays_lower(length, pool_size, seed):
    attn = torch.from_numpy(np.random.default_rng(seed).uniform(size=(2, length, length))).tril()
    smoothed = las.smooth_rows(attn, pool_size, is_causal=True)
    above = smoothed.triu(diagonal=1)
    assert bool((above == 0).all()), f"causal smoothing put weight beyond the diagonal (P={pool_size})"


@settings(deadline=None, max_examples=60)
@given(case=cases(max_length=40))
def test_smoothing_identity(case):
    _, _, value, _, mask = case.inputs(torch.float64)
    rng = np.random.default_rng(case.seed + 1)
    attn = torch.from_numpy(rng.uniform(size=(case.batch, case.heads, case.length, case.length)))
    left = attn @ las.smooth_values(value, case.pool_size, case.is_causal, key_padding_mask=mask)
    rows = las.smooth_rows(attn, case.pool_size, case.is_causal)
    if mask is not None:
        rows = rows.masked_fill(mask[:, None, None, :], 0.0)  # zero the padding columns
    right = rows @ value
    torch.testing.assert_close(
        left, right, rtol=1e-12, atol=1e-12, msg=lambda m: f"A @ smooth_values(V) != smooth_rows(A) @ V: {m}"
    )


# ----------------------------------------------------------------------------------------------------
# Causality and padding


@pytest.mark.parametrize("path", PATH_NAMES)
@settings(deadline=None, max_examples=40)
@with_examples(position=0)
@with_examples(position=3)
@given(case=cases(max_length=40, is_causal=True), position=st.integers(0, 39))
def test_causal_ignores_future(path, case, position):
    case = dataclasses.replace(case, is_causal=True)
    position = min(position, case.length - 1)
    q, k, v, alphas, mask = case.inputs(torch.float64)
    later = slice(position + 1, None)
    rng = np.random.default_rng(case.seed + 1)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for tensor in (q2, k2, v2):
        tensor[:, :, later] = torch.from_numpy(rng.standard_normal(tensor[:, :, later].shape)) * 10
    mask2 = None
    if mask is not None:
        mask2 = mask.clone()
        mask2[:, later] = torch.from_numpy(rng.uniform(size=mask2[:, later].shape) < 0.5)
    out = PATHS[path](q, k, v, alphas, key_padding_mask=mask, **case.options())
    out2 = PATHS[path](q2, k2, v2, alphas, key_padding_mask=mask2, **case.options())
    torch.testing.assert_close(
        out2[:, :, : position + 1], out[:, :, : position + 1], rtol=0, atol=1e-12,
        msg=lambda m: f"{path}: inputs after position {position} changed outputs up to it: {m}",
    )


@pytest.mark.parametrize("path", PATH_NAMES)
@pytest.mark.parametrize("pool_size", [1, 3, 5])
def test_causal_future_every_position(path, pool_size):
    length = 12
    generator = torch.Generator().manual_seed(pool_size)
    q, k, v = (torch.randn(2, 2, length, 4, generator=generator, dtype=torch.float64) for _ in range(3))
    alphas = torch.tensor([0.0, 0.5])
    out = PATHS[path](q, k, v, alphas, pool_size=pool_size, is_causal=True)
    for position in range(length):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for tensor in (q2, k2, v2):
            tensor[:, :, position + 1 :] = torch.randn(tensor[:, :, position + 1 :].shape, generator=generator)
        out2 = PATHS[path](q2, k2, v2, alphas, pool_size=pool_size, is_causal=True)
        torch.testing.assert_close(
            out2[:, :, : position + 1], out[:, :, : position + 1], rtol=0, atol=1e-12,
            msg=lambda m: f"{path}, P={pool_size}: inputs after {position} changed outputs up to it: {m}",
        )


@pytest.mark.parametrize("path", PATH_NAMES)
@settings(deadline=None, max_examples=40)
@with_examples(extra=1)
@given(case=cases(max_length=40), extra=st.integers(1, 9))
def test_right_padding_keeps_outputs(path, case, extra):
    q, k, v, alphas, mask = case.inputs(torch.float64)
    out = PATHS[path](q, k, v, alphas, key_padding_mask=mask, **case.options())
    rng = np.random.default_rng(case.seed + 1)
    padded_shape = (case.batch, case.heads, case.length + extra, case.dim)
    q2, k2, v2 = (torch.from_numpy(rng.standard_normal(padded_shape)) * 100 for _ in range(3))
    for padded, original in ((q2, q), (k2, k), (v2, v)):
        padded[:, :, : case.length] = original
    mask2 = torch.ones(case.batch, case.length + extra, dtype=torch.bool)
    mask2[:, : case.length] = False if mask is None else mask
    out2 = PATHS[path](q2, k2, v2, alphas, key_padding_mask=mask2, **case.options())
    real = real_positions(mask, case.batch, case.length)
    torch.testing.assert_close(
        at_real(out2[:, :, : case.length], real), at_real(out, real), rtol=1e-12, atol=1e-12,
        msg=lambda m: f"{path}: {extra} padding positions on the right changed real outputs: {m}",
    )


@pytest.mark.parametrize("path", PATH_NAMES)
@pytest.mark.parametrize("is_causal", [False, True])
def test_padding_nan_keeps_gradients_finite(path, is_causal):
    # NaN stored at padding in q, k and v must not reach any gradient through 0 * NaN in backward.
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 6, 4, generator=generator) for _ in range(3))
    mask = torch.tensor([[False] * 4 + [True] * 2, [False] * 6])
    padding = mask[:, None, :, None].expand_as(q)
    q, k, v = (t.masked_fill(padding, float("nan")).requires_grad_() for t in (q, k, v))

    out = PATHS[path](q, k, v, torch.tensor([0.0, 0.5]), key_padding_mask=mask, is_causal=is_causal)
    out[~padding].sum().backward()

    for name, tensor in (("query", q), ("key", k), ("value", v)):
        assert bool(tensor.grad.isfinite().all()), f"{path}: NaN at padding reached the gradient of {name}"


@pytest.mark.parametrize("path", PATH_NAMES)
@pytest.mark.parametrize("poison", [float("nan"), 1e6])
@settings(deadline=None, max_examples=30)
@with_examples()
@given(case=cases(max_length=40))
def test_padding_values_never_leak(path, poison, case):
    q, k, v, alphas, mask = case.inputs(torch.float32)
    if mask is None:
        mask = torch.zeros(case.batch, case.length, dtype=torch.bool)
        mask[:, -1] = True
    clean = PATHS[path](q, k, v, alphas, key_padding_mask=mask, **case.options())
    padding = mask[:, None, :, None].expand_as(q)
    q2, k2, v2 = (tensor.masked_fill(padding, poison) for tensor in (q, k, v))
    out = PATHS[path](q2, k2, v2, alphas, key_padding_mask=mask, **case.options())
    real = ~mask
    assert bool(at_real(out, real).isfinite().all()), f"{path}: {poison} at padding reached a real output"
    torch.testing.assert_close(
        at_real(out, real), at_real(clean, real), rtol=1e-6, atol=1e-6,
        msg=lambda m: f"{path}: {poison} stored at padding changed real outputs: {m}",
    )


def test_fully_masked_rows_are_zero():
    # Real lengths [5, 2, 0] padded to 5; sample 2 is all padding.
    lengths = torch.tensor([5, 2, 0])
    mask = torch.arange(5)[None, :] >= lengths[:, None]  # (3, 5)
    generator = torch.Generator().manual_seed(0)
    for path in PATH_NAMES:
        for is_causal in (False, True):
            q, k, v = (
                torch.randn(3, 2, 5, 4, generator=generator, requires_grad=True) for _ in range(3)
            )
            alphas = torch.tensor([0.0, 1.0])
            out = PATHS[path](q, k, v, alphas, key_padding_mask=mask, pool_size=3, is_causal=is_causal)
            label = f"{path}, is_causal={is_causal}"
            assert bool(out.isfinite().all()), f"{label}: output is not finite"
            assert bool((out[2] == 0).all()), f"{label}: the all-padding sample must output zeros"
            out.square().sum().backward()
            for name, tensor in (("query", q), ("key", k), ("value", v)):
                assert bool(tensor.grad.isfinite().all()), f"{label}: {name} gradient is not finite"
                assert bool((tensor.grad[2] == 0).all()), f"{label}: {name} gradient of the padding sample"


def test_fully_masked_sample_keeps_loss():
    lengths = torch.tensor([5, 2, 0])
    mask = torch.arange(5)[None, :] >= lengths[:, None]  # (3, 5)
    generator = torch.Generator().manual_seed(1)
    base = [torch.randn(3, 2, 5, 4, generator=generator, dtype=torch.float64) for _ in range(3)]
    alphas = torch.tensor([0.0, 1.0])
    for path in PATH_NAMES:
        for is_causal in (False, True):
            label = f"{path}, is_causal={is_causal}"
            losses, grads = [], []
            for batch in (2, 3):
                inputs = [tensor[:batch].clone().requires_grad_() for tensor in base]
                out = PATHS[path](*inputs, alphas, key_padding_mask=mask[:batch], pool_size=3, is_causal=is_causal)
                loss = out[:2].square().sum()
                loss.backward()
                losses.append(loss.item())
                grads.append([tensor.grad[:2] for tensor in inputs])
            assert losses[1] == pytest.approx(losses[0], rel=1e-12), f"{label}: all-padding sample changed the loss"
            for name, without, with_padding in zip(("query", "key", "value"), *grads):
                torch.testing.assert_close(
                    with_padding, without, rtol=1e-12, atol=1e-12,
                    msg=lambda m: f"{label}: all-padding sample changed the {name} gradient: {m}",
                )


@pytest.mark.parametrize("path", PATH_NAMES)
def test_left_padding_causal_first_rows(path):
    # Causal, left padding [T, T, F, F, F]: queries 0 and 1 see only padding keys.
    mask = torch.tensor([[True, True, False, False, False]])
    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 5, 3, generator=generator, requires_grad=True) for _ in range(3))
    out = PATHS[path](q, k, v, torch.tensor([0.0, 1.0]), key_padding_mask=mask, pool_size=3, is_causal=True)
    assert bool(out.isfinite().all()), "output is not finite"
    assert bool((out[:, :, :2] == 0).all()), f"rows with only padding keys must be zeros: {out[:, :, :2].tolist()}"
    out.sum().backward()
    for name, tensor in (("query", q), ("key", k), ("value", v)):
        assert bool(tensor.grad.isfinite().all()), f"{name} gradient is not finite"


# ----------------------------------------------------------------------------------------------------
# Gradients


GRADCHECK_CASES = [
    # (is_causal, padding lengths or None, chunk_size, pool_size)
    (False, None, None, 3),
    (True, None, None, 3),
    (False, (4, 0), None, 3),
    (True, (4, 2), None, 5),
    (True, (6, 0), 4, 3),
    (False, (5, 3), 2, 1),
]


@pytest.mark.parametrize("path", PATH_NAMES)
@pytest.mark.parametrize("is_causal, lengths, chunk_size, pool_size", GRADCHECK_CASES)
def test_gradcheck(path, is_causal, lengths, chunk_size, pool_size):
    generator = torch.Generator().manual_seed(3)
    q, k, v = (
        torch.randn(2, 2, 6, 3, generator=generator, dtype=torch.float64, requires_grad=True) for _ in range(3)
    )
    alphas = torch.tensor([0.0, 0.7], dtype=torch.float64)
    mask = None if lengths is None else torch.arange(6)[None, :] >= torch.tensor(lengths)[:, None]

    def attention(query, key, value):
        return PATHS[path](
            query, key, value, alphas, key_padding_mask=mask, pool_size=pool_size, is_causal=is_causal,
            chunk_size=chunk_size,
        )

    assert torch.autograd.gradcheck(attention, (q, k, v)), f"{path}: gradcheck failed"


# ----------------------------------------------------------------------------------------------------
# Plain attention and low precision


def allowed_keys_mask(case: Case, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Return (B, 1, L, L) bool, True where query i may attend to key j: real, causal and same chunk."""
    position = torch.arange(case.length)
    allowed = torch.ones(case.batch, 1, case.length, case.length, dtype=torch.bool)
    if mask is not None:
        allowed = allowed & ~mask[:, None, None, :]
    if case.is_causal:
        allowed = allowed & (position[None, :] <= position[:, None])
    if case.chunk_size is not None:
        chunk = position // case.chunk_size
        allowed = allowed & (chunk[None, :] == chunk[:, None])
    return allowed


@pytest.mark.parametrize("path", PATH_NAMES)
@settings(deadline=None, max_examples=40)
@with_examples()
@given(case=cases())
def test_zero_rates_match_sdpa(path, case):
    case = dataclasses.replace(case, pool_size=1, alphas=(0.0,) * case.heads)
    q, k, v, alphas, mask = case.inputs(torch.float32)
    out = PATHS[path](q, k, v, alphas, key_padding_mask=mask, **case.options())
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed_keys_mask(case, mask), scale=case.scale)
    # A real query always attends to itself, so its row is never empty (SDPA returns NaN for empty rows).
    real = real_positions(mask, case.batch, case.length)
    torch.testing.assert_close(
        at_real(out, real), at_real(expected, real), rtol=1e-5, atol=1e-5,
        msg=lambda m: f"{path} with alphas 0 and P = 1 differs from scaled_dot_product_attention: {m}",
    )


@pytest.mark.parametrize("path", PATH_NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("is_causal", [False, True])
def test_low_precision_decay_underflow(path, dtype, is_causal):
    # alpha = 1 makes the decay exactly 0 in float16 beyond |i - j| of about 17, next to -inf masks.
    generator = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 32, 8, generator=generator) for _ in range(3))
    alphas = torch.tensor([0.0, 1.0])
    mask = torch.zeros(2, 32, dtype=torch.bool)
    mask[:, -8:] = True
    out = PATHS[path](
        q.to(dtype), k.to(dtype), v.to(dtype), alphas, key_padding_mask=mask, pool_size=3, is_causal=is_causal
    )
    assert out.dtype == dtype, f"output dtype {out.dtype}, inputs are {dtype}"
    assert bool(out.isfinite().all()), f"{path} in {dtype} is not finite"
    # float64 on the rounded inputs, so the tolerance covers the arithmetic and not the input rounding
    expected = numpy_las(
        q.to(dtype).double().numpy(), k.to(dtype).double().numpy(), v.to(dtype).double().numpy(),
        alphas.numpy(), pool_size=3, is_causal=is_causal, padding=mask.numpy(),
    )
    np.testing.assert_allclose(
        out.double().numpy(), expected, rtol=0, atol=2e-2, err_msg=f"{path} in {dtype} vs float64"
    )


@pytest.mark.parametrize("path", PATH_NAMES)
@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
@settings(deadline=None, max_examples=20)
@example(case=Case(2, 1, 1, 4, 1, False, (0.0,), scale=2.0))
@given(case=cases(max_length=64))
def test_low_precision_close_to_fp32(path, dtype, tolerance, case):
    # L = 64 and alpha = 1: the decay is exactly 0 in float16 beyond |i - j| of about 17.
    case = dataclasses.replace(case, length=64, heads=2, alphas=(0.0, 1.0), scale=None)
    q, k, v, alphas, mask = case.inputs(dtype)
    out = PATHS[path](q, k, v, alphas, key_padding_mask=mask, **case.options())
    # float32 on the same rounded inputs, so only the arithmetic differs
    reference = PATHS[path](q.float(), k.float(), v.float(), alphas, key_padding_mask=mask, **case.options())
    assert out.dtype == dtype, f"output dtype {out.dtype}, inputs are {dtype}"
    real = real_positions(mask, case.batch, case.length)
    assert bool(at_real(out, real).isfinite().all()), f"{path} in {dtype} is not finite"
    torch.testing.assert_close(
        at_real(out, real).float(), at_real(reference, real), rtol=tolerance, atol=tolerance,
        msg=lambda m: f"{path} in {dtype} differs from float32: {m}",
    )


# ----------------------------------------------------------------------------------------------------
# Chunks


@pytest.mark.parametrize("path", PATH_NAMES)
@settings(deadline=None, max_examples=40)
@with_examples(extra=0)
@given(case=cases(), extra=st.integers(0, 5))
def test_chunk_covering_is_full(path, case, extra):
    q, k, v, alphas, mask = case.inputs(torch.float64)
    options = case.options()
    options.pop("chunk_size")
    full = PATHS[path](q, k, v, alphas, key_padding_mask=mask, **options)
    chunked = PATHS[path](q, k, v, alphas, key_padding_mask=mask, chunk_size=case.length + extra, **options)
    torch.testing.assert_close(
        chunked, full, rtol=0, atol=1e-12,
        msg=lambda m: f"{path}: chunk_size = L + {extra} differs from full LaS: {m}",
    )


@pytest.mark.parametrize("path", PATH_NAMES)
@pytest.mark.parametrize("chunk_size", [1, 4, 7])
@pytest.mark.parametrize("is_causal", [False, True])
def test_chunks_are_independent(path, chunk_size, is_causal):
    generator = torch.Generator().manual_seed(chunk_size)
    alphas = torch.tensor([0.0, 0.3, 2.0], dtype=torch.float64)
    for length in sorted({1, max(chunk_size - 1, 1), chunk_size, chunk_size + 1, 2 * chunk_size + 3}):
        q, k, v = (torch.randn(2, 3, length, 5, generator=generator, dtype=torch.float64) for _ in range(3))
        mask = torch.rand(2, length, generator=generator) < 0.3
        options = dict(pool_size=5, is_causal=is_causal)
        chunked = PATHS[path](q, k, v, alphas, key_padding_mask=mask, chunk_size=chunk_size, **options)
        for start in range(0, length, chunk_size):
            part = slice(start, start + chunk_size)
            alone = PATHS[path](
                q[:, :, part], k[:, :, part], v[:, :, part], alphas, key_padding_mask=mask[:, part], **options
            )
            torch.testing.assert_close(
                chunked[:, :, part], alone, rtol=0, atol=1e-12,
                msg=lambda m: f"{path}, L={length}, C={chunk_size}: chunk at {start} differs from LaS on it alone: {m}",
            )


@pytest.mark.parametrize("path", PATH_NAMES)
@pytest.mark.parametrize("is_causal", [False, True])
def test_chunk_tail_bfloat16(path, is_causal):
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 100, 8, generator=generator).bfloat16() for _ in range(3))
    alphas = torch.tensor([0.0, 1.0])
    out = PATHS[path](q, k, v, alphas, chunk_size=64, pool_size=3, is_causal=is_causal)
    assert out.shape == q.shape, f"output shape {tuple(out.shape)}"
    assert bool(out.isfinite().all()), f"{path}: the padded tail chunk gives non-finite outputs in bfloat16"
    reference = numpy_las(
        q.double().numpy(), k.double().numpy(), v.double().numpy(), alphas.numpy(), pool_size=3,
        is_causal=is_causal, chunk_size=64,
    )
    np.testing.assert_allclose(out.double().numpy(), reference, rtol=0, atol=5e-2, err_msg=f"{path} in bfloat16")


# ----------------------------------------------------------------------------------------------------
# Dropout


@pytest.mark.parametrize("path", PATH_NAMES)
@pytest.mark.parametrize("is_causal", [False, True])
def test_dropout_before_smoothing(path, is_causal):
    # Every attention row is one-hot on key 6, and value is I, so output row i is attention row i.
    # Dropout on the probabilities keeps or drops the one-hot entry as a whole. Each row is therefore
    # either 0 or the smoothed one-hot scaled by 1 / (1 - p). Dropout after smoothing would instead
    # drop single entries of the window.
    length, target, pool_size, p = 12, 6, 3, 0.5
    query = torch.ones(8, 2, length, 1, dtype=torch.float64)
    key = torch.zeros(8, 2, length, 1, dtype=torch.float64)
    key[..., target, 0] = 200.0
    value = torch.eye(length, dtype=torch.float64).expand(8, 2, length, length)
    torch.manual_seed(6)
    out = PATHS[path](
        query, key, value, torch.zeros(2, dtype=torch.float64), pool_size=pool_size, is_causal=is_causal,
        dropout_p=p,
    )
    rows = out[:, :, target:].reshape(-1, length)  # rows that can see the target key
    window = list(range(target - pool_size + 1, target + 1)) if is_causal else [target - 1, target, target + 1]
    kept = 1 / (pool_size * (1 - p))
    full = torch.zeros(length, dtype=torch.float64)
    full[window] = kept
    is_zero = (rows.abs() < 1e-12).all(dim=-1)
    is_full = torch.isclose(rows, full.expand_as(rows), rtol=0, atol=1e-12).all(dim=-1)
    assert bool((is_zero | is_full).all()), f"{path}: a row is neither dropped nor whole: {rows[~(is_zero | is_full)][:2]}"
    assert bool(is_zero.any()), f"{path}: dropout_p = {p} dropped no row"
    assert bool(is_full.any()), f"{path}: dropout_p = {p} dropped every row"


# ----------------------------------------------------------------------------------------------------
# Modules


def _masked_inputs(batch=3, length=10, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, dim, generator=generator)
    lengths = torch.tensor([length, length - 3, 1][:batch])
    mask = torch.arange(length)[None, :] >= lengths[:, None]  # (B, L)
    return x, mask


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_modules_shapes(is_causal, chunk_size):
    x, mask = _masked_inputs()
    attention = las.LaSAttention(16, 4, is_causal=is_causal, chunk_size=chunk_size)
    block = las.LaSBlock(16, 4, is_causal=is_causal, chunk_size=chunk_size)
    for name, module in (("LaSAttention", attention), ("LaSBlock", block)):
        for key_padding_mask in (None, mask):
            out = module(x, key_padding_mask)
            assert out.shape == x.shape, f"{name}: {tuple(x.shape)} -> {tuple(out.shape)}"
            assert bool(out.isfinite().all()), f"{name}: output is not finite"


@pytest.mark.parametrize("dim, num_heads", [(16, 4), (12, 3), (8, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_attention_parameter_count(dim, num_heads, bias):
    def count(module):
        return sum(parameter.numel() for parameter in module.parameters())

    module = las.LaSAttention(dim, num_heads, bias=bias)
    baseline = nn.MultiheadAttention(dim, num_heads, bias=bias)
    assert count(module) == count(baseline), f"{count(module)} parameters, nn.MultiheadAttention has {count(baseline)}"
    names = [name for name, _ in module.named_parameters()]
    assert "alphas" not in names, "the decay rates must be a buffer, not a parameter"
    assert "alphas" in dict(module.named_buffers()), "the decay rates must be a buffer named alphas"


@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_block_state_dict_roundtrip(norm):
    x, mask = _masked_inputs()
    torch.manual_seed(7)
    block = las.LaSBlock(16, 4, norm=norm, max_alpha=0.5).eval()
    torch.manual_seed(8)
    restored = las.LaSBlock(16, 4, norm=norm, max_alpha=0.2).eval()
    restored.load_state_dict(block.state_dict())
    assert torch.equal(restored.attention.alphas, block.attention.alphas), "alphas not restored from the state_dict"
    assert torch.equal(restored(x, mask), block(x, mask)), "restored block gives different outputs"


def test_attention_state_dict_roundtrip():
    x, mask = _masked_inputs()
    torch.manual_seed(9)
    module = las.LaSAttention(16, 4, max_alpha=0.5)
    torch.manual_seed(10)
    restored = las.LaSAttention(16, 4)
    restored.load_state_dict(module.state_dict())
    assert torch.equal(restored(x, mask), module(x, mask)), "restored LaSAttention gives different outputs"


def _randomize_batch_norm(block):
    generator = torch.Generator().manual_seed(11)
    for norm in (block.norm1, block.norm2):
        norm.running_mean.copy_(torch.randn(norm.num_features, generator=generator))
        norm.running_var.copy_(torch.rand(norm.num_features, generator=generator) + 0.5)


@pytest.mark.parametrize("is_causal", [False, True])
def test_batch_norm_block_eval_padding(is_causal):
    x, mask = _masked_inputs()
    torch.manual_seed(12)
    block = las.LaSBlock(16, 4, norm="batch", is_causal=is_causal).eval()
    _randomize_batch_norm(block)
    batch_out = block(x, mask)
    for sample in range(x.shape[0]):
        length = int((~mask[sample]).sum())
        alone = block(x[sample : sample + 1, :length])
        torch.testing.assert_close(
            batch_out[sample, :length], alone[0], rtol=1e-5, atol=1e-5,
            msg=lambda m: f"sample {sample} alone differs from inside the padded batch: {m}",
        )


@pytest.mark.parametrize("is_causal", [False, True])
def test_batch_norm_block_train_padding(is_causal):
    generator = torch.Generator().manual_seed(13)
    x = torch.randn(1, 7, 16, generator=generator)
    padded = torch.cat([x, 1e3 * torch.randn(1, 4, 16, generator=generator)], dim=1)  # (1, 11, 16)
    mask = torch.arange(11)[None, :] >= 7
    torch.manual_seed(14)
    block = las.LaSBlock(16, 4, norm="batch", is_causal=is_causal).train()
    padded_block = copy.deepcopy(block)
    alone = block(x)
    inside = padded_block(padded, mask)
    torch.testing.assert_close(
        inside[:, :7], alone, rtol=1e-5, atol=1e-5,
        msg=lambda m: f"training-mode batch norm: the example alone and right-padded differ: {m}",
    )
    # The running statistics must also come from the real positions only.
    for name in ("norm1", "norm2"):
        for statistic in ("running_mean", "running_var"):
            torch.testing.assert_close(
                getattr(getattr(padded_block, name), statistic), getattr(getattr(block, name), statistic),
                rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}.{statistic} after a padded batch: {m}",
            )


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_batch_norm_matches_batch_norm(momentum, dtype):
    """Training on a padded batch equals nn.BatchNorm1d on the real rows: outputs, gradients, statistics."""
    generator = torch.Generator().manual_seed(17)
    x = (torch.randn(3, 5, 4, generator=generator) * 3 + 2).to(dtype)
    mask = torch.arange(5)[None, :] >= torch.tensor([5, 1, 3])[:, None]  # (3, 5)
    x = x.masked_fill(mask[..., None], float("nan"))
    weighting = torch.randn(3, 5, 4, generator=generator).to(dtype)
    masked = las.MaskedBatchNorm1d(4, momentum=momentum).to(dtype).train()
    plain = nn.BatchNorm1d(4, momentum=momentum).to(dtype).train()
    with torch.no_grad():
        for norm in (masked, plain):
            norm.weight.copy_(torch.tensor([0.5, 1.0, 2.0, -1.0]))
            norm.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for _ in range(2):  # two steps, so that the momentum=None average covers more than one batch
        masked.zero_grad()
        plain.zero_grad()
        out, grad = _batch_norm_step(masked, x, mask, weighting)
        rows = x[~mask].clone().requires_grad_(True)
        expected = plain(rows)
        (expected * weighting[~mask]).sum().backward()
        torch.testing.assert_close(out[~mask], expected.detach(), **tolerance)
        torch.testing.assert_close(grad[~mask], rows.grad, **tolerance)
        assert torch.all(out[mask] == 0), "padding positions must output 0"
        assert torch.all(grad[mask] == 0), "NaN at padding must not reach the gradient"
        for name in ("weight", "bias"):
            torch.testing.assert_close(getattr(masked, name).grad, getattr(plain, name).grad, **tolerance)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(masked, name), getattr(plain, name), **tolerance)


@pytest.mark.parametrize("real_lengths", [[0, 0], [1, 0]])
def test_masked_batch_norm_few_positions(real_lengths):
    """Fewer than two real positions give no variance, so the running statistics stay as they were."""
    x = torch.randn(2, 3, 4)
    mask = torch.arange(3)[None, :] >= torch.tensor(real_lengths)[:, None]
    norm = las.MaskedBatchNorm1d(4).train()
    out = norm(x, mask)
    assert torch.all(out.isfinite())
    assert torch.equal(norm.running_mean, torch.zeros(4))
    assert torch.equal(norm.running_var, torch.ones(4))


def test_masked_batch_norm_eval_nan_padding():
    """NaN stored at padding reaches neither the output nor any gradient in eval mode."""
    x, mask, weighting = _sync_batch_norm_inputs()
    x = x.masked_fill(mask[..., None], float("nan"))
    norm = las.MaskedBatchNorm1d(3).eval()
    out, grad = _batch_norm_step(norm, x, mask, weighting)
    assert torch.all(out.isfinite())
    assert torch.all(grad.isfinite())
    assert torch.all(norm.weight.grad.isfinite())
    assert torch.all(norm.bias.grad.isfinite())


def test_masked_norm_eval_batch_statistics():
    """track_running_stats=False normalizes with batch statistics in eval mode too, from real rows only."""
    x, mask, _ = _sync_batch_norm_inputs()
    masked = las.MaskedBatchNorm1d(3, track_running_stats=False).eval()
    plain = nn.BatchNorm1d(3, track_running_stats=False).eval()
    torch.testing.assert_close(masked(x, mask)[~mask], plain(x[~mask]), rtol=1e-5, atol=1e-5)


def _sync_batch_norm_inputs():
    """Four examples of different lengths, padding filled with 1e3, a fixed output weighting."""
    generator = torch.Generator().manual_seed(16)
    x = torch.randn(4, 6, 3, generator=generator) * 2 + 1
    mask = torch.arange(6)[None, :] >= torch.tensor([6, 2, 5, 3])[:, None]  # (4, 6)
    x = x.masked_fill(mask[..., None], 1e3)
    return x, mask, torch.randn(4, 6, 3, generator=generator)


def _batch_norm_step(norm, x, mask, weighting):
    x = x.clone().requires_grad_(True)
    out = norm(x, mask)
    (out * weighting).sum().backward()
    return out.detach(), x.grad


def _sync_batch_norm_worker(rank, world, init_file, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=60))
    try:
        x, mask, weighting = _sync_batch_norm_inputs()
        norm = las.MaskedBatchNorm1d(3, sync=True).train()
        with torch.no_grad():
            norm.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
            norm.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        half = slice(2 * rank, 2 * rank + 2)
        out, grad = _batch_norm_step(norm, x[half], mask[half], weighting[half])
        parameter_grads = torch.cat([norm.weight.grad, norm.bias.grad])
        # Each process's loss is its share of one sum, so the parameter gradients add up over processes.
        torch.distributed.all_reduce(parameter_grads)
        # Eval mode never communicates, even with batch statistics: the processes may call it unevenly.
        evaluating = las.MaskedBatchNorm1d(3, sync=True, track_running_stats=False).eval()
        eval_outs = [evaluating(x[half], mask[half]).detach() for _ in range(rank + 1)]
        torch.save({"out": out, "grad": grad, "parameter_grads": parameter_grads,
                    "running_mean": norm.running_mean, "running_var": norm.running_var, "eval_outs": eval_outs},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_sync_batch_norm_matches_one_process(tmp_path):
    """Two processes with two examples each normalize, and differentiate, like one process with four."""
    x, mask, weighting = _sync_batch_norm_inputs()
    norm = las.MaskedBatchNorm1d(3).train()
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        norm.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    out, grad = _batch_norm_step(norm, x, mask, weighting)
    parameter_grads = torch.cat([norm.weight.grad, norm.bias.grad])

    torch.multiprocessing.spawn(_sync_batch_norm_worker, args=(2, tmp_path / "init", tmp_path), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), out, **close)
    torch.testing.assert_close(torch.cat([r["grad"] for r in ranks]), grad, **close)
    for result in ranks:
        torch.testing.assert_close(result["parameter_grads"], parameter_grads, **close)
        torch.testing.assert_close(result["running_mean"], norm.running_mean, **close)
        torch.testing.assert_close(result["running_var"], norm.running_var, **close)
    assert torch.all(ranks[0]["out"][1, 2:] == 0), "padding positions must stay zero"
    for rank, result in enumerate(ranks):
        half = slice(2 * rank, 2 * rank + 2)
        local = las.MaskedBatchNorm1d(3, track_running_stats=False).eval()(x[half], mask[half])
        assert len(result["eval_outs"]) == rank + 1
        for eval_out in result["eval_outs"]:
            torch.testing.assert_close(eval_out, local.detach(), **close)


def test_sync_batch_norm_without_group():
    x, mask, weighting = _sync_batch_norm_inputs()
    plain = las.MaskedBatchNorm1d(3).train()
    block = las.convert_sync_batch_norm(las.LaSBlock(3, 1, norm="batch"))
    assert block.norm1.sync and block.norm2.sync
    synced = block.norm1
    assert torch.equal(_batch_norm_step(synced, x, mask, weighting)[1], _batch_norm_step(plain, x, mask, weighting)[1])
    assert torch.equal(synced.running_var, plain.running_var)


@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_block_eval_deterministic(norm):
    x, mask = _masked_inputs()
    torch.manual_seed(15)
    block = las.LaSBlock(16, 4, norm=norm, dropout=0.5, attention_dropout=0.5)
    block.train()
    assert not torch.equal(block(x, mask), block(x, mask)), "dropout 0.5 in training mode changed nothing"
    block.eval()
    first = block(x, mask)
    second = block(x, mask)
    assert torch.equal(first, second), "eval mode with dropout > 0 is not deterministic"


def test_attention_eval_deterministic():
    x, mask = _masked_inputs()
    torch.manual_seed(16)
    module = las.LaSAttention(16, 4, dropout=0.5).train()
    assert not torch.equal(module(x, mask), module(x, mask)), "attention dropout 0.5 in training mode changed nothing"
    module.eval()
    assert torch.equal(module(x, mask), module(x, mask)), "eval-mode LaSAttention with dropout > 0 varies"


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("backend", ["eager", "reference"])
def test_plain_attention_module(is_causal, backend):
    x, mask = _masked_inputs()
    batch, length, dim = x.shape
    heads, head_dim = 4, dim // 4
    torch.manual_seed(17)
    module = las.LaSAttention(dim, heads, max_alpha=0.0, pool_size=1, is_causal=is_causal, backend=backend)
    module = module.double()
    x = x.double()
    out = module(x, mask)

    # the same weights, by hand: project, split heads, softmax attention, merge, project
    q, k, v = (x @ module.in_proj.weight.T + module.in_proj.bias).split(dim, dim=-1)  # 3 x (B, L, dim)
    q, k, v = (t.view(batch, length, heads, head_dim).transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
    scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)  # (B, H, L, L)
    allowed = ~mask[:, None, None, :]
    if is_causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool).tril()
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    manual = (weights @ v).transpose(1, 2).reshape(batch, length, dim) @ module.out_proj.weight.T
    manual = manual + module.out_proj.bias
    torch.testing.assert_close(out, manual, rtol=1e-10, atol=1e-10, msg=lambda m: f"manual attention: {m}")

    # and nn.MultiheadAttention loaded with the same weights
    baseline = nn.MultiheadAttention(dim, heads, batch_first=True).double()
    baseline.in_proj_weight.data.copy_(module.in_proj.weight)
    baseline.in_proj_bias.data.copy_(module.in_proj.bias)
    baseline.out_proj.weight.data.copy_(module.out_proj.weight)
    baseline.out_proj.bias.data.copy_(module.out_proj.bias)
    causal_mask = torch.ones(length, length, dtype=torch.bool).triu(1) if is_causal else None
    expected, _ = baseline(x, x, x, key_padding_mask=mask, attn_mask=causal_mask, need_weights=False)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10, msg=lambda m: f"nn.MultiheadAttention: {m}")


# ----------------------------------------------------------------------------------------------------
# Invalid arguments


def _qkv(shape=(2, 2, 5, 4)):
    return torch.randn(shape), torch.randn(shape), torch.randn(shape)


INVALID_CALLS = [
    # (test id, keyword overrides, error type, words the message must contain)
    ("alphas too long", dict(alphas=torch.zeros(3)), ValueError, ["alphas", "(3,)"]),
    ("alphas 2-D", dict(alphas=torch.zeros(1, 2)), ValueError, ["alphas", "(1, 2)"]),
    ("alphas negative", dict(alphas=torch.tensor([0.0, -0.5])), ValueError, ["alphas", "-0.5"]),
    ("mask too long", dict(key_padding_mask=torch.zeros(2, 6, dtype=torch.bool)), ValueError, ["key_padding_mask", "(2, 6)"]),
    ("mask 1-D", dict(key_padding_mask=torch.zeros(5, dtype=torch.bool)), ValueError, ["key_padding_mask", "(5,)"]),
    ("mask float", dict(key_padding_mask=torch.zeros(2, 5)), TypeError, ["key_padding_mask", "torch.float32"]),
    ("mask int", dict(key_padding_mask=torch.zeros(2, 5, dtype=torch.long)), TypeError, ["key_padding_mask", "torch.int64"]),
    ("chunk 0", dict(chunk_size=0), ValueError, ["chunk_size", "0"]),
    ("chunk negative", dict(chunk_size=-4), ValueError, ["chunk_size", "-4"]),
    ("pool even", dict(pool_size=2), ValueError, ["pool_size", "2"]),
    ("pool zero", dict(pool_size=0), ValueError, ["pool_size", "0"]),
    ("pool float", dict(pool_size=3.0), TypeError, ["pool_size", "3.0"]),
    ("dropout 1", dict(dropout_p=1.0), ValueError, ["dropout_p", "1.0"]),
    ("causal int", dict(is_causal=1), TypeError, ["is_causal", "int"]),
]


@pytest.mark.parametrize("path", PATH_NAMES)
@pytest.mark.parametrize(
    "overrides, error, words", [case[1:] for case in INVALID_CALLS], ids=[case[0] for case in INVALID_CALLS]
)
def test_attention_rejects_argument(path, overrides, error, words):
    q, k, v = _qkv()
    arguments = dict(alphas=torch.zeros(2))
    arguments.update(overrides)
    alphas = arguments.pop("alphas")
    with pytest.raises(error) as raised:
        PATHS[path](q, k, v, alphas, **arguments)
    for word in words:
        assert word in str(raised.value), f"message does not name {word!r}: {raised.value}"


@pytest.mark.parametrize("path", PATH_NAMES)
@pytest.mark.parametrize(
    "shapes, words",
    [
        (((2, 2, 5, 4), (2, 2, 6, 4), (2, 2, 6, 4)), ["query", "key", "(2, 2, 5, 4)", "(2, 2, 6, 4)"]),
        (((2, 2, 5, 4), (2, 2, 5, 3), (2, 2, 5, 4)), ["query", "key", "(2, 2, 5, 3)"]),
        (((2, 2, 5, 4), (2, 2, 5, 4), (2, 2, 4, 4)), ["value", "(2, 2, 4, 4)"]),
        (((2, 5, 4), (2, 5, 4), (2, 5, 4)), ["query", "(2, 5, 4)"]),
    ],
    ids=["key length", "key dim", "value length", "3-D"],
)
def test_attention_rejects_shapes(path, shapes, words):
    q, k, v = (torch.randn(shape) for shape in shapes)
    with pytest.raises(ValueError) as raised:
        PATHS[path](q, k, v, torch.zeros(2))
    for word in words:
        assert word in str(raised.value), f"message does not name {word!r}: {raised.value}"


@pytest.mark.parametrize(
    "arguments, words",
    [
        (dict(dim=10, num_heads=4), ["dim", "num_heads", "10", "4"]),
        (dict(dim=16, num_heads=4, pool_size=4), ["pool_size", "4"]),
        (dict(dim=16, num_heads=4, chunk_size=0), ["chunk_size", "0"]),
        (dict(dim=16, num_heads=4, dropout=1.5), ["dropout", "1.5"]),
    ],
    ids=["dim not divisible", "pool even", "chunk 0", "dropout"],
)
def test_module_rejects_argument(arguments, words):
    for module in (las.LaSAttention, las.LaSBlock):
        with pytest.raises(ValueError) as raised:
            module(**arguments)
        for word in words:
            assert word in str(raised.value), f"{module.__name__}: message does not name {word!r}: {raised.value}"


def test_block_rejects_norm():
    with pytest.raises(ValueError, match="norm.*'group'"):
        las.LaSBlock(16, 4, norm="group")


def test_smooth_values_rejects_mask():
    value = torch.randn(2, 1, 5, 3)
    with pytest.raises(ValueError, match=re.escape("(2, 4)")):
        las.smooth_values(value, 3, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask"):
        las.smooth_values(value, 3, key_padding_mask=torch.zeros(2, 5))


@pytest.mark.parametrize("is_causal", [False, True])
def test_fast_uncached_decay_matches_reference(monkeypatch, is_causal):
    # Above the cache size limit the fast path makes each head's decay on the fly; same numbers.
    monkeypatch.setattr(las, "_DECAY_CACHE_MAX_BYTES", 0)
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, 12, 4, generator=generator, dtype=torch.float64) for _ in range(3))
    mask = torch.tensor([[False] * 12, [False] * 7 + [True] * 5])
    alphas = torch.tensor([0.0, 0.1, 0.9], dtype=torch.float64)

    def run(fn):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*inputs, alphas, key_padding_mask=mask, is_causal=is_causal, chunk_size=5)
        out.sum().backward()
        return out.detach(), [t.grad for t in inputs]

    fast, fast_grads = run(las.las_attention)
    reference, reference_grads = run(las.las_attention_reference)
    torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-12)
    for name, got, want in zip(("query", "key", "value"), fast_grads, reference_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"gradient of {name}")


@pytest.mark.parametrize("path", PATH_NAMES)
def test_empty_batch_returns_empty(path):
    q, k, v = (torch.randn(0, 2, 9, 4) for _ in range(3))
    out = PATHS[path](q, k, v, torch.tensor([0.0, 0.3]), chunk_size=4)
    assert out.shape == (0, 2, 9, 4)


@pytest.mark.parametrize("rate", [float("nan"), float("inf")])
def test_rejects_non_finite_rates(rate):
    q, k, v = (torch.randn(1, 2, 4, 2) for _ in range(3))
    with pytest.raises(ValueError, match="finite"):
        las.las_attention(q, k, v, torch.tensor([0.0, rate]))
    with pytest.raises(ValueError, match="max_alpha"):
        las.alpha_schedule(4, max_alpha=rate)
