"""Online imitation learning (on-policy distillation): the student learns at its own states.

Each step the student samples responses to a batch of prompts (KV cache, no grad), the expert
scores every token of them, and the student minimises the sequence-level reverse KL, the
objective the paper analyses (the whole response is one action: H=1 is one prompt-response):
    J = KL(pi_s(y|x) || pi_e(y|x)) = E_{y~pi_s} sum_t D_t,
    D_t = KL(pi_s(.|x,y_<t) || pi_e(.|x,y_<t))      (full vocabulary, at each student prefix)
    grad J = E[ sum_t grad D_t ]                                  (prefix held fixed)
           + E[ sum_s grad log pi_s(y_s|x,y_<s) * sum_{t>s} gamma^(t-s) D_t ]     (REINFORCE)
online_loss() below is that gradient as a per-token surrogate. Its second term is the one that
matters under misspecification: it tells the first token which *mode* to commit to by what the
choice costs later. gamma=1 is the exact sequence-level gradient; gamma=0 drops the term and
leaves the per-token objective of GKD/TRL, which at a prefix the student cannot tell apart is
minimised by one distribution for both modes, so it gains little over SFT there.

Simplified against a full RL recipe: the baseline is the leave-one-out batch mean of the return
at each position; advantages are divided by their std floored at 1 nat (--adv-std-floor; so it
only ever shrinks the REINFORCE term); the gradient norm is clipped. Every score is taken at the
sampling temperature T, so the objective is KL(pi_s^T || pi_e^T) and the REINFORCE term stays
on-policy. Variants, for today's OPD recipes (research/recipes.py): the sampled-token estimators
(sampled_token_loss, direct_token_loss, --cost), GKD mixing of expert rows (rollouts, --mix),
other divergences at the student's states (--divergence), a top-k expert (--top-k), returns
divided by their length (--return-norm).

Run: python train.py --mode onpolicy. This file is parallel to sft.py: `diff sft.py distill.py`
shows where the states come from (rollouts here, expert_dataset there) and the loss.
"""
import time

import torch

from data import collate, decode_responses, encode_prompts
from kernels import IGNORE, token_divergence, token_logprobs, topk_divergence
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


def hidden_states(run, expert, batch):
    """The student's and the expert's final hidden states at every response position of the
    batch, flattened to [B*R, d], and the response tokens as targets (IGNORE on padding). The
    kernels turn them into log-probs and divergences without materialising [B*R, V] logits."""
    prompt, pvalid, resp, rmask = batch["prompt"], batch["prompt_valid"], batch["response"], batch["response_mask"]
    with run.autocast():
        with torch.no_grad():
            h_e = response_hidden(expert, prompt, pvalid, resp, rmask).flatten(0, 1)
        h = response_hidden(run.model, prompt, pvalid, resp, rmask).flatten(0, 1)
    return h, h_e, torch.where(rmask, resp, IGNORE).flatten()


def online_loss(run, expert, batch, cfg):
    """Online IL's per-token surrogate [B, R] (0 on padding), whose gradient is grad J above,
    and D [B, R], the per-token divergence (logged as kl): the full-vocabulary reverse KL, or
    --divergence's, or --top-k's."""
    mask, T = batch["response_mask"], cfg.temperature
    own = batch["on_policy"][:, None] & mask  # the REINFORCE term: the student's own rows only
    h, h_e, targets = hidden_states(run, expert, batch)
    W, valid = unwrap(run.model).unembedding, mask.flatten()
    # D_t = sum_v q(v) (log q(v) - log p(v)): the full-vocabulary reverse KL at each of the student's
    # prefixes, q the student's softmax and p the expert's at temperature T (or --divergence's)
    D = torch.zeros(mask.shape, device=mask.device)
    if cfg.top_k:  # the expert as a served teacher gives it: its top k log-probs (kernels.topk_divergence)
        D[mask] = topk_divergence(h[valid], W, (h_e[valid], expert.unembedding), cfg.divergence, cfg.top_k,
                                  cfg.top_k_rest, temperature=T)
    else:
        D[mask] = token_divergence(h[valid], W, (h_e[valid], expert.unembedding), cfg.divergence, beta=cfg.beta,
                                   temperature=T, fused=cfg.fused)
    logq = token_logprobs(h, W, targets, temperature=T, fused=cfg.fused).view(mask.shape)  # log q(y_t)
    # the return of each token: what writing it cost later, sum_{t>s} gamma^(t-s) D_t (no gradient)
    # (--return-norm divides it by its length from s on, s included, as MiniLLM does: its return
    # holds the cost of y_s too, whose expectation is D_s, carried here by the first term)
    returns = returns_to_go(D.detach(), mask, cfg.gamma, include_current=False) / return_scale(mask, cfg)
    # the advantage: minus the leave-one-out mean of the other rows' returns there, / its std
    adv = advantages(returns, own, cfg.baseline, cfg.normalize_adv, cfg.adv_std_floor, total=run.global_sum)
    # + adv * log q: the return is a cost (KL still to come), so descending this lowers the
    # probability of the tokens whose future costs more than the other rows' did
    return D * mask + adv * logq * own, D


