"""Tokenizer, tasks and verifiers: hand-made cases, ground truth, adversarial and random strings."""
import random

import pytest
import torch

from countdown import CountdownTask
from data import (ALPHABET, MirrorTask, PointerTask, PromptStream, Tokenizer, encode_prompts, encode_responses,
                  eval_prompts, make_task)


def test_tokenizer_round_trip_and_specials():
    tok = Tokenizer()
    text = "12+(3*4)/5-6=7,8;9"
    ids = tok.encode(text)
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok.decode(ids + [tok.end] + tok.encode("99")) == text  # stops at the end token
    assert tok.decode([tok.pad]) == "<|pad|>"  # a stray special token never verifies
    assert tok.vocab_size == len(ALPHABET) + 3 == tok.enc.n_vocab


def test_tokenizer_rejects_characters_outside_alphabet():
    with pytest.raises(ValueError, match="'x' is not in the task alphabet"):
        Tokenizer().encode("12x")


def test_number_tokenizer_against_a_regex_split():
    """numbers=True: every run of digits is cut into pieces of up to three, each one token
    (0-9 and 10..999 without leading zeros; a piece like "091" splits off its zero: 0, 91).
    Oracle: Python's re on the same rule, and the token table built here by hand."""
    import re
    tok = Tokenizer(numbers=True)
    table = {c: i for i, c in enumerate(ALPHABET)} | {str(n): len(ALPHABET) + n - 10 for n in range(10, 1000)}
    assert tok.vocab_size == len(table) + 3 == tok.enc.n_vocab
    rng = random.Random(0)
    for _ in range(500):
        text = "".join(rng.choice(ALPHABET[:10] * 3 + ALPHABET) for _ in range(rng.randint(1, 30)))
        want = []
        for piece in re.findall(r"[0-9]{1,3}|.", text):
            while piece not in table:  # only leading zeros are missing from the table
                want, piece = want + [table["0"]], piece[1:]
            want.append(table[piece])
        assert tok.encode(text) == want, text
        assert tok.decode(want) == text
    assert [tok.decode([i]) for i in tok.encode("25-7=18,18*3=54")] == ["25", "-", "7", "=", "18", ",", "18", "*", "3", "=", "54"]
    assert Tokenizer(numbers=True).identity != Tokenizer().identity  # checkpoints tell them apart


def test_padded_batches():
    tok = Tokenizer()
    p, v = encode_prompts(tok, ["1=", "123="])
    assert p.shape == (2, 5) and v.tolist() == [[False, False, True, True, True], [True] * 5]
    assert p[0, 0] == tok.pad and p[:, -1].tolist() == tok.encode("==")
    r, m = encode_responses(tok, ["7", "789"])
    assert r[0].tolist() == [7, tok.end, tok.pad, tok.pad] and m.sum(1).tolist() == [2, 4]


def test_mirror_verifier_hand_made():
    t = MirrorTask(digits=5)
    assert t.reward("31415=", "+31415") == 1 and t.reward("31415=", "-51413") == 1
    for wrong in ("31415", "51413", "-31415", "+51413", "+31414", "+3141", "+314155", "", "+", "-51431", "<|pad|>"):
        assert t.reward("31415=", wrong) == 0
    assert MirrorTask(digits=4, answer_len=1).answers("1234=") == ["+1", "-4"]
    assert MirrorTask(digits=3, answer_len=2).answers("121=") == ["+12", "-12"]  # the sign still differs
    # without the sign the direction is implicit, and coinciding readings are one answer
    t = MirrorTask(digits=5, sign=False)
    assert t.reward("31415=", "31415") == 1 and t.reward("31415=", "51413") == 1 and t.reward("31415=", "+31415") == 0
    assert MirrorTask(digits=4, answer_len=1, sign=False).answers("1234=") == ["1", "4"]
    assert MirrorTask(digits=3, answer_len=2, sign=False).answers("121=") == ["12"]


def test_pointer_verifier_hand_made():
    """Worked by hand on 3141592653: copying gives 3 1 4 1; following each digit as a place in
    the prompt (counted from 0) gives d[3]=1, d[1]=1, d[4]=5, d[1]=1."""
    t = PointerTask(digits=10, answer_len=4)
    assert t.answers("3141592653=") == ["+3141", "-1151"]
    assert t.reward("3141592653=", "+3141") == 1 and t.reward("3141592653=", "-1151") == 1
    for wrong in ("3141", "1151", "-3141", "+1151", "+314", "-11511", "", "+", "<|pad|>"):
        assert t.reward("3141592653=", wrong) == 0
    one = PointerTask(digits=10, answer_len=1, sign=False)  # H=1, a single token
    assert one.answers("3141592653=") == ["1", "3"] and one.max_response_len == 1
    assert one.answers("0123456789=") == ["0"]  # d_0 = 0 points at itself: one answer
    # H up to the prompt length: a digit can point anywhere in the first ten places
    long = PointerTask(digits=16, answer_len=16)
    d = "9876543210012345"
    assert long.answers(d + "=")[1] == "-" + "".join(d[int(c)] for c in d) == "-0123456789987654"
    with pytest.raises(ValueError, match="at least 10 digits"):
        PointerTask(digits=9)


