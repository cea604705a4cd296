"""The mode-weight law, measured in the GPT: how much of the expert's behaviour must the student
be able to represent for online IL to win?

The signed pointer task. The expert is trained on answers that are "+" (copy H digits: the
1-layer student can) with probability p, and "-" (follow H pointers: it cannot) otherwise
(--mode-weight p). toy.py derives what each method should do: SFT and the per-token objective
(gamma=0) keep P("+") = p; the sequence-level reverse KL (online IL, gamma=1) moves it to
    q* = sigmoid(logit p + H c),
where c is the price per digit of writing "-": the least reverse KL, per pointer digit, of a
guess that cannot follow the pointer. Here c is measured on each trained expert (the reverse KL
of a uniform guess, and of a guess at the prompt's own digits, whichever is less), and the
prediction is set beside P("+") of each trained student, computed exactly from its first-token
distribution, and its reward at temperature 1 and greedy.

    python -m research.modes --seeds 3               # p = 0.5, 0.2, 0.1, 0.05 at H = 1; out/modes/report.md
    python -m research.modes --seeds 3 --horizons 1,4   # and H = 4 (6000 expert steps at 3e-3 there)
    python -m research.modes --claims --seeds 3      # the paper's three rows: realizable; misspecified,
                                                     # reward-relative (mirror); not reward-relative
                                                     # (pointer --no-copy); out/claims/report.md

What it simplifies: only the misspecified (small) student is trained; c is estimated from two
guesses the student could make, not from the best the 1-layer class can do.
"""
import math
import os
import sys

if __package__ in (None, ""):  # run as python research/modes.py: the imports live in the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from data import encode_prompts
from errors import OneLineParser, UsageError
from eval import checkpoint_task, held_out_prompts, sparkline
from model import load_checkpoint
from research.jobs import GRID, add_job_flags, glue_train_args, grid_jobs, long_horizon_lr, read_results, run_jobs
from research import figures
from research.report import Report, mean_std, stat, table

STUDENTS = ("offline SFT", "online (γ=1)", "online (γ=0)")


@torch.no_grad()
def first_token_plus(model, tok, prompts):
    """P("+") of the first response token, averaged over the prompts (exact, no sampling)."""
    prompt, valid = encode_prompts(tok, prompts)
    logits = model.logits(prompt, valid)[:, -1].double()
    return torch.softmax(logits, -1)[:, tok.encode("+")[0]].mean().item()


@torch.no_grad()
def minus_price(expert, tok, task, prompts):
    """c: per pointer digit after "-", the reverse KL the student pays for a guess that cannot
    follow the pointer, at the correct "-" prefixes (teacher forcing): a uniform guess over the 10
    digits, or one at the prompt's digit frequencies; the smaller of the two, and both."""
    answers = [task.answers(p)[1] for p in prompts]  # "-" and the pointer digits
    rows = [[tok.bos] + tok.encode(p) + tok.encode(a) for p, a in zip(prompts, answers)]
    tokens = torch.tensor(rows)
    P = len(tok.encode(prompts[0])) + 1
    logp = torch.log_softmax(expert.logits(tokens, torch.ones_like(tokens, dtype=torch.bool)).double(), -1)
    digit_ids = torch.tensor([tok.encode(str(d))[0] for d in range(10)])
    at = logp[:, P:P + task.answer_len][..., digit_ids]  # [N, H, 10]: the predictions of each pointer digit
    uniform = (-math.log(10) - at.mean(-1)).mean().item()
    hist = torch.stack([torch.bincount(torch.tensor([int(c) for c in p[:-1]]), minlength=10) for p in prompts]).double()
    r = (hist / hist.sum(1, keepdim=True))[:, None, :]  # [N, 1, 10]
    guess = (torch.where(r > 0, r * (r.clamp_min(1e-300).log() - at), 0.0)).sum(-1).mean().item()
    return min(uniform, guess), uniform, guess


# (row label, task flags, student size, the claim, its check on one seed's results)
CLAIM_ROWS = [
    ("realizable (mirror, medium)", ["--task", "mirror"], "medium", "offline SFT within 0.05 of its expert",
     lambda r: r["offline SFT"] >= r["expert"] - 0.05),
    ("misspecified, reward-relative (mirror, small)", ["--task", "mirror"], "small", "online (γ=1) >= offline SFT + 0.3",
     lambda r: r["online (γ=1)"] >= r["offline SFT"] + 0.3),
    ("misspecified, not reward-relative (pointer --no-copy, small)", ["--task", "pointer", "--no-copy"], "small",
     "online (γ=1) < 0.5: no method reaches high reward", lambda r: r["online (γ=1)"] < 0.5),
]


