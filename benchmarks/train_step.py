"""One training step (forward, backward, AdamW step) of a split model of real Llama-3 shapes (GPU).

Rows (random weights, bf16 parameters, fused AdamW, batch 1 x ``--seq`` tokens, all parameters train):

* ``part8b``: transformers ``LlamaForCausalLM``, ``--n8`` layers of the 8B shape;
* ``part8b_head``: the same with 0 layers (embedding, norm, lm_head of hidden 4096 only);
* ``part70b``: ``LlamaForCausalLM``, ``--n70`` layers of the 70B shape (with its embedding and head);
* ``split_hf``: the split model on the HF backend (``CustomSplitLLamaForCausalLM``, linear adapter);
* ``split_megatron_tp1``: the split model on the megatron backend at TP=1;
* ``split_megatron_tp2``: the same at TP=2 (``torchrun --nproc_per_node 2 ... --only megatron --tp 2``);
  ``split_megatron_tp2_sp`` with sequence parallelism (``--sp``);
* ``split_megatron_pp2_mb8``: pipeline parallel 2 (``--only megatron --pp 2 --micro-batches 8``): one step is
  8 micro-batches of 1 x ``--seq`` through megatron's 1F1B schedule; its ideal bubble is
  (pp - 1) / (micro-batches + pp - 1) = 1/9 of the step;
* ``split_hf_fsdp2``: the HF backend sharded with FSDP2 over every process (``torchrun --nproc_per_node 2
  ... --only fsdp``), each rank its own 1 x ``--seq`` batch (data parallel: tokens/s counts all
  ranks), bf16 parameters as in the other rows; ``split_hf_fsdp2_mp`` (``--fsdp-mp``): float32
  parameters and optimizer, bf16 gathers and compute, float32 gradient reduction (what
  ``parallel=fsdp parallel.fsdp_param_dtype=bfloat16`` trains with).

``--profile DIR`` also writes, per row, the torch profiler's kernel table of two more steps
(``DIR/<row>.txt``, sorted by GPU time): where a row loses time against another.

Predicted step time of the split model from its two parts (no cost of splitting):
``t(part8b) - t(part8b_head) + t(part70b)`` (the split model has the 8B embedding and the 70B
head; its linear adapter, 4096 x 8192, is 0.8% of the parameters and counted in neither part).

MFU = model FLOPs / step time / (GPUs x measured matmul rate). Model FLOPs per step =
``tokens x (6 x P + 6 x seq x d_attn x L)``: P = parameters in matmuls (all linear weights incl.
lm_head and adapter, not the embedding lookup or norms), d_attn = heads x head_dim, L = layers;
the second term is the causal attention score and value products (forward 2 x 2 x seq/2 x d_attn per
token and layer, backward twice that). The matmul rate is the fastest median of bf16 products of
the model's shapes (tokens x hidden x FFN of each donor and 8192^3), the fastest any row's process of
the results file measured (one denominator for all rows). Prints a table and merges rows into
``benchmarks/results/train_step.json``.

``--profile DIR`` also writes ``DIR/<row>.json``: per step, GPU ms by kernel kind (matmul, NCCL,
attention, optimizer, other), the communication no compute kernel overlaps, the time no kernel runs
(the host not keeping up), and the largest non-matmul kernels. Every row records where a step makes the
host wait for the GPU (``sync_sites``, torch's sync debug mode), and tensor-parallel rows the time of one
NCCL all-reduce of a ``[tokens, hidden]`` activation of each donor (``allreduce_ms``). ``--batch``
trains on that many sequences per step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent
SHAPE_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, head_dim=128)
SHAPE_70B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8, head_dim=128)
COMMON = dict(vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False)


def llama_config(shape: dict[str, int], layers: int) -> Any:
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=layers, **shape, **COMMON)
    config._attn_implementation = "sdpa"
    config.use_cache = False
    return config


def split_config(n8: int, n70: int) -> Any:
    from splitllama import SplitLlamaConfig

    return SplitLlamaConfig(
        config_8b=llama_config(SHAPE_8B, 32), config_70b=llama_config(SHAPE_70B, 80), num_layers_8=n8, num_layers_70=n70,
        adapter="linear",
    )


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that enter matrix products: 2-D weights other than the embedding lookup."""
    return sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n and "word_embeddings" not in n)


