"""The localisation plot is made from the shipped results (both step lengths) and fails on an empty folder."""
import os

import pytest

import plot_localisation


def test_plot_from_the_shipped_results(tmp_path):
    out = tmp_path / "loc.png"
    assert plot_localisation.main(["--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.path.getsize(out) > 10_000
    panels = [plot_localisation.load(os.path.join(plot_localisation.RESULTS, f)) for _, f in plot_localisation.FILES]
    assert panels[0][("taylor", "zero")] > 0.8 and panels[1][("taylor", "zero")] > 0.75


def test_no_results_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="no localisation results"):
        plot_localisation.main(["--results", str(tmp_path), "--out", str(tmp_path / "x.png")])
