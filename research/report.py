"""How an experiment shows its results: mean ± std, fixed-width text tables, and report.md
(its sections, the command, wall time, machine and commit), ready for a slide or a course page,
with the numbers its figure needs in data.json beside it (research/figures.py draws them)."""
import json
import os
import platform
import subprocess
import sys
import time

import torch


def stat(xs):
    """Mean and std (the sample std; 0 for one seed) of per-seed values, and the values."""
    t = torch.tensor(xs, dtype=torch.float64)
    return {"mean": t.mean().item(), "std": t.std().item() if len(xs) > 1 else 0.0, "values": list(xs)}


def mean_std(xs):
    s = stat(xs)
    return f"{s['mean']:.3f} ± {s['std']:.3f}"


def table(corner, rows, columns, cell):
    """A fixed-width text table as a list of lines; rows, columns: labels; cell(row, column) -> text."""
    width = max(len(corner), *(len(r) for r in rows)) + 1
    widths = [max(15, len(c)) for c in columns]
    lines = [f"{corner:<{width}}| " + " | ".join(f"{c:^{w}}" for c, w in zip(columns, widths))]
    lines += [f"{r:<{width}}| " + " | ".join(f"{cell(r, c):^{w}}" for c, w in zip(columns, widths)) for r in rows]
    return lines


class Report:
    """What an experiment prints, kept to be written as report.md at the end (for a slide or
    a course page): each section's title and its text block, the command, wall time, machine
    and commit; and the data its figure is drawn from, written as data.json beside it."""

    def __init__(self, title):
        self.title, self.sections, self.t0, self.numbers = title, [], time.time(), None

    def data(self, obj):
        """What the experiment's figure needs (research/figures.py: its format), for write()."""
        self.numbers = obj

    def add(self, heading, lines):
        print(f"\n{heading}\n" + "\n".join(lines), flush=True)
        self.sections.append((heading, lines))

    def write(self, folder, name="report.md"):
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
        except OSError:
            commit = "unknown"
        head = [f"# {self.title}", "", f"- command: `python {' '.join(sys.argv)}`",
                f"- wall time: {(time.time() - self.t0) / 60:.1f} min", f"- machine: {machine()}",
                f"- commit: {commit}", ""]
        body = [x for h, lines in self.sections for x in (f"## {h}", "", "```", *lines, "```", "")]
        path = os.path.join(folder, name)
        os.makedirs(folder, exist_ok=True)
        with open(path, "w") as f:
            f.write("\n".join(head + body))
        print(f"\nwrote {path}")
        if self.numbers is not None:
            with open(os.path.join(folder, "data.json"), "w") as f:
                json.dump({"command": f"python {' '.join(sys.argv)}", "commit": commit, **self.numbers}, f,
                          ensure_ascii=False, indent=1)


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} CPUs{gpu}, torch {torch.__version__}, Python {platform.python_version()}"
