"""SASS instructions per source line of the step kernel, compiled for sm_90 without a GPU.

usage: python scripts/sass_by_line.py [--state int8] [--branch nowrite|write|dynamic] [--maxnreg 96] [--tn 8]
                                      [--top 40]
Prints the total per warp and the source lines that take the most instructions, with their top opcodes
(`nvdisasm -g` line info). The counts behind docs/performance.md's "where the instructions go".
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
from scripts.compile_check import SSU_BASE, SSU_INTS, compile_one, ssu_pointers  # noqa: E402

STATES = {"fp32": (0, "*fp32"), "bf16": (1, "*bf16"), "fp16": (2, "*fp16"), "int8": (3, "*i8"),
          "fp8": (4, "*fp8e4nv")}
BRANCHES = {"dynamic": 0, "write": 1, "nowrite": 2}


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
    from specssm.ops.checkpointing import _ssu_kernel
    ap = argparse.ArgumentParser()
    ap.add_argument("--state", default="int8", choices=list(STATES))
    ap.add_argument("--branch", default="nowrite", choices=list(BRANCHES))
    ap.add_argument("--maxnreg", type=int, default=0)
    ap.add_argument("--tn", type=int, default=8)
    ap.add_argument("--top", type=int, default=40)
    a = ap.parse_args()
    kind, sdt = STATES[a.state]
    branch = BRANCHES[a.branch]
    cx = dict(SSU_BASE, KIND=kind, TN=a.tn, NK=triton.next_power_of_2(SSU_BASE["KH"] + a.tn), NATIVE_CS=kind in (1, 3, 4),
              BRANCH=branch, USE_ORDER=branch != 0)
    k = compile_one(_ssu_kernel, ssu_pointers(_ssu_kernel, sdt), cx, ints=SSU_INTS, maxnreg=a.maxnreg or None,
                    label=f"ssu {a.state} {a.branch} TN={a.tn}")
    total, counts, ops = sass_by_line(k)
    print(f"SASS instructions per warp: {total}")
    for where, n in counts.most_common(a.top):
        src = linecache.getline(where[0], where[1]).strip()[:72] if where else ""
        name = f"{os.path.basename(where[0])}:{where[1]}" if where else "?"
        print(f"{n:5d}  {name:24s} {src:72s} {dict(ops[where].most_common(3))}")


if __name__ == "__main__":
    main()
