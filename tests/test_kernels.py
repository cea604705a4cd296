"""The fused kernels against float64 references built from plain log_softmax; the checks that
refuse mismatched inputs on every path; the choice of backend (the PyTorch kernels on the CPU;
Triton's or naive on CUDA), with fake tensors on the CPU."""
from types import SimpleNamespace

import pytest
import torch

import kernels
from kernels import IGNORE, _TokenDivergence, _TokenLogprobs, backend, naive_divergence, token_divergence, \
    token_logprobs, vocab_block


def inputs(N=37, d=16, V=101, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, d, generator=g) * scale).requires_grad_()
    W = torch.randn(V, d, generator=g).requires_grad_()
    return h, W, g


def ref_logprobs(h, W, targets, T=1.0):
    logp = torch.log_softmax(h.double() @ W.double().T / T, -1)
    valid = targets != IGNORE
    return torch.where(valid, logp.gather(1, targets.clamp(min=0)[:, None]).squeeze(1), 0.0)


@pytest.mark.parametrize("block", [7, 32, 101])  # V=101 is prime; 7 and 32 do not divide it
@pytest.mark.parametrize("T", [1.0, 0.7])
def test_token_logprobs_matches_float64(block, T):
    h, W, g = inputs()
    targets = torch.randint(0, 101, (37,), generator=g)
    targets[[3, 20]] = IGNORE
    up = torch.randn(37, generator=g)  # any per-token upstream gradient (masks, advantages)
    out = token_logprobs(h, W, targets, temperature=T, block=block)
    (out * up).sum().backward()
    gh, gW = h.grad.clone(), W.grad.clone()
    h.grad = W.grad = None
    ref = ref_logprobs(h, W, targets, T)
    (ref * up.double()).sum().backward()
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(gh.double(), h.grad.double(), rtol=1e-4, atol=1e-5)
    assert torch.allclose(gW.double(), W.grad.double(), rtol=1e-4, atol=1e-5)


def test_ignored_rows_get_exactly_zero_gradient():
    h, W, g = inputs()
    targets = torch.full((37,), IGNORE)
    targets[0] = 5
    token_logprobs(h, W, targets, block=10).sum().backward()
    assert torch.all(h.grad[1:] == 0) and h.grad[0].abs().sum() > 0
    assert token_logprobs(h, W, torch.full((37,), IGNORE)).abs().sum() == 0


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(6, 4, dtype=torch.double, generator=g, requires_grad=True)
    W = torch.randn(11, 4, dtype=torch.double, generator=g, requires_grad=True)
    t = torch.tensor([0, 3, IGNORE, 10, 7, 1])
    # the Function computes in fp32 by design; gradcheck its maths through a float64 wrapper
    assert torch.autograd.gradcheck(lambda a, b: _TokenLogprobs.apply(a, b, t, 0.9, 4).double(), (h, W),
                                    eps=1e-3, atol=2e-3, rtol=2e-3)
    ze = torch.randn(6, 11, dtype=torch.double, generator=g)
    for kind in ("reverse", "forward", "jsd"):
        f = lambda a, b: _TokenDivergence.apply(a, b, ze, None, None, kind, 0.3, 1.0, 4).double()
        assert torch.autograd.gradcheck(f, (h, W), eps=1e-3, atol=2e-3, rtol=2e-3)


def test_extreme_logits_are_finite():
    h, W, g = inputs(scale=1.0)
    with torch.no_grad():
        W[:5] *= 1e4 / W[:5].norm(dim=1, keepdim=True).max()  # logits around +-1e4
    targets = torch.randint(0, 101, (37,), generator=g)
    out = token_logprobs(h, W, targets, block=16)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(h.grad).all() and torch.isfinite(W.grad).all()
    ref = ref_logprobs(h, W, targets)
    assert torch.allclose(out.double(), ref, rtol=1e-4, atol=5e-2)  # fp32 ulp at 1e4 is ~1e-3


@pytest.mark.parametrize("kind,beta", [("reverse", 0.5), ("forward", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9)])
@pytest.mark.parametrize("block", [13, 101])
@pytest.mark.parametrize("expert_as_hidden", [False, True])
def test_token_divergence_matches_float64(kind, beta, block, expert_as_hidden):
    h, W, g = inputs()
    he, We = torch.randn(37, 16, generator=g), torch.randn(101, 16, generator=g) * 0.5
    ze = he @ We.T
    up = torch.rand(37, generator=g)
    expert = (he, We) if expert_as_hidden else ze
    out = token_divergence(h, W, expert, kind, beta=beta, temperature=0.8, block=block)
    (out * up).sum().backward()
    gh, gW = h.grad.clone(), W.grad.clone()
    h.grad = W.grad = None
    ref = naive_divergence(h.double() @ W.double().T / 0.8, ze.double() / 0.8, kind, beta)
    (ref * up.double()).sum().backward()
    # absolute tolerances at fp32 rounding of the largest entry: KL values cancel
    assert (out.double() - ref).abs().max() < 2e-6 * ref.abs().max().clamp(min=1)
    for mine, theirs in ((gh, h.grad), (gW, W.grad)):
        assert (mine.double() - theirs.double()).abs().max() < 1e-5 * theirs.abs().max().clamp(min=1)


