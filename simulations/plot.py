"""Membership views over time as a PNG (matplotlib, the optional ``plot`` extra)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .runner import RunResult

__all__ = ["matplotlib_missing", "plot_views"]


def matplotlib_missing() -> str | None:
    """None if plotting works, else why not (and how to fix it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install 'corrosion[plot]')"
    return None


def plot_views(result: RunResult, path: str) -> None:
    """Per node: how many members it sees alive, suspect and down, with the faults marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result.metrics.samples
    step = result.metrics.sample_every
    nodes = sorted({s[1] for s in samples})
    fig, axes = plt.subplots(3, 1, sharex=True, figsize=(11, 8))
    titles = ("alive members seen", "suspect members seen", "down members remembered")
    for col, (ax, title) in enumerate(zip(axes, titles, strict=True)):
        for idx in nodes:
            xs: list[float] = []
            ys: list[float] = []
            for s in samples:
                if s[1] != idx:
                    continue
                if xs and s[0] - xs[-1] > 1.5 * step:  # the node was down: break the line
                    xs.append(float("nan"))
                    ys.append(float("nan"))
                xs.append(s[0])
                ys.append(s[2 + col])
            ax.plot(xs, ys, linewidth=0.8, alpha=0.6)
        ax.set_ylabel(title)
        for t, text in result.world.fault_log:
            ax.axvline(t, color="red" if "crash" in text else "grey", linewidth=0.5, alpha=0.5)
    cfg = result.config
    end = cfg.duration
    for ax in axes:
        ax.axvspan(end, result.world.now, color="green", alpha=0.08)
    axes[0].set_title(
        f"{cfg.scenario}, {cfg.nodes} nodes, seed {cfg.seed} (faults: lines; liveness: green)"
    )
    axes[-1].set_xlabel("virtual seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