def claims(a):
    """The paper's characterization in three rows, each a count over seeds: one grid per task."""
    tasks = {" ".join(flags): flags for _, flags, _, _, _ in CLAIM_ROWS}
    runs = {(t, s): (os.path.join(a.out_dir, t.replace("--", "").replace(" ", "-").replace("task-", ""), f"seed{s}"),
                     ["--seed", str(s), *flags, *a.train_args.split()]) for t, flags in tasks.items() for s in range(a.seeds)}
    report = Report(f"the paper's characterization: three rows, {a.seeds} seed(s)")
    jobs = [j for t in tasks for j in grid_jobs([runs[(t, s)] for s in range(a.seeds)], "medium", ["medium", "small"], GRID)]
    wall = run_jobs(jobs, a.jobs, a.print_commands)
    if wall is None:
        return
    lines = [f"{'student, and what it can represent':<62}| {'offline SFT':^15} | {'online (γ=1)':^15} | claim, over seeds"]
    for label, flags, size, claim, check in CLAIM_ROWS:
        t = " ".join(flags)
        res = read_results(jobs, [runs[(t, s)][0] for s in range(a.seeds)])
        per_seed = [{m[0]: res[(m[0], size)][s]["reward"] for m in GRID} for s in range(a.seeds)]
        ok = sum(check(r) for r in per_seed)
        lines.append(f"{label:<62}| {mean_std([r['offline SFT'] for r in per_seed]):^15} | "
                     f"{mean_std([r['online (γ=1)'] for r in per_seed]):^15} | {claim}: {ok}/{a.seeds}")
    report.add(f"held-out reward at temperature 1, mean ± std over {a.seeds} seed(s) ({wall / 60:.1f} min wall)", lines)
    report.write(a.out_dir)