def test_divergence_endpoints_and_definition():
    """JSD's beta=0/1 endpoints are forward/reverse KL (GKD/TRL); reverse KL is its definition."""
    h, W, g = inputs(N=5, V=7)
    ze = torch.randn(5, 7, generator=g)
    q = torch.softmax((h @ W.T).double(), -1)
    p = torch.softmax(ze.double(), -1)
    by_hand = (q * (q.log() - p.log())).sum(-1)
    assert torch.allclose(token_divergence(h, W, ze, "reverse").double(), by_hand, atol=1e-6)
    assert torch.allclose(token_divergence(h, W, ze, "jsd", beta=1.0), token_divergence(h, W, ze, "reverse"))
    assert torch.allclose(token_divergence(h, W, ze, "jsd", beta=0.0), token_divergence(h, W, ze, "forward"))


def test_divergence_is_zero_with_zero_gradient_when_equal():
    h, W, _ = inputs()
    for kind in ("reverse", "forward", "jsd"):
        out = token_divergence(h, W, (h.detach(), W.detach()), kind, block=19)
        out.sum().backward()
        assert out.abs().max() < 1e-5 and h.grad.abs().max() < 1e-5 and W.grad.abs().max() < 1e-5
        h.grad = W.grad = None


def test_expert_minus_inf_entries_are_finite():
    """An expert that rules tokens out (-inf logits): forward KL and JSD stay finite; reverse
    KL stays finite where the student rules them out too (0 log 0 = 0)."""
    h, W, g = inputs()
    ze = torch.randn(37, 101, generator=g)
    ze[:, :10] = -float("inf")
    for kind in ("forward", "jsd"):
        h.grad = W.grad = None
        out = token_divergence(h, W, ze, kind, block=16)
        out.sum().backward()
        ref = naive_divergence((h @ W.T).double(), ze.double(), kind)
        assert torch.isfinite(out).all() and torch.isfinite(h.grad).all()
        assert torch.allclose(out.double(), ref, atol=1e-5)
    Ws = W.detach().clone()
    hs = torch.cat([h.detach(), torch.ones(37, 1)], 1).requires_grad_()
    Ws = torch.cat([Ws, torch.zeros(101, 1)], 1)
    Ws[:10, -1] = -1e4  # the student's logits for the ruled-out tokens are ~-1e4: q = 0
    out = token_divergence(hs, Ws, ze, "reverse", block=16)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(hs.grad).all()


def test_bf16_inputs_accumulate_in_fp32():
    h, W, g = inputs()
    targets = torch.randint(0, 101, (37,), generator=g)
    out = token_logprobs(h.detach().bfloat16(), W.detach().bfloat16(), targets, block=16)
    assert out.dtype == torch.float32
    ref = ref_logprobs(h.detach().bfloat16().float(), W.detach().bfloat16().float(), targets)
    assert torch.allclose(out.double(), ref, atol=0.1)  # bf16 logits, fp32 normaliser


def test_fused_equals_naive_switch_and_block_rule():
    h, W, g = inputs()
    targets = torch.randint(0, 101, (37,), generator=g)
    assert torch.allclose(token_logprobs(h, W, targets), token_logprobs(h, W, targets, fused=False), atol=1e-5)
    assert vocab_block(37, 101) == 101  # small N*V: one block
    assert vocab_block(4096, 50257, budget_bytes=64 * 2**20) == 1024


def test_tied_embedding_receives_head_gradient():
    from model import GPT, GPTConfig
    m = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=11))
    tokens = torch.randint(0, 11, (2, 5))
    valid = torch.ones(2, 5, dtype=torch.bool)
    h = m(tokens, valid).flatten(0, 1)
    token_logprobs(h, m.unembedding, tokens.flatten()).sum().backward()
    g_fused = m.wte.weight.grad.clone()
    m.zero_grad()
    torch.log_softmax(m.logits(tokens, valid), -1).gather(2, tokens[..., None]).sum().backward()
    assert torch.allclose(g_fused, m.wte.weight.grad, atol=1e-6)
    # the head's share: rows of tokens never seen in the input still get gradient
    unseen = [i for i in range(11) if i not in tokens]
    assert unseen and g_fused[unseen].abs().sum() > 0


