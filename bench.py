"""Benchmark the fused kernels against the naive path: time and peak memory, fwd+bwd.

    python bench.py                          # N=4096, d=768, V=50257, fp32, on this machine
    python bench.py --n 1024 --v 8192 --reps 3 --device cuda --dtype bfloat16

Each row runs in its own process, so one row's peak cannot hide another's. Peak memory is
the extra over the inputs: the process's peak RSS on CPU, torch.cuda.max_memory_allocated on
CUDA. "floor" is the same GEMMs alone (h W^T, G W, G^T h) with no softmax at all: no
log-prob method can do less matrix work than that. "row-chunked" is the other layout a fused
kernel can take (256-row chunks, full-vocabulary recompute), measured for comparison.
"""
import argparse
import json
import resource
import subprocess
import sys
import time

import torch


class RowChunkedLogprobs(torch.autograd.Function):
    """The alternative layout, kept here for the comparison only: chunk over rows, recompute
    each chunk's full [rows, V] logits in backward. Every chunk re-reads and re-writes the
    whole [V, d] weight gradient, which is where it loses to kernels.py's vocabulary blocks."""

    @staticmethod
    def forward(ctx, h, W, targets, rows):
        out = torch.empty(h.shape[0], device=h.device)
        for r in range(0, h.shape[0], rows):
            z = (h[r:r + rows] @ W.T).float()
            out[r:r + rows] = z.gather(1, targets[r:r + rows, None]).squeeze(1) - z.logsumexp(1)
        ctx.save_for_backward(h, W, targets)
        ctx.rows = rows
        return out

    @staticmethod
    def backward(ctx, g):
        h, W, targets = ctx.saved_tensors
        grad_h, grad_W = torch.empty_like(h), torch.zeros_like(W)
        for r in range(0, h.shape[0], ctx.rows):
            G = torch.softmax((h[r:r + ctx.rows] @ W.T).float(), 1).mul_(-g[r:r + ctx.rows, None])
            G.scatter_add_(1, targets[r:r + ctx.rows, None], g[r:r + ctx.rows, None])
            grad_h[r:r + ctx.rows] = G @ W
            grad_W.addmm_(G.T, h[r:r + ctx.rows])
        return grad_h, grad_W, None, None


def one(kind, n, d, v, dtype, device, reps):
    """Run in a child process: build inputs, then time fwd+bwd `reps` times."""
    from kernels import token_divergence, token_logprobs
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(n, d, generator=g) / d ** 0.5).to(device, dtype).requires_grad_()
    W = torch.randn(v, d, generator=g).to(device, dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    expert = torch.randn(n, v, generator=g).to(device, dtype) if "kl" in kind else None
    grad_up = torch.randn(n, generator=g).to(device)

    def step():
        if kind == "floor":  # the three GEMMs of naive forward+backward, nothing else
            z = h.detach() @ W.detach().T
            return z @ W.detach(), z.T @ h.detach()
        if kind == "logprobs row-chunked":
            out = RowChunkedLogprobs.apply(h, W, targets, 256)
        elif kind.startswith("logprobs"):
            out = token_logprobs(h, W, targets, fused=kind.endswith("fused"))
        else:
            out = token_divergence(h, W, expert, "reverse", fused=kind.endswith("fused"))
        (out * grad_up).sum().backward()
        h.grad = W.grad = None

    def peak():
        if device == "cuda":
            return torch.cuda.max_memory_allocated()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    base = peak()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return dict(kind=kind, time=sorted(times)[len(times) // 2], extra_gb=(peak() - base) / 1e9)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=4096, help="tokens (rows)")
    p.add_argument("--d", type=int, default=768, help="hidden width")
    p.add_argument("--v", type=int, default=50257, help="vocabulary")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(one(a.child, a.n, a.d, a.v, getattr(torch, a.dtype), a.device, a.reps)))
        return
    rows = []
    for kind in ("floor", "logprobs naive", "logprobs fused", "logprobs row-chunked", "reverse_kl naive",
                 "reverse_kl fused"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", kind],
                             capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"error: {kind} failed: {out.stderr.strip().splitlines()[-1]}")
        rows.append(json.loads(out.stdout))
        print(f"measured {kind}", file=sys.stderr, flush=True)
    t = {r["kind"]: r for r in rows}
    print(f"N={a.n} d={a.d} V={a.v} {a.dtype} on {a.device} ({torch.get_num_threads()} threads), "
          f"forward+backward, median of {a.reps}")
    print(f"{'kernel':<21} {'time s':>8} {'extra peak GB':>14} {'time / naive':>13} {'memory / naive':>15}")
    for r in rows:
        naive = t["reverse_kl naive"] if r["kind"].startswith("reverse") else t["logprobs naive"]
        print(f"{r['kind']:<21} {r['time']:8.3f} {r['extra_gb']:14.3f} {r['time'] / naive['time']:13.2f} "
              f"{r['extra_gb'] / max(naive['extra_gb'], 1e-9):15.3f}")


if __name__ == "__main__":
    main()
