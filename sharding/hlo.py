"""Collective census of a compiled XLA program: what it communicates, where, and how much.

Reads the optimized HLO text (`compiled.as_text()`) and lists every all-reduce, reduce-scatter,
all-gather, collective-permute and all-to-all with its shape, group size and bytes. Collectives
inside a while loop's body count once per trip (when XLA knows the trip count). Scope: "layer"
for the body of the scan over layers (a loop of `layers` trips) and loops inside it (XLA's
windowed-einsum loops), "loop" for other loop bodies (a decode loop, whose trip count is
dynamic: counted once per iteration), else "outside". Whether each collective overlaps compute
in the schedule is `sharding/schedule.py`'s question.

Bytes: `tensor_bytes` is the full tensor a collective operates on (the all-reduced tensor, the
reduce-scatter input, the all-gather output, the permuted buffer). `wire_bytes` is what each
device sends in a ring implementation: all-reduce 2(n-1)/n, reduce-scatter and all-gather (n-1)/n,
all-to-all (n-1)/n of tensor_bytes, collective-permute all of it. So an all-reduce and the
reduce-scatter + all-gather that SP puts in its place move the same wire bytes.

Backend forms: XLA:CPU lowers an auto-partitioned reduce-scatter as all-reduce followed by a
dynamic-slice of the local shard (GPU and TPU rewrite the pair into reduce-scatter). The census
counts such a pair as a reduce-scatter and marks it `via="all-reduce+dynamic-slice"`. Async pairs
(`*-start`/`*-done`, `async-start` wrappers) are counted once, at the collective itself.
XLA:CPU also runs every bf16/f16 collective in f32: it converts the (already rounded) payload up
just before the collective. The census reports such a collective in its payload dtype, with its
bytes in that dtype (what GPU and TPU move), and marks it `wire_dtype="f32"`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re

KINDS = ("all-reduce", "reduce-scatter", "all-gather", "collective-permute", "all-to-all")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\) -> .*\{\s*$")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
_CALLS = re.compile(
    r"(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_OPERAND = re.compile(r"%([\w.\-]+)")
WINDOWED_EINSUM = ("windowed_dot_general_body_ag", "windowed_dot_general_body_rs")


@dataclasses.dataclass
class Instr:
    name: str
    shape: str
    opcode: str
    rest: str  # operands and attributes

    @property
    def operands(self) -> list[str]:
        depth, args = 0, []
        for i, ch in enumerate(self.rest):  # operands end at the matching ')'
            depth += ch == "("
            depth -= ch == ")"
            if depth < 0:
                args = self.rest[:i]
                break
        return _OPERAND.findall(args)


@dataclasses.dataclass
class Computation:
    name: str
    instrs: list[Instr]
    params: dict[int, str]  # parameter number -> instruction name


def parse(hlo_text: str) -> tuple[dict[str, Computation], str]:
    comps, entry, current = {}, None, None
    for line in hlo_text.splitlines():
        head = _HEADER.match(line)
        if head:
            current = Computation(head.group(2), [], {})
            comps[current.name] = current
            entry = current.name if head.group(1) else entry
            continue
        if current is None or " = " not in line:
            continue
        lhs, rhs = line.strip().split(" = ", 1)
        name = lhs.replace("ROOT ", "").lstrip("%")
        if rhs.startswith("("):  # tuple shape: up to the matching paren
            depth = 0
            for i, ch in enumerate(rhs):
                depth += (ch == "(") - (ch == ")")
                if depth == 0:
                    break
            shape, rest = rhs[: i + 1], rhs[i + 2:]
        else:
            shape, _, rest = rhs.partition(" ")
        opcode, _, rest = rest.partition("(")
        instr = Instr(name, shape, opcode, rest)
        current.instrs.append(instr)
        if opcode == "parameter":
            current.params[int(rest.split(")")[0])] = name
    return comps, entry


def _arrays(shape: str) -> list[tuple[str, str]]:
    """(dtype, dims) of each array in a shape, leaving out the scalar context words an async
    start carries after its buffers (XLA:GPU's collective-permute-start: u32[], u32[])."""
    arrays = _ARRAY.findall(shape)
    return [a for a in arrays if a[1]] or arrays


def array_bytes(shape: str) -> int:
    """Bytes of an array shape; for a tuple, of its last element (an async op's result)."""
    arrays = _arrays(shape)
    if not arrays:
        return 0
    dtype, dims = arrays[-1]
    return _DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)


