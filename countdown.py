"""Countdown, the paper's reasoning task: prompts, every valid answer, the verifier, and the
kinds of mistake a wrong answer makes (eval.py prints them). data.py holds the other tasks.

Given n numbers and a target, reach the target with + - * /, using every given number
exactly once. Two answer formats (a task field, so checkpoints record it):
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
be reordered away; tests/test_countdown.py checks it), so their prompts are the same.
Countdown is tokenized with one token per number (Tokenizer(numbers=True), number_tokens),
so `25-7=18` is five tokens and an operation is a lookup on whole numbers, not carries
across digit tokens (measured in RESULTS.md, "Countdown"; --no-number-tokens for digits).

The verifiers parse untrusted model text with exact rational arithmetic; nothing the model
writes ever reaches eval/exec. Any malformed answer scores 0, never an exception.
"""
import itertools
import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache

import torch

from errors import UsageError


def randint(lo, hi, g):
    """Uniform integer in [lo, hi] from a seeded torch.Generator (so runs repeat exactly)."""
    return lo + int(torch.randint(hi - lo + 1, (1,), generator=g))


# expressions are (value, text, precedence) with precedence 1 for +-, 2 for */, 3 atoms
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

    def __init__(self, text, max_digits=6):
        self.s, self.i, self.used, self.max_digits = text, 0, [], max_digits  # numbers of at most max_digits

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
        if j == self.i or self.i - j > self.max_digits:
            raise ValueError("expected a number")
        if self.s[j] == "0" and self.i - j > 1:  # 02 or 0003: the ground truth never writes them
            raise ValueError("leading zero")
        self.used.append(int(self.s[j:self.i]))
        return Fraction(self.used[-1])


def _flag(default, help, choices=None):
    """A field that is also a train.py flag (data.flag's convention: metadata help and choices)."""
    return field(default=default, metadata=dict(help=help, choices=choices))


@dataclass
class CountdownTask:
    """Countdown: numbers;target= -> written steps (or one expression) using each number once."""
    n_numbers: int = _flag(3, "how many numbers (2-4)")
    max_number: int = _flag(20, "numbers are drawn from 1..max_number")
    max_target: int = _flag(100, "targets are in 1..max_target")
    format: str = _flag("steps", "steps (written steps: 25-7=18,18*3=54) | expression ((25-7)*3)",
                        choices=("steps", "expression"))
    number_tokens: bool = _flag(True, "one token per number below 1000 (off: one per character)")
    name: str = "countdown"
    max_answer_chars: int = 64  # longer answers score 0 (and keep parsing cheap)

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
    def n_prompts(self):
        """At most this many distinct prompts (multisets of numbers times targets)."""
        return math.comb(self.max_number + self.n_numbers - 1, self.n_numbers) * self.max_target

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
            nums = tuple(sorted(randint(1, self.max_number, g) for _ in range(self.n_numbers)))
            targets = _targets(nums, self.max_target, self.format)
            if targets:
                t = targets[randint(0, len(targets) - 1, g)]
                return ",".join(map(str, nums)) + f";{t}="

    @staticmethod
    def parse_prompt(prompt):
        nums, target = prompt.rstrip("=").split(";")
        return tuple(int(x) for x in nums.split(",")), int(target)

    def answers(self, prompt):
        nums, target = self.parse_prompt(prompt)
        return self.solutions(tuple(sorted(nums))).get(target, [])

    def sample_answer(self, prompt, g):
        """Ground truth: uniform over every valid answer."""
        answers = self.answers(prompt)
        return answers[randint(0, len(answers) - 1, g)]

    def reward(self, prompt, response):
        nums, target = self.parse_prompt(prompt)
        if not isinstance(response, str) or not 0 < len(response) <= self.max_answer_chars:
            return 0.0
        if self.format == "steps":
            return float(check_steps(nums, target, response))
        parser = _Parser(response, max_digits=len(str(self.max_number)))  # every given number, no longer
        try:
            value = parser.parse()
        except (ValueError, ZeroDivisionError, RecursionError):
            return 0.0
        return float(sorted(parser.used) == sorted(nums) and value == target)


def countdown_mistake(task, prompt, response):
    """Where a written-steps countdown answer goes wrong, at its first faulty step: "right";
    "format" (not a step x op y=z, a step too many or too few, or longer than the verifier
    reads); "operand" (a number not available); "plan" (the step's operation, computed
    correctly, leaves the target out of reach, or is not allowed: a negative or fractional
    result; whatever the step then wrote); "arithmetic" (a wrong result for a step from which
    the target could still be reached)."""
    if task.reward(prompt, response):
        return "right"
    if not isinstance(response, str) or not 0 < len(response) <= task.max_answer_chars:
        return "format"
    nums, target = task.parse_prompt(prompt)
    pool, steps = [Fraction(n) for n in nums], response.split(",")
    for k, step in enumerate(steps):
        m = _STEP.fullmatch(step)
        if m is None or k >= len(nums) - 1:
            return "format"
        x, op, y, z = Fraction(m[1]), m[2], Fraction(m[3]), Fraction(m[4])
        if x not in pool or (pool.remove(x) or y not in pool):
            return "operand"
        pool.remove(y)
        r = {"+": x + y, "-": x - y, "*": x * y, "/": x / y}[op]  # what the step should have written
        if r <= 0 or r.denominator != 1 or target not in countdown_step_solutions(tuple(sorted(map(int, pool + [r])))):
            return "plan"
        if z != r:
            return "arithmetic"
        pool.append(z)
    return "format"  # every step right and the target reached: too few steps


def countdown_mistakes(task, prompts, texts):
    """The share of each kind of countdown_mistake over the responses."""
    kinds = ("right", "plan", "arithmetic", "operand", "format")
    counts = [countdown_mistake(task, p, r) for p, r in zip(prompts, texts)]
    return {k: counts.count(k) / len(counts) for k in kinds}
