"""The `walkeros-klaviyo` command: `simulate`, `bench`, `run` (the Beam job) and `replay`.

Each subcommand lives in its own module; this file only parses the command line and reports
configuration errors as one clear line instead of a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import BinaryIO

from pipeline import version_line
from transforms.walkeros.config import ConfigError, load_config_file


def _open_input(path: str) -> BinaryIO:
    return sys.stdin.buffer if path == "-" else open(path, "rb")


def _simulate(args: argparse.Namespace) -> int:
    from pipeline.simulate import write_simulation

    loaded = load_config_file(args.config, destination=args.destination)
    for warning in loaded.warnings:
        print(f"config warning: {warning}", file=sys.stderr)
    with _open_input(args.input) as source:
        write_simulation(loaded.config, source, sys.stdout)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from pipeline.bench import run_bench

    run_bench(config_path=args.config, events=args.events, runs=args.runs)
    return 0


def _run(argv: Sequence[str]) -> int:
    from pipeline.run_job import main as run_main

    return run_main(list(argv))


def _replay(argv: Sequence[str]) -> int:
    from pipeline.replay import main as replay_main

    return replay_main(list(argv))


class _Version(argparse.Action):
    """`--version`, its line built only when asked for: it names Beam's version, and importing
    Beam costs `simulate` a second of start-up."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        print(version_line())  # on stdout, as argparse's own version action writes it
        parser.exit()


# Subcommands that parse their own arguments (Beam's options, or their own parser).
_DELEGATED = {"run": _run, "replay": _replay}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="walkeros-klaviyo",
        description="Deliver walkerOS events to Klaviyo (Apache Beam).")
    parser.add_argument("--version", action=_Version)
    commands = parser.add_subparsers(dest="command", required=True)

    simulate = commands.add_parser(
        "simulate", help="print the Klaviyo calls planned for each event; sends nothing",
        description="One JSON line per input line: "
                    '{"event_id", "calls": [[METHOD, BODY], ...], "skipped", "problems"}.')
    simulate.add_argument("--config", required=True,
                          help="walkerOS flow.json (v4) or a bare destination config")
    simulate.add_argument("--input", required=True, help="JSON Lines of walkerOS events; - = stdin")
    simulate.add_argument("--destination", default=None,
                          help="destination id in flow.json when it has several Klaviyo ones")
    simulate.set_defaults(handler=_simulate)

    bench = commands.add_parser(
        "bench", help="events per second for parse + map + plan + identify + output on one "
                      "core (median of runs, ratio to the walkerOS reference)")
    bench.add_argument("--config", default=None, help="config to plan with (default: example)")
    bench.add_argument("--events", type=int, default=20_000, help="events per run")
    bench.add_argument("--runs", type=int, default=5, help="runs; the median is reported")
    bench.set_defaults(handler=_bench)

    commands.add_parser("run", help="run the Beam pipeline; `run --help` lists its options",
                        add_help=False)
    commands.add_parser("replay", help="send dead letters back through the pipeline; "
                                       "`replay --help` lists its options", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in _DELEGATED:
            return _DELEGATED[argv[0]](argv[1:])
        args = build_parser().parse_args(argv)
        return int(args.handler(args))
    except ConfigError as error:
        print(f"walkeros-klaviyo: configuration error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"walkeros-klaviyo: {error}", file=sys.stderr)
        return 2

if __name__ == "__main__":
    sys.exit(main())
