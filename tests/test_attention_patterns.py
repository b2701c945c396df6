"""Attention patterns: hand-written golden masks, and every fast path against the dense
masked reference, forward and backward."""

import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from dalle_ds.attention import kernels, native
from dalle_ds.attention.kernels import (attend, decode_attention, dense_reference_attention,
                                        gathered_attention)
from dalle_ds.attention.patterns import ATTN_TYPES, AxialRowPattern, GroupBucket, SequenceLayout, build_pattern

# text_len 2 (bos + one caption token), 3x3 image grid: positions 0-1 text, 2-10 image.
LAYOUT = SequenceLayout(text_len=2, grid_h=3, grid_w=3)
OPTIONS = dict(conv_kernel_size=3, sparse_block_size=2, sparse_local_blocks=2, sparse_stride=2)
TEXT_ROWS = ["10" + "0" * 9, "11" + "0" * 9]
# image-to-image part (query rows, key columns); every image query also sees both text tokens.
GOLDEN_IMAGE = {
    "full": ["100000000", "110000000", "111000000", "111100000", "111110000",
             "111111000", "111111100", "111111110", "111111111"],
    "axial_row": ["100000000", "110000000", "111000000", "000100000", "000110000",
                  "000111000", "000000100", "000000110", "000000111"],
    "axial_col": ["100000000", "010000000", "001000000", "100100000", "010010000",
                  "001001000", "100100100", "010010010", "001001001"],
    # causal half of the 3x3 window around each token
    "conv_like": ["100000000", "110000000", "011000000", "110100000", "111110000",
                  "011011000", "000110100", "000111110", "000011011"],
    # blocks of 2: {0,1} {2,3} {4,5} {6,7} {8}; own + previous block, plus odd (summary) blocks
    "sparse": ["100000000", "110000000", "111000000", "111100000", "001110000",
               "001111000", "001111100", "001111110", "001100111"],
}


def as_mask(rows):
    return torch.tensor([[c == "1" for c in row] for row in rows])


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
def test_golden_mask(attn_type):
    golden = as_mask(TEXT_ROWS + ["11" + row for row in GOLDEN_IMAGE[attn_type]])
    mask = build_pattern(attn_type, LAYOUT, **OPTIONS).dense_mask()
    assert torch.equal(mask, golden), f"\n{mask.int()}"


def test_unknown_attention_type_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown attention type 'axial_diag'.*full, axial_row"):
        build_pattern("axial_diag", LAYOUT)


CASES = [  # (layout, options): odd sizes, partial blocks and tiles, text longer than a row
    (SequenceLayout(5, 6, 7), dict(sparse_block_size=4, sparse_local_blocks=2, sparse_stride=3)),
    (SequenceLayout(3, 8, 8), dict(conv_kernel_size=5, sparse_block_size=8, sparse_local_blocks=3, sparse_stride=2)),
    (SequenceLayout(9, 4, 12), dict(conv_kernel_size=3, sparse_block_size=5, sparse_local_blocks=1, sparse_stride=4)),
]


# The CPU path's two implementations: the batched-matmul one (False) and the fused kernel (True),
# which needs a C++ compiler; where there is one, the kernel must build (.ci/run builds it first).
CPU_PATHS = [pytest.param(False, id="batched"),
             pytest.param(True, id="fused", marks=pytest.mark.skipif(
                 shutil.which("c++") is None, reason="no C++ compiler to build the fused kernel"))]


def require_kernel(fused):
    if fused:
        assert native.ops() is not None, "a C++ compiler is here, but the fused attention kernel did not build"


def qkv(n, requires_grad=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, n, 8, generator=g, dtype=dtype).requires_grad_(requires_grad) for _ in range(3)]


