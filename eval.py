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
