"""One rank of a multi-process megatron check (gloo on CPU, NCCL on GPUs), started by ``run_workers``
(one job) or ``run_worker_jobs`` (several jobs, one after the other, in the same ranks).

Every rank builds the HF split model (the reference, small enough to hold whole) and the megatron
model for its TP/PP rank from the same donors, runs the checks named in the job, and writes its
measurements to ``<out>/rank<k>.json``; the test asserts on them, so a failing check names the
numbers. Checks:

* ``slices``: each loaded megatron tensor equals the slice of the donor tensors it should hold
  (computed here with plain indexing, independently of the loader);
* ``forward``: logits and loss against the HF model (no pipeline);
* ``packed``: the packed (RmPad) model on a padded batch against the HF model run per sequence;
* ``value``: the value model against ``CustomSplitLLamaForValue`` with the same head;
* ``grads``: loss and every gradient after megatron's forward-backward schedule (two micro-batches)
  against HF's gradients of the mean loss; works with pipeline parallelism;
* ``export``: gather, unfuse and save; the saved tensors equal the HF model's.
"""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(job: dict[str, Any], world: int, timeout: float = 600) -> list[dict[str, Any]]:
    """Spawn ``world`` ranks running ``job``; return each rank's results (raises with the rank's traceback)."""
    return job_results(run_worker_jobs([job], world, timeout)[0])


def job_results(answer: list[dict[str, Any]] | AssertionError) -> list[dict[str, Any]]:
    """One job's answer from :func:`run_worker_jobs`: its ranks' results, or its error raised."""
    if isinstance(answer, AssertionError):
        raise answer
    return answer


def run_worker_jobs(jobs: list[dict[str, Any]], world: int, timeout: float = 600) -> list[list[dict[str, Any]] | AssertionError]:
    """Spawn ``world`` ranks that run ``jobs`` one after the other (one spawn and one import of torch,
    transformers and megatron for all of them); for each job, each rank's results, or the error that
    says why it has none (a rank's traceback; or, for a job after a failed one, that it did not run).

    Every job runs over the same parallel state, so they share the parallel sizes (``tp``, ``pp``) and
    the device. Bounded: a rank still running after ``timeout`` seconds writes every thread's stack
    (faulthandler) and exits; the error then carries all ranks' stacks, so a hang in a collective
    fails the test instead of stalling the suite.
    """
    import time

    import torch.multiprocessing as mp

    if len({(job.get("tp", 1), job.get("pp", 1), job.get("device", "cpu")) for job in jobs}) != 1:
        raise ValueError("jobs run in one set of ranks share tp, pp and device")
    outs = [Path(job["out"]) for job in jobs]
    for out in outs:
        out.mkdir(parents=True, exist_ok=True)
    ctx = mp.start_processes(_entry, args=(world, jobs, free_port(), timeout), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout + 60
    failure = ""
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:  # faulthandler did not end it: kill what is left
                for proc in ctx.processes:
                    proc.kill()
                raise TimeoutError(f"ranks still running {timeout + 60:.0f} s after the start")
    except Exception as exc:  # noqa: BLE001 - reported per job below
        stacks = "\n".join(
            f"--- rank {r} ---\n{(outs[0] / f'rank{r}.stacks').read_text()}" for r in range(world) if (outs[0] / f"rank{r}.stacks").is_file()
        )
        failure = f"{type(exc).__name__}: {exc}\n{stacks}"
    answers: list[list[dict[str, Any]] | AssertionError] = []
    for out in outs:
        ranks = [json.loads(f.read_text()) if (f := out / f"rank{r}.json").is_file() else None for r in range(world)]
        if any(r is None or "error" in r for r in ranks):
            errors = "\n".join(f"--- rank {r} ---\n{'did not run this job' if res is None else res.get('error', 'ok')}" for r, res in enumerate(ranks))
            answers.append(AssertionError(f"{failure}\n{errors}"))
        else:
            answers.append(ranks)
    if failure and not any(isinstance(a, AssertionError) for a in answers):  # every job done, then a rank failed
        answers[-1] = AssertionError(failure)
    return answers


def _entry(rank: int, world: int, jobs: list[dict[str, Any]], port: int, timeout: float) -> None:
    warnings.filterwarnings("ignore")
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    stacks = open(Path(jobs[0]["out"], f"rank{rank}.stacks"), "w")  # noqa: SIM115 - open until the process ends
    faulthandler.dump_traceback_later(timeout, exit=True, file=stacks)
    for job in jobs:  # a failed job ends this rank: the others may wait for it in a collective
        try:
            results = run_checks(rank, job)
        except Exception:  # noqa: BLE001 - reported to the test through the results file
            results = {"error": traceback.format_exc()}
        Path(job["out"], f"rank{rank}.json").write_text(json.dumps(results))
        if "error" in results:
            print(results["error"], file=sys.stderr)
            raise SystemExit(1)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float().cpu() - b.detach().float().cpu()).abs().max().item()


