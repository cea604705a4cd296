"""Every measured number the documents quote comes from a committed report.

README.md, RESULTS.md and EXERCISES.md quote results; `results/<experiment>/report.md` holds them
(with the command, machine and commit that made them). This test takes every number that reads
as a measurement (a decimal, a mean ± std, a count a/b or "a of b", a time, a percentage, a
ratio like 15x) and requires it in a report: the reports its line links, else those its `##`
section links (`results/<name>/report.md`, or `out/<name>/report.md` of a command that writes
one), else those the document's first section links, else any report. A decimal, or a mean ±
std, may be the report's rounded. Numbers that are not measurements (hyperparameters,
thresholds, constants) are in ALLOWED, each with why. The lab's test counts are checked against
the test suite itself.
"""
import glob
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", "RESULTS.md", "EXERCISES.md")

# Not measurements: the exact text a document writes, and why it needs no report.
ALLOWED = {
    "0.95": "the quality gate, --expert-min-reward's default",
    "0.05": "the realizable claim's margin (SFT within 0.05 of its expert)",
    "0.3": "the misspecified claim's margin (online >= SFT + 0.3)",
    "0.5": "a setting: --beta 0.5, --mode-weight 0.5, λ=0.5, γ=0.5, the claim's bar < 0.5",
    "0.2": "a setting: --mode-weight 0.2",
    "0.1": "a setting: --mode-weight 0.1, --weight-decay 0.1, the P(+) claim's margin",
    "0.8": "countdown's expert bar",
    "0.9": "the escape step's bar (first check >= 0.9)",
    "1.0": "--grad-clip's default; the GPU target (<= 1.0x naive's time)",
    "0.7": "a sampling temperature of a test (T=0.7)",
    "0.693": "ln 2, a constant",
    "0.69": "ln 2, a constant",
    "0.6931": "ln 2, a constant",
    "2.30": "ln 10, a constant",
    "2.3": "ln 10, a constant",
    "0.099": "ln 2 / 7, a derivation",
    "0.297": "0.099 + 2 ln 2 / 7, a derivation",
    "0.91": "sigmoid(logit 0.5 + ln 10) = 10/11, a derivation",
    "0.22": "JSD(0.5) of a one-hot sign against the expert's 50/50 (0.216), a derivation",
    "49.5%": "the exact toy's expert, a setting of research/toy.py",
    "1%": "the exact toy's expert, a setting of research/toy.py",
    "1/2": "a probability, not a count",
    "1/3": "a probability, not a count",
    "50/50": "a coin flip, not a count",
}

VERSION = re.compile(r"\(https?://[^)]*\)|\b\d+\.\d+\.\d+\S*|\b(?:Python|Triton|torch|PyTorch|arXiv|CUDA) \d+\.\d+|\d+\.\d+(?=e-?\d)")
LINK = re.compile(r"(?:results|out)/([\w-]+)/report\.md|\bresults/([\w-]+)\b")
NUMBER = re.compile(
    r"(?<![\w.])(?P<pm>-?\d+\.\d+ ± \d+\.\d+)"                 # mean ± std
    r"|(?<![\w./])(?P<count>\d+/\d+)(?![\w./])"                 # a count, 10/10
    r"|\b(?P<of>\d+) of (?P<total>\d+)\b"                       # a count, 9 of 10
    r"|(?<![\w.])(?P<time>\d+(?:\.\d+)? ?(?:min|ms|s|h|core-minutes))(?![\w-])"  # a time
    r"|(?<![\w.])(?P<pct>\d+(?:\.\d+)?%)"                       # a percentage
    r"|(?<![\w.])(?P<ratio>\d+(?:\.\d+)?x)\b"                   # a ratio, 15x
    r"|(?<![\w.])(?P<dec>-?\d+\.\d+)(?![\w.]*\d)")              # a decimal


def read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def reports():
    return {os.path.basename(os.path.dirname(p)): read(p) for p in sorted(glob.glob(os.path.join(ROOT, "results", "*", "report.md")))}


def sections(text):
    """(first line number, lines) of each `##` section; the text above the first is one too."""
    lines, start, out = text.split("\n"), 0, []
    for i, line in enumerate(lines):
        if line.startswith("## ") and i > start:
            out.append((start + 1, lines[start:i]))
            start = i
    return out + [(start + 1, lines[start:])]


def linked(lines, all_reports):
    """The reports these lines link, by name."""
    return sorted({a or b for a, b in LINK.findall("\n".join(lines))} & set(all_reports))


def numbers(line):
    """The measured-looking numbers of one line, as (kind, text)."""
    line = VERSION.sub(" ", line.replace("**", ""))
    for m in NUMBER.finditer(line):
        kind = m.lastgroup if m.lastgroup != "total" else "of"
        yield kind, m.group(0)


def _decimals(text):
    return re.findall(r"(?<![\w.])-?\d+\.\d+", text)


