"""The profile summary of ``benchmarks/train_step.py`` (its GPU rows run on the device machine only).

``--profile`` turns a torch profiler trace into GPU milliseconds per step by kernel kind, the
communication no compute kernel overlaps and the time no kernel runs; the TP=2 work was steered by
those numbers, so their arithmetic is checked here on a hand-made trace.
"""

from __future__ import annotations

import importlib.util
from types import ModuleType

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def train_step() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_step", REPO / "benchmarks" / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernel(name: str, start_us: float, duration_us: float) -> dict:
    return {"cat": "kernel", "name": name, "ts": start_us, "dur": duration_us}


def test_kernel_summary_splits_gpu_time_into_kinds_exposed_communication_and_idle(train_step: ModuleType) -> None:
    trace = {"traceEvents": [
        kernel("nvjet_sm90_tst_256x128_gemm", 0, 1000),  # matmul 0-1000 us
        kernel("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", 500, 1000),  # 500 us under the matmul, 500 us alone
        kernel("void at::native::vectorized_elementwise_kernel<add>", 2000, 500),  # after 500 us with no kernel
        kernel("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 2500, 300),
        kernel("multi_tensor_apply_kernel<FusedAdamMathFunctor>", 2800, 200),
        {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5000},  # not a kernel: ignored
    ]}
    summary = train_step.kernel_summary(trace, steps=2)
    per_step = lambda us: us / 1000 / 2  # noqa: E731 - microseconds over 2 steps -> ms per step
    assert summary["wall_ms"] == pytest.approx(per_step(3000))
    assert summary["busy_ms"] == pytest.approx(per_step(2500))
    assert summary["idle_ms"] == pytest.approx(per_step(500))
    assert summary["comm_exposed_ms"] == pytest.approx(per_step(500))
    assert summary["by_category_ms"] == pytest.approx(
        {"gemm": per_step(1000), "comm": per_step(1000), "other": per_step(500), "attention": per_step(300), "optimizer": per_step(200)}
    )
    assert "nvjet_sm90_tst_256x128_gemm" not in summary["top_non_gemm_ms"]
    assert summary["top_non_gemm_ms"]["ncclDevKernel_AllReduce_Sum_bf16_RING_LL"] == pytest.approx(per_step(1000))


def test_kernel_summary_of_a_trace_without_kernels_is_empty(train_step: ModuleType) -> None:
    assert train_step.kernel_summary({"traceEvents": [{"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5}]}, steps=1) == {}


def test_union_length_merges_overlapping_and_nested_intervals(train_step: ModuleType) -> None:
    assert train_step.union_length([(0, 10), (5, 15), (20, 25), (21, 22)]) == 20
    assert train_step.union_length([]) == 0
