"""token_logprobs and the reverse KL with their logits tiles kept on chip: Triton kernels (CUDA; optional).

kernels.py's token_logprobs computes each [N, block] slab of logits with a GEMM, writes it
to memory and runs a dozen elementwise ops over it; on a GPU those launches, not the
arithmetic, set the time (RESULTS.md, "Fused kernels on the GPU"). Here each program computes one
[BM, BV] tile of logits with tl.dot and finishes its work on it before anything leaves the chip:

  forward:  per tile, its row max and sum of exp(z - max), and the target's logit if the
            target falls in the tile; a [tiles, N] reduction in PyTorch gives the lse.
  backward: per vocabulary chunk of C columns, one kernel recomputes each tile's logits and
            writes the logit gradient G = g (onehot(t) - p) / T in the input dtype; then
            cuBLAS does the two GEMMs:  grad_h += G @ W[chunk],  grad_W[chunk] = G^T @ h.

Every slice of grad_W is one GEMM's output, written once in the input dtype (as naive's grad_W
is), so no fp32 [V, d] buffer is needed; grad_h, the sum of the chunks' G @ W products (each a
GEMM output in the input dtype), is summed in fp32. Peak extra memory: grad_W, grad_h and one
[N, C] chunk of G (CHUNK_BYTES). The cost is four GEMMs (naive: three), as in kernels.py.
No gradient filtering: every tile is computed.
Softmax arithmetic is fp32; the dots take the input dtype (fp32 inputs: exact fp32 dots, no TF32).

token_reverse_kl_triton, online IL's per-token KL(student || expert), works the same way: its
forward keeps, per tile, both distributions' max and sum of exp and a = sum_k e^(zs_k - ms)
(zs_k - ze_k) (KL = sum_k q_k (zs_k - ze_k) - lse_s + lse_e, as kernels.py's pass); the
expert's tile is read from its logits or computed from its hidden states with a second tl.dot;
its backward writes G = g q (log q - log p - KL) / T and shares the GEMMs above.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set before
import), which is how tests/test_kernels_triton.py checks them on the CPU.
"""
import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

IGNORE = -100  # as kernels.IGNORE (a test checks): this module does not import kernels.py, which imports it

CHUNK_BYTES = 64 * 2**20  # one [N, C] chunk of G in the backward


def _config(dtype):
    """Tile sizes (BM rows, BV vocabulary columns, BK of d) and launch settings per dtype:
    fp32 tiles are smaller so that the pipelined shared-memory buffers still fit."""
    if dtype == torch.float32:
        return dict(BM=64, BV=64, BK=32), dict(num_warps=4, num_stages=2)
    return dict(BM=128, BV=128, BK=64), dict(num_warps=8, num_stages=3)


