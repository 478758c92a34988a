"""The command line ``python -m splitllama.embedded build|corpus|verify``: build the embedded donors from
their recipe, write this machine's corpus as a pack, or check a donor directory against its manifest."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .build import build_embedded_donors, building_into, git_commit, ship_provenance_problem, write_manifest
from .corpus import default_cache_dir
from .pack import corpus_identity, read_corpus_pack, write_corpus_pack
from .recipe import EmbeddedRecipe
from .verify import SHIPPED_DONORS, manifest_recipe_problem, verify_cache


def _parse_set(values: Sequence[str]) -> dict[str, Any]:
    """``key=value`` / ``small.lr=1e-3`` overrides of the default recipe (values parsed as YAML)."""
    import yaml

    recipe: dict[str, Any] = asdict(EmbeddedRecipe())
    for item in values:
        dotted, _, raw = item.partition("=")
        *parents, name = dotted.split(".")
        node = recipe
        for part in parents:
            node = node[part]
        if name not in node:
            raise SystemExit(f"--set {item}: no recipe field {dotted!r} (fields: {', '.join(sorted(node))})")
        node[name] = yaml.safe_load(raw)
    return recipe


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m splitllama.embedded build|corpus|verify``: build the embedded donors from their recipe."""
    import argparse
    import shlex

    parser = argparse.ArgumentParser(
        prog="python -m splitllama.embedded",
        description="Build the embedded donors from their recipe (conf/donors/tiny.yaml = EmbeddedRecipe()), or check them.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="corpus, tokenizer, both donors (bf16), held-out blocks and manifest into --out")
    build.add_argument("--out", type=Path, help="output directory (default: the package's shipped donors with --ship)")
    build.add_argument("--ship", action="store_true", help=f"write into {SHIPPED_DONORS} (the donors `python run.py` uses)")
    build.add_argument("--documents", type=Path, help="a corpus pack (`corpus --out`) made on another machine, instead of this one's corpus")
    build.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides, e.g. large.pretrain_steps=10")
    build.add_argument("--cache-dir", type=Path, default=None, help="corpus and token-block cache (default $SPLITLLAMA_CACHE)")
    corpus = sub.add_parser("corpus", help="write this machine's corpus of the recipe as a pack (to build on a GPU machine)")
    corpus.add_argument("--out", type=Path, required=True)
    corpus.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    corpus.add_argument("--cache-dir", type=Path, default=None, help="corpus cache (default $SPLITLLAMA_CACHE)")
    verify = sub.add_parser("verify", help="check a donor directory's files against its manifest")
    verify.add_argument("path", type=Path, nargs="?", default=SHIPPED_DONORS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    if args.command == "verify":
        problems = verify_cache(args.path)
        if not problems:  # and the manifest against itself: its recipe_hash is its recipe's
            manifest = json.loads((args.path / "manifest.json").read_text())
            problems = [f"{args.path / 'manifest.json'}: {p}" for p in [manifest_recipe_problem(manifest)] if p and manifest.get("recipe")]
        print("\n".join(problems) if problems else f"{args.path}: every file matches manifest.json")
        return 1 if problems else 0
    recipe = EmbeddedRecipe.from_dict(_parse_set(args.set))
    if args.command == "corpus":
        identity = write_corpus_pack(recipe, args.out, args.cache_dir)
        print(json.dumps(identity, indent=2))
        return 0
    out = SHIPPED_DONORS if args.ship else args.out
    if out is None:
        parser.error("build: give --out DIR or --ship")
    if args.ship and (problem := ship_provenance_problem(git_commit())):
        raise SystemExit(problem)  # before the corpus is read or anything built: minutes of GPU time
    cache = args.cache_dir or default_cache_dir()
    if args.documents is not None:
        identity, documents = read_corpus_pack(args.documents)
        identity = {**identity, "pack": args.documents.name}
    else:
        documents = recipe.corpus_documents(cache)
        identity = corpus_identity(recipe, documents)
    with building_into(out) as tmp:  # removed if the build stops; a killed build's leftovers removed first
        started = time.perf_counter()
        metrics = build_embedded_donors(recipe, tmp, cache, documents=documents)
        metrics["timings"]["total_s"] = time.perf_counter() - started
        command = "python -m splitllama.embedded " + shlex.join(list(argv) if argv is not None else sys.argv[1:])
        manifest = write_manifest(tmp, recipe, metrics, identity, command=command)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    m = manifest["metrics"]
    print(f"small donor: val {m['small_val_loss']:.4f} held-out {m['small_heldout_loss']:.4f}; "
          f"large donor: val {m['large_val_loss']:.4f} held-out {m['large_heldout_loss']:.4f}; gap {m['gap']:.4f} nats; "
          f"{m['timings']['total_s']:.0f} s; written to {out}")
    return 0


__all__ = ["main"]