def run_checks(rank: int, job: dict[str, Any]) -> dict[str, Any]:
    import splitllama  # noqa: F401  (registers the Auto classes)
    from megatron.core import parallel_state
    from splitllama import SplitLlamaConfig, build_split_model
    from splitllama.checkpoint import LazyCheckpoint
    from splitllama.megatron.lightning import build_megatron_split_model
    from splitllama.megatron.parallel import initialize_megatron_parallel

    tp, pp, sp = job.get("tp", 1), job.get("pp", 1), job.get("sp", False)
    dtype = getattr(torch, job.get("dtype", "float32"))
    cuda = job.get("device", "cpu") == "cuda"
    initialize_megatron_parallel(tp, pp, backend="nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    split = job["split"]
    hf = build_split_model(
        job["small"], job["large"], split["num_layers_8"], split["num_layers_70"], adapter=split.get("adapter", "linear"),
        adapter_hidden_size=split.get("adapter_hidden_size"), adapter_rank=split.get("adapter_rank"), dtype=dtype,
    ).to(device)
    config: SplitLlamaConfig = hf.config
    model = build_megatron_split_model(config, tp=tp, pp=pp, sp=sp, params_dtype=dtype, path8b=job["small"], path70b=job["large"])
    module = model.module
    generator = torch.Generator().manual_seed(job.get("seed", 0))
    batch, seq = job.get("batch", 2), job.get("seq", 16)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=generator).to(device)
    results: dict[str, Any] = {"rank": rank, "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
                               "pp_rank": parallel_state.get_pipeline_model_parallel_rank()}
    checks = job["checks"]
    if "slices" in checks:
        results["slices"] = check_slices(module, config, LazyCheckpoint(job["small"]), LazyCheckpoint(job["large"]), tp, dtype)
    if "forward" in checks:
        with torch.no_grad():
            ref = hf(ids, labels=ids)
            out = model(ids, labels=ids)
        results["forward"] = {"logits": _max_diff(out.logits, ref.logits), "loss": abs(out.loss.item() - ref.loss.item()),
                              "shape": list(out.logits.shape)}
    if "packed" in checks:
        results["packed"] = check_packed(config, job, tp, sp, dtype, hf, ids)
    if "value" in checks:
        results["value"] = check_value(config, job, tp, sp, dtype, hf, ids, device)
    if "grads" in checks:
        results["grads"] = check_grads(model, hf, config, ids, pp)
    if "export" in checks:
        from safetensors.torch import load_file

        out_dir = Path(job["out"]) / "export"
        model.export_hf(out_dir)
        torch.distributed.barrier()
        files = sorted(out_dir.glob("*.safetensors"))
        saved: dict[str, torch.Tensor] = {}
        for f in files:
            saved.update(load_file(f))
        reference = hf.state_dict()
        results["export"] = {
            "missing": sorted(set(reference) - set(saved)), "extra": sorted(set(saved) - set(reference)),
            "max_diff": max(_max_diff(saved[k], reference[k]) for k in reference if k in saved),
        }
    return results


