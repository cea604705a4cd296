"""The results as figures: SVG line plots drawn from each experiment's data.json, no plotting library.

    python -m research.figures                             # every results/*/data.json -> its figure beside it
    python -m research.figures results/modes/data.json     # one figure

Each experiment writes a small data.json beside its report.md (research/report.py, Report.data);
the key that holds its data says which figure it makes (FIGURES, at the end). A figure is remade
from that file alone, without retraining. The plot writer is a few dozen lines of plain Python:
axes with ticks, a title, series each drawn as a mean line with an optional shaded band (min-max
or ± std over seeds), markers, dashes, a legend, and several panels side by side. What it
simplifies: linear or log x, a fixed panel size, no text measuring (labels are kept short).
"""
import glob
import json
import math
import os
import sys
from dataclasses import dataclass, field
from xml.sax.saxutils import escape, quoteattr

if __package__ in (None, ""):  # run as python research/figures.py: the imports live in the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from errors import OneLineParser, UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One colour per method in every figure, so a reader learns them once.
COLORS = {"offline SFT": "#1f77b4", "online (γ=1)": "#d62728", "online (γ=0)": "#2ca02c", "base": "#9467bd",
          "expert": "#7f7f7f", "ceiling": "#000000"}
METHODS = ("offline SFT", "online (γ=1)", "online (γ=0)")  # the students every figure compares


# ----------------------------------------------------------------------------- the plot writer
@dataclass
class Series:
    label: str
    x: list
    y: list                 # the line: a mean over seeds
    lo: list = None         # the band's lower and upper edges (min-max, or mean ± std); None: no band
    hi: list = None
    color: str = "#000000"
    dashed: bool = False
    markers: bool = True


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: list
    ylim: tuple = (-0.03, 1.03)  # a little room, so a line at 0 or 1 is not hidden by the frame
    xlim: tuple = None      # None: the data's range
    xlog: bool = False      # a log x axis (horizons, weights p that halve)
    xticks: list = None     # [(x, label)]; None: round numbers (a log axis: the data's x values)
    diagonal: bool = False  # y = x, dotted: where a quantity equals the x value
    width: int = 340        # pixels, the margins included


H, LEFT, RIGHT, TOP, BOTTOM = 256, 56, 14, 28, 52  # a panel's height and its margins (room for 2-line ticks)


def nice_ticks(lo, hi, n=5):
    """About n round values (1, 2 or 5 times a power of ten apart) from lo to hi."""
    raw = (hi - lo) / n
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    return [round(k * step, 10) for k in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]


def fmt(v):
    return f"{v:.1f}"


