"""Two exact toys, with no sampling and no optimiser in the way.

1. The information-theoretic bottleneck at H=1: offline IL (forward KL) against online IL
   (reverse KL) on a known expert and a student class that cannot hold both of its modes.
2. The mode-weight law: an expert that writes the representable mode ("+", then copy) with
   probability p and the other ("-", then H digits the student cannot compute) otherwise. How
   often does each method's student write "+", and what reward does that buy, as p and H vary?

    python -m research.toy    # both tables, text bars and text plots; writes out/toy/report.md
"""
import argparse
import math
import os
import sys

if __package__ in (None, ""):  # run as python research/toy.py: the imports live in the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from errors import OneLineParser
from eval import sparkline
from research.report import Report, table


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
        out[name] = dict(s=s.item(), reward=qs[correct].sum().item(), fwd_kl=fwd(s).item(), rev_kl=rev(s).item(),
                         q=qs.tolist())
    out["expert"] = dict(q=p.tolist())
    return out


# ----------------------------------------------------------------------------- the mode-weight law
# The pointer task with a sign, as the 1-layer student sees it. The expert writes "+" with
# probability p, then H copied digits; or "-", then H pointer digits d[d_i]. Each of its digits
# is right with probability 1 - eps, the rest eps spread over the other V-1 digits. The student
# class: "+" with probability q, after which it copies exactly as the expert does (it can); after
# "-" a distribution r over digits that cannot depend on the digit it should write (following a
# pointer takes two lookups in a row). With the right digit uniform over the V digits:
#   reverse KL  J(q, r) = q ln(q/p) + (1-q) ln((1-q)/(1-p)) + (1-q) H c(r),
#               c(r) = E_target KL(r || e_target) = L - entropy(r),   L = -E_target log e_target(d)
#   c is least at r uniform: c = L - ln V, the price per digit of writing "-" (about
#   (V-1)/V ln((V-1)/eps) - ln V: it grows with the expert's confidence, not just ln V)
#   dJ/dq = 0  =>  q* = sigmoid(logit p + H c)                        online IL, gamma = 1
#   forward KL (SFT) and the per-token objective (gamma = 0, whose first token sees no later
#   cost) both keep q = p and r uniform.
# Reward: q (1 - eps)^H + (1 - q) V^-H (a uniform guess gets H pointer digits right w.p. V^-H).
def mode_weight_law(p, H, eps, V=10):
    """The closed form above: c, and each method's P("+") and reward."""
    L = -(math.log(1 - eps) + (V - 1) * math.log(eps / (V - 1))) / V
    c = L - math.log(V)
    z = math.log(p / (1 - p)) + H * c
    q_online = 1 / (1 + math.exp(-z)) if z > -700 else 0.0
    reward = lambda q: q * (1 - eps) ** H + (1 - q) * V ** -H  # noqa: E731
    return dict(c=c, q_online=q_online, q_sft=p, q_gamma0=p, reward_online=reward(q_online), reward_sft=reward(p),
                reward_gamma0=reward(p), reward_expert=(1 - eps) ** H)


def mode_weight_enumerated(p, H, eps, V=10, n_grid=20001):
    """The same projections found by brute force: every response (sign, H digits) and every
    target digit string, the sequence-level KLs summed exactly, minimised over q on a grid (r
    uniform; mode_weight_r_is_uniform checks that no other r does better). Small V^H only."""
    digits = torch.cartesian_prod(*[torch.arange(V)] * H).view(-1, H) if H > 1 else torch.arange(V)[:, None]
    targets = digits  # [T, H]: every string the expert should write after "-"
    hit = digits[:, None, :] == targets[None, :, :]  # [X, T, H]
    log_e_minus = torch.where(hit, torch.tensor(math.log(1 - eps), dtype=torch.float64),
                              torch.tensor(math.log(eps / (V - 1)), dtype=torch.float64)).sum(-1)  # log e(x | target)
    log_r = torch.full((len(digits),), -H * math.log(V), dtype=torch.float64)  # r uniform, per digit
    q = torch.linspace(1e-9, 1 - 1e-9, n_grid, dtype=torch.float64)[:, None]
    # the "+" branch is matched exactly, so it adds q ln(q/p); the "-" branch, averaged over targets
    minus_rev = (log_r[:, None] - log_e_minus).mean(1) @ log_r.exp()  # E_target KL(r^H || e^H)
    rev = q * (q / p).log() + (1 - q) * ((1 - q) / (1 - p)).log() + (1 - q) * minus_rev
    e_minus = log_e_minus.exp()  # [X, T]
    minus_fwd = (e_minus * (log_e_minus - log_r[:, None])).sum(0).mean()  # E_target KL(e^H || r^H)
    fwd = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log() + (1 - p) * minus_fwd
    q_rev, q_fwd = q[rev.argmin()].item(), q[fwd.argmin()].item()
    reward = lambda x: x * (1 - eps) ** H + (1 - x) * V ** -H  # noqa: E731
    return dict(c=minus_rev.item() / H, q_online=q_rev, q_sft=q_fwd, reward_online=reward(q_rev), reward_sft=reward(q_fwd))


