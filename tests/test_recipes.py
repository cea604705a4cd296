"""Today's OPD recipes (research/recipes.py): each new piece against an independent reference
(float64, full vocabulary, enumeration), and each recipe's flags a valid, distinct run."""
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

import distill
from config import parse_args, run_name
from errors import UsageError
from kernels import token_divergence, topk_divergence
from research import recipes
from tests.test_distill import all_responses, encode_prompts, stub_run, tiny, tok


def trl_generalized_jsd(student_logits, teacher_logits, beta):
    """huggingface/trl trl/experimental/gkd/gkd_trainer.py generalized_jsd_loss, per token, in
    float64 and with F.kl_div as the source writes it (not kernels.py's code)."""
    s, t = F.log_softmax(student_logits.double(), -1), F.log_softmax(teacher_logits.double(), -1)
    if beta == 0:
        jsd = F.kl_div(s, t, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t, s, reduction="none", log_target=True)
    else:
        m = torch.logsumexp(torch.stack([s + math.log1p(-beta), t + math.log(beta)]), dim=0)
        jsd = beta * F.kl_div(m, t, reduction="none", log_target=True) + \
            (1 - beta) * F.kl_div(m, s, reduction="none", log_target=True)
    return jsd.sum(-1)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_trl_gkd_is_divergence_jsd(beta):
    """TRL's GKD loss is --divergence jsd --beta: the same number per token, fused or not."""
    g = torch.Generator().manual_seed(0)
    h, W, ze = torch.randn(7, 8, generator=g), torch.randn(22, 8, generator=g), 3 * torch.randn(7, 22, generator=g)
    ref = trl_generalized_jsd(h @ W.T, ze, beta)
    for fused in (True, False):
        assert torch.allclose(token_divergence(h, W, ze, "jsd", beta=beta, fused=fused).double(), ref, rtol=1e-5)


def topk_reference(zs, ze, kind, k, rest):
    """One row at a time in float64: the expert's k most likely ids by sorting, the two
    distributions there, then the rest of the mass as the sources treat it."""
    out = []
    for a, b in zip(zs.double(), ze.double()):
        q, p = torch.softmax(a, 0), torch.softmax(b, 0)
        ids = sorted(range(len(p)), key=lambda v: -p[v].item())[:k]
        P, Q = p[ids], q[ids]
        if rest == "renormalize":
            P, Q = P / P.sum(), Q / Q.sum()
        elif rest == "bucket":
            P, Q = torch.cat([P, (1 - P.sum())[None]]), torch.cat([Q, (1 - Q.sum())[None]])
        fwd, rev = (P * (P / Q).log()).sum(), (Q * (Q / P).log()).sum()
        if rest == "ignore":  # verl floors its forward top-k KL at 0
            fwd = fwd.clamp(min=0)
        out.append(dict(forward=fwd, reverse=rev, mixed=(fwd + rev) / 2)[kind])
    return torch.stack(out)


@pytest.mark.parametrize("rest", ["ignore", "bucket", "renormalize"])
@pytest.mark.parametrize("kind", ["forward", "reverse", "mixed"])
def test_topk_divergence_matches_float64_and_its_gradient(kind, rest):
    """W = I, so h is the student's logits: random rows, and rows that put more mass than the
    expert on its top k (a negative unnormalised forward sum, which verl floors at 0)."""
    g = torch.Generator().manual_seed(1)
    W, ze = torch.eye(22), 2 * torch.randn(9, 22, generator=g)
    h = torch.randn(9, 22, generator=g, dtype=torch.float64)
    top = ze[5:].topk(4, -1).indices
    h[5:] = ze[5:].double() + 3 * torch.zeros(4, 22, dtype=torch.float64).scatter(1, top, 1.0)
    hd, hf = h.clone().requires_grad_(), h.float().requires_grad_()
    ref = topk_reference(hd @ W.double().T, ze, kind, 4, rest)
    out = topk_divergence(hf, W, ze, kind, k=4, rest=rest)
    assert torch.allclose(out.double(), ref, rtol=1e-4, atol=1e-6)
    ref.sum().backward()
    out.sum().backward()
    assert torch.allclose(hf.grad.double(), hd.grad, rtol=1e-3, atol=1e-5)


