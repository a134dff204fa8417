"""Check that the installed torch / triton / numpy lie in the ranges pyproject.toml declares.

    python scripts/check_versions.py            # exit 1 naming each package out of range
    python scripts/check_versions.py --pins     # also check .ci/requirements.txt's pins against the ranges

`make gpu-test` runs it first: the GPU suite runs on the machine's own Python (a GPU box's torch comes
with its CUDA), so this is where an untested torch or triton would otherwise pass unnoticed.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ("torch", "triton", "numpy")


def _version(v: str) -> tuple:
    """'2.11.0+cu130' -> (2, 11, 0): the release numbers, local and pre-release tags dropped."""
    return tuple(int(p) for p in re.match(r"\d+(?:\.\d+)*", v).group(0).split("."))


def _cmp(a: tuple, b: tuple) -> int:
    n = max(len(a), len(b))
    a, b = a + (0,) * (n - len(a)), b + (0,) * (n - len(b))
    return (a > b) - (a < b)


OPS = {">=": lambda c: c >= 0, "<=": lambda c: c <= 0, ">": lambda c: c > 0, "<": lambda c: c < 0,
       "==": lambda c: c == 0, "!=": lambda c: c != 0}


def ranges(pyproject: Path = ROOT / "pyproject.toml") -> dict:
    """{package: [(op, version), ...]} from [project].dependencies (plain "name>=a,<b" strings)."""
    text = pyproject.read_text()
    deps = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, re.S | re.M).group(1)
    out = {}
    for spec in re.findall(r'"([^"]+)"', deps):
        name, rest = re.match(r"([A-Za-z0-9_.-]+)\s*(.*)", spec).groups()
        out[name.lower()] = [re.match(r"(>=|<=|==|!=|<|>)\s*(\S+)", s.strip()).groups()
                             for s in rest.split(",") if s.strip()]
    return out


def satisfies(version: str, spec: list) -> bool:
    return all(OPS[op](_cmp(_version(version), _version(v))) for op, v in spec)


def pins(path: Path = ROOT / ".ci" / "requirements.txt") -> dict:
    """{package: version} of the `name==version` lines."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", line.split("#")[0].strip())
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def problems(installed: dict, want: dict) -> list:
    return [f"{name} {v}: expected {','.join(op + x for op, x in want[name])} (pyproject.toml)"
            for name, v in installed.items() if name in want and not satisfies(v, want[name])]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pins", action="store_true", help="also check the CI pins of .ci/requirements.txt")
    a = ap.parse_args(argv)
    want = ranges()
    installed = {n: importlib.metadata.version(n) for n in CHECKED}
    bad = problems(installed, want)
    if a.pins:
        bad += [f"pin {p}" for p in problems(pins(), want)]
    print("versions: " + ", ".join(f"{n} {v}" for n, v in installed.items()))
    for b in bad:
        print(f"unsupported: {b}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