@pytest.mark.parametrize("fused", CPU_PATHS)
@pytest.mark.parametrize("attn_type", ATTN_TYPES)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_gathered_cpu_path_equals_dense_reference(attn_type, case, fused):
    require_kernel(fused)
    layout, options = CASES[case]
    pattern = build_pattern(attn_type, layout, **options)
    for n in (layout.total_len, layout.total_len - 1, layout.text_len + 3, layout.text_len - 1):
        q, k, v = qkv(n)
        fast, ref = gathered_attention(pattern, q, k, v, fused=fused), dense_reference_attention(pattern, q, k, v)
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
        grad = torch.randn_like(fast)
        for a, b in zip(torch.autograd.grad(fast, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_gathered_backward_passes_gradcheck(attn_type, dropout_p):
    """The batched path's hand-written backward against finite differences, in float64 (which the
    fused kernel does not take); with dropout each evaluation reseeds, so that every one draws
    the same mask."""
    layout, options = CASES[0]
    pattern = build_pattern(attn_type, layout, **options)
    q, k, v = qkv(layout.total_len - 2, dtype=torch.float64)

    def fn(q, k, v):
        torch.manual_seed(0)
        return gathered_attention(pattern, q, k, v, dropout_p=dropout_p, fused=False)

    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)
    if dropout_p:  # the mask is real: it changes the output
        assert not torch.allclose(fn(q, k, v), gathered_attention(pattern, q, k, v))


@pytest.mark.parametrize("fused", CPU_PATHS)
@pytest.mark.parametrize("attn_type", ATTN_TYPES)
def test_gathered_path_in_bf16_follows_the_fp32_reference(attn_type, fused):
    """bf16 inputs stay bf16 (outputs and gradients), within bf16's precision of fp32."""
    require_kernel(fused)
    layout, options = CASES[1]
    pattern = build_pattern(attn_type, layout, **options)
    q, k, v = qkv(layout.total_len, dtype=torch.bfloat16)
    out = gathered_attention(pattern, q, k, v, fused=fused)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    ref_inputs = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = dense_reference_attention(pattern, *ref_inputs)
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad.float())
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.float(), b, atol=6e-2, rtol=6e-2)


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the fused kernel")
def test_cpu_path_runs_the_fused_kernel_where_it_can():
    """fp32 and bf16 without dropout go to the fused kernel; float64 and dropout, which it does
    not take, to the batched path."""
    require_kernel(True)
    layout, options = CASES[0]
    pattern = build_pattern("sparse", layout, **options)

    def runs(dtype, dropout_p=0.0):
        return gathered_attention(pattern, *qkv(layout.total_len, dtype=dtype), dropout_p=dropout_p).grad_fn.name()

    assert "Fused" in runs(torch.float32) and "Fused" in runs(torch.bfloat16)
    assert "Fused" not in runs(torch.float64) and "Fused" not in runs(torch.float32, dropout_p=0.1)
    with pytest.raises(ValueError, match="fused=True needs .* without dropout"):
        gathered_attention(pattern, *qkv(layout.total_len), dropout_p=0.1, fused=True)


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the fused kernel")
def test_full_attention_on_cpu_runs_the_kernel_up_to_its_length(monkeypatch):
    """Where the kernel is faster (short sequences) it computes full attention too, exactly;
    longer sequences and dropout go to SDPA."""
    require_kernel(True)
    layout = CASES[1][0]
    pattern = build_pattern("full", layout)
    q, k, v = qkv(layout.total_len - 1)
    out = attend(pattern, q, k, v)
    assert "Fused" in out.grad_fn.name()
    torch.testing.assert_close(out, dense_reference_attention(pattern, q, k, v), atol=1e-5, rtol=1e-5)
    assert "Fused" not in attend(pattern, q, k, v, dropout_p=0.1).grad_fn.name()
    monkeypatch.setattr(kernels, "FULL_KERNEL_MAX_LEN", layout.total_len - 2)
    assert "Fused" not in attend(pattern, q, k, v).grad_fn.name()


@pytest.mark.parametrize("fused", CPU_PATHS)
def test_gathered_path_takes_a_head_dim_of_one_with_any_stride(fused):
    """A size-1 last dim may carry any stride (torch calls the tensor contiguous regardless)."""
    require_kernel(fused)
    layout, options = CASES[0]
    pattern = build_pattern("sparse", layout, **options)
    q, k, v = (torch.randn(2, 3, 1, layout.total_len).transpose(-1, -2) for _ in range(3))
    torch.testing.assert_close(gathered_attention(pattern, q, k, v, fused=fused),
                               dense_reference_attention(pattern, q, k, v), atol=1e-5, rtol=1e-5)


def test_sequence_longer_than_the_pattern_is_a_clear_error():
    layout, options = CASES[0]
    pattern = build_pattern("sparse", layout, **options)
    with pytest.raises(ValueError, match="must not be longer than text_len"):
        gathered_attention(pattern, *qkv(layout.total_len + 1))


