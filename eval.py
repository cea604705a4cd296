"""The metrics, the result as a person reads it, and one checkpoint's evaluation.

    python eval.py out/mirror/onpolicy-small-g1.pt    # one checkpoint: metrics + samples, against the
                                                     # expert.pt beside it (its fingerprint must match)
    python eval.py out/mirror/expert.pt --draws 8    # + the reward over 8 samplings, held-out and
                                                     # on the prompts it trained on

Metrics (held-out prompts, disjoint from training prompts):
  reward         mean verifier reward of responses sampled at temperature 1
  reward_greedy  the same for greedy decoding
  fwd_kl         sequence-level KL(expert || student), on expert samples   (what SFT minimises)
  rev_kl         sequence-level KL(student || expert), on student samples  (what online IL minimises)
  coverage       distinct valid answers per prompt among k samples (the expert covers every mode)
  first_error    per answer position t: how many of the sampled responses go wrong first at t
                 (their longest common prefix with any valid answer has length t)
  follow         per answer position: the probability of the right next token after a correct
                 prefix, averaged over every valid answer (teacher forcing). Where a student
                 cannot tell the modes apart it is about 1/2 there, whatever it was trained by.
"""
import json
import os
import sys
from dataclasses import asdict

import torch

from countdown import countdown_mistakes
from data import (PROMPT_STREAMS, PromptStream, decode_responses, encode_prompts, encode_responses, eval_prompts,
                  make_task, seed_for, task_tokenizer)
from errors import OneLineParser, UsageError
from model import fingerprint, load_checkpoint, response_logprobs


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


def reward_draws(model, tok, task, prompts, seeds):
    """Reward at temperature 1 in independent samplings of the prompts, one per seed: how much
    of a one-sampling reward is noise (on 256 prompts, a few hundredths)."""
    model.eval()
    dev = next(model.parameters()).device
    return [mean_reward(task, prompts, sample_texts(model, tok, task, prompts, 1.0, s, dev)[1]) for s in seeds]


def training_prompts(task, held_out, name, seed, n):
    """The first n prompts the run that wrote checkpoint `name` trained on, drawn again from
    its own stream (a warm-started student saw its base's prompts too; these are its own)."""
    return PromptStream(task, held_out, seed=seed_for(seed, PROMPT_STREAMS[name.split("-")[0]])).batch(n)


def sequence_logprob(model, batch):
    """log pi(y|x) of whole responses [B]."""
    return response_logprobs(model, *batch).sum(1)


def first_errors(task, prompts, texts):
    """Counts per position t (0..max_response_len, the end token last) of wrong responses whose
    longest common prefix with any valid answer has length t: where the errors start."""
    counts = [0] * (task.max_response_len + 1)
    for p, r in zip(prompts, texts):
        if not task.reward(p, r):
            lcp = max(next((i for i, (x, y) in enumerate(zip(r, a)) if x != y), min(len(r), len(a)))
                      for a in task.answers(p))
            counts[min(lcp, task.max_response_len)] += 1
    return counts


@torch.no_grad()
def follow_rates(model, tok, task, prompts, max_answers=8):
    """Per answer position (the end token last), the mean probability of each valid answer's
    next token given its own correct prefix: how well the model can keep to any one answer."""
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
    out = dict(reward=mean_reward(task, prompts, texts_s), reward_greedy=mean_reward(task, prompts, texts_g),
               n_prompts=len(prompts),
               fwd_kl=fwd_kl, rev_kl=rev_kl, coverage=coverage, follow=follow_rates(model, tok, task, cov_prompts),
               first_error=first_errors(task, prompts, texts_s), samples=samples)
    if task.name == "countdown" and task.format == "steps":  # where its answers go wrong
        out["mistakes"] = countdown_mistakes(task, prompts, texts_s)
    return out


def describe(name, result, n_prompts):
    """The result as a person reads it: one line of metrics and a few marked samples."""
    lines = [f"result: {name}: reward {result['reward']:.3f} (temperature 1), {result['reward_greedy']:.3f} (greedy) "
             f"on {n_prompts} held-out prompts | fwd_kl {result['fwd_kl']:.3f} | rev_kl {result['rev_kl']:.3f} | "
             f"coverage {result['coverage']:.2f} valid answers/prompt",
             "  follow (per answer position, end token last): " + " ".join(f"{x:.2f}" for x in result["follow"])]
    lines += [f"  {'right' if ok else 'wrong'}  {p}{r}" for p, r, ok in result["samples"]]
    if "mistakes" in result:
        lines.append(f"  mistakes (temperature 1, {n_prompts} prompts): " +
                     " | ".join(f"{k} {v:.3f}" for k, v in result["mistakes"].items()))
    return "\n".join(lines)


