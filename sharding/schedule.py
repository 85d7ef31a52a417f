"""Overlap census of a *scheduled* XLA program: does each collective run beside compute?

`compiled.as_text()` is the optimized module after scheduling (`is_scheduled=true`): each
computation's instructions are printed in the order they are issued. An asynchronous collective
is a start/done pair (`all-gather-start` / `all-gather-done`, `collective-permute-start` / `-done`,
or an `async-start` / `async-done` wrapping a computation that holds the collective, XLA:GPU's
form of reduce-scatter and all-to-all); whatever the schedule puts between the two runs while the
data moves. A collective is

  overlapped  when compute runs while it moves data: a compute instruction scheduled between
              its start and its done, or (for a collective issued synchronously, or any other)
              a compute op issued asynchronously on another stream before it and finished
              after it (XLA:GPU's multi-streamed windowed einsum runs its GEMMs as
              `custom-call-start` / `-done` on the "parallel" thread and some of its
              collective-permutes synchronously between them). Compute: a dot or convolution,
              a GEMM/attention custom call (cuBLAS, cuDNN, Triton, Mosaic), or a fusion, call,
              loop or async op whose computation holds one;
  exposed     otherwise: a synchronous collective with no asynchronous compute in flight
              (XLA:CPU's collectives are all synchronous; XLA:GPU marks pairs it turned
              synchronous with `"is_sync":true`), or a pair with nothing but elementwise work
              or other collectives between start and done.

A start whose done sits in the next trip of a while loop (the loop carries the in-flight
buffer, as XLA's pipelined windowed einsums do) spans the rest of the body after the start and
the part before the done; a start whose buffer enters a loop spans what comes before the loop and
the first trip's part before the done. A done that cannot be found leaves the start exposed.

Scope and counts come from `sharding.hlo.census` (per layer inside the scan over layers;
collectives of XLA's windowed-einsum loops inside a layer belong to that layer).
"""

from __future__ import annotations

import collections
import dataclasses
import re

from sharding.hlo import _CALLS, Collective, Computation, Instr, census, parse

_COMPUTE_OPS = {"dot", "convolution", "ragged-dot"}
_COMPUTE_TARGET = re.compile(r'custom_call_target="[^"]*(gemm|matmul|cublas|cudnn|triton|mosaic)',
                             re.IGNORECASE)
_TRITON_GEMM = re.compile(r'"kind":"__triton_gemm|__cublas|__cudnn')
_TUPLE_INDEX = re.compile(r"index=(\d+)")


@dataclasses.dataclass
class Overlap:
    """One collective of the census and what the schedule runs beside it."""

    collective: Collective
    computation: str  # the scheduled computation that holds its start (and done)
    asynchronous: bool  # a start/done pair (False: a synchronous collective)
    beside: list[str]  # compute instructions scheduled between start and done
    windowed: bool  # inside one of XLA's windowed-einsum loops

    @property
    def overlapped(self) -> bool:
        return bool(self.beside)

    @property
    def status(self) -> str:
        return "overlapped" if self.overlapped else "exposed"


def _computes(comps: dict[str, Computation], instr: Instr, seen: set[str]) -> bool:
    """Whether running `instr` does matrix (or attention) work."""
    if instr.opcode in _COMPUTE_OPS or _COMPUTE_TARGET.search(instr.rest):
        return True
    if instr.opcode == "fusion" and _TRITON_GEMM.search(instr.rest):
        return True
    for callee in _CALLS.findall(instr.rest):
        comp = comps.get(callee)
        if comp is None or callee in seen:
            continue
        seen.add(callee)
        if any(_computes(comps, i, seen) for i in comp.instrs):
            return True
    return False


def _done_of(comp: Computation, start: Instr) -> Instr | None:
    """The done that ends `start` in the same computation (through any async-update)."""
    names = {start.name}
    for instr in comp.instrs[comp.instrs.index(start) + 1:]:
        if instr.opcode.endswith("-update") and set(instr.operands) & names:
            names.add(instr.name)
        elif instr.opcode.endswith("-done") and set(instr.operands) & names:
            return instr
    return None


def _done_in_body(body: Computation, index: int) -> Instr | None:
    """The done in a while body that ends the async op carried in element `index` of the
    loop's tuple: done(get-tuple-element(param, index=index))."""
    by_name = {i.name: i for i in body.instrs}
    for instr in body.instrs:
        src = by_name.get(instr.operands[0]) if instr.operands else None
        if (instr.opcode.endswith("-done") and src is not None
                and src.opcode == "get-tuple-element" and src.operands == [body.params.get(0)]
                and int(_TUPLE_INDEX.search(src.rest).group(1)) == index):
            return instr
    return None