def k3(logq, logp):
    """p/q - 1 - log(p/q): never negative, and E_q k3 = D_t like k1's, with verl's clamps
    (verl/trainer/ppo/core_algos.py kl_penalty, where "k3" and "low_var_kl" are one branch):
    log(p/q) to +-20, the cost to 10. Past p/q ~ 13.6 the clamp binds and the token's gradient
    is 0: there both of verl's estimators are biased."""
    d = (logp - logq).clamp(-20, 20)
    return (d.exp() - d - 1).clamp(-10, 10)


# the cost of a sampled token y_t from log q(y_t) and log p(y_t) (--cost); k1 = log q/p, E_q k1 = D_t
COSTS = dict(k1=lambda logq, logp: logq - logp, k3=k3)


def sampled_scores(run, expert, batch, cfg):
    """log q(y_t) (with gradient), log p(y_t) and D_t (for the log) [B, R] at the sampled tokens."""
    mask, T = batch["response_mask"], cfg.temperature
    h, h_e, targets = hidden_states(run, expert, batch)
    W, valid = unwrap(run.model).unembedding, mask.flatten()
    with torch.no_grad():
        D = torch.zeros(mask.shape, device=mask.device)
        D[mask] = token_divergence(h[valid], W, (h_e[valid], expert.unembedding), "reverse", temperature=T,
                                   fused=cfg.fused)
        logp = token_logprobs(h_e, expert.unembedding, targets, temperature=T, fused=cfg.fused).view(mask.shape)
    logq = token_logprobs(h, W, targets, temperature=T, fused=cfg.fused).view(mask.shape)
    return logq, logp, D


def sampled_token_loss(run, expert, batch, cfg):
    """The sampled-token estimator (--estimator sampled): the cost of each token (--cost, k1 by
    default: the one-sample estimate of D_t) and only the REINFORCE term, with return
    sum_{t>=s} gamma^(t-s) cost_t. At gamma=0 with no baseline or normalisation, advantage = -k1:
    tinker-cookbook's (distillation/train_on_policy.py, incorporate_kl_penalty), slime's
    (--use-opd), ms-swift's OPD and verl's policy-gradient OPD. The cost's own gradient is dropped
    because for k1 it is E_q[grad log q(y_t)] = 0 (a score function has mean zero). For k3 it is
    grad KL(p || q), so with k3 (verl's PG OPD) the expected gradient at gamma=0 is that of
    sum_t [KL(q || p) - KL(p || q)] at the prefixes: it raises the forward KL (tests/test_recipes.py)."""
    mask = batch["response_mask"]
    logq, logp, D = sampled_scores(run, expert, batch, cfg)
    cost = COSTS[cfg.cost](logq.detach(), logp) * mask
    returns = returns_to_go(cost, mask, cfg.gamma, include_current=True) / return_scale(mask, cfg)
    return advantages(returns, mask, cfg.baseline, cfg.normalize_adv, cfg.adv_std_floor, total=run.global_sum) * logq, D


def direct_token_loss(run, expert, batch, cfg):
    """verl's supervised OPD estimator (--estimator direct; verl/trainer/distillation/losses.py,
    its default loss_mode k3): the sampled token's cost itself, differentiated through log q(y_t),
    with no REINFORCE term (so --gamma 0). For k3, d cost/d log q = 1 - p/q, so the expected
    gradient is sum_v (q - p) grad log q(v) = grad of the forward KL(p || q) at the prefix, where
    k3's clamp does not bind: a per-token forward KL from one sample. (For k1 the expected gradient
    is 0: verl refuses k1 here, and so does config.check.)"""
    mask = batch["response_mask"]
    logq, logp, D = sampled_scores(run, expert, batch, cfg)
    return COSTS[cfg.cost](logq, logp) * mask, D


LOSSES = dict(full=online_loss, sampled=sampled_token_loss, direct=direct_token_loss)  # --estimator


RETURN_NORMS = ("none", "discount", "count")  # --return-norm


