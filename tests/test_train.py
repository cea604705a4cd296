"""End to end: tiny runs of every mode, clear errors, Ctrl-C + --resume, seeded repeats, DDP."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# mirror with 2 digits, where a 1-layer expert gets most answers right in a few hundred steps
# (about 0.84: enough for these tests, so the quality gate is lowered to 0.5 here)
TINY = ["--digits", "2", "--expert-size", "small", "--student-size", "small", "--expert-steps", "300",
        "--base-steps", "10", "--steps", "60", "--batch-size", "32", "--eval-prompts", "64", "--threads", "1",
        "--log-every", "20", "--eval-every", "20", "--expert-min-reward", "0.5",
        "--device", "cpu"]  # bitwise checks below need the CPU (tests/test_cuda.py covers CUDA)


def train(*args, check=True, timeout=300):
    out = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check:
        assert out.returncode == 0, out.stderr[-2000:]
    return out


def result(out_dir, name):
    with open(os.path.join(out_dir, "mirror", f"{name}.result.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Expert, base and one run of each method in one folder, shared by the tests below."""
    d = str(tmp_path_factory.mktemp("runs"))
    for mode in ("expert", "base", "sft", "onpolicy"):
        out = train("--mode", mode, "--out-dir", d, *TINY)
    return d, out.stdout


def test_expert_learns_the_default_task(tmp_path):
    """The default task (5-digit mirror, signed) and expert size, 800 steps: ~40 s on one thread.
    The expert leaves the plateau (about 0.3: it writes a sign but not yet the digits that go
    with it) by step 600 on 10 of 10 seeds measured (README, "Training that converges")."""
    train("--mode", "expert", "--expert-steps", "800", "--eval-prompts", "128", "--threads", "1",
          "--out-dir", str(tmp_path), timeout=600)
    assert result(str(tmp_path), "expert")["reward"] >= 0.9


def test_an_expert_that_did_not_converge_is_refused(tmp_path):
    """The quality gate: an under-trained expert is reported in one line, and no student is
    distilled from it."""
    args = [*TINY, "--expert-steps", "3", "--out-dir", str(tmp_path), "--expert-min-reward", "0.95"]
    out = train("--mode", "expert", *args, check=False)
    assert out.returncode != 0 and "result: expert" in out.stdout  # its result is still shown
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "did not converge: held-out reward" in lines[0] and lines[0].startswith("error:")
    out = train("--mode", "sft", *args, check=False)
    assert out.returncode != 0 and "did not converge" in out.stderr
    assert not os.path.exists(tmp_path / "mirror" / "base-small.pt")  # nothing was distilled
    assert train("--mode", "base", *args, "--expert-min-reward", "0").returncode == 0  # the way out it names


def test_each_method_improves_on_its_starting_point(tiny_runs):
    d, stdout = tiny_runs
    base, sft, online = result(d, "base-small"), result(d, "sft-small"), result(d, "onpolicy-small-g1")
    assert sft["reward"] > base["reward"] and sft["fwd_kl"] < base["fwd_kl"]  # SFT lowers forward KL
    assert online["reward"] > base["reward"] and online["rev_kl"] < base["rev_kl"]  # online lowers reverse KL
    assert "result: onpolicy-small-g1" in stdout and ("right" in stdout or "wrong" in stdout)


def test_the_run_ends_with_its_reward_curve_as_a_text_plot(tiny_runs):
    """The last lines of a run: its held-out reward checks as block characters, first -> last."""
    d, stdout = tiny_runs
    line = next(l for l in stdout.splitlines() if "held-out reward vs step:" in l)
    with open(os.path.join(d, "mirror", "onpolicy-small-g1.metrics.jsonl")) as f:
        evals = [json.loads(l) for l in f if "eval_reward" in l]
    plot, rest = line.split(": [", 1)[1].split("] ", 1)
    assert set(plot) <= set(" ▁▂▃▄▅▆▇█") and len(plot) == min(24, len(evals))
    assert rest == f"{evals[0]['eval_reward']:.2f} -> {evals[-1]['eval_reward']:.2f} by step {evals[-1]['step']}"


