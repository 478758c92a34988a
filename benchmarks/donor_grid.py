"""Benchmark: a grid of embedded-donor shapes x learning rates x step counts, one donor per job.

``benchmarks/donor_recipes.py`` builds whole recipes (corpus, tokenizer, both donors) as a first run
would; this trains single donors side by side on one tokenized corpus, which is how the shapes,
learning rates and step counts of ``conf/donors/tiny.yaml`` were chosen (issue 12; results and their
reading in ``benchmarks/results/donor_grid_2026-11-30/``). On a GPU, many small jobs share it.

    python benchmarks/donor_grid.py --corpus stdlib_source --shapes s32x2 l256x4 --lrs 1e-2 2e-3 --steps 1600
    # on a machine whose Python differs (another stdlib): carry this machine's documents
    python -c "import json; from splitllama.embedded import load_stdlib_corpus as l; json.dump(l(corpus='stdlib_source'), open('docs.json', 'w'))"
    python benchmarks/donor_grid.py --documents docs.json --procs 15 --deadline-s 400 ...

A shape is ``<s|l><hidden>x<layers>`` (head_dim 32, kv heads min(2, heads), MLP 3.5x hidden). Each
finished job is a JSON line in ``--out``: final validation loss over all validation blocks, training
loss on 256 training blocks, the curve every ``--eval-every`` steps, seconds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BLOCKS: dict[str, Any] = {}


def shape_config(shape: str, vocab: int) -> tuple[Any, dict[str, int]]:
    from splitllama.configuration_split_llama import llama_config

    hidden, layers = (int(v) for v in shape[1:].split("x"))
    heads = hidden // 32
    dims = {"hidden_size": hidden, "num_layers": layers, "num_heads": heads, "num_kv_heads": min(2, heads) if heads % 2 == 0 else 1,
            "head_dim": 32, "intermediate_size": int(hidden * 3.5)}
    config = llama_config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=dims["num_kv_heads"],
                          head_dim=32, intermediate_size=dims["intermediate_size"], vocab_size=vocab, max_position_embeddings=2048)
    return config, dims


def run_job(job: tuple[str, float, int, dict[str, Any]]) -> dict[str, Any] | None:
    import torch

    from splitllama.embedded import DonorRecipe, evaluate_lm, pretrain_donor

    shape, lr, steps, opts = job
    if time.time() > opts["deadline"]:
        return None
    torch.set_num_threads(opts["threads"])
    blocks = torch.load(opts["blocks"])
    config, dims = shape_config(shape, opts["vocab"])
    recipe = DonorRecipe(**dims, pretrain_steps=steps, lr=lr, warmup_steps=max(1, steps // 10))
    start, curve = time.time(), []
    val = blocks["val"][: opts["eval_blocks"]].long()
    model = pretrain_donor(config, blocks["train"].long(), recipe, batch_size=opts["batch"], seed=0, desc=shape, progress=False,
                           val_blocks=val, eval_every=opts["eval_every"], curve=curve)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    return {"shape": shape, "lr": lr, "steps": steps, "vocab": opts["vocab"], "seq": opts["seq"], "batch": opts["batch"],
            "val": evaluate_lm(model, val), "train": evaluate_lm(model, blocks["train"][:256].long()), "curve": curve,
            "parameters": sum(p.numel() for p in model.parameters()), "s": round(time.time() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="stdlib_source", help="stdlib_source | stdlib_docstrings (this machine's stdlib)")
    parser.add_argument("--documents", type=Path, default=None,
                        help="a JSON list of documents, or a corpus pack (.json.xz, `python -m splitllama.embedded corpus`), instead of --corpus")
    parser.add_argument("--blocks", type=Path, default=None,
                        help="token blocks already packed ({'train', 'val'}: the build's <cache>/blocks/*.pt), instead of tokenising here")
    parser.add_argument("--eval-blocks", type=int, default=None, help="score on the first N validation blocks (default: all)")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--shapes", nargs="+", default=["s32x2", "s64x2", "l192x4", "l256x4"])
    parser.add_argument("--lrs", nargs="+", type=float, default=[2e-3, 1e-2])
    parser.add_argument("--steps", nargs="+", type=int, default=[1600])
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--procs", type=int, default=1, help="jobs side by side")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--deadline-s", type=float, default=float("inf"), help="start no job after this many seconds")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "donor_grid.jsonl")
    args = parser.parse_args()

    import tempfile

    import torch

    from splitllama.data import pack_documents, split_documents
    from splitllama.embedded import load_stdlib_corpus, train_tokenizer

    if args.blocks is not None:
        blocks_path = args.blocks
    else:
        if args.documents is not None and args.documents.name.endswith(".xz"):
            from splitllama.embedded import read_corpus_pack

            documents = read_corpus_pack(args.documents)[1]
        elif args.documents is not None:
            documents = json.loads(args.documents.read_text())
        else:
            documents = load_stdlib_corpus(corpus=args.corpus, progress=False)
        train_docs, val_docs = split_documents(documents, 0.05)
        tokenizer = train_tokenizer(train_docs, args.vocab, progress=False)
        blocks_path = Path(tempfile.mkdtemp(prefix="donor-grid-")) / "blocks.pt"
        torch.save({"train": pack_documents(tokenizer, train_docs, args.seq), "val": pack_documents(tokenizer, val_docs, args.seq)}, blocks_path)
    opts = {"blocks": str(blocks_path), "vocab": args.vocab, "seq": args.seq, "batch": args.batch, "eval_every": args.eval_every,
            "threads": args.threads, "eval_blocks": args.eval_blocks, "deadline": time.time() + args.deadline_s}
    # longest jobs first, so side-by-side jobs end together
    jobs = sorted(((s, lr, n, opts) for s, lr, n in itertools.product(args.shapes, args.lrs, args.steps)), key=lambda j: -j[2])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = 0
    with args.out.open("a") as out, mp.get_context("spawn").Pool(args.procs) as pool:
        for row in pool.imap_unordered(run_job, jobs):
            if row is not None:
                done += 1
                out.write(json.dumps(row) + "\n")
                out.flush()
                print(f"{row['shape']:8} lr {row['lr']:<7g} {row['steps']:5d} steps: val {row['val']:.3f} train {row['train']:.3f} ({row['s']} s)", flush=True)
    print(f"{done} of {len(jobs)} jobs; appended to {args.out}")


if __name__ == "__main__":
    main()
