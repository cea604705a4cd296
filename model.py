"""A small causal GPT (nanoGPT-style), expert/student sizing, KV-cache sampling, checkpoints.

Sequences are laid out as  [left-padded prompt | response, right-padded]. Padding is masked
out of attention and positions count real tokens only, so a padded batch computes exactly
what each row would compute alone, and every prompt ends at the same column: sampling
appends one column per step for the whole batch.
"""
import hashlib
import math
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import OneLineParser, UsageError
from kernels import IGNORE, token_logprobs


@dataclass
class GPTConfig:
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    block_size: int = 32  # context length: longest prompt + response + begin/end tokens
    vocab_size: int = 22

    def __post_init__(self):
        for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            if getattr(self, k) < 1:
                raise UsageError(f"{k} must be at least 1, got {getattr(self, k)}")
        if self.n_embd % self.n_head:
            raise UsageError(f"width {self.n_embd} is not divisible by {self.n_head} heads")


# Named sizes, each with the learning rate it trains well at (smaller models take larger
# steps). On the default (mirror) task, "medium" is the expert and a realizable student (the
# same class); "small" has one layer, cannot compose two attention lookups, and is
# misspecified (see data.py). "tiny" is for tests; "large" for countdown's expert. At 3e-3
# "medium" stalls on a plateau on some seeds (RESULTS.md, "Training that converges").
SIZES = {
    "tiny": dict(n_layer=1, n_head=2, n_embd=8, lr=1e-2),
    "small": dict(n_layer=1, n_head=1, n_embd=16, lr=1e-2),
    "medium": dict(n_layer=2, n_head=4, n_embd=64, lr=1e-3),
    "large": dict(n_layer=4, n_head=4, n_embd=128, lr=5e-4),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x, attn_mask, cache=None, start=0):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:  # write this step's keys/values, attend over everything so far
            cache[0][:, :, start:start + T] = k
            cache[1][:, :, start:start + T] = v
            k, v = cache[0][:, :, :start + T], cache[1][:, :, :start + T]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd))

    def forward(self, x, attn_mask, cache=None, start=0):
        x = x + self.attn(self.ln1(x), attn_mask, cache, start)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)  # tied: also the unembedding
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def n_params(self):
        return sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()

    @property
    def unembedding(self):
        return self.wte.weight  # [V, d]

    def forward(self, tokens, valid, cache=None, start=0, pos=None):
        """Final hidden states [B, T, d] (after the last LayerNorm).
        valid [B, start+T]: which key columns are real tokens (False on padding)."""
        B, T = tokens.shape
        # positions count real tokens, so each is below start + T: a check on shapes, no device sync
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} columns (padding included) exceeds "
                             f"block_size {self.cfg.block_size}")
        if pos is None:  # positions count real tokens only, so padding shifts nothing
            pos = (valid.long().cumsum(1) - 1).clamp(min=0)[:, start:start + T]
        key = torch.arange(start + T, device=tokens.device)[None, :]
        query = torch.arange(start, start + T, device=tokens.device)[:, None]
        # a query sees earlier real keys, and always itself (so a pad row is never all -inf)
        attn_mask = ((key <= query) & valid[:, None, :start + T]) | (key == query)
        x = self.wte(tokens) + self.wpe(pos)
        for i, blk in enumerate(self.blocks):
            x = blk(x, attn_mask[:, None], None if cache is None else cache[i], start)
        return self.ln_f(x)

    def logits(self, tokens, valid):
        """Full logits [B, T, V], for reading and small checks; the losses use kernels.py."""
        return self(tokens, valid) @ self.unembedding.T

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(self, prompt, prompt_valid, max_new_tokens, end_token, pad_token,
                 temperature=1.0, top_k=None, generator=None, use_cache=True):
        """Sample responses for a left-padded prompt batch.
        Returns responses [B, R] (padded after each row's end token) and mask [B, R] of
        real tokens (the end token included: the student must learn to stop)."""
        B, P = prompt.shape
        dev = prompt.device
        tokens = torch.cat([prompt, torch.full((B, max_new_tokens), pad_token, device=dev)], 1)
        valid = torch.cat([prompt_valid, torch.ones(B, max_new_tokens, dtype=torch.bool, device=dev)], 1)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        diverged = torch.zeros((), dtype=torch.bool, device=dev)
        mask = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=dev)
        n_prompt = prompt_valid.sum(1)
        if use_cache:
            hs = self.cfg.n_embd // self.cfg.n_head
            shape = (B, self.cfg.n_head, P + max_new_tokens, hs)
            dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.float32
            cache = [(torch.empty(shape, device=dev, dtype=dtype), torch.empty(shape, device=dev, dtype=dtype))
                     for _ in self.blocks]
            h = self(prompt, prompt_valid, cache, 0)[:, -1]
        for t in range(max_new_tokens):
            if not use_cache:  # the reference: recompute the whole prefix every step
                h = self(tokens[:, :P + t], valid[:, :P + t])[:, -1]
            with torch.autocast(dev.type, enabled=False):  # fp32 logits, as training scores them (kernels.py)
                logits = (h.float() @ self.unembedding.float().T) / max(temperature, 1e-8)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, -math.inf)
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:  # NaN or +inf logits (top_k's -inf is fine) would make multinomial raise: noted, then raised below
                finite = (logits < math.inf).all(-1, keepdim=True)
                diverged |= ~finite.all()
                nxt = torch.multinomial(F.softmax(torch.where(finite, logits, 0.0), -1), 1, generator=generator).squeeze(1)
            nxt = torch.where(done, pad_token, nxt)
            mask[:, t] = ~done
            tokens[:, P + t] = nxt
            done |= nxt == end_token
            stop, bad = torch.stack([done.all(), diverged]).tolist()  # the step's one read from the device
            if bad:
                raise FloatingPointError("non-finite logits while sampling (the weights have diverged)")
            if stop or t == max_new_tokens - 1:
                break
            if use_cache:
                pos = (n_prompt + t)[:, None]
                h = self(nxt[:, None], valid[:, :P + t + 1], cache, P + t, pos)[:, -1]
        R = int(mask.sum(1).max())  # the longest response; the rest is padding everywhere
        return tokens[:, P:P + R], mask[:, :R]


