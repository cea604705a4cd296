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
    reach (README, "How misspecified is the student?", measures it per answer position).
    --no-sign drops the sign: the direction is then implicit in the first digit, and
    keeping to it at the second digit needs an equality test (is the first digit d_0 or
    d_{n-1}?) that a 2-layer model learns late or never on some seeds (README, "Training that
    converges").
pointer (the horizon task): the prompt is n >= 10 random digits and '='; the answer reads H
    digits, either copying them (``+``: d_0 d_1 ...) or following each one as a pointer into
    the prompt (``-``: d[d_0] d[d_1] ...): ``3141592653= -> +3141`` or ``-1432``. Copying is a
    positional lookup the 1-layer student can make; following a pointer needs two lookups in a
    row (read d_i, then read the place it names), which one attention layer cannot compose, so
    the student can never write a "-" answer and is misspecified at every H, H=1 included.
    --no-sign with H=1: the answer is one digit, d_0 or d[d_0], with nothing before it: the
    single-token case of the paper's H=1 bottleneck.
countdown (the paper's task): given n numbers and a target, reach the target with + - * /,
    using every given number exactly once. Two answer formats (a task field, so checkpoints
    record it):
    steps (default): the computation written out, one operation per step, as in the Countdown
        game: ``3,7,25;54= -> 25-7=18,18*3=54``. Each step combines two numbers still
        available (given, or an earlier step's result) into a positive integer (the game's
        rule: no negative or fractional intermediates); every given number and every
        intermediate result is used exactly once; the last result is the target. Each
        operation's result is written before it is used, so the model does one operation at a
        time instead of evaluating a whole expression in its head.
    expression: one expression with parentheses, ``3,7,25;54= -> (25-7)*3``.
    Ground truth is every valid answer of the format, found by exhaustive search. With three
    numbers both formats reach the same targets (every fractional or negative intermediate can
    be reordered away; tests/test_data.py checks it), so their prompts are the same.
    Countdown is tokenized with one token per number (Tokenizer(numbers=True), number_tokens),
    so `25-7=18` is five tokens and an operation is a lookup on whole numbers, not carries
    across digit tokens (measured in README, "Countdown"; --no-number-tokens for digits).

The verifiers parse untrusted model text with exact rational arithmetic; nothing the model
writes ever reaches eval/exec. Any malformed answer scores 0, never an exception.
"""
import itertools
import re
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

import tiktoken
import torch

from errors import UsageError

# ----------------------------------------------------------------------------- tokenizer
ALPHABET = "0123456789+-*/()=,;"
BOS, END, PAD = "<|bos|>", "<|end|>", "<|pad|>"


class Tokenizer:
    """A tiktoken.Encoding built from ranks defined here (tiktoken's named encodings are
    downloaded files; this one needs nothing). One token per character, or with numbers=True
    one token per number below 1000, as GPT-4's tokenizer splits digits into runs of up to
    three: countdown's arithmetic is then a lookup on whole numbers, not carries across digit
    tokens (README, "Countdown")."""

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
def _randint(lo, hi, g):
    """Uniform integer in [lo, hi] from a seeded torch.Generator (so runs repeat exactly)."""
    return lo + int(torch.randint(hi - lo + 1, (1,), generator=g))


class _Digits:
    """What mirror and pointer share: a prompt of `digits` random digits and '=', an answer of
    a sign (optional) and H digits, reward 1 for any of the task's valid answers."""

    @property
    def max_prompt_len(self):
        return self.digits + 1

    @property
    def max_response_len(self):
        return self.answer_len + self.sign

    def sample_prompt(self, g):
        return "".join(str(_randint(0, 9, g)) for _ in range(self.digits)) + "="

    def reward(self, prompt, response):
        return float(response in self.answers(prompt))


@dataclass
class MirrorTask(_Digits):
    """Name a direction, then read H digits from that end of an n-digit prompt (module docstring)."""
    digits: int = 5
    answer_len: int = 0  # H; 0 means H = digits
    sign: bool = True  # the answer starts with + (forward) or - (backward)
    name: str = "mirror"

    def __post_init__(self):
        if self.digits < 2:
            raise UsageError("mirror needs at least 2 digits")
        self.answer_len = self.answer_len or self.digits
        if not 1 <= self.answer_len <= self.digits:
            raise UsageError(f"mirror answer length must be in 1..{self.digits}")

    def answers(self, prompt):
        d, H = prompt[:-1], self.answer_len
        if self.sign:  # two answers always, even where the two readings coincide
            return ["+" + d[:H], "-" + d[::-1][:H]]
        return sorted({d[:H], d[::-1][:H]})


@dataclass
class PointerTask(_Digits):
    """Copy H digits, or follow each as a pointer into the prompt (module docstring)."""
    digits: int = 10
    answer_len: int = 1  # H
    sign: bool = True  # the answer starts with + (copy) or - (pointer)
    name: str = "pointer"

    def __post_init__(self):
        if self.digits < 10:
            raise UsageError("pointer needs at least 10 digits (every digit must name a place)")
        if not 1 <= self.answer_len <= self.digits:
            raise UsageError(f"pointer answer length must be in 1..{self.digits}")

    def answers(self, prompt):
        d, H = prompt[:-1], self.answer_len
        copy, follow = d[:H], "".join(d[int(c)] for c in d[:H])
        if self.sign:
            return ["+" + copy, "-" + follow]
        return sorted({copy, follow})


# countdown: expressions are (value, text, precedence) with precedence 1 for +-, 2 for */, 3 atoms
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def _combine(op, left, right):
    lv, lt, lp = left
    rv, rt, rp = right
    p = _PREC[op]
    if op == "/" and rv == 0:
        return None
    v = {"+": lambda: lv + rv, "-": lambda: lv - rv, "*": lambda: lv * rv, "/": lambda: lv / rv}[op]()
    lt = f"({lt})" if lp < p else lt  # minimal parentheses: only where precedence demands
    rt = f"({rt})" if rp < p or (rp == p and op in "-/") else rt
    return v, lt + op + rt, p


@lru_cache(maxsize=4096)
def _ordered_exprs(nums):
    """All expressions over the numbers in this order (every binary tree, every operator)."""
    if len(nums) == 1:
        return [(Fraction(nums[0]), str(nums[0]), 3)]
    out = []
    for i in range(1, len(nums)):
        for left in _ordered_exprs(nums[:i]):
            for right in _ordered_exprs(nums[i:]):
                for op in "+-*/":
                    e = _combine(op, left, right)
                    if e is not None:
                        out.append(e)
    return out


@lru_cache(maxsize=4096)
def countdown_solutions(nums):
    """{value: sorted distinct expression texts} using every number exactly once."""
    by_value = {}
    for perm in set(itertools.permutations(nums)):
        for v, text, _ in _ordered_exprs(perm):
            by_value.setdefault(v, set()).add(text)
    return {v: sorted(t) for v, t in by_value.items()}


@lru_cache(maxsize=65536)
def _targets(nums, max_target, fmt):
    """The reachable integer targets in 1..max_target, sorted (cached: prompts repeat them)."""
    solutions = countdown_step_solutions if fmt == "steps" else countdown_solutions
    return tuple(int(v) for v in sorted(solutions(nums)) if v.denominator == 1 and 1 <= v <= max_target)


@lru_cache(maxsize=4096)
def countdown_step_solutions(nums):
    """{value: sorted distinct written-step answers} using every number exactly once. A step
    takes two numbers still available (either order), the result must be a positive integer
    and joins the available numbers; the last result is the value."""
    by_value = {}

    def search(pool, steps):
        if len(pool) == 1:
            by_value.setdefault(pool[0], set()).add(",".join(steps))
            return
        for i, j in itertools.permutations(range(len(pool)), 2):
            x, y = pool[i], pool[j]
            rest = [v for k, v in enumerate(pool) if k not in (i, j)]
            for op, z in (("+", x + y), ("-", x - y), ("*", x * y), ("/", x // y if x % y == 0 else 0)):
                if z > 0:
                    search(rest + [z], steps + [f"{x}{op}{y}={z}"])

    search(list(nums), [])
    return {v: sorted(t) for v, t in by_value.items()}


# one written step: positive integers without leading zeros ([0-9] is ASCII only, unlike \d)
# (at most 20 digits: enough for any answer the task allows, and Fraction never meets a huge number)
_STEP = re.compile(r"([1-9][0-9]{0,19})([-+*/])([1-9][0-9]{0,19})=([1-9][0-9]{0,19})")


def check_steps(nums, target, text):
    """Is `text` a valid written-steps answer? Each step's arithmetic is checked exactly
    (Fractions: 7/2=3 is wrong, not rounded), its operands must still be available, and the
    number of steps is fixed (n-1), so every given number and every result is used once."""
    pool, steps = list(nums), text.split(",")
    if len(steps) != len(nums) - 1:
        return False
    for step in steps:
        m = _STEP.fullmatch(step)
        if m is None:
            return False
        x, op, y, z = Fraction(m[1]), m[2], Fraction(m[3]), Fraction(m[4])
        for v in (x, y):  # a number used twice, or one never given or computed, is not in the pool
            if v not in pool:
                return False
            pool.remove(v)
        if {"+": x + y, "-": x - y, "*": x * y, "/": x / y}[op] != z:  # y >= 1: no division by zero
            return False
        pool.append(z)
    return z == target


class _Parser:
    """Recursive-descent parser with exact rationals; raises ValueError on anything off."""

    def __init__(self, text):
        self.s, self.i, self.used = text, 0, []

    def parse(self):
        v = self.expr()
        if self.i != len(self.s):
            raise ValueError("trailing text")
        return v

    def peek(self):
        return self.s[self.i] if self.i < len(self.s) else ""

    def expr(self):
        v = self.term()
        while self.peek() in ("+", "-"):
            op = self.s[self.i]; self.i += 1
            v = v + self.term() if op == "+" else v - self.term()
        return v

    def term(self):
        v = self.factor()
        while self.peek() in ("*", "/"):
            op = self.s[self.i]; self.i += 1
            r = self.factor()
            if op == "/" and r == 0:
                raise ValueError("division by zero")
            v = v * r if op == "*" else v / r
        return v

    def factor(self):
        if self.peek() == "(":
            self.i += 1
            v = self.expr()
            if self.peek() != ")":
                raise ValueError("unbalanced parentheses")
            self.i += 1
            return v
        j = self.i
        while self.peek().isdigit() and self.peek().isascii():
            self.i += 1
        if j == self.i or self.i - j > 6:
            raise ValueError("expected a number")
        if self.s[j] == "0" and self.i - j > 1:  # 02 or 0003: the ground truth never writes them
            raise ValueError("leading zero")
        self.used.append(int(self.s[j:self.i]))
        return Fraction(self.used[-1])


@dataclass
class CountdownTask:
    """Countdown: numbers;target= -> written steps (or one expression) using each number once."""
    n_numbers: int = 3
    max_number: int = 20
    max_target: int = 100
    name: str = "countdown"
    max_answer_chars: int = 64  # longer answers score 0 (and keep parsing cheap)
    format: str = "steps"  # steps | expression (module docstring)
    number_tokens: bool = True  # one token per number (Tokenizer), or one per character

    def __post_init__(self):
        if self.n_numbers not in (2, 3, 4) or self.max_number < 1 or self.max_target < 1:
            raise UsageError("countdown needs 2-4 numbers and positive ranges")
        if self.format not in ("steps", "expression"):
            raise UsageError(f"countdown format must be steps or expression, not {self.format!r}")
        if self.max_response_len > self.max_answer_chars:  # the ground truth must fit what the verifier reads
            raise UsageError(f"countdown answers of these numbers run to {self.max_response_len} characters, more than "
                             f"the verifier's {self.max_answer_chars}: use fewer or smaller numbers")

    @property
    def max_prompt_len(self):
        return self.n_numbers * (len(str(self.max_number)) + 1) + len(str(self.max_target)) + 1

    @property
    def max_response_len(self):
        k = self.n_numbers
        if self.format == "steps":  # k-1 steps "x*y=z" and commas; no result exceeds a product of k-1 numbers
            d = len(str(max(self.max_number ** (k - 1), self.max_target)))
            return (k - 1) * (3 * d + 2) + (k - 2)
        return k * len(str(self.max_number)) + (k - 1) + 2 * (k - 2)  # numbers, operators, parentheses

    def solutions(self, nums):
        """{value: every valid answer of this format} for a sorted tuple of numbers."""
        return (countdown_step_solutions if self.format == "steps" else countdown_solutions)(nums)

    def sample_prompt(self, g):
        while True:  # prompts with no solution in range are never generated
            nums = tuple(sorted(_randint(1, self.max_number, g) for _ in range(self.n_numbers)))
            targets = _targets(nums, self.max_target, self.format)
            if targets:
                t = targets[_randint(0, len(targets) - 1, g)]
                return ",".join(map(str, nums)) + f";{t}="

    @staticmethod
    def parse_prompt(prompt):
        nums, target = prompt.rstrip("=").split(";")
        return tuple(int(x) for x in nums.split(",")), int(target)

    def answers(self, prompt):
        nums, target = self.parse_prompt(prompt)
        return self.solutions(tuple(sorted(nums))).get(target, [])

    def reward(self, prompt, response):
        nums, target = self.parse_prompt(prompt)
        if not isinstance(response, str) or not 0 < len(response) <= self.max_answer_chars:
            return 0.0
        if self.format == "steps":
            return float(check_steps(nums, target, response))
        parser = _Parser(response)
        try:
            value = parser.parse()
        except (ValueError, ZeroDivisionError, RecursionError):
            return 0.0
        return float(sorted(parser.used) == sorted(nums) and value == target)


TASKS = {"mirror": MirrorTask, "pointer": PointerTask, "countdown": CountdownTask}


def task_tokenizer(task):
    """The tokenizer a task's checkpoints use: whole numbers for countdown (number_tokens)."""
    return Tokenizer(numbers=getattr(task, "number_tokens", False))


def make_task(name, **kwargs):
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name](**kwargs)


def sample_answer(task, prompt, g):
    """Ground truth: uniform over *all* valid answers, so the expert learns every mode."""
    answers = task.answers(prompt)
    return answers[_randint(0, len(answers) - 1, g)]


def eval_prompts(task, n, seed=1234):
    """Held-out prompts fixed by a seed; training prompts exclude them (see PromptStream)."""
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
