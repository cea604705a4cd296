"""Tokenizer and tasks with verifiable rewards.

Every task gives three things: a prompt generator, a verifier (reward 1 or 0) and a
ground-truth sampler that draws *uniformly among all valid answers*. Training the expert on
that sampler makes the expert multimodal, which is what the paper's story is about: an
offline (SFT) student must cover every mode of the expert, an online student may pick one.

Tasks
-----
mirror (default): the prompt is n random digits and '='; a correct answer names a direction
    and reads H digits from that end of the prompt: ``31415= -> +31415`` (forward) or
    ``31415= -> -51413`` (backward). The expert (2 layers x 4 heads) learns both, half the time
    each. After the sign, each digit is a copy from one of two places (position t, or
    position n-1-t), chosen by the sign: the model must read the sign *and* the right digit.
    The 1-layer, 1-head student reads one place per step (a single softmax over the context),
    so it cannot make its digits depend on the sign it wrote: it is *misspecified*. It can
    still represent one mode perfectly (always "+", then copy position t: a fixed positional
    lookup), so the misspecification is *reward-relative*: some high-reward behaviour is in
    reach (RESULTS.md, "How misspecified is the student?", measures it per answer position).
    --no-sign drops the sign: the direction is then implicit in the first digit, and
    keeping to it at the second digit needs an equality test (is the first digit d_0 or
    d_{n-1}?) that a 2-layer model learns late or never on some seeds (RESULTS.md, "Training
    that converges").
pointer (the horizon task): the prompt is n >= 10 random digits and '='; the answer reads H
    digits, either copying them (``+``: d_0 d_1 ...) or following each one as a pointer into
    the prompt (``-``: d[d_0] d[d_1] ...): ``3141592653= -> +3141`` or ``-1432``. Copying is a
    positional lookup the 1-layer student can make; following a pointer needs two lookups in a
    row (read d_i, then read the place it names), which one attention layer cannot compose, so
    the student can never write a "-" answer and is misspecified at every H, H=1 included.
    --no-copy: "+" follows the pointers (d[d_0] ...) and "-" follows them from the far end
    (d[n-1-d_0] ...): neither is in the student's reach (only where one happens to equal a copy,
    d_0 = 0 or n-1), so the misspecification is not reward-relative: the paper's case where
    online IL cannot win either.
    --no-sign with H=1: the answer is one digit, d_0 or d[d_0], with nothing before it: the
    single-token case of the paper's H=1 bottleneck.
countdown (the paper's task, countdown.py): given n numbers and a target, reach the target with
    + - * /, using every given number exactly once, as written steps (``3,7,25;54= -> 25-7=18,18*3=54``)
    or one expression.

Verifiers take the model's text as untrusted: mirror and pointer compare it with the valid
answers; countdown's (countdown.py) parses it with exact rational arithmetic, and nothing the
model writes ever reaches eval/exec. Any malformed answer scores 0, never an exception.
"""
import zlib
from dataclasses import dataclass, field, fields

import tiktoken
import torch

from countdown import CountdownTask, randint  # randint: the seeded draw every task uses
from errors import UsageError

# ----------------------------------------------------------------------------- tokenizer
ALPHABET = "0123456789+-*/()=,;"
BOS, END, PAD = "<|bos|>", "<|end|>", "<|pad|>"


class Tokenizer:
    """A tiktoken.Encoding built from ranks defined here (tiktoken's named encodings are
    downloaded files; this one needs nothing). One token per character, or with numbers=True
    one token per number below 1000, as GPT-4's tokenizer splits digits into runs of up to
    three: countdown's arithmetic is then a lookup on whole numbers, not carries across digit
    tokens (RESULTS.md, "Countdown")."""

    def __init__(self, alphabet=ALPHABET, numbers=False):
        self.alphabet, self.chars = alphabet, set(alphabet)
        ranks = {c.encode(): i for i, c in enumerate(alphabet)}
        if numbers:  # 10..999 as single tokens; "1234" is 123 4, "091" is 0 91 (BPE merges)
            ranks.update({str(n).encode(): len(alphabet) + n - 10 for n in range(10, 1000)})
        n = len(ranks)
        specials = {BOS: n, END: n + 1, PAD: n + 2}
        # pat_str cuts text into single characters (and runs of up to 3 digits with numbers),
        # each piece then a whole token, looked up directly.
        self.enc = tiktoken.Encoding(name="chars", pat_str=r"[0-9]{1,3}|[\s\S]" if numbers else r"[\s\S]",
                                     mergeable_ranks=ranks, special_tokens=specials)
        self.bos, self.end, self.pad = specials[BOS], specials[END], specials[PAD]
        self.vocab_size = n + 3
        self.identity = f"{'numbers' if numbers else 'chars'}:{alphabet}"  # stored in checkpoints, checked on load

    def encode(self, text):
        if not set(text) <= self.chars:
            c = next(c for c in text if c not in self.chars)
            raise ValueError(f"character {c!r} is not in the task alphabet {self.alphabet!r}")
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        """Text of the tokens before the first end token. A stray special token prints as
        its name (e.g. <|pad|>), so a response containing one fails every verifier."""
        ids = list(ids)
        return self.enc.decode(ids[:ids.index(self.end)] if self.end in ids else ids)


