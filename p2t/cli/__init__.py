"""`p2t` command line: train, compare, localise, attribute, bench, env.

Each sub-command lives in its own module with ``configure(parser)`` and ``run(args) -> int``;
modules are imported only when their command runs, so `p2t env` stays fast. A command rejects a bad
argument by raising :class:`p2t.cli.checks.ArgumentError`: one line on stderr naming it, exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "train": ("p2t.cli.train", "GRPO training; by default the embedded toy lab in P2T mode"),
    "compare": ("p2t.cli.compare", "outcome vs process vs P2T rewards on the toy lab, several seeds, plot + table"),
    "localise": ("p2t.cli.localise", "toy lab: do the attributions point at the wrong tokens? AUROC and entropy"),
    "attribute": ("p2t.cli.attribute", "per-token PRM attributions as a terminal heatmap and an HTML file"),
    "bench": ("p2t.cli.bench", "short benchmark of every backend vs reference vs torch.compile"),
    "env": ("p2t.cli.env", "versions, devices and available backends"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="p2t", description="Process-to-token reward attribution for GRPO.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if argv and argv[0] == name:
            importlib.import_module(module).configure(p)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from .checks import ArgumentError
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except ArgumentError as e:
        print(f"p2t {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
