"""Evaluate checkpoints, and run the realizability experiment end to end.

    python eval.py out/mirror/onpolicy-small-g1.pt    # one checkpoint: metrics + samples, against the
                                                     # expert.pt beside it (its fingerprint must match)
    python eval.py --grid --seeds 3                  # the paper's table, from scratch

Metrics (held-out prompts, disjoint from training prompts):
  reward         mean verifier reward of responses sampled at temperature 1
  reward_greedy  the same for greedy decoding
  fwd_kl         sequence-level KL(expert || student), on expert samples   (what SFT minimises)
  rev_kl         sequence-level KL(student || expert), on student samples  (what online IL minimises)
  coverage       distinct valid answers per prompt among k samples (the expert covers every mode)
  follow         per answer position: the probability of the right next token after a correct
                 prefix, averaged over every valid answer (teacher forcing). Where a student
                 cannot tell the modes apart it is at most 1/2 there, whatever it was trained by.
"""
import json
import os
import sys

import torch

from data import decode_responses, encode_prompts, encode_responses
from errors import OneLineParser, UsageError


@torch.no_grad()
def sample_texts(model, tok, task, prompts, temperature, seed, device="cpu"):
    """Sampled (or greedy, temperature 0) responses, as tokens and texts."""
    g = torch.Generator(device).manual_seed(seed)
    prompt, pvalid = encode_prompts(tok, prompts, device)
    resp, rmask = model.generate(prompt, pvalid, task.max_response_len + 1, tok.end, tok.pad,
                                 temperature=temperature, generator=g)
    return (prompt, pvalid, resp, rmask), decode_responses(tok, resp, rmask)


def mean_reward(task, prompts, texts):
    return sum(task.reward(p, r) for p, r in zip(prompts, texts)) / len(prompts)


def quick_eval(model, tok, task, prompts, seed=0):
    """Reward at temperature 1 and greedy: what train.py prints at the end of a run."""
    model.eval()
    dev = next(model.parameters()).device
    _, t1 = sample_texts(model, tok, task, prompts, 1.0, seed, dev)
    _, t0 = sample_texts(model, tok, task, prompts, 0.0, seed, dev)
    return dict(reward=mean_reward(task, prompts, t1), reward_greedy=mean_reward(task, prompts, t0))


def sequence_logprob(model, batch):
    """log pi(y|x) of whole responses [B]."""
    from model import response_logprobs
    return response_logprobs(model, *batch).sum(1)


@torch.no_grad()
def follow_rates(model, tok, task, prompts, max_answers=8):
    """Per answer position (the end token last), the mean probability of each valid answer's
    next token given its own correct prefix: how well the model can keep to any one answer."""
    from model import response_logprobs
    pairs = [(p, a) for p in prompts for a in task.answers(p)[:max_answers]]
    dev = next(model.parameters()).device
    prompt, pvalid = encode_prompts(tok, [p for p, _ in pairs], dev)
    resp, rmask = encode_responses(tok, [a for _, a in pairs], dev)
    prob = response_logprobs(model, prompt, pvalid, resp, rmask).exp() * rmask
    return (prob.sum(0) / rmask.sum(0).clamp(min=1)).tolist()


@torch.no_grad()
def evaluate(model, expert, tok, task, prompts, seed=0, k=8, n_coverage=64, n_show=6):
    """Every metric in the module docstring, plus a few sample responses marked right/wrong."""
    model.eval()
    dev = next(model.parameters()).device
    batch_s, texts_s = sample_texts(model, tok, task, prompts, 1.0, seed, dev)
    _, texts_g = sample_texts(model, tok, task, prompts, 0.0, seed, dev)
    batch_e, _ = sample_texts(expert, tok, task, prompts, 1.0, seed + 1, dev)
    fwd_kl = (sequence_logprob(expert, batch_e) - sequence_logprob(model, batch_e)).mean().item()
    rev_kl = (sequence_logprob(model, batch_s) - sequence_logprob(expert, batch_s)).mean().item()
    cov_prompts = prompts[:n_coverage]
    _, many = sample_texts(model, tok, task, [p for p in cov_prompts for _ in range(k)], 1.0, seed + 2, dev)
    coverage = sum(len({r for r in many[i * k:(i + 1) * k] if task.reward(p, r)})
                   for i, p in enumerate(cov_prompts)) / len(cov_prompts)
    samples = [(p, r, bool(task.reward(p, r))) for p, r in zip(prompts[:n_show], texts_s)]
    return dict(reward=mean_reward(task, prompts, texts_s), reward_greedy=mean_reward(task, prompts, texts_g),
                fwd_kl=fwd_kl, rev_kl=rev_kl, coverage=coverage, follow=follow_rates(model, tok, task, cov_prompts),
                samples=samples)


