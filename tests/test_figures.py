"""research/figures.py: the SVG plot writer puts each value where its axes say, a band lies
between its bounds, every figure is drawn from its data.json (the committed ones, and small
fixtures in tests/figures/ for the experiments with no committed data), and the committed
figures are the ones their data makes."""
import glob
import json
import math
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from research import figures
from research.figures import Panel, Series

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "figures")
NS = "{http://www.w3.org/2000/svg}"


def parse(text):
    return ET.fromstring(text)


def find(root, tag, cls=None, label=None):
    return [e for e in root.iter(NS + tag) if (cls is None or e.get("class") == cls)
            and (label is None or e.get("data-label") == label)]


def points(path):
    """The (x, y) of a path's M/L commands."""
    return [(float(x), float(y)) for x, y in re.findall(r"[ML]([-\d.]+),([-\d.]+)", path.get("d"))]


def flat(pairs):  # pytest.approx compares flat sequences
    return [v for pair in pairs for v in pair]


def axes(root, i=0):
    """Value -> pixel of the i-th panel, from its frame's position and its data-xlim/ylim."""
    r = find(root, "rect", "plot")[i]
    left, top, width, height = (float(r.get(k)) for k in ("x", "y", "width", "height"))
    x0, x1 = map(float, r.get("data-xlim").split())
    y0, y1 = map(float, r.get("data-ylim").split())
    log = r.get("data-xlog") == "1"
    px = lambda x: left + ((math.log10(x) if log else x) - x0) / (x1 - x0) * width  # noqa: E731
    py = lambda y: top + (y1 - y) / (y1 - y0) * height  # noqa: E731
    return px, py


def test_a_value_lands_where_the_axes_put_it():
    s = Series("a", [0, 5, 10], [0.0, 0.25, 1.0], color="#123456")
    root = parse(figures.svg("t", [Panel("p", "x", "y", [s], ylim=(0, 1))]))
    px, py = axes(root)
    frame = find(root, "rect", "plot")[0]
    bottom = float(frame.get("y")) + float(frame.get("height"))
    marks = [(float(c.get("cx")), float(c.get("cy"))) for c in find(root, "circle", "marker", "a")]
    assert marks[0] == pytest.approx((float(frame.get("x")), bottom), abs=0.06)  # (0, 0): the bottom-left corner
    assert marks[1] == pytest.approx((px(5), py(0.25)), abs=0.06)
    assert marks[1][1] == pytest.approx(bottom - 0.25 * float(frame.get("height")), abs=0.06)  # a quarter of the way up
    assert flat(points(find(root, "path", "line", "a")[0])) == pytest.approx(flat(marks), abs=0.06)


def test_a_log_axis_puts_4_halfway_between_1_and_16():
    root = parse(figures.svg("t", [Panel("p", "H", "y", [Series("a", [1, 4, 16], [0.5, 0.5, 0.5])], xlog=True)]))
    frame = find(root, "rect", "plot")[0]
    middle = float(frame.get("x")) + float(frame.get("width")) / 2
    assert float(find(root, "circle", "marker")[1].get("cx")) == pytest.approx(middle, abs=0.06)


def test_the_band_lies_between_its_bounds_and_around_its_line():
    xs, lo, mean, hi = [1, 2, 3], [0.1, 0.3, 0.6], [0.2, 0.5, 0.7], [0.4, 0.6, 0.9]
    root = parse(figures.svg("t", [Panel("p", "x", "y", [Series("a", xs, mean, lo, hi)])]))
    px, py = axes(root)
    band = points(find(root, "path", "band", "a")[0])
    assert flat(band) == pytest.approx(flat((px(x), py(y)) for x, y in zip(xs + xs[::-1], hi + lo[::-1])), abs=0.06)
    for (x, y), top, bottom in zip(points(find(root, "path", "line", "a")[0]), band[:3], band[::-1][:3]):
        assert top[0] == bottom[0] == pytest.approx(x) and top[1] < y < bottom[1]  # SVG's y grows downwards


def test_the_legend_names_each_series_once_and_panels_sit_side_by_side():
    ss = [Series("a", [0, 1], [0, 1]), Series("b", [0, 1], [1, 0], dashed=True)]
    root = parse(figures.svg("t", [Panel("p", "x", "y", ss), Panel("q", "x", "y", ss)]))
    assert len(find(root, "line", "legend")) == 2 and len(find(root, "path", "line")) == 4
    assert find(root, "line", "legend")[1].get("stroke-dasharray")
    lefts = [float(r.get("x")) for r in find(root, "rect", "plot")]
    assert lefts[1] - lefts[0] == Panel.width


def test_nice_ticks_are_round():
    assert figures.nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert figures.nice_ticks(0, 600) == [0, 100, 200, 300, 400, 500, 600]
    assert figures.nice_ticks(-0.03, 1.03) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]


def test_reward_vs_step_from_a_grid_fixture(tmp_path):
    """Two panels (realizable, misspecified); per method the mean over seeds at the steps every
    seed reached, the band min to max; the expert's final reward as a dashed level."""
    out = figures.make(os.path.join(FIXTURES, "grid-data.json"), str(tmp_path))
    assert os.path.basename(out) == "reward_vs_step.svg"
    root = parse(open(out).read())
    assert len(find(root, "rect", "plot")) == 2
    assert len(find(root, "path", "line")) == 2 * 4 and len(find(root, "path", "band")) == 2 * 3
    px, py = axes(root, 1)  # misspecified (small)
    online = points(find(root, "path", "line", "online (γ=1)")[1])
    assert online[-1] == pytest.approx((px(200), py((1.0 + 0.96) / 2)), abs=0.06)
    sft = points(find(root, "path", "line", "offline SFT")[1])
    assert len(sft) == 2  # seed 1 stopped after 2 checks
    band = points(find(root, "path", "band", "online (γ=1)")[1])
    assert band[0][1] == pytest.approx(py(0.5), abs=0.06) and band[-1][1] == pytest.approx(py(0.3), abs=0.06)
    expert = points(find(root, "path", "line", "expert (final)")[1])
    assert [y for _, y in expert] == pytest.approx([py(0.99)] * 2, abs=0.06)  # (1.0 + 0.98) / 2