def main(argv=None):
    p = OneLineParser(description="The mode-weight law measured in the GPT (pointer task, misspecified student).")
    p.add_argument("--claims", action="store_true", help="the paper's three rows instead (out/claims by default)")
    add_job_flags(p, "out/modes, or out/claims")
    p.add_argument("--weights", default="0.5,0.2,0.1,0.05", help="the values of p, the weight of the + mode")
    p.add_argument("--horizons", default="1", help="the values of H")
    a = p.parse_args(glue_train_args(argv))
    try:
        ps, hs = [float(x) for x in a.weights.split(",")], [int(x) for x in a.horizons.split(",")]
    except ValueError:
        p.error("--weights and --horizons are comma-separated numbers, e.g. 0.5,0.2 and 1,4")
    if a.seeds < 1 or a.jobs < 1 or not all(0 < x < 1 for x in ps) or not all(h >= 1 for h in hs):
        p.error("--seeds, --jobs, and every H must be >= 1; every p in (0, 1)")
    a.out_dir = a.out_dir or os.path.join("out", "claims" if a.claims else "modes")
    if a.claims:
        return claims(a)
    # H = 1 keeps the pipeline's defaults (the pointer expert converges there); longer H the recipe
    # results/modes was measured with: 6000 expert and base steps, every run at 3e-3 above H = 2
    recipe = {h: [] if h == 1 else ["--expert-steps", "6000", "--base-steps", "6000", "--eval-every", "250",
                                    *long_horizon_lr(h)] for h in hs}
    runs = {(x, h, s): (os.path.join(a.out_dir, f"p{x:g}", f"H{h}", f"seed{s}"),
                        ["--seed", str(s), "--task", "pointer", "--answer-len", str(h), "--mode-weight", f"{x:g}",
                         *recipe[h], *a.train_args.split()])
            for x in ps for h in hs for s in range(a.seeds)}
    report = Report(f"pointer: the mode-weight law, {a.seeds} seed(s)")
    jobs = grid_jobs(list(runs.values()), "medium", ["small"], GRID)
    wall = run_jobs(jobs, a.jobs, a.print_commands)
    if wall is None:
        return
    measured = {}
    for (x, h, s), (d, _) in runs.items():
        res = read_results(jobs, [d])
        expert, ck = load_checkpoint(os.path.join(d, "pointer", "expert.pt"))
        task, tok = checkpoint_task(d, ck)
        prompts = held_out_prompts(task, ck)
        c, c_uniform, c_guess = minus_price(expert, tok, task, prompts)
        m = dict(c=c, c_uniform=c_uniform, c_guess=c_guess, q_expert=first_token_plus(expert, tok, prompts),
                 expert=res[("expert", "small")][0]["reward"])
        # the law with p and the price measured on this expert: sigmoid(logit p + H c) (toy.mode_weight_law)
        q_e = min(max(m["q_expert"], 1e-12), 1 - 1e-12)  # the weight this expert gives "+", near p
        z = math.log(q_e / (1 - q_e)) + h * c
        m["q_pred"] = 1 / (1 + math.exp(-z)) if z > -700 else 0.0
        for j in jobs:
            if j.key[0] != d or j.key[1] not in STUDENTS:
                continue
            label = j.key[1]
            student, _ = load_checkpoint(j.result.replace(".result.json", ".pt"))
            r = res[(label, "small")][0]
            m[label] = dict(q=first_token_plus(student, tok, prompts), reward=r["reward"], greedy=r["reward_greedy"])
        measured[(x, h, s)] = m
    columns = ["expert P(+)", "c (nats)", "predicted q*", *[f"{k} P(+)" for k in STUDENTS],
               *[f"{k} reward" for k in STUDENTS], *[f"{k} greedy" for k in STUDENTS]]

    def cell(row, col):
        x, h = (float(v.split("=")[1]) for v in row.split(", "))
        ms = [measured[(x, int(h), s)] for s in range(a.seeds)]
        key = {"expert P(+)": lambda m: m["q_expert"], "c (nats)": lambda m: m["c"],
               "predicted q*": lambda m: m["q_pred"]}
        for k in STUDENTS:
            key[f"{k} P(+)"] = lambda m, k=k: m[k]["q"]
            key[f"{k} reward"] = lambda m, k=k: m[k]["reward"]
            key[f"{k} greedy"] = lambda m, k=k: m[k]["greedy"]
        return mean_std([key[col](m) for m in ms])

    row_names = [f"p={x:g}, H={h}" for h in hs for x in ps]
    report.add(f"P('+') predicted and measured, rewards at temperature 1 and greedy; mean ± std over {a.seeds} seed(s) "
               f"({wall / 60:.1f} min wall, {a.jobs} jobs)", table("p, H", row_names, columns, cell))
    for h in hs:
        report.add(f"H={h}: reward (temperature 1) against p = {', '.join(f'{x:g}' for x in ps)} (text plot, 0 to 1)",
                   [f"{k:<14} [{sparkline([sum(measured[(x, h, s)][k]['reward'] for s in range(a.seeds)) / a.seeds for x in ps])}]"
                    for k in STUDENTS] + [f"{'p itself':<14} [{sparkline(ps)}]"])
    lines = []
    for x in ps:
        for h in hs:
            ms = [measured[(x, h, s)] for s in range(a.seeds)]
            win = sum(m["online (γ=1)"]["reward"] >= m["offline SFT"]["reward"] + 0.3 for m in ms)
            keep = sum(abs(m["offline SFT"]["q"] - m["q_expert"]) <= 0.1 for m in ms)
            near = sum(abs(m["online (γ=1)"]["q"] - m["q_pred"]) <= 0.1 for m in ms)
            lines.append(f"p={x:g}, H={h}: online (γ=1) >= SFT + 0.3 on {win}/{a.seeds}; SFT's P(+) within 0.1 of the "
                         f"expert's on {keep}/{a.seeds}; online's P(+) within 0.1 of q* on {near}/{a.seeds}")
    report.add("claims, each a count over seeds", lines)
    # per p and H, each measured number's mean and std over seeds: figures.mode_weight draws them
    report.data({"seeds": a.seeds, "methods": list(STUDENTS),
                 "modes": [{"p": x, "H": h, **over_seeds([measured[(x, h, s)] for s in range(a.seeds)])}
                           for h in hs for x in ps]})
    report.add("figure (python -m research.figures)", ["![P('+') against p](mode_weight.svg)"])
    report.write(a.out_dir)
    figures.make(os.path.join(a.out_dir, "data.json"))


def over_seeds(ms):
    """Dicts of the same shape, one per seed -> that shape, each number as report.stat over seeds."""
    return {k: over_seeds([m[k] for m in ms]) if isinstance(v, dict) else stat([m[k] for m in ms])
            for k, v in ms[0].items()}


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        sys.exit(f"error: {e}")