def return_scale(mask, cfg):
    """What each return is divided by (--return-norm): 1; "discount": sum_{t>=s} gamma^(t-s) over
    the tokens from s on (TRL's MiniLLMTrainer, length_normalization); "count": the number of
    tokens from s on (MiniLLM's own code, microsoft/LMOps minillm/losses.py), at least 1 each."""
    if cfg.return_norm == "none":
        return 1.0
    gamma = cfg.gamma if cfg.return_norm == "discount" else 1.0
    return returns_to_go(mask.float(), mask, gamma, include_current=True).clamp(min=1.0)


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


def advantages(returns, mask, baseline=True, normalize=True, std_floor=1.0, total=lambda x: x):
    """Returns minus a leave-one-out baseline: at each position, the mean return of the *other*
    rows there (it does not depend on the row's own tokens, so the gradient stays unbiased; a
    row alone at its position gets no baseline). normalize: divide by the std over all tokens,
    never by less than std_floor (nats; at 1, the default, normalising only ever shrinks the
    REINFORCE term, so near-constant returns are never blown up to unit scale).
    total(x): x summed over every rank (run.global_sum; the identity on one process), so that
    both statistics are the global batch's under torchrun."""
    adv = returns * mask
    if baseline:  # per position: how many rows reach it, and their returns' sum, over every rank
        R = int(total(torch.tensor(mask.shape[1])).item())  # at least the widest rank's width
        per_pos = torch.zeros(2, R, device=mask.device)
        per_pos[0, :mask.shape[1]], per_pos[1, :mask.shape[1]] = mask.sum(0), (returns * mask).sum(0)
        n, sums = total(per_pos)[:, :mask.shape[1]]
        others = torch.where(n > 1, (sums - returns) / (n - 1).clamp(min=1), 0.0)
        adv = (returns - others) * mask
    if normalize:  # std = sqrt(sum (a - mean)^2 / (count - 1)) over every rank's tokens
        count, s1 = total(torch.stack([mask.sum().float(), adv[mask].sum()]))
        if count > 1:
            s2 = total(((adv[mask] - s1 / count) ** 2).sum())
            adv = adv / (s2 / (count - 1)).sqrt().clamp(min=max(std_floor, 1e-8))  # 0: plain whitening
    return adv


def train(run, expert, prompts, tok, task, cfg):
    """Online IL: the whole loop. `run` (runtime.py) does the mechanics each line names: the
    schedule, backward/clip/step, logs, the held-out check, checkpoints, Ctrl-C."""
    B = cfg.batch_size // run.world
    loss_fn = LOSSES[cfg.estimator]
    with run:  # Ctrl-C from here on: finish the step, save, exit 130
        for step in range(run.start, run.total):
            lr = run.set_lr(step)  # --warmup, then --lr-schedule
            # ---- states: the student's own rollouts (online); the expert scores every token
            t0 = time.time()
            with run.autocast(), run.stop_on_overflow("while sampling"):  # weights that diverged: one line
                batch = rollouts(unwrap(run.model), expert, prompts.batch(B), tok, task, cfg, run.sample_gen, run.device)
            # ---- loss: sequence-level reverse KL = per-token KL at fixed prefixes + REINFORCE
            per_token, D = loss_fn(run, expert, batch, cfg)
            rmask, own = batch["response_mask"], batch["on_policy"]
            n_tokens = run.global_sum(rmask.sum())
            objective = per_token.sum() / n_tokens * run.world  # DDP averages over ranks
            grad_norm = run.optimize(objective)  # backward, clip, step; stops on a non-finite loss
            # ---- log (the student's own rows, over every rank), held-out check, checkpoint
            texts = [batch["texts"][i] for i in own.nonzero().flatten().tolist()]  # one copy to the host
            rewards = map(task.reward, texts, decode_responses(tok, batch["response"][own], rmask[own]))
            n_rows, reward, kl = run.global_sum(torch.tensor([len(texts), sum(rewards), D.detach().sum(1)[own].sum().item()],
                                                             dtype=torch.float64)).tolist()
            run.log(step, lr=lr, loss=objective.item(), grad_norm=grad_norm, reward=reward / n_rows, kl=kl / n_rows,
                    student_tokens=int(run.global_sum(rmask[own].sum())), expert_tokens=int(n_tokens),
                    tok_per_s=int(rmask.sum()) / (time.time() - t0 + 1e-9))
            converged = run.held_out_check(step)  # every --eval-every steps
            if run.checkpoint(step, converged):  # at the end and on Ctrl-C; every --save-every steps
                break
