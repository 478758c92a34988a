"""Documents from user files (``data.files``): ``.jsonl`` rows or blank-line-separated plain text."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import RunConfigError


def read_text_files(files: Sequence[str], text_field: str = "text") -> list[str]:
    """Documents from user files: ``.jsonl`` (one JSON object per line, its ``text_field`` a string) or plain
    text (documents separated by blank lines), UTF-8. Every error names the file (and the line where there
    is one): a missing file or a directory, bytes that are not UTF-8, a file without documents, a row that
    is not JSON, lacks the field, or holds something other than text (null, a number: never stringified)."""
    documents: list[str] = []
    for name in files:
        path = Path(os.path.expanduser(name))
        if path.is_dir():
            raise RunConfigError(f"data.files: {path} is a directory; list the .txt or .jsonl files in it")
        if not path.is_file():
            raise RunConfigError(f"data.files: {path} does not exist")
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw.count(b"\n", 0, exc.start) + 1
            raise RunConfigError(f"data.files: {path}:{line} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                                 "convert the file to UTF-8 (e.g. iconv -t UTF-8)") from None
        found = _jsonl_documents(path, text, text_field) if path.suffix == ".jsonl" else [
            p.strip() for p in text.split("\n\n") if p.strip()]
        if not found:
            raise RunConfigError(f"data.files: {path} holds no documents ({'an empty file' if not raw else 'only whitespace'})")
        documents.extend(found)
    return documents


def _jsonl_documents(path: Path, text: str, text_field: str) -> list[str]:
    documents = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RunConfigError(f"data.files: {path}:{lineno} is not valid JSON ({exc.msg}, column {exc.colno}); "
                                 "a .jsonl file holds one JSON object per line") from None
        if not isinstance(record, dict) or text_field not in record:
            raise RunConfigError(f"data.files: {path}:{lineno} has no field data.text_field={text_field!r}")
        value = record[text_field]
        if not isinstance(value, str):
            raise RunConfigError(f"data.files: {path}:{lineno}: its {text_field!r} is {json.dumps(value)[:40]}, not text; "
                                 "each row's data.text_field must be a JSON string")
        documents.append(value)
    return documents