def check_slices(module: Any, config: Any, small: Any, large: Any, tp: int, dtype: torch.dtype) -> dict[str, Any]:
    """Compare every decoder-layer and global tensor on this rank with the donor slice it should hold."""
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    params = {n: p.detach().cpu() for n, p in module.named_parameters()}
    layout = module.layout
    worst, checked = 0.0, 0
    for part, donor_ckpt, donor_cfg, layers in (
        ("first", small, config.config_8b, config.layers_8), ("last", large, config.config_70b, config.layers_70)
    ):
        head_dim, heads, groups = donor_cfg.head_dim, donor_cfg.num_attention_heads, donor_cfg.num_key_value_heads
        per_group, local_groups = heads // groups, groups // tp
        ffn = donor_cfg.intermediate_size // tp
        for local, split_index in enumerate(getattr(layout, part)):
            donor_layer = layers[split_index]

            def get(name: str) -> torch.Tensor:
                return donor_ckpt.get(f"model.layers.{donor_layer}.{name}", dtype)

            prefix = f"model.layers_{part}.layers.{local}."
            q, k, v = get("self_attn.q_proj.weight"), get("self_attn.k_proj.weight"), get("self_attn.v_proj.weight")
            blocks = []
            for g in range(rank * local_groups, (rank + 1) * local_groups):
                blocks += [q[g * per_group * head_dim:(g + 1) * per_group * head_dim], k[g * head_dim:(g + 1) * head_dim],
                           v[g * head_dim:(g + 1) * head_dim]]
            gate, up = get("mlp.gate_proj.weight"), get("mlp.up_proj.weight")
            o, down = get("self_attn.o_proj.weight"), get("mlp.down_proj.weight")
            o_cols, down_cols = o.shape[1] // tp, down.shape[1] // tp
            expected = {
                "self_attention.linear_qkv.weight": torch.cat(blocks),
                "mlp.linear_fc1.weight": torch.cat([gate[rank * ffn:(rank + 1) * ffn], up[rank * ffn:(rank + 1) * ffn]]),
                "self_attention.linear_proj.weight": o[:, rank * o_cols:(rank + 1) * o_cols],
                "mlp.linear_fc2.weight": down[:, rank * down_cols:(rank + 1) * down_cols],
                "input_layernorm.weight": get("input_layernorm.weight"),
                "pre_mlp_layernorm.weight": get("post_attention_layernorm.weight"),
            }
            for name, value in expected.items():
                worst = max(worst, _max_diff(params[prefix + name], value))
                checked += 1
    vocab = config.vocab_size // tp
    if layout.pre_process:
        worst = max(worst, _max_diff(params["model.embed_tokens.weight"], small.get("model.embed_tokens.weight", dtype)[rank * vocab:(rank + 1) * vocab]))
        checked += 1
    if layout.post_process and "lm_head.weight" in params:
        worst = max(worst, _max_diff(params["lm_head.weight"], large.get("lm_head.weight", dtype)[rank * vocab:(rank + 1) * vocab]))
        worst = max(worst, _max_diff(params["model.norm.weight"], large.get("model.norm.weight", dtype)))
        checked += 2
    return {"max_diff": worst, "checked": checked, "params": len(params)}


def _padded_batch(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, int]]]:
    """Row 0 full, row 1 right-padded, row 2 left-padded (from the first rows of ids); (row, start, stop) of real tokens."""
    seq = ids.shape[1]
    rows = ids[:1].repeat(3, 1)
    mask = torch.ones_like(rows)
    mask[1, seq - 5:] = 0
    mask[2, :3] = 0
    rows[1, seq - 5:] = 0
    rows[2, :3] = 0
    return rows, mask, [(0, 0, seq), (1, 0, seq - 5), (2, 3, seq)]


