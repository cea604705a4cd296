"""The information-theoretic bottleneck at H=1, exactly: offline IL (forward KL) against online
IL (reverse KL) on a known expert and a student class that cannot hold both of its modes, with
no sampling and no optimiser in the way.

    python toy.py    # the table, the three distributions as text bars; writes out/toy/report.md
"""
import os

import torch

try:  # optional: toy.png beside the text bars
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    plt = None

from eval import Report, sparkline, table


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


def main(out_dir=os.path.join("out", "toy")):
    res = toy()
    report = Report("the exact H=1 toy")
    rows = [r for r in res if r != "expert"]
    report.add("exact H=1 toy: expert = two correct answers at the ends of a 1-D order, student q_s(k) ∝ exp(s e_k)",
               table("projection", rows, ["s", "reward", "fwd_kl", "rev_kl"], lambda r, c: f"{res[r][c]:.3f}"))
    report.add("the three distributions over the K answers (the two correct ones at the ends; bar height: "
               "probability, 0 to 0.5)", [f"{r:<24} {sparkline(res[r]['q'], 0, 0.5)}" for r in ["expert", *rows]])
    if plt is not None:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3), sharey=True)
        for ax, r in zip(axes, ["expert", *rows]):
            ax.bar(range(len(res[r]["q"])), res[r]["q"], color=["C2" if k in (0, len(res[r]["q"]) - 1) else "C7"
                                                             for k in range(len(res[r]["q"]))])
            ax.set(title=r, xlabel="answer k (correct: green)")
        axes[0].set_ylabel("probability")
        os.makedirs(out_dir, exist_ok=True)
        fig.savefig(os.path.join(out_dir, "toy.png"), dpi=100, bbox_inches="tight")
        report.add("figures", ["![the three distributions](toy.png)"])
    else:
        print("(matplotlib is not installed: no toy.png; the text bars above show the same)")
    report.write(out_dir)


if __name__ == "__main__":
    main()