def sparkline(values, lo=0.0, hi=1.0):
    """Values as one line of block characters, e.g. [0, 0.5, 1] -> " ▄█" (clipped to [lo, hi])."""
    bars = " ▁▂▃▄▅▆▇█"
    return "".join(bars[max(0, min(8, round((v - lo) / (hi - lo) * 8)))] for v in values)


def reward_curve(metrics_paths, width=24):
    """The held-out reward vs step of runs (their metrics.jsonl; the mean over them) as a text
    plot of at most `width` evenly spaced points, the first and the last included, e.g.
    "[ ▁▇██] 0.00 -> 1.00 by step 600"; "" when a file or its rewards are missing."""
    series = []
    for path in metrics_paths:
        if not os.path.exists(path):
            return ""
        with open(path) as f:
            rows = [json.loads(l) for l in f if "eval_reward" in l]
        series.append(rows)
    if not series or not all(series):
        return ""
    n = min(len(s) for s in series)
    mean = [sum(s[i]["eval_reward"] for s in series) / len(series) for i in range(n)]
    picks = [mean[round(i * (n - 1) / max(1, min(width, n) - 1))] for i in range(min(width, n))]
    return f"[{sparkline(picks)}] {mean[0]:.2f} -> {mean[-1]:.2f} by step {series[0][n - 1]['step']}"


def checkpoint_task(path, ck):
    """The task and tokenizer a checkpoint was made for; one made by an older version of a task or
    tokenizer (other fields) is one line."""
    fields = {k: v for k, v in ck["task"].items() if k != "name"}
    try:
        task = make_task(ck["task"]["name"], **fields)
    except TypeError:  # a field the task no longer has
        task = None
    tok = task and task_tokenizer(task)
    if task is None or tok.identity != ck["tokenizer"] or asdict(task) != ck["task"]:
        raise UsageError(f"{path}: made by an older version of the task or tokenizer ({ck['task']}); train it again")
    return task, tok


def held_out_prompts(task, ck):
    """The held-out prompts of the run that wrote checkpoint `ck`: its seed's, never trained on."""
    return eval_prompts(task, ck["config"]["eval_prompts"], seed=seed_for(ck["seed"], "held-out"))


def main(argv=None):
    p = OneLineParser(description="Evaluate a checkpoint against its expert: every metric, and a few marked samples.")
    p.add_argument("checkpoint", help="a checkpoint written by train.py")
    p.add_argument("--expert", default="", help="the checkpoint's expert (default: expert.pt beside it)")
    p.add_argument("--draws", type=int, default=0, help="also the reward over this many samplings, on the held-out "
                   "prompts and on as many of the prompts it trained on (how much it generalizes)")
    a = p.parse_args(argv)
    if a.draws < 0:
        p.error("--draws must be >= 0")
    model, ck = load_checkpoint(a.checkpoint)
    if not {"task", "tokenizer", "config", "seed", "name"} <= set(ck):
        raise UsageError(f"{a.checkpoint}: not a checkpoint written by train.py")
    expert_path = a.expert or os.path.join(os.path.dirname(a.checkpoint), "expert.pt")
    expert, _ = load_checkpoint(expert_path, expect=dict(task=ck["task"], tokenizer=ck["tokenizer"]))
    if ck["name"] != "expert" and ck.get("expert") != fingerprint(expert):  # a retrained or another expert
        raise UsageError(f"{expert_path} (fingerprint {fingerprint(expert)}) is not the expert {a.checkpoint} "
                         f"was trained against ({ck.get('expert') or 'none recorded'}); name that one with --expert")
    task, tok = checkpoint_task(a.checkpoint, ck)
    prompts = held_out_prompts(task, ck)
    print(describe(a.checkpoint, evaluate(model, expert, tok, task, prompts, seed=ck["seed"]), len(prompts)))
    if a.draws:
        own = training_prompts(task, prompts, ck["name"], ck["seed"], len(prompts))
        for name, ps in (("held-out", prompts), ("training", own)):
            r = reward_draws(model, tok, task, ps, [seed_for(ck["seed"], f"draws/{name}/{i}") for i in range(a.draws)])
            print(f"  {name} prompts ({len(ps)}), reward over {a.draws} sampling(s): {sum(r) / len(r):.3f} "
                  f"(one sampling: {min(r):.3f} to {max(r):.3f})")


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:  # bad input: one line; anything else is a bug and keeps its traceback
        sys.exit(f"error: {e}")