def check_packed(config: Any, job: dict[str, Any], tp: int, sp: bool, dtype: torch.dtype, hf: Any, ids: torch.Tensor) -> dict[str, Any]:
    from splitllama.megatron.lightning import build_megatron_split_model
    from splitllama.megatron.modeling_split_llama_megatron import ParallelCustomSplitLLamaForCausalLMRmPad

    from splitllama.megatron.layers.attention import SDPACoreAttention

    model = build_megatron_split_model(config, tp=tp, sp=sp, params_dtype=dtype, path8b=job["small"], path70b=job["large"])
    packed = ParallelCustomSplitLLamaForCausalLMRmPad(config, model.module.megatron_config)
    packed.load_state_dict(model.module.state_dict())
    rows, mask, spans = _padded_batch(ids)
    # which attention path ran: count the flash varlen calls (the real method still runs)
    varlen_calls, real_varlen = [0], SDPACoreAttention._varlen

    def counted_varlen(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        varlen_calls[0] += 1
        return real_varlen(self, *args, **kwargs)

    SDPACoreAttention._varlen = counted_varlen
    try:
        with torch.no_grad():
            out = packed(rows, attention_mask=mask)
            worst = 0.0
            for row, start, stop in spans:
                ref = hf(rows[row:row + 1, start:stop]).logits[0]
                worst = max(worst, _max_diff(out.logits[row, start:stop], ref))
            pad_zero = max(float(out.logits[1, -5:].abs().max()), float(out.logits[2, :3].abs().max()))  # right and left padding
            # what a masking bug gives: the left-padded row's tokens attending to its padding (HF on the whole row)
            leak = _max_diff(hf(rows[2:3]).logits[0, 3:], hf(rows[2:3, 3:]).logits[0])
    finally:
        SDPACoreAttention._varlen = real_varlen
    return {"logits": worst, "padding_logits": pad_zero, "mask_bug_logits": leak, "varlen_calls": varlen_calls[0]}


def check_value(config: Any, job: dict[str, Any], tp: int, sp: bool, dtype: torch.dtype, hf: Any, ids: torch.Tensor, device: torch.device) -> dict[str, Any]:
    from splitllama import CustomSplitLLamaForValue
    from splitllama.megatron.lightning import build_megatron_split_model

    value_dir = Path(job["value_dir"])
    reference = CustomSplitLLamaForValue.from_pretrained(value_dir, dtype=dtype).to(device)
    model = build_megatron_split_model(None, tp=tp, sp=sp, params_dtype=dtype, hf_split_dir=value_dir, value=True)
    rows, mask, spans = _padded_batch(ids)
    with torch.no_grad():
        values = model.module(rows, attention_mask=mask).values
        worst = 0.0
        for row, start, stop in spans:
            ref = reference(rows[row:row + 1, start:stop]).values[0]
            worst = max(worst, _max_diff(values[row, start:stop], ref))
        scale = float(reference(rows[:1]).values.abs().max())
    return {"values": worst, "scale": scale, "shape": list(values.shape)}


def check_grads(model: Any, hf: Any, config: Any, ids: torch.Tensor, pp: int) -> dict[str, Any]:
    """Loss and all gradients of two micro-batches through megatron's schedule vs HF."""
    from splitllama.megatron.checkpoint_utils.custom_split_llama_saver import gather_hf_state

    micro = [ids[:1], ids[1:2]]
    hf.zero_grad(set_to_none=True)
    losses = [hf(m, labels=m).loss for m in micro]
    ref_loss = torch.stack(losses).mean()
    ref_loss.backward()
    reference = {n: p.grad for n, p in hf.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss = model.forward_backward([{"input_ids": m} for m in micro])
    grads = gather_hf_state(model.module, config, use_grad=True)
    # every parameter this stage holds must have a gradient: gather_hf_state leaves out one without
    # (frozen or disconnected by mistake), which a comparison over ``grads`` alone would not see
    held = set(gather_hf_state(model.module, config))
    worst, scale, worst_name, worst_relative = 0.0, 0.0, None, 0.0
    for name, grad in grads.items():
        if reference.get(name) is None:
            continue  # reported as not_in_reference
        diff = _max_diff(grad, reference[name])
        own_scale = float(reference[name].abs().max())
        if diff > worst:
            worst, worst_name = diff, name
        worst_relative = max(worst_relative, diff / max(own_scale, 1e-12))
        scale = max(scale, own_scale)
    return {
        "loss": None if loss is None else abs(loss.item() - ref_loss.item()),
        "max_grad_diff": worst, "worst_parameter": worst_name, "grad_scale": scale, "compared": len(grads),
        "without_grad": sorted(held - set(grads)), "not_in_reference": sorted(n for n in grads if reference.get(n) is None),
        "max_relative_grad_diff": worst_relative,  # each parameter's largest difference over its own largest gradient
    }
