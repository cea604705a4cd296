"""Fused token log-prob and divergence kernels: PyTorch autograd.Functions, Triton's on CUDA.

Both imitation losses spend their memory at one place: turning final hidden states h [N, d]
into per-token quantities through the unembedding W [V, d]. The naive way materialises the
logits [N, V], their log-softmax and their gradients: at N=4096 and V=50257 in fp32 that is
~0.8 GB per copy. These kernels never hold more than an [N, block] slab of the vocabulary:

  forward:  one pass over vocabulary blocks, keeping a running max and sum per row
            (online logsumexp), plus whatever running sums the quantity needs;
  backward: recompute each block's logits, form its logit gradient, then
            grad_h += G_blk @ W_blk  (small [N, d], accumulated)
            grad_W[blk] = G_blk^T @ h  (written once per block).

Chunking over the vocabulary rather than over rows (as Cut Cross-Entropy does) writes each
slice of grad_W once, so the cost stays at ~4 GEMMs (naive: 3). Softmax/logsumexp arithmetic
is fp32 even when h and W are bf16; the GEMMs run in the input dtype.

Which implementation runs (backend()): fused=False is the naive reference (log_softmax over the
full logits), for reading and for tests. fused=True runs the PyTorch kernels below on the CPU;
on CUDA, kernels_triton's kernels for log-probs and reverse KL where Triton is installed, else
naive (there the PyTorch kernels' blocked passes, forward KL's and JSD's included, are slower).
impl= forces one. There is no loss-level kernel (one forming grad_h and grad_W in the forward,
as Liger's fused linear cross-entropy does): it would hide the loss from a reader of sft.py and
distill.py, who sees it written per token there. Costs against naive: RESULTS.md, "Fused
kernels on the CPU" and "Fused kernels on the GPU"; tests/test_cuda.py checks the CUDA paths.
"""
import math

import torch
import torch.nn.functional as F

try:
    import kernels_triton
except ImportError:  # no Triton (the CPU build of torch): backend() never picks it
    kernels_triton = None

IGNORE = -100  # target id of rows that take no part (padding, prompt tokens)
DIVERGENCES = ("reverse", "forward", "jsd", "mixed")  # token_divergence's kinds (--divergence)
TOP_K_REST = ("ignore", "bucket", "renormalize")  # what a top-k expert does with the mass outside its top k
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what kernels_triton takes


def backend(h, W, fused=True, triton=True):
    """The implementation a call runs: "naive" when fused=False; on the CPU "fused", the PyTorch
    kernels here; on CUDA "triton" where kernels_triton imported, h and W share a dtype it takes
    and it has the kernel (triton=False: forward KL and JSD), else "naive"."""
    if not fused:
        return "naive"
    if not (h.is_cuda or W.is_cuda):
        return "fused"
    if triton and kernels_triton is not None and h.is_cuda and W.is_cuda and h.dtype == W.dtype \
            and h.dtype in TRITON_DTYPES:
        return "triton"
    return "naive"  # H100: fused log-probs and KL took 3.2-6.4x naive's time (RESULTS.md, "Fused kernels on the GPU")


def _choose(impl, h, W, fused, triton=True):
    """backend()'s choice, or impl ("naive", "fused", "triton") where the caller forces one."""
    if impl is None:
        return backend(h, W, fused, triton)
    if impl not in ("naive", "fused", "triton"):
        raise ValueError(f"unknown impl {impl!r}; choose naive, fused or triton")
    if impl == "triton" and (kernels_triton is None or not triton):
        raise ValueError("impl='triton' needs Triton installed, and covers log-probs and reverse KL only")
    return impl


def _check_hw(h, W):
    if h.dim() != 2 or W.dim() != 2 or h.shape[1] != W.shape[1]:
        raise ValueError(f"h and W must be [N, d] and [V, d]; got {tuple(h.shape)} and {tuple(W.shape)}")


def _check_targets(targets, h, W):
    """Targets are vocabulary ids or IGNORE: one min/max over the others (on a GPU: one sync)."""
    if targets.shape != h.shape[:1] or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer ids [N] = [{h.shape[0]}]; got {targets.dtype} {tuple(targets.shape)}")
    V, t = W.shape[0], torch.where(targets == IGNORE, 0, targets)
    if t.numel() == 0:
        return
    lo, hi = torch.aminmax(t)
    if bool((lo < 0) | (hi >= V)):
        row = int(((t < 0) | (t >= V)).nonzero()[0, 0])
        raise ValueError(f"targets must be in [0, {V}) or IGNORE ({IGNORE}); got {int(targets[row])} at row {row}")