def array_dims(shape: str) -> tuple[int, ...]:
    arrays = _arrays(shape)
    return tuple(int(d) for d in arrays[-1][1].split(",") if d) if arrays else ()


def group_size(attrs: str) -> int:
    """Devices per replica group, from any of XLA's three spellings."""
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if mesh:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", mesh.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", mesh.group(2)))
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
    if iota:
        return int(iota.group(2))
    explicit = re.search(r"replica_groups=\{\{([^}]*)\}", attrs)
    if explicit:
        return len(explicit.group(1).split(","))
    pairs = re.search(r"source_target_pairs=\{(.*?)\}\}?", attrs)
    if pairs:
        return len(re.findall(r"\{\d+,\d+\}", attrs))
    return 1


@dataclasses.dataclass
class Collective:
    kind: str
    dtype: str
    dims: tuple[int, ...]  # of the full tensor (see tensor_bytes)
    group: int
    tensor_bytes: int
    count: int  # executions per program run (trip counts of enclosing loops)
    scope: str  # "layer" inside a while body, else "outside"
    via: str = ""
    name: str = ""
    wire_dtype: str = ""  # set when the backend moves the payload in a wider type (XLA:CPU)
    computation: str = ""  # the computation that holds the collective instruction

    @property
    def wire_bytes(self) -> float:
        n = self.group
        factor = {"all-reduce": 2 * (n - 1) / n, "collective-permute": 1.0}.get(
            self.kind, (n - 1) / n)
        return factor * self.tensor_bytes


