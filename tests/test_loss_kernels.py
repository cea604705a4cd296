"""The loss-level fused path (logprob_loss, distill_loss) against float64 references built
from plain log_softmax: values, gradients, ignored rows, ragged chunks, bf16 inputs."""
import pytest
import torch

from kernels import IGNORE, distill_loss, logprob_loss, naive_divergence, token_divergence, token_logprobs


def inputs(N=37, d=16, V=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g).requires_grad_()
    W = torch.randn(V, d, generator=g).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    targets[[3, 20]] = IGNORE
    return h, W, targets, g


def grads_of(loss, *xs):
    out = torch.autograd.grad(loss, xs)
    return [x.double() for x in out]


def ref_logprobs(h, W, targets, T=1.0):
    logp = torch.log_softmax(h @ W.T / T, -1)
    valid = targets != IGNORE
    return torch.where(valid, logp.gather(1, targets.clamp(min=0)[:, None]).squeeze(1), 0.0)


def f64(*xs):
    return [x.detach().double().requires_grad_() for x in xs]


@pytest.mark.parametrize("rows", [5, 16, 100])  # 35 rows take part: 5 divides, 16 leaves a ragged chunk
@pytest.mark.parametrize("T", [1.0, 0.7])
def test_logprob_loss_matches_float64(rows, T):
    h, W, targets, g = inputs()
    w = torch.randn(37, generator=g)
    loss = logprob_loss(h, W, targets, w, temperature=T, rows=rows)
    gh, gW = grads_of(3 * loss, h, W)  # an upstream gradient other than 1
    hd, Wd = f64(h, W)
    ref = (w.double() * ref_logprobs(hd, Wd, targets, T)).sum()
    rh, rW = grads_of(3 * ref, hd, Wd)
    assert loss.dtype == torch.float32
    assert abs(loss.double() - ref) < 1e-5 * ref.abs().clamp(min=1)
    assert (gh - rh).abs().max() < 1e-5 * rh.abs().max() and (gW - rW).abs().max() < 1e-5 * rW.abs().max()


def test_logprob_loss_is_the_sft_loss():
    """weight -1/n gives the mean negative log-likelihood of token_logprobs, gradients included."""
    h, W, targets, _ = inputs()
    n = int((targets != IGNORE).sum())
    a = logprob_loss(h, W, targets, -1.0 / n, rows=8)
    ga = grads_of(a, h, W)
    b = -token_logprobs(h, W, targets).sum() / n
    gb = grads_of(b, h, W)
    assert torch.allclose(a, b, atol=1e-6)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(ga, gb))


def test_logprob_loss_ignored_rows_and_backward_once():
    h, W, targets, g = inputs()
    loss = logprob_loss(h, W, targets, torch.rand(37, generator=g), rows=6)
    gh, gW = torch.autograd.grad(loss, (h, W), retain_graph=True)
    assert torch.all(gh[[3, 20]] == 0) and gh.abs().sum() > 0
    with pytest.raises(RuntimeError, match="only once"):  # the gradients were handed over
        torch.autograd.grad(loss, (h, W))
    none = logprob_loss(h, W, torch.full((37,), IGNORE), 1.0)
    gh, gW = torch.autograd.grad(none, (h, W))
    assert none == 0 and gh.abs().sum() == 0 and gW.abs().sum() == 0


