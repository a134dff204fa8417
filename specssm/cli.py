"""`specssm` command line: `specssm demo | bench | drift | sim | tune` (each with --help)."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("specssm.model.demo", "speculative decoding of a tiny Mamba2 LM, checked against greedy decoding"),
    "sim": ("specssm.sim.cli", "the reference-level speculative-decoding simulator"),
    "bench": ("specssm.bench.cli", "benchmark of the strategies against the bandwidth floor (GPU)"),
    "drift": ("specssm.bench.drift", "long-horizon drift of rounded / quantized checkpoints"),
    "tune": ("specssm.tune.cli", "search the step's launch knobs on this GPU and write its tuning table"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = "\n".join(f"  {k:6s} {v[1]}" for k, v in COMMANDS.items())
        usage = (f"usage: specssm <command> [options]\n\ncommands:\n{lines}\n\n"
                 "`specssm <command> --help` for its options")
        if argv and argv[0] in ("-h", "--help"):
            print(usage)
            return 0
        # no command or an unknown one: usage on stderr, exit code 2 (as argparse does)
        what = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"specssm: {what}\n{usage}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
