"""Evaluate checkpoints, and run the realizability experiment end to end.

    python eval.py out/mirror/onpolicy-small-g1.pt    # one checkpoint: metrics + samples
    python eval.py --grid --seeds 3                  # the paper's table, from scratch

Metrics (held-out prompts, disjoint from training prompts):
  reward         mean verifier reward of responses sampled at temperature 1
  reward_greedy  the same for greedy decoding
  fwd_kl         sequence-level KL(expert || student), on expert samples   (what SFT minimises)
  rev_kl         sequence-level KL(student || expert), on student samples  (what online IL minimises)
  coverage       distinct valid answers per prompt among k samples (the expert covers every mode)
"""
import argparse
import json
import os
import sys

import torch

from data import decode_responses, encode_prompts


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
                fwd_kl=fwd_kl, rev_kl=rev_kl, coverage=coverage, samples=samples)


def describe(name, result, n_prompts):
    """The result as a person reads it: one line of metrics and a few marked samples."""
    lines = [f"result: {name}: reward {result['reward']:.3f} (temperature 1), {result['reward_greedy']:.3f} (greedy) "
             f"on {n_prompts} held-out prompts | fwd_kl {result['fwd_kl']:.3f} | rev_kl {result['rev_kl']:.3f} | "
             f"coverage {result['coverage']:.2f} valid answers/prompt"]
    lines += [f"  {'right' if ok else 'wrong'}  {p}{r}" for p, r, ok in result["samples"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the experiment
METHODS = [  # column label, train.py flags, the run name train.py gives it
    ("expert", ["--mode", "expert"], lambda s: "expert"),
    ("base", ["--mode", "base"], lambda s: f"base-{s}"),
    ("offline SFT", ["--mode", "sft"], lambda s: f"sft-{s}"),
    ("online (γ=1)", ["--mode", "onpolicy", "--gamma", "1"], lambda s: f"onpolicy-{s}-g1"),
    ("online (γ=0)", ["--mode", "onpolicy", "--gamma", "0"], lambda s: f"onpolicy-{s}-g0"),
]


def run_jobs(jobs, parallel):
    """Run train.py jobs, `parallel` at a time, one torch thread each (fastest at these
    sizes). jobs: (key, argv, log_path, keys it waits for), listed dependencies first, so a
    worker only ever waits on a job that is already running."""
    import subprocess
    import time
    from concurrent.futures import ThreadPoolExecutor
    futures, t0 = {}, time.time()

    def one(key, argv, log, deps):
        for d in deps:
            futures[d].result()
        os.makedirs(os.path.dirname(log), exist_ok=True)
        with open(log, "w") as f:
            rc = subprocess.call([sys.executable, "train.py", "--threads", "1", *argv], stdout=f, stderr=subprocess.STDOUT)
        if rc != 0:
            raise RuntimeError(f"{key} failed (exit {rc}); see {log}")
        print(f"[{time.time() - t0:5.0f}s] done: {key}", flush=True)

    with ThreadPoolExecutor(parallel) as pool:
        for key, argv, log, deps in jobs:
            futures[key] = pool.submit(one, key, argv, log, deps)
        for f in futures.values():
            f.result()
    return time.time() - t0


def grid_jobs(seeds, sizes, out, train_args, methods=METHODS):
    jobs = []
    for seed in seeds:
        d = os.path.join(out, f"seed{seed}")
        common = ["--out-dir", d, "--seed", str(seed), *train_args]
        for label, flags, _ in methods:  # methods are listed in dependency order
            for size in sizes if label != "expert" else sizes[:1]:
                deps = [(seed, "expert", sizes[0])] if label != "expert" else []
                if label not in ("expert", "base"):
                    deps.append((seed, "base", size))
                jobs.append(((seed, label, size), [*flags, *common, "--student-size", size],
                             os.path.join(d, f"{label.split()[0]}-{size}-{flags[-1]}.log"), deps))
    return jobs


def read_results(out, seeds, sizes, task, methods=METHODS):
    """{(label, size): [result per seed]} from the <name>.result.json files train.py writes."""
    res = {}
    for seed in seeds:
        for label, _, name in methods:
            for size in sizes:
                path = os.path.join(out, f"seed{seed}", task, f"{name(size)}.result.json")
                with open(path) as f:
                    res.setdefault((label, size), []).append(json.load(f))
    return res


def mean_std(xs):
    t = torch.tensor(xs, dtype=torch.float64)
    return f"{t.mean():.3f} ± {t.std(unbiased=len(xs) > 1) if len(xs) > 1 else 0:.3f}"


def print_table(res, sizes, row_names, key="reward", methods=METHODS):
    labels = [m[0] for m in methods]
    width = max(len(r) for r in row_names) + 1
    print(f"{'student size':<{width}}| " + " | ".join(f"{l:^15}" for l in labels))
    for size, row in zip(sizes, row_names):
        print(f"{row:<{width}}| " + " | ".join(f"{mean_std([r[key] for r in res[(l, size)]]):^15}" for l in labels))


def plot_curves(out, seeds, sizes, task, path):
    """Held-out reward vs step per method (optional: needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the reward-vs-step plot")
        return
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for label, _, name in METHODS[2:]:
            for i, seed in enumerate(seeds):
                with open(os.path.join(out, f"seed{seed}", task, f"{name(size)}.metrics.jsonl")) as f:
                    pts = [json.loads(l) for l in f if "eval_reward" in l]
                ax.plot([p["step"] for p in pts], [p["eval_reward"] for p in pts], color=f"C{METHODS.index((label, _, name))}",
                        alpha=0.8, label=label if i == 0 else None)
        ax.set(title=f"student: {size}", xlabel="step", ylabel="held-out reward", ylim=(-0.02, 1.02))
        ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a checkpoint, or run the realizability grid.")
    p.add_argument("checkpoint", nargs="?", help="a student checkpoint to evaluate against its expert")
    p.add_argument("--grid", action="store_true", help="train and evaluate expert, SFT and online students")
    p.add_argument("--seeds", type=int, default=3, help="grid: seeds 0..N-1")
    p.add_argument("--jobs", type=int, default=2, help="grid: training runs in parallel")
    p.add_argument("--task", default="mirror", help="grid: task")
    p.add_argument("--sizes", default="medium,small", help="grid: expert size first, then the misspecified size")
    p.add_argument("--out-dir", default="out/grid", help="grid: where runs go")
    p.add_argument("--train-args", default="", help="grid: extra flags for every train.py run, quoted")
    a = p.parse_args(argv)
    if a.grid:
        sizes, seeds = a.sizes.split(","), list(range(a.seeds))
        train_args = ["--task", a.task, "--expert-size", sizes[0], *a.train_args.split()]
        wall = run_jobs(grid_jobs(seeds, sizes, a.out_dir, train_args), a.jobs)
        res = read_results(a.out_dir, seeds, sizes, a.task)
        rows = [f"{sizes[0]}: same as expert (realizable)"] + [f"{s}: smaller (misspecified)" for s in sizes[1:]]
        print(f"\n{a.task}: held-out reward at temperature 1, mean ± std over {len(seeds)} seeds "
              f"({wall / 60:.1f} min wall, {a.jobs} jobs)")
        print_table(res, sizes, rows)
        for key in ("rev_kl", "fwd_kl", "coverage"):
            print(f"\n{key}:")
            print_table(res, sizes, rows, key)
        with open(os.path.join(a.out_dir, "results.json"), "w") as f:
            json.dump({f"{l}|{s}": v for (l, s), v in res.items()}, f)
        plot_curves(a.out_dir, seeds, sizes, a.task, os.path.join(a.out_dir, "reward_vs_step.png"))
    elif a.checkpoint:
        from model import load_checkpoint
        from data import Tokenizer, eval_prompts, make_task
        model, ck = load_checkpoint(a.checkpoint)
        expert, _ = load_checkpoint(os.path.join(os.path.dirname(a.checkpoint), "expert.pt"), expect=dict(task=ck["task"]))
        tok, task = Tokenizer(), make_task(ck["task"]["name"], **{k: v for k, v in ck["task"].items() if k != "name"})
        prompts = eval_prompts(task, ck["config"]["eval_prompts"], seed=10_000 + ck["seed"])
        print(describe(a.checkpoint, evaluate(model, expert, tok, task, prompts, seed=ck["seed"]), len(prompts)))
    else:
        p.error("give a checkpoint, or --grid")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
