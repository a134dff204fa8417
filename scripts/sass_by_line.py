"""SASS instructions per source line of a step kernel, compiled for sm_90 without a GPU.

usage: python scripts/sass_by_line.py [--kernel main|coef|fused] [--state int8] [--write] [--warps 4]
                                      [--block-p 64] [--no-tma] [--hb 8] [--maxnreg 96] [--top 40]
Prints the total per warp (static count: a persistent loop's body runs once per tile, its prologue once
per program) and the source lines that take the most instructions, with their top opcodes
(`nvdisasm -g` line info). The counts behind docs/performance.md.
"""
from __future__ import annotations

import argparse
import collections
import linecache
import os
import re
import subprocess
import sys
import tempfile

import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scripts.compile_check import SSU_BASE, STATES, compile_coef, compile_main, compile_one, ints_of, ssu_pointers


def sass_by_line(kernel):
    """(total, {(file, line): count}, {(file, line): Counter of opcodes}) of a compiled kernel."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([tool if os.path.exists(tool) else "nvdisasm", "-g", "-c", f.name],
                              capture_output=True, text=True, check=True).stdout
    where, counts, ops, total = None, collections.Counter(), collections.defaultdict(collections.Counter), 0
    for line in text.splitlines():
        m = re.search(r'//## File "([^"]+)", line (\d+)', line)
        if m:
            where = (m.group(1), int(m.group(2)))
            continue
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", line)
        if m:
            total += 1
            counts[where] += 1
            ops[where][m.group(2).split(".")[0]] += 1
    return total, counts, ops


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", default="main", choices=["main", "coef", "fused"])
    ap.add_argument("--state", default="int8", choices=list(STATES))
    ap.add_argument("--write", action="store_true", help="the write main (default: no-write)")
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--block-p", type=int, default=64)
    ap.add_argument("--no-tma", action="store_true")
    ap.add_argument("--hb", type=int, default=8, help="coefficient kernel: heads per program")
    ap.add_argument("--maxnreg", type=int, default=0)
    ap.add_argument("--top", type=int, default=40)
    a = ap.parse_args()
    if a.kernel == "main":
        k = compile_main(a.state, num_warps=a.warps, maxnreg=a.maxnreg or None, WRITE=a.write, TMA=not a.no_tma,
                         BLOCK_P=a.block_p)
    elif a.kernel == "coef":
        k = compile_coef(num_warps=a.warps, maxnreg=a.maxnreg or None, HB=a.hb)
    else:
        from specssm.step.fused import fused_kernel
        kind, sdt = STATES[a.state]
        cx = dict(SSU_BASE, KIND=kind, NATIVE_CS=kind in (1, 3, 4), BRANCH=1 if a.write else 0, USE_ORDER=a.write)
        k = compile_one(fused_kernel, ssu_pointers(fused_kernel, sdt), cx, num_warps=a.warps,
                        ints=ints_of(fused_kernel), maxnreg=a.maxnreg or None, label=f"fused {a.state}")
    total, counts, ops = sass_by_line(k)
    print(f"SASS instructions per warp: {total} (x {a.warps} warps: {total * a.warps})")
    for where, n in counts.most_common(a.top):
        src = linecache.getline(where[0], where[1]).strip()[:72] if where else ""
        name = f"{os.path.basename(where[0])}:{where[1]}" if where else "?"
        print(f"{n:5d}  {name:24s} {src:72s} {dict(ops[where].most_common(3))}")


if __name__ == "__main__":
    main()
