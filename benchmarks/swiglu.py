"""SwiGLU over megatron's fused fc1 output: forward + backward time of each way to compute it (GPU).

Rows, for the FFN widths of Llama-3-8B (14336) and -70B (28672), ``--tokens`` tokens, bf16:

* ``megatron_unfused``: megatron-core's default path (``torch.chunk`` into strided halves, SiLU, product);
* ``hf_separate``: the HF model's layout (gate and up are separate contiguous tensors; the reference);
* ``megatron_fused``: megatron-core's ``bias_swiglu_impl`` (``bias_activation_fusion``), timed after
  both widths have been seen, as in a split model (its automatic dynamic shapes then recompile);
* ``splitllama``: :class:`splitllama.megatron.layers.swiglu.SwiGLU`, the activation of our layer spec.

    python benchmarks/swiglu.py [--tokens 4096] [--out benchmarks/results/swiglu.json]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
WIDTHS = {"8b": 14336, "70b": 28672}


def time_ms(fn: Callable[[], None], iters: int = 50, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--out", default=str(HERE / "results" / "swiglu.json"))
    args = parser.parse_args()
    assert torch.cuda.is_available(), "benchmarks/swiglu.py needs a GPU"
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    from splitllama.megatron.layers.swiglu import SwiGLU

    ours = SwiGLU()
    inputs = {}
    for name, width in WIDTHS.items():
        fused = torch.randn(args.tokens, 1, 2 * width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        gate, up = (torch.randn(args.tokens, 1, width, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        inputs[name] = (fused, gate, up, torch.randn(args.tokens, 1, width, device="cuda", dtype=torch.bfloat16))
    for fused, *_ in inputs.values():  # megatron's compiled fusion sees both widths first, as in a split model
        bias_swiglu_impl(fused, None)

    rows: dict[str, dict[str, float]] = {}
    for name, (fused, gate, up, grad) in inputs.items():
        def unfused() -> None:
            a, b = torch.chunk(fused, 2, dim=-1)
            (F.silu(a) * b).backward(grad)

        ways = {
            "megatron_unfused": unfused,
            "hf_separate": lambda: (F.silu(gate) * up).backward(grad),
            "megatron_fused": lambda: bias_swiglu_impl(fused, None).backward(grad),
            "splitllama": lambda: ours(fused).backward(grad),
        }
        rows[name] = {way: time_ms(fn) for way, fn in ways.items()}

    print(f"SwiGLU forward + backward, {args.tokens} tokens, bf16, {torch.cuda.get_device_name()} (ms)")
    print(f"{'way':18s}" + "".join(f"{name + ' (' + str(WIDTHS[name]) + ')':>16s}" for name in rows))
    for way in next(iter(rows.values())):
        print(f"{way:18s}" + "".join(f"{rows[name][way]:16.3f}" for name in rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"tokens": args.tokens, "device": torch.cuda.get_device_name(), "ms": rows}, indent=2))


if __name__ == "__main__":
    main()
