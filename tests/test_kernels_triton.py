"""kernels_triton's token_logprobs_triton and token_reverse_kl_triton against float64
log_softmax, values and gradients.

With a GPU the kernels are compiled and run in fp32, fp16 and bf16. Without one they run under
Triton's interpreter on the CPU, in fp32 and fp16 (the interpreter's bf16 tl.dot returns
garbage even for a plain 16x16 product, so bf16 is checked on the GPU only), each case in a
fresh process: the interpreter must be chosen before triton.language is first imported.
Skipped where Triton is not installed (the CPU build of torch does not bring it)."""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
import kernels  # noqa: E402
import kernels_triton  # noqa: E402
from kernels import IGNORE  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = ["float32", "float16", *(["bfloat16"] if CUDA else [])]
TOL = {"float32": dict(rtol=1e-4, atol=1e-4), "float16": dict(rtol=1e-2, atol=1e-2),
       "bfloat16": dict(rtol=5e-2, atol=5e-2)}
HERE = os.path.dirname(os.path.abspath(__file__))


def check(dtype, N, D, V, temperature, chunk_cols=None, grad_h=True, grad_W=True, scale=1.0, strided=False,
          edge_targets=False, seed=0):
    """scale: logits scaled up (exp overflows without the max subtraction); strided: h and W
    given as non-contiguous views; edge_targets: targets on the first and last column of tiles."""
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(seed)
    h, W = torch.randn(N, D, generator=g) * scale, torch.randn(V, D, generator=g) / 4
    targets = torch.randint(0, V, (N,), generator=g)
    if edge_targets:
        BV = kernels_triton._config(dt)[0]["BV"]
        edges = torch.tensor([0, BV - 1, BV, 2 * BV - 1, V - 1])
        targets[1:6 * len(edges):6] = edges  # rows clear of the IGNORE rows below
    targets[::5] = IGNORE
    up = torch.randn(N, generator=g)
    if strided:  # every other column of a wider h; W as the transpose of a [d, V] tensor
        mh = torch.zeros(N, 2 * D, device=DEVICE, dtype=dt)
        mh[:, ::2] = h.to(DEVICE, dt)
        mh = mh[:, ::2].requires_grad_(grad_h)
        mW = W.to(DEVICE, dt).T.contiguous().T.requires_grad_(grad_W)
        assert not mh.is_contiguous() and not mW.is_contiguous()
    else:
        mh = h.to(DEVICE, dt).clone().requires_grad_(grad_h)
        mW = W.to(DEVICE, dt).clone().requires_grad_(grad_W)
    saved = kernels_triton.CHUNK_BYTES
    if chunk_cols:  # force several backward chunks (and a short last one)
        kernels_triton.CHUNK_BYTES = chunk_cols * N * mh.element_size()
    try:
        out = kernels_triton.token_logprobs_triton(mh, mW, targets.to(DEVICE), temperature)
        (out * up.to(DEVICE)).sum().backward()
    finally:
        kernels_triton.CHUNK_BYTES = saved
    # the oracle: float64 log_softmax over the full logits of the same (rounded) inputs
    rh = h.to(dt).double().requires_grad_()
    rW = W.to(dt).double().requires_grad_()
    ref = torch.log_softmax(rh @ rW.T / temperature, -1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    ref = torch.where(targets != IGNORE, ref, 0.0)
    (ref * up.double()).sum().backward()
    assert out.dtype == torch.float32
    assert torch.all(out.cpu()[targets == IGNORE] == 0)
    assert torch.allclose(out.cpu().double(), ref, **TOL[dtype])
    if grad_h:
        assert mh.grad.dtype == dt and torch.allclose(mh.grad.cpu().double(), rh.grad, **TOL[dtype])
        assert torch.all(mh.grad.cpu()[targets == IGNORE] == 0)  # ignored rows: exactly no gradient
    else:
        assert mh.grad is None
    if grad_W:
        assert mW.grad.dtype == dt and torch.allclose(mW.grad.cpu().double(), rW.grad, **TOL[dtype])
    else:
        assert mW.grad is None


def check_reverse_kl(dtype, N, D, V, temperature, expert="logits", DE=None, chunk_cols=None, grad_W=True,
                     scale=1.0, seed=0):
    """expert: "logits" (an [N, V] tensor) or "hidden" ((expert_h [N, DE], expert_W [V, DE]))."""
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(seed)
    h, W = torch.randn(N, D, generator=g) * scale, torch.randn(V, D, generator=g) / 4
    eh, eW = torch.randn(N, DE or D, generator=g) * scale, torch.randn(V, DE or D, generator=g) / 4
    up = torch.randn(N, generator=g)
    eh, eW = eh.to(dt).double(), eW.to(dt).double()  # the expert as the kernel sees it
    ze = (eh @ eW.T).to(dt) if expert == "logits" else None
    mh = h.to(DEVICE, dt).clone().requires_grad_()
    mW = W.to(DEVICE, dt).clone().requires_grad_(grad_W)
    given = ze.to(DEVICE) if expert == "logits" else (eh.to(DEVICE, dt), eW.to(DEVICE, dt))
    saved = kernels_triton.CHUNK_BYTES
    if chunk_cols:
        kernels_triton.CHUNK_BYTES = chunk_cols * N * mh.element_size()
    try:
        out = kernels_triton.token_reverse_kl_triton(mh, mW, given, temperature)
        (out * up.to(DEVICE)).sum().backward()
    finally:
        kernels_triton.CHUNK_BYTES = saved
    # the oracle: KL(q || p) = sum_k q_k (log q_k - log p_k), float64 log_softmax of the same inputs
    rh, rW = h.to(dt).double().requires_grad_(), W.to(dt).double().requires_grad_()
    logq = torch.log_softmax(rh @ rW.T / temperature, -1)
    logp = torch.log_softmax((ze.double() if expert == "logits" else eh @ eW.T) / temperature, -1)
    ref = (logq.exp() * (logq - logp)).sum(-1)
    (ref * up.double()).sum().backward()
    # errors measured against each quantity's own scale: at logits ~150 fp32 keeps ~1e-5 of them
    close = lambda x, r: torch.allclose(x.cpu().double(), r, rtol=TOL[dtype]["rtol"],
                                        atol=TOL[dtype]["atol"] * max(1.0, r.abs().max().item()))
    assert out.dtype == torch.float32 and close(out, ref)
    assert mh.grad.dtype == dt and close(mh.grad, rh.grad)
    if grad_W:
        assert mW.grad.dtype == dt and close(mW.grad, rW.grad)
    else:
        assert mW.grad is None


def run(fn="check", **case):
    """check(**case) (or fn) here on a GPU (or if this process runs the interpreter), else in a
    fresh process under the interpreter."""
    if CUDA or os.environ.get("TRITON_INTERPRET") == "1":
        return globals()[fn](**case)
    code = f"from test_kernels_triton import {fn}; {fn}(**{case!r})"
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True,
                         env={**os.environ, "TRITON_INTERPRET": "1",
                              "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), HERE])})
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_float64_with_ragged_tiles_and_several_chunks(dtype):
    # N, D and V are not multiples of any tile size; 128-column chunks: the last one short
    run(dtype=dtype, N=70, D=40, V=301, temperature=0.7, chunk_cols=128)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_float64_in_one_chunk_at_temperature_one(dtype):
    run(dtype=dtype, N=130, D=64, V=200, temperature=1.0)


def test_frozen_unembedding_gets_no_gradient():
    run(dtype="float32", N=33, D=32, V=90, temperature=1.3, grad_W=False)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs_large_logits_and_targets_on_tile_edges(dtype):
    # logits up to ~150 (exp overflows fp32 past 88 without the max subtraction), h frozen
    run(dtype=dtype, N=40, D=24, V=300, temperature=0.05, scale=2.0, strided=True, edge_targets=True,
        grad_h=False)
    run(dtype=dtype, N=40, D=24, V=300, temperature=1.0, strided=True, edge_targets=True)


@pytest.mark.skipif(not CUDA, reason="the large shape is slow under the interpreter")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_large_vocabulary_on_cuda(dtype):
    run(dtype=dtype, N=300, D=64, V=5003, temperature=1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reverse_kl_from_expert_logits_matches_float64(dtype):
    # ragged tiles, 128-column chunks with a short last one, T != 1
    run("check_reverse_kl", dtype=dtype, N=70, D=40, V=301, temperature=0.7, chunk_cols=128)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reverse_kl_from_expert_hidden_states_matches_float64(dtype):
    # the expert wider than the student (d_e != d), its logits computed tile by tile
    run("check_reverse_kl", dtype=dtype, N=50, D=24, DE=40, V=200, temperature=1.3, expert="hidden", chunk_cols=64)


def test_reverse_kl_large_logits_and_frozen_unembedding():
    # logits up to ~150: exp overflows without the max subtraction, in both distributions
    run("check_reverse_kl", dtype="float32", N=40, D=24, V=300, temperature=0.05, scale=2.0, grad_W=False)


def check_reverse_kl_minus_inf():
    """Expert logits of -inf, as in kernels.py: where the student puts mass, KL = inf; rows
    where the expert is finite (but -inf over a whole tile elsewhere in the batch) unaffected."""
    g = torch.Generator().manual_seed(0)
    N, D, V = 12, 16, 200
    h, W, ze = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g) / 4, torch.randn(N, V, generator=g)
    ze[0, 5] = float("-inf")  # one column
    ze[1, 64:128] = float("-inf")  # a whole fp32 tile (BV = 64)
    out = kernels_triton.token_reverse_kl_triton(h.to(DEVICE), W.to(DEVICE), ze.to(DEVICE)).cpu()
    logq = torch.log_softmax(h.double() @ W.double().T, -1)
    ref = (logq.exp() * (logq - torch.log_softmax(ze.double(), -1))).sum(-1)
    assert out[0] == float("inf") and out[1] == float("inf") and torch.isinf(ref[:2]).all()
    assert torch.allclose(out[2:].double(), ref[2:], rtol=1e-4, atol=1e-4)


def test_reverse_kl_minus_inf_expert_logits():
    run("check_reverse_kl_minus_inf")


@pytest.mark.skipif(not CUDA, reason="the large shape is slow under the interpreter")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("expert", ["logits", "hidden"])
def test_reverse_kl_large_vocabulary_on_cuda(dtype, expert):
    run("check_reverse_kl", dtype=dtype, N=300, D=64, V=5003, temperature=1.0, expert=expert)


def test_refuses_bad_input_in_one_line():
    h, W, t = torch.zeros(4, 8), torch.zeros(5, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="fp32/bf16/fp16"):
        kernels_triton.token_logprobs_triton(h.double(), W.double(), t)
    for args in ((h, torch.zeros(5, 7), t), (h[None], W, t)):
        with pytest.raises(ValueError, match=r"h \[N, d\] and W \[V, d\]"):
            kernels_triton.token_logprobs_triton(*args)
    with pytest.raises(ValueError, match=r"targets \[N\]"):
        kernels_triton.token_logprobs_triton(h, W, t[:3])
    for expert, message in ((torch.zeros(4, 6), "expert logits have 6 columns, the student's vocabulary has 5"),
                            (torch.zeros(3, 5), "expert logits have 3 rows, the student's h has 4"),
                            ((torch.zeros(4, 3), torch.zeros(5, 2)), r"expert must be logits \[N, V\] or a pair"),
                            ((torch.zeros(3, 3), torch.zeros(5, 3)), "expert_h has 3 rows, the student's h has 4"),
                            ((torch.zeros(4, 3), torch.zeros(7, 3)), r"expert_W has 7 rows, the student's W \(vocabulary\) has 5"),
                            ((torch.zeros(4, 3),), r"expert must be logits \[N, V\] or a pair")):
        with pytest.raises(ValueError, match=message):
            kernels_triton.token_reverse_kl_triton(h, W, expert)


def test_refuses_targets_outside_the_vocabulary():
    """V=22, targets [3, -1, 25]: one ValueError line naming the first bad row, from
    token_logprobs_triton itself and through kernels.token_logprobs(impl="triton") (checked
    before anything launches, so no interpreter is needed)."""
    h, W = torch.randn(3, 8), torch.randn(22, 8)
    for bad, row in (([3, -1, 25], 1), ([IGNORE, 7, 22], 2)):
        message = rf"targets must be in \[0, 22\) or IGNORE \(-100\); got {bad[row]} at row {row}$"
        with pytest.raises(ValueError, match=message):
            kernels_triton.token_logprobs_triton(h, W, torch.tensor(bad))
        with pytest.raises(ValueError, match=message):
            kernels.token_logprobs(h, W, torch.tensor(bad), impl="triton")
    with pytest.raises(ValueError, match="expert logits have 30 columns, the student's vocabulary has 22"):
        kernels.token_divergence(h, W, torch.randn(3, 30), impl="triton")


def test_own_ignore_and_no_import_of_kernels():
    """kernels_triton keeps its own IGNORE, equal to kernels.py's, and imports nothing of
    kernels.py (which imports it): no cycle."""
    assert kernels_triton.IGNORE == kernels.IGNORE == IGNORE
    assert kernels.kernels_triton is kernels_triton
    code = "import sys, kernels_triton; assert 'kernels' not in sys.modules, 'kernels_triton imports kernels'"
    out = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(HERE), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def check_dispatch():
    """kernels.token_logprobs / token_divergence(kind="reverse") with impl="triton" (the default
    on CUDA) run the Triton kernels: against float64 log_softmax, values and gradients."""
    g = torch.Generator().manual_seed(3)
    N, D, V = 20, 16, 22  # the project's vocabulary
    h, W, ze = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g), torch.randn(N, V, generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::4] = IGNORE
    impl = None if CUDA else "triton"
    mh, mW = h.to(DEVICE).clone().requires_grad_(), W.to(DEVICE).clone().requires_grad_()
    if CUDA:
        assert kernels.backend(mh, mW) == "triton" and kernels.backend(mh, mW, triton=False) == "naive"
    out = kernels.token_logprobs(mh, mW, targets.to(DEVICE), 0.8, impl=impl) + kernels.token_divergence(
        mh, mW, ze.to(DEVICE), "reverse", temperature=0.8, impl=impl)
    out.sum().backward()
    rh, rW = h.double().requires_grad_(), W.double().requires_grad_()
    logq, logp = torch.log_softmax(rh @ rW.T / 0.8, -1), torch.log_softmax(ze.double() / 0.8, -1)
    ref = torch.where(targets != IGNORE, logq.gather(1, targets.clamp(min=0)[:, None]).squeeze(1), 0.0)
    ref = ref + (logq.exp() * (logq - logp)).sum(-1)
    ref.sum().backward()
    assert torch.allclose(out.detach().cpu().double(), ref, rtol=1e-4, atol=1e-4)
    assert torch.allclose(mh.grad.cpu().double(), rh.grad, rtol=1e-4, atol=1e-4)
    assert torch.allclose(mW.grad.cpu().double(), rW.grad, rtol=1e-4, atol=1e-4)


def test_kernels_py_dispatches_to_triton():
    run("check_dispatch")


def test_no_rows():
    h, W = torch.zeros(0, 8, requires_grad=True), torch.zeros(5, 8, requires_grad=True)
    out = kernels_triton.token_logprobs_triton(h, W, torch.zeros(0, dtype=torch.long))
    out.sum().backward()
    assert out.shape == (0,) and torch.all(W.grad == 0)
    out = kernels_triton.token_reverse_kl_triton(h, W, torch.zeros(0, 5))
    assert out.shape == (0,)