def decode_responses(tok, responses, mask):
    """Texts of a sampled response batch [B, R] with its mask of real tokens."""
    return [tok.decode(r[m].tolist()) for r, m in zip(responses, mask)]


def encode_prompts(tok, prompts, device="cpu"):
    """Left-padded prompt batch: tokens [B, P] and valid [B, P] (False on padding).
    Left padding makes every prompt end at the same column, so sampling appends in lockstep."""
    rows = [[tok.bos] + tok.encode(p) for p in prompts]
    P = max(len(r) for r in rows)
    tokens = torch.tensor([[tok.pad] * (P - len(r)) + r for r in rows], dtype=torch.long)  # one copy, not one per row
    valid = torch.tensor([[False] * (P - len(r)) + [True] * len(r) for r in rows], dtype=torch.bool)
    return tokens.to(device), valid.to(device)


def encode_responses(tok, responses, device="cpu"):
    """Right-padded response batch ending in the end token: tokens [B, R], mask [B, R]."""
    rows = [tok.encode(r) + [tok.end] for r in responses]
    R = max(len(r) for r in rows)
    tokens = torch.tensor([r + [tok.pad] * (R - len(r)) for r in rows], dtype=torch.long)
    mask = torch.tensor([[True] * len(r) + [False] * (R - len(r)) for r in rows], dtype=torch.bool)
    return tokens.to(device), mask.to(device)


def collate(rows, tok):
    """Concatenate chunks whose padded widths differ (prompts left-padded, responses right)."""
    P = max(r["prompt"].shape[1] for r in rows)
    R = max(r["response"].shape[1] for r in rows)
    out = {}
    for k in rows[0]:
        parts = []
        for r in rows:
            x = r[k]
            if k.startswith("prompt"):  # left pad
                fill = tok.pad if k == "prompt" else False
                x = torch.cat([torch.full((x.shape[0], P - x.shape[1]), fill, dtype=x.dtype, device=x.device), x], 1)
            elif x.shape[1] < R:  # right pad
                fill = tok.pad if k == "response" else 0
                pad = torch.full((x.shape[0], R - x.shape[1], *x.shape[2:]), fill, dtype=x.dtype, device=x.device)
                x = torch.cat([x, pad], 1)
            parts.append(x)
        out[k] = torch.cat(parts)
    return out


# ----------------------------------------------------------------------------- tasks
def flag(default, help, choices=None):
    """A task field that is also a train.py flag (--name, in the task's --help group): its
    default, one line of help, and its choices. Fields without it are internal."""
    return field(default=default, metadata=dict(help=help, choices=choices))


class Task:
    """What every task gives: name (its key in TASKS), sample_prompt(g), answers(prompt) (every
    valid answer), max_prompt_len, max_response_len, n_prompts (distinct prompts), and these two,
    which a task may override: the verifier, and the ground-truth sampler the expert trains on."""

    def reward(self, prompt, response):
        return float(response in self.answers(prompt))

    def sample_answer(self, prompt, g):
        """Ground truth: uniform over *all* valid answers, so the expert learns every mode."""
        answers = self.answers(prompt)
        return answers[randint(0, len(answers) - 1, g)]


class _Digits(Task):
    """What mirror and pointer share: a prompt of `digits` random digits and '=', an answer of
    a sign (optional) and H digits, and the weight of the "+" mode in the expert's ground truth."""

    def check(self, min_digits):
        if self.digits < min_digits:
            raise UsageError(f"{self.name} needs at least {min_digits} digits")
        if not 1 <= self.answer_len <= self.digits:
            raise UsageError(f"{self.name} answer length must be in 1..{self.digits}")
        if not 0 < self.mode_weight < 1 or (self.mode_weight != 0.5 and not self.sign):
            raise UsageError("--mode-weight is a probability in (0, 1), for a task with a sign")

    @property
    def max_prompt_len(self):
        return self.digits + 1

    @property
    def max_response_len(self):
        return self.answer_len + self.sign

    @property
    def n_prompts(self):
        return 10 ** self.digits

    def sample_prompt(self, g):
        return "".join(str(randint(0, 9, g)) for _ in range(self.digits)) + "="

    def sample_answer(self, prompt, g):
        """The "+" answer with probability mode_weight (the weight of the mode the 1-layer
        student can represent; research/toy.py, the mode-weight law); at 1/2, uniform over the answers."""
        if self.mode_weight == 0.5:
            return super().sample_answer(prompt, g)
        plus, minus = self.answers(prompt)
        return plus if float(torch.rand(1, generator=g)) < self.mode_weight else minus


