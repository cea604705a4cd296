"""Today's on-policy distillation (OPD) recipes, measured against the paper's claim: does the
recipe I run get the benefit online IL has on a misspecified student?

Each recipe is one entry of RECIPES: its train.py flags and the source it was read from. A
recipe that is a setting of an existing flag is that setting; recipes that come to the same
flags share one run. Each SETTING trains its expert and student bases once per seed, then
offline SFT and every recipe from the same base.

    python -m research.recipes --seeds 3           # out/recipes/report.md and data.json
    python -m research.recipes --print-commands    # the train.py commands, dependencies first

What it simplifies against the sources (RESULTS.md, "Today's OPD recipes", has the mapping and
the full list): one optimizer step per batch, so a PPO ratio is 1 and its clip never acts;
every loss is a mean over tokens; sampling and scoring at temperature 1; MiniLLM's future
costs are online_loss's D_t, with no teacher-mixed sampling; the top-k recipes take k = TOP_K
of a vocabulary of 22 tokens (k/V = 0.18), against k = 32 to 64 of ~150,000 in the sources.
"""
import os
import sys
from collections import namedtuple

if __package__ in (None, ""):  # run as python research/recipes.py: the imports live in the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from errors import OneLineParser, UsageError
from eval import checkpoint_task, held_out_prompts, sample_texts
from model import load_checkpoint, response_hidden
from research.experiments import horizon_recipe
from research.jobs import BASE, EXPERT, add_job_flags, glue_train_args, grid_jobs, read_results, run_jobs
from research.modes import first_token_plus
from research.report import Report, mean_std, table

TOP_K = 4
ONLINE = ["--mode", "onpolicy"]
K1 = [*ONLINE, "--estimator", "sampled", "--gamma", "0", "--no-baseline", "--no-normalize-adv"]  # advantage = -k1
Recipe = namedtuple("Recipe", "name flags source")
RECIPES = [
    Recipe("offline SFT", ["--mode", "sft"], "sft.py: SFT on one expert sample per prompt"),
    Recipe("sequence-level reverse KL, γ=1", ONLINE, "distill.online_loss: the objective the paper analyses"),
    Recipe("per-token reverse KL, γ=0", [*ONLINE, "--gamma", "0"],
           "huggingface/trl trl/experimental/distillation/distillation_trainer.py (beta=1.0: reverse KL, on-policy); "
           "its MiniLLMTrainer at its default gamma=0 (the same per-token gradient, twice)"),
    Recipe("TRL GKD: JSD(0.5), λ=0.5", [*ONLINE, "--gamma", "0", "--divergence", "jsd", "--mix", "0.5"],
           "huggingface/trl trl/experimental/gkd/gkd_trainer.py generalized_jsd_loss (defaults beta=0.5, lmbda=0.5); "
           "ms-swift swift/rlhf_trainers/gkd_loss.py (the same JSD)"),
    Recipe("advantage -k1 per token", K1,
           "thinking-machines-lab/tinker-cookbook tinker_cookbook/distillation/train_on_policy.py (kl_discount_factor=0); "
           "THUDM/slime --use-opd (loss.py apply_opd_kl_to_advantages); ms-swift swift/rl_core/advantage.py "
           "(teacher log-ratio); verl-project/verl policy-gradient OPD with k1 (trainer/distillation/losses.py)"),
    Recipe("verl PG OPD, k3", [*K1, "--cost", "k3"],
           "verl-project/verl trainer/distillation/losses.py, use_policy_gradient with loss_mode k3 = low_var_kl "
           "(trainer/ppo/core_algos.py kl_penalty)"),
    Recipe("verl supervised OPD, k3", [*ONLINE, "--estimator", "direct", "--cost", "k3", "--gamma", "0"],
           "verl-project/verl trainer/distillation/losses.py, its default: loss_mode k3 backpropagated"),
    Recipe(f"verl GKD OPD: top-{TOP_K} forward KL", [*ONLINE, "--gamma", "0", "--divergence", "forward",
                                                    "--top-k", str(TOP_K)],
           "verl-project/verl trainer/distillation/losses.py compute_forward_kl_topk (unnormalised, clamped at 0)"),
    Recipe(f"top-{TOP_K} forward KL + tail bucket", [*ONLINE, "--gamma", "0", "--divergence", "forward",
                                                    "--top-k", str(TOP_K), "--top-k-rest", "bucket"],
           "verl-project/verl PR #7855 (open) forward_kl_topk_tail; huggingface/trl "
           "trl/experimental/server_distillation/server_distillation_trainer.py _add_tail_bucket"),
    Recipe(f"NeMo-RL: top-{TOP_K} mixed KL, renormalised", [*ONLINE, "--gamma", "0", "--divergence", "mixed",
                                                           "--top-k", str(TOP_K), "--top-k-rest", "renormalize"],
           "NVIDIA-NeMo/RL nemo_rl/algorithms/loss/loss_functions.py DistillationLossFn (kl_type mixed, weight 0.5; "
           "examples/configs/distillation_math.yaml)"),
    Recipe("MiniLLM: γ=0.95, return / tokens left", [*ONLINE, "--gamma", "0.95", "--return-norm", "count",
                                                    "--adv-std-floor", "0"],
           "microsoft/LMOps minillm/minillm/losses.py (_get_advantages_and_returns: return / tokens left, whitened; "
           "_reg_loss, the single-step term: D_t here)"),
    Recipe(f"top-{TOP_K} reverse KL, γ=1", [*ONLINE, "--top-k", str(TOP_K)],
           "this project's γ=1 loss with a vLLM-served teacher's top-k log-probs, the rest ignored (verl PR #5041 "
           "dropped a top-k reverse KL as unstable)"),
    Recipe(f"top-{TOP_K} reverse KL + tail bucket, γ=1", [*ONLINE, "--top-k", str(TOP_K), "--top-k-rest", "bucket"],
           "the same with the tail bucket of verl PR #7855 (open)"),
    Recipe(f"top-{TOP_K} reverse KL renormalised, γ=1", [*ONLINE, "--top-k", str(TOP_K), "--top-k-rest", "renormalize"],
           "the same renormalised over the k ids, as NeMo-RL does"),
]

