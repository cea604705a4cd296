"""The CUDA path, where a GPU is present (skipped otherwise; run by gpu_check.sh): the kernels
in fp32 and bf16 against float64 CPU references, by default (kernels.backend: Triton's where it
is installed and has the kernel, else naive) and forced to the PyTorch kernels; the sampler; a
tiny pipeline end to end."""
import json
import os
import subprocess
import sys

import pytest
import torch

from data import Tokenizer, encode_prompts
import kernels
from kernels import IGNORE, naive_divergence, token_divergence, token_logprobs
from model import make_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a large vocabulary, so the kernels really work block by block (V not a multiple of the block)
N, D, V = 300, 64, 5003


def inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, W, he = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g) / 4, torch.randn(N, D, generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::7] = IGNORE
    up = torch.randn(N, generator=g)
    cuda = [x.to("cuda", dtype).clone().requires_grad_() for x in (h, W)]
    ref = [x.double().clone().requires_grad_() for x in (h, W)]
    return cuda, ref, he, targets, up


# fp32 on the GPU runs its GEMMs in TF32 when train.py turns that on; these tests leave it off
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}
# None: what training gets (kernels.backend: Triton's kernels where Triton imports, else naive)
IMPLS = [None, "fused"]


def test_default_backend_on_cuda():
    h, W = torch.zeros(2, 4, device="cuda"), torch.zeros(3, 4, device="cuda")
    expected = "naive" if kernels.kernels_triton is None else "triton"
    assert kernels.backend(h, W) == expected and kernels.backend(h, W, triton=False) == "naive"
    assert kernels.backend(h, W, fused=False) == "naive"
    assert kernels.backend(h.double(), W.double()) == "naive"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_on_cuda_match_float64(dtype, impl):
    (h, W), (rh, rW), _, targets, up = inputs(dtype)
    out = token_logprobs(h, W, targets.cuda(), block=1024, impl=impl)
    (out * up.cuda()).sum().backward()
    ref = torch.log_softmax(rh @ rW.T, -1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    ref = torch.where(targets != IGNORE, ref, 0.0)
    (ref * up.double()).sum().backward()
    assert out.dtype == torch.float32  # softmax arithmetic in fp32 whatever the input dtype
    assert torch.allclose(out.cpu().double(), ref, **TOL[dtype])
    assert torch.allclose(h.grad.cpu().double(), rh.grad, **TOL[dtype])
    assert torch.allclose(W.grad.cpu().double(), rW.grad, **TOL[dtype])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["reverse", "forward", "jsd"])
def test_token_divergence_on_cuda_matches_float64(dtype, kind, impl):
    (h, W), (rh, rW), he, _, up = inputs(dtype)
    We = torch.randn(V, D, generator=torch.Generator().manual_seed(1)) / 4
    out = token_divergence(h, W, (he.to("cuda", dtype), We.to("cuda", dtype)), kind, beta=0.3, block=1024, impl=impl)
    (out * up.cuda()).sum().backward()
    ze = (he.to(dtype).double() @ We.to(dtype).double().T)  # the expert as the GPU sees it
    ref = naive_divergence(rh @ rW.T, ze, kind, beta=0.3)
    (ref * up.double()).sum().backward()
    assert torch.allclose(out.cpu().double(), ref, **TOL[dtype])
    assert torch.allclose(h.grad.cpu().double(), rh.grad, **TOL[dtype])


def test_mismatched_inputs_refused_on_cuda():
    h, W = torch.randn(3, 8, device="cuda"), torch.randn(22, 8, device="cuda")
    for impl in IMPLS:
        with pytest.raises(ValueError, match=r"targets must be in \[0, 22\) or IGNORE \(-100\); got -1 at row 1$"):
            token_logprobs(h, W, torch.tensor([3, -1, 25], device="cuda"), impl=impl)
        with pytest.raises(ValueError, match="expert logits have 30 columns, the student's vocabulary has 22"):
            token_divergence(h, W, torch.randn(3, 30, device="cuda"), impl=impl)


def test_kv_cache_sampling_equals_full_recompute_on_cuda():
    tok = Tokenizer()
    m = make_model("medium", 32, tok.vocab_size, seed=0).cuda().eval()
    prompt, valid = encode_prompts(tok, ["31415=", "2718281="], "cuda")
    outs = [m.generate(prompt, valid, 8, tok.end, tok.pad, temperature=0, use_cache=c) for c in (True, False)]
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def tiny_pipeline(tmp_path, *extra):
    tiny = ["--digits", "2", "--expert-size", "small", "--student-size", "small", "--expert-steps", "300",
            "--base-steps", "10", "--steps", "40", "--batch-size", "32", "--eval-prompts", "64",
            "--expert-min-reward", "0.5", "--device", "cuda", "--out-dir", str(tmp_path), *extra]
    for mode in ("expert", "sft", "onpolicy"):
        out = subprocess.run([sys.executable, "train.py", "--mode", mode, *tiny], cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
    for name in ("expert", "sft-small", "onpolicy-small-g1"):
        with open(tmp_path / "mirror" / f"{name}.result.json") as f:
            assert 0 <= json.load(f)["reward"] <= 1


def test_a_tiny_pipeline_runs_end_to_end_on_cuda(tmp_path):
    """expert -> base -> SFT and online IL on the GPU (bf16 autocast); the checkpoints load on
    a machine without one."""
    tiny_pipeline(tmp_path)
    ck = torch.load(tmp_path / "mirror" / "onpolicy-small-g1.pt", map_location="cpu", weights_only=True)
    assert all(v.device.type == "cpu" for v in ck["model"].values())


def test_compiled_pipeline_on_cuda(tmp_path):
    tiny_pipeline(tmp_path, "--compile")
