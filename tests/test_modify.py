"""What a student changes next week, and what must follow from one declaration: a task with a
single answer (one class in data.TASKS) runs every mode and every general flag it accepts;
a flag a task does not take is refused; the logged metrics name the learning rate; under
torchrun the logged reward is the global batch's."""
import json
import os
from dataclasses import dataclass

import pytest
import torch

import data
from errors import UsageError
from config import parse_args, run_name
from train import main


@dataclass
class EchoTask(data.Task):
    """Repeat the prompt's digits: one valid answer, no modes."""
    digits: int = data.flag(3, "prompt digits")
    name: str = "echo"
    max_response_len = property(lambda self: self.digits)
    max_prompt_len = property(lambda self: self.digits + 1)
    n_prompts = property(lambda self: 10 ** self.digits)

    def sample_prompt(self, g):
        return "".join(str(data.randint(0, 9, g)) for _ in range(self.digits)) + "="

    def answers(self, prompt):
        return [prompt[:-1]]


TINY = ["--task", "echo", "--expert-size", "small", "--student-size", "tiny", "--expert-steps", "40", "--base-steps", "4",
        "--steps", "4", "--batch-size", "8", "--eval-prompts", "16", "--eval-every", "2", "--log-every", "2",
        "--expert-min-reward", "0", "--warmup", "2", "--device", "cpu"]


@pytest.fixture
def echo(monkeypatch):
    monkeypatch.setitem(data.TASKS, "echo", EchoTask)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("flags", [
    ["--mode", "sft"], ["--mode", "sft", "--sft-loss", "forward_kl", "--temperature", "0.7"],
    ["--mode", "onpolicy"], ["--mode", "onpolicy", "--gamma", "0", "--estimator", "sampled"],
    ["--mode", "onpolicy", "--mix", "0.5", "--divergence", "jsd", "--beta", "0.3"],
    ["--mode", "onpolicy", "--no-baseline", "--no-normalize-adv", "--lr-schedule", "constant", "--stop-at", "0.5"],
], ids=lambda f: " ".join(f[1:]))
def test_a_task_with_one_answer_runs_every_mode_and_flag(echo, tmp_path, flags):
    main([*TINY, *flags, "--out-dir", str(tmp_path)])
    cfg = parse_args([*TINY, *flags])
    with open(tmp_path / "echo" / f"{run_name(cfg)}.result.json") as f:
        result = json.load(f)
    assert 0 <= result["reward"] <= 1 and result["config"]["task_args"] == dict(digits=3)
    assert result["coverage"] <= 1  # one valid answer per prompt at most


def test_a_flag_the_task_does_not_take_is_refused(echo):
    for flag in (["--mode-weight", "0.2"], ["--copy"], ["--answer-len", "2"], ["--format", "steps"]):
        with pytest.raises(UsageError, match=f"task echo takes no {flag[0]} \\(its flags: --digits\\)"):
            parse_args([*TINY, *flag])
    assert parse_args([*TINY, "--digits", "4"]).task_args == dict(digits=4)


def test_metrics_log_the_learning_rate(echo, tmp_path):
    main([*TINY, "--mode", "sft", "--out-dir", str(tmp_path)])
    with open(tmp_path / "echo" / "sft-tiny.metrics.jsonl") as f:
        lrs = [json.loads(line)["lr"] for line in f if '"loss"' in line]
    peak = 1e-2  # tiny's own (model.SIZES)
    assert lrs[:2] == pytest.approx([peak / 2, peak]) and lrs[2] > lrs[3] > 0.1 * peak  # warmup 2, then cosine


def _logged_reward(rank, port, out_dir, results):
    """One online IL step on 2 gloo ranks, whose students write the right answer on rank 0 and a
    wrong one on rank 1: the logged reward is the mean over both ranks' rows."""
    import distill
    import runtime
    from model import make_model
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    data.TASKS["echo"] = EchoTask
    cfg = parse_args([*TINY, "--mode", "onpolicy", "--steps", "1", "--out-dir", out_dir])
    env = runtime.setup(cfg)
    student = make_model("tiny", env["block_size"], env["tok"].vocab_size, seed=0)
    expert = make_model("tiny", env["block_size"], env["tok"].vocab_size, seed=1)
    tok = env["tok"]

    def generate(prompt, prompt_valid, max_new_tokens, end_token, pad_token, **kw):
        texts = [tok.decode([t for t, ok in zip(row.tolist(), v.tolist()) if ok][1:])[:-1] for row, v in
                 zip(prompt, prompt_valid)]
        answers = [t if rank == 0 else "000" if t != "000" else "111" for t in texts]
        return data.encode_responses(tok, answers)

    student.generate = generate
    prompts = data.PromptStream(env["task"], env["held_out"], seed=rank)
    run = runtime.Run(cfg, env, "onpolicy", "t", student, 1, 1e-3, prompts=prompts)
    distill.train(run, expert, prompts, tok, env["task"], cfg)
    if rank == 0:
        with open(os.path.join(out_dir, "echo", "t.metrics.jsonl")) as f:
            results.put(next(json.loads(line)["reward"] for line in f if '"loss"' in line))
    else:
        results.put(None)


def test_under_torchrun_the_logged_reward_is_the_global_batchs(tmp_path):
    from test_runtime import run_ranks
    got = run_ranks(2, lambda r, port, results: (r, port, str(tmp_path), results), _logged_reward)
    assert [g for g in got if g is not None] == [0.5]  # rank 0's rows alone would give 1.0


def test_tasks_that_share_a_flag_agree_on_its_type_and_choices():
    """A flag several tasks take (--digits) is one flag: its type and choices are the same for each."""
    seen = {}
    for task in data.TASKS:
        for name, f in data.task_flags(task).items():
            seen.setdefault(name, set()).add((f.type, f.metadata.get("choices")))
    assert all(len(kinds) == 1 for kinds in seen.values()), seen


def test_every_flag_is_read_by_the_code_that_runs():
    """A flag declared in config.Config but read nowhere would name runs and be checked, yet
    change nothing: each one is read as cfg.<name> by the pipeline, the loops or the run."""
    import os
    from dataclasses import fields

    from config import Config
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "".join(open(os.path.join(root, f)).read() for f in ("train.py", "runtime.py", "sft.py", "distill.py"))
    unread = [f.name for f in fields(Config) if "group" in f.metadata and f"cfg.{f.name}" not in code]
    assert not unread, f"flags that nothing reads: {unread}"
