"""countdown.py: the verifiers against hand-made cases and independent oracles (a tree
evaluator, a brute-force step search), exhaustive ground truth, adversarial and fuzzed
strings, and the kinds of mistake."""
import itertools
import random

import pytest
import torch

from countdown import CountdownTask, countdown_mistake, countdown_mistakes, countdown_solutions
from data import ALPHABET


def test_countdown_verifier_hand_made():
    t = CountdownTask(n_numbers=3, format="expression")
    p = "2,3,7;20="
    assert t.reward(p, "(3+7)*2") == 1 and t.reward(p, "2*(7+3)") == 1
    assert t.reward(p, "3+7*2") == 0  # 17
    assert t.reward(p, "(3+7)*2+0") == 0  # a number not in the prompt
    assert t.reward(p, "(3+7)+(3+7)") == 0  # 3 and 7 twice, 2 never
    assert t.reward(p, "20") == 0
    assert t.reward("4,6,8;3=", "(4+8)/6") == 0  # 2, and 8-4... never 3 this way
    assert t.reward("1,5,8;2=", "(8-5)*1") == 0 and t.reward("1,5,8;3=", "(8-5)*1") == 1
    assert t.reward("1,5,8;3=", "(8-5)/1") == 1 and t.reward("1,5,8;3=", "8-5") == 0  # 1 unused


def test_countdown_rejects_leading_zeros():
    t = CountdownTask(n_numbers=3, format="expression")
    assert t.reward("2,3,7;20=", "2*(3+7)") == 1
    for text in ("02*(3+7)", "(0003+7)*000002", "2*(03+7)", "2*(3+07)"):
        assert t.reward("2,3,7;20=", text) == 0, text


@pytest.mark.parametrize("text", ["1/0", "2,3,7", "7/(3-3)*2", "(((((", "))", "(3+7*2", "3+7)*2",
                                  "__import__('os')", "9" * 10_000, "", "2**3**99999", "1e308*1e308",
                                  "9999999999*9999999999", "-2+3*7", "(3+7)*2\n", " (3+7)*2", "ⅷ+3+7"])
def test_countdown_adversarial_never_raises(text):
    assert CountdownTask(format="expression").reward("2,3,7;20=", text) == 0


def test_countdown_ground_truth_verifies_and_is_exhaustive():
    t = CountdownTask(n_numbers=3, format="expression")
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        p = t.sample_prompt(g)
        answers = t.answers(p)
        assert answers and all(t.reward(p, a) == 1 for a in answers)
        assert len(set(answers)) == len(answers)
    # 1,2,3 -> 6 is reached by 1+2+3, 1*2*3, ... in every order
    sols = countdown_solutions((1, 2, 3))[6]
    assert {"1+2+3", "3+2+1", "1*2*3", "3*2*1", "2*3*1"} <= set(sols)
    assert "(1+2)+3" not in sols  # minimal parentheses only


def test_countdown_verifier_agrees_with_independent_tree_evaluation():
    """Random well-formed expressions, built as trees and valued from the tree (not by parsing
    text), sometimes over the right numbers and sometimes not: the verifier must agree."""
    from fractions import Fraction
    rng = random.Random(1)
    t = CountdownTask(n_numbers=3, format="expression")
    agreed_right = 0

    def build(nums):
        if len(nums) == 1:  # an atom, sometimes in redundant parentheses
            return Fraction(nums[0]), f"({nums[0]})" if rng.random() < 0.2 else str(nums[0])
        i = rng.randint(1, len(nums) - 1)
        (lv, lt), (rv, rt) = build(nums[:i]), build(nums[i:])
        op = rng.choice("+-*/")
        if op == "/" and rv == 0:
            op = "+"
        v = {"+": lv + rv, "-": lv - rv, "*": lv * rv, "/": lv / rv if rv else None}[op]
        return v, f"({lt}{op}{rt})"  # every compound in parentheses: text value == tree value

    gen = torch.Generator().manual_seed(2)
    for _ in range(2000):
        p = t.sample_prompt(gen)
        nums, target = CountdownTask.parse_prompt(p)
        used = list(nums)
        if rng.random() < 0.3:  # wrong multiset: drop, repeat or replace a number
            used = rng.choice([used[:-1], used + [used[0]], used[:-1] + [rng.randint(1, 30)]])
        rng.shuffle(used)
        value, text = build(used)
        expected = float(value == target and sorted(used) == sorted(nums))
        assert t.reward(p, text) == expected, (p, text)
        agreed_right += expected
    assert agreed_right > 10  # the check saw correct answers too, not only zeros