def response_hidden(model, prompt, prompt_valid, responses, response_mask):
    """Hidden states that predict each response token: [B, R, d]. The state at column P-1+t
    (last prompt token, then response tokens) predicts token t. `model` may be wrapped
    (DistributedDataParallel, torch.compile): calling it is what syncs gradients."""
    P = prompt.shape[1]
    tokens = torch.cat([prompt, responses], 1)
    valid = torch.cat([prompt_valid, response_mask], 1)
    return model(tokens, valid)[:, P - 1:-1]


def unwrap(model):
    """The GPT inside a DistributedDataParallel or torch.compile wrapper."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def response_logprobs(model, prompt, prompt_valid, responses, response_mask, fused=True):
    """log pi(y_t | x, y_<t) of each response token [B, R]; 0 on padding (which gets no gradient)."""
    h = response_hidden(model, prompt, prompt_valid, responses, response_mask)
    targets = torch.where(response_mask, responses, IGNORE)
    return token_logprobs(h.flatten(0, 1), unwrap(model).unembedding, targets.flatten(), fused=fused).view(responses.shape)


def size_spec(size):
    """A named size, or 'LxWxH' (layers x width x heads, e.g. 1x16x1) with lr 3e-3."""
    if size in SIZES:
        return SIZES[size]
    try:
        n_layer, n_embd, n_head = (int(x) for x in size.split("x"))
    except ValueError:
        raise UsageError(f"unknown model size {size!r}; choose from {sorted(SIZES)} or LxWxH") from None
    return dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, lr=3e-3)


def make_model(size, block_size, vocab_size, seed):
    """A freshly initialised GPT of a named size. Its init comes from `seed` alone (a private
    RNG stream, on the CPU), so building one model never shifts another's init."""
    shape = {k: v for k, v in size_spec(size).items() if k != "lr"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT(GPTConfig(**shape, block_size=block_size, vocab_size=vocab_size))


# ----------------------------------------------------------------------------- checkpoints
def write_atomic(path, write):
    """write(tmp) writes the file at a temporary path beside `path`, which then replaces `path`
    in one rename: a reader (a resumed run, the experiments' "done" check) never sees half a
    file, and a write that fails leaves the old file as it was."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path, model, **extra):
    """The model, its shape and `extra`, written atomically: a crash mid-write never leaves a
    damaged checkpoint where a good one was."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    state = {**extra, "model": model.state_dict(), "model_args": asdict(model.cfg)}
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def fingerprint(model):
    """A short hash of a model's weights: which expert a student was trained against."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def load_checkpoint(path, expect=None, device="cpu"):
    """Load a checkpoint and its GPT; refuse one whose recorded fields differ from `expect`
    (task, tokenizer identity, size ...), or whose model_args GPTConfig does not know, with a
    one-line UsageError naming the file."""
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such checkpoint")
    try:
        ck = torch.load(path, map_location=device, weights_only=True)  # tensors and plain data only: no code runs
        unknown = sorted(set(ck["model_args"]) - {f.name for f in fields(GPTConfig)})
        if not unknown:
            model = GPT(GPTConfig(**ck["model_args"]))
            model.load_state_dict(ck["model"])
    except Exception as e:  # corrupt or foreign file: say so, in one line
        raise UsageError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e)[:100]})") from None
    if unknown:
        raise UsageError(f"{path}: made by an older version of this code (model_args has "
                         f"{', '.join(map(repr, unknown))}); train it again")
    for k, v in (expect or {}).items():
        if ck.get(k) != v:
            raise UsageError(f"{path}: made for {k}={ck.get(k)!r}, but this run needs {k}={v!r}")
    return model.to(device), ck


if __name__ == "__main__":
    OneLineParser(description="The named sizes (model.SIZES): their shapes, learning rates and parameter counts.").parse_args()
    for name, spec in SIZES.items():
        n = make_model(name, 16, 22, seed=0).n_params()
        print(f"{name:<7} layers {spec['n_layer']}, width {spec['n_embd']:>3}, heads {spec['n_head']}, "
              f"lr {spec['lr']:<6g} {n:>8,} parameters (excluding position embeddings)")
