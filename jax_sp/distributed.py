"""Multi-process (multi-host) runs on jax.distributed.

`initialize` starts JAX's multi-controller runtime before anything touches a device: with an
explicit coordinator (`--coordinator HOST:PORT --num-processes N --process-id I`), or, when none
is given and a cluster launcher is detected (SLURM, Open MPI, or JAX_COORDINATOR_ADDRESS as
Kubernetes / GKE jobs set it), `jax.distributed.initialize()`'s own auto-detection. On CPU the
cross-process collectives use gloo.

Every process then runs the same program (multi-controller SPMD): the global mesh spans all
processes' devices, ordered process by process so that a tp group stays inside one host when it
fits (pp stages across hosts); each process places weights only on its own devices; outputs are
gathered so every process returns the same tokens and logits.

`launch_local(n, argv)` starts n such processes on this machine (for testing): each gets its own
share of simulated CPU devices, process 0's output is shown, and if any process fails the rest
are stopped.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

CLUSTER_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS")


def detected_cluster() -> str | None:
    for name in CLUSTER_ENV:
        if os.environ.get(name):
            return name
    return None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Start jax.distributed when asked or when a cluster is detected. Returns whether it ran."""
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ValueError("--coordinator, --num-processes and --process-id go together; give "
                         "all three, or none to let a cluster launcher (SLURM, Open MPI, "
                         "Kubernetes) provide them")
    if not any(given) and detected_cluster() is None:
        return False
    import jax

    if os.environ.get("JAX_PLATFORMS", "") == "cpu" or not _has_accelerator():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if all(given):
        jax.distributed.initialize(coordinator, num_processes, process_id)
    else:
        jax.distributed.initialize()
    return True


def _has_accelerator() -> bool:
    import importlib.util

    return importlib.util.find_spec("jax_cuda12_plugin") is not None or (
        importlib.util.find_spec("jax_cuda13_plugin") is not None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(n: int, argv: list[str], devices_per_process: int | None = None,
                 timeout: float | None = None) -> int:
    """Run `jax-sp <argv>` as n processes of one jax.distributed job on this machine."""
    if n < 1:
        raise ValueError(f"launch-local needs at least 1 process, got {n}")
    port = free_port()
    procs = []
    for i in range(n):
        env = dict(os.environ)
        if devices_per_process:
            flags = env.get("XLA_FLAGS", "")
            env["XLA_FLAGS"] = (f"{flags} --xla_force_host_platform_device_count="
                                f"{devices_per_process}").strip()
        cmd = [sys.executable, "-m", "jax_sp.cli", *argv, "--coordinator",
               f"127.0.0.1:{port}", "--num-processes", str(n), "--process-id", str(i)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=None if i == 0 else
                                      subprocess.PIPE, stderr=None if i == 0 else
                                      subprocess.STDOUT, text=True))
    logs = {}

    def drain(i, p):  # keep the other processes' pipes from filling up
        logs[i] = p.stdout.read()

    threads = [threading.Thread(target=drain, args=(i, p), daemon=True)
               for i, p in enumerate(procs) if i]
    for t in threads:
        t.start()
    return wait_all(procs, timeout, logs)


def wait_all(procs, timeout, logs=None) -> int:
    """Wait for every process; the first failure (or the timeout) stops the others."""
    import time

    deadline = None if timeout is None else time.monotonic() + timeout
    codes = [None] * len(procs)
    while any(c is None for c in codes):
        for i, p in enumerate(procs):
            if codes[i] is None:
                codes[i] = p.poll()
        failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
        late = deadline is not None and time.monotonic() > deadline
        if failed or late:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
            who = f"process {failed[0]} exited with {codes[failed[0]]}" if failed else \
                f"timed out after {timeout} s"
            detail = (logs or {}).get(failed[0], "") if failed else ""
            print(f"jax-sp launch-local: {who}; stopped the others" + (
                f"\n--- process {failed[0]} output ---\n{detail[-3000:]}" if detail else ""),
                file=sys.stderr)
            return failed and codes[failed[0]] or 1
        time.sleep(0.05)
    return 0