# ----------------------------------------------------------------------------- countdown, written steps
def test_countdown_steps_verifier_hand_made():
    t = CountdownTask(n_numbers=3)  # the default format: written steps
    p = "3,7,25;54="
    assert t.reward(p, "25-7=18,18*3=54") == 1 and t.reward(p, "25-7=18,3*18=54") == 1
    assert t.reward("2,4,6;12=", "2+4=6,6+6=12") == 1  # a result equal to a given number: both are there
    assert t.reward("2,2,5;5=", "2/2=1,5*1=5") == 1 and t.reward("2,2,5;5=", "2/2=1,5/1=5") == 1
    for wrong in ("25-7=17,17*3=51",  # wrong arithmetic, consistently carried on
                  "25-7=18,18*3=55",  # wrong arithmetic in the last step
                  "7/3=2,2*25=50",  # 7/3 is not 2: no rounding
                  "25-7=18,18*7=126",  # 7 used twice (and 3 never)
                  "25-3=22,22+3=25",  # 3 used twice
                  "25-7=18,18+18=36",  # an intermediate result reused
                  "25+3=28,7*4=28",  # 4 was never given nor computed
                  "25-7=18,18*3=54,54-3=51",  # a step too many
                  "25-7=18",  # a step too few
                  "25-7=18,18*3=54,",  # trailing comma
                  "3*7=21,21+25=46",  # valid steps, wrong target
                  "025-7=18,18*3=54", "25-07=18,18*3=54", "25-7=018,018*3=54",  # leading zeros
                  "7-25=-18,-18*3=-54", "3-3=0,0+25=25",  # negative or zero results cannot be written
                  "(25-7)*3", "25-7=18;18*3=54", "25-7=18,18*3=54=54", "25 -7=18,18*3=54", "25-7=18,18×3=54",
                  "25-7=18,18*3=54\n", "", ",", "=", "25-7=", "-7=18,18*3=54", "٢5-7=18,18*3=54"):
        assert t.reward(p, wrong) == 0, wrong


@pytest.mark.parametrize("text", ["1/0=1,1*1=1", "9" * 10_000, "9" * 60 + "*9=1,1*1=1", "1,2,3", ",,,,", "=,=,=",
                                  "__import__('os')", "2**3=8,8*7=56", "+2+3=5,5*7=35", "2.0+3=5,5*7=35",
                                  "<|pad|>", "2+3=5,5*7=35<|end|>"])
def test_countdown_steps_adversarial_never_raises(text):
    assert CountdownTask().reward("2,3,7;35=", text) == 0


