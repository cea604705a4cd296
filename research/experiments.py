"""The experiments, end to end from an empty folder: each trains what it needs with train.py
(one torch thread per job, --jobs at a time), prints its tables, and writes report.md, with the
data of its figure (data.json) and the figure (research/figures.py) beside it.

    python -m research.experiments --grid --seeds 3        # realizable vs misspecified: expert, SFT, online IL
    python -m research.experiments --ablation --seeds 3    # which ingredient of online IL carries the win
    python -m research.experiments --horizon --seeds 3     # reward vs horizon H on the pointer task
    python -m research.experiments --grid --print-commands # the train.py commands, dependencies first
    (python -m research.toy: the exact H=1 projections, no training)

A finished job leaves <run>.result.json with its settings; a rerun skips it (and refuses one
made with other settings), so an interrupted experiment continues where it stopped (and a
grid's runs can be shared with the ablation).
"""
import json
import os
import statistics
import sys

if __package__ in (None, ""):  # run as python research/experiments.py: the imports live in the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import TASKS
from errors import OneLineParser, UsageError
from eval import reward_curve, sparkline
from research.jobs import (ABLATION, GRID, add_job_flags, glue_train_args, grid_jobs, long_horizon_lr, metrics_paths,
                           read_results, run_jobs)
from research import figures
from research.report import Report, mean_std, stat, table


# ----------------------------------------------------------------------------- tables and reports
def mean_follow(results):
    rows = [r["follow"] for r in results]
    return [sum(col) / len(col) for col in zip(*rows)]


def claim_counts(res, expert_size, small, expert_bar=0.95):
    """The claims, each as a count over seeds, and the seeds where one fails (to be explained)."""
    n = len(res[("expert", expert_size)])
    expert = [r["reward"] for r in res[("expert", expert_size)]]
    checks = [(f"expert reaches >= {expert_bar:g}", [e >= expert_bar for e in expert],
               lambda i: f"expert {expert[i]:.3f}")]
    sft_r = [r["reward"] for r in res[("offline SFT", expert_size)]]
    checks.append((f"realizable ({expert_size}): offline SFT within 0.05 of its expert",
                   [s >= e - 0.05 for s, e in zip(sft_r, expert)], lambda i: f"SFT {sft_r[i]:.3f}, expert {expert[i]:.3f}"))
    for s in small:
        sft_m = [r["reward"] for r in res[("offline SFT", s)]]
        onl = [r["reward"] for r in res[("online (γ=1)", s)]]
        checks.append((f"misspecified ({s}): online (γ=1) >= offline SFT + 0.3",
                       [o >= f + 0.3 for o, f in zip(onl, sft_m)],
                       lambda i, o=onl, f=sft_m: f"online {o[i]:.3f}, SFT {f[i]:.3f}"))
    width = max(len(c[0]) for c in checks) + 2
    lines = []
    for claim, ok, why in checks:
        fails = [i for i in range(n) if not ok[i]]
        lines.append(f"{claim:<{width}} holds on {sum(ok)}/{n} seeds" +
                     "".join(f"; fails on seed {i} ({why(i)})" for i in fails))
    return lines


