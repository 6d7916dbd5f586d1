"""Tests of the compiled (torch.compile) and fused (FlexAttention) paths of las.py.

Every compiled path is compared with las_attention_reference, outputs and (where a backward exists)
gradients, over several shapes and layouts: a compiled graph can be silently wrong, so no compiled
path is trusted without this. Compilation is slow on CPU, so shapes are few and reused.
GPU tests skip without CUDA.

    python -m pytest -q test_compiled.py
"""

import warnings

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import las

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_inputs(batch, heads, length, dim, *, padded_lengths=None, dtype=torch.float32, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, length, dim, generator=generator, dtype=dtype) for _ in range(3))
    mask = None
    if padded_lengths is not None:
        mask = torch.arange(length)[None, :] >= torch.tensor(padded_lengths)[:, None]  # (B, L), True = padding
        mask = mask.to(device)
    return q.to(device), k.to(device), v.to(device), mask


def real_positions(mask, shape):
    """Bool index of the (B, H, L, D) entries at real positions."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool)
    return (~mask)[:, None, :, None].expand(shape)


def unique_graphs() -> int:
    return counters["stats"]["unique_graphs"]


# ----------------------------------------------------------------------------------------------------
# Fused path (FlexAttention), forward on CPU


LAYOUTS = [
    # (batch, heads, length, dim, real lengths or None, causal, chunk)
    (2, 4, 100, 16, [100, 37], False, None),
    (2, 4, 100, 16, [100, 37], True, None),
    (2, 4, 100, 16, None, False, 32),
    (2, 4, 100, 16, [0, 61], True, 7),
    (1, 2, 1, 8, None, False, None),
    (2, 4, 200, 16, [200, 128], True, 64),
]


@pytest.mark.parametrize("batch,heads,length,dim,lengths,causal,chunk", LAYOUTS)
def test_flex_matches_reference(batch, heads, length, dim, lengths, causal, chunk):
    q, k, v, mask = make_inputs(batch, heads, length, dim, padded_lengths=lengths)
    alphas = las.alpha_schedule(heads, max_alpha=0.5)
    options = dict(pool_size=3, is_causal=causal, key_padding_mask=mask, chunk_size=chunk)

    expected = las.las_attention_reference(q, k, v, alphas, **options)
    with torch.no_grad():
        actual = las.las_attention_flex(q, k, v, alphas, **options)

    real = real_positions(mask, actual.shape)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual[real], expected[real], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(actual).all(), "padding rows must be finite"


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    length=st.integers(1, 250),
    pool_size=st.sampled_from([1, 3, 5]),
    causal=st.booleans(),
    chunk=st.sampled_from([None, 16, 50, 300]),
    padded=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(length=129, pool_size=5, causal=True, chunk=50, padded=True, seed=0)
def test_flex_generated_layouts(length, pool_size, causal, chunk, padded, seed):
    lengths = [length, max(0, length // 3)] if padded else None
    q, k, v, mask = make_inputs(2, 2, length, 8, padded_lengths=lengths, seed=seed)
    alphas = las.alpha_schedule(2, max_alpha=0.3)
    options = dict(pool_size=pool_size, is_causal=causal, key_padding_mask=mask, chunk_size=chunk)

    expected = las.las_attention_reference(q, k, v, alphas, **options)
    with torch.no_grad():
        actual = las.las_attention_flex(q, k, v, alphas, **options)

    real = real_positions(mask, actual.shape)
    torch.testing.assert_close(actual[real], expected[real], atol=1e-5, rtol=1e-5)


def test_flex_edge_divisor_row():
    # Every query attends (almost) only to the last key, so each attention row is one-hot on key 3;
    # smoothing with P = 3 and divisor P gives [0, 0, 1/3, 1/3] in every path.
    length = 4
    q = torch.ones(1, 1, length, 1)
    k = torch.zeros(1, 1, length, 1)
    k[0, 0, 3, 0] = 100.0  # softmax weight on keys 0..2 is about exp(-100)
    v = torch.eye(length).view(1, 1, length, length)  # value row j is one-hot on j, so out = weights
    alphas = torch.zeros(1)

    with torch.no_grad():
        fused = las.las_attention_flex(q, k, v, alphas, pool_size=3)
    fast = las.las_attention(q, k, v, alphas, pool_size=3)
    reference = las.las_attention_reference(q, k, v, alphas, pool_size=3)

    expected = torch.tensor([0.0, 0.0, 1 / 3, 1 / 3]).expand(length, length)
    for name, out in (("fused", fused), ("fast", fast), ("reference", reference)):
        torch.testing.assert_close(out[0, 0], expected, msg=f"{name} path")


def test_flex_rejects_training_on_cpu():
    q, k, v, _ = make_inputs(1, 2, 16, 8)
    q.requires_grad_()
    with pytest.raises(RuntimeError, match="no FlexAttention backward"):
        las.las_attention_flex(q, k, v, torch.zeros(2))


def test_flex_empty_batch_returns_empty():
    q, k, v, _ = make_inputs(0, 2, 9, 8)
    with torch.no_grad():
        out = las.las_attention_flex(q, k, v, torch.tensor([0.0, 0.3]))
    assert out.shape == (0, 2, 9, 8)


def test_flex_rejects_float64_on_cpu():
    q, k, v, _ = make_inputs(1, 1, 4, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match="got torch.float64"):
        las.las_attention_flex(q, k, v, torch.zeros(1))


def test_flex_module_training_on_cpu_raises():
    module = las.LaSAttention(16, 2, backend="flex")
    with pytest.raises(RuntimeError, match="backend='eager' or 'compile'"):
        module(torch.randn(1, 10, 16))


def test_flex_module_rejects_attention_dropout():
    module = las.LaSAttention(16, 2, backend="flex", dropout=0.1).train()
    with pytest.raises(ValueError, match="no attention dropout"):
        module(torch.randn(1, 10, 16))


def test_auto_backend_trains_on_cpu_like_flex():
    # backend="auto" runs the eager path on CPU; its numbers equal the fused path's in inference.
    torch.manual_seed(0)
    module = las.LaSAttention(16, 4, backend="auto")
    x = torch.randn(2, 30, 16)
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[1, 20:] = True

    out = module(x, mask)
    out.sum().backward()
    assert module.in_proj.weight.grad is not None

    module.backend = "flex"
    with torch.no_grad():
        fused = module(x, mask)
    torch.testing.assert_close(fused[~mask], out.detach()[~mask], atol=1e-5, rtol=1e-5)


def test_flex_uses_new_alphas_without_recompiling():
    q, k, v, _ = make_inputs(1, 2, 64, 8)
    alphas = torch.tensor([0.0, 0.05])
    with torch.no_grad():
        las.las_attention_flex(q, k, v, alphas)
        graphs_before = unique_graphs()
        alphas[1] = 0.7  # changed in place after the first compiled call
        actual = las.las_attention_flex(q, k, v, alphas)
    expected = las.las_attention_reference(q, k, v, alphas)

    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert unique_graphs() == graphs_before, "a new rate value must not trigger a compilation"


def test_flex_lengths_share_compilations():
    module = las.LaSAttention(16, 2, backend="flex").eval()
    with torch.no_grad():
        module(torch.randn(1, 128, 16))  # compile the first bucket outside the count
        graphs_before = unique_graphs()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for length in range(128, 161):
                module(torch.randn(1, length, 16))
    new_graphs = unique_graphs() - graphs_before
    fallback = [w for w in caught if "without torch.compile" in str(w.message)]

    # 128..160 fall in two buckets (128 and 256): at most one new bucket, each with its mask builder.
    assert new_graphs <= 2, f"{new_graphs} compilations for lengths 128..160"
    assert not fallback, "FlexAttention fell back to the unfused implementation"


def test_flex_computes_no_decay_matrix(monkeypatch):
    # The fused path must take the decay from the (H,) rates inside the kernel, never from an
    # (H, L, L) tensor: at L = 16,384 and H = 8 that tensor would be 8.6 GB in fp32.
    def forbidden(*args, **kwargs):
        raise AssertionError("the fused path built a decay matrix")

    monkeypatch.setattr(las, "decay_mask", forbidden)
    monkeypatch.setattr(las, "_cached_decay", forbidden)
    q, k, v, _ = make_inputs(1, 2, 300, 8)
    alphas = torch.tensor([0.0, 0.2])
    with torch.no_grad():
        out = las.las_attention_flex(q, k, v, alphas, chunk_size=64)
    monkeypatch.undo()

    expected = las.las_attention_reference(q, k, v, alphas, chunk_size=64)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_flex_bucket_lengths():
    assert las._flex_bucket_length(1) == 128
    assert las._flex_bucket_length(128) == 128
    assert las._flex_bucket_length(129) == 256
    assert las._flex_bucket_length(1025) == 1280
    assert las._flex_bucket_length(16384) == 16384
    for length in range(1, 20000, 97):
        bucket = las._flex_bucket_length(length)
        assert bucket % 128 == 0
        assert length <= bucket <= max(128, 1.25 * length + 128), (length, bucket)


# ----------------------------------------------------------------------------------------------------
# Compiled eager path (torch.compile of las_attention), forward and backward on CPU


COMPILED_LAYOUTS = [
    (2, 2, 40, 8, [40, 17], False, None, 3),
    (2, 2, 40, 8, [40, 0], True, None, 5),
    (2, 2, 45, 8, None, True, 16, 3),
    (1, 3, 64, 4, [50], False, 64, 1),
]


@pytest.mark.parametrize("batch,heads,length,dim,lengths,causal,chunk,pool", COMPILED_LAYOUTS)
def test_compiled_matches_reference_with_grads(batch, heads, length, dim, lengths, causal, chunk, pool):
    compiled = las._get_compiled_las_attention()
    alphas = las.alpha_schedule(heads, max_alpha=0.4)
    options = dict(pool_size=pool, is_causal=causal, chunk_size=chunk)

    def run(fn):
        q, k, v, mask = make_inputs(batch, heads, length, dim, padded_lengths=lengths, seed=length)
        # non-contiguous inputs, as a module's head split produces them
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v))
        out = fn(q, k, v, alphas, key_padding_mask=mask, **options)
        real = real_positions(mask, out.shape)
        (out[real] * torch.linspace(-1, 1, int(real.sum()))).sum().backward()
        return out.detach(), real, [t.grad for t in (q, k, v)]

    expected, real, expected_grads = run(las.las_attention_reference)
    actual, _, actual_grads = run(compiled)

    torch.testing.assert_close(actual[real], expected[real], atol=1e-5, rtol=1e-5)
    for name, got, want in zip("qkv", actual_grads, expected_grads):
        assert torch.isfinite(got).all(), f"grad of {name} has NaN or inf"
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"grad of {name}")


def test_compiled_module_matches_eager():
    torch.manual_seed(0)
    module = las.LaSAttention(16, 2, backend="eager", chunk_size=16)
    x = torch.randn(2, 40, 16)
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[0, 33:] = True
    expected = module(x, mask)
    module.backend = "compile"
    actual = module(x, mask)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_compiled_lengths_share_compilations():
    compiled = las._get_compiled_las_attention()
    alphas = las.alpha_schedule(2)
    q, k, v, _ = make_inputs(1, 2, 128, 8)
    compiled(q, k, v, alphas)
    graphs_before = unique_graphs()
    for length in range(129, 161):
        q, k, v, _ = make_inputs(1, 2, length, 8, seed=length)
        out = compiled(q, k, v, alphas)
        torch.testing.assert_close(out, las.las_attention_reference(q, k, v, alphas), atol=1e-5, rtol=1e-5)
    assert unique_graphs() - graphs_before <= 2, "lengths 129..160 must share dynamic-shape graphs"


def test_compiled_uses_new_alphas():
    compiled = las._get_compiled_las_attention()
    q, k, v, _ = make_inputs(1, 2, 48, 8)
    alphas = torch.tensor([0.0, 0.05])
    compiled(q, k, v, alphas)
    alphas[1] = 0.9
    torch.testing.assert_close(
        compiled(q, k, v, alphas), las.las_attention_reference(q, k, v, alphas), atol=1e-5, rtol=1e-5
    )


# ----------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA)


@cuda
@pytest.mark.parametrize("causal,chunk,lengths", [(False, None, [300, 120]), (True, None, None), (False, 128, [300, 0])])
def test_cuda_flex_matches_reference_with_grads(causal, chunk, lengths):
    q, k, v, mask = make_inputs(2, 4, 300, 32, padded_lengths=lengths, device="cuda")
    alphas = las.alpha_schedule(4, max_alpha=0.5).cuda()
    options = dict(pool_size=3, is_causal=causal, key_padding_mask=mask, chunk_size=chunk)

    def run(fn):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*inputs, alphas, **options)
        real = real_positions(mask, out.shape).to(out.device)
        out[real].sum().backward()
        return out.detach(), real, [t.grad for t in inputs]

    expected, real, expected_grads = run(las.las_attention_reference)
    actual, _, actual_grads = run(las.las_attention_flex)
    torch.testing.assert_close(actual[real], expected[real], atol=2e-4, rtol=2e-4)
    for got, want in zip(actual_grads, expected_grads):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


@cuda
def test_cuda_auto_backend_is_flex():
    module = las.LaSAttention(32, 4).cuda()
    q = torch.randn(1, 4, 10, 8, device="cuda")
    assert module._resolve_backend(q, 0.0) == "flex"