# the recipes whose students' mass on the expert's top k is measured (where_the_mass_goes)
MASS = [r.name for r in RECIPES if "--top-k" in r.flags or r.flags == ONLINE]

# (label, run folder, task flags, student size, the claim, its check on one seed: reward, SFT's, expert's)
REALIZABLE = ("within 0.05 of the expert", lambda r, sft, e: r >= e - 0.05)
WINS = ("online >= SFT + 0.3", lambda r, sft, e: r >= sft + 0.3)
NOBODY = ("< 0.5: no method reaches high reward", lambda r, sft, e: r < 0.5)
Setting = namedtuple("Setting", "label folder flags size claim")
SETTINGS = [
    Setting("mirror, realizable (medium)", "mirror", ["--task", "mirror"], "medium", REALIZABLE),
    Setting("mirror, misspecified (small)", "mirror", ["--task", "mirror"], "small", WINS),
    Setting("pointer H=4, misspecified", "pointer-H4", ["--task", "pointer", "--digits", "10", "--answer-len", "4",
                                                         *horizon_recipe(4)], "small", WINS),
    Setting("mode weight p=0.2, H=1", "p0.2-H1", ["--task", "pointer", "--answer-len", "1", "--mode-weight", "0.2"],
            "small", WINS),
    Setting("pointer --no-copy (not reward-relative)", "nocopy", ["--task", "pointer", "--no-copy"], "small", NOBODY),
]


def methods():
    """(label, flags) per distinct run, in RECIPES' order; {recipe name: the label of its run}."""
    runs, label_of = {}, {}
    for r in RECIPES:
        label_of[r.name] = runs.setdefault(tuple(r.flags), r.name)
    return [(label, list(flags)) for flags, label in runs.items()], label_of


