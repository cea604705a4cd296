"""Benchmark the sampler and the log-prob kernels against the alternatives, in one run.

    python -m research.bench --threads 1             # everything; kernels at N=4096, d=768, V=50257, fp32
    python -m research.bench --rows kernels --n 1024 --v 8192 --reps 3 --device cuda --dtype bfloat16

Sampler: tokens/s of model.GPT.generate with its KV cache against recomputing the whole
prefix at every step, on mirror prompts at batch 128: the default expert (medium) and
student (small) with 6-token responses, and the large size with 64-token responses. Random
weights and no end token, so every row samples the full length (a trained mirror model
writes 6 tokens too); "same" says both paths drew the same tokens.

Kernels: forward+backward, each row in its own process, so one row's peak cannot hide
another's. Peak memory is the extra over the inputs: the process's peak RSS on CPU (reset
after any warm-up), torch.cuda.max_memory_allocated on CUDA. On CUDA each row first makes one
untimed call (Triton's and torch.compile's compiling, cuBLAS's set-up); each timing averages
as many calls as fill 0.2 s (at the default size a CPU call takes seconds: one call). The logprobs rows compute
sum_i u_i log p(t_i) with random u; reverse_kl the per-row KL(student || expert logits)
weighted the same way; the online rows online IL's loss sum_i D_i + a_i log p(t_i), with
an expert given as hidden states and a_i the standardised D (an advantage).
  floor          the three GEMMs of naive (W h^T, G W, G^T h) alone: no method does less matrix work
  naive          log_softmax over the full [N, V] logits, plain autograd
  fused          kernels.token_logprobs / token_divergence, impl="fused": the PyTorch kernels
                 over vocabulary blocks, 4 GEMMs (what training runs on the CPU)
  triton         the same calls with impl="triton": kernels_triton's logits tiles kept on chip
                 (CUDA only; what training runs on CUDA where Triton is installed)
  cce compile    Apple's Cut Cross-Entropy, linear_cross_entropy(impl="torch_compile"), if installed
  cce triton     its Triton kernels (impl="cce", CUDA only)
"""
import argparse
import json
import platform
import resource
import os
import subprocess
import sys
import time

if __package__ in (None, ""):  # run as python research/bench.py: the imports live in the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import kernels
from data import MirrorTask, Tokenizer, encode_prompts
from kernels import naive_divergence, token_divergence, token_logprobs
from model import make_model

try:
    from cut_cross_entropy import linear_cross_entropy
except ImportError:  # an optional peer: its rows are skipped
    linear_cross_entropy = None

SAMPLER = {"sampler small": ("small", 6), "sampler medium": ("medium", 6), "sampler large": ("large", 64)}
KERNELS = ("floor", "logprobs naive", "logprobs fused", "logprobs triton", "logprobs cce compile",
           "logprobs cce triton", "reverse_kl naive", "reverse_kl fused", "reverse_kl triton", "online naive",
           "online fused", "online triton")
PEERS = ("logprobs cce compile", "logprobs cce triton")  # optional: a failure skips the row


# ----------------------------------------------------------------------------- measuring
def _proc_status(key):
    """A /proc/self/status field in bytes (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
    except (OSError, StopIteration):
        return None


def reset_peak(device):
    """Start a peak-memory window; returns the memory in use now."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:  # Linux: reset the peak RSS, so a warm-up's peak (torch.compile) cannot hide the row's
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _proc_status("VmRSS") or peak(device)