def test_logprob_loss_float64_is_exact_and_no_grad():
    """float64 inputs are computed in float64 throughout: the reference to 1e-12."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(6, 4, dtype=torch.double, generator=g, requires_grad=True)
    W = torch.randn(11, 4, dtype=torch.double, generator=g, requires_grad=True)
    t = torch.tensor([0, 3, IGNORE, 10, 7, 1])
    w = torch.randn(6, dtype=torch.double, generator=g)
    loss = logprob_loss(h, W, t, w, temperature=0.9, rows=4)
    mine = grads_of(loss, h, W)
    ref = (w * ref_logprobs(h, W, t, 0.9)).sum()
    theirs = grads_of(ref, h, W)
    assert loss.dtype == torch.float64 and abs(loss - ref) < 1e-12
    assert all(torch.allclose(x, y, rtol=0, atol=1e-12) for x, y in zip(mine, theirs))
    with torch.no_grad():
        value = logprob_loss(h, W, t, w, temperature=0.9, rows=4)
    assert not value.requires_grad and abs(value - ref) < 1e-12


def test_logprob_loss_extreme_logits_are_finite():
    h, W, targets, _ = inputs()
    with torch.no_grad():
        W[:5] *= 1e4 / W[:5].norm(dim=1, keepdim=True).max()  # logits around +-1e4
    loss = logprob_loss(h, W, targets, 1.0, rows=8)
    gh, gW = torch.autograd.grad(loss, (h, W))
    assert torch.isfinite(loss) and torch.isfinite(gh).all() and torch.isfinite(gW).all()
    ref = ref_logprobs(h.double(), W.double(), targets).sum()
    assert abs(loss.double() - ref) < 1e-5 * ref.abs()


def test_logprob_loss_bf16_inputs_accumulate_in_fp32():
    h, W, targets, g = inputs()
    hb, Wb = h.detach().bfloat16().requires_grad_(), W.detach().bfloat16().requires_grad_()
    w = torch.rand(37, generator=g)
    loss = logprob_loss(hb, Wb, targets, w, rows=8)
    gh, gW = torch.autograd.grad(loss, (hb, Wb))
    assert loss.dtype == torch.float32 and gh.dtype == gW.dtype == torch.bfloat16
    hd, Wd = f64(hb, Wb)  # the same bf16-rounded inputs, in float64
    ref = (w.double() * ref_logprobs(hd, Wd, targets)).sum()
    rh, rW = grads_of(ref, hd, Wd)
    assert abs(loss.double() - ref) < 1e-2 * ref.abs()  # bf16 logits, fp32 softmax
    assert (gh.double() - rh).abs().max() < 3e-2 * rh.abs().max()
    assert (gW.double() - rW).abs().max() < 3e-2 * rW.abs().max()


# ----------------------------------------------------------------------------- distill_loss
def ref_distill(hd, Wd, ze, targets, w1, w2_fn, kind, beta, T):
    valid = targets != IGNORE
    D = torch.where(valid, naive_divergence(hd @ Wd.T / T, ze.double() / T, kind, beta), 0.0)
    w2 = torch.where(valid, w2_fn(D.detach()), 0.0)
    return (w1.double() * D).sum() + (w2 * ref_logprobs(hd, Wd, targets, T)).sum(), D


@pytest.mark.parametrize("kind,beta", [("reverse", 0.5), ("forward", 0.5), ("jsd", 0.3)])
@pytest.mark.parametrize("expert_as_hidden", [False, True])
@pytest.mark.parametrize("block", [13, 101])  # 13 leaves a ragged last block of V=101
def test_distill_loss_matches_float64(kind, beta, expert_as_hidden, block):
    h, W, targets, g = inputs()
    he, We = torch.randn(37, 16, generator=g), torch.randn(101, 16, generator=g) * 0.5
    ze = he @ We.T
    w1 = torch.rand(37, generator=g)
    w2_fn = lambda D: (D - D.mean()) / 7  # any function of the divergences: the advantage
    expert = (he, We) if expert_as_hidden else ze
    loss, D = distill_loss(h, W, expert, targets, w1, w2_fn, kind, beta=beta, temperature=0.8, block=block)
    gh, gW = grads_of(2 * loss, h, W)
    hd, Wd = f64(h, W)
    ref, Dref = ref_distill(hd, Wd, ze, targets, w1, w2_fn, kind, beta, 0.8)
    rh, rW = grads_of(2 * ref, hd, Wd)
    assert not D.requires_grad and (D.double() - Dref).abs().max() < 2e-6 * Dref.abs().max()
    assert abs(loss.double() - ref) < 1e-5 * ref.abs().clamp(min=1)
    # fp32 rounding relative to the largest gradient entry (JSD's logaddexp costs a few ulps)
    assert (gh - rh).abs().max() < 3e-5 * rh.abs().max() and (gW - rW).abs().max() < 3e-5 * rW.abs().max()


def test_distill_loss_is_distill_py_surrogate():
    """distill.py's loss (token_divergence + token_logprobs + sequence_kl_surrogate, / n) and
    distill_loss with the advantage as its logprob weight: the same value and gradients."""
    from distill import advantages, returns_to_go, sequence_kl_surrogate
    g = torch.Generator().manual_seed(2)
    B, R, d, V = 6, 5, 8, 11
    h = torch.randn(B * R, d, generator=g, requires_grad=True)
    W = torch.randn(V, d, generator=g, requires_grad=True)
    he, We = torch.randn(B * R, d, generator=g), torch.randn(V, d, generator=g)
    resp = torch.randint(0, V, (B, R), generator=g)
    rmask = torch.arange(R)[None, :] < torch.tensor([5, 3, 1, 4, 5, 2])[:, None]  # ragged responses
    on_policy = torch.ones_like(rmask)
    on_policy[:2] = False  # GKD mixing: two rows from the expert
    valid, n = rmask.flatten(), rmask.sum()

    D = torch.zeros(B, R)
    D[rmask] = token_divergence(h[valid], W, (he[valid], We))
    logq = token_logprobs(h, W, torch.where(valid, resp.flatten(), IGNORE)).view(B, R)
    plain = sequence_kl_surrogate(D, logq, rmask, 0.9, on_policy).sum() / n
    g_plain = grads_of(plain, h, W)

    def adv(D_valid):  # the wiring for distill.py: D of the real tokens in, their weights out
        D = torch.zeros(B, R)
        D[rmask] = D_valid
        returns = returns_to_go(D, rmask, 0.9, include_current=False)
        return (advantages(returns, rmask & on_policy) * on_policy / n)[rmask]

    fused, D_fused = distill_loss(h[valid], W, (he[valid], We), resp[rmask], 1 / n, adv, block=4)
    g_fused = grads_of(fused, h, W)
    assert torch.allclose(D_fused, D[rmask].detach(), atol=1e-6)
    assert torch.allclose(fused, plain, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_fused, g_plain))


def test_distill_loss_bf16_and_no_grad():
    h, W, targets, g = inputs()
    ze = torch.randn(37, 101, generator=g)
    hb, Wb = h.detach().bfloat16().requires_grad_(), W.detach().bfloat16().requires_grad_()
    w2 = torch.rand(37, generator=g)
    loss, D = distill_loss(hb, Wb, ze, targets, 1.0, w2, block=16)
    gh, gW = torch.autograd.grad(loss, (hb, Wb))
    assert loss.dtype == torch.float32 and gh.dtype == gW.dtype == torch.bfloat16
    hd, Wd = f64(hb, Wb)  # the same bf16-rounded inputs, in float64
    ref, Dref = ref_distill(hd, Wd, ze, targets, torch.ones(37), lambda D: w2.double(), "reverse", 0.5, 1.0)
    rh, rW = grads_of(ref, hd, Wd)
    assert (D.double() - Dref).abs().max() < 0.05  # bf16 logits, fp32 softmax
    assert (gh.double() - rh).abs().max() < 3e-2 * rh.abs().max()
    assert (gW.double() - rW).abs().max() < 3e-2 * rW.abs().max()
    with torch.no_grad():
        value, _ = distill_loss(h, W, ze, targets, 1.0, 0.5)
    assert not value.requires_grad
    assert torch.allclose(value, distill_loss(h, W, ze, targets, 1.0, 0.5)[0])
