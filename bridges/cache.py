"""What a first load of a GGUF file computes once and keeps for the next: the file's metadata
and tensor table, and its tokenizer converted to a `tokenizer.json` folder.

Parsing a GGUF file with the `gguf` package builds a Python object per vocabulary string (2 s for
SmolLM2's 49,152 tokens and merges), and transformers parses the file again to convert its
tokenizer (another 4-5 s). Both results depend on the file only, so they are kept under
`$JAX_SP_CACHE` (default `$XDG_CACHE_HOME/jax-sp`, else `~/.cache/jax-sp`) in a folder named by
the file's path, size and modification time: a changed or moved file is a new entry. Entries are
written to a temporary folder and renamed into place, so a reader never sees half an entry; a
cache that cannot be written costs the next load the slow path again, nothing else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile

log = logging.getLogger("jax_sp")
VERSION = 1  # of what an entry holds; a new version ignores older entries


def root() -> str:
    return os.environ.get("JAX_SP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "jax-sp")


def entry(path: str) -> str:
    """The cache folder of one file (it may not exist yet)."""
    st = os.stat(path)
    key = f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}:{VERSION}"
    name = os.path.basename(path).removesuffix(".gguf")[:40]
    return os.path.join(root(), "gguf", f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}")


def read_table(path: str) -> dict | None:
    """The cached metadata and tensor table of a GGUF file, or None."""
    try:
        with open(os.path.join(entry(path), "table.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def tokenizer_folder(path: str) -> str | None:
    folder = os.path.join(entry(path), "tokenizer")
    return folder if os.path.isfile(os.path.join(folder, "tokenizer_config.json")) else None


def store(path: str, table: dict | None = None, tokenizer=None) -> None:
    """Add the table and/or the tokenizer (saved with save_pretrained) to the file's entry."""
    final, tmp = entry(path), None
    try:
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(final), prefix=".tmp-")
        if os.path.isdir(final):
            shutil.copytree(final, tmp, dirs_exist_ok=True)
        if table is not None:
            with open(os.path.join(tmp, "table.json"), "w") as f:
                json.dump(table, f)
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
        old = final + ".old"
        if os.path.isdir(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        log.warning("could not write the cache entry %s (%s); the next load converts again",
                    final, e)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