def test_boundary_from_its_fixture_orders_the_classes_by_ceiling(tmp_path):
    out = figures.make(os.path.join(FIXTURES, "boundary-data.json"), str(tmp_path))
    root = parse(open(out).read())
    labels = [t.text for t in root.iter(NS + "tspan")]
    assert labels == ["1x16x1", "5,000 p.", "1x32x2", "15,000 p.", "2x32x2", "30,000 p."]
    assert [s.get("data-label") for s in find(root, "path", "line")] == ["ceiling", "offline SFT", "online (γ=1)", "expert"]
    px, py = axes(root)
    sft = points(find(root, "path", "line", "offline SFT")[0])
    assert sft[1] == pytest.approx((px(1), py(0.325)), abs=0.06)  # 1x32x2: the mean of 0.3 and 0.35
    band = points(find(root, "path", "band", "ceiling")[0])  # the top edge at the max, the bottom at the min
    assert band[0][1] == pytest.approx(py(0.5), abs=0.06) and band[-1][1] == pytest.approx(py(0.4), abs=0.06)


def has_figure(path):
    with open(path) as f:
        data = json.load(f)
    return any(k in data for k in figures.FIGURES)


# every committed data.json that holds a figure's data (research/recipes.py's holds a table's)
COMMITTED = [p for p in sorted(glob.glob(os.path.join(ROOT, "results", "*", "data.json"))) if has_figure(p)]


@pytest.mark.parametrize("data", COMMITTED, ids=[os.path.basename(os.path.dirname(p)) for p in COMMITTED])
def test_the_committed_figures_are_what_their_data_makes(data, tmp_path):
    """Remade from the committed data.json, each figure is the committed one: a change to the data
    or to the drawing that was not followed by python -m research.figures fails here."""
    out = figures.make(data, str(tmp_path))
    committed = os.path.join(os.path.dirname(data), os.path.basename(out))
    assert os.path.exists(committed), f"{committed} is not committed: run python -m research.figures"
    assert open(out).read() == open(committed).read(), f"{committed} is stale: run python -m research.figures"


def test_the_horizon_figure_puts_offline_sft_where_the_report_does(tmp_path):
    data = os.path.join(ROOT, "results", "horizon-sweep", "data.json")
    root = parse(open(figures.make(data, str(tmp_path))).read())
    assert [p.text for p in root.iter(NS + "text") if "temperature 1" in (p.text or "") or "greedy" in (p.text or "")][:4] == [
        "realizable (medium), temperature 1", "realizable (medium), greedy",
        "misspecified (small), temperature 1", "misspecified (small), greedy"]
    px, py = axes(root, 2)
    sft = points(find(root, "path", "line", "offline SFT")[2])
    assert sft[-1] == pytest.approx((px(16), py(0.027)), abs=0.06)  # the report's table: 0.027 ± 0.047 at H=16


def test_the_mode_weight_figure_has_a_panel_per_horizon_and_the_prediction(tmp_path):
    data = os.path.join(ROOT, "results", "modes", "data.json")
    with open(data) as f:
        hs = {r["H"] for r in json.load(f)["modes"]}
    root = parse(open(figures.make(data, str(tmp_path))).read())
    assert len(find(root, "rect", "plot")) == len(hs) == len(find(root, "path", "diagonal"))
    assert len(find(root, "path", "line", "predicted q* (online γ=1)")) == len(hs)


def test_the_command_line(tmp_path):
    help_ = subprocess.run([sys.executable, os.path.join(ROOT, "research", "figures.py"), "--help"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert help_.returncode == 0 and help_.stdout.startswith("usage: figures.py")
    bad = tmp_path / "data.json"
    bad.write_text(json.dumps({"classes": [{"size": "1x16x1"}]}))  # no ceiling
    out = subprocess.run([sys.executable, "-m", "research.figures", str(bad)], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0 and out.stderr.count("\n") == 1 and out.stderr.startswith("error: ") and "boundary" in out.stderr
    good = tmp_path / "grid"
    good.mkdir()
    (good / "data.json").write_text(open(os.path.join(FIXTURES, "grid-data.json")).read())
    out = subprocess.run([sys.executable, "-m", "research.figures", str(good / "data.json")], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and (good / "reward_vs_step.svg").exists()


def test_every_figure_skips_a_data_json_that_holds_a_table(tmp_path, monkeypatch):
    """python -m research.figures draws each committed data.json that has a figure and passes
    over one that holds a table's data (research/recipes.py's); named, such a file is an error."""
    for name, text in (("table", '{"cells": []}'), ("boundary", open(os.path.join(FIXTURES, "boundary-data.json")).read())):
        os.makedirs(tmp_path / "results" / name)
        (tmp_path / "results" / name / "data.json").write_text(text)
    monkeypatch.setattr(figures, "ROOT", str(tmp_path))
    figures.main([])
    assert sorted(os.listdir(tmp_path / "results" / "boundary")) == ["boundary.svg", "data.json"]
    assert os.listdir(tmp_path / "results" / "table") == ["data.json"]
    with pytest.raises(figures.UsageError, match="no figure"):
        figures.main([str(tmp_path / "results" / "table" / "data.json")])
