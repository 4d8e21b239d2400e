"""The `sliceproxy` command: run, subsetter, dump, trace, uninstall."""

from __future__ import annotations

import sys

from ..dataplane.libbpf import BPFError
from ..util.logs import setup_logging
from .parser import build_parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "log_level"):
        setup_logging(args.log_level, args.log_format)
    if getattr(args, "log_level", "info") != "debug":
        from ..dataplane.libbpf import quiet

        try:
            quiet()
        except BPFError:
            pass  # no libbpf at all: the command says so when it needs it
    try:
        if args.cmd == "run":
            from .run import cmd_run

            return cmd_run(args)
        if args.cmd == "subsetter":
            from .subsetter import cmd_subsetter

            return cmd_subsetter(args)
        if args.cmd == "dump":
            from .dump import cmd_dump

            return cmd_dump(args)
        if args.cmd == "trace":
            from .trace import cmd_trace

            return cmd_trace(args)
        if args.cmd == "uninstall":
            from .uninstall import cmd_uninstall

            return cmd_uninstall(args)
    except BPFError as e:
        print(f"sliceproxy: {e.strerror}", file=sys.stderr)
        return 1
    except (FileNotFoundError, PermissionError) as e:
        print(f"sliceproxy: {e}", file=sys.stderr)
        return 1
    return 2