def read_curve(path):
    """The held-out checks of one run's metrics.jsonl: {"step": [...], "eval_reward": [...]}."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if "eval_reward" in line]
    return {"step": [r["step"] for r in rows], "eval_reward": [r["eval_reward"] for r in rows]}


# ----------------------------------------------------------------------------- the experiments
def seed_runs(a, train_args):
    dirs = [os.path.join(a.out_dir, f"seed{s}") for s in range(a.seeds)]
    return dirs, [(d, ["--seed", str(s), *train_args]) for s, d in enumerate(dirs)]


# Countdown's recipe (RESULTS.md, "Countdown"): the expert is 4 layers deep (2 layers reached 0.69
# after 15000 steps on seed 0), trained for COUNTDOWN_STEPS (12000 reached 0.8 on 1 seed of 3,
# 24000 on 2 of 3), and the warm-start base takes as many steps, so that the realizable student
# is trained as long as its expert. Held out: 1024 prompts, a tighter estimate than 256 for a
# bar at 0.8. The misspecified student is the 1-layer small size. --sizes and --train-args
# (after the recipe) override it.
COUNTDOWN_SIZES, COUNTDOWN_STEPS, COUNTDOWN_BAR = "4x64x4,small", 24000, 0.8


def task_recipe(task):
    """(default --sizes, train.py flags before --train-args, the expert's bar) for the grid
    and the ablation."""
    if task == "countdown":
        steps = str(COUNTDOWN_STEPS)
        return COUNTDOWN_SIZES, ["--expert-steps", steps, "--base-steps", steps, "--eval-every", "1000",
                                  "--eval-prompts", "1024"], COUNTDOWN_BAR
    return "medium,small", [], 0.95


def grid(a, train_args):
    """The paper's table: expert vs offline vs online IL, realizable and misspecified students."""
    _, recipe, bar = task_recipe(a.task)
    expert_size, *small = a.sizes.split(",")
    sizes = [expert_size, *small]
    train_args = [*train_args[:2], *recipe, *train_args[2:]]  # --task T, the recipe, then --train-args
    dirs, runs = seed_runs(a, train_args)
    report = Report(f"{a.task}: realizable vs misspecified, {a.seeds} seeds")  # its clock starts here
    jobs = grid_jobs(runs, expert_size, sizes, GRID)
    wall = run_jobs(jobs, a.jobs, a.print_commands)
    if wall is None:
        return
    res = read_results(jobs, dirs)
    rows = {f"{expert_size}: same as expert (realizable)": expert_size,
            **{f"{s}: smaller (misspecified)": s for s in small}}
    for key, what in (("reward", "held-out reward at temperature 1"), ("reward_greedy", "held-out reward, greedy decoding"),
                      ("rev_kl", "sequence-level KL(student || expert)"),
                      ("fwd_kl", "sequence-level KL(expert || student)"), ("coverage", "valid answers per prompt in 8 samples")):
        report.add(f"{a.task}: {what}, mean ± std over {a.seeds} seeds ({wall / 60:.1f} min wall, {a.jobs} jobs)",
                   table("student size", list(rows), [m[0] for m in GRID],
                         lambda r, c: mean_std([x[key] for x in res[(c, rows[r])]])))
    report.add(f"claims, each a count over the {a.seeds} seeds", claim_counts(res, expert_size, small, bar))
    if recipe:
        report.add("recipe (every run; --train-args after it)", [" ".join(train_args)])
    report.add("follow: per answer token (end token last), the probability of the right next token after "
               "a correct prefix, mean over seeds (about 1/2: cannot tell the two modes apart there)",
               [f"{size:<7} {label:<13} " + " ".join(f"{v:.2f}" for v in mean_follow(res[(label, size)]))
                for size in sizes for label, _ in GRID if (label, size) in res])
    report.add("held-out reward vs step (text plot, mean over seeds, 0 to 1)",
               [f"{size:<7} {label:<13} {reward_curve(metrics_paths(jobs, dirs, label, size))}"
                for size in sizes for label, _ in GRID if label not in ("expert", "base")])
    with open(os.path.join(a.out_dir, "results.json"), "w") as f:
        json.dump({f"{l}|{s}": v for (l, s), v in res.items()}, f)
    # every run's held-out curve and final rewards: figures.reward_vs_step draws them
    report.data({"task": a.task, "seeds": a.seeds, "sizes": {s: "realizable" if s == expert_size else "misspecified"
                                                             for s in sizes},
                 "runs": [{"method": label, "size": size, "seed": seed, **read_curve(path), "reward": r["reward"],
                           "reward_greedy": r["reward_greedy"]}
                          for label, _ in GRID for size in ([expert_size] if label == "expert" else sizes)
                          for seed, (path, r) in enumerate(zip(metrics_paths(jobs, dirs, label, size), res[(label, size)]))]})
    report.add("figure (python -m research.figures)", ["![held-out reward against step](reward_vs_step.svg)"])
    report.write(a.out_dir)
    figures.make(os.path.join(a.out_dir, "data.json"))


def ablation(a, train_args):
    """Which ingredient carries online IL's win on the misspecified student."""
    expert_size, small = a.sizes.split(",")[:2]
    train_args = [*train_args[:2], *task_recipe(a.task)[1], *train_args[2:]]  # as the grid, so they share runs
    dirs, runs = seed_runs(a, train_args)
    report = Report(f"{a.task}: ablation of online IL, {a.seeds} seeds")
    jobs = grid_jobs(runs, expert_size, [small], ABLATION)
    wall = run_jobs(jobs, a.jobs, a.print_commands)
    if wall is None:
        return
    res = read_results(jobs, dirs)
    report.add(f"{a.task}, student {small} (misspecified), mean ± std over {a.seeds} seeds ({wall / 60:.1f} min wall)",
               table("method", [m[0] for m in ABLATION], ["reward", "reward_greedy", "rev_kl", "fwd_kl", "coverage"],
                     lambda r, c: mean_std([x[c] for x in res[(r, small)]])))
    report.write(a.out_dir, "report-ablation.md")  # beside the grid's report.md when it shares its runs


# The sweep's recipe. At H <= 2 every size keeps its own lr; above, 3e-3 (long_horizon_lr). The
# expert and the bases stop at their first held-out check with every answer right (--stop-at 1; a
# base: at its expert's reward if lower), within 6000 and 4000 steps; the gate is on, so an expert
# or a realizable base that misses is trained again from another init (--expert-restarts), as the
# default command does. --train-args come after the recipe and override it.
def horizon_recipe(h):
    return ["--expert-steps", "6000", "--base-steps", "4000", "--stop-at", "1", "--eval-every", "100",
            "--expert-min-reward", "0.95", *long_horizon_lr(h)]


def steps_trained(run_dir, name):
    """(steps its final attempt trained, attempts) of a run that --stop-at may have ended early."""
    with open(os.path.join(run_dir, "pointer", f"{name}.metrics.jsonl")) as f:
        last = max([json.loads(line)["step"] for line in f], default=0)  # none: a run of 0 steps
    attempts = 1 + sum(f.startswith(f"{name}-attempt") and f.endswith(".pt") for f in os.listdir(os.path.join(run_dir, "pointer")))
    return last, attempts


def first_errors(results, label):
    """Where sampled responses first go wrong (position 0 the sign, 1..H the digits, H+1 the
    end), summed over seeds, and the rate per position among responses right up to there."""
    counts = [sum(x) for x in zip(*(r["first_error"] for r in results))]
    n = alive = sum(r["n_prompts"] for r in results)
    hazard = []
    for c in counts:
        hazard.append(c / alive if alive else 0.0)
        alive -= c
    return [f"{label:<22} wrong {sum(counts)}/{n}; first wrong token at position 0..H+1 (sign, digits, end): "
            + " ".join(map(str, counts)),
            f"{'':<22} rate per position among responses right so far: " + " ".join(f"{x:.3f}" for x in hazard)]


def horizon(a, train_args):
    """Reward vs horizon H on the pointer task (data.py): the prompt is fixed at max(H) digits
    (at least 10), the answer a sign and H digits; then, for the realizable student's offline
    SFT at every H, where its errors start, against the expert's (error accumulation).
    Every run takes horizon_recipe(H), then --train-args (which can override it)."""
    expert_size, *small = a.sizes.split(",")
    sizes, hs = [expert_size, *small], [int(h) for h in a.horizons.split(",")]
    digits = max(10, *hs)
    runs = {(h, s): (os.path.join(a.out_dir, f"H{h}", f"seed{s}"),
                     ["--seed", str(s), "--task", "pointer", "--digits", str(digits), "--answer-len", str(h),
                      *horizon_recipe(h), *train_args])
            for h in hs for s in range(a.seeds)}
    report = Report(f"pointer: reward vs horizon H, {a.seeds} seed(s)")
    # the longest horizon's runs first: they are the longest chains (expert, base, then a method)
    jobs = grid_jobs([runs[k] for k in sorted(runs, key=lambda k: (-k[0], k[1]))], expert_size, sizes, GRID)
    done = sum(os.path.exists(j.result) for j in jobs)  # a rerun times only what it trains
    wall = run_jobs(jobs, a.jobs, a.print_commands)
    if wall is None:
        return
    report.add("wall time" + (", in one piece" if not done else ""),
               [f"{wall / 60:.1f} min for {len(jobs) - done} train.py runs" + (f" (and {done} done before)" if done else "")
                + f", {a.jobs} at a time, one torch thread each"])
    res = {h: read_results(jobs, [runs[(h, s)][0] for s in range(a.seeds)]) for h in hs}
    for size in sizes:
        kind = "realizable" if size == expert_size else "misspecified"
        for key, how in (("reward", "temperature 1"), ("reward_greedy", "greedy")):
            report.add(f"pointer ({digits} digits), student {size} ({kind}): held-out reward ({how}), mean ± std over "
                       f"{a.seeds} seed(s)",
                       table("H", [str(h) for h in hs], [m[0] for m in GRID],
                             lambda r, c, key=key: mean_std([x[key] for x in res[int(r)][(c, size)]])))
    plot = [f"{'student':<24}{'method':<15}" + " ".join(f"{'H=' + str(h):>5}" for h in hs)]
    for size in sizes:
        for label in [m[0] for m in GRID if size == expert_size or m[0] != "expert"]:  # the expert once
            ys = [statistics.fmean(x["reward"] for x in res[h][(label, size)]) for h in hs]
            plot.append(f"{size + (' (realizable)' if size == expert_size else ' (misspec.)'):<24}{label:<15}"
                        + " ".join(f"{y:5.2f}" for y in ys) + f"   |{sparkline(ys)}|")
    report.add("reward (temperature 1, mean over seeds) against H, and as a text plot: one block per H, "
               "0 blank to 1 full", plot)
    for h in hs:
        report.add(f"claims at H={h}, each a count over the {a.seeds} seed(s)", claim_counts(res[h], expert_size, small))
    conv = []
    for h in hs:
        for name in ("expert", f"base-{expert_size}", *(f"base-{s}" for s in small)):
            got = [steps_trained(runs[(h, s)][0], name) for s in range(a.seeds)]
            conv.append(f"H={h:<3} {name:<14} steps " + " ".join(f"{n:5d}" for n, _ in got) +
                        "   attempts " + " ".join(str(k) for _, k in got))
    report.add(f"how long the expert and the bases trained (--stop-at 1: their first held-out check with every "
               f"answer right; seeds 0..{a.seeds - 1}; attempts > 1: trained again from another init)", conv)
    for h in hs:
        report.add(f"where the realizable models' errors start at H={h} (sampled at temperature 1, held-out prompts "
                   f"of {a.seeds} seed(s))",
                   first_errors(res[h][("expert", expert_size)], f"expert ({expert_size})") +
                   first_errors(res[h][("offline SFT", expert_size)], f"offline SFT ({expert_size})"))
    report.add("recipe (every run; --train-args after it)", [f"H={h}: " + " ".join(horizon_recipe(h) + train_args) for h in hs])

    def over_h(key, label, size):  # mean and std over seeds, one per H
        per_h = [stat([x[key] for x in res[h][(label, size)]]) for h in hs]
        return {"mean": [s["mean"] for s in per_h], "std": [s["std"] for s in per_h]}

    # figures.reward_vs_horizon draws them
    report.data({"seeds": a.seeds, "digits": digits, "horizons": hs,
                 "students": {s: "realizable" if s == expert_size else "misspecified" for s in sizes},
                 **{key: {size: {label: over_h(key, label, size) for label, _ in GRID} for size in sizes}
                    for key in ("reward", "reward_greedy")}})
    report.add("figure (python -m research.figures)", ["![reward against H](reward_vs_horizon.svg)"])
    report.write(a.out_dir)
    figures.make(os.path.join(a.out_dir, "data.json"))


def main(argv=None):
    p = OneLineParser(description="Run an experiment end to end: train what it needs, print its tables, write report.md.")
    for name, text in (("grid", "the realizability table: expert, SFT, online students"),
                       ("ablation", "the ingredients of online IL, misspecified student"),
                       ("horizon", "reward vs horizon H on the pointer task")):
        p.add_argument(f"--{name}", action="store_true", help=text)
    p.add_argument("--quick", action="store_true", help="horizon: seed 0 alone (the same runs as seed 0 of the full sweep)")
    add_job_flags(p, "out/<experiment>")
    p.add_argument("--task", default="mirror", choices=tuple(TASKS), help="task (grid, ablation)")
    p.add_argument("--sizes", default="", help="the expert's size, then the misspecified size(s) (default: medium,small; "
                   "countdown 4x64x4,small)")
    p.add_argument("--horizons", default="1,2,4,8,16", help="horizon: the values of H (each one adds a full grid per seed)")
    a = p.parse_args(glue_train_args(argv))
    chosen = [k for k in ("grid", "ablation", "horizon") if getattr(a, k)]
    if len(chosen) != 1:
        p.error("choose one of --grid, --ablation, --horizon")
    if a.seeds < 1 or a.jobs < 1:
        p.error("--seeds and --jobs must be >= 1")
    a.sizes = a.sizes or task_recipe("pointer" if chosen == ["horizon"] else a.task)[0]
    sizes = a.sizes.split(",")
    if not all(sizes) or len(set(sizes)) < len(sizes) or ("ablation" in chosen and len(sizes) < 2):
        p.error(f"--sizes {a.sizes!r}: give the expert's size, then the other student size(s), each once, e.g. medium,small")
    if not all(h.isdigit() and int(h) >= 1 for h in a.horizons.split(",")):
        p.error(f"--horizons {a.horizons!r}: give answer lengths H >= 1, e.g. 1,2,4,8")
    if a.quick:
        if chosen != ["horizon"]:
            p.error("--quick goes with --horizon")
        a.seeds = 1
    a.out_dir = a.out_dir or os.path.join("out", chosen[0] + ("-quick" if a.quick else ""))
    train_args = ["--task", a.task, *a.train_args.split()] if chosen[0] != "horizon" else a.train_args.split()
    dict(grid=grid, ablation=ablation, horizon=horizon)[chosen[0]](a, train_args)


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:  # bad input: one line; anything else is a bug and keeps its traceback
        sys.exit(f"error: {e}")