def _check_expert(h, W, expert):
    """The expert's logits [N, V], or (expert_h [N, d_e], expert_W [V, d_e]), against h [N, d], W [V, d]."""
    N, V = h.shape[0], W.shape[0]
    if torch.is_tensor(expert):
        if expert.dim() != 2:
            raise ValueError(f"expert logits must be [N, V]; got {tuple(expert.shape)}")
        if expert.shape[1] != V:
            raise ValueError(f"expert logits have {expert.shape[1]} columns, the student's vocabulary has {V}")
        if expert.shape[0] != N:
            raise ValueError(f"expert logits have {expert.shape[0]} rows, the student's h has {N}")
        return
    if len(expert) != 2 or not all(torch.is_tensor(x) and x.dim() == 2 for x in expert) or \
            expert[0].shape[1] != expert[1].shape[1]:
        raise ValueError("expert must be logits [N, V] or a pair (expert_h [N, d_e], expert_W [V, d_e])")
    if expert[1].shape[0] != V:
        raise ValueError(f"expert_W has {expert[1].shape[0]} rows, the student's W (vocabulary) has {V}")
    if expert[0].shape[0] != N:
        raise ValueError(f"expert_h has {expert[0].shape[0]} rows, the student's h has {N}")


VOCAB_BLOCK_BUDGET = 32 * 2**20  # bytes; research/bench.py --block-mb changes it (wider blocks: fewer, larger GEMMs)


def vocab_block(n_rows, vocab, budget_bytes=None):
    """Vocabulary block size such that the ~4 fp32 [N, block] working buffers fit the
    budget; a single block when everything fits (the project's tasks have V ~ 22)."""
    block = (VOCAB_BLOCK_BUDGET if budget_bytes is None else budget_bytes) // (16 * max(1, n_rows))
    return int(min(vocab, max(1, block)))


def _logits(h, W, v0, v1, temperature):
    """Logits of vocabulary slice [v0, v1), scaled, in fp32: a fresh [N, block] tensor that
    callers may overwrite in place (the kernels keep at most two such buffers alive)."""
    z = (h @ W[v0:v1].T).float()
    return z.div_(temperature) if temperature != 1 else z


# ----------------------------------------------------------------------------- log-probs
class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, W, targets, temperature, block):
        N, V = h.shape[0], W.shape[0]
        valid = targets != IGNORE
        tgt = torch.where(valid, targets, 0)
        m = torch.full((N,), -math.inf, device=h.device)  # running max
        s = torch.zeros(N, device=h.device)  # running sum of exp(z - m)
        z_tgt = torch.zeros(N, device=h.device)
        for v0 in range(0, V, block):
            z = _logits(h, W, v0, min(V, v0 + block), temperature)
            # read the target logit from the same GEMM output the normaliser sees
            here = (tgt >= v0) & (tgt < v0 + z.shape[1])
            col = (tgt - v0).clamp(0, z.shape[1] - 1)[:, None]
            z_tgt = torch.where(here, z.gather(1, col).squeeze(1), z_tgt)
            m_new = torch.maximum(m, z.max(1).values)
            s = s * torch.exp(m - m_new) + z.sub_(m_new[:, None]).exp_().sum(1)
            m = m_new
        lse = m + torch.log(s)
        ctx.save_for_backward(h, W, tgt, valid, lse)
        ctx.temperature, ctx.block = temperature, block
        return torch.where(valid, z_tgt - lse, 0.0)

    @staticmethod
    def backward(ctx, grad_out):
        h, W, tgt, valid, lse = ctx.saved_tensors
        T, block, V = ctx.temperature, ctx.block, W.shape[0]
        g = torch.where(valid, grad_out.float(), 0.0)  # ignored rows: exactly zero gradient
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32  # accumulate in fp32+
        grad_h = torch.zeros(h.shape, device=h.device, dtype=acc) if ctx.needs_input_grad[0] else None
        grad_W = torch.zeros(W.shape, device=W.device, dtype=acc) if ctx.needs_input_grad[1] else None
        for v0 in range(0, V, block):
            v1 = min(V, v0 + block)
            p = _logits(h, W, v0, v1, T).sub_(lse[:, None]).exp_()
            # d log p(t) / dz = onehot(t) - p, times the upstream gradient, through 1/T, in p's buffer
            G = p.mul_(-g[:, None])
            here = (tgt >= v0) & (tgt < v1)
            G.scatter_add_(1, (tgt - v0).clamp(0, v1 - v0 - 1)[:, None], (g * here)[:, None])
            G = (G.div_(T) if T != 1 else G).to(h.dtype)
            if G.dtype == acc:  # in place: no [N, d] or [block, d] temporaries
                if grad_h is not None:
                    grad_h.addmm_(G, W[v0:v1])
                if grad_W is not None:
                    torch.mm(G.T, h, out=grad_W[v0:v1])
            else:  # bf16 GEMMs, fp32 accumulation
                if grad_h is not None:
                    grad_h += G @ W[v0:v1]
                if grad_W is not None:
                    grad_W[v0:v1] = G.T @ h
        return (None if grad_h is None else grad_h.to(h.dtype),
                None if grad_W is None else grad_W.to(W.dtype), None, None, None)


