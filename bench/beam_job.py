"""The Beam job against planning: the batch dry run of the bench stream on FnApiRunner, one core.

    .venv/bin/python -m bench.beam_job [--events 50000] [--users 2500] [--runs 3] [--profile N]

Issue 12's figure: the Beam job within 1.5x of planning on the same events. Both are measured
here, in this process, over the same stream (`pipeline.bench.event_mix`: the bundled
e-commerce sample repeated with distinct ids, `--users` profiles reused, examples/flow.json):

- planning: `Simulation.step_json` over every raw line (parse + map + plan + identify decision +
  output line), as `walkeros-klaviyo bench` measures it;
- the job: `walkeros-klaviyo run --input FILE --dry_run_output PREFIX` (pipeline/run_job.py,
  FnApiRunner: read, parse, plan, identify state, pre-flight, the dry-run file output, the
  dead-letter file), from building the graph to the last file written.

CPU time of this process (time.process_time: every thread, and FnApiRunner runs the job in this
process), because the machine is shared. The job's fixed cost (graph, runner, file output set-up)
is measured on a one-event input and printed; the rate is given with it and without it. Medians
of `--runs`. `--profile N` prints the N most expensive functions of one more job run (cProfile).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from pipeline import run_job
from pipeline.bench import EXAMPLES, event_mix
from pipeline.simulate import Simulation
from transforms.walkeros.config import load_config_file

NOW_MS = 1_764_400_000_000


def planning_seconds(raw: Sequence[bytes], config_path: str) -> float:
    """CPU seconds for planning every line, output included (no start-up)."""
    simulation = Simulation(load_config_file(config_path).config)
    started = time.process_time()
    for payload in raw:
        simulation.step_json(payload, now_ms=NOW_MS)
    return time.process_time() - started


def job_seconds(stream: Path, config_path: str, folder: Path) -> float:
    """CPU seconds of one batch dry run of `stream`, from building the graph to its end."""
    argv = ["--input", str(stream), "--config", config_path,
            "--dry_run_output", str(folder / "calls"), "--dead_letter_path", str(folder / "dead")]
    summary = io.StringIO()
    started = time.process_time()
    with contextlib.redirect_stderr(summary):
        code = run_job.main(argv)
    spent = time.process_time() - started
    if code != 0:
        raise SystemExit(f"the job failed ({code}):\n{summary.getvalue()}")
    return spent


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.beam_job",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--users", type=int, default=2_500)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--config", default=str(EXAMPLES / "flow.json"))
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the N costliest functions of one more job run")
    args = parser.parse_args(argv)
    raw = event_mix(args.events, users=args.users)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        stream, tiny = folder / "events.jsonl", folder / "one.jsonl"
        stream.write_bytes(b"\n".join(raw) + b"\n")
        tiny.write_bytes(raw[0] + b"\n")
        job_seconds(tiny, args.config, folder / "warm")  # imports and first-run caches
        fixed = statistics.median(job_seconds(tiny, args.config, folder / f"one{run}")
                                  for run in range(args.runs))
        jobs = [job_seconds(stream, args.config, folder / f"run{run}")
                for run in range(args.runs)]
        plans = [planning_seconds(raw, args.config) for _ in range(args.runs)]
        if args.profile:
            profiler = cProfile.Profile()
            profiler.runcall(job_seconds, stream, args.config, folder / "profiled")
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(
                args.profile)
    job, plan = statistics.median(jobs), statistics.median(plans)
    whole, marginal = args.events / job, args.events / max(job - fixed, 1e-9)
    planning = args.events / plan
    print(f"{args.events:,} events, {args.users:,} users, {args.runs} runs, CPU time of this "
          f"process (medians)")
    print(f"planning (Simulation): {planning:,.0f} events/s")
    print(f"Beam batch dry run (FnApiRunner): runs {', '.join(f'{s:.2f}' for s in jobs)} s; "
          f"fixed cost {fixed:.2f} s (one event)")
    print(f"  whole run: {whole:,.0f} events/s, planning is {planning / whole:.2f}x faster")
    print(f"  without the fixed cost: {marginal:,.0f} events/s, planning is "
          f"{planning / marginal:.2f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