def draw_panel(p, ox, oy):
    """The SVG elements of one panel whose top-left corner is (ox, oy)."""
    xs = [x for s in p.series for x in s.x]
    x0, x1 = p.xlim or (min(xs), max(xs))
    f = math.log10 if p.xlog else float
    x0, x1 = f(x0), f(x1)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    y0, y1 = p.ylim
    left, top, width, height = ox + LEFT, oy + TOP, p.width - LEFT - RIGHT, H - TOP - BOTTOM

    def px(x):
        return left + (f(x) - x0) / (x1 - x0) * width

    def py(y):
        return top + (y1 - y) / (y1 - y0) * height  # SVG's y grows downwards

    out = [f'<rect class="plot" x="{fmt(left)}" y="{fmt(top)}" width="{fmt(width)}" height="{fmt(height)}" '
           f'data-xlim="{x0} {x1}" data-ylim="{y0} {y1}" data-xlog="{int(p.xlog)}" fill="none" stroke="#444"/>',
           f'<text x="{fmt(left + width / 2)}" y="{fmt(oy + 18)}" text-anchor="middle" font-weight="bold">'
           f'{escape(p.title)}</text>',
           f'<text x="{fmt(left + width / 2)}" y="{fmt(oy + H - 6)}" text-anchor="middle">{escape(p.xlabel)}</text>',
           f'<text transform="translate({fmt(ox + 14)},{fmt(top + height / 2)}) rotate(-90)" text-anchor="middle">'
           f'{escape(p.ylabel)}</text>']
    for y in nice_ticks(y0, y1):
        out.append(f'<line x1="{fmt(left)}" x2="{fmt(left + width)}" y1="{fmt(py(y))}" y2="{fmt(py(y))}" stroke="#ddd"/>')
        out.append(f'<text x="{fmt(left - 5)}" y="{fmt(py(y) + 4)}" text-anchor="end">{y:g}</text>')
    xticks = p.xticks or [(x, f"{x:g}") for x in (sorted(set(xs)) if p.xlog else nice_ticks(x0, x1))]
    for x, label in xticks:
        out.append(f'<line x1="{fmt(px(x))}" x2="{fmt(px(x))}" y1="{fmt(top + height)}" y2="{fmt(top + height + 4)}" '
                   f'stroke="#444"/>')
        lines = "".join(f'<tspan x="{fmt(px(x))}" dy="{0 if i == 0 else 13}">{escape(t)}</tspan>'
                        for i, t in enumerate(label.split("\n")))  # a label may take two lines
        out.append(f'<text y="{fmt(top + height + 16)}" text-anchor="middle">{lines}</text>')
    if p.diagonal:
        lo, hi = max(y0, 10 ** x0 if p.xlog else x0), min(y1, 10 ** x1 if p.xlog else x1)
        # sampled: on a log x axis y = x is a curve
        pts = [lo * (hi / lo) ** (k / 50) if p.xlog else lo + (hi - lo) * k / 50 for k in range(51)]
        out.append(f'<path class="diagonal" d="{polyline(pts, pts, px, py)}" fill="none" stroke="#999" '
                   f'stroke-dasharray="2 3"/>')
    for s in p.series:
        attrs = f'data-label={quoteattr(s.label)}'
        if s.lo is not None:  # the band: along the upper edge, back along the lower edge
            d = polyline(s.x + s.x[::-1], s.hi + s.lo[::-1], px, py) + " Z"
            out.append(f'<path class="band" {attrs} d="{d}" fill="{s.color}" fill-opacity="0.18" stroke="none"/>')
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        out.append(f'<path class="line" {attrs} d="{polyline(s.x, s.y, px, py)}" fill="none" stroke="{s.color}" '
                   f'stroke-width="2"{dash}/>')
        if s.markers:
            out += [f'<circle class="marker" {attrs} cx="{fmt(px(x))}" cy="{fmt(py(y))}" r="3" fill="{s.color}"/>'
                    for x, y in zip(s.x, s.y)]
    return out


def polyline(xs, ys, px, py):
    return " ".join(f"{'M' if i == 0 else 'L'}{fmt(px(x))},{fmt(py(y))}" for i, (x, y) in enumerate(zip(xs, ys)))