def token_logprobs(h, W, targets, temperature=1.0, fused=True, block=None, impl=None):
    """log p(targets[i] | h[i]) [N] fp32 under softmax(h W^T / T); rows with target IGNORE give 0.
    Runs backend(h, W, fused) unless impl names one; block: the PyTorch kernel's vocabulary block."""
    _check_hw(h, W)
    _check_targets(targets, h, W)
    impl = _choose(impl, h, W, fused)
    if impl == "triton":
        return kernels_triton.token_logprobs_triton(h, W, targets, temperature, check_targets=False)
    if impl == "naive":
        logp = F.log_softmax((h @ W.T).float() / temperature, dim=-1)
        valid = targets != IGNORE
        out = logp.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)
        return torch.where(valid, out, 0.0)
    block = block or vocab_block(h.shape[0], W.shape[0])
    return _TokenLogprobs.apply(h, W, targets, temperature, block)


# ----------------------------------------------------------------------------- divergences
def _xlogy_diff(a, log_a, log_b):
    """a * (log_a - log_b) with the convention 0 * anything = 0 (so -inf logits are fine)."""
    return torch.where(a > 0, a * (log_a - log_b), 0.0)


def _expert_logits(expert, v0, v1, temperature):
    """The expert's logits of vocabulary slice [v0, v1), fp32, no grad. expert is
    (logits [N, V], None, None) or (None, expert_h, expert_W)."""
    logits, eh, eW = expert
    if logits is not None:
        return logits[:, v0:v1].float() / temperature
    with torch.no_grad():
        return _logits(eh, eW, v0, v1, temperature)


def _divergence_pass(h, W, expert, kind, beta, temperature, block):
    """The divergence's forward over vocabulary blocks: per row, both normalisers lse_s and
    lse_e, the divergence div, and c = <q, dD/dq> (used by the JSD gradient; else zero)."""
    N, V = h.shape[0], W.shape[0]
    # pass 1: both normalisers by online logsumexp. For reverse/forward KL the same pass
    # also keeps the running sum A = sum_j exp(z_j - m) (z_j - z'_j) of the distribution
    # being averaged over, rescaled whenever its max moves, because
    #   KL(q||p) = sum_j q_j (zs_j - ze_j) - lse_s + lse_e = A_s / S_s - lse_s + lse_e
    # so these two kinds need a single GEMM per block in the forward.
    ms = torch.full((N,), -math.inf, device=h.device); ss = torch.zeros(N, device=h.device)
    me = torch.full((N,), -math.inf, device=h.device); se = torch.zeros(N, device=h.device)
    acc = torch.zeros(N, device=h.device)
    for v0 in range(0, V, block):
        v1 = min(V, v0 + block)
        zs, ze = _logits(h, W, v0, v1, temperature), _expert_logits(expert, v0, v1, temperature)
        ms_new = torch.maximum(ms, zs.max(1).values)
        me_new = torch.maximum(me, ze.max(1).values)
        me_safe = torch.where(torch.isfinite(me_new), me_new, 0.0)  # a block of all -inf
        es, ee = torch.exp(zs - ms_new[:, None]), torch.exp(ze - me_safe[:, None])
        if kind == "reverse":
            acc = acc * torch.exp(ms - ms_new) + torch.where(es > 0, es * (zs - ze), 0.0).sum(1)
        elif kind == "forward":
            acc = acc * torch.exp(me - me_safe) + torch.where(ee > 0, ee * (ze - zs), 0.0).sum(1)
        ss = ss * torch.exp(ms - ms_new) + es.sum(1)
        se = se * torch.exp(me - me_safe) + ee.sum(1)
        ms, me = ms_new, me_new
    lse_s, lse_e = ms + torch.log(ss), me + torch.log(se)
    c = torch.zeros(N, device=h.device)  # <q, dD/dq>, for the JSD backward
    if kind == "reverse":
        div = acc / ss - lse_s + lse_e
    elif kind == "forward":
        div = acc / se - lse_e + lse_s
    else:  # pass 2 (JSD): the mixture needs both normalised distributions first
        div = torch.zeros(N, device=h.device)
        for v0 in range(0, V, block):
            v1 = min(V, v0 + block)
            logq = _logits(h, W, v0, v1, temperature) - lse_s[:, None]
            logp = _expert_logits(expert, v0, v1, temperature) - lse_e[:, None]
            logm = torch.logaddexp(logp + math.log(beta), logq + math.log(1 - beta))
            kl_qm = _xlogy_diff(logq.exp(), logq, logm).sum(1)
            div += beta * _xlogy_diff(logp.exp(), logp, logm).sum(1) + (1 - beta) * kl_qm
            c += (1 - beta) * kl_qm
    return lse_s, lse_e, div, c


