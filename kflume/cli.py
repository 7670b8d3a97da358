"""The `kflume` command: `kflume demo` runs the end-to-end demo, `kflume node ...` starts an
attention node, `kflume check` checks the kernels on this machine."""

from __future__ import annotations

import argparse
import sys

USAGE = """usage: kflume COMMAND [ARGS]

commands:
  demo    a small Llama generating with its attention on attention nodes (kflume demo --help)
  node    start a weightless attention node (kflume node --help)
  check   check the kernels against float64 references and time them
  sim     replay a workload trace through serving systems and compare their cost
"""


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, when it has one worth saying."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or "default:" in text or action.required
                or default in (None, False, argparse.SUPPRESS) or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The argument parser every `kflume` command uses."""
    return argparse.ArgumentParser(prog=prog, description=description,
                                   formatter_class=HelpFormatter)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "node":
        from .node.main import main as node_main

        return node_main(rest)
    if cmd == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    if cmd == "check":
        from .kernels.check import main as check_main

        return check_main(rest)
    if cmd == "sim":
        from .sim.cli import main as sim_main

        return sim_main(rest)
    print(f"kflume: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
