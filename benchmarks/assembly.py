"""Benchmark: assembling a split model from sharded donors, against the raw-read floor and the naive path.

Makes synthetic sharded bf16 donors (a large one of several GB at reduced Llama shapes, in two
depths to show memory does not grow with the donor), then times, each in a fresh process:

- ``raw read``: reading exactly the bytes of the needed tensors (the floor for any loader);
- ``hand reader`` / ``safe_open reader``: the needed tensors through :class:`splitllama.checkpoint.LazyCheckpoint`
  (its own header parse, plain reads into each tensor) and through ``safetensors.safe_open`` (memory map);
- ``build_split_model``: splitllama's lazy assembly;
- ``naive``: ``LlamaForCausalLM.from_pretrained`` of both whole donors, then slicing layers out;
- ``baseline``: importing torch/transformers/splitllama only (the fixed overhead of a process).

Targets: assembly within 1.3x of the raw read; peak RSS at most 1.2x the split model's size plus
the fixed overhead, the same whatever the large donor's size.

    python benchmarks/assembly.py                      # full run (~6 GB of donors in --workdir)
    python benchmarks/assembly.py --large-layers 4 --hidden-large 512 --hidden-small 256 --vocab 4096  # quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.donors import llama_config  # noqa: E402


def write_synthetic_donor(path: Path, cfg, shard_bytes: int, seed: int) -> Path:
    """Write a donor layer by layer (never the whole model in memory), sharded with an index json."""
    if (path / "model.safetensors.index.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(path)
    gen = torch.Generator().manual_seed(seed)
    h, kv, hd, f, v = cfg.hidden_size, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size
    q = cfg.num_attention_heads * hd

    def tensors():
        yield "model.embed_tokens.weight", (v, h)
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            yield p + "input_layernorm.weight", (h,)
            yield p + "self_attn.q_proj.weight", (q, h)
            yield p + "self_attn.k_proj.weight", (kv * hd, h)
            yield p + "self_attn.v_proj.weight", (kv * hd, h)
            yield p + "self_attn.o_proj.weight", (h, q)
            yield p + "post_attention_layernorm.weight", (h,)
            yield p + "mlp.gate_proj.weight", (f, h)
            yield p + "mlp.up_proj.weight", (f, h)
            yield p + "mlp.down_proj.weight", (h, f)
        yield "model.norm.weight", (h,)
        yield "lm_head.weight", (v, h)

    shard: dict[str, torch.Tensor] = {}
    size, shards, weight_map = 0, [], {}

    def flush() -> None:
        nonlocal shard, size
        if shard:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, path / name, metadata={"format": "pt"})
            shards.append(name)
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for name, shape in tensors():
        t = torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen)
        if size + t.numel() * 2 > shard_bytes:
            flush()
        shard[name] = t
        size += t.numel() * 2
    flush()
    n = len(shards)
    renamed = {}
    for i, old in enumerate(shards):
        new = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (path / old).rename(path / new)
        renamed[old] = new
    total = sum((path / s).stat().st_size for s in renamed.values())
    index = {"metadata": {"total_size": total}, "weight_map": {k: renamed[s] for k, s in weight_map.items()}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return path


# ------------------------------------------------------------------------------------------ workers
#: every method, each timed in a fresh process; "hand reader" vs "safe_open reader" decides which
#: header/tensor reader splitllama.checkpoint uses (issue 15: keep whichever is faster)
METHODS = ("baseline", "raw read", "hand reader", "safe_open reader", "build_split_model", "naive")


def worker(method: str, small: str, large: str, n8: int, n70: int) -> dict:
    import splitllama
    from splitllama.checkpoint import LazyCheckpoint
    from splitllama.configuration_split_llama import SplitLlamaConfig
    from splitllama.weight_map import plan_weights

    start = time.perf_counter()
    result: dict = {}
    if method == "baseline":
        pass
    elif method == "raw read":
        config = SplitLlamaConfig(path8b=small, path70b=large, num_layers_8=n8, num_layers_70=n70)
        ckpts = {"small": LazyCheckpoint(small), "large": LazyCheckpoint(large)}
        plan = plan_weights(config)
        sizes = [ckpts[s.donor].nbytes(s.source if s.source in ckpts[s.donor] else s.fallback) for s in plan]
        buffer = bytearray(max(sizes))
        view = memoryview(buffer)
        total = 0
        for src in plan:
            ckpt = ckpts[src.donor]
            name = src.source if src.source in ckpt else src.fallback
            header = ckpt._header(name)
            begin, end = header.entries[name]["data_offsets"]
            with open(header.path, "rb", buffering=0) as f:
                f.seek(header.data_start + begin)
                f.readinto(view[: end - begin])
            total += end - begin
        result["bytes"] = total
    elif method in ("hand reader", "safe_open reader"):
        # the two ways LazyCheckpoint could read a tensor: its own header parse + plain reads into the
        # tensor's storage, or safetensors' safe_open (memory-mapped) get_tensor; the same tensors
        config = SplitLlamaConfig(path8b=small, path70b=large, num_layers_8=n8, num_layers_70=n70)
        plan = plan_weights(config)
        total = 0
        if method == "hand reader":
            ckpts = {"small": LazyCheckpoint(small), "large": LazyCheckpoint(large)}
            for src in plan:
                ckpt = ckpts[src.donor]
                total += ckpt.get(src.source if src.source in ckpt else src.fallback).nbytes
        else:
            from safetensors import safe_open

            handles: dict[Path, Any] = {}
            roots = {"small": Path(small), "large": Path(large)}
            indexes = {donor: root / "model.safetensors.index.json" for donor, root in roots.items()}
            weight_maps = {donor: json.loads(index.read_text())["weight_map"] if index.is_file() else None
                           for donor, index in indexes.items()}  # each index read once, as LazyCheckpoint does
            for src in plan:
                root, weight_map = roots[src.donor], weight_maps[src.donor]
                name = src.source if (weight_map is None or src.source in weight_map) else src.fallback
                shard = root / (weight_map[name] if weight_map else "model.safetensors")
                if shard not in handles:
                    handles[shard] = safe_open(str(shard), framework="pt", device="cpu")
                # get_tensor maps the file and reads nothing yet; clone() reads the bytes into memory this
                # process owns, as LazyCheckpoint.get does (assembly copies every tensor into the model)
                total += handles[shard].get_tensor(name).clone().nbytes
        result["bytes"] = total
    elif method == "build_split_model":
        model = splitllama.build_split_model(small, large, n8, n70, adapter="linear", dtype=torch.bfloat16)
        result["bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    elif method == "naive":
        from transformers import LlamaForCausalLM

        donors = {
            "small": LlamaForCausalLM.from_pretrained(small, dtype=torch.bfloat16),
            "large": LlamaForCausalLM.from_pretrained(large, dtype=torch.bfloat16),
        }
        config = SplitLlamaConfig(path8b=small, path70b=large, num_layers_8=n8, num_layers_70=n70)
        states = {k: m.state_dict() for k, m in donors.items()}
        model = splitllama.CustomSplitLLamaForCausalLM(config).to(torch.bfloat16)
        target = model.state_dict()
        with torch.no_grad():
            for src in plan_weights(config):
                tensor = states[src.donor].get(src.source, states[src.donor].get(src.fallback))
                target[src.target].copy_(tensor)
        result["bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    else:
        raise SystemExit(f"unknown method {method}")
    result["wall_s"] = time.perf_counter() - start
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result


def peak_rss_bytes() -> int:
    """This process's own RSS high-water mark (VmHWM; unlike ru_maxrss it does not inherit the
    parent's peak across fork/exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_worker(method: str, small: Path, large: Path, n8: int, n70: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", method, str(small), str(large), str(n8), str(n70)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def drop_page_cache() -> bool:
    """Drop the OS page cache when permitted (root outside a container), so reads are cold."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=os.environ.get("SPLITLLAMA_BENCH_DIR", "/tmp/splitllama-bench"))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "assembly.json"))
    ap.add_argument("--hidden-small", type=int, default=1024)
    ap.add_argument("--hidden-large", type=int, default=2048)
    ap.add_argument("--small-layers", type=int, default=16)
    ap.add_argument("--large-layers", default="20,40", help="comma-separated depths of the large donor")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--n8", type=int, default=4)
    ap.add_argument("--n70", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per method (best is reported)")
    args = ap.parse_args()

    work = Path(args.workdir)
    hd, kv = 128, 4
    small_cfg = llama_config(hidden_size=args.hidden_small, num_hidden_layers=args.small_layers, num_attention_heads=args.hidden_small // hd,
                             num_key_value_heads=kv, head_dim=hd, vocab_size=args.vocab)
    tag = f"h{args.hidden_small}x{args.small_layers}v{args.vocab}"
    small = write_synthetic_donor(work / f"small-{tag}", small_cfg, 512 << 20, seed=0)
    rows = []
    cold = drop_page_cache()
    for depth in [int(x) for x in args.large_layers.split(",")]:
        large_cfg = llama_config(hidden_size=args.hidden_large, num_hidden_layers=depth, num_attention_heads=args.hidden_large // hd,
                                 num_key_value_heads=kv, head_dim=hd, vocab_size=args.vocab)
        print(f"writing/using large donor with {depth} layers ...", flush=True)
        large = write_synthetic_donor(work / f"large-h{args.hidden_large}x{depth}v{args.vocab}", large_cfg, 512 << 20, seed=1)
        donor_bytes = sum(p.stat().st_size for p in large.glob("*.safetensors"))
        for method in METHODS:
            runs = []
            for _ in range(args.repeats):
                drop_page_cache()
                runs.append(run_worker(method, small, large, args.n8, args.n70))
            best = min(runs, key=lambda r: r["wall_s"])
            rows.append({"large_layers": depth, "large_donor_bytes": donor_bytes, "method": method, **best,
                         "peak_rss_max_bytes": max(r["peak_rss_bytes"] for r in runs)})
            print(f"  {method:18s} {best['wall_s']:7.2f} s  peak RSS {best['peak_rss_bytes'] / 2**30:6.2f} GiB", flush=True)

    # ---------------------------------------------------------------- table and targets
    def get(depth: int, method: str) -> dict:
        return next(r for r in rows if r["large_layers"] == depth and r["method"] == method)

    print(f"\nSplit of {args.n8} small + {args.n70} large layers, bf16; page cache {'dropped before each run' if cold else 'warm (could not drop it)'}")
    header = f"| large donor | method | wall s | x raw read | peak RSS GiB | RSS - baseline GiB | split model GiB |"
    print(header)
    print("|" + "---|" * 7)
    checks = []
    for depth in sorted({r["large_layers"] for r in rows}):
        base, raw, asm = get(depth, "baseline"), get(depth, "raw read"), get(depth, "build_split_model")
        split_bytes = asm["bytes"]
        for method in METHODS:
            r = get(depth, method)
            ratio = r["wall_s"] / raw["wall_s"] if method != "baseline" else float("nan")
            extra = (r["peak_rss_bytes"] - base["peak_rss_bytes"]) / 2**30
            print(f"| {depth} layers, {r['large_donor_bytes'] / 2**30:.2f} GiB | {method} | {r['wall_s']:.2f} | {ratio:.2f} | "
                  f"{r['peak_rss_bytes'] / 2**30:.2f} | {extra:.2f} | {split_bytes / 2**30:.2f} |")
        checks.append({
            "large_layers": depth,
            "assembly_over_raw": asm["wall_s"] / raw["wall_s"],
            "assembly_rss_over_split": (asm["peak_rss_bytes"] - base["peak_rss_bytes"]) / split_bytes,
            "naive_rss_over_split": (get(depth, "naive")["peak_rss_bytes"] - base["peak_rss_bytes"]) / split_bytes,
        })
    depths = sorted({r["large_layers"] for r in rows})
    growth = (get(depths[-1], "build_split_model")["peak_rss_bytes"] - get(depths[0], "build_split_model")["peak_rss_bytes"]) / 2**20
    print("\nTargets: assembly <= 1.3x raw read; assembly RSS - baseline <= 1.2x split size; no growth with donor depth")
    for c in checks:
        print(f"  large donor {c['large_layers']} layers: time {c['assembly_over_raw']:.2f}x raw "
              f"({'ok' if c['assembly_over_raw'] <= 1.3 else 'MISSED'}), RSS {c['assembly_rss_over_split']:.2f}x split "
              f"({'ok' if c['assembly_rss_over_split'] <= 1.2 else 'MISSED'}); naive RSS {c['naive_rss_over_split']:.2f}x split")
    print(f"  assembly peak RSS growth from {depths[0]} to {depths[-1]} large layers: {growth:+.0f} MiB")
    reader_checks = []
    for depth in depths:
        hand, mapped = get(depth, "hand reader"), get(depth, "safe_open reader")
        reader_checks.append({"large_layers": depth, "safe_open_over_hand_reader": mapped["wall_s"] / hand["wall_s"],
                       "safe_open_rss_minus_hand_mib": (mapped["peak_rss_bytes"] - hand["peak_rss_bytes"]) / 2**20})
        print(f"  readers, large donor {depth} layers: safe_open {mapped['wall_s']:.2f} s vs hand {hand['wall_s']:.2f} s "
              f"({mapped['wall_s'] / hand['wall_s']:.2f}x), peak RSS {mapped['peak_rss_bytes'] / 2**30:.2f} vs "
              f"{hand['peak_rss_bytes'] / 2**30:.2f} GiB")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "cold_cache": cold, "rows": rows, "checks": checks, "reader_checks": reader_checks,
                               "assembly_rss_growth_mib": growth}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))))
    else:
        main()