def _sliced_locally(comps, comp, ar: Instr, n: int) -> bool:
    """Whether every use of all-reduce `ar` keeps a 1/n dynamic-slice of it."""
    dims = array_dims(ar.shape)
    users = [i for i in comp.instrs if ar.name in i.operands]
    if not users:
        return False
    for user in users:
        if user.opcode == "dynamic-slice":
            sliced = [user]
        elif user.opcode == "fusion":
            fused = comps.get(_CALLS.search(user.rest).group(1))
            param = fused.params.get(user.operands.index(ar.name)) if fused else None
            sliced = [i for i in fused.instrs if param in i.operands] if param else []
        else:
            return False
        for s in sliced:
            out = array_dims(s.shape)
            if s.opcode != "dynamic-slice" or len(out) != len(dims) or sorted(
                    a // b for a, b in zip(dims, out) if b) != [1] * (len(dims) - 1) + [n]:
                return False
        if not sliced:
            return False
    return True


def _payload_dtype(comps, comp, instr: Instr) -> str | None:
    """The narrow dtype a widened collective operand was rounded to just before it, if any:
    operand = convert(f32 <- x) with x of a 16-bit float type, directly or as a fusion root."""
    by_name = {i.name: i for i in comp.instrs}
    src, scope = by_name.get(instr.operands[0]) if instr.operands else None, by_name
    if src is not None and src.opcode == "fusion":
        fused = comps.get(_CALLS.search(src.rest).group(1))
        scope = {i.name: i for i in fused.instrs}
        src = fused.instrs[-1] if fused.instrs else None  # the ROOT comes last
    if src is None or src.opcode != "convert" or not src.operands:
        return None
    inner = scope.get(src.operands[0])
    narrow = _ARRAY.findall(inner.shape)[-1][0] if inner is not None else None
    return narrow if narrow in ("bf16", "f16") else None


def census(hlo_text: str, layers: int | None = None) -> list[Collective]:
    """All collectives of a program. `layers`: the trip count that marks the scan over layers
    (when None, every loop body counts as "layer")."""
    comps, entry = parse(hlo_text)
    # Execution count and scope of each computation, walking calls from the entry.
    runs = {entry: (1, "outside")}
    stack = [entry]
    while stack:
        comp = comps[stack.pop()]
        count, scope = runs[comp.name]
        for instr in comp.instrs:
            callees = _CALLS.findall(instr.rest)
            branches = _BRANCHES.search(instr.rest)
            if branches:
                callees += _OPERAND.findall(branches.group(1))
            trips = _TRIPS.search(instr.rest)
            for callee in callees:
                if callee not in comps or callee in runs:
                    continue
                if instr.opcode == "while":
                    n = int(trips.group(1)) if trips else None
                    # a loop inside a layer (XLA's windowed einsum) is part of the layer
                    is_layers = layers is None or n == layers or scope == "layer"
                    runs[callee] = (count * (n or 1), "layer" if is_layers else "loop")
                else:
                    runs[callee] = (count, scope)
                stack.append(callee)
    found = []
    for name, (count, scope) in runs.items():
        comp = comps[name]
        for instr in comp.instrs:
            kind = instr.opcode.removesuffix("-start")
            if kind not in KINDS:
                continue
            n = group_size(instr.rest)
            dtype = _arrays(instr.shape)[-1][0]
            dims, size, via, wire = array_dims(instr.shape), array_bytes(instr.shape), "", ""
            narrow = _payload_dtype(comps, comp, instr) if dtype == "f32" else None
            if narrow:
                dtype, wire, size = narrow, "f32", size // 2
            if kind == "reduce-scatter":  # the full tensor is the input
                dims = tuple(d * n if i == _scatter_dim(instr) else d for i, d in enumerate(dims))
                size *= n
            if kind == "all-reduce" and n > 1 and _sliced_locally(comps, comp, instr, n):
                kind, via = "reduce-scatter", "all-reduce+dynamic-slice"
            found.append(Collective(kind, dtype, dims, n, size, count, scope, via, instr.name,
                                    wire, comp.name))
    return found


def _scatter_dim(instr: Instr) -> int:
    m = re.search(r"dimensions=\{(\d+)\}", instr.rest)
    return int(m.group(1)) if m else 0


def windowed_einsum_loops(hlo_text: str) -> dict[str, int]:
    """XLA's collective-matmul loops (windowed einsum) found in optimized HLO, by kind."""
    comps, _ = parse(hlo_text)
    return {kind: sum(kind in name for name in comps) for kind in WINDOWED_EINSUM}


def summarize(collectives: list[Collective], layers: int | None = None) -> dict:
    """{scope: {kind: {"count", "tensor_bytes", "wire_bytes"}}}; "layer" figures are per layer
    when `layers` (the scan's trip count) is given, else summed over all trips."""
    out: dict = collections.defaultdict(lambda: collections.defaultdict(
        lambda: {"count": 0, "tensor_bytes": 0, "wire_bytes": 0.0}))
    for c in collectives:
        per = layers if (c.scope == "layer" and layers) else 1
        row = out[c.scope][c.kind]
        row["count"] += c.count // per
        row["tensor_bytes"] += c.tensor_bytes * c.count // per
        row["wire_bytes"] += c.wire_bytes * c.count / per
    return json.loads(json.dumps(out))


def format_census(collectives: list[Collective], layers: int | None = None,
                  title: str = "") -> str:
    lines = [title] if title else []
    lines.append(f"  {'scope':8} {'collective':20} {'n':>3} {'count':>6} {'tensor':>22} "
                 f"{'wire MiB':>9}  note")
    for c in sorted(collectives, key=lambda c: (c.scope != "layer", KINDS.index(c.kind))):
        per = layers if (c.scope == "layer" and layers) else 1
        scope = "layer" if c.scope == "layer" and layers else c.scope
        tensor = f"{c.dtype}[{','.join(map(str, c.dims))}]"
        note = "; ".join(x for x in ("CPU form: all-reduce + dynamic-slice" if c.via else "",
                                     f"XLA:CPU sends it as {c.wire_dtype}" if c.wire_dtype
                                     else "") if x)
        lines.append(f"  {scope:8} {c.kind:20} {c.group:3d} {c.count // per:6d} {tensor:>22} "
                     f"{c.wire_bytes * c.count / per / 2**20:9.3f}  {note}")
    return "\n".join(lines)
