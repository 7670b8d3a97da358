"""The `kflume` command: `kflume demo` runs the end-to-end demo, `kflume node ...` starts an
attention node, `kflume check` checks the kernels on this machine."""

from __future__ import annotations

import sys

USAGE = """usage: kflume COMMAND [ARGS]

commands:
  demo    a small Llama generating with its attention on attention nodes (kflume demo --help)
  node    start a weightless attention node (kflume node --help)
  check   check the kernels against float64 references and time them
  sim     simulate cost and latency of kflume against replicas on a trace (kflume sim --help)
"""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "node":
        from .launch import main as node_main

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
