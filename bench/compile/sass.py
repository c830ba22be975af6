"""What the compiled code says: the ptxas log, the PTX, and the SASS.

- ``parse_ptxas``: registers per thread, spill stores / loads and stack frame (bytes) from
  ``ptxas -v``, run by triton's own cubin stage (``run_ptxas`` when triton ignores the log knob).
- ``parse_ptx``: tensor-core instructions (``wgmma.mma_async`` on sm_90a, ``mma.sync`` on sm_80)
  and the widest global load / store in bytes (16 = ``ld.global.v4.b32``).
- ``parse_sass``: static SASS instructions by class (``cuobjdump -sass``).
- ``executed_per_cell``: the **executed** warp-instructions per cell of a launch, from the
  control-flow graph of the SASS (``nvdisasm -c``): its loop's body counted once per trip (a
  persistent program's tile loop runs once per tile it owns), forward branches on their longer
  side, nothing after EXIT. The same count as ``shared/tools/sass_count.py`` makes for the
  default variants (tests/test_compile.py holds them within 2 %).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from typing import Dict

from bench.compile.capture import grid_size
from bench.compile.variants import N_CELLS


_INS = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)\s*(.*?)\s*;?\s*$")
_LABEL = re.compile(r"^\s*(\.L_\w+):\s*$")
_TARGET = re.compile(r"`\((\.L_\w+)\)")


def _disassemble(tool: str, flag: str, cubin: bytes) -> str:
    """The text of ``tool flag CUBIN``, ``tool`` one of the CUDA binaries triton ships."""
    exe = tool_path(tool)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([exe, flag, path], capture_output=True, text=True,
                              check=True).stdout


def nvdisasm(cubin: bytes) -> str:
    return _disassemble("nvdisasm", "-c", cubin)


def parse_cfg(text: str):
    """Instructions [(op, predicated, target index or None)] of nvdisasm text, in order."""
    ins, labels, pending, targets = [], {}, [], []
    for raw in text.splitlines():
        m = _LABEL.match(raw)
        if m:
            pending.append(m[1])
            continue
        m = _INS.match(raw)
        if not m:
            continue
        for lab in pending:
            labels[lab] = len(ins)
        pending = []
        t = _TARGET.search(m[4]) if m[3].split(".")[0] in ("BRA", "JMP") else None
        ins.append([m[3], bool(m[2]), None])
        targets.append(t[1] if t else None)
    for i, lab in enumerate(targets):
        if lab is not None:
            ins[i][2] = labels[lab]
    return ins


def executed_per_program(ins, trips: int, inner_trips: int = 0) -> int:
    """Instructions one program executes: the longest path from the entry to EXIT, the loop
    body (a backward branch) counted ``trips`` times.

    At most one loop, or the tile loop with one loop nested in it (the hidden chunks of
    weights staged per tile), whose body counts ``inner_trips`` times per tile.
    Forward branches take their longer side; a conditional branch falls through or jumps;
    EXIT and unconditional branches end a path (with a predicate, EXIT falls through too)."""
    n = len(ins)
    # a branch to itself is the trap ptxas places after the last EXIT, never reached
    back = sorted((t, i) for i, (op, _, t) in enumerate(ins) if t is not None and t < i)
    inner = None
    if len(back) == 2 and inner_trips:
        (h0, l0), (h1, l1) = back
        if not (h0 <= h1 and l1 < l0):
            raise ValueError("2 loops in the SASS, not nested")
        inner = (h1, l1)
        back = [(l0, h0)]
    elif len(back) > 1:
        raise ValueError(f"{len(back)} loops in the SASS; the report counts kernels with one "
                         f"(or one nested in the tile loop)")
    else:
        back = [(i, t) for t, i in back]
    head, latch = (back[0][1], back[0][0]) if back else (n, n)

    def succ(i):
        op, pred, t = ins[i]
        base = op.split(".")[0]
        out = []
        if base in ("EXIT", "RET") and not pred:
            return out
        if base in ("BRA", "JMP") and t is not None:
            if t > i:                     # the back edge is the loop, walked separately
                out.append(t)
            elif t == i:                  # the trap after EXIT
                return out
            if not pred:
                return out
        if i + 1 < n:
            out.append(i + 1)
        return out

    def longest(start, stop_set, lo, hi):
        """Longest path length from start through instructions in [lo, hi] to any stop."""
        memo: Dict[int, int] = {}
        for i in range(hi, lo - 1, -1):
            best = None
            for j in succ(i):
                if j in stop_set or j > hi:
                    cand = 0
                elif j < lo:
                    continue
                else:
                    cand = memo.get(j)
                    if cand is None:
                        continue
                best = cand if best is None else max(best, cand)
            if best is None:
                best = 0 if not succ(i) else None
            if best is not None:
                memo[i] = best + 1
        return memo.get(start, 0)

    if not back:
        return longest(0, set(), 0, n - 1)
    if inner is None:
        body = longest(head, {latch + 1}, head, latch)     # one trip: head .. the back edge
    else:                                                  # head .. inner loop .. back edge
        ih, il = inner
        body = (longest(head, {ih}, head, ih - 1) if ih > head else 0)
        body += longest(ih, {il + 1}, ih, il) * inner_trips
        body += longest(il + 1, {latch + 1}, il + 1, latch)
    before = longest(0, {head}, 0, head - 1) if head else 0
    after = longest(latch + 1, set(), latch + 1, n - 1) if latch + 1 < n else 0
    return before + body * trips + after


def executed_per_cell(sass_text: str, launch, bound, num_warps: int) -> float:
    """Executed warp-instructions per cell of a recorded persistent launch."""
    gx, gy, gz = grid_size(launch[1], bound)
    programs = gx * gy * gz
    n_tiles = int(bound["n_tiles"])
    ins = parse_cfg(sass_text)
    # a loop inside the tile loop: the hidden chunks (weights staged per tile)
    inner = int(bound["HID"]) // int(bound["HC"]) if bound.get("HC") else 0
    total = 0
    for p in range(gx):              # programs along axis 0 walk tiles p, p + gx, ...
        trips = max(0, -(-(n_tiles - p) // gx))
        total += executed_per_program(ins, trips, inner) * gy * gz
    return total * num_warps / N_CELLS if programs else 0.0



_PTXAS_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                          r"(\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_NOTE = re.compile(r"\((C\d+)\) ([^\n]*)")
_MEM_OP = re.compile(r"\b(ld|st)\.global((?:\.\w+)*?)(?:\.v(\d))?\.[bfsu](\d+)\b")


def parse_ptxas(log: str) -> dict:
    """Registers, spills, stack and advisory notes from a ``ptxas -v`` log (one entry)."""
    props, regs = _PTXAS_PROPS.search(log), _PTXAS_REGS.search(log)
    if not (props and regs):
        raise ValueError(f"ptxas log: no register / spill lines in {log[:400]!r}")
    # line numbers differ per variant; without them equal notes group in the summary
    notes = sorted({f"{code}: {re.sub(r'line [0-9]+', 'line N', text)[:110]}"
                    for code, text in _PTXAS_NOTE.findall(log)})
    return dict(stack=int(props[1]), spill_stores=int(props[2]), spill_loads=int(props[3]),
                registers=int(regs[1]), ptxas_notes=" | ".join(notes))


def parse_ptx(ptx: str) -> dict:
    """Tensor-core instruction counts and global load / store widths (bytes) in PTX text."""
    loads: Dict[int, int] = {}
    widest = {"ld": 0, "st": 0}
    for op, _, vec, bits in _MEM_OP.findall(ptx):
        width = int(vec or 1) * int(bits) // 8
        widest[op] = max(widest[op], width)
        if op == "ld":
            loads[width] = loads.get(width, 0) + 1
    return dict(wgmma=len(re.findall(r"\bwgmma\.mma_async\b", ptx)),
                mma_sync=len(re.findall(r"(?<![\w.])mma\.sync\.", ptx)),
                widest_load=widest["ld"], widest_store=widest["st"], loads=loads)


# SASS opcode (before the first ".") -> class, for the instruction histogram of --sass.
SASS_CLASSES = {
    "tensor": ("HGMMA", "HMMA", "IMMA", "WARPGROUP"),
    "fp32": ("FFMA", "FADD", "FMUL", "FMNMX", "FSEL", "FSETP", "FSET", "MUFU", "FCHK", "FRND",
             "F2F", "F2FP", "HADD2", "HFMA2", "HMUL2", "HMNMX2", "HSETP2"),
    "int": ("IMAD", "IADD3", "IADD", "LOP3", "LOP", "SHF", "SHL", "SHR", "ISETP", "IMNMX", "LEA",
            "SEL", "PRMT", "IABS", "I2F", "F2I", "FLO", "POPC", "IMUL", "BMSK", "SGXT", "LEA_HI",
            "PLOP3", "P2R", "R2P", "VIADD", "VIMNMX", "I2FP", "F2IP"),
    "ld.global": ("LDG",), "st.global": ("STG", "RED", "ATOMG"),
    "shared": ("LDS", "STS", "LDSM", "STSM", "LDGSTS", "UBLKCP", "UTMALDG", "SYNCS"),
    "local": ("LDL", "STL"),
    "shuffle": ("SHFL",), "move": ("MOV", "UMOV", "S2R", "S2UR", "CS2R", "R2UR", "LDC", "ULDC"),
    "control": ("BRA", "BAR", "EXIT", "NOP", "BSSY", "BSYNC", "WARPSYNC", "DEPBAR", "RET",
                "CALL", "YIELD", "VOTE", "VOTEU", "MEMBAR", "FENCE", "ERRBAR", "CCTL"),
}
_SASS_CLASS_OF = {op: cls for cls, ops in SASS_CLASSES.items() for op in ops}
_SASS_LINE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")


def parse_sass(sass: str) -> Dict[str, int]:
    """Static instruction counts of ``cuobjdump -sass`` text by class (see SASS_CLASSES);
    opcodes outside the table count as "other"; uniform-datapath ops (U*) join their class."""
    counts = {cls: 0 for cls in (*SASS_CLASSES, "other")}
    for op in _SASS_LINE.findall(sass):
        cls = _SASS_CLASS_OF.get(op) or (_SASS_CLASS_OF.get(op[1:]) if op.startswith("U")
                                         else None)
        counts[cls or "other"] += 1
    return {k: n for k, n in counts.items() if n}


def cuobjdump_sass(cubin: bytes) -> str:
    return _disassemble("cuobjdump", "-sass", cubin)



def tool_path(tool: str) -> str:
    """One of the CUDA binaries triton ships (ptxas, nvdisasm, cuobjdump)."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def ptxas_path() -> str:
    return tool_path("ptxas")


def run_ptxas(ptx: str, arch: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        proc = subprocess.run([ptxas_path(), "-v", "--gpu-name", gpu, src, "-o",
                               os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
        return proc.stderr
