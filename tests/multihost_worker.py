"""One process of a 2-process jax.distributed test job (see test_multihost.py).

argv: PORT NUM_PROCESSES PROCESS_ID SCENARIO OUT_JSON. Builds the same tiny HF model in every
process, runs the scenario and writes its results (logits, greedy and sampled tokens) to OUT_JSON."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import faulthandler  # noqa: E402

faulthandler.dump_traceback_later(int(os.environ.get("MH_DUMP", "0")) or 10 ** 6, exit=True)
port, n, pid, scenario, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], \
    sys.argv[5]

from jax_sp.distributed import initialize  # noqa: E402

initialize(f"127.0.0.1:{port}", n, pid)

import jax  # noqa: E402

jax.devices()  # start the backend with 4 devices before conftest's flags are imported

from conftest import SAMPLED, _build, random_prompts  # noqa: E402
from jax_sp import LLM, ParallelConfig, SamplingParams  # noqa: E402

if scenario == "die" and pid == 1:
    os._exit(3)
model = _build("llama")
prompts = random_prompts(model.config.vocab_size, (5, 11), seed=7)
parallel = {"tp8": ParallelConfig(tp=8, sp="on"),
            "tp4pp2": ParallelConfig(tp=4, pp=2, sp="on"),
            "die": ParallelConfig(tp=8, sp="on")}[scenario]
llm = LLM.from_torch(model, parallel=parallel)
logits = [x.tolist() for x in llm.logits(prompts)]
tokens = [c.token_ids for c in llm.generate(prompts, SamplingParams(max_new_tokens=6))]
sampled = [c.token_ids for c in llm.generate(prompts, SAMPLED)]
json.dump({"process": jax.process_index(), "devices": len(jax.devices()),
           "local": len(jax.local_devices()), "logits": logits, "tokens": tokens,
           "sampled": sampled},
          open(out, "w"))