SIGN = "the answer starts with + or - naming its mode (off: implicit)"
MODE_WEIGHT = "the expert's ground truth is the + answer with this probability"


@dataclass
class MirrorTask(_Digits):
    """Name a direction, then read H digits from that end of an n-digit prompt (module docstring)."""
    digits: int = flag(5, "prompt digits")
    answer_len: int = flag(0, "answer digits H (0: mirror reads all of them)")
    sign: bool = flag(True, SIGN)
    mode_weight: float = flag(0.5, MODE_WEIGHT)
    name: str = "mirror"

    def __post_init__(self):
        self.answer_len = self.answer_len or self.digits
        self.check(min_digits=2)

    def answers(self, prompt):
        d, H = prompt[:-1], self.answer_len
        if self.sign:  # two answers always, even where the two readings coincide
            return ["+" + d[:H], "-" + d[::-1][:H]]
        return sorted({d[:H], d[::-1][:H]})


@dataclass
class PointerTask(_Digits):
    """Copy H digits, or follow each as a pointer into the prompt (module docstring)."""
    digits: int = flag(10, "prompt digits")
    answer_len: int = flag(1, "answer digits H")
    sign: bool = flag(True, SIGN)
    mode_weight: float = flag(0.5, MODE_WEIGHT)
    copy: bool = flag(True, "+ copies (off: + and - both follow pointers, neither in a 1-layer student's reach)")
    name: str = "pointer"

    def __post_init__(self):
        self.check(min_digits=10)  # every digit must name a place

    def answers(self, prompt):
        d, H = prompt[:-1], self.answer_len
        follow = "".join(d[int(c)] for c in d[:H])
        first = d[:H] if self.copy else follow  # without copy, no answer is one lookup away
        second = follow if self.copy else "".join(d[len(d) - 1 - int(c)] for c in d[:H])
        if self.sign:
            return ["+" + first, "-" + second]
        return sorted({first, second})


# Every task, by its --task name. A task is a dataclass whose flag() fields are its flags:
# train.py builds --task's choices, the flags and their --help from this dict alone.
TASKS = dict(mirror=MirrorTask, pointer=PointerTask, countdown=CountdownTask)


def task_flags(name):
    """{field: dataclasses.Field} of the task's flags."""
    return {f.name: f for f in fields(TASKS[name]) if "help" in f.metadata}


def make_task(name, **kwargs):
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name](**kwargs)


def task_tokenizer(task):
    """The tokenizer a task's checkpoints use: whole numbers for countdown (number_tokens)."""
    return Tokenizer(numbers=getattr(task, "number_tokens", False))


# ----------------------------------------------------------------------------- prompts and seeds
def seed_for(seed, role, rank=0):
    """The seed of one role's generator (an init, a data stream, a sampler), derived from
    --seed, the role's name and the rank alone. Every model and stream has its own, so the
    expert of a seed is the same whatever the student size, mode or order of runs."""
    return zlib.crc32(f"{seed}/{role}/{rank}".encode())


# the role of the prompt stream each kind of run trains on (train.py draws from them; eval.py
# --draws draws the same prompts again), by the first word of the run's checkpoint name
PROMPT_STREAMS = dict(expert="expert/prompts", base="base/data", sft="sft/data", onpolicy="online/prompts")


def eval_prompts(task, n, seed=1234):
    """Held-out prompts fixed by a seed; training prompts exclude them (see PromptStream)."""
    if n >= task.n_prompts:  # at once, not after drawing for minutes
        raise UsageError(f"task {task.name} has at most {task.n_prompts:,} distinct prompts: --eval-prompts {n:,} "
                         f"would leave none (or too few) to train on")
    g = torch.Generator().manual_seed(seed)
    out, seen = [], set()
    for _ in range(50 * n):
        p = task.sample_prompt(g)
        if p not in seen:
            seen.add(p)
            out.append(p)
            if len(out) == n:
                return out
    raise UsageError(f"task {task.name} has fewer than {n} distinct prompts")


class PromptStream:
    """Training prompts from a seeded generator, never one of the held-out prompts."""

    def __init__(self, task, held_out, seed):
        self.task, self.held_out = task, set(held_out)
        self.g = torch.Generator().manual_seed(seed)

    def batch(self, n, max_misses=10_000):
        out, misses = [], 0
        while len(out) < n:
            p = self.task.sample_prompt(self.g)
            if p not in self.held_out:
                out.append(p)
                misses = 0
            elif (misses := misses + 1) == max_misses:  # the held-out set covers (nearly) every prompt
                raise UsageError(f"{max_misses:,} training prompts drawn in a row were all held out: task "
                                 f"{self.task.name} has too few distinct prompts for --eval-prompts {len(self.held_out)}")
        return out