@triton.jit
def _logits_tile(H, W, rows, cols, N, V, D, stride_h, stride_w, inv_T,
                 BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    """z[rows, cols] = h[rows] . W[cols] / T in fp32; columns past V are -inf."""
    ks = tl.arange(0, BK)
    acc = tl.zeros((BM, BV), dtype=tl.float32)
    for k0 in range(0, D, BK):
        k = k0 + ks
        h = tl.load(H + rows[:, None] * stride_h + k[None, :], mask=(rows[:, None] < N) & (k[None, :] < D), other=0.0)
        w = tl.load(W + cols[:, None] * stride_w + k[None, :], mask=(cols[:, None] < V) & (k[None, :] < D), other=0.0)
        if IEEE:
            acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(h, tl.trans(w), acc)
    return tl.where(cols[None, :] < V, acc * inv_T, float("-inf"))


@triton.jit
def _lse_kernel(H, W, T, M, S, Z, N, V, D, stride_h, stride_w, inv_T,
                BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    # program_id(0), the row tile, varies fastest: the programs side by side share one W tile.
    # Offsets in int64: tiles * N or V * d may pass 2**31 at large shapes
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    tile = tl.program_id(1).to(tl.int64)
    cols = tile * BV + tl.arange(0, BV)
    z = _logits_tile(H, W, rows, cols, N, V, D, stride_h, stride_w, inv_T, BM, BV, BK, IEEE)
    m = tl.max(z, 1)
    s = tl.sum(tl.exp(z - m[:, None]), 1)
    tl.store(M + tile * N + rows, m, mask=rows < N)
    tl.store(S + tile * N + rows, s, mask=rows < N)
    t = tl.load(T + rows, mask=rows < N, other=-1)
    hit = cols[None, :] == t[:, None]  # each row's target lies in exactly one tile
    tl.store(Z + rows, tl.sum(tl.where(hit, z, 0.0), 1), mask=(rows < N) & (t >= tile * BV) & (t < tile * BV + BV))


@triton.jit
def _grad_kernel(H, W, T, LSE, G, OUT, N, V, D, v0, C, stride_h, stride_w, inv_T,
                 BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    """OUT[:, :C] = d(sum_i g_i log p(t_i)) / dz for vocabulary columns [v0, v0 + C)."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)  # int64 offsets, as above
    local = tl.program_id(1).to(tl.int64) * BV + tl.arange(0, BV)
    cols = v0 + local
    vmax = tl.minimum(V, v0 + C)
    z = _logits_tile(H, W, rows, cols, N, vmax, D, stride_h, stride_w, inv_T, BM, BV, BK, IEEE)
    lse = tl.load(LSE + rows, mask=rows < N, other=0.0)
    g = tl.load(G + rows, mask=rows < N, other=0.0)
    t = tl.load(T + rows, mask=rows < N, other=-1)
    p = tl.exp(z - lse[:, None])  # 0 past the chunk's end (z = -inf there)
    dz = (tl.where(cols[None, :] == t[:, None], 1.0, 0.0) - p) * (g * inv_T)[:, None]
    tl.store(OUT + rows[:, None] * C + local[None, :], dz.to(OUT.dtype.element_ty),
             mask=(rows[:, None] < N) & (local[None, :] < C))


@triton.jit
def _expert_tile(ZE, EH, EW, rows, cols, N, V, DE, stride_ze, stride_eh, stride_ew, inv_T,
                 EXPERT_LOGITS: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
                 IEEE: tl.constexpr):
    """The expert's logits tile / T in fp32, read from its logits or computed from its hidden
    states; -inf past V (and wherever the expert's own logits are -inf)."""
    if EXPERT_LOGITS:
        ze = tl.load(ZE + rows[:, None] * stride_ze + cols[None, :], mask=(rows[:, None] < N) & (cols[None, :] < V),
                     other=float("-inf")).to(tl.float32)
        return tl.where(cols[None, :] < V, ze * inv_T, float("-inf"))
    return _logits_tile(EH, EW, rows, cols, N, V, DE, stride_eh, stride_ew, inv_T, BM, BV, BK, IEEE)


@triton.jit
def _reverse_kl_kernel(H, W, ZE, EH, EW, MS, SS, ME, SE, A, N, V, D, DE, stride_h, stride_w, stride_ze,
                       stride_eh, stride_ew, inv_T, EXPERT_LOGITS: tl.constexpr,
                       BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    """Per tile: both distributions' row max and sum of exp, and a = sum_k e^(zs_k - ms)(zs_k - ze_k),
    since KL(q || p) = sum_k q_k (zs_k - ze_k) - lse_s + lse_e."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)  # int64 offsets, as above
    tile = tl.program_id(1).to(tl.int64)
    cols = tile * BV + tl.arange(0, BV)
    zs = _logits_tile(H, W, rows, cols, N, V, D, stride_h, stride_w, inv_T, BM, BV, BK, IEEE)
    ze = _expert_tile(ZE, EH, EW, rows, cols, N, V, DE, stride_ze, stride_eh, stride_ew, inv_T,
                      EXPERT_LOGITS, BM, BV, BK, IEEE)
    ms = tl.max(zs, 1)
    es = tl.exp(zs - ms[:, None])
    me = tl.max(ze, 1)
    me_safe = tl.where(me > float("-inf"), me, 0.0)  # a tile where the expert is all -inf: sum 0
    out = tile * N + rows
    tl.store(MS + out, ms, mask=rows < N)
    tl.store(SS + out, tl.sum(es, 1), mask=rows < N)
    tl.store(ME + out, me, mask=rows < N)
    tl.store(SE + out, tl.sum(tl.exp(ze - me_safe[:, None]), 1), mask=rows < N)
    tl.store(A + out, tl.sum(tl.where(es > 0, es * (zs - ze), 0.0), 1), mask=rows < N)


@triton.jit
def _reverse_kl_grad_kernel(H, W, ZE, EH, EW, LSE_S, LSE_E, DIV, G, OUT, N, V, D, DE, v0, C, stride_h,
                            stride_w, stride_ze, stride_eh, stride_ew, inv_T, EXPERT_LOGITS: tl.constexpr,
                            BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    """OUT[:, :C] = d(sum_i g_i KL_i) / dz for columns [v0, v0 + C): g q_k (log q_k - log p_k - KL) / T."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    local = tl.program_id(1).to(tl.int64) * BV + tl.arange(0, BV)
    cols = v0 + local
    vmax = tl.minimum(V, v0 + C)
    zs = _logits_tile(H, W, rows, cols, N, vmax, D, stride_h, stride_w, inv_T, BM, BV, BK, IEEE)
    ze = _expert_tile(ZE, EH, EW, rows, cols, N, vmax, DE, stride_ze, stride_eh, stride_ew, inv_T,
                      EXPERT_LOGITS, BM, BV, BK, IEEE)
    logq = zs - tl.load(LSE_S + rows, mask=rows < N, other=0.0)[:, None]
    logp = ze - tl.load(LSE_E + rows, mask=rows < N, other=0.0)[:, None]
    div = tl.load(DIV + rows, mask=rows < N, other=0.0)
    g = tl.load(G + rows, mask=rows < N, other=0.0)
    q = tl.exp(logq)
    dz = tl.where(q > 0, q * (logq - logp - div[:, None]), 0.0) * (g * inv_T)[:, None]
    tl.store(OUT + rows[:, None] * C + local[None, :], dz.to(OUT.dtype.element_ty),
             mask=(rows[:, None] < N) & (local[None, :] < C))


def _combine_tiles(M, S):
    """Per row, the logsumexp from each tile's (max, sum of exp): max + log(sum_j s_j e^(m_j - max))."""
    m = M.max(0).values
    return m + torch.log((S * torch.exp(M - m)).sum(0))


class _TritonTokenLogprobs(torch.autograd.Function):  # called through token_logprobs_triton
    @staticmethod
    def forward(ctx, h, W, targets, temperature):
        h, W = h.contiguous(), W.contiguous()
        (N, D), V = h.shape, W.shape[0]
        tile, launch = _config(h.dtype)
        valid = targets != IGNORE
        tgt = torch.where(valid, targets, 0).to(torch.int32).contiguous()
        tiles = triton.cdiv(V, tile["BV"])
        M = torch.empty(tiles, N, device=h.device)
        S = torch.empty(tiles, N, device=h.device)
        z_tgt = torch.full((N,), float("nan"), device=h.device)  # a target outside [0, V) gives NaN
        _lse_kernel[(triton.cdiv(N, tile["BM"]), tiles)](
            h, W, tgt, M, S, z_tgt, N, V, D, h.stride(0), W.stride(0), 1.0 / temperature,
            IEEE=h.dtype == torch.float32, **tile, **launch)
        lse = _combine_tiles(M, S)
        ctx.save_for_backward(h, W, tgt, valid, lse)
        ctx.temperature = temperature
        return torch.where(valid, z_tgt - lse, 0.0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        h, W, tgt, valid, lse = ctx.saved_tensors
        g = torch.where(valid, grad_out.float(), 0.0).contiguous()  # ignored rows: zero gradient

        def logit_grad(grid, G, v0, c, tile, launch):
            _grad_kernel[grid](h, W, tgt, lse, g, G, h.shape[0], W.shape[0], h.shape[1], v0, c, h.stride(0),
                               W.stride(0), 1.0 / ctx.temperature, IEEE=h.dtype == torch.float32, **tile, **launch)
        return (*_backward_gemms(h, W, logit_grad, ctx.needs_input_grad[:2]), None, None)


def _backward_gemms(h, W, logit_grad, needs):
    """grad_h, grad_W from the logit gradient G, chunk by chunk: logit_grad(grid, G, v0, c, ...)
    fills G [N, c] for vocabulary columns [v0, v0 + c); then grad_h += G @ W[chunk] (summed in
    fp32) and grad_W[chunk] = G^T @ h, written once."""
    (N, D), V = h.shape, W.shape[0]
    tile, launch = _config(h.dtype)
    grad_h = torch.zeros(N, D, device=h.device) if needs[0] else None
    grad_W = torch.empty_like(W) if needs[1] else None
    # chunk width: a multiple of BV that keeps one [N, C] chunk of G within CHUNK_BYTES
    C = max(tile["BV"], CHUNK_BYTES // (max(1, N) * h.element_size()) // tile["BV"] * tile["BV"])
    C = min(C, triton.cdiv(V, tile["BV"]) * tile["BV"])
    Gc = torch.empty(N * C, device=h.device, dtype=h.dtype)
    for v0 in range(0, V, C):
        c = min(C, V - v0)
        G = Gc[:N * c].view(N, c)  # a short last chunk reuses the same buffer
        logit_grad((triton.cdiv(N, tile["BM"]), triton.cdiv(c, tile["BV"])), G, v0, c, tile, launch)
        if grad_h is not None:
            grad_h += G @ W[v0:v0 + c]
        if grad_W is not None:
            torch.mm(G.T, h, out=grad_W[v0:v0 + c])
    del Gc, G  # before grad_h's cast
    return None if grad_h is None else grad_h.to(h.dtype), grad_W


def _check(h, W, name):
    """One ValueError line for inputs the kernels cannot take."""
    if h.dtype not in (torch.float32, torch.bfloat16, torch.float16) or W.dtype != h.dtype:
        raise ValueError(f"{name} takes fp32/bf16/fp16 h and W of one dtype, not {h.dtype} and {W.dtype}")
    if h.dim() != 2 or W.dim() != 2 or h.shape[1] != W.shape[1]:
        raise ValueError(f"{name} takes h [N, d] and W [V, d], not {tuple(h.shape)} and {tuple(W.shape)}")
    if h.device != W.device:
        raise ValueError(f"{name}: h and W on {h.device} and {W.device}")


def _no_rows(h, W):
    """The [0] result for h with no rows, with no launch: h @ W^T summed over the (empty) rows'
    vocabulary keeps h and W in the graph, so backward gives them zero gradients."""
    return (h @ W.T).float().sum(1)


def token_logprobs_triton(h, W, targets, temperature=1.0, check_targets=True):
    """log p(targets[i] | h[i]) under softmax(h W^T / T), rows with target IGNORE give 0 (and no
    gradient), as kernels.token_logprobs; h [N, d] and W [V, d] fp32, bf16 or fp16, of one dtype
    and on one device with targets [N]; temperature a float. A target neither IGNORE nor in [0, V)
    raises ValueError: one min/max and a sync, which check_targets=False skips (kernels.py has
    checked them; an unchecked bad target gives NaN)."""
    _check(h, W, "token_logprobs_triton")
    if targets.shape != h.shape[:1]:
        raise ValueError(f"token_logprobs_triton takes h [N, d], W [V, d] and targets [N], not "
                         f"{tuple(h.shape)}, {tuple(W.shape)} and {tuple(targets.shape)}")
    if targets.device != h.device:
        raise ValueError(f"token_logprobs_triton: h and targets on {h.device} and {targets.device}")
    if h.shape[0] == 0:  # nothing to launch
        return _no_rows(h, W)
    if check_targets:
        V, t = W.shape[0], torch.where(targets == IGNORE, 0, targets)
        lo, hi = torch.aminmax(t)
        if bool((lo < 0) | (hi >= V)):
            row = int(((t < 0) | (t >= V)).nonzero()[0, 0])
            raise ValueError(f"targets must be in [0, {V}) or IGNORE ({IGNORE}); got {int(targets[row])} at row {row}")
    return _TritonTokenLogprobs.apply(h, W, targets, float(temperature))


class _TritonReverseKL(torch.autograd.Function):  # called through token_reverse_kl_triton
    @staticmethod
    def forward(ctx, h, W, ze, eh, eW, temperature):
        h, W = h.contiguous(), W.contiguous()
        (N, D), V = h.shape, W.shape[0]
        tile, launch = _config(h.dtype)
        tiles = triton.cdiv(V, tile["BV"])
        MS, SS, ME, SE, A = torch.empty(5, tiles, N, device=h.device).unbind(0)
        expert = _expert_args(ze, eh, eW, h)
        _reverse_kl_kernel[(triton.cdiv(N, tile["BM"]), tiles)](
            h, W, *expert[:3], MS, SS, ME, SE, A, N, V, D, expert[3], h.stride(0), W.stride(0), *expert[4:],
            1.0 / temperature, EXPERT_LOGITS=ze is not None, IEEE=h.dtype == torch.float32, **tile, **launch)
        lse_s, lse_e = _combine_tiles(MS, SS), _combine_tiles(ME, SE)
        # a_j e^(ms_j - lse_s) = sum over tile j of q_k (zs_k - ze_k): summed, the first term of the KL
        div = (A * torch.exp(MS - lse_s)).sum(0) - lse_s + lse_e
        ctx.save_for_backward(h, W, *(x for x in (ze, eh, eW) if x is not None), lse_s, lse_e, div)
        ctx.temperature, ctx.expert_logits = temperature, ze is not None
        return div

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        h, W, *expert, lse_s, lse_e, div = ctx.saved_tensors
        ze, eh, eW = (expert[0], None, None) if ctx.expert_logits else (None, *expert)
        expert = _expert_args(ze, eh, eW, h)
        g = grad_out.float().contiguous()

        def logit_grad(grid, G, v0, c, tile, launch):
            _reverse_kl_grad_kernel[grid](
                h, W, *expert[:3], lse_s, lse_e, div, g, G, h.shape[0], W.shape[0], h.shape[1], expert[3], v0, c,
                h.stride(0), W.stride(0), *expert[4:], 1.0 / ctx.temperature, EXPERT_LOGITS=ctx.expert_logits,
                IEEE=h.dtype == torch.float32, **tile, **launch)
        return (*_backward_gemms(h, W, logit_grad, ctx.needs_input_grad[:2]), None, None, None, None)


def _expert_args(ze, eh, eW, h):
    """(ZE, EH, EW, DE, stride_ze, stride_eh, stride_ew) for the kernels; the unused form gets
    h as a placeholder pointer (never read: EXPERT_LOGITS picks the branch at compile time)."""
    if ze is not None:
        return ze, h, h, 1, ze.stride(0), 0, 0
    return h, eh, eW, eh.shape[1], 0, eh.stride(0), eW.stride(0)


def token_reverse_kl_triton(h, W, expert, temperature=1.0):
    """Per-row KL(student || expert) of softmax(h W^T / T) against the expert's softmax, as
    kernels.token_divergence(h, W, expert, "reverse"): online IL's divergence. expert: its
    logits [N, V], or (expert_h [N, d_e], expert_W [V, d_e]) evaluated tile by tile, cast to
    h's dtype (kernels.py keeps the expert's own); no gradient flows to the expert. An expert
    logit of -inf where the student puts mass gives KL = inf. Like kernels.py, the KL is a
    difference of O(logit) terms: near zero it carries ~1e-6 of their size (and can dip below 0)."""
    _check(h, W, "token_reverse_kl_triton")
    N, V = h.shape[0], W.shape[0]
    if torch.is_tensor(expert):
        ze, eh, eW = expert.detach().contiguous(), None, None
        if ze.dim() != 2:
            raise ValueError(f"expert logits must be [N, V]; got {tuple(ze.shape)}")
        if ze.shape[1] != V:
            raise ValueError(f"expert logits have {ze.shape[1]} columns, the student's vocabulary has {V}")
        if ze.shape[0] != N:
            raise ValueError(f"expert logits have {ze.shape[0]} rows, the student's h has {N}")
        devices = (ze.device,)
    else:
        if len(expert) != 2 or not all(torch.is_tensor(x) and x.dim() == 2 for x in expert) or \
                expert[0].shape[1] != expert[1].shape[1]:
            raise ValueError("expert must be logits [N, V] or a pair (expert_h [N, d_e], expert_W [V, d_e])")
        ze, (eh, eW) = None, (x.detach().contiguous().to(h.dtype) for x in expert)
        if eW.shape[0] != V:
            raise ValueError(f"expert_W has {eW.shape[0]} rows, the student's W (vocabulary) has {V}")
        if eh.shape[0] != N:
            raise ValueError(f"expert_h has {eh.shape[0]} rows, the student's h has {N}")
        devices = (eh.device, eW.device)
    if any(dev != h.device for dev in devices):
        raise ValueError(f"token_reverse_kl_triton: the expert on {', '.join(map(str, devices))}, h on {h.device}")
    if N == 0:  # nothing to launch
        return _no_rows(h, W)
    return _TritonReverseKL.apply(h, W, ze, eh, eW, float(temperature))
