"""training/profiling.py: the split of kernel time by kind, on CUDA kernel names as the H200 showed
them (a CPU machine's profiler records no CUDA kernels, so the events are built here); the count
of operations that compute, and of the bytes they move."""

from types import SimpleNamespace

import pytest
import torch

from dalle_ds.training.profiling import ComputeCounter, TrafficCounter, describe, sum_by_kind, time_by_kind

CUDA, CPU = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU


def kernel(name: str, us: float, device=CUDA):
    return SimpleNamespace(key=name, device_type=device, self_device_time_total=us, self_cpu_time_total=us)


def test_kernel_names_go_to_their_kind_attention_before_matmul():
    events = [
        kernel("nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_NTN", 4000),  # cuBLAS
        kernel("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>", 1000),
        kernel("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 4, cutlass::bfloat16_t>>", 600),
        kernel("fmha_cutlassB_bf16_aligned_64x64_k64_sm80", 300),  # memory-efficient SDPA: its name holds "cutlass"
        kernel("triton_tem_fused_flex_attention_backward_1", 500),  # FlexAttention, compiled
        kernel("void at::native::elementwise_kernel<128, 4>", 1600),
        kernel("aten::mm", 9999, device=CPU),  # the CPU side of a CUDA matmul: not kernel time
    ]
    by_kind = time_by_kind(events, steps=2, on_cuda=True)
    assert by_kind == pytest.approx({"attention": 0.7, "matmul": 2.5, "other": 0.8})
    assert describe(by_kind) == "attention 0.7 (18%), matmul 2.5 (62%), other 0.8 (20%)"


def test_on_cpu_operations_own_time_counts():
    events = [kernel("aten::mm", 2000, CPU), kernel("dalle_ds_attention::grouped_forward", 1000, CPU),
              kernel("aten::add", 1000, CPU)]
    by_kind = time_by_kind(events, steps=1, on_cuda=False)
    assert by_kind == pytest.approx({"attention": 1.0, "matmul": 2.0, "other": 1.0})


def test_the_compute_counter_counts_what_computes_views_aside():
    x = torch.ones(4, 4)
    with ComputeCounter() as ops:
        y = x.t()[1:].unsqueeze(0)  # views only
        views = ops.count
        (y * 2).sum()
    assert views == 0
    assert ops.count == 2  # mul, sum


def test_the_traffic_counter_counts_one_pass_per_tensor_read_and_written():
    a, b, c = torch.ones(1000), torch.ones(1000), torch.empty(1000)
    w = torch.ones(1000, 10, dtype=torch.bfloat16)
    with TrafficCounter() as traffic:
        a.t().unsqueeze(0)  # a view
        torch.empty(1000)  # an allocation
        a + b  # two read, one written
        a.add_(b)  # a and b read, a written
        torch.mul(a, b, out=c)  # c only written
        a.sum()  # 1000 floats read, one written
        w.float()  # 2 bytes read and 4 written an element
    fp32 = 4 * 1000
    assert traffic.bytes == {"aten.add": 3 * fp32, "aten.add_": 3 * fp32, "aten.mul": 3 * fp32,
                             "aten.sum": fp32 + 4, "aten._to_copy": 6 * 10_000}
    assert sum_by_kind([("aten.mm", 10), ("aten._scaled_dot_product_flash_attention", 5), ("aten.mul", 3)]) == {
        "attention": 5, "matmul": 10, "other": 3}