def mode_weight_r_is_uniform(eps, V=10, trials=200, seed=0):
    """The price of "-" per digit, E_target KL(r || e_target), computed directly over the V
    targets for random guesses r: never below the uniform guess's, which is the closed form's c.
    Returns (the least over the random r, the uniform r's, the closed form's c)."""
    g = torch.Generator().manual_seed(seed)
    e = torch.full((V, V), eps / (V - 1), dtype=torch.float64)  # e[target, d]
    e.fill_diagonal_(1 - eps)

    def price(r):
        return (r[None, :] * (r[None, :].log() - e.log())).sum(1).mean().item()

    best = min(price(torch.softmax(3 * torch.randn(V, generator=g, dtype=torch.float64), 0)) for _ in range(trials))
    return best, price(torch.full((V,), 1 / V, dtype=torch.float64)), mode_weight_law(0.5, 1, eps, V)["c"]


def main(out_dir):
    res = toy()
    report = Report("the exact toys: the H=1 projections, and the mode-weight law")
    rows = [r for r in res if r != "expert"]
    report.add("exact H=1 toy: expert = two correct answers at the ends of a 1-D order, student q_s(k) ∝ exp(s e_k)",
               table("projection", rows, ["s", "reward", "fwd_kl", "rev_kl"], lambda r, c: f"{res[r][c]:.3f}"))
    report.add("the three distributions over the K answers (the two correct ones at the ends; bar height: "
               "probability, 0 to 0.5)", [f"{r:<24} {sparkline(res[r]['q'], 0, 0.5)}" for r in ["expert", *rows]])
    ps, hs = (0.5, 0.2, 0.1, 0.05), (1, 2, 4, 8)
    for eps in (0.01, 1e-4):
        law = {(p, h): mode_weight_law(p, h, eps) for p in ps for h in hs}
        report.add(f"the mode-weight law, expert eps = {eps:g} (c = {law[(0.5, 1)]['c']:.2f} nats per digit of '-'): "
                   "P('+') and reward of online IL (gamma=1) | of SFT and gamma=0 (both keep P('+') = p)",
                   table("p, H", [f"p={p:g}, H={h}" for p in ps for h in hs], ["online P(+)", "online reward",
                         "SFT, γ=0 reward", "expert"], lambda r, col: f"{mode_weight_cell(law, r, col):.3f}"))
    law = {h: mode_weight_law(0.1, h, 0.01) for h in range(1, 9)}
    report.add("p = 0.1, eps = 0.01: reward vs H = 1..8 (text plot, 0 to 1)",
               [f"{k:<16} [{sparkline([law[h][f'reward_{k}'] for h in law])}]" for k in ("online", "sft", "expert")])
    report.write(out_dir)


def mode_weight_cell(law, row, col):
    p, h = (float(x.split("=")[1]) for x in row.split(", "))
    res = law[(p, int(h))]
    return dict(zip(["online P(+)", "online reward", "SFT, γ=0 reward", "expert"],
                    [res["q_online"], res["reward_online"], res["reward_sft"], res["reward_expert"]]))[col]


if __name__ == "__main__":
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=os.path.join("out", "toy"), help="where report.md goes")
    main(parser.parse_args().out_dir)