def main(argv=None):
    p = OneLineParser(description="Today's on-policy distillation recipes on the paper's settings: reward, greedy, "
                                  "P(representable mode) and the claim, each a count over seeds.")
    add_job_flags(p, "out/recipes")
    a = p.parse_args(glue_train_args(argv))
    if a.seeds < 1 or a.jobs < 1:
        p.error("--seeds and --jobs must be >= 1")
    a.out_dir = a.out_dir or os.path.join("out", "recipes")
    runs = {(f, s): (os.path.join(a.out_dir, f, f"seed{s}"), ["--seed", str(s), *flags, *a.train_args.split()])
            for f, flags in {st.folder: st.flags for st in SETTINGS}.items() for s in range(a.seeds)}
    sizes = {f: [st.size for st in SETTINGS if st.folder == f] for f, _ in runs}
    unique, label_of = methods()
    report = Report(f"today's OPD recipes on the paper's settings, {a.seeds} seed(s)")
    jobs = [j for f in sizes for j in grid_jobs([runs[(f, s)] for s in range(a.seeds)], "medium", sizes[f],
                                                 [EXPERT, BASE, *unique])]
    wall = run_jobs(jobs, a.jobs, a.print_commands)
    if wall is None:
        return
    cells = {}  # (recipe, setting label) -> per seed: reward, greedy, P(+) (pointer) and the claim's check
    for st in SETTINGS:
        res = read_results(jobs, [runs[(st.folder, s)][0] for s in range(a.seeds)])
        for r in RECIPES:
            rows = res[(label_of[r.name], st.size)]
            sft, expert = res[("offline SFT", st.size)], res[("expert", st.size)]
            cells[(r.name, st.label)] = [dict(
                reward=x["reward"], greedy=x["reward_greedy"], expert=e["reward"], coverage=x["coverage"],
                holds=bool(st.claim[1](x["reward"], f["reward"], e["reward"])),
                plus=plus_weight(runs[(st.folder, s)][0], x["name"]) if "pointer" in st.flags else None,
                **(where_the_mass_goes(runs[(st.folder, s)][0], st.flags[1], x["name"]) if r.name in MASS else {}))
                for s, (x, f, e) in enumerate(zip(rows, sft, expert))]
    names = [r.name for r in RECIPES]
    labels = [st.label for st in SETTINGS]
    claim = {st.label: st.claim[0] for st in SETTINGS}

    def cell(key, count=False):
        def f(row, col):
            xs = cells[(row, col)]
            text = mean_std([x[key] for x in xs])
            return text + (f" {sum(x['holds'] for x in xs)}/{len(xs)}" if count and row != "offline SFT" else "")
        return f

    report.add(f"held-out reward at temperature 1, mean ± std over {a.seeds} seed(s), and on how many seeds the "
               f"setting's claim holds ({wall / 60:.1f} min wall, {a.jobs} jobs)",
               table("recipe", names, labels, cell("reward", count=True)))
    report.add("the claim of each setting, per seed", [f"{k}: {v}" for k, v in claim.items()])
    report.add("held-out reward, greedy decoding, mean ± std", table("recipe", names, labels, cell("greedy")))
    pointer = [st.label for st in SETTINGS if "pointer" in st.flags]
    report.add("P(+): the first token's weight on the representable mode (pointer settings), exact, mean ± std",
               table("recipe", names, pointer, cell("plus")))
    report.add("coverage: distinct valid answers per prompt in 8 samples (1: one mode; the expert's: 2), mean ± std",
               table("recipe", names, labels, cell("coverage")))
    report.add(f"where the mass goes: at the student's own states (its samples on the held-out prompts), its mass on "
               f"the expert's top {TOP_K} tokens there, mean ± std", table("recipe", MASS, labels, cell("q_topk")))
    report.add("and the length of its responses in tokens (end token included; the expert's: "
               + ", ".join(f"{mean_std([x['expert_length'] for x in cells[(MASS[0], c)]])} on {c}" for c in labels) + ")",
               table("recipe", MASS, labels, cell("length")))
    report.add("experts (held-out reward)", [f"{st.label}: {mean_std([x['expert'] for x in cells[(names[0], st.label)]])}"
                                             for st in SETTINGS])
    report.add("recipes: flags and sources", [f"{r.name}: {' '.join(r.flags)} | {r.source}" for r in RECIPES])
    report.data({"recipes": {r.name: dict(flags=r.flags, source=r.source) for r in RECIPES},
                 "settings": {st.label: dict(flags=st.flags, size=st.size, claim=st.claim[0]) for st in SETTINGS},
                 "cells": [dict(recipe=r, setting=s, seeds=v) for (r, s), v in cells.items()]})
    report.write(a.out_dir)


def held_out_student(run_dir, task_name, name):
    """A student of the run in run_dir, its task and tokenizer, and its seed's held-out prompts."""
    model, ck = load_checkpoint(os.path.join(run_dir, task_name, f"{name}.pt"))
    task, tok = checkpoint_task(run_dir, ck)
    return model, task, tok, held_out_prompts(task, ck)


@torch.no_grad()
def where_the_mass_goes(run_dir, task_name, name, k=TOP_K):
    """At the student's own states (its samples on its seed's held-out prompts, temperature 1):
    its mass on the expert's k most likely tokens there, and the mean response length in tokens
    (end token included), the student's and the expert's own."""
    student, task, tok, prompts = held_out_student(run_dir, task_name, name)
    expert, _ = load_checkpoint(os.path.join(run_dir, task_name, "expert.pt"))
    (prompt, pvalid, resp, rmask), _ = sample_texts(student, tok, task, prompts, 1.0, seed=0)
    q, p = (torch.softmax(response_hidden(m, prompt, pvalid, resp, rmask) @ m.unembedding.T, -1) for m in (student, expert))
    mass = q.gather(-1, p.topk(k, -1).indices).sum(-1)[rmask].mean().item()
    expert_len = sample_texts(expert, tok, task, prompts, 1.0, seed=0)[0][3].sum(1).float().mean().item()
    return dict(q_topk=mass, length=rmask.sum(1).float().mean().item(), expert_length=expert_len)


@torch.no_grad()
def plus_weight(run_dir, name):
    """P("+") of a student's first token on its seed's held-out prompts (research.modes)."""
    model, _, tok, prompts = held_out_student(run_dir, "pointer", name)
    return first_token_plus(model, tok, prompts)


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        sys.exit(f"error: {e}")
