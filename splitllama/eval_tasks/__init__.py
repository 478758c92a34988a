"""splitllama's own lm-evaluation-harness tasks, made offline from the standard library.

``python run.py`` must score downstream tasks on a machine with no network, so the package
ships task definitions (the YAML files beside this module) whose items are made here, from the
docstrings of the installed Python's standard library (the corpus :mod:`splitllama.embedded`
trains its donors on):

- ``stdlib_docstring_name``: a function's docstring (its own name masked) and four qualified
  names; which function does it describe?
- ``stdlib_docstring_next``: the opening of a docstring and four sentences; which one comes next?
  (the three others are next sentences of other docstrings, HellaSwag-style).

The test items come from the validation split of the corpus the models learn (the hash of
:func:`splitllama.data.in_validation` at the default ``val_fraction``), which neither
the embedded donors nor a split model train on: for ``stdlib_source`` (the default), docstrings
found only in held-out source files; for ``stdlib_docstrings``, held-out docstrings. The few-shot
pool (``train``) comes from the rest. Generation is deterministic: same Python, same items. :func:`build_task_data`
writes the JSONL files and a copy of each YAML that points at them into
``<cache_dir>/eval_tasks/<key>/``, the folder lm-eval gets as ``include_path``.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Bump when the item-making code below changes what it writes.
TASK_DATA_VERSION = 2
#: The tasks this package ships (YAML files in this folder).
OWN_TASKS = ("stdlib_docstring_name", "stdlib_docstring_next")
#: Which corpus documents are held out (DataConfig's and the embedded recipe's default).
HELD_OUT_FRACTION = 0.05
#: Few-shot pool size per task (items from training-split docstrings).
FEWSHOT_ITEMS = 32
#: At most this many test items per task (run time is set by ``eval.harness.limit``).
MAX_TEST_ITEMS = 400
NUM_CHOICES = 4
#: Item length bounds (characters): every item is scored as NUM_CHOICES sequences, so its
#: length sets the cost of an evaluation.
MAX_CONTEXT_CHARS = 240
MAX_CHOICE_CHARS = 120
MIN_DOC_CHARS = 80
TASKS_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class DocumentedFunction:
    """A public standard-library function or method and its (cleaned) docstring."""

    qualname: str
    name: str
    docstring: str
    #: the stdlib file it is defined in (relative to the stdlib root)
    source: str = ""


def documented_functions(min_chars: int = MIN_DOC_CHARS) -> list[DocumentedFunction]:
    """Public functions and methods of the standard library with a docstring of at least
    ``min_chars`` characters, in file order; docstrings shared by several functions are dropped
    (such an item would have more than one right answer)."""
    from ..embedded import stdlib_files

    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[DocumentedFunction] = []
    for path in stdlib_files():
        parts = path.relative_to(root).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        for node, owner in _public_defs(tree):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= min_chars:
                found.append(DocumentedFunction(f"{module}.{owner}{node.name}", node.name, doc, str(path.relative_to(root))))
    counts: dict[str, int] = {}
    for fn in found:
        counts[fn.docstring] = counts.get(fn.docstring, 0) + 1
    return [fn for fn in found if counts[fn.docstring] == 1]


def _public_defs(tree: ast.Module) -> list[tuple[ast.FunctionDef | ast.AsyncFunctionDef, str]]:
    """Top-level functions and methods of top-level classes whose names do not start with ``_``."""
    defs: list[tuple[Any, str]] = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            defs.append((node, ""))
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            defs += [(sub, f"{node.name}.") for sub in node.body
                     if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and not sub.name.startswith("_")]
    return defs


def _first_paragraph(text: str, max_chars: int) -> str:
    paragraph = " ".join(text.split("\n\n")[0].split())
    return paragraph if len(paragraph) <= max_chars else paragraph[:max_chars].rsplit(" ", 1)[0] + " ..."


def _mc_item(rng: random.Random, correct: str, pool: list[str], **fields: Any) -> dict[str, Any]:
    """A multiple-choice item: the right answer at a random position among ``NUM_CHOICES - 1``
    distinct others drawn from ``pool``."""
    choices: list[str] = []
    while len(choices) < NUM_CHOICES - 1:
        other = rng.choice(pool)
        if other != correct and other not in choices:
            choices.append(other)
    label = rng.randrange(NUM_CHOICES)
    choices.insert(label, correct)
    return {**fields, "choices": choices, "label": label}


def name_items(functions: list[DocumentedFunction], seed: int) -> list[dict[str, Any]]:
    """``stdlib_docstring_name`` items: the docstring's first paragraph with the function's own
    name masked (``___``), the right qualified name and three others."""
    rng = random.Random(seed)
    names = [fn.qualname for fn in functions]
    items = []
    for fn in functions:
        masked = re.sub(rf"\b{re.escape(fn.name)}\b", "___", fn.docstring)
        items.append(_mc_item(rng, fn.qualname, names, docstring=_first_paragraph(masked, MAX_CONTEXT_CHARS), function=fn.qualname))
    return items


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _opening_and_next(docstring: str) -> tuple[str, str] | None:
    """The docstring's opening (whole sentences, 40 to MAX_CONTEXT_CHARS characters) and the
    sentence after it (cut at MAX_CHOICE_CHARS)."""
    sentences = _SENTENCE_END.split(" ".join(docstring.split()))
    for cut in range(1, len(sentences)):
        opening = " ".join(sentences[:cut])
        if len(opening) > MAX_CONTEXT_CHARS:
            return None
        if len(opening) >= 40:
            following = sentences[cut]
            if len(following) < 20:
                return None
            return opening, following if len(following) <= MAX_CHOICE_CHARS else following[:MAX_CHOICE_CHARS].rsplit(" ", 1)[0] + " ..."
    return None


def next_items(documents: list[str], seed: int) -> tuple[list[dict[str, Any]], list[str]]:
    """``stdlib_docstring_next`` items (a docstring's opening, its next sentence and three next
    sentences of other docstrings) and the docstring each was made from."""
    rng = random.Random(seed)
    pairs = [(doc, pair) for doc in documents if (pair := _opening_and_next(doc)) is not None]
    followings = [following for _, (_, following) in pairs]
    items = [_mc_item(rng, following, followings, context=opening) for _, (opening, following) in pairs]
    return items, [doc for doc, _ in pairs]


@functools.cache
def source_files_of_docstrings() -> tuple[dict[str, set[str]], dict[str, bool]]:
    """Which stdlib files each (cleaned) docstring occurs in, and which files the ``stdlib_source``
    corpus holds out (its documents are whole files, read as :func:`~splitllama.embedded.collect_stdlib_source` does).

    Parsing the whole stdlib takes about 5 s on 2 cores, and a task build asks once per task: cached for the
    process (the installed stdlib does not change under it). Callers read the result, never change it."""
    from ..embedded import stdlib_sources
    from ..data import in_validation

    root = Path(sysconfig.get_paths()["stdlib"])
    files_of: dict[str, set[str]] = {}
    held_out: dict[str, bool] = {}
    for path, text in stdlib_sources():
        name = str(path.relative_to(root))
        held_out[name] = len(text) >= MIN_DOC_CHARS and in_validation(text, HELD_OUT_FRACTION)
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc:
                    files_of.setdefault(doc, set()).add(name)
    return files_of, held_out


def held_out_items(docstrings: list[str], corpus: str) -> list[bool]:
    """Per docstring: unseen by a model trained on ``corpus``'s training split."""
    from ..data import in_validation

    if corpus == "stdlib_docstrings":
        return [in_validation(doc, HELD_OUT_FRACTION) for doc in docstrings]
    files_of, file_held_out = source_files_of_docstrings()
    return [bool(files_of.get(doc)) and all(file_held_out.get(f, False) for f in files_of[doc]) for doc in docstrings]