def test_kernel_switched_off_leaves_the_batched_path():
    """DALLE_DS_NATIVE_ATTENTION=0 (as where no compiler is) gives no kernel and the same results."""
    code = ("import torch; from dalle_ds.attention import native; "
            "from dalle_ds.attention.kernels import gathered_attention, dense_reference_attention; "
            "from dalle_ds.attention.patterns import SequenceLayout, build_pattern; "
            "p = build_pattern('conv_like', SequenceLayout(3, 4, 4)); q = torch.randn(1, 2, 19, 8); "
            "assert native.ops() is None; "
            "torch.testing.assert_close(gathered_attention(p, q, q, q), dense_reference_attention(p, q, q, q)); "
            "print('batched path ok')")
    env = {**os.environ, "DALLE_DS_NATIVE_ATTENTION": "0"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0 and "batched path ok" in result.stdout, result.stderr


class _SharedKeyAlsoInGroup(AxialRowPattern):  # key 0 would be counted twice in the softmax
    def groups(self):
        idx = torch.arange(self.layout.image_len).view(1, -1)
        return [GroupBucket(idx, idx, shared=torch.tensor([0]))]


class _QueryInTwoGroups(AxialRowPattern):  # the first row's queries would get gradients twice
    def groups(self):
        idx = torch.arange(self.layout.image_len).view(self.layout.grid_h, self.layout.grid_w)
        return [GroupBucket(idx, idx), GroupBucket(idx[:1], idx[:1])]


@pytest.mark.parametrize("pattern_class, problem", [(_SharedKeyAlsoInGroup, "holds a key twice"),
                                                    (_QueryInTwoGroups, "every image query exactly once")])
def test_plan_rejects_groups_that_would_not_be_exact(pattern_class, problem):
    """Groups that cover the mask but would count a key or a query twice fail the plan check."""
    pattern = pattern_class(SequenceLayout(2, 2, 3))
    q, k, v = qkv(pattern.layout.total_len)
    with pytest.raises(AssertionError, match=problem):
        gathered_attention(pattern, q, k, v)


def test_gathered_path_work_follows_density():
    """The CPU path scores far fewer query-key pairs than a dense mask would."""
    layout = SequenceLayout(65, 32, 32)
    dense_pairs = layout.total_len**2
    for attn_type in ("axial_row", "axial_col", "conv_like", "sparse"):
        pattern = build_pattern(attn_type, layout)
        buckets = pattern.groups()
        scored = layout.text_len**2 + sum(b.queries.numel() * (layout.text_len + len(b.shared) + b.keys.shape[1])
                                          for b in buckets)
        assert scored < 0.2 * dense_pairs, (attn_type, scored / dense_pairs)
        queries = torch.cat([b.queries.flatten() for b in buckets])
        assert torch.equal(queries[queries >= 0].sort().values, torch.arange(layout.image_len))


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
def test_incremental_decoding_equals_reference_rows(attn_type):
    layout, options = CASES[1]
    pattern = build_pattern(attn_type, layout, **options)
    n = layout.total_len
    q, k, v = qkv(n, requires_grad=False)
    ref = dense_reference_attention(pattern, q, k, v)
    for start, width in ((layout.text_len + 4, 1), (n - 1, 1), (layout.text_len, 5)):
        out = decode_attention(pattern, q[:, :, start:start + width], k[:, :, :start + width],
                               v[:, :, :start + width], start)
        torch.testing.assert_close(out, ref[:, :, start:start + width], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
def test_dispatch_equals_reference(attn_type):
    layout, options = CASES[2]
    pattern = build_pattern(attn_type, layout, **options)
    q, k, v = qkv(layout.total_len - 1, requires_grad=False)
    torch.testing.assert_close(attend(pattern, q, k, v), dense_reference_attention(pattern, q, k, v),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the FlexAttention path runs on CUDA")
@pytest.mark.parametrize("attn_type", ATTN_TYPES)
@pytest.mark.parametrize("head_dim", [8, 64])
def test_cuda_dispatch_equals_reference_forward_and_backward(attn_type, head_dim):
    layout, options = CASES[1]
    pattern = build_pattern(attn_type, layout, **options)
    for n in (layout.total_len - 1, layout.text_len + 5):  # flex at the training length, else gathered
        q, k, v = [x.detach().cuda().requires_grad_() for x in qkv(n)]
        if head_dim != 8:
            q, k, v = [torch.randn(2, 3, n, head_dim, device="cuda", requires_grad=True) for _ in range(3)]
        fast, ref = attend(pattern, q, k, v), dense_reference_attention(pattern, q, k, v)
        torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)
        grad = torch.randn_like(fast)
        for a, b in zip(torch.autograd.grad(fast, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
def test_default_options_work_on_grids_smaller_than_their_blocks(attn_type):
    pattern = build_pattern(attn_type, SequenceLayout(3, 2, 2))  # block 16, stride 8 > 4 image tokens
    q, k, v = qkv(7)
    torch.testing.assert_close(attend(pattern, q, k, v), dense_reference_attention(pattern, q, k, v),
                               atol=1e-5, rtol=1e-5)