def test_jsd_endpoints_are_a_convention_not_a_limit():
    """beta=0 and 1 give forward and reverse KL (GKD/TRL), but JSD(beta) itself tends to 0 at
    both ends, as beta*KL(p||q) and (1-beta)*KL(q||p): the jump kernels.py documents."""
    g = torch.Generator().manual_seed(0)
    zs, ze, eye = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g), torch.eye(11)
    fwd, rev = (naive_divergence(zs.double(), ze.double(), k) for k in ("forward", "reverse"))
    assert torch.allclose(token_divergence(zs, eye, ze, "jsd", beta=0.0).double(), fwd, rtol=1e-5)
    assert torch.allclose(token_divergence(zs, eye, ze, "jsd", beta=1.0).double(), rev, rtol=1e-5)
    eps = 1e-3
    assert torch.allclose(token_divergence(zs, eye, ze, "jsd", beta=eps).double() / eps, fwd, rtol=1e-2)
    assert torch.allclose(token_divergence(zs, eye, ze, "jsd", beta=1 - eps).double() / eps, rev, rtol=1e-2)


@pytest.mark.parametrize("expert_as_hidden", [False, True])
def test_bf16_gradients_match_float64(expert_as_hidden):
    """bf16 h and W: gradients in bf16, against float64 on the same bf16-rounded inputs."""
    h, W, g = inputs()
    targets = torch.randint(0, 101, (37,), generator=g)
    targets[[3, 20]] = IGNORE
    he, We = torch.randn(37, 16, generator=g), torch.randn(101, 16, generator=g) * 0.5
    up = torch.randn(37, generator=g)
    hb, Wb = h.detach().bfloat16().requires_grad_(), W.detach().bfloat16().requires_grad_()
    hd, Wd = (x.detach().double().requires_grad_() for x in (hb, Wb))
    expert = (he.bfloat16(), We.bfloat16()) if expert_as_hidden else (he @ We.T).bfloat16()
    ze = (expert[0].double() @ expert[1].double().T) if expert_as_hidden else expert.double()
    mine = token_logprobs(hb, Wb, targets, block=16) * up + token_divergence(hb, Wb, expert, block=16)
    theirs = ref_logprobs(hd, Wd, targets) * up.double() + naive_divergence(hd @ Wd.T, ze, "reverse")
    gh, gW = torch.autograd.grad(mine.sum(), (hb, Wb))
    rh, rW = torch.autograd.grad(theirs.sum(), (hd, Wd))
    assert mine.dtype == torch.float32 and gh.dtype == gW.dtype == torch.bfloat16
    assert (mine.double() - theirs).abs().max() < 5e-2 * theirs.abs().max()  # bf16 logits, fp32 softmax
    assert (gh.double() - rh).abs().max() < 3e-2 * rh.abs().max()
    assert (gW.double() - rW).abs().max() < 3e-2 * rW.abs().max()


# ----------------------------------------------------------------------------- refusing mismatched inputs
@pytest.mark.parametrize("impl", ["fused", "naive"])
def test_targets_outside_the_vocabulary_are_refused(impl):
    h, W, _ = inputs(N=3, V=22)
    for bad, row in (([3, -1, 25], 1), ([IGNORE, 7, 22], 2)):
        with pytest.raises(ValueError, match=rf"targets must be in \[0, 22\) or IGNORE \(-100\); got {bad[row]} at row {row}$"):
            token_logprobs(h, W, torch.tensor(bad), impl=impl)
    with pytest.raises(ValueError, match=r"targets must be integer ids \[N\] = \[3\]"):
        token_logprobs(h, W, torch.tensor([0, 1]), impl=impl)
    ok = torch.tensor([0, IGNORE, 21])  # both ends of the vocabulary and IGNORE pass
    ref = ref_logprobs(h, W, ok)
    assert torch.allclose(token_logprobs(h, W, ok, impl=impl).double(), ref, atol=1e-5) and ref[1] == 0


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kind", ["reverse", "forward", "jsd"])
def test_expert_of_another_shape_is_refused(fused, kind):
    h, W, g = inputs(N=5, V=22)
    cases = ((torch.randn(5, 30), "expert logits have 30 columns, the student's vocabulary has 22"),
             (torch.randn(4, 22), "expert logits have 4 rows, the student's h has 5"),
             ((torch.randn(5, 8), torch.randn(30, 8)), r"expert_W has 30 rows, the student's W \(vocabulary\) has 22"),
             ((torch.randn(6, 8), torch.randn(22, 8)), "expert_h has 6 rows, the student's h has 5"),
             ((torch.randn(5, 8), torch.randn(22, 7)), r"expert must be logits \[N, V\] or a pair"))
    for expert, message in cases:
        with pytest.raises(ValueError, match=message):
            token_divergence(h, W, expert, kind, fused=fused)
    with pytest.raises(ValueError, match=r"h and W must be \[N, d\] and \[V, d\]"):
        token_divergence(h, W[:, :3], torch.randn(5, 22), kind, fused=fused)
    # an expert narrower or wider than the student (d_e != d) is fine
    out = token_divergence(h, W, (torch.randn(5, 8), torch.randn(22, 8)), kind, fused=fused)
    assert out.shape == (5,) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- which backend runs