def test_topk_of_all_but_a_massless_token_renormalises_the_student_alone():
    """A hand-made case: an expert with one token of negligible mass. Its top V-1 ids hold all of
    its mass, and the student's is renormalised over them: KL(q' || p) with q' = q without that
    token, rescaled."""
    g = torch.Generator().manual_seed(2)
    h, W = torch.randn(5, 8, generator=g), torch.randn(22, 8, generator=g)
    ze = torch.randn(5, 22, generator=g)
    ze[:, 3] = -60.0
    top = topk_divergence(h, W, ze, "reverse", k=21, rest="renormalize")
    # renormalised over the 21 ids: KL(q' || p') with q' = q / (1 - q3), p' = p (p3 ~ 0)
    p, q = torch.softmax(ze.double(), -1), torch.softmax((h @ W.T).double(), -1)
    keep = [v for v in range(22) if v != 3]
    qk = q[:, keep] / q[:, keep].sum(1, keepdim=True)
    assert torch.allclose(top.double(), (qk * (qk / p[:, keep]).log()).sum(1), rtol=1e-4)


def test_topk_refuses_k_outside_the_vocabulary():
    h, W, ze = torch.randn(2, 8), torch.randn(22, 8), torch.randn(2, 22)
    for k in (0, 22):
        with pytest.raises(ValueError, match="top k"):
            topk_divergence(h, W, ze, k=k)


def test_costs_by_hand():
    logq, logp = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-2.0, -1.0, -0.5])
    assert distill.COSTS["k1"](logq, logp).tolist() == [1.0, -1.0, 0.0]
    d = logp - logq  # k3 = e^d - d - 1, never negative, 0 where the two agree
    assert torch.allclose(distill.COSTS["k3"](logq, logp), d.exp() - d - 1)
    assert distill.COSTS["k3"](logq, logp)[2] == 0
    assert distill.COSTS["k3"](torch.tensor([-30.0]), torch.tensor([0.0])).item() == 10.0  # verl's clamp at 10


def test_return_scale_by_hand():
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    count = distill.return_scale(mask, parse_args(["--return-norm", "count"]))
    assert count.tolist() == [[3, 2, 1, 1], [1, 1, 1, 1]]  # tokens from s on (padding: 1, never 0)
    disc = distill.return_scale(mask, parse_args(["--return-norm", "discount", "--gamma", "0.5"]))
    assert disc.tolist() == [[1.75, 1.5, 1, 1], [1, 1, 1, 1]]
    assert distill.return_scale(mask, parse_args([])) == 1.0


def enumerated(student, expert, T=1.0):
    """Every response of at most 2 tokens, its probability under the student (float64), and
    the student's and expert's log-softmax at each of its positions, from plain logits."""
    resp, mask = all_responses(2)
    prompt, pvalid = encode_prompts(tok, ["31415="] * len(resp))
    P = prompt.shape[1]

    def logsm(model):
        z = model.logits(torch.cat([prompt, resp], 1), torch.cat([pvalid, mask], 1))[:, P - 1:-1]
        return torch.log_softmax(z.double() / T, -1)

    lq, lp = logsm(student), logsm(expert).detach()
    seq = (lq.gather(2, resp[..., None]).squeeze(2) * mask).sum(1)
    batch = dict(prompt=prompt, prompt_valid=pvalid, response=resp, response_mask=mask,
                 on_policy=torch.ones(len(resp), dtype=torch.bool))
    return batch, mask, seq.exp().detach(), lq, lp


def expected_grad(student, per_token, weights):
    return torch.autograd.grad((weights.float() * per_token.sum(1)).sum(), list(student.parameters()))


def test_direct_k3_is_the_per_token_forward_kl_gradient_in_expectation():
    """verl's supervised k3: its expected gradient is that of sum_t KL(p_t || q_t) at the
    student's prefixes (the prefix weights held fixed), enumerated from plain log_softmax."""
    student, expert = tiny(0), tiny(1)
    batch, mask, w, lq, lp = enumerated(student, expert)
    fwd = ((lp.exp() * (lp - lq)).sum(-1) * mask).sum(1)
    exact = torch.autograd.grad((w * fwd).sum(), list(student.parameters()))
    per_token, _ = distill.direct_token_loss(stub_run(student), expert, batch,
                                             parse_args(["--estimator", "direct", "--cost", "k3", "--gamma", "0"]))
    for a, b in zip(expected_grad(student, per_token, w), exact):
        assert torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-7), (a.double() - b).abs().max()