def _in_flight(comps: dict[str, Computation], comp: Computation, start: Instr):
    """Where `start` is in flight: a list of (computation, lo, hi) open intervals of schedule
    positions, or None when its done is not found. Up to its done in the same computation; in a
    while body whose root tuple carries it to the next trip, the rest of the body and the next
    trip's part before the done; when it enters a while loop's tuple (a first transfer peeled
    out of XLA's pipelined loop), up to the loop and the first trip's part before the done."""
    i = comp.instrs.index(start)
    done = _done_of(comp, start)
    if done is not None:
        return [(comp, i, comp.instrs.index(done))]
    root = comp.instrs[-1]
    if root.opcode == "tuple" and start.name in root.operands:
        done = _done_in_body(comp, root.operands.index(start.name))
        if done is not None:
            return [(comp, i, len(comp.instrs)), (comp, -1, comp.instrs.index(done))]
    for t in comp.instrs[i + 1:]:
        if t.opcode != "tuple" or start.name not in t.operands:
            continue
        for j, w in enumerate(comp.instrs):
            body = re.search(r"body=%?([\w.\-]+)", w.rest) if w.opcode == "while" else None
            if body and t.name in w.operands and body.group(1) in comps:
                body = comps[body.group(1)]
                done = _done_in_body(body, t.operands.index(start.name))
                if done is not None:
                    # up to the loop (the loop itself is counted by its first trip's part)
                    return [(comp, i, j - 0.5), (body, -1, body.instrs.index(done))]
    return None


def _compute_spans(comps: dict[str, Computation], comp: Computation):
    """(lo, hi, name) of each compute op of `comp` in schedule positions: (i - 0.5, i + 0.5)
    for one that runs where it is issued, (start, done) for one issued asynchronously on
    another stream (XLA:GPU's multi-streamed windowed einsum runs its GEMMs so)."""
    spans = []
    for i, instr in enumerate(comp.instrs):
        if instr.opcode.endswith(("-done", "-update")) or not _computes(comps, instr, set()):
            continue
        done = _done_of(comp, instr) if instr.opcode.endswith("-start") else None
        if done is not None:
            spans.append((i, comp.instrs.index(done), instr.name))
        else:
            spans.append((i - 0.5, i + 0.5, instr.name))
    return spans


def overlaps(hlo_text: str, layers: int | None = None) -> list[Overlap]:
    """Every collective of the census with the compute its schedule runs beside it: compute
    issued while an asynchronous collective is in flight, or compute running on another stream
    (started before, done after) while a synchronous one runs."""
    comps, _ = parse(hlo_text)
    # async-start wrappers: the wrapped computation -> (computation of the start, the start)
    wrapped = {callee: (comp, instr) for comp in comps.values() for instr in comp.instrs
               if instr.opcode == "async-start" for callee in _CALLS.findall(instr.rest)}
    windowed = _windowed_computations(comps)
    spans: dict[str, list] = {}
    found = []
    for c in census(hlo_text, layers):
        comp = comps[c.computation]
        start = next(i for i in comp.instrs if i.name == c.name)
        if c.computation in wrapped:
            comp, start = wrapped[c.computation]
        asynchronous = start.opcode.endswith("-start") and '"is_sync":true' not in start.rest
        i = comp.instrs.index(start)
        flight = (_in_flight(comps, comp, start) or []) if asynchronous else [
            (comp, i - 0.5, i + 0.5)]
        beside = []
        for where, lo, hi in flight:
            if where.name not in spans:
                spans[where.name] = _compute_spans(comps, where)
            beside += [name for a, b, name in spans[where.name] if a < hi and lo < b]
        found.append(Overlap(c, comp.name, asynchronous, beside, comp.name in windowed))
    return found


def _windowed_computations(comps: dict[str, Computation]) -> set[str]:
    """Names of XLA's windowed-einsum loop bodies and everything they call."""
    out: set[str] = set()
    stack = [n for n in comps if "windowed_dot_general_body" in n]
    while stack:
        name = stack.pop()
        if name in out or name not in comps:
            continue
        out.add(name)
        for instr in comps[name].instrs:
            stack.extend(_CALLS.findall(instr.rest))
    return out


def summarize_overlap(found: list[Overlap], layers: int | None = None) -> dict:
    """{scope: {kind: {"overlapped": n, "exposed": n, "windowed": n}}}, per layer for the
    "layer" scope when `layers` is given (counts per program run otherwise)."""
    out: dict = collections.defaultdict(lambda: collections.defaultdict(
        lambda: {"overlapped": 0, "exposed": 0, "windowed": 0}))
    for o in found:
        c = o.collective
        per = layers if (c.scope == "layer" and layers) else 1
        row = out[c.scope][c.kind]
        row[o.status] += c.count // per
        row["windowed"] += c.count // per if o.windowed else 0
    return {scope: dict(kinds) for scope, kinds in out.items()}


def format_overlap(found: list[Overlap], layers: int | None = None, title: str = "") -> str:
    """One line per collective instruction: scope, kind, tensor, count, status, what ran beside."""
    lines = [title] if title else []
    lines.append(f"  {'scope':8} {'collective':20} {'count':>5} {'tensor':>22}  "
                 f"{'schedule':10} beside it")
    for o in sorted(found, key=lambda o: (o.collective.scope != "layer", o.computation)):
        c = o.collective
        per = layers if (c.scope == "layer" and layers) else 1
        tensor = f"{c.dtype}[{','.join(map(str, c.dims))}]"
        if o.beside:
            what = f"{len(o.beside)} compute op(s): {', '.join(o.beside[:3])}"
            what += ", ..." if len(o.beside) > 3 else ""
        else:
            what = "async, no compute between start and done" if o.asynchronous else "synchronous"
        what += " [windowed einsum]" if o.windowed else ""
        lines.append(f"  {c.scope:8} {c.kind:20} {c.count // per:5d} {tensor:>22}  "
                     f"{o.status:10} {what}")
    return "\n".join(lines)
