"""Online imitation learning (on-policy distillation): the student learns at its own states.

Each step the student samples responses to a batch of prompts (KV cache, no grad), the
expert scores every token of them (no grad), and the student minimises the sequence-level
reverse KL, the objective the paper analyses (the whole response is one action, so H=1 is a
single prompt-response):
    J = KL(pi_s(y|x) || pi_e(y|x)) = E_{y~pi_s} sum_t D_t,
    D_t = KL(pi_s(.|x,y_<t) || pi_e(.|x,y_<t))      (full-vocabulary, per student prefix)
Its exact gradient has two parts:
    grad J = E[ sum_t grad D_t (prefix held fixed) ]
           + E[ sum_s grad log pi_s(y_s|x,y_<s) * sum_{t>s} gamma^(t-s) D_t ]
The second (score-function, REINFORCE) term is the one that matters under misspecification:
it tells the first token which *mode* to commit to by what that choice costs later.
gamma=1 (default) is the exact sequence-level gradient. gamma=0 drops it and leaves the
per-token objective of GKD/TRL and of Thinking Machines' recipe: at a prefix the student
cannot tell apart (it cannot see which mode it started), per-token KL is minimised by one
distribution for both modes (the normalised geometric mean of the expert's conditionals; about
50/50 on mirror by symmetry, like SFT's), so gamma=0 gains little over SFT there.

--temperature T samples the rollouts from softmax(z / T), and every score (D, log pi_s,
log pi_e) is taken at T too: the objective is KL(pi_s^T || pi_e^T), and its REINFORCE term
stays on-policy.

Simplifications: the baseline is the leave-one-out batch mean of the return at each position;
advantages are divided by their std (--normalize-adv) floored at 1 nat, which rescales the
REINFORCE term relative to the first (down, never up); the gradient norm is clipped.
Options: --estimator sampled uses the sampled-token cost c_t = log pi_s(y_t) - log pi_e(y_t)
in place of D (Thinking Machines style at gamma=0: no full-vocabulary term, return
sum_{t>=s} gamma^(t-s) c_t; a reverse-KL estimator on the student's own rows, so it takes no
--divergence or --mix); --divergence forward|jsd uses that divergence at the student's states;
--mix lambda draws that fraction of each batch from the expert (GKD), with no score-function
term on those rows.

Run: python train.py --mode onpolicy   (flags: python train.py --help).
This file is structurally parallel to sft.py: `diff sft.py distill.py` shows where the states
come from (rollouts() here, expert_dataset() there) and the loss (loss() in each).
"""
import time

import torch

from data import collate, decode_responses, encode_prompts
from kernels import IGNORE, token_divergence, token_logprobs
from model import response_hidden, unwrap


@torch.no_grad()
def rollouts(student, expert, prompt_texts, tok, task, cfg, generator, device):
    """The states online IL learns at: the student's own responses to fresh prompts, sampled at
    cfg.temperature (KV cache, no grad). Under --mix (GKD) the first round(mix * B) rows are the
    expert's instead; "on_policy" marks the student's rows and "texts" holds the prompts."""
    prompt, pvalid = encode_prompts(tok, prompt_texts, device)
    n, L = round(cfg.mix * len(prompt_texts)), task.max_response_len + 1  # room for the end token
    resp, rmask = student.generate(prompt[n:], pvalid[n:], L, tok.end, tok.pad, temperature=cfg.temperature,
                                   generator=generator)
    rows = [dict(prompt=prompt[n:], prompt_valid=pvalid[n:], response=resp, response_mask=rmask)]
    if n:  # GKD mixing: some rows come from the expert instead, as long as the expert's own answers
        resp, rmask = expert.generate(prompt[:n], pvalid[:n], L, tok.end, tok.pad, temperature=cfg.temperature,
                                      generator=generator)
        rows.insert(0, dict(prompt=prompt[:n], prompt_valid=pvalid[:n], response=resp, response_mask=rmask))
    batch = collate(rows, tok)  # responses padded to the wider of the two
    return dict(**batch, on_policy=torch.arange(len(prompt_texts), device=device) >= n, texts=prompt_texts)


def returns_to_go(cost, mask, gamma, include_current):
    """sum_{t>s} gamma^(t-s) cost_t per row [B, R] (include_current: t >= s).
    gamma=0 leaves only the current cost, or nothing: the per-token objective."""
    cost = cost * mask
    out = torch.zeros_like(cost)
    ahead = torch.zeros_like(cost[:, 0])  # sum_{t>s} gamma^(t-s) cost_t
    for s in reversed(range(cost.shape[1])):
        out[:, s] = cost[:, s] + ahead if include_current else ahead
        ahead = gamma * (cost[:, s] + ahead)
    return out * mask