def _divergence_grad(logq, logp, div, c, kind, beta):
    """dD/dz_k of one block of logits (before the 1/T): q_k (a_k - <q, a>) with a = dD/dq."""
    q = logq.exp()
    if kind == "reverse":  # a = log q - log p (+1, which cancels)
        return torch.where(q > 0, q * (logq - logp - div[:, None]), 0.0)
    if kind == "forward":  # a = -p/q
        return q - logp.exp()
    # jsd: a = (1-beta) (log q - log m)
    logm = torch.logaddexp(logp + math.log(beta), logq + math.log(1 - beta))
    return q * ((1 - beta) * (logq - logm) - c[:, None])


class _TokenDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, W, expert_logits, expert_h, expert_W, kind, beta, temperature, block):
        expert = (expert_logits, expert_h, expert_W)
        lse_s, lse_e, div, c = _divergence_pass(h, W, expert, kind, beta, temperature, block)
        ctx.save_for_backward(h, W, expert_logits, expert_h, expert_W, lse_s, lse_e, div, c)
        ctx.kind, ctx.beta, ctx.temperature, ctx.block = kind, beta, temperature, block
        return div

    @staticmethod
    def backward(ctx, grad_out):
        h, W, expert_logits, expert_h, expert_W, lse_s, lse_e, div, c = ctx.saved_tensors
        kind, beta, T, block, V = ctx.kind, ctx.beta, ctx.temperature, ctx.block, W.shape[0]
        g = grad_out.float()
        grad_h = torch.zeros(h.shape, device=h.device) if ctx.needs_input_grad[0] else None
        grad_W = torch.zeros(W.shape, device=W.device) if ctx.needs_input_grad[1] else None
        for v0 in range(0, V, block):
            v1 = min(V, v0 + block)
            logq = _logits(h, W, v0, v1, T) - lse_s[:, None]
            logp = _expert_logits((expert_logits, expert_h, expert_W), v0, v1, T) - lse_e[:, None]
            G = (g[:, None] * _divergence_grad(logq, logp, div, c, kind, beta) / T).to(h.dtype)
            if grad_h is not None:
                grad_h += G @ W[v0:v1]
            if grad_W is not None:
                grad_W[v0:v1] = G.T @ h
        return (None if grad_h is None else grad_h.to(h.dtype),
                None if grad_W is None else grad_W.to(W.dtype)) + (None,) * 7


def naive_divergence(zs, ze, kind, beta=0.5):
    """Reference from full logits [N, V]: the definitions, written with log_softmax."""
    logq, logp = F.log_softmax(zs, -1), F.log_softmax(ze, -1)
    q, p = logq.exp(), logp.exp()
    if kind == "reverse":
        return _xlogy_diff(q, logq, logp).sum(-1)
    if kind == "forward":
        return _xlogy_diff(p, logp, logq).sum(-1)
    if kind != "jsd":  # "mixed" is token_divergence's mean of the two above
        raise ValueError(f"naive_divergence takes reverse, forward or jsd; got {kind!r}")
    logm = torch.logaddexp(logp + math.log(beta), logq + math.log(1 - beta))
    return beta * _xlogy_diff(p, logp, logm).sum(-1) + (1 - beta) * _xlogy_diff(q, logq, logm).sum(-1)


def _divergence_kind(kind, beta):
    """Check the divergence's name and beta; JSD's beta=0 and 1 are the KLs (token_divergence)."""
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; choose one of {', '.join(DIVERGENCES)}")
    if kind == "jsd" and not 0 <= beta <= 1:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    if kind == "jsd" and beta in (0, 1):
        kind = "forward" if beta == 0 else "reverse"
    return kind


