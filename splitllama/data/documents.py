"""Documents from user files (``data.files``): ``.jsonl`` rows or blank-line-separated plain text."""

from __future__ import annotations

import errno
import json
import os
import stat
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
        problem = data_file_problem(path)
        if problem:
            raise RunConfigError(f"data.files: {path} {problem}")
        try:
            raw = path.read_bytes()
        except OSError as exc:  # permissions, an I/O error, a file that vanished
            raise RunConfigError(f"data.files: {path} cannot be read ({exc.strerror or exc}); check its permissions "
                                 "(it must be readable by this user) or copy it elsewhere") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw.count(b"\n", 0, exc.start) + 1
            raise RunConfigError(f"data.files: {path}:{line} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                                 "convert the file to UTF-8 (e.g. iconv -t UTF-8)") from None
        found = _jsonl_documents(path, text, text_field) if path.suffix == ".jsonl" else [
            p.strip() for p in text.split("\n\n") if p.strip()]
        if not found:
            raise RunConfigError(f"data.files: {path} holds no documents ({'an empty file' if not raw else 'only whitespace'}); "
                                 "write documents into it (plain text, separated by blank lines, or one JSON object per "
                                 "line in a .jsonl file) or drop it from data.files")
        documents.extend(found)
    return documents


def data_file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a data file, or ``None``: checked before it is opened, so a FIFO or a device (which
    ``open`` would wait on or read without end) and a symbolic link that loops or points nowhere are named as what
    they are, not as a missing file."""
    try:
        info = path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symbolic link that loops (it, or a link it points to, points back); point data.files at the file itself"
        if os.path.islink(path):
            return f"is a symbolic link to {os.readlink(path)}, which does not exist"
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return ("does not exist; list existing .txt or .jsonl files in data.files (a relative path is read from the "
                    "directory run.py starts in)")
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISDIR(info.st_mode):
        return "is a directory; list the .txt or .jsonl files in it"
    if not stat.S_ISREG(info.st_mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode)
                else "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else "not a regular file")
        return f"is {kind}, not a regular file; write the documents to a .txt or .jsonl file and list that"
    return None


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