@pytest.mark.parametrize("cost", ["k1", "k3"])
def test_sampled_per_token_costs_follow_their_exact_gradients(cost):
    """At gamma=0 the sampled estimator keeps only E_q[cost grad log q]. For k1 that is the
    gradient of the per-token reverse KL, sum_t KL(q_t || p_t); for k3 (verl's PG OPD) it is
    that of sum_t [KL(q_t || p_t) - KL(p_t || q_t)]: k3's own gradient, grad KL(p_t || q_t), is
    what the estimator drops. Both at fixed prefixes, enumerated from plain log_softmax."""
    student, expert = tiny(0), tiny(1)
    batch, mask, w, lq, lp = enumerated(student, expert)
    rev, fwd = ((lq.exp() * (lq - lp)).sum(-1) * mask).sum(1), ((lp.exp() * (lp - lq)).sum(-1) * mask).sum(1)
    target = rev if cost == "k1" else rev - fwd
    exact = torch.autograd.grad((w * target).sum(), list(student.parameters()))
    cfg = parse_args(["--estimator", "sampled", "--cost", cost, "--gamma", "0", "--no-baseline", "--no-normalize-adv"])
    per_token, _ = distill.sampled_token_loss(stub_run(student), expert, batch, cfg)
    for a, b in zip(expected_grad(student, per_token, w), exact):
        assert torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-7), (a.double() - b).abs().max()


def test_k3_clamp_stops_the_gradient_where_it_binds():
    """verl's clamps: past p/q = e^2.61 the cost is 10 and flat, so such a token teaches nothing."""
    logq = torch.tensor([-3.0, -3.0], requires_grad=True)
    cost = distill.COSTS["k3"](logq, torch.tensor([-3.0 + 2.0, -3.0 + 3.0]))  # p/q = e^2 (inside), e^3 (clamped)
    cost.sum().backward()
    assert cost[1].item() == 10.0 and logq.grad[1] == 0 and logq.grad[0] == pytest.approx(1 - math.exp(2))


def test_divergence_mixed_is_the_mean_of_the_two_kls():
    """NeMo-RL's kl_type mixed (weight 0.5), full vocabulary: F.kl_div in float64, fused or not."""
    g = torch.Generator().manual_seed(3)
    h, W, ze = torch.randn(6, 8, generator=g), torch.randn(22, 8, generator=g), 2 * torch.randn(6, 22, generator=g)
    s, t = F.log_softmax((h @ W.T).double(), -1), F.log_softmax(ze.double(), -1)
    ref = 0.5 * (F.kl_div(s, t, reduction="none", log_target=True) + F.kl_div(t, s, reduction="none", log_target=True))
    for fused in (True, False):
        assert torch.allclose(token_divergence(h, W, ze, "mixed", fused=fused).double(), ref.sum(-1), rtol=1e-5)


def test_return_norm_count_divides_each_return_in_the_online_loss():
    """--return-norm count at gamma=1: the REINFORCE weight of y_s is sum_{t>s} D_t over the
    number of tokens from s on. Expected gradient, enumerated: sum_t grad D_t plus
    grad log q(y_s) times that weight, D_t from plain log_softmax."""
    student, expert = tiny(0), tiny(1)
    batch, mask, w, lq, lp = enumerated(student, expert)
    D = (lq.exp() * (lq - lp)).sum(-1) * mask
    logq_y = lq.gather(2, batch["response"][..., None]).squeeze(2) * mask
    later = torch.stack([D[:, 1:].sum(1), torch.zeros(len(D), dtype=D.dtype)], 1).detach()  # L = 2
    left = mask.flip(1).cumsum(1).flip(1).clamp(min=1)
    surrogate = (D + later / left * logq_y) * mask
    exact = torch.autograd.grad((w * surrogate.sum(1)).sum(), list(student.parameters()))
    cfg = parse_args(["--return-norm", "count", "--no-baseline", "--no-normalize-adv"])
    per_token, _ = distill.online_loss(stub_run(student), expert, batch, cfg)
    for a, b in zip(expected_grad(student, per_token, w), exact):
        assert torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-7), (a.double() - b).abs().max()


@pytest.mark.parametrize("rest", ["ignore", "bucket", "renormalize"])
def test_topk_online_loss_is_the_exact_gradient_of_its_sequence_cost(rest):
    """With --top-k, D_t is the top-k divergence, and the two-part gradient (D_t at fixed
    prefixes + REINFORCE on the later D's) is the exact gradient of E_q[sum_t D_t]: enumerated,
    D_t from topk_reference (sorting, float64), not from kernels.py."""
    student, expert = tiny(0), tiny(1)
    batch, mask, w, lq, lp = enumerated(student, expert)
    seq_q = (lq.gather(2, batch["response"][..., None]).squeeze(2) * mask).sum(1)
    D = topk_reference(lq.flatten(0, 1), lp.flatten(0, 1), "reverse", 4, rest).view(mask.shape)
    exact = torch.autograd.grad((seq_q.exp() * (D * mask).sum(1)).sum(), list(student.parameters()))
    cfg = parse_args(["--top-k", "4", "--top-k-rest", rest, "--no-baseline", "--no-normalize-adv"])
    per_token, _ = distill.online_loss(stub_run(student), expert, batch, cfg)
    for a, b in zip(expected_grad(student, per_token, w), exact):
        assert torch.allclose(a.double(), b.double(), rtol=1e-3, atol=1e-6), (a.double() - b).abs().max()


