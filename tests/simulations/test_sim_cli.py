"""``python -m simulations run``: configuration, summary, digest, failures, plots."""

from __future__ import annotations

import builtins

import pytest

from simulations.cli import main


def test_run_prints_configuration_summary_and_digest(capsys):
    assert main(["run", "--seed", "2", "--nodes", "5", "--duration", "30", "--scenario",
                 "crash", "--no-progress"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    needles = ["== configuration", "seed            = 2", "scenario        = crash"]
    needles += ["crash     n", "== summary", "checkers        = 8 (OK)", "trace digest"]
    for needle in needles:
        assert needle in out


def test_progress_bar_goes_to_stderr(capsys):
    main(["run", "--seed", "1", "--nodes", "3", "--duration", "10", "--scenario", "steady",
          "--progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert "100%" in err and "virtual" in err


def test_overrides_and_bad_input(capsys):
    assert main(["run", "--seed", "1", "--nodes", "3", "--duration", "5", "--set",
                 "probe_interval=2.0", "--no-progress"]) == 0  # fmt: skip
    assert "probe_interval=2.0" in capsys.readouterr().out
    assert main(["run", "--seed", "1", "--set", "probe_timeout=5", "--no-progress"]) == 2
    assert "probe_timeout" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--seed", "1", "--scenario", "nope"])


def test_a_violation_exits_1_with_seed_configuration_and_repro(capsys, monkeypatch):
    from swim.lifeguard import Awareness

    monkeypatch.setattr(Awareness, "apply", lambda self, d: setattr(self, "score", self.score + d))
    code = main(["run", "--seed", "9", "--nodes", "5", "--duration", "60", "--scenario",
                 "partition", "--no-progress"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1
    assert "== FAILURE" in out and "[swim-awareness]" in out
    assert "reproduce with seed 9: python -m simulations run --seed 9 --nodes 5" in out
    assert "configuration:\nseed            = 9" in out


def test_plot_draws_a_png_or_explains_why_not(tmp_path, capsys, monkeypatch):
    png = tmp_path / "views.png"
    args = ["run", "--seed", "1", "--nodes", "4", "--duration", "20", "--scenario", "crash",
            "--no-progress", "--plot", str(png)]  # fmt: skip
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        assert main(args) == 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        png.unlink()
    real_import = builtins.__import__

    def no_matplotlib(name, *a, **kw):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    capsys.readouterr()
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "--plot skipped: matplotlib is not installed" in captured.err
    assert "trace digest" in captured.out and not png.exists()