def fake(device="cuda", dtype=torch.float32):
    return SimpleNamespace(is_cuda=device == "cuda", dtype=dtype)


def test_backend_choice(monkeypatch):
    """CPU tensors: always the PyTorch kernels. CUDA tensors: Triton's where it has the kernel
    and takes the inputs, else naive (faster there than the PyTorch kernels)."""
    monkeypatch.setattr(kernels, "kernels_triton", object())  # Triton imported
    assert backend(fake(), fake()) == "triton"
    assert backend(fake(dtype=torch.bfloat16), fake(dtype=torch.bfloat16)) == "triton"
    assert backend(fake(), fake(), triton=False) == "naive"  # forward KL, JSD: no Triton kernel
    assert backend(fake(), fake(), fused=False) == "naive"
    assert backend(fake("cpu"), fake("cpu")) == "fused"
    assert backend(fake("cpu"), fake("cpu"), triton=False) == "fused"
    assert backend(fake(), fake("cpu")) == "naive"  # the Triton kernel would refuse them
    assert backend(fake(dtype=torch.float64), fake(dtype=torch.float64)) == "naive"
    assert backend(fake(dtype=torch.bfloat16), fake()) == "naive"
    monkeypatch.setattr(kernels, "kernels_triton", None)  # Triton missing: CUDA gets naive, the CPU fused
    assert backend(fake(), fake()) == "naive" and backend(fake(), fake(), triton=False) == "naive"
    assert backend(fake(dtype=torch.bfloat16), fake(dtype=torch.bfloat16)) == "naive"
    assert backend(fake("cpu"), fake("cpu")) == "fused" and backend(fake("cpu"), fake("cpu"), fused=False) == "naive"


def test_dispatch_calls_the_chosen_kernel(monkeypatch):
    """token_logprobs and reverse KL hand over to kernels_triton where backend() says triton
    (faked here: no GPU), after kernels.py's own checks; forward KL never does."""
    calls = []
    stub = SimpleNamespace(token_logprobs_triton=lambda *a, **k: calls.append(("logprobs", a, k)) or "lp",
                           token_reverse_kl_triton=lambda *a, **k: calls.append(("reverse", a, k)) or "kl")
    monkeypatch.setattr(kernels, "kernels_triton", stub)
    h, W, g = inputs(N=4, V=22)
    t, ze = torch.tensor([1, IGNORE, 0, 21]), torch.randn(4, 22, generator=g)
    assert token_logprobs(h, W, t).shape == (4,) and token_divergence(h, W, ze).shape == (4,) and not calls  # CPU
    # as on CUDA with Triton: its kernel where it has one, else naive
    monkeypatch.setattr(kernels, "backend", lambda h, W, fused=True, triton=True: "triton" if fused and triton
                        else "naive")
    assert token_logprobs(h, W, t, temperature=0.5) == "lp"
    assert calls[-1] == ("logprobs", (h, W, t, 0.5), dict(check_targets=False))  # checked once, here
    assert token_divergence(h, W, ze, "jsd", beta=1.0, temperature=0.5) == "kl"  # JSD(1) is reverse KL
    assert calls[-1] == ("reverse", (h, W, ze, 0.5), {})
    assert torch.allclose(token_divergence(h, W, ze, "forward"), token_divergence(h, W, ze, "forward", impl="fused"))
    assert torch.allclose(token_logprobs(h, W, t, fused=False), ref_logprobs(h, W, t).float(), atol=1e-5)
    assert len(calls) == 2
    with pytest.raises(ValueError, match="targets must be in"):  # before any backend
        token_logprobs(h, W, torch.tensor([1, 2, 3, 22]))
    with pytest.raises(ValueError, match="covers log-probs and reverse KL only"):
        token_divergence(h, W, ze, "forward", impl="triton")
    monkeypatch.setattr(kernels, "kernels_triton", None)
    with pytest.raises(ValueError, match="needs Triton installed"):
        token_logprobs(h, W, t, impl="triton")
