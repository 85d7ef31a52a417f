"""Fine-tune the embedded SmolLM2-135M-Instruct for a few steps on a text file, with the serving
layout (tp, sp), and save the result as a checkpoint that `LLM.from_pretrained` loads.

    python examples/finetune_smollm2.py --text examples/tiny_corpus.txt --steps 20 --tp 2 \\
        --out /tmp/smollm2-tuned
    jax-sp generate "What does sequence parallelism split?" --model /tmp/smollm2-tuned
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", default=os.path.join(os.path.dirname(__file__), "tiny_corpus.txt"))
    ap.add_argument("--out", required=True, help="a new folder for the tuned checkpoint")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--sp", default="on", choices=("on", "off"))
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--remat", default="selective", choices=("none", "full", "selective"))
    args = ap.parse_args(argv)

    from jax_sp.cli import ensure_devices

    ensure_devices(args.tp)
    import numpy as np

    from bridges.orbax_source import save
    from jax_sp import LLM, ParallelConfig
    from jax_sp.train import TrainConfig, Trainer, unpadded_params

    llm = LLM.from_pretrained("smollm2", parallel=ParallelConfig(tp=args.tp))
    ids = np.array(llm.tokenizer.encode(open(args.text).read()), np.int32)
    per = args.batch * args.seq_len
    if len(ids) < per:
        raise SystemExit(f"{args.text} has {len(ids)} tokens; need at least {per} "
                         f"(--batch x --seq-len)")
    chunks = ids[: len(ids) // per * per].reshape(-1, args.batch, args.seq_len)
    mask = np.ones((args.batch, args.seq_len), np.int32)

    tc = TrainConfig(learning_rate=args.lr, warmup_steps=max(1, args.steps // 10),
                     total_steps=args.steps, remat=args.remat)
    trainer = Trainer(llm.runtime, tc, sp=args.sp == "on")
    state = llm.state
    opt_state = trainer.init(state)
    t0 = time.perf_counter()
    losses = []
    for step in range(args.steps):
        state, opt_state, loss = trainer.step(state, opt_state, chunks[step % len(chunks)], mask)
        losses.append(float(loss))
        print(f"step {step + 1}/{args.steps}: loss {losses[-1]:.4f}", flush=True)
    print(f"{args.steps} steps in {time.perf_counter() - t0:.1f} s (compile included); loss "
          f"{losses[0]:.4f} -> {losses[-1]:.4f}")
    params = unpadded_params(llm.runtime, state)
    save(args.out, llm.cfg, params, "float32", llm.tokenizer)
    print(f"saved {args.out}; load it with LLM.from_pretrained({args.out!r})")
    return losses, llm.cfg, params


if __name__ == "__main__":
    main()