def test_ground_truth_sampler_is_uniform_over_answers():
    t = MirrorTask(digits=5)
    g = torch.Generator().manual_seed(0)
    draws = [t.sample_answer("12345=", g) for _ in range(2000)]
    assert set(draws) == {"+12345", "-54321"} and 900 < draws.count("+12345") < 1100


def test_verifiers_fuzzed_never_raise_never_accept_invalid():
    """Random strings, and ground-truth answers with a character inserted, dropped or changed
    (a 0 before a number is a leading zero), against an oracle that shares no code with the
    verifier or with countdown_solutions."""
    rng = random.Random(0)
    cd, mi = CountdownTask(n_numbers=3, format="expression"), MirrorTask(digits=5)
    chars = ALPHABET + " x.eE_'\\\n\u00e9"
    gen = torch.Generator().manual_seed(0)
    prompts = [cd.sample_prompt(gen) for _ in range(5)]
    for p in prompts:
        assert cd.answers(p) and all(_valid_countdown(p, a) for a in cd.answers(p))  # the ground truth, checked
    accepted = 0
    for i in range(5000):
        p = prompts[i % 5]
        if i % 2:
            s = "".join(rng.choice(chars) for _ in range(rng.randint(0, 30)))
        else:
            s, j = rng.choice(cd.answers(p)), rng.randint(0, 8)
            s = rng.choice([s, s[:j] + "0" + s[j:], s[:j] + s[j + 1:], s[:j] + rng.choice(ALPHABET) + s[j + 1:]])
        r = cd.reward(p, s)
        assert r == float(_valid_countdown(p, s)), (p, s)
        accepted += r
        assert mi.reward("31415=", s) == float(s in ("+31415", "-51413"))
    assert accepted > 100  # the oracle saw valid answers, not only garbage


def _valid_countdown(prompt, s):
    """Independent oracle: Python's own parser (ast, which never evaluates anything) builds the
    expression tree, valued here with Fractions. Valid: only digits, + - * / and parentheses;
    every number written as Python writes it (no leading zeros: ast accepts 00); each of the
    prompt's numbers exactly once; the target's value."""
    import ast
    import operator
    import re
    from fractions import Fraction
    if not s or not re.fullmatch(r"[0-9+\-*/()]+", s):
        return False
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
    used = []

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            if ast.get_source_segment(s, node) != str(node.value):
                raise ValueError("not written canonically")
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](value(node.left), value(node.right))
        raise ValueError("not + - * / over numbers")  # unary minus, **, //, calls ...

    try:
        v = value(ast.parse(s, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return False
    numbers, target = prompt.rstrip("=").split(";")
    return sorted(used) == sorted(int(x) for x in numbers.split(",")) and v == int(target)


def test_held_out_prompts_fixed_and_disjoint():
    t = make_task("mirror")
    a, b = eval_prompts(t, 64, seed=3), eval_prompts(t, 64, seed=3)
    assert a == b and len(set(a)) == 64
    train = PromptStream(t, a, seed=3).batch(5000)  # same seed as the held-out set, still disjoint
    assert not set(train) & set(a)


def test_prompt_stream_stops_when_every_prompt_is_held_out():
    """2-digit mirror has 100 prompts; holding out all of them leaves none to train on: one line, at once."""
    t = MirrorTask(digits=2)
    held_out = [f"{i:02d}=" for i in range(100)]
    with pytest.raises(ValueError, match="all held out: task mirror has too few distinct prompts"):
        PromptStream(t, held_out, seed=0).batch(1)
    assert len(PromptStream(t, held_out[:99], seed=0).batch(3)) == 3  # one prompt left is enough


@pytest.mark.parametrize("n", [100, 10_000_000])
def test_eval_prompts_beyond_the_task_fail_at_once(n):
    """--eval-prompts 10000000 on 2-digit mirror drew for ~30 minutes before failing; it is
    refused before a single draw (the task knows how many prompts it has)."""
    t = MirrorTask(digits=2)
    with pytest.raises(ValueError, match="at most 100 distinct prompts"):
        eval_prompts(t, n, seed=0)
    assert len(set(eval_prompts(t, 99, seed=0))) == 99


def test_unknown_task_is_clear():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        make_task("nope")


def test_mode_weight_draws_the_plus_answer_that_often():
    """--mode-weight p: the expert's ground truth is the "+" answer with probability p (the mode
    the 1-layer student can represent); p = 0.5 is the uniform draw over both answers."""
    prompt = "3141592653="
    for p in (0.05, 0.2, 0.5):
        t, g = PointerTask(digits=10, mode_weight=p), torch.Generator().manual_seed(0)
        share = sum(t.sample_answer(prompt, g)[0] == "+" for _ in range(4000)) / 4000
        assert abs(share - p) < 4 * (p * (1 - p) / 4000) ** 0.5
    with pytest.raises(ValueError, match="a task with a sign"):
        PointerTask(mode_weight=0.2, sign=False)


def test_pointer_without_copy_has_no_answer_one_lookup_away():
    """--no-copy: + follows the pointers, - follows them from the far end (by hand)."""
    t = PointerTask(digits=10, answer_len=2, copy=False)
    # d = 3141592653: d0=3 -> d[3]=1, d[9-3]=d[6]=2; d1=1 -> d[1]=1, d[9-1]=d[8]=5
    assert t.answers("3141592653=") == ["+11", "-25"]
    assert PointerTask(digits=10, answer_len=2).answers("3141592653=") == ["+31", "-11"]