def token_divergence(h, W, expert, kind="reverse", beta=0.5, temperature=1.0, fused=True, block=None,
                     impl=None):
    """Per-row divergence [N] fp32 between the student q = softmax(h W^T / T) and the expert's p:
      "reverse": KL(q || p), mode-seeking: online IL's objective
      "forward": KL(p || q), mode-covering: what SFT minimises
      "jsd":     generalised JSD(beta), GKD/TRL's: beta KL(p || m) + (1-beta) KL(q || m) with
                 m = beta p + (1-beta) q; beta=0 is forward KL and beta=1 reverse KL by that
                 convention, a jump: JSD(beta) itself tends to 0 at both ends.
      "mixed":   (forward + reverse) / 2, NeMo-RL's kl_type "mixed" (no mixture distribution)
    expert: expert logits [N, V], or (expert_h, expert_W) evaluated block by block, no grad.
    Runs backend(h, W, fused, kind == "reverse") unless impl names one."""
    if kind == "mixed":
        return 0.5 * sum(token_divergence(h, W, expert, k, beta, temperature, fused, block, impl)
                         for k in ("forward", "reverse"))
    kind = _divergence_kind(kind, beta)
    _check_hw(h, W)
    _check_expert(h, W, expert)
    impl = _choose(impl, h, W, fused, triton=kind == "reverse")
    if impl == "triton":
        return kernels_triton.token_reverse_kl_triton(h, W, expert, temperature)
    if impl == "naive":
        ze = expert if torch.is_tensor(expert) else (expert[0] @ expert[1].T).detach()
        return naive_divergence((h @ W.T).float() / temperature, ze.float() / temperature, kind, beta)
    block = block or vocab_block(h.shape[0], W.shape[0])
    args = (expert.detach(), None, None) if torch.is_tensor(expert) else (None, *(x.detach() for x in expert))
    return _TokenDivergence.apply(h, W, *args, kind, beta, temperature, block)


def topk_divergence(h, W, expert, kind="reverse", k=4, rest="ignore", temperature=1.0):
    """Per-row divergence [N] between the student q and the expert p as a served teacher gives p
    (vLLM's logprobs): its k most likely tokens' log-probs alone. q is read at the same k ids.
    rest, the mass outside them:
      "ignore":      the sums run over the k ids, unnormalised (verl's forward_kl_topk,
                     verl/trainer/distillation/losses.py, which floors its forward KL at 0, as
                     here). The reverse sum has no floor: it is least at q = p/e on the k ids, so
                     it pays the student to move mass off them (the instability verl met);
      "bucket":      one more outcome, 1 - sum over the k ids, for each (verl PR #7855, open; TRL's
                     server distillation, _add_tail_bucket): an exact KL of two k+1-way distributions;
      "renormalize": both renormalised over the k ids (NeMo-RL's DistillationLossFn, ms-swift's
                     gkd_logits_topk): the student's mass outside them is free.
    kind: reverse, forward or mixed (their mean); expert: logits [N, V] or (expert_h, expert_W),
    no grad. Naive, whatever --fused says: a top-k needs the whole row of logits [N, V], and the
    vocabularies here are small."""
    if kind not in ("reverse", "forward", "mixed") or rest not in TOP_K_REST:
        raise ValueError(f"a top-k divergence is reverse, forward or mixed, its rest one of {TOP_K_REST}; got "
                         f"{kind!r}, {rest!r}")
    _check_hw(h, W)
    _check_expert(h, W, expert)
    if not 0 < k < W.shape[0]:
        raise ValueError(f"top k must be in 1..{W.shape[0] - 1} (the vocabulary has {W.shape[0]} tokens), got {k}")
    ze = expert if torch.is_tensor(expert) else expert[0] @ expert[1].T
    logp, ids = F.log_softmax(ze.detach().float() / temperature, -1).topk(k, -1)
    logq = F.log_softmax((h @ W.T).float() / temperature, -1).gather(-1, ids)
    if rest == "renormalize":
        logp, logq = logp - logp.logsumexp(-1, keepdim=True), logq - logq.logsumexp(-1, keepdim=True)
    elif rest == "bucket":  # log(1 - sum): kept below 1 so the log stays finite, as TRL's clamp does
        tail = lambda lp: torch.log(-torch.expm1(lp.logsumexp(-1, keepdim=True).clamp(max=-1e-7)))
        logp, logq = torch.cat([logp, tail(logp)], -1), torch.cat([logq, tail(logq)], -1)
    p, q = logp.exp(), logq.exp()
    fwd, rev = (p * (logp - logq)).sum(-1), (q * (logq - logp)).sum(-1)
    if rest == "ignore":
        fwd = fwd.clamp_min(0)
    return dict(forward=fwd, reverse=rev, mixed=0.5 * (fwd + rev))[kind]
