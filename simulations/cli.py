"""``python -m simulations``: run one seeded scenario and print its configuration, a summary
and the trace digest (same seed, same digest, byte for byte)."""

from __future__ import annotations

import argparse
import sys
import time

from .scenarios import PRESETS, SCENARIOS, derive

__all__ = ["main"]


class ProgressBar:
    """A one-line progress bar on stderr (virtual time against the safety phase)."""

    def __init__(self, stream=None, width: int = 30) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self.start = time.perf_counter()
        self._last = -1

    def __call__(self, now: float, total: float) -> None:
        frac = min(1.0, now / total) if total > 0 else 1.0
        pct = int(frac * 100)
        if pct == self._last:
            return
        self._last = pct
        fill = int(frac * self.width)
        wall = time.perf_counter() - self.start
        self.stream.write(
            f"\r[{'#' * fill}{'.' * (self.width - fill)}] {pct:3d}%  t={now:.1f}/{total:g}s "
            f"virtual, {wall:.1f}s wall"
        )
        if pct == 100:
            self.stream.write("\n")
        self.stream.flush()


def _parse_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    for conv in (int, float):
        try:
            return key, conv(value)
        except ValueError:
            pass
    return key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m simulations", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run one scenario")
    r.add_argument("--seed", type=int, required=True)
    r.add_argument("--nodes", type=int, default=10)
    r.add_argument("--duration", type=float, default=60.0, help="safety phase, virtual seconds")
    r.add_argument("--scenario", choices=sorted([*SCENARIOS, "orchestrator"]), default="chaos",
                   help="a swim scenario, or orchestrator (simulations.orch_cli)")  # fmt: skip
    r.add_argument("--preset", choices=sorted(PRESETS), default="lan")
    r.add_argument("--bootstrap", choices=["join", "warm"], default="join")
    r.add_argument("--set", dest="overrides", action="append", type=_parse_override,
                   default=[], metavar="KEY=VALUE", help="override a swim config key")  # fmt: skip
    r.add_argument("--plot", metavar="FILE.png", help="draw membership views over time")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")  # fmt: skip
    sub.add_parser("scenarios", help="list the scenarios")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "scenarios":
        from . import scenarios

        print(scenarios.__doc__)
        return 0
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    if args.scenario == "orchestrator":
        from .orch_cli import run_orchestrator_cli

        return run_orchestrator_cli(args.seed, args.nodes, args.duration,
                                    progress=ProgressBar() if show else None)  # fmt: skip
    from .runner import run

    try:
        cfg = derive(
            args.seed,
            args.nodes,
            args.duration,
            args.scenario,
            preset=args.preset,
            bootstrap=args.bootstrap,
            overrides=dict(args.overrides),
        )
    except ValueError as exc:  # ConfigError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    plot_ok = True
    if args.plot:
        from .plot import matplotlib_missing

        missing = matplotlib_missing()
        if missing:
            print(f"note: --plot skipped: {missing}", file=sys.stderr)
            plot_ok = False
    print("== configuration")
    print(cfg.describe())
    sys.stdout.flush()
    sample = max(0.5, (args.duration + 60) / 400) if args.plot and plot_ok else 0.0
    result = run(cfg, progress=ProgressBar() if show else None, sample_every=sample)
    print("== summary")
    for line in result.summary():
        print(line)
    rate = cfg.nodes * result.world.now / max(result.wall_s, 1e-9)
    print(f"wall time       = {result.wall_s:.2f} s ({rate:.0f} node-seconds/s)")
    if args.plot and plot_ok:
        from .plot import plot_views

        plot_views(result, args.plot)
        print(f"plot            = {args.plot}")
    print(f"trace digest    = {result.digest}")
    if result.failure is not None:
        print("== FAILURE")
        print(str(result.failure))
        return 1
    return 0