def advantages(returns, mask, baseline=True, normalize=True, std_floor=1.0):
    """Returns minus a leave-one-out baseline: at each position, the mean return of the *other*
    rows there (it does not depend on the row's own tokens, so the gradient stays unbiased; a
    row alone at its position gets no baseline). normalize: divide by the std over all tokens,
    but never by less than std_floor (nats), so normalising can shrink the score-function term
    and never blows noise up to unit scale once the returns are nearly constant."""
    adv = returns * mask
    if baseline:
        n, total = mask.sum(0), (returns * mask).sum(0)
        others = torch.where(n > 1, (total - returns) / (n - 1).clamp(min=1), 0.0)
        adv = (returns - others) * mask
    if normalize and mask.sum() > 1:
        adv = adv / adv[mask].std().clamp(min=std_floor)
    return adv


def sequence_kl_surrogate(D, logq, mask, gamma, on_policy=None, baseline=True, normalize=True):
    """Per-token surrogate whose gradient is the two-part gradient of the sequence-level
    divergence: D_t (prefix held fixed) + stop_grad(advantage_t) * log pi_s(y_t).
    With baseline=normalize=False its expectation's gradient is exact (tests/test_distill.py)."""
    on_policy = mask if on_policy is None else mask & on_policy
    returns = returns_to_go(D.detach(), mask, gamma, include_current=False)
    return D * mask + advantages(returns, on_policy, baseline, normalize) * logq * on_policy


def loss(run, expert, batch, cfg):
    """Per-token surrogate [B, R] at the batch's states (0 on padding), whose gradient is the
    two-part gradient above, and the per-token divergence D [B, R] (logged as kl)."""
    prompt, pvalid, resp, rmask = batch["prompt"], batch["prompt_valid"], batch["response"], batch["response_mask"]
    on_policy = batch["on_policy"][:, None] & rmask  # no score-function term on the expert's rows
    with run.autocast():
        with torch.no_grad():
            h_e = response_hidden(expert, prompt, pvalid, resp, rmask).flatten(0, 1)
        h = response_hidden(run.model, prompt, pvalid, resp, rmask).flatten(0, 1)
    W, valid = unwrap(run.model).unembedding, rmask.flatten()
    targets = torch.where(valid, resp.flatten(), IGNORE)
    # every score at the sampling temperature T: the rollouts come from softmax(z / T), so that is
    # the policy whose divergence this is and whose score function is on-policy
    T, D = cfg.temperature, torch.zeros(rmask.shape, device=rmask.device)
    with torch.set_grad_enabled(cfg.estimator == "full"):  # "sampled" only logs it
        D[rmask] = token_divergence(h[valid], W, (h_e[valid], expert.unembedding), cfg.divergence,
                                    beta=cfg.beta, temperature=T, fused=cfg.fused)
    logq = token_logprobs(h, W, targets, temperature=T, fused=cfg.fused).view(rmask.shape)
    if cfg.estimator == "full":
        return sequence_kl_surrogate(D, logq, rmask, cfg.gamma, on_policy, cfg.baseline, cfg.normalize_adv), D
    with torch.no_grad():  # sampled-token cost: the one-sample estimate of D_t, no full-vocabulary term
        logp = token_logprobs(h_e, expert.unembedding, targets, temperature=T).view(rmask.shape)
    cost = (logq.detach() - logp) * rmask
    returns = returns_to_go(cost, rmask, cfg.gamma, include_current=True)
    return advantages(returns, on_policy, cfg.baseline, cfg.normalize_adv) * logq, D


def train(run, expert, prompts, tok, task, cfg):
    """Online IL. `run` (runtime.py) owns the model, optimizer, logging, checkpoints and ranks;
    this loop holds the algorithm."""
    B = cfg.batch_size // run.world
    for step in run.steps():
        # ---- states: the student's own rollouts (online); the expert scores every token
        t0 = time.time()
        with run.autocast():
            batch = rollouts(unwrap(run.model), expert, prompts.batch(B), tok, task, cfg, run.sample_gen, run.device)
        # ---- loss: sequence-level reverse KL = per-token KL at fixed prefixes + REINFORCE
        per_token, D = loss(run, expert, batch, cfg)
        rmask, own = batch["response_mask"], batch["on_policy"]
        n_tokens = run.global_sum(rmask.sum())
        objective = per_token.sum() / n_tokens * run.world  # DDP averages over ranks
        grad_norm = run.optimize(objective)
        texts = [t for t, o in zip(batch["texts"], own) if o]
        reward = sum(map(task.reward, texts, decode_responses(tok, batch["response"][own], rmask[own]))) / len(texts)
        run.log(step, loss=objective.item(), grad_norm=grad_norm, reward=reward,
                kl=D.detach().sum(1)[own].mean().item(), student_tokens=int(rmask[own].sum()),
                expert_tokens=int(rmask.sum()), tok_per_s=int(rmask.sum()) / (time.time() - t0 + 1e-9))
