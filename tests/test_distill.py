"""Online IL's maths: the two-part gradient is the exact gradient of the sequence-level KL."""
import contextlib

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import distill
from config import parse_args
from data import MirrorTask, Tokenizer, encode_prompts, encode_responses
from distill import advantages, returns_to_go, rollouts
from model import make_model

tok = Tokenizer()


def tiny(seed):
    return make_model("tiny", 16, tok.vocab_size, seed=seed)


def all_responses(L):
    """Every response of at most L tokens that the sampler can produce: stop at the end
    token, or after L tokens. With V=22 and L=2 that is 1 + 21*22 = 463 sequences."""
    V = tok.vocab_size
    rows = [[tok.end]]
    for a in range(V):
        if a != tok.end:
            rows += [[a, b] for b in range(V)]
    resp = torch.full((len(rows), L), tok.pad)
    mask = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, r in enumerate(rows):
        resp[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = True
    return resp, mask


def stub_run(model):
    """What the losses read of a Run: the model, autocast, one process."""
    return SimpleNamespace(model=model, autocast=contextlib.nullcontext, world=1, global_sum=lambda x: x)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("T", [1.0, 0.7])
@pytest.mark.parametrize("estimator", ["full", "sampled"])
def test_online_loss_is_the_exact_sequence_kl_gradient_at_any_temperature(estimator, T, fused):
    """The two-part gradient (D_t at fixed prefixes + REINFORCE on the returns-to-go) is the
    exact gradient of the sequence-level KL. Weighting every response y by its probability
    q_T(y), the expected gradient of the loss must equal the gradient of KL(q_T(y|x) || p_T(y|x))
    = sum_y q_T(y) (log q_T(y) - log p_T(y)), enumerated from plain log_softmax(logits / T)
    (independent of kernels.py), to 1e-4. At T != 1 this also checks that every score is taken
    at T: rollouts come from softmax(z / T), or the REINFORCE term would be off-policy."""
    student, expert = tiny(0), tiny(1)
    resp, mask = all_responses(2)
    prompt, pvalid = encode_prompts(tok, ["31415="] * len(resp))
    P = prompt.shape[1]

    def seq_logprob(model):  # log pi_T(y|x) from full logits, independent of kernels.py
        z = model.logits(torch.cat([prompt, resp], 1), torch.cat([pvalid, mask], 1))[:, P - 1:-1]
        lp = torch.log_softmax(z.double() / T, -1).gather(2, resp[..., None]).squeeze(2)
        return (lp * mask).sum(1)

    log_q, log_p = seq_logprob(student), seq_logprob(expert).detach()
    assert abs(log_q.exp().sum().item() - 1) < 1e-9  # every response, at temperature T
    exact_kl = (log_q.exp() * (log_q - log_p)).sum()
    exact = torch.autograd.grad(exact_kl, list(student.parameters()))

    batch = dict(prompt=prompt, prompt_valid=pvalid, response=resp, response_mask=mask,
                 on_policy=torch.ones(len(resp), dtype=torch.bool))
    cfg = parse_args(["--temperature", str(T), "--estimator", estimator, "--no-baseline", "--no-normalize-adv",
                      "--fused" if fused else "--no-fused"])  # a weighted enumeration, not a batch: no baseline
    loss = distill.sampled_token_loss if estimator == "sampled" else distill.online_loss
    per_token, D = loss(stub_run(student), expert, batch, cfg)
    weights = log_q.exp().detach().float()
    assert torch.allclose((weights * D.sum(1)).sum().double(), exact_kl.detach(), rtol=1e-4)
    estimate = torch.autograd.grad((weights * per_token.sum(1)).sum(), list(student.parameters()))
    for a, b in zip(estimate, exact):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7), (a - b).abs().max()


def test_returns_to_go_by_hand():
    cost = torch.tensor([[1.0, 2.0, 4.0, 8.0]])
    mask = torch.tensor([[True, True, True, False]])
    assert returns_to_go(cost, mask, 1.0, include_current=False).tolist() == [[6.0, 4.0, 0.0, 0.0]]
    assert returns_to_go(cost, mask, 0.5, include_current=False).tolist() == [[2.0, 2.0, 0.0, 0.0]]
    assert returns_to_go(cost, mask, 0.0, include_current=True).tolist() == [[1.0, 2.0, 4.0, 0.0]]
    adv = advantages(torch.tensor([[1.0, 3.0], [3.0, 5.0]]), torch.ones(2, 2, dtype=torch.bool), normalize=False)
    assert adv.tolist() == [[-2.0, -2.0], [2.0, 2.0]]  # leave-one-out: each row against the other one