def test_a_reused_checkpoint_must_come_from_this_seed_and_schedule(tiny_runs, tmp_path):
    """The expert and the bases in --out-dir are reused by later runs; one made with another
    value of a flag that changes it (seed, steps, learning rates) is refused in one line, never
    silently paired with this run."""
    d, _ = tiny_runs
    for flag, value in (("--seed", "1"), ("--expert-steps", "301"), ("--base-steps", "11"), ("--expert-lr", "0.02"),
                        ("--lr", "0.02"), ("--warmup", "5"), ("--lr-schedule", "constant")):
        args = [*TINY[:TINY.index(flag)], *TINY[TINY.index(flag) + 2:]] if flag in TINY else list(TINY)
        out = train("--mode", "sft", "--out-dir", d, *args, flag, value, check=False, timeout=120)
        lines = out.stderr.strip().splitlines()
        assert out.returncode != 0 and len(lines) == 1 and f"was trained with {flag} " in lines[0], out.stderr[-2000:]
    # --resume continues a run only with its own seed (a longer run is allowed, and said)
    fresh = tmp_path / "mirror"
    fresh.mkdir()
    shutil.copy(os.path.join(d, "mirror", "sft-small.pt"), fresh)  # seed 0's student, beside no base
    out = train("--mode", "sft", "--out-dir", str(tmp_path), *TINY, "--seed", "1", "--resume",
                "--expert-ckpt", os.path.join(d, "mirror", "expert.pt"), check=False, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and len(lines) == 1 and "--seed 0 (this run: 1)" in lines[0], out.stderr[-2000:]


def test_metrics_and_checkpoints_describe_themselves(tiny_runs):
    d, _ = tiny_runs
    ck = torch.load(os.path.join(d, "mirror", "onpolicy-small-g1.pt"), weights_only=False)
    assert ck["step"] == ck["total"] == 60 and ck["config"]["gamma"] == 1.0 and ck["seed"] == 0
    assert ck["tokenizer"].startswith("chars:") and ck["task"]["name"] == "mirror"
    with open(os.path.join(d, "mirror", "onpolicy-small-g1.metrics.jsonl")) as f:
        rows = [json.loads(l) for l in f]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 60 and {"reward", "kl", "total_student_tokens", "total_expert_tokens"} <= set(steps[-1])
    assert any("eval_reward" in r for r in rows)
    # budget parity: the same steps and, per step, the same number of sequences for both methods
    with open(os.path.join(d, "mirror", "sft-small.metrics.jsonl")) as f:
        sft_steps = [json.loads(l) for l in f if '"loss"' in l]
    assert len(sft_steps) == len(steps)


def test_zero_steps_train_nothing_and_still_finish(tmp_path):
    """--expert-steps 0, --base-steps 0 (online IL from a random init) and --steps 0: each run saves
    its untrained model and evaluates it (no data is drawn for it)."""
    train("--mode", "sft", "--out-dir", str(tmp_path), *TINY, "--expert-steps", "0", "--base-steps", "0", "--steps", "0",
          "--expert-min-reward", "0")
    cks = {n: torch.load(tmp_path / "mirror" / f"{n}.pt", weights_only=True) for n in ("expert", "base-small", "sft-small")}
    assert all(ck["step"] == ck["total"] == 0 for ck in cks.values())
    assert all(torch.equal(cks["base-small"]["model"][k], v) for k, v in cks["sft-small"]["model"].items())
    assert 0 <= result(str(tmp_path), "sft-small")["reward"] <= 1


def test_metrics_jsonl_holds_one_run_each_step_once(tiny_runs, tmp_path):
    """metrics.jsonl holds one run, each step once: a rerun replaces the old run's rows, and after
    a crash and --resume the steps past the checkpoint are not repeated."""
    d, _ = tiny_runs
    shutil.copytree(os.path.join(d, "mirror"), tmp_path / "mirror", ignore=shutil.ignore_patterns("onpolicy*"))
    args = ["--mode", "sft", "--out-dir", str(tmp_path), *TINY]
    metrics = tmp_path / "mirror" / "sft-small.metrics.jsonl"

    def steps_logged():
        return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"loss"' in line]

    assert steps_logged() == list(range(1, 61))  # tiny_runs' own sft run
    train(*args)  # a fresh rerun replaces that run's rows
    assert steps_logged() == list(range(1, 61))
    with open(metrics, "a") as f:  # what a crash after step 60's checkpoint leaves: later rows, a cut line
        f.write(json.dumps(dict(step=61, loss=0.0)) + "\n" + '{"step": 62, "lo')
    train(*args, "--steps", "62", "--resume")
    assert steps_logged() == list(range(1, 63))


def test_seeded_runs_are_identical(tiny_runs, tmp_path):
    d, _ = tiny_runs
    shutil.copytree(os.path.join(d, "mirror"), tmp_path / "mirror",
                    ignore=shutil.ignore_patterns("onpolicy*", "sft*"))
    train("--mode", "onpolicy", "--out-dir", str(tmp_path), *TINY)
    a = torch.load(os.path.join(d, "mirror", "onpolicy-small-g1.pt"), weights_only=False)["model"]
    b = torch.load(tmp_path / "mirror" / "onpolicy-small-g1.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_expert_does_not_depend_on_the_student_or_the_mode(tmp_path):
    """Seeds are per role: the expert of a seed is the same whatever --student-size or --mode
    trains it (no global RNG is shared with the student's size check)."""
    tiny = [*TINY, "--expert-steps", "5", "--base-steps", "2", "--expert-min-reward", "0"]
    train("--mode", "expert", "--out-dir", str(tmp_path / "a"), *tiny, "--student-size", "small")
    train("--mode", "base", "--out-dir", str(tmp_path / "b"), *tiny, "--student-size", "medium")
    a = torch.load(tmp_path / "a" / "mirror" / "expert.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "mirror" / "expert.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_then_resume_equals_uninterrupted(tiny_runs, tmp_path):
    d, _ = tiny_runs
    shutil.copytree(os.path.join(d, "mirror"), tmp_path / "mirror",
                    ignore=shutil.ignore_patterns("onpolicy*", "sft*"))
    args = ["--mode", "onpolicy", "--out-dir", str(tmp_path), *TINY, "--steps", "60", "--save-every", "1000"]
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    def rows_logged():  # before its first checkpoint a run logs to <name>.metrics.jsonl.part.<pid>
        return sum(p.read_text().count('"loss"') for p in (tmp_path / "mirror").glob("onpolicy-small-g1.metrics.jsonl*"))

    deadline = time.time() + 120
    while rows_logged() < 5 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    ck = torch.load(tmp_path / "mirror" / "onpolicy-small-g1.pt", weights_only=False)
    assert 5 <= ck["step"] < 60, "interrupt the run before it finishes"
    train(*args, "--resume")
    a = torch.load(os.path.join(d, "mirror", "onpolicy-small-g1.pt"), weights_only=False)["model"]
    b = torch.load(tmp_path / "mirror" / "onpolicy-small-g1.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_help_lists_every_flag_with_its_help():
    """The first command a reader types: every Config flag and every task's flag, with a help
    line that may hold a '%'."""
    from dataclasses import fields
    from data import TASKS, task_flags
    from config import Config
    out = train("--help", timeout=60)
    assert out.stderr == ""
    names = [f.name for f in fields(Config) if "group" in f.metadata] + [k for t in TASKS for k in task_flags(t)]
    for name in names:
        assert "--" + name.replace("_", "-") in out.stdout, name
    assert "cosine: down to 10%" in " ".join(out.stdout.split())


def test_resume_with_another_number_of_ranks_is_one_clear_line(tiny_runs, tmp_path):
    """Each rank resumes its own generator states: a checkpoint of another world size is one
    line, not an IndexError (more ranks) or a resume with the wrong streams (fewer)."""
    d, _ = tiny_runs
    shutil.copytree(os.path.join(d, "mirror"), tmp_path / "mirror", ignore=shutil.ignore_patterns("sft*"))
    path = tmp_path / "mirror" / "onpolicy-small-g1.pt"
    ck = torch.load(path, weights_only=True)
    ck["rng"] = {k: v * 2 for k, v in ck["rng"].items()}  # as if saved by 2 ranks
    torch.save(ck, path)
    out = train("--mode", "onpolicy", "--out-dir", str(tmp_path), *TINY, "--resume", check=False)
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and len(lines) == 1 and "was saved by 2 rank(s)" in lines[0], out.stderr


def test_killed_run_resumes_from_its_held_back_checkpoint_exactly(tiny_runs, tmp_path):
    """Periodic checkpoints are written one step late (once the next step found the weights
    good) with the RNG states of the step they belong to: a run killed between checkpoints
    resumes to the same weights as an uninterrupted one, and metrics.jsonl has each step once."""
    d, _ = tiny_runs
    shutil.copytree(os.path.join(d, "mirror"), tmp_path / "mirror", ignore=shutil.ignore_patterns("onpolicy*", "sft*"))
    args = ["--mode", "onpolicy", "--out-dir", str(tmp_path), *TINY, "--save-every", "10"]
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = tmp_path / "mirror" / "onpolicy-small-g1.metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count('"loss"') >= 25) and time.time() < deadline:
        time.sleep(0.01)
    proc.kill()
    proc.wait(timeout=60)
    ck = torch.load(tmp_path / "mirror" / "onpolicy-small-g1.pt", weights_only=True)
    assert 10 <= ck["step"] < 60, "kill the run between checkpoints"
    train(*args, "--resume")
    a = torch.load(os.path.join(d, "mirror", "onpolicy-small-g1.pt"), weights_only=True)["model"]
    b = torch.load(tmp_path / "mirror" / "onpolicy-small-g1.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"loss"' in line] == list(range(1, 61))


@pytest.mark.parametrize("args,message", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--task", "nope"], "invalid choice: 'nope'"),
    (["--mode", "nope"], "invalid choice: 'nope'"),
    (["--student-size", "1x10x3"], "width 10 is not divisible by 3 heads"),
    (["--student-size", "0x16x1"], "n_layer must be at least 1"),
    (["--student-size", "huge"], "unknown model size 'huge'"),
    (["--block-size", "4"], "shorter than this task's prompt + response"),
    (["--expert-ckpt", "/no/such/expert.pt"], "no such file"),
    (["--out-dir", "/dev/null/out"], "cannot write to output folder"),
    (["--gamma", "1.5"], "--gamma must be in 0..1"),
    (["--steps", "-1"], "--steps must be >= 0"),
    (["--lr", "abc"], "invalid float value: 'abc'"),
    (["--grad-clip", "-1"], "--grad-clip must be > 0"),  # a negative clip flips the gradient
    (["--grad-clip", "0"], "--grad-clip must be > 0"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    (["--mix", "0.999"], "gives 128 expert rows of 128 per rank"),  # no on-policy rows left
    (["--mix", "0.001"], "gives 0 expert rows of 128 per rank"),
    (["--estimator", "sampled", "--divergence", "forward"], "it takes no --divergence, --mix or --top-k"),
    (["--estimator", "sampled", "--mix", "0.5"], "it takes no --divergence, --mix or --top-k"),
    (["--beta", "0.3"], "--beta applies to --divergence jsd only"),
    (["--digits", "2", "--eval-prompts", "100"], "at most 100 distinct prompts"),  # else: no training prompt
    (["--digits", "2", "--eval-prompts", "10000000"], "at most 100 distinct prompts"),  # at once, not after drawing
    (["--temperature", "inf"], "--temperature must be a finite number"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--mix", "nan"], "--mix must be a finite number"),
    (["--gamma=-inf", "--beta", "nan"], "--gamma must be a finite number; --beta must be a finite number"),
    (["--seed", str(2**70)], "--seed must be in 0..2147483647"),  # before the expert trains
    (["--seed", "-1"], "--seed must be in 0..2147483647"),
    (["--expert-min-reward", "1.5"], "--expert-min-reward must be in 0..1"),
    (["--threads", "100000"], "--threads must be in 0..1024"),
    (["--mode-weight", "1"], "--mode-weight is a probability in (0, 1)"),
    (["--no-copy"], "task mirror takes no --copy (its flags: --digits, --answer-len, --sign, --mode-weight)"),
    (["--task", "countdown", "--digits", "3"], "task countdown takes no --digits"),
    (["--mode-weight", "0.2", "--no-sign"], "for a task with a sign"),
    (["--format", "words", "--task", "countdown"], "invalid choice: 'words'"),
    (["--lr-schedule", "nope"], "invalid choice: 'nope'"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
])
def test_bad_input_is_one_clear_line(args, message):
    out = train(*args, check=False, timeout=60)
    assert out.returncode != 0 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("error:"), out.stderr


def test_a_bug_keeps_its_traceback(tmp_path):
    """Only the project's UsageError becomes one line: an internal ValueError (a bug) must show
    its traceback rather than pass for bad input."""
    code = ("import runpy, sys, data\n"
            "def bug(*a): raise ValueError('internal bug')\n"
            "data.PromptStream.batch = bug\n"
            f"sys.argv = ['train.py', '--mode', 'expert', '--out-dir', {str(tmp_path)!r}, *{TINY!r}]\n"
            "runpy.run_path('train.py', run_name='__main__')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" in out.stderr and "ValueError: internal bug" in out.stderr


def test_foreign_or_corrupt_checkpoint_is_refused_and_kept(tiny_runs, tmp_path):
    d, _ = tiny_runs
    (tmp_path / "mirror").mkdir()
    expert = tmp_path / "mirror" / "expert.pt"
    shutil.copy(os.path.join(d, "mirror", "expert.pt"), expert)
    out = train("--mode", "base", "--out-dir", str(tmp_path), *TINY, "--digits", "3", check=False)
    assert out.returncode != 0 and "made for task=" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = train("--mode", "base", "--out-dir", str(tmp_path), *TINY, "--expert-size", "medium", check=False)
    assert out.returncode != 0 and "made for model_args=" in out.stderr
    before = expert.read_bytes()
    assert before == open(os.path.join(d, "mirror", "expert.pt"), "rb").read()  # untouched
    expert.write_bytes(b"garbage")
    out = train("--mode", "base", "--out-dir", str(tmp_path), *TINY, check=False)
    assert out.returncode != 0 and "not a readable checkpoint" in out.stderr and expert.read_bytes() == b"garbage"


def test_students_and_eval_refuse_a_retrained_expert(tiny_runs, tmp_path):
    """Every checkpoint records its expert's fingerprint: after expert.pt is retrained, the old
    base is not silently paired with it, and eval.py CHECKPOINT does not trust it either."""
    d, _ = tiny_runs
    shutil.copytree(os.path.join(d, "mirror"), tmp_path / "mirror", ignore=shutil.ignore_patterns("sft*"))
    # another learning rate: other weights (and this run asks for it, so expert.pt itself is accepted)
    train("--mode", "expert", "--out-dir", str(tmp_path / "other"), *TINY, "--expert-lr", "0.02",
          "--expert-min-reward", "0")
    shutil.copy(tmp_path / "other" / "mirror" / "expert.pt", tmp_path / "mirror" / "expert.pt")
    out = train("--mode", "sft", "--out-dir", str(tmp_path), *TINY, "--expert-min-reward", "0", "--expert-lr", "0.02",
                check=False)
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and len(lines) == 1 and "base-small.pt: made for expert=" in lines[0], out.stderr
    assert not (tmp_path / "mirror" / "sft-small.pt").exists()
    student = str(tmp_path / "mirror" / "onpolicy-small-g1.pt")
    out = subprocess.run([sys.executable, "eval.py", student], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and len(lines) == 1 and "is not the expert" in lines[0], out.stderr
    out = subprocess.run([sys.executable, "eval.py", student, "--expert", os.path.join(d, "mirror", "expert.pt")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "result: " in out.stdout, out.stderr


def test_corrupt_expert_samples_cache_is_sampled_again(tiny_runs, tmp_path):
    d, _ = tiny_runs
    shutil.copytree(os.path.join(d, "mirror"), tmp_path / "mirror", ignore=shutil.ignore_patterns("sft*", "onpolicy*"))
    caches = sorted((tmp_path / "mirror").glob("expert-samples-*.pt"))
    assert caches
    for i, c in enumerate(caches):  # one cut short, the rest garbage
        c.write_bytes(c.read_bytes()[:len(c.read_bytes()) // 2] if i == 0 else b"garbage")
    out = train("--mode", "sft", "--out-dir", str(tmp_path), *TINY)
    assert "sampling it again" in out.stdout
    mine, theirs = result(str(tmp_path), "sft-small"), result(d, "sft-small")
    a, b = mine.pop("config"), theirs.pop("config")  # the recorded settings: only the folder differs
    assert a.pop("out_dir") != b.pop("out_dir") and a == b
    assert mine == theirs  # the same samples, the same run
    used = next((tmp_path / "mirror").glob("expert-samples-1920-*.pt"))  # --steps 60 x --batch-size 32
    assert torch.load(used, weights_only=True)["data"]["response"].shape[0] == 1920  # rewritten whole


def test_result_json_is_written_whole_or_not_at_all(tiny_runs, tmp_path, monkeypatch):
    """result.json is the experiments' "done" marker: a run that fails while writing it leaves
    none, not a half-written one."""
    import train as train_py
    d, _ = tiny_runs
    shutil.copytree(os.path.join(d, "mirror"), tmp_path / "mirror", ignore=shutil.ignore_patterns("sft*", "onpolicy*"))
    real = train_py.evaluation.evaluate
    monkeypatch.setattr(train_py.evaluation, "evaluate", lambda *a, **k: dict(real(*a, **k), oops=object()))
    threads = torch.get_num_threads()
    try:
        with pytest.raises(TypeError, match="not JSON serializable"):
            train_py.main(["--mode", "sft", "--out-dir", str(tmp_path), *TINY, "--steps", "0"])
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "mirror" / "sft-small.pt").exists()
    assert not [p.name for p in (tmp_path / "mirror").iterdir() if "result.json" in p.name and "sft" in p.name]


def test_torchrun_two_processes_match_one(tiny_runs, tmp_path):
    """DDP on CPU (gloo): 2 ranks x 16 sequences == 1 rank x 32, the same SFT rows."""
    d, _ = tiny_runs
    for sub in ("one", "two"):
        shutil.copytree(os.path.join(d, "mirror"), tmp_path / sub / "mirror",
                        ignore=shutil.ignore_patterns("onpolicy*", "sft*"))
    args = ["--mode", "sft", *TINY, "--steps", "20"]
    train(*args, "--out-dir", str(tmp_path / "one"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", "29533", "train.py", *args,
                          "--out-dir", str(tmp_path / "two")], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "all 2 ranks hold identical weights" in out.stdout
    a = torch.load(tmp_path / "one" / "mirror" / "sft-small.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "two" / "mirror" / "sft-small.pt", weights_only=False)["model"]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-3), k


def in_process(argv):
    """train.main(argv) in this process (so that a test can patch it), its threads restored."""
    import train as train_py
    threads = torch.get_num_threads()
    try:
        return train_py.main(argv)
    finally:
        torch.set_num_threads(threads)


def diverge_from(monkeypatch, first_step):
    """From that step on, a learning rate of ~1e28: one step makes finite weights of that size,
    and the next loss (or sampling) is not finite."""
    import runtime
    real = runtime.lr_factor
    monkeypatch.setattr(runtime, "lr_factor", lambda step, *a: 1e30 if step >= first_step else real(step, *a))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_runs, tmp_path, monkeypatch):
    """The checkpoint kept after a divergence is one whose weights gave a finite loss and
    gradient, so resuming it trains on: not the one the diverging step made (finite, ~1e28),
    which only the next step's loss shows to be bad."""
    from errors import UsageError
    d, _ = tiny_runs
    shutil.copytree(os.path.join(d, "mirror"), tmp_path / "mirror", ignore=shutil.ignore_patterns("onpolicy*", "sft*"))
    args = ["--mode", "sft", "--out-dir", str(tmp_path), *TINY, "--save-every", "1"]
    with monkeypatch.context() as m:
        diverge_from(m, 0)  # blows the weights up in the first step
        with pytest.raises(UsageError, match="non-finite loss.*no checkpoint of this run was written"):
            in_process(args)
    with monkeypatch.context() as m:
        diverge_from(m, 10)  # ten good steps, then a learning rate that diverges at once
        with pytest.raises(UsageError, match="non-finite loss.*last good checkpoint is kept"):
            in_process(args)
    ck = torch.load(tmp_path / "mirror" / "sft-small.pt", weights_only=False)
    assert ck["step"] == 10 and all(torch.isfinite(v).all() for v in ck["model"].values())
    train(*args, "--resume")  # the kept checkpoint trains on to the end
    ck = torch.load(tmp_path / "mirror" / "sft-small.pt", weights_only=True)
    assert ck["step"] == 60 and all(torch.isfinite(v).all() for v in ck["model"].values())


def snapshot_files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("mode", ["sft", "onpolicy"])
def test_a_failed_rerun_leaves_the_finished_run_byte_identical(tiny_runs, tmp_path, monkeypatch, mode):
    """A rerun that fails (here it diverges at its first step) leaves every file of the finished
    run as it was: checkpoint, result.json and metrics.jsonl. Online IL's divergence shows in
    sampling, and is one line there too."""
    from errors import UsageError
    d, _ = tiny_runs
    shutil.copytree(os.path.join(d, "mirror"), tmp_path / "mirror")
    before = snapshot_files(tmp_path / "mirror")
    diverge_from(monkeypatch, 0)
    with pytest.raises(UsageError, match="^non-finite .*no checkpoint of this run"):
        in_process(["--mode", mode, "--out-dir", str(tmp_path), *TINY])
    assert snapshot_files(tmp_path / "mirror") == before


def test_resume_gives_an_unfinished_base_more_steps(tiny_runs, tmp_path, monkeypatch):
    """A base stopped by Ctrl-C is continued by --resume, with more --base-steps if asked; once
    finished, a run asking for other --base-steps refuses it."""
    import runtime
    d, _ = tiny_runs
    shutil.copytree(os.path.join(d, "mirror"), tmp_path / "mirror", ignore=shutil.ignore_patterns("onpolicy*", "sft*", "base*"))
    args = ["--mode", "base", "--out-dir", str(tmp_path), *TINY, "--base-steps", "12"]
    real = runtime.Run.set_lr

    def ctrl_c_at_step_5(run, step):
        run.stop_requested = run.stop_requested or step == 5
        return real(run, step)

    with monkeypatch.context() as m:
        m.setattr(runtime.Run, "set_lr", ctrl_c_at_step_5)
        with pytest.raises(SystemExit):
            in_process(args)
    ck = torch.load(tmp_path / "mirror" / "base-small.pt", weights_only=True)
    assert (ck["step"], ck["total"]) == (6, 12)
    in_process([*args[:-1], "16", "--resume"])
    ck = torch.load(tmp_path / "mirror" / "base-small.pt", weights_only=True)
    assert (ck["step"], ck["total"]) == (16, 16)
    from errors import UsageError
    with pytest.raises(UsageError, match="--base-steps 16 \\(this run: 12\\)"):
        in_process(args)


def test_online_il_that_diverges_keeps_its_last_good_checkpoint(tiny_runs, tmp_path, monkeypatch):
    """The online loop stops with one line, as SFT does, and what it keeps trains on."""
    from errors import UsageError
    d, _ = tiny_runs
    shutil.copytree(os.path.join(d, "mirror"), tmp_path / "mirror", ignore=shutil.ignore_patterns("onpolicy*"))
    args = ["--mode", "onpolicy", "--out-dir", str(tmp_path), *TINY, "--save-every", "1"]
    train(*args, "--steps", "5")
    diverge_from(monkeypatch, 5)
    with pytest.raises(UsageError, match="last good checkpoint is kept"):
        in_process([*args, "--steps", "10", "--resume"])
    ck = torch.load(tmp_path / "mirror" / "onpolicy-small-g1.pt", weights_only=True)
    assert ck["step"] == 5 and all(torch.isfinite(v).all() for v in ck["model"].values())


def test_word_level_distillation_trains_on_its_own_loss(tiny_runs, tmp_path):
    """--sft-loss forward_kl reaches sft.train: its first step's loss is the forward KL to the
    expert's scores, not the cross-entropy of the plain SFT run."""
    d, _ = tiny_runs
    shutil.copytree(os.path.join(d, "mirror"), tmp_path / "mirror", ignore=shutil.ignore_patterns("onpolicy*", "sft*"))
    train("--mode", "sft", "--out-dir", str(tmp_path), *TINY, "--steps", "1")
    train("--mode", "sft", "--sft-loss", "forward_kl", "--out-dir", str(tmp_path), *TINY, "--steps", "1")

    def first_loss(name):
        rows = (tmp_path / "mirror" / f"{name}.metrics.jsonl").read_text().splitlines()
        return next(json.loads(r)["loss"] for r in rows if '"loss"' in r)

    ce, fkl = first_loss("sft-small"), first_loss("sft-small-forward_kl")
    assert 0 < fkl < ce  # the KL is the cross-entropy less the expert's entropy


def test_an_expert_on_a_plateau_is_trained_again_from_another_init(tmp_path, monkeypatch):
    """--expert-restarts: an attempt that ends below --expert-min-reward is trained again from
    another init on the same data; one that converges at once is the role's own init (no restart)."""
    import train as train_py
    cfg = train_py.parse_args([*TINY, "--expert-steps", "2", "--out-dir", str(tmp_path), "--expert-min-reward", "0.9"])
    env = train_py.setup(cfg)
    trained = []

    def fake_fit(cfg, env, kind, name, model, steps, lr, loop, data, *args, **kw):
        trained.append((name, model.wte.weight.detach().clone(), data["response"]))
        return model

    for rewards, n in (([0.3, 0.5, 0.99], 3), ([0.99], 1), ([0.1, 0.1, 0.1], 3)):
        trained.clear()
        it = iter(rewards)
        monkeypatch.setattr(train_py, "fit", fake_fit)
        monkeypatch.setattr(train_py.evaluation, "quick_eval", lambda *a, **k: dict(reward=next(it)))
        train_py.train_expert(cfg, env)
        assert len(trained) == n  # the last attempt is returned either way; the gate then refuses it
        assert all(torch.equal(t[2], trained[0][2]) for t in trained)  # the same data each time
        assert all(not torch.equal(a[1], b[1]) for a, b in zip(trained, trained[1:]))  # another init each time
    first = train_py.new_model(cfg, env, cfg.expert_size, "expert").wte.weight  # the first attempt: the role's init
    assert torch.equal(trained[0][1], first)
    # the realizable base: the same loop, with the expert's reward less 0.05 as its bar
    trained.clear()
    it = iter([0.7, 0.99])
    data = dict(response=torch.zeros(1))
    train_py.fit_until(cfg, env, "base-small", "small", "student", 2, 1e-3, data, 0.95, "fingerprint", 0.0)
    assert [t[0] for t in trained] == ["base-small", "base-small"]
    assert torch.equal(trained[0][1], train_py.new_model(cfg, env, "small", "student").wte.weight)


def test_a_checkpoint_from_an_older_version_is_one_line(tmp_path):
    """A checkpoint whose config lacks a flag that changes its run (made before the flag existed)
    is refused with one line that says so, never reused under a guessed meaning."""
    import train as train_py
    from config import identity
    from model import save_checkpoint
    cfg = train_py.parse_args([*TINY, "--out-dir", str(tmp_path), "--expert-steps", "0"])
    env = train_py.setup(cfg)
    expert = train_py.new_model(cfg, env, cfg.expert_size, "expert")
    made = {k: v for k, v in vars(cfg).items() if k != "warmup"}
    path = tmp_path / "mirror" / "expert.pt"
    save_checkpoint(str(path), expert, **identity(env, expert.cfg, None), config=made, step=0, total=0)
    with pytest.raises(ValueError, match="made by an older version of this code \\(--warmup not recorded\\)"):
        train_py.load_finished(str(path), cfg, env, "expert", cfg.expert_size, None)


def test_an_expert_stops_at_convergence_and_is_reused_only_by_the_same_schedule(tmp_path):
    """--stop-at: the expert ends at its first held-out check at or above it, and that checkpoint
    counts as finished (reused, not trained on); a run asking for another --stop-at refuses it."""
    d = str(tmp_path)
    out = train("--mode", "expert", "--out-dir", d, *TINY, "--stop-at", "0.5")
    assert "converged: its held-out check reached 0.5 at step" in out.stdout
    ck = torch.load(os.path.join(d, "mirror", "expert.pt"), weights_only=False)
    assert ck["converged"] and ck["step"] < ck["total"] == 300
    rows = [json.loads(line) for line in open(os.path.join(d, "mirror", "expert.metrics.jsonl"))]
    assert rows[-1]["step"] == ck["step"] and rows[-1]["eval_reward"] >= 0.5  # it stopped at that check
    assert all(r["eval_reward"] < 0.5 for r in rows[:-1] if "eval_reward" in r)  # and not before
    out = train("--mode", "base", "--out-dir", d, *TINY, "--stop-at", "0.5")
    assert "training expert" not in out.stdout  # reused as a finished expert
    out = train("--mode", "base", "--out-dir", d, *TINY, check=False)
    assert out.returncode == 1 and "was trained with --stop-at 0.5 (this run: 0.0)" in out.stderr
    out = train("--mode", "base", "--out-dir", d, *TINY, "--stop-at", "0.5", "--eval-every", "10", check=False)
    assert out.returncode == 1 and "was trained with --eval-every 20 (this run: 10)" in out.stderr