def peak(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return _proc_status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed(step, reps, sync, at_least=0.2):
    """Median wall and CPU seconds per call over `reps` timings of >= at_least seconds each.
    CPU time is the process's (all threads): on a shared machine it leaves out the time
    spent waiting for a core."""
    wall, cpu = [], []
    for _ in range(reps):
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        while n == 0 or time.perf_counter() - t0 < at_least:
            step()
            sync()
            n += 1
        wall.append((time.perf_counter() - t0) / n)
        cpu.append((time.process_time() - c0) / n)
    return sorted(wall)[reps // 2], sorted(cpu)[reps // 2]


# ----------------------------------------------------------------------------- rows (child processes)
def sampler_row(kind, a):
    size, new_tokens = SAMPLER[kind]
    tok, task = Tokenizer(), MirrorTask()
    g = torch.Generator().manual_seed(0)
    prompt, valid = encode_prompts(tok, [task.sample_prompt(g) for _ in range(128)], a.device)
    model = make_model(size, 1 + task.max_prompt_len + new_tokens, tok.vocab_size, seed=0).to(a.device).eval()
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    row, tokens = dict(kind=kind, size=size, new_tokens=new_tokens), {}
    for use_cache in (True, False):
        def step():
            gen = torch.Generator(a.device).manual_seed(1)
            with torch.autocast(a.device, torch.bfloat16, enabled=a.dtype == "bfloat16"):
                return model.generate(prompt, valid, new_tokens, end_token=-1, pad_token=tok.pad, generator=gen,
                                      use_cache=use_cache)
        tokens[use_cache] = step()[0]  # also the warm-up
        wall, cpu = timed(step, a.reps, sync)
        row["cached" if use_cache else "recompute"] = dict(tok_s=128 * new_tokens / wall, cpu=cpu)
    row["same"] = torch.equal(tokens[True], tokens[False])
    return row


def check_cce(impl, device, dtype):
    """Cut Cross-Entropy's per-token loss is -log p(target): the same quantity as the other
    rows. Checked on a small shape, which also compiles it before the memory window."""
    g = torch.Generator().manual_seed(1)
    e = torch.randn(64, 32, generator=g).to(device, dtype).requires_grad_()
    c = torch.randn(101, 32, generator=g).to(device, dtype).requires_grad_()
    t = torch.randint(0, 101, (64,), generator=g).to(device)
    theirs = linear_cross_entropy(e, c, t, impl=impl, reduction="none")
    theirs.sum().backward()
    mine = -token_logprobs(e.detach().float(), c.detach().float(), t, fused=False)
    tol = 1e-4 if dtype == torch.float32 else 0.25  # bf16 logits
    assert torch.allclose(theirs.float(), mine, atol=tol, rtol=tol), "cut_cross_entropy computes another quantity"
    return linear_cross_entropy


def kernel_row(kind, a):
    """Build the inputs, then time forward+backward; peak memory over the timed steps."""
    n, d, v, device, dtype = a.n, a.d, a.v, a.device, getattr(torch, a.dtype)
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(n, d, generator=g) / d ** 0.5).to(device, dtype).requires_grad_()
    W = torch.randn(v, d, generator=g).to(device, dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    u = torch.randn(n, generator=g).to(device)
    expert_logits = torch.randn(n, v, generator=g).to(device, dtype) if kind.startswith("reverse_kl") else None
    if kind.startswith("online"):
        he, We = (torch.randn(n, d, generator=g) / d ** 0.5).to(device, dtype), torch.randn(v, d, generator=g).to(device, dtype)
    advantage = lambda D: (D - D.mean()) / (D.std() + 1e-6)
    if "cce" in kind:
        cce_impl = "torch_compile" if kind.endswith("compile") else "cce"
        cce = check_cce(cce_impl, device, dtype)
    impl = kind.split()[-1]  # naive, fused or triton: kernels.py's impl=

    def step():
        if kind == "floor":  # the three GEMMs, W h^T being ~1.3x faster than h W^T on CPU (MKL)
            zt = W.detach() @ h.detach().T  # [V, N]
            return zt.T @ W.detach(), zt @ h.detach()
        if "cce" in kind:
            loss = (cce(h, W, targets, impl=cce_impl, reduction="none") * -u).sum()
        elif kind.startswith("logprobs"):
            loss = (token_logprobs(h, W, targets, impl=impl) * u).sum()
        elif kind.startswith("reverse_kl"):
            loss = (token_divergence(h, W, expert_logits, "reverse", impl=impl) * u).sum()
        elif kind != "online naive":
            D = token_divergence(h, W, (he, We), "reverse", impl=impl)
            loss = D.sum() + (advantage(D.detach()) * token_logprobs(h, W, targets, impl=impl)).sum()
        else:  # online naive: one logits tensor shared by D and log p
            z = (h @ W.T).float()
            with torch.no_grad():
                ze = (he @ We.T).float()
            D = naive_divergence(z, ze, "reverse")
            logp = torch.log_softmax(z, -1).gather(1, targets[:, None]).squeeze(1)
            loss = D.sum() + (advantage(D.detach()) * logp).sum()
        loss.backward()
        h.grad = W.grad = None

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":  # one untimed call: compiling and set-up are not the kernel's time
        step()
    base = reset_peak(device)
    wall, cpu = timed(step, a.reps, sync)
    return dict(kind=kind, time=wall, cpu=cpu, extra_gb=(peak(device) - base) / 1e9)


# ----------------------------------------------------------------------------- report
def machine(device):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if device == "cuda" else ""
    return f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}{gpu}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=4096, help="kernels: tokens (rows)")
    p.add_argument("--d", type=int, default=768, help="kernels: hidden width")
    p.add_argument("--v", type=int, default=50257, help="kernels: vocabulary")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="kernel inputs; bfloat16 runs the sampler under autocast")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--rows", default="all", choices=["all", "sampler", "kernels"], help="which rows to run")
    p.add_argument("--only", default="", help="run only these rows (comma-separated kinds, e.g. 'logprobs naive,logprobs fused')")
    p.add_argument("--block-mb", type=int, default=0, help="the vocabulary-blocked kernels' working-buffer budget per block, in MB (0: kernels.py's own, 32)")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.block_mb < 0:
        sys.exit("error: --block-mb must be >= 0")
    if a.block_mb:
        kernels.VOCAB_BLOCK_BUDGET = a.block_mb * 2**20
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda, but no CUDA device is available")
    if a.child:
        row = sampler_row(a.child, a) if a.child in SAMPLER else kernel_row(a.child, a)
        print(json.dumps(row))
        return
    kinds = [*(SAMPLER if a.rows != "kernels" else ()), *(KERNELS if a.rows != "sampler" else ())]
    if a.only:
        only = [k.strip() for k in a.only.split(",")]
        unknown = set(only) - set(kinds)
        if unknown:
            sys.exit(f"error: --only names rows {sorted(unknown)} that --rows {a.rows} does not run; choose from {kinds}")
        kinds = [k for k in kinds if k in only]
    rows, skipped = {}, {}
    for kind in kinds:
        if "cce" in kind and linear_cross_entropy is None:
            skipped[kind] = "not installed (pip install cut-cross-entropy)"
            continue
        if kind.endswith("triton") and a.device != "cuda":
            skipped[kind] = "CUDA only"
            continue
        if kind.endswith(" triton") and "cce" not in kind and kernels.kernels_triton is None:
            skipped[kind] = "Triton not installed"
            continue
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", kind], capture_output=True, text=True)
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        if out.returncode and kind in PEERS:
            skipped[kind] = f"failed: {last}"
        elif out.returncode:
            sys.exit(f"error: {kind} failed: {last}")
        else:
            rows[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"measured {kind}", file=sys.stderr, flush=True)

    print(f"machine: {machine(a.device)}")
    if a.rows != "kernels":
        print(f"\nsampler on {a.device}: mirror prompts, batch 128, tokens/s (median of {a.reps}); "
              f"KV cache against full recompute")
        print(f"{'model':<8} {'tokens':>6} {'cached tok/s':>13} {'recompute tok/s':>16} {'speedup':>8} {'same':>5}")
        for kind in (k for k in SAMPLER if k in rows):
            r = rows[kind]
            c, f = r["cached"]["tok_s"], r["recompute"]["tok_s"]
            print(f"{r['size']:<8} {r['new_tokens']:>6} {c:>13,.0f} {f:>16,.0f} {c / f:>7.2f}x {'yes' if r['same'] else 'NO':>5}")
    if a.rows != "sampler":
        budget = f", fused blocks within {a.block_mb} MB" if a.block_mb else ""
        per = " timings, each the mean of the calls that fill 0.2 s" if a.device == "cuda" else ""
        print(f"\nkernels: N={a.n} d={a.d} V={a.v} {a.dtype} on {a.device}, forward+backward, median of {a.reps}{per}{budget}")
        slowest = max((rows[k]["time"] for k in KERNELS if k in rows), default=0)
        unit, scale = ("ms", 1e3) if a.device == "cuda" or slowest < 1 else ("s", 1)  # a GPU row takes ms
        print(f"{'kernel':<22} {'time ' + unit:>8} {'cpu ' + unit:>8} {'extra peak GB':>14} {'time / naive':>13} {'memory / naive':>15}")
        for kind in KERNELS:
            if kind in skipped:
                print(f"{kind:<22} skipped: {skipped[kind]}")
                continue
            if kind not in rows:  # left out by --only
                continue
            r, group = rows[kind], kind.split()[0]
            naive = rows.get(f"{'logprobs' if group == 'floor' else group} naive")
            ratios = (f"{r['time'] / naive['time']:13.2f} {r['extra_gb'] / max(naive['extra_gb'], 1e-9):15.3f}"
                      if naive else f"{'-':>13} {'-':>15}")
            print(f"{kind:<22} {r['time'] * scale:8.3f} {r['cpu'] * scale:8.3f} {r['extra_gb']:14.3f} {ratios}")
        for ours, peer in ((o, p) for o in ("logprobs fused", "logprobs triton") for p in PEERS):
            if peer in rows and ours in rows:
                mine, theirs = rows[ours], rows[peer]
                print(f"{ours} against {peer[9:]}: {mine['time'] / theirs['time']:.2f}x its time, "
                      f"{mine['extra_gb'] / max(theirs['extra_gb'], 1e-9):.2f}x its extra memory")


if __name__ == "__main__":
    main()