@pytest.mark.parametrize("argv, says", [
    (["--cost", "k3"], "--cost applies"),
    (["--estimator", "direct"], "takes --cost k3"),
    (["--estimator", "direct", "--cost", "k3"], "--gamma 0"),
    (["--estimator", "direct", "--cost", "k3", "--gamma", "0", "--return-norm", "count"], "no --return-norm"),
    (["--estimator", "direct", "--cost", "k3", "--gamma", "0", "--no-baseline"], "--no-baseline"),
    (["--gamma", "0", "--return-norm", "count"], "at --gamma 0"),
    (["--no-normalize-adv", "--adv-std-floor", "0"], "--adv-std-floor applies"),
    (["--estimator", "sampled", "--top-k", "4"], "takes no --divergence, --mix or --top-k"),
    (["--top-k", "4", "--divergence", "jsd"], "--top-k takes"),
    (["--top-k-rest", "bucket"], "with --top-k only"),
])
def test_recipe_flags_refuse_what_they_cannot_mean(argv, says):
    with pytest.raises(UsageError, match=says):
        parse_args(argv)


def test_every_recipe_is_a_valid_distinct_run_with_a_source():
    names = {}
    for r in recipes.RECIPES:
        assert r.source and r.name
        name = run_name(parse_args(r.flags))
        assert names.setdefault(name, r.flags) == r.flags, f"{r.name}: the run name {name} of other flags"
    unique, label_of = recipes.methods()
    assert len(unique) == len(names) and set(label_of) == {r.name for r in recipes.RECIPES}


def test_recipes_that_are_the_same_flags_share_one_run(monkeypatch):
    same = recipes.Recipe("slime, by itself", list(recipes.K1), "THUDM/slime")
    monkeypatch.setattr(recipes, "RECIPES", [*recipes.RECIPES, same])
    unique, label_of = recipes.methods()
    assert len(unique) == len(recipes.RECIPES) - 1 and label_of[same.name] == "advantage -k1 per token"


TINY = "--expert-steps 4 --base-steps 2 --steps 2 --batch-size 8 --eval-prompts 16 --eval-every 1 --log-every 1"


def test_recipes_run_end_to_end_with_their_table(tmp_path, monkeypatch):
    """research/recipes.py, tiny, in one setting with a P(+) (pointer) and two recipes, one with a
    top-k expert: every run, the claim's count, P(+) (a probability), the student's mass on the
    expert's top k (a probability), the report and its data."""
    monkeypatch.setattr(recipes, "RECIPES", [recipes.RECIPES[0], recipes.RECIPES[-1]])
    monkeypatch.setattr(recipes, "MASS", [recipes.RECIPES[-1].name])
    monkeypatch.setattr(recipes, "SETTINGS", [recipes.SETTINGS[3]])  # the mode weight p = 0.2, H = 1
    recipes.main(["--seeds", "1", "--out-dir", str(tmp_path), "--train-args", TINY])
    text = (tmp_path / "report.md").read_text()
    top = recipes.RECIPES[-1].name
    row = next(l for l in text.splitlines() if l.startswith(top) and "/1" in l)
    assert re.search(r"\d\.\d{3} ± 0\.000 [01]/1", row), row
    with open(tmp_path / "data.json") as f:
        cells = {c["recipe"]: c["seeds"][0] for c in json.load(f)["cells"]}
    assert 0 <= cells[top]["plus"] <= 1 and 0 <= cells[top]["q_topk"] <= 1 and cells[top]["length"] >= 1
    assert "q_topk" not in cells["offline SFT"]


def test_boundary_runs_end_to_end_and_trains_a_long_ceiling_where_one_missed(tmp_path, monkeypatch):
    """research/boundary.py, tiny: one class, one seed, whose ceiling counts as a miss (a bar
    below any reward), so the class is trained again for 4 x 4 steps; the report, data, figure."""
    from research import boundary
    monkeypatch.setattr(boundary, "CEILING_BAR", -1.0)
    boundary.main(["--seeds", "1", "--classes", "1x8x2", "--out-dir", str(tmp_path), "--train-args", TINY])
    with open(tmp_path / "data.json") as f:
        c, = json.load(f)["classes"]
    assert c["size"] == "1x8x2" and len(c["ceiling"]) == len(c["sft"]) == len(c["online"]) == 1
    with open(tmp_path / "ceiling-long" / "1x8x2" / "seed0" / "mirror" / "expert.result.json") as f:
        assert json.load(f)["config"]["expert_steps"] == 16
    assert "16, seed 0" in (tmp_path / "report.md").read_text() and (tmp_path / "boundary.svg").exists()