def _key(corpus: str) -> str:
    from ..embedded import corpus_key

    ident = {"version": TASK_DATA_VERSION, "corpus": corpus_key(MIN_DOC_CHARS), "held_out": HELD_OUT_FRACTION,
             "fewshot": FEWSHOT_ITEMS, "max_test": MAX_TEST_ITEMS, "chars": [MAX_CONTEXT_CHARS, MAX_CHOICE_CHARS],
             "yaml": {t: (TASKS_DIR / f"{t}.yaml").read_text() for t in OWN_TASKS}}
    if corpus != "stdlib_docstrings":
        ident["held_out_of"] = corpus_key(MIN_DOC_CHARS, corpus)
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _splits(items: list[dict[str, Any]], held_out: list[bool], seed: int) -> dict[str, list[dict[str, Any]]]:
    """Test items (held-out docstrings, at most MAX_TEST_ITEMS) and the few-shot pool, deterministically."""
    rng = random.Random(seed)
    test = [item for item, out in zip(items, held_out) if out]
    train = [item for item, out in zip(items, held_out) if not out]
    return {"test": sorted(rng.sample(test, min(len(test), MAX_TEST_ITEMS)), key=test.index),
            "train": rng.sample(train, min(len(train), FEWSHOT_ITEMS))}


def build_task_data(cache_dir: str | os.PathLike[str], corpus: str = "stdlib_source") -> Path:
    """Write our tasks' items and YAML files into ``<cache_dir>/eval_tasks/<key>/`` (once; later
    calls return the folder); the folder is what lm-eval's ``include_path`` takes. ``corpus``: the
    stdlib corpus the scored models learn, whose held-out split the test items come from."""
    import yaml

    from ..embedded import CORPORA, load_stdlib_corpus

    if corpus not in CORPORA:
        raise ValueError(f"corpus={corpus!r}: unknown; one of {', '.join(CORPORA)}")
    out = Path(cache_dir).expanduser() / "eval_tasks" / _key(corpus)
    if all((out / f"{task}.yaml").is_file() for task in OWN_TASKS):
        return out
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    functions = documented_functions()
    documents = load_stdlib_corpus(cache_dir, MIN_DOC_CHARS, progress=False)
    next_task, next_sources = next_items(documents, seed=2)
    made = {
        "stdlib_docstring_name": (name_items(functions, seed=1), [f.docstring for f in functions]),
        "stdlib_docstring_next": (next_task, next_sources),
    }
    for task, (items, sources) in made.items():
        held_out = held_out_items(sources, corpus)
        files = {}
        for split, rows in _splits(items, held_out, seed=3).items():
            files[split] = str(out / f"{task}.{split}.jsonl")
            (tmp / f"{task}.{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        config = yaml.safe_load((TASKS_DIR / f"{task}.yaml").read_text())
        config["dataset_kwargs"] = {"data_files": files}
        (tmp / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if out.exists():  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        return out
    os.replace(tmp, out)
    return out


__all__ = ["OWN_TASKS", "DocumentedFunction", "build_task_data", "documented_functions", "held_out_items", "name_items", "next_items"]
