"""Offline imitation learning (SFT): the student learns from the expert's own states.

The expert is queried only before training: `expert_dataset` samples one response per
prompt (at --temperature, 1 by default) and train.py caches the dataset on disk. Training then minimises
    loss = -sum_t log pi_student(y_t | x, y_<t) / #tokens,      y ~ pi_expert(.|x)
the forward KL KL(expert || student) up to the expert's entropy. Forward KL is mode-covering:
a student that cannot represent every mode of the expert spreads its mass over all of them,
and on a misspecified student that costs reward even at horizon H=1 (the paper's
information-theoretic bottleneck).

Option --sft-loss forward_kl: word-level distillation, the full-vocabulary forward KL to the
expert's next-token distribution at each of the expert's states (scored before training).

Also used to train the expert on ground-truth answers and to warm-start the student base.
Run: python train.py --mode sft   (flags: python train.py --help).
This file is structurally parallel to distill.py: `diff sft.py distill.py` shows where the
states come from (expert_dataset here, rollouts there) and the loss (offline_loss, online_loss).
"""
import time

import torch

from data import collate, encode_prompts, encode_responses
from kernels import IGNORE, token_divergence, token_logprobs
from model import response_hidden, unwrap


@torch.no_grad()
def expert_dataset(expert, tok, task, prompt_texts, cfg, generator, device, score=False):
    """Responses sampled from the expert at cfg.temperature, one per prompt (and, with
    score=True, the expert's logits at each of its states, for word-level distillation)."""
    rows, t0 = [], time.time()
    for i in range(0, len(prompt_texts), 1024):
        prompt, pvalid = encode_prompts(tok, prompt_texts[i:i + 1024], device)
        resp, rmask = expert.generate(prompt, pvalid, task.max_response_len + 1, tok.end, tok.pad,
                                      temperature=cfg.temperature, generator=generator)
        row = dict(prompt=prompt, prompt_valid=pvalid, response=resp, response_mask=rmask)
        if score:
            h = response_hidden(expert, prompt, pvalid, resp, rmask)
            row["expert_logits"] = (h @ expert.unembedding.T).float()
        rows.append(row)
        done = min(i + 1024, len(prompt_texts))
        if done == len(prompt_texts) or (i // 1024) % 20 == 19:
            print(f"sampled {done}/{len(prompt_texts)} expert responses ({time.time() - t0:.0f}s)", flush=True)
    return collate(rows, tok)


def ground_truth_dataset(tok, task, prompt_texts, answers, device):
    """The expert's own training data: one uniformly drawn valid answer per prompt."""
    prompt, pvalid = encode_prompts(tok, prompt_texts, device)
    resp, rmask = encode_responses(tok, answers, device)
    return dict(prompt=prompt, prompt_valid=pvalid, response=resp, response_mask=rmask)


def student_hidden(run, batch):
    """The student's final hidden states at every response position, flattened to [B*R, d]."""
    with run.autocast():
        return response_hidden(run.model, batch["prompt"], batch["prompt_valid"], batch["response"],
                               batch["response_mask"]).flatten(0, 1)


def offline_loss(run, batch, cfg):
    """Offline IL's per-token loss [B, R] at the expert's states (0 on padding): the cross-entropy
    -log pi_s(y_t | x, y_<t) of the expert's tokens y ~ pi_e, the forward KL up to the expert's entropy."""
    mask, h = batch["response_mask"], student_hidden(run, batch)
    targets = torch.where(mask.flatten(), batch["response"].flatten(), IGNORE)
    return -token_logprobs(h, unwrap(run.model).unembedding, targets, fused=cfg.fused).view(mask.shape)


def word_level_loss(run, batch, cfg):
    """--sft-loss forward_kl, word-level distillation: at each of the expert's states, the
    full-vocabulary KL(pi_e^T || pi_s^T) to the expert's logits, scored before training (train.py
    samples them with score=True), at the temperature the expert sampled at."""
    mask, h = batch["response_mask"], student_hidden(run, batch)
    valid = mask.flatten()
    per_token = torch.zeros(mask.shape, device=mask.device)
    per_token[mask] = token_divergence(h[valid], unwrap(run.model).unembedding, batch["expert_logits"].flatten(0, 1)[valid],
                                       "forward", temperature=cfg.temperature, fused=cfg.fused)
    return per_token


LOSSES = dict(ce=offline_loss, forward_kl=word_level_loss)  # --sft-loss


def train(run, dataset, cfg, loss_kind="ce"):
    """Offline IL on a fixed dataset: the whole loop. `run` (runtime.py) does the mechanics each
    line names: the schedule, backward/clip/step, logs, the held-out check, checkpoints, Ctrl-C."""
    B = cfg.batch_size // run.world
    loss_fn = LOSSES[loss_kind]
    with run:  # Ctrl-C from here on: finish the step, save, exit 130
        for step in range(run.start, run.total):
            lr = run.set_lr(step)  # --warmup, then --lr-schedule
            # ---- states: rows of the dataset the expert sampled before training (offline)
            t0, n = time.time(), dataset["prompt"].shape[0]
            start = (step * cfg.batch_size + run.rank * B) % n
            batch = {k: v[torch.arange(start, start + B) % n] for k, v in dataset.items()}
            # ---- loss: cross-entropy on the expert's tokens (forward KL: mode-covering)
            per_token = loss_fn(run, batch, cfg)
            rmask = batch["response_mask"]
            n_tokens = run.global_sum(rmask.sum())
            objective = per_token.sum() / n_tokens * run.world  # DDP averages over ranks
            grad_norm = run.optimize(objective)  # backward, clip, step; stops on a non-finite loss
            # ---- log, held-out check, checkpoint
            run.log(step, lr=lr, loss=objective.item(), grad_norm=grad_norm, expert_tokens=int(n_tokens),
                    tok_per_s=int(rmask.sum()) / (time.time() - t0 + 1e-9))
            converged = run.held_out_check(step)  # every --eval-every steps: reached --stop-at?
            if run.checkpoint(step, converged):  # at the end, on convergence and Ctrl-C; every --save-every
                break