def describe(name, result, n_prompts):
    """The result as a person reads it: one line of metrics and a few marked samples."""
    lines = [f"result: {name}: reward {result['reward']:.3f} (temperature 1), {result['reward_greedy']:.3f} (greedy) "
             f"on {n_prompts} held-out prompts | fwd_kl {result['fwd_kl']:.3f} | rev_kl {result['rev_kl']:.3f} | "
             f"coverage {result['coverage']:.2f} valid answers/prompt",
             "  follow (per answer position, end token last): " + " ".join(f"{x:.2f}" for x in result["follow"])]
    lines += [f"  {'right' if ok else 'wrong'}  {p}{r}" for p, r, ok in result["samples"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the experiments
# A method is (column label, train.py flags, the run name train.py gives it for a student size).
EXPERT = ("expert", ["--mode", "expert"], lambda s: "expert")
BASE = ("base", ["--mode", "base"], lambda s: f"base-{s}")
SFT = ("offline SFT", ["--mode", "sft"], lambda s: f"sft-{s}")


def online(label, *flags, suffix=""):
    gamma = flags[flags.index("--gamma") + 1] if "--gamma" in flags else "1"
    return (label, ["--mode", "onpolicy", "--gamma", gamma, *[f for f in flags if f not in ("--gamma", gamma)]],
            lambda s: f"onpolicy-{s}-g{float(gamma):g}{suffix}")


GRID = [EXPERT, BASE, SFT, online("online (γ=1)"), online("online (γ=0)", "--gamma", "0")]
ABLATION = [EXPERT, BASE, SFT, online("online γ=1"), online("online γ=0.5", "--gamma", "0.5"),
            online("online γ=0", "--gamma", "0"),
            online("sampled-token γ=0", "--gamma", "0", "--estimator", "sampled", suffix="-sampled"),
            online("sampled-token γ=1", "--estimator", "sampled", suffix="-sampled"),
            online("forward KL γ=1", "--divergence", "forward", suffix="-forward"),
            online("JSD(0.5) γ=1", "--divergence", "jsd", "--beta", "0.5", suffix="-jsd-beta0.5"),
            online("λ=0.5 mix γ=1", "--mix", "0.5", suffix="-mix0.5")]


def run_jobs(jobs, parallel):
    """Run train.py jobs, `parallel` at a time, one torch thread each (fastest at these
    sizes). jobs: (key, argv, log_path, keys it waits for, result file), listed dependencies
    first, so a worker only ever waits on a job that is already running. A job whose result
    file exists is skipped, so an interrupted experiment continues where it stopped."""
    import subprocess
    import time
    from concurrent.futures import ThreadPoolExecutor
    futures, t0 = {}, time.time()

    def one(key, argv, log, deps, done_file):
        for d in deps:
            futures[d].result()
        if os.path.exists(done_file):  # finished earlier (a rerun, or a shared run): keep it
            print(f"[{time.time() - t0:5.0f}s] already done: {key}", flush=True)
            return
        os.makedirs(os.path.dirname(log), exist_ok=True)
        with open(log, "w") as f:
            rc = subprocess.call([sys.executable, "train.py", "--threads", "1", *argv], stdout=f, stderr=subprocess.STDOUT)
        if rc != 0:
            raise UsageError(f"{key} failed (exit {rc}); its log, with the reason, is {log}")
        print(f"[{time.time() - t0:5.0f}s] done: {key}", flush=True)

    with ThreadPoolExecutor(parallel) as pool:
        for job in jobs:
            futures[job[0]] = pool.submit(one, *job)
        for f in futures.values():
            f.result()
    return time.time() - t0


def grid_jobs(runs, task, expert_size, student_sizes, methods):
    """runs: (run dir, train.py flags) per seed/setting. Experts first, then student bases,
    then the methods, so that every job's dependencies were submitted before it."""
    jobs = []
    for label, flags, name in methods:
        for d, args in runs:
            for size in student_sizes if label != "expert" else [expert_size]:
                deps = [] if label == "expert" else [(d, "expert", expert_size)]
                deps += [(d, "base", size)] if label not in ("expert", "base") else []
                log = os.path.join(d, "logs", f"{label}-{size}.log".replace(" ", "_"))
                jobs.append(((d, label, size), [*flags, *args, "--out-dir", d, "--expert-size", expert_size,
                                                "--student-size", size], log, deps,
                             os.path.join(d, task, f"{name(size)}.result.json")))
    return jobs


def read_results(run_dirs, task, student_sizes, methods):
    """{(label, size): [result per run dir]} from the <name>.result.json files train.py writes."""
    res = {}
    for d in run_dirs:
        for label, _, name in methods:
            for size in student_sizes:
                with open(os.path.join(d, task, f"{name(size)}.result.json")) as f:
                    res.setdefault((label, size), []).append(json.load(f))
    return res


def mean_std(xs):
    t = torch.tensor(xs, dtype=torch.float64)
    return f"{t.mean():.3f} ± {t.std() if len(xs) > 1 else 0:.3f}"


def print_table(corner, rows, columns, cell):
    """rows, columns: labels; cell(row, column) -> text."""
    width = max(len(corner), *(len(r) for r in rows)) + 1
    widths = [max(15, len(c)) for c in columns]
    print(f"{corner:<{width}}| " + " | ".join(f"{c:^{w}}" for c, w in zip(columns, widths)))
    for r in rows:
        print(f"{r:<{width}}| " + " | ".join(f"{cell(r, c):^{w}}" for c, w in zip(columns, widths)))


def plot_curves(run_dirs, task, student_sizes, methods, path):
    """Held-out reward vs step per method (optional: needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the reward-vs-step plot")
        return
    fig, axes = plt.subplots(1, len(student_sizes), figsize=(6 * len(student_sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], student_sizes):
        for j, (label, _, name) in enumerate(methods):
            if label in ("expert", "base"):
                continue
            for i, d in enumerate(run_dirs):
                with open(os.path.join(d, task, f"{name(size)}.metrics.jsonl")) as f:
                    pts = [json.loads(l) for l in f if "eval_reward" in l]
                ax.plot([p["step"] for p in pts], [p["eval_reward"] for p in pts], color=f"C{j}", alpha=0.8,
                        label=label if i == 0 else None)
        ax.set(title=f"student: {size}", xlabel="step", ylabel="held-out reward (temperature 1)", ylim=(-0.02, 1.02))
        ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    print(f"wrote {path}")


def grid(a, train_args):
    """The paper's table: expert vs offline vs online IL, realizable and misspecified students."""
    expert_size, *small = a.sizes.split(",")
    sizes, dirs = [expert_size, *small], [os.path.join(a.out_dir, f"seed{s}") for s in range(a.seeds)]
    runs = [(d, ["--seed", str(s), *train_args]) for s, d in enumerate(dirs)]
    wall = run_jobs(grid_jobs(runs, a.task, expert_size, sizes, GRID), a.jobs)
    res = read_results(dirs, a.task, sizes, GRID)
    rows = {f"{expert_size}: same as expert (realizable)": expert_size,
            **{f"{s}: smaller (misspecified)": s for s in small}}
    for key, what in (("reward", "held-out reward at temperature 1"), ("rev_kl", "sequence-level KL(student || expert)"),
                      ("fwd_kl", "sequence-level KL(expert || student)"), ("coverage", "valid answers per prompt in 8 samples")):
        print(f"\n{a.task}: {what}, mean ± std over {a.seeds} seeds ({wall / 60:.1f} min wall, {a.jobs} jobs)")
        print_table("student size", list(rows), [m[0] for m in GRID],
                    lambda r, c: mean_std([x[key] for x in res[(c, rows[r])]]))
    with open(os.path.join(a.out_dir, "results.json"), "w") as f:
        json.dump({f"{l}|{s}": v for (l, s), v in res.items()}, f)
    plot_curves(dirs, a.task, sizes, GRID, os.path.join(a.out_dir, "reward_vs_step.png"))


def ablation(a, train_args):
    """Which ingredient carries online IL's win on the misspecified student."""
    expert_size, small = a.sizes.split(",")[:2]
    dirs = [os.path.join(a.out_dir, f"seed{s}") for s in range(a.seeds)]
    runs = [(d, ["--seed", str(s), *train_args]) for s, d in enumerate(dirs)]
    wall = run_jobs(grid_jobs(runs, a.task, expert_size, [small], ABLATION), a.jobs)
    res = read_results(dirs, a.task, [small], ABLATION)
    print(f"\n{a.task}, student {small} (misspecified), mean ± std over {a.seeds} seeds ({wall / 60:.1f} min wall)")
    keys = ["reward", "rev_kl", "fwd_kl", "coverage"]
    print_table("method", [m[0] for m in ABLATION], keys, lambda r, c: mean_std([x[c] for x in res[(r, small)]]))


def horizon(a, train_args):
    """Reward vs response length H: mirror with a fixed prompt of max(H) digits, H digits read back."""
    expert_size, *small = a.sizes.split(",")
    sizes, hs = [expert_size, *small], [int(h) for h in a.horizons.split(",")]
    runs = {(h, s): (os.path.join(a.out_dir, f"H{h}", f"seed{s}"),
                     ["--seed", str(s), "--digits", str(max(hs)), "--answer-len", str(h), *train_args])
            for h in hs for s in range(a.seeds)}
    wall = run_jobs(grid_jobs(list(runs.values()), "mirror", expert_size, sizes, GRID), a.jobs)
    for size in sizes:
        kind = "realizable" if size == expert_size else "misspecified"
        print(f"\nmirror ({max(hs)} digits), student {size} ({kind}): held-out reward, mean ± std over "
              f"{a.seeds} seeds ({wall / 60:.1f} min wall for the sweep)")
        res = {h: read_results([runs[(h, s)][0] for s in range(a.seeds)], "mirror", [size], GRID) for h in hs}
        print_table("H", [str(h) for h in hs], [m[0] for m in GRID],
                    lambda r, c: mean_std([x["reward"] for x in res[int(r)][(c, size)]]))


def toy(K=10, eps=0.01):
    """The information-theoretic bottleneck at H=1, exactly. The expert is a known
    distribution over K answers: the two correct ones sit at the ends of a 1-D embedding
    order (probability (1-eps)/2 each), the wrong ones in between share eps. The student
    class is q_s(k) ∝ exp(s * e_k) with fixed e_k = linspace(-1, 1, K): it can put its mass
    on one end, or spread it, but never on both ends at once. Offline IL with infinite data
    converges to the forward-KL projection, online IL to the reverse-KL projection; both are
    found here by minimising over s on a fine grid, then refined by Newton's method."""
    e = torch.linspace(-1, 1, K, dtype=torch.float64)
    p = torch.full((K,), eps / (K - 2), dtype=torch.float64)
    p[0] = p[-1] = (1 - eps) / 2
    correct = torch.zeros(K, dtype=torch.bool)
    correct[[0, -1]] = True

    def q(s):
        return torch.softmax(s * e, 0)

    def fwd(s):
        return (p * (p.log() - q(s).log())).sum()

    def rev(s):
        return (q(s) * (q(s).log() - p.log())).sum()

    out = {}
    for name, f in (("forward KL (offline IL)", fwd), ("reverse KL (online IL)", rev)):
        grid_s = torch.linspace(-60, 60, 24001, dtype=torch.float64)
        s = grid_s[torch.stack([f(x) for x in grid_s]).argmin()].clone()
        for _ in range(20):  # Newton steps on the 1-D objective
            s.requires_grad_(True)
            g, = torch.autograd.grad(f(s), s, create_graph=True)
            h, = torch.autograd.grad(g, s)
            s = (s - g / h if h > 0 else s).detach()
        qs = q(s)
        out[name] = dict(s=s.item(), reward=qs[correct].sum().item(), fwd_kl=fwd(s).item(), rev_kl=rev(s).item())
    return out


def main(argv=None):
    p = OneLineParser(description="Evaluate a checkpoint, or run one of the experiments.")
    p.add_argument("checkpoint", nargs="?", help="a student checkpoint to evaluate against its expert")
    p.add_argument("--expert", default="", help="the checkpoint's expert (default: expert.pt beside it)")
    p.add_argument("--grid", action="store_true", help="the realizability table: expert, SFT, online students")
    p.add_argument("--ablation", action="store_true", help="the ingredients of online IL, misspecified student")
    p.add_argument("--horizon", action="store_true", help="reward vs response length H")
    p.add_argument("--toy", action="store_true", help="the exact H=1 forward vs reverse KL projections")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    p.add_argument("--jobs", type=int, default=2, help="training runs in parallel")
    p.add_argument("--task", default="mirror", choices=("mirror", "countdown"), help="task (grid, ablation)")
    p.add_argument("--sizes", default="medium,small", help="the expert's size, then the misspecified size(s)")
    p.add_argument("--horizons", default="1,2,4,8", help="horizon: the values of H")
    p.add_argument("--out-dir", default="", help="where runs go (default out/<experiment>)")
    p.add_argument("--train-args", default="", help="extra flags for every train.py run, quoted")
    a = p.parse_args(argv)
    experiments = [k for k in ("grid", "ablation", "horizon") if getattr(a, k)]
    if len(experiments) > 1:
        p.error("choose one of --grid, --ablation, --horizon")
    if a.seeds < 1 or a.jobs < 1:
        p.error("--seeds and --jobs must be >= 1")
    if not all(a.sizes.split(",")) or ("ablation" in experiments and len(a.sizes.split(",")) < 2):
        p.error(f"--sizes {a.sizes!r}: give the expert's size, then the student size(s), e.g. medium,small")
    if not all(h.isdigit() and int(h) >= 1 for h in a.horizons.split(",")):
        p.error(f"--horizons {a.horizons!r}: give answer lengths H >= 1, e.g. 1,2,4,8")
    if experiments:
        a.out_dir = a.out_dir or os.path.join("out", experiments[0])
        train_args = ["--task", a.task, *a.train_args.split()] if experiments[0] != "horizon" else a.train_args.split()
        {"grid": grid, "ablation": ablation, "horizon": horizon}[experiments[0]](a, train_args)
    elif a.toy:
        res = toy()
        print("exact H=1 toy: expert = two correct answers at the ends of a 1-D order, student q_s(k) ∝ exp(s e_k)")
        print_table("projection", list(res), ["s", "reward", "fwd_kl", "rev_kl"], lambda r, c: f"{res[r][c]:.3f}")
    elif a.checkpoint:
        from data import Tokenizer, eval_prompts, make_task
        from model import fingerprint, load_checkpoint
        model, ck = load_checkpoint(a.checkpoint)
        if not {"task", "tokenizer", "config", "seed", "name"} <= set(ck):
            raise UsageError(f"{a.checkpoint}: not a checkpoint written by train.py")
        expert_path = a.expert or os.path.join(os.path.dirname(a.checkpoint), "expert.pt")
        expert, _ = load_checkpoint(expert_path, expect=dict(task=ck["task"], tokenizer=ck["tokenizer"]))
        if ck["name"] != "expert" and ck.get("expert") != fingerprint(expert):  # a retrained or another expert
            raise UsageError(f"{expert_path} (fingerprint {fingerprint(expert)}) is not the expert {a.checkpoint} "
                             f"was trained against ({ck.get('expert') or 'none recorded'}); name that one with --expert")
        tok = Tokenizer()
        task = make_task(ck["task"]["name"], **{k: v for k, v in ck["task"].items() if k != "name"})
        from runtime import seed_for
        prompts = eval_prompts(task, ck["config"]["eval_prompts"], seed=seed_for(ck["seed"], "held-out"))
        print(describe(a.checkpoint, evaluate(model, expert, tok, task, prompts, seed=ck["seed"]), len(prompts)))
    else:
        p.error("give a checkpoint, or one of --grid, --ablation, --horizon, --toy")


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:  # bad input: one line; anything else is a bug and keeps its traceback
        sys.exit(f"error: {e}")