def _brute_force_steps(nums, target):
    """Every valid 3-number written-steps answer, by nested loops over which two given numbers
    come first, the operators, and the side the third number takes (shares no code with countdown.py)."""
    def results(x, y):  # positive integer results of x op y
        out = [("+", x + y), ("*", x * y)]
        if x > y:
            out.append(("-", x - y))
        if x % y == 0:
            out.append(("/", x // y))
        return out

    found = set()
    for i in range(3):
        for j in range(3):
            if i == j:
                continue
            a, b, c = nums[i], nums[j], nums[3 - i - j]
            for op1, r in results(a, b):
                for x, y in ((r, c), (c, r)):
                    for op2, v in results(x, y):
                        if v == target:
                            found.add(f"{a}{op1}{b}={r},{x}{op2}{y}={v}")
    return found


def _steps_oracle(prompt, s):
    """Independent of countdown.check_steps: no regex, no Fractions, the pool as a Counter, a division
    checked by multiplying back."""
    from collections import Counter
    numbers, target = prompt.rstrip("=").split(";")
    pool = Counter(int(x) for x in numbers.split(","))
    steps = s.split(",")
    if len(steps) != sum(pool.values()) - 1:
        return False
    for step in steps:
        if step.count("=") != 1:
            return False
        lhs, rhs = step.split("=")
        ops = [k for k, ch in enumerate(lhs) if ch in "+-*/"]
        if len(ops) != 1:
            return False
        words = [lhs[:ops[0]], lhs[ops[0] + 1:], rhs]
        if not all(w and all(ch in "0123456789" for ch in w) and w[0] != "0" for w in words):
            return False
        x, y, z = map(int, words)
        op = lhs[ops[0]]
        pool[x] -= 1
        pool[y] -= 1
        if min(pool.values()) < 0:
            return False
        if not {"+": x + y == z, "-": x - y == z, "*": x * y == z, "/": y * z == x}[op]:
            return False
        pool[z] += 1
    return z == int(target)


def test_countdown_steps_ground_truth_is_every_valid_answer():
    """On prompts with distinct, repeated and divisible numbers: the ground truth verifies,
    has no duplicates, and is exactly what the brute force finds."""
    t = CountdownTask(n_numbers=3)
    g = torch.Generator().manual_seed(0)
    prompts = ["3,7,25;54=", "2,2,4;8=", "2,2,4;1=", "5,5,5;30=", "1,1,1;1=", "4,6,12;2=", "4,12,20;8="]
    prompts += [t.sample_prompt(g) for _ in range(40)]
    for p in prompts:
        nums, target = CountdownTask.parse_prompt(p)
        answers = t.answers(p)
        assert answers and len(set(answers)) == len(answers), p
        assert set(answers) == _brute_force_steps(nums, target), p
        assert all(t.reward(p, a) == 1 and _steps_oracle(p, a) for a in answers), p
    assert len(t.answers("4,6,12;2=")) > 2  # multimodal: the expert has several answers to learn


def test_countdown_steps_ground_truth_verifies_for_two_and_four_numbers():
    for n in (2, 4):
        t = CountdownTask(n_numbers=n, max_number=12)
        g = torch.Generator().manual_seed(n)
        for _ in range(10):
            p = t.sample_prompt(g)
            assert t.answers(p) and all(t.reward(p, a) == 1 and _steps_oracle(p, a) for a in t.answers(p)), p
            assert len(max(t.answers(p), key=len)) <= t.max_response_len


def test_countdown_formats_reach_the_same_targets_with_three_numbers():
    """Every fractional or negative intermediate of a 3-number expression can be reordered into
    positive integers, so both formats have the same prompts. Checked on every multiset of 1..12
    (1..20 is checked the same way, slower)."""
    steps, expr = CountdownTask(), CountdownTask(format="expression")
    for nums in itertools.combinations_with_replacement(range(1, 13), 3):
        ints = {int(v) for v in expr.solutions(nums) if v.denominator == 1 and v >= 1}
        assert set(steps.solutions(nums)) == ints, nums
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [steps.sample_prompt(g1) for _ in range(50)] == [expr.sample_prompt(g2) for _ in range(50)]


def test_countdown_steps_sampler_is_uniform_over_answers():
    t = CountdownTask()
    p = "4,6,12;2="
    answers = t.answers(p)
    g = torch.Generator().manual_seed(0)
    draws = [t.sample_answer(p, g) for _ in range(200 * len(answers))]
    assert set(draws) == set(answers)
    assert all(140 < draws.count(a) < 260 for a in answers)  # 200 expected each; ~4 std either side


def test_countdown_steps_fuzzed_against_an_independent_oracle():
    """Random strings, and valid answers with a character inserted, dropped or changed, steps
    swapped, or a number replaced: the verifier agrees with both oracles (the brute-force set
    and the step checker above), never raises, and accepts something."""
    rng = random.Random(3)
    t = CountdownTask()
    chars = ALPHABET + " x.eE_'\\\n\u00e9"
    gen = torch.Generator().manual_seed(3)
    prompts = [t.sample_prompt(gen) for _ in range(20)] + ["2,2,4;8=", "4,6,12;2="]
    accepted = 0
    for i in range(6000):
        p = prompts[i % len(prompts)]
        nums, target = CountdownTask.parse_prompt(p)
        valid = _brute_force_steps(nums, target)
        if i % 3 == 0:
            s = "".join(rng.choice(chars) for _ in range(rng.randint(0, 25)))
        else:
            s = rng.choice(sorted(valid))
            j, k = rng.randint(0, len(s)), rng.randint(0, len(s))
            s = rng.choice([s, s[:j] + rng.choice(ALPHABET) + s[j:], s[:j] + s[j + 1:],
                            s[:j] + rng.choice(ALPHABET) + s[j + 1:], ",".join(s.split(",")[::-1]),
                            s[:j] + str(rng.randint(1, 30)) + s[j + 1:], s[:j] + s[k:j] + s[j:]])
        r = t.reward(p, s)
        assert r == float(s in valid) == float(_steps_oracle(p, s)), (p, s)
        accepted += r
    assert accepted > 500  # the oracles saw valid answers, not only garbage


def test_countdown_mistakes_by_hand():
    """Each kind of mistake at its first fault, on hand-made answers to 3,7,25;54=."""
    task, p = CountdownTask(), "3,7,25;54="
    cases = {"25-7=18,18*3=54": "right", "25-7=17,17*3=54": "arithmetic", "25-7=18,18*3=55": "arithmetic",
             "25-7=17,18*3=5x": "arithmetic",  # the first faulty step decides
             "25+7=32,32+3=54": "plan", "25+7=33,33+3=36": "plan",  # out of reach, whatever the step wrote
             "25-7=18,18+3=21": "plan", "7-25=18,18*3=54": "plan", "7/3=2,25*2=50": "plan",  # not allowed
             "25-7=18,18*2=54": "operand", "25-8=17,17*3=54": "operand", "25-7=18": "format", "": "format",
             "(25-7)*3": "format", "25-7=18,18*3=54,1+1=2": "format", "25-7=18,18*3=54" + " " * 60: "format",
             "1" * 5000 + "+3=4,4*7=28": "format"}
    for answer, kind in cases.items():
        assert countdown_mistake(task, p, answer) == kind, answer
    shares = countdown_mistakes(task, [p] * 4, ["25-7=18,18*3=54", "25+7=32,32+3=54", "", ""])
    assert shares == dict(right=0.25, plan=0.25, arithmetic=0.0, operand=0.0, format=0.5)