def step_flops(params: int, attn_layers: list[int], seq: int, tokens: int) -> float:
    """``attn_layers``: d_attn (heads x head_dim) of each layer."""
    return tokens * (6.0 * params + sum(6.0 * seq * d for d in attn_layers))


def time_steps(step: Callable[[], None], warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def train_step_fn(model: torch.nn.Module, loss_of: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor) -> Callable[[], None]:
    """``loss_of(ids)`` returns the loss to differentiate, or None when it ran the backward itself (a pipeline)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)

    def step() -> None:
        loss = loss_of(ids)
        if loss is not None:
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def matmul_rate(seq: int, iters: int = 20) -> dict[str, float]:
    """Median TFLOP/s of bf16 products of the model's shapes (random data, events)."""
    shapes = {"8192^3": (8192, 8192, 8192), "8b_ffn": (seq, 4096, 14336), "70b_ffn": (seq, 8192, 28672), "70b_head": (seq, 8192, 128256)}
    rates = {}
    for name, (m, k, n) in shapes.items():
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
        times = time_steps(lambda: torch.mm(a, b), 3, iters)
        rates[name] = 2.0 * m * k * n / statistics.median(times) / 1e12
        del a, b
    return rates


KERNEL_CATEGORIES = (  # first match wins; a kernel's name, lower-cased (cuDNN's attention names say sm90_ too)
    ("comm", ("nccl",)),
    ("attention", ("sdpa", "flash", "fmha", "attention", "attn")),
    ("gemm", ("nvjet", "gemm", "cutlass", "xmma", "cublas", "sm90_")),
    ("optimizer", ("adam", "multi_tensor_apply")),
)


def kernel_category(name: str) -> str:
    lowered = name.lower()
    for category, keys in KERNEL_CATEGORIES:
        if any(key in lowered for key in keys):
            return category
    return "other"


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def kernel_summary(trace: dict[str, Any], steps: int) -> dict[str, Any]:
    """Per step, in ms: GPU time by kernel category, the communication no compute kernel overlaps
    (``comm_exposed``), the time no kernel runs (``idle``), and the largest non-matmul kernels.

    ``trace``: a torch profiler chrome trace (``export_chrome_trace``) of ``steps`` steps.
    """
    kernels = [e for e in trace.get("traceEvents", []) if e.get("cat") == "kernel" and e.get("dur")]
    if not kernels:
        return {}
    spans = {"comm": [], "compute": []}
    by_category: dict[str, float] = {}
    by_name: dict[str, float] = {}
    for e in kernels:
        a, b = float(e["ts"]), float(e["ts"]) + float(e["dur"])
        category = kernel_category(e["name"])
        by_category[category] = by_category.get(category, 0.0) + (b - a)
        spans["comm" if category == "comm" else "compute"].append((a, b))
        if category != "gemm":
            by_name[e["name"][:80]] = by_name.get(e["name"][:80], 0.0) + (b - a)
    everything = spans["comm"] + spans["compute"]
    wall = max(b for _, b in everything) - min(a for a, _ in everything)
    compute = union_length(spans["compute"])
    busy = union_length(everything)
    per = 1e-3 / steps  # us over all steps -> ms per step
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:15]
    return {
        "wall_ms": wall * per, "busy_ms": busy * per, "idle_ms": (wall - busy) * per, "compute_ms": compute * per,
        "comm_exposed_ms": (busy - compute) * per,
        "by_category_ms": {k: v * per for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
        "top_non_gemm_ms": {k: v * per for k, v in top},
    }


def profile_steps(step: Callable[[], None], path: Path, steps: int = 2) -> dict[str, Any]:
    """The profiler's table of ``steps`` more steps (GPU kernels and CPU ops, by GPU time) in ``path``,
    and their :func:`kernel_summary` in ``path`` with suffix ``.json`` (also returned)."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    path.parent.mkdir(parents=True, exist_ok=True)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=60, max_name_column_width=90)
    path.write_text(f"{steps} steps\n{table}\n")
    with tempfile.TemporaryDirectory() as tmp:
        trace_path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace_path))
        summary = kernel_summary(json.loads(trace_path.read_text()), steps)
    path.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    if summary:
        cats = ", ".join(f"{k} {v:.1f}" for k, v in summary["by_category_ms"].items())
        print(f"profile {path.stem}: wall {summary['wall_ms']:.1f} ms/step, idle {summary['idle_ms']:.1f}, "
              f"comm exposed {summary['comm_exposed_ms']:.1f}; GPU ms by kind: {cats}", flush=True)
    return summary


def synchronising_calls(step: Callable[[], None]) -> dict[str, int]:
    """Where one step makes the host wait for the GPU: ``file:line`` -> count, from torch's sync debug mode."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites: dict[str, int] = {}
    for w in caught:
        if "synchroniz" in str(w.message):
            key = f"{Path(w.filename).name}:{w.lineno}"
            sites[key] = sites.get(key, 0) + 1
    return sites


def allreduce_times(tokens: int) -> dict[str, float]:
    """Median ms of an NCCL all-reduce over every rank of a bf16 [tokens, hidden] activation (each donor's hidden):
    what one tensor-parallel layer's forward all-reduce costs when nothing overlaps it."""
    times = {}
    for name, hidden in (("h4096", 4096), ("h8192", 8192)):
        x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
        times[name] = statistics.median(time_steps(lambda: torch.distributed.all_reduce(x), 3, 20)) * 1e3
        del x
    return times


def measure(name: str, build: Callable[[], tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor], list[int]]],
            args: argparse.Namespace, gpus: int = 1, tokens_per_step: int | None = None, data_parallel: int = 1) -> dict[str, Any]:
    """``tokens_per_step``: tokens one step trains on per data-parallel rank (default ``--seq``);
    ``data_parallel``: ranks that each train on their own tokens (tokens/s and FLOPs count them all)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model, loss_of, attn = build()
    ids = torch.randint(0, COMMON["vocab_size"], (args.batch, args.seq), device="cuda")
    step = train_step_fn(model, loss_of, ids)
    times = time_steps(step, args.warmup, args.iters)
    t = statistics.median(times)
    sync_sites = synchronising_calls(step)
    if args.profile and int(os.environ.get("RANK", "0")) == 0:
        profile_steps(step, Path(args.profile) / f"{name}.txt")
    elif args.profile:
        profile_steps(step, Path(args.profile) / f"{name}.rank{os.environ['RANK']}.txt")
    params = matmul_params(model)  # a DTensor (FSDP2) counts its full size
    if gpus > 1 and data_parallel == 1:  # tensor/pipeline-parallel shards: count the whole model's parameters
        total = torch.tensor([params], device="cuda", dtype=torch.float64)
        torch.distributed.all_reduce(total)
        params = int(total.item())
    tokens = (tokens_per_step or args.seq * args.batch) * data_parallel
    peak_gb = torch.tensor([torch.cuda.max_memory_allocated() / 1e9], device="cuda")
    if gpus > 1:
        torch.distributed.all_reduce(peak_gb, op=torch.distributed.ReduceOp.MAX)
    row = {
        "name": name, "gpus": gpus, "step_s": t, "step_s_spread": [min(times), max(times)], "tokens_per_s": tokens / t,
        "tokens_per_step": tokens, "matmul_params": params, "flops_per_step": step_flops(params, attn, args.seq, tokens),
        "peak_mem_gb": float(peak_gb.item()),  # the largest of the ranks
        "batch": args.batch,
        "sync_sites": sync_sites,  # where a step waits for the GPU (host syncs stall the launches)
    }
    del model, loss_of
    torch.cuda.empty_cache()
    return row


def build_llama(shape: dict[str, int], layers: int) -> Callable[[], Any]:
    def build() -> Any:
        from transformers import LlamaForCausalLM

        with torch.device("cuda"):
            model = LlamaForCausalLM._from_config(llama_config(shape, layers), dtype=torch.bfloat16)
        d = shape["num_attention_heads"] * shape["head_dim"]
        return model, lambda ids: model(input_ids=ids, labels=ids, use_cache=False).loss, [d] * layers

    return build


def build_split_hf(n8: int, n70: int) -> Callable[[], Any]:
    def build() -> Any:
        from splitllama import CustomSplitLLamaForCausalLM

        config = split_config(n8, n70)
        config._attn_implementation = "sdpa"
        config.use_cache = False
        with torch.device("cuda"):
            model = CustomSplitLLamaForCausalLM._from_config(config, dtype=torch.bfloat16)
        return model, lambda ids: model(input_ids=ids, labels=ids, use_cache=False).loss, split_attn(n8, n70)

    return build


def build_split_fsdp(n8: int, n70: int, mixed_precision: bool) -> Callable[[], Any]:
    """The HF split model sharded by :func:`splitllama.backend.sharding.apply_fsdp` over every process."""
    def build() -> Any:
        from torch.distributed.device_mesh import init_device_mesh

        from splitllama import CustomSplitLLamaForCausalLM
        from splitllama.backend.sharding import apply_fsdp

        config = split_config(n8, n70)
        config._attn_implementation = "sdpa"
        config.use_cache = False
        mesh = init_device_mesh("cuda", (torch.distributed.get_world_size(),))
        with torch.device("meta"):
            model = CustomSplitLLamaForCausalLM._from_config(config, dtype=torch.float32 if mixed_precision else torch.bfloat16)
        apply_fsdp(model, mesh, param_dtype="bfloat16" if mixed_precision else None)
        model.to_empty(device="cuda")
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.02)
        model.model.reset_rotary_embeddings("cuda")  # non-persistent buffers: computed, not initialised
        return model, lambda ids: model(input_ids=ids, labels=ids, use_cache=False).loss, split_attn(n8, n70)

    return build


def build_split_megatron_pp(n8: int, n70: int, pp: int, micro_batches: int) -> Callable[[], Any]:
    """Megatron at PP=``pp``: one step = ``micro_batches`` micro-batches through the 1F1B schedule."""
    def build() -> Any:
        from splitllama.megatron.lightning import build_megatron_split_model

        model = build_megatron_split_model(split_config(n8, n70), pp=pp, params_dtype=torch.bfloat16, random_init=True)

        def loss_of(ids: torch.Tensor) -> None:
            model.run_schedule([{"input_ids": ids}] * micro_batches)
            return None

        return model, loss_of, split_attn(n8, n70)

    return build


def split_attn(n8: int, n70: int) -> list[int]:
    return [SHAPE_8B["num_attention_heads"] * 128] * n8 + [SHAPE_70B["num_attention_heads"] * 128] * n70


def build_split_megatron(n8: int, n70: int, tp: int, sp: bool = False) -> Callable[[], Any]:
    def build() -> Any:
        from splitllama.megatron.lightning import build_megatron_split_model

        model = build_megatron_split_model(split_config(n8, n70), tp=tp, sp=sp, params_dtype=torch.bfloat16, random_init=True)
        return model, lambda ids: model(ids, labels=ids, return_logits=False).loss, split_attn(n8, n70)

    return build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n8", type=int, default=4)
    parser.add_argument("--n70", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1, help="sequences per step (per data-parallel rank)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--only", choices=["all", "split", "megatron", "fsdp"], default="all",
                        help="all rows; split: split_hf and the megatron row; megatron: the megatron row; fsdp: the FSDP2 row")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--micro-batches", type=int, default=8, help="micro-batches per step under --pp > 1")
    parser.add_argument("--fsdp-mp", action="store_true", help="FSDP2 row: float32 parameters, bf16 compute")
    parser.add_argument("--sp", action="store_true", help="sequence parallelism (TP >= 2)")
    parser.add_argument("--profile", default=None, help="directory for per-row profiler tables")
    parser.add_argument("--out", default=str(HERE / "results" / "train_step.json"))
    args = parser.parse_args()
    assert torch.cuda.is_available(), "benchmarks/train_step.py needs a GPU"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    rates = matmul_rate(args.seq)
    peak = max(rates.values()) * 1e12  # FLOP/s
    rows = []
    if args.only == "all":
        rows.append(measure("part8b", build_llama(SHAPE_8B, args.n8), args))
        rows.append(measure("part8b_head", build_llama(SHAPE_8B, 0), args))
        rows.append(measure("part70b", build_llama(SHAPE_70B, args.n70), args))
    if args.only in ("all", "split"):
        rows.append(measure("split_hf", build_split_hf(args.n8, args.n70), args))
    if args.only == "fsdp":
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl")
        name = "split_hf_fsdp2" + ("_mp" if args.fsdp_mp else "")
        rows.append(measure(name, build_split_fsdp(args.n8, args.n70, args.fsdp_mp), args, gpus=world, data_parallel=world))
    elif args.pp > 1:
        name = f"split_megatron_pp{args.pp}_mb{args.micro_batches}"
        rows.append(measure(name, build_split_megatron_pp(args.n8, args.n70, args.pp, args.micro_batches), args, gpus=world,
                            tokens_per_step=args.seq * args.micro_batches))
    else:
        name = f"split_megatron_tp{args.tp}" + ("_sp" if args.sp else "") + (f"_b{args.batch}" if args.batch > 1 else "")
        rows.append(measure(name, build_split_megatron(args.n8, args.n70, args.tp, args.sp), args, gpus=world))
        if args.tp > 1:  # what one of the layers' tensor-parallel all-reduces costs with nothing beside it
            rows[-1]["allreduce_ms"] = allreduce_times(args.seq * args.batch)
    if rank != 0:
        return
    for row in rows:
        row["matmul_peak_tflops"] = peak / 1e12  # this process's fastest product
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = json.loads(out.read_text()) if out.exists() else {}
    if result.get("config", {}).get("seq") not in (None, args.seq):
        result = {}
    result["config"] = {"n8": args.n8, "n70": args.n70, "seq": args.seq, "batch": 1, "dtype": "bfloat16",
                        "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    result.setdefault("matmul_tflops", {})[f"gpus{world}"] = rates
    result.setdefault("rows", {}).update({row["name"]: row for row in rows})
    all_rows = result["rows"]
    # one denominator for every row of the file: the fastest product any of its processes measured (each
    # process's own peak varies by ~5% between runs, which would move MFU more than the rows differ)
    common_peak = max([row.get("matmul_peak_tflops", 0.0) for row in all_rows.values()] + [peak / 1e12])
    result["mfu_peak_tflops"] = common_peak
    for row in all_rows.values():
        row["mfu"] = row["flops_per_step"] / row["step_s"] / (row["gpus"] * common_peak * 1e12)
    if {"part8b", "part8b_head", "part70b"} <= set(all_rows):
        predicted = all_rows["part8b"]["step_s"] - all_rows["part8b_head"]["step_s"] + all_rows["part70b"]["step_s"]
        result["predicted_split_tokens_per_s"] = args.seq / predicted
        for name in ("split_hf", "split_megatron_tp1"):
            if name in all_rows:
                all_rows[name]["vs_predicted"] = all_rows[name]["tokens_per_s"] * predicted / args.seq
    out.write_text(json.dumps(result, indent=2))
    print(f"matmul TFLOP/s (bf16, median): " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items())
          + f"; MFU against {common_peak:.0f} TFLOP/s per GPU (the fastest product of any row's process)")
    for row in rows:
        if row.get("sync_sites"):
            print(f"{row['name']}: host syncs in a step at {row['sync_sites']}")
    print(f"{'row':<22} {'gpus':>4} {'step ms':>9} {'tokens/s':>10} {'MFU':>7} {'vs pred':>8} {'peak GB':>8}")
    for row in all_rows.values():
        vs = row.get("vs_predicted")
        vs_text = "" if vs is None else f"{vs:.3f}"
        print(f"{row['name']:<22} {row['gpus']:>4} {row['step_s'] * 1e3:>9.1f} {row['tokens_per_s']:>10.0f} "
              f"{row['mfu'] * 100:>6.1f}% {vs_text:>8} {row['peak_mem_gb']:>8.1f}")
    if "predicted_split_tokens_per_s" in result:
        print(f"predicted split tokens/s from its parts: {result['predicted_split_tokens_per_s']:.0f}")


if __name__ == "__main__":
    main()