def svg(title, panels, cols=None):
    """The SVG text of panels side by side (cols per row, all as wide as the first), a title
    above, one legend below."""
    cols, pw = cols or len(panels), panels[0].width
    rows = math.ceil(len(panels) / cols)
    legend = {}  # label -> (colour, dashed), in order of first appearance
    for p in panels:
        for s in p.series:
            legend.setdefault(s.label, (s.color, s.dashed))
    per_row = max(1, cols * pw // 190)
    width = max(cols * pw, 8 * len(title) + 20)  # about 8 pixels a character of the title
    height = 30 + rows * H + 22 * math.ceil(len(legend) / per_row) + 8
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2:.1f}" y="20" text-anchor="middle" font-size="14" font-weight="bold">{escape(title)}</text>']
    for i, p in enumerate(panels):
        out += draw_panel(p, (i % cols) * pw, 30 + (i // cols) * H)
    for i, (label, (color, dashed)) in enumerate(legend.items()):
        x, y = 20 + (i % per_row) * 190, 30 + rows * H + 22 * (i // per_row) + 10
        dash = ' stroke-dasharray="6 4"' if dashed else ""
        out.append(f'<line class="legend" x1="{x}" x2="{x + 24}" y1="{y}" y2="{y}" stroke="{color}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{x + 30}" y="{y + 4}">{escape(label)}</text>')
    return "\n".join(out + ["</svg>", ""])


# ----------------------------------------------------------------------------- the figures
def mean_band(values, std=None):
    """(mean, lower, upper) of per-seed values: the band is min to max; with std given (values
    then are means), mean ± std clipped to [0, 1], the range of a reward or a probability."""
    if std is not None:
        return values, [max(0.0, m - s) for m, s in zip(values, std)], [min(1.0, m + s) for m, s in zip(values, std)]
    return [sum(v) / len(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def reward_vs_step(data):
    """The grid (experiments.py --grid): held-out reward against step, realizable and
    misspecified, one line per method, the band min to max over seeds; the expert's final
    reward dashed. data: {"task", "seeds", "sizes": {size: "realizable" | "misspecified"},
    "runs": [{"method", "size", "seed", "step": [...], "eval_reward": [...], "reward", "reward_greedy"}]}."""
    panels = []
    for size, kind in data["sizes"].items():
        series = []
        for method in METHODS:
            runs = [r for r in data["runs"] if (r["method"], r["size"]) == (method, size)]
            n = min(len(r["step"]) for r in runs)  # steps every seed reached (a run may stop early)
            mean, lo, hi = mean_band([[r["eval_reward"][i] for r in runs] for i in range(n)])
            series.append(Series(method, runs[0]["step"][:n], mean, lo, hi, COLORS[method], markers=False))
        expert = [r["reward"] for r in data["runs"] if r["method"] == "expert"]
        steps = [x for s in series for x in s.x]
        level = sum(expert) / len(expert)
        series.append(Series("expert (final)", [min(steps), max(steps)], [level, level], color=COLORS["expert"],
                             dashed=True, markers=False))
        panels.append(Panel(f"{kind} ({size})", "step", "held-out reward (temperature 1)", series))
    return svg(f"{data['task']}: held-out reward against step, {data['seeds']} seeds (band: min to max)", panels)


def reward_vs_horizon(data):
    """The horizon sweep (experiments.py --horizon): reward against H, temperature 1 and greedy,
    each student size; mean ± std over seeds. data: {"seeds", "horizons": [H, ...],
    "students": {size: kind}, "reward" and "reward_greedy": {size: {method: {"mean": [per H], "std": [per H]}}}}."""
    hs = data["horizons"]
    panels = []
    for size, kind in data["students"].items():
        for key, how in (("reward", "temperature 1"), ("reward_greedy", "greedy")):
            series = []
            for method in ("expert", *METHODS):
                r = data[key][size][method]
                series.append(Series(method, hs, *mean_band(r["mean"], r["std"]), COLORS[method], dashed=method == "expert"))
            panels.append(Panel(f"{kind} ({size}), {how}", "horizon H (answer digits)", "held-out reward", series,
                                xlog=True, xticks=[(h, str(h)) for h in hs]))
    return svg(f"pointer: reward against the horizon H, mean ± std over {data['seeds']} seeds", panels, cols=2)


def mode_weight(data):
    """The mode-weight law (modes.py): P("+") of each student against the expert's weight p, one
    panel per H, beside the law's prediction q* for online IL (γ=1) and y = p, which SFT and γ=0
    keep. (A measured-vs-predicted scatter would pile every point near q* = 1.) data: {"seeds",
    "modes": [{"p", "H", "q_pred": {"mean", "std"}, method: {"q": {"mean", "std"}, ...}, ...}]}."""
    panels = []
    for h in sorted({r["H"] for r in data["modes"]}):
        rows = sorted((r for r in data["modes"] if r["H"] == h), key=lambda r: r["p"])
        ps = [r["p"] for r in rows]
        series = [Series(m, ps, *mean_band([r[m]["q"]["mean"] for r in rows], [r[m]["q"]["std"] for r in rows]),
                         COLORS[m]) for m in METHODS]
        series.append(Series("predicted q* (online γ=1)", ps, [r["q_pred"]["mean"] for r in rows],
                             color=COLORS["online (γ=1)"], dashed=True, markers=False))
        panels.append(Panel(f"H = {h}", "p, the expert's weight on '+'", "P('+'), first token", series,
                            xlog=True, xticks=[(p, f"{p:g}") for p in ps], diagonal=True))
    return svg(f"pointer: the mode-weight law, mean ± std over {data['seeds']} seeds (dotted: P(+) = p)", panels)


def boundary(data):
    """The realizability boundary (boundary.py): per student class, ordered by its ceiling (the
    reward the class reaches trained on the task itself), the ceiling, offline SFT, online IL
    (γ=1) and the expert; the band min to max over seeds. data: {"classes": [{"size": "LxWxH",
    "layers", "heads", "width", "params", "ceiling": [per seed], "sft": [...], "online": [...], "expert": [...]}]}."""
    classes = sorted(data["classes"], key=lambda c: (sum(c["ceiling"]) / len(c["ceiling"]), c["params"]))
    xs = list(range(len(classes)))
    series = []
    for key, label in (("ceiling", "ceiling"), ("sft", "offline SFT"), ("online", "online (γ=1)"), ("expert", "expert")):
        series.append(Series(label, xs, *mean_band([c[key] for c in classes]), COLORS[label], dashed=key == "expert"))
    ticks = [(i, f"{c['size']}\n{c['params']:,} p.") for i, c in enumerate(classes)]
    panel = Panel("student classes, by their ceiling", "student class (layers x width x heads; parameters)",
                  "held-out reward", series, xlim=(-0.5, len(classes) - 0.5), xticks=ticks,
                  width=max(340, 120 + 90 * len(classes)))
    return svg("the realizability boundary (band: min to max over seeds)", [panel])


# which figure a data.json makes, told by the key that holds its data
FIGURES = {"runs": ("reward_vs_step.svg", reward_vs_step), "horizons": ("reward_vs_horizon.svg", reward_vs_horizon),
           "modes": ("mode_weight.svg", mode_weight), "classes": ("boundary.svg", boundary)}


def make(data_path, out_dir=None):
    """Draw the figure of one data.json; write it beside it (or into out_dir); return its path."""
    try:
        with open(data_path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"{data_path}: cannot read it as JSON ({e})")
    kind = next((k for k in FIGURES if isinstance(data, dict) and k in data), None)
    if kind is None:
        raise UsageError(f"{data_path}: no figure for it (a data.json holds one of the keys {', '.join(FIGURES)})")
    name, draw = FIGURES[kind]
    try:
        text = draw(data)
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as e:  # a file not in the format
        raise UsageError(f"{data_path}: not the data of {name} ({type(e).__name__}: {e}); see {draw.__name__} "
                         f"in research/figures.py")
    out = os.path.join(out_dir or os.path.dirname(data_path), name)
    with open(out, "w") as f:
        f.write(text)
    return out


def main(argv=None):
    p = OneLineParser(description="Draw the figures (SVG) from the experiments' data.json files.")
    p.add_argument("data", nargs="*", help="data.json files (default: every results/*/data.json)")
    a = p.parse_args(argv)
    for data in a.data or sorted(glob.glob(os.path.join(ROOT, "results", "*", "data.json"))):
        if not a.data:  # every committed data.json: skip those that hold a table's data, not a figure's
            with open(data) as f:
                keys = json.load(f)
            if not any(k in keys for k in FIGURES):
                continue
        print(f"wrote {os.path.relpath(make(data))}")


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:  # bad input: one line; anything else is a bug and keeps its traceback
        sys.exit(f"error: {e}")