def in_report(kind, number, text):
    """Whether a report's text holds the number (a decimal: also rounded from a longer one)."""
    flat = " ".join(text.split())
    if kind == "of":
        a, b = re.match(r"(\d+) of (\d+)", number).groups()
        return bool(re.search(rf"(?<![\d/]){a}(?:/| of ){b}(?![\d/])", flat))
    if kind == "count":
        a, b = number.split("/")
        return bool(re.search(rf"(?<![\d/]){a}(?:/| of ){b}(?![\d/])", flat))
    if kind == "pm":
        return any(_rounds_to(m, number) for m in re.findall(r"-?\d+\.\d+ ± \d+\.\d+", flat))
    if kind in ("time", "pct", "ratio"):
        return re.search(rf"(?<![\w.]){re.escape(number)}(?![\d])", flat) is not None or (
            kind == "time" and number.replace(" ", "") != number and number.replace(" ", "") in flat)
    if re.search(rf"(?<![\w.]){re.escape(number)}(?!\d)", flat):
        return True
    return any(_rounds_to(d, number) for d in _decimals(flat))


def _rounds_to(long, short):
    """Whether `long` ("0.978 ± 0.038", "0.988") written with `short`'s decimals is `short`."""
    longs, shorts = long.split(" ± "), short.split(" ± ")
    if long == short:
        return True
    return len(longs) == len(shorts) and all(
        len(a.split(".")[1]) > len(b.split(".")[1]) and abs(float(a) - float(b)) <= 0.5 * 10 ** -len(b.split(".")[1]) + 1e-9
        for a, b in zip(longs, shorts))


def check(docs=DOCS, texts=None):
    """One line per quoted number that no report holds: file:line, the number, the reports searched."""
    all_reports, bad = reports(), []
    for doc in docs:
        text = texts[doc] if texts else read(doc)
        parts = sections(text)
        home = linked(parts[0][1], all_reports)
        for first, lines in parts:
            section = linked(lines, all_reports) or home or sorted(all_reports)
            for i, line in enumerate(lines):
                searched = linked([line], all_reports) or section
                for kind, number in numbers(line):
                    if number not in ALLOWED and not any(in_report(kind, number, all_reports[r]) for r in searched):
                        bad.append(f"{doc}:{first + i}: {number!r} is in none of " + ", ".join(f"results/{r}" for r in searched))
    return bad


def test_every_number_the_documents_quote_is_in_a_report():
    bad = check()
    assert not bad, f"{len(bad)} numbers without a report:\n" + "\n".join(bad)


def test_the_check_finds_a_planted_mismatch():
    texts = {doc: read(doc) for doc in DOCS}
    texts["README.md"] = texts["README.md"].replace("| rev_kl 0.706 |", "| rev_kl 0.716 |", 1)
    texts["RESULTS.md"] = texts["RESULTS.md"].replace("SFT stays at 0.191 ± 0.040", "SFT stays at 0.191 ± 0.041")
    texts["EXERCISES.md"] = texts["EXERCISES.md"].replace("`23 passed, 25 deselected`", "`23 passed, 25 deselected` in 9 s")
    bad = check(texts=texts)
    assert len(bad) == 3, bad
    assert bad[0].startswith("README.md:23: '0.716' is in none of") and "results/quickstart" in bad[0], bad
    assert bad[1].startswith("RESULTS.md:") and "'0.191 ± 0.041' is in none of results/grid" in bad[1], bad
    assert bad[2].startswith("EXERCISES.md:") and "'9 s' is in none of results/lab" in bad[2], bad


def collected(*args):
    """(selected, deselected) of `pytest --collect-only` with these arguments."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                         cwd=ROOT, capture_output=True, text=True).stdout
    m = re.search(r"(\d+)(?:/(\d+))? tests? collected(?: \((\d+) deselected\))?", out)
    return int(m.group(1)), int(m.group(3) or 0)


def test_the_labs_test_counts_are_the_suites():
    """Exercises A and B quote pytest's summary lines; they follow the suite, not a report."""
    lab = read("EXERCISES.md")
    a_tests, _ = collected("tests/test_distill.py")
    a_failed = lab.split("## Coding exercise A", 1)[1].split("## Coding exercise B", 1)[0].count("\nFAILED ")
    assert f"{a_failed} failed, {a_tests - a_failed} passed" in lab and f"`{a_tests} passed`" in lab, a_tests
    b_tests, b_deselected = collected("tests/test_kernels.py", "-k", "gradcheck or divergence")
    b_failed = lab.split("## Coding exercise B", 1)[1].count("\nFAILED ")
    assert f"{b_failed} failed, {b_tests - b_failed} passed, {b_deselected} deselected" in lab, (b_tests, b_deselected)
    assert f"`{b_tests} passed, {b_deselected} deselected`" in lab, (b_tests, b_deselected)