def test_baseline_leaves_the_row_out_and_normalising_never_amplifies():
    returns = torch.tensor([[1.0, 4.0], [2.0, 0.0], [6.0, 0.0]])
    mask = torch.tensor([[True, True], [True, True], [True, False]])
    adv = advantages(returns, mask, normalize=False)
    # position 0: mean of the two others; position 1: only two rows are real, so the other one
    assert adv[:, 0].tolist() == [1 - 4, 2 - 3.5, 6 - 1.5] and adv[:, 1].tolist() == [4.0, -4.0, 0.0]
    alone = advantages(torch.tensor([[5.0]]), torch.ones(1, 1, dtype=torch.bool), normalize=False)
    assert alone.tolist() == [[5.0]]  # a row alone at its position keeps its return
    # returns nearly constant: the std is tiny, and dividing by it would make noise unit-sized
    tiny = 1.0 + 1e-4 * torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    adv = advantages(tiny, torch.ones(64, 3, dtype=torch.bool))
    assert adv.abs().max() < 1e-3
    big = advantages(10 * torch.randn(64, 3, generator=torch.Generator().manual_seed(1)), torch.ones(64, 3, dtype=torch.bool))
    assert abs(big.std().item() - 1) < 0.05  # large returns are still normalised to unit scale


def online_batch(resp, mask=None):
    prompt, pvalid = encode_prompts(tok, ["1,2;3=", "12345="])
    return dict(prompt=prompt, prompt_valid=pvalid, response=resp, response_mask=resp != tok.pad if mask is None else mask,
                on_policy=torch.ones(2, dtype=torch.bool))


CFG = parse_args([])  # the defaults: gamma 1, reverse KL, baseline and normalisation on


def test_gamma_zero_is_per_token_objective():
    """gamma=0: no score-function term, the gradient is that of sum_t D_t at fixed prefixes."""
    student, expert = tiny(0), tiny(1)
    per_token, D = distill.online_loss(stub_run(student), expert, online_batch(torch.tensor([[3, 6, tok.end], [4, 5, 7]])),
                                       replace(CFG, gamma=0.0))
    per_token_only = torch.autograd.grad(D.sum(), list(student.parameters()), retain_graph=True)
    for a, b in zip(torch.autograd.grad(per_token.sum(), list(student.parameters())), per_token_only):
        assert torch.equal(a, b)
    per_token, D = distill.online_loss(stub_run(student), expert, online_batch(torch.tensor([[3, 6, tok.end], [4, 5, 7]])),
                                       CFG)  # and gamma=1 adds the REINFORCE term
    assert (per_token - D).abs().max() > 0


def test_prompt_and_padding_get_no_gradient():
    """Gradients reach parameters only through real response positions: the token written at a
    padded position changes neither the loss nor its gradient; a real one does."""
    student, expert = tiny(0), tiny(1)

    mask = torch.tensor([[True, True, False], [True, True, True]])

    def grads(resp):
        per_token, _ = distill.online_loss(stub_run(student), expert, online_batch(torch.tensor(resp), mask), CFG)
        return [per_token.sum().detach()] + list(torch.autograd.grad(per_token.sum(), list(student.parameters())))

    base = grads([[3, tok.end, tok.pad], [4, 5, tok.end]])
    padded = grads([[3, tok.end, 9], [4, 5, tok.end]])  # another token where the mask is off
    assert all(torch.equal(a, b) for a, b in zip(base, padded))
    other = grads([[3, tok.end, tok.pad], [4, 6, tok.end]])  # a real token changed
    assert any(not torch.equal(a, b) for a, b in zip(base, other))


class Writes:
    """A stand-in policy that always answers `text` (then the end token), cut at max_new_tokens."""

    def __init__(self, text):
        self.text = text

    def generate(self, prompt, prompt_valid, max_new_tokens, end_token, pad_token, temperature=1.0, generator=None):
        resp, mask = encode_responses(tok, [self.text] * len(prompt))
        return resp[:, :max_new_tokens], mask[:, :max_new_tokens]


def test_mix_keeps_the_expert_rows_whole_when_the_students_stop_early():
    """--mix: the expert's rows keep their own length, digits and end token, even when every
    student rollout stops at once."""
    task = MirrorTask(digits=5)
    batch = rollouts(Writes(""), Writes("31415"), ["31415="] * 4, tok, task, parse_args(["--mix", "0.5"]),
                     None, "cpu")
    assert batch["on_policy"].tolist() == [False, False, True, True]
    resp, mask = batch["response"], batch["response_mask"]
    assert mask.sum(1).tolist() == [6, 6, 1, 1]  # 5 digits + end; the students' end alone
    assert resp[0].tolist() == tok.encode("31415") + [tok.end] and resp[2, 0] == tok.end
    assert (resp[2:, 1:] == tok.pad).all()


@pytest.mark.parametrize("estimator", ["full", "sampled"])
def test_no_fused_reaches_every_score(estimator, monkeypatch):
    """--no-fused: every log-prob and divergence is the naive log_softmax reference, the sampled
    estimator's expert log-probs included."""
    import kernels

    def refuse(*a, **k):
        raise AssertionError("a fused kernel ran under --no-fused")

    monkeypatch.setattr(kernels._TokenLogprobs, "apply", refuse)
    monkeypatch.setattr(kernels._TokenDivergence, "apply", refuse)
    student, expert = tiny(0), tiny(1)
    loss = distill.sampled_token_loss if estimator == "sampled" else distill.online_loss
    per_token, D = loss(stub_run(student), expert, online_batch(torch.tensor([[3, 6, tok.end], [4, 5, 7]])),
                        replace(CFG, fused=False))
    assert torch.isfinite(per_token).all() and (D >= 0).all()
