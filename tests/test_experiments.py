"""The research harness (research/: experiments, jobs, modes, the exact toys, reports) and eval.py's command line."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import eval as eval_module
from countdown import CountdownTask
from data import MirrorTask, Tokenizer, eval_prompts, make_task, seed_for, task_tokenizer
from research import experiments, jobs, toy
from research.report import Report
from config import parse_args, run_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_toy_forward_projection_is_uniform_reverse_picks_one_mode():
    K, eps = 10, 0.01
    res = toy.toy(K, eps)
    fwd, rev = res["forward KL (offline IL)"], res["reverse KL (online IL)"]
    # by symmetry the forward projection matches the expert's mean embedding (0): s = 0, uniform
    assert abs(fwd["s"]) < 1e-6 and abs(fwd["reward"] - 2 / K) < 1e-9
    # its forward KL is then KL(p || uniform) = log K - H(p), by hand
    p = [(1 - eps) / 2] * 2 + [eps / (K - 2)] * (K - 2)
    assert abs(fwd["fwd_kl"] - (math.log(K) + sum(x * math.log(x) for x in p))) < 1e-9
    # the reverse projection commits to one correct answer despite a large forward KL
    assert rev["reward"] > 0.99 and rev["fwd_kl"] > 10 * fwd["fwd_kl"] and rev["rev_kl"] < fwd["rev_kl"]
    # and is a stationary point no worse than committing fully (its KL is below -log p_end)
    assert rev["rev_kl"] < -math.log((1 - eps) / 2)


COMPANIONS = dict(beta=["--divergence", "jsd"], cost=["--estimator", "sampled"], top_k_rest=["--top-k", "4"])


def test_every_method_trains_a_run_of_its_own():
    """Each method of the grid and the ablation has its own run name (config.run_name), so no run
    overwrites another's checkpoint; and every flag of online IL's own, set away from its
    default, names the run too (a new flag needs nothing else)."""
    from dataclasses import fields
    from config import Config
    names = [run_name(parse_args([*flags, "--student-size", "small"])) for _, flags in jobs.ABLATION]
    assert len(set(names)) == len(names) and "onpolicy-small-g1" in names
    default = run_name(parse_args([]))
    for f in fields(Config):
        if f.metadata.get("changes") == "onpolicy":
            other = (not f.default if isinstance(f.default, bool) else [c for c in f.metadata["choices"] if c != f.default][0]
                     if f.metadata["choices"] else f.default / 2 if f.default else 4 if f.type in (int, "int") else 0.25)
            flag = "--" + ("no-" if f.default is True else "") + f.name.replace("_", "-")
            argv = [flag] if isinstance(f.default, bool) else [flag, str(other)]
            argv += COMPANIONS.get(f.name, [])  # a flag that applies only beside another
            assert run_name(parse_args(argv)) != default, f.name


def test_grid_jobs_come_after_their_dependencies():
    runs = [(f"d{s}", ["--seed", str(s)]) for s in range(2)]
    listed = jobs.grid_jobs(runs, "medium", ["medium", "small"], jobs.GRID)
    seen = set()
    for j in listed:
        assert all(d in seen for d in j.deps), j.key
        assert j.result.startswith(os.path.join(j.key[0], "mirror"))
        seen.add(j.key)
    assert len(listed) == 2 * (1 + 2 * 4)
    deps = {j.key: set(j.deps) for j in listed}
    for label in ("base", "offline SFT"):  # the second size reuses the expert samples the first one drew
        assert ("d0", label, "medium") in deps[("d0", label, "small")]


def test_an_experiment_prints_its_commands_in_dependency_order(tmp_path):
    """--print-commands: the train.py commands, one a line, each after the ones it needs, with the
    run names train.py gives them (a --train-args flag of online IL names its runs too)."""
    out = subprocess.run([sys.executable, "-m", "research.experiments", "--grid", "--seeds", "2", "--print-commands",
                          "--out-dir", str(tmp_path), "--train-args", "--divergence jsd"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and os.listdir(tmp_path) == [], out.stderr[-2000:]
    waves, lines = [], out.stdout.strip().splitlines()
    for line in lines[1:]:
        if line.startswith("# wave "):
            waves.append([])
        else:
            assert line.startswith("python train.py --threads 1 ")
            waves[-1].append(line.split("--mode ")[1].split()[0] + " " + line.split("--student-size ")[1].split()[0])
    assert sum(map(len, waves)) == 2 * 9
    # the experts; the first size's bases; the second's (they reuse its samples) beside its students; the rest
    assert waves[0] == ["expert medium"] * 2 and waves[1] == ["base medium"] * 2 and len(waves) == 4
    assert set(waves[2]) == {"base small", "sft medium", "onpolicy medium"} and set(waves[3]) == {"sft small", "onpolicy small"}
    listed = jobs.grid_jobs([(str(tmp_path / "seed0"), ["--divergence", "jsd"])], "medium", ["small"], jobs.GRID)
    assert [os.path.basename(j.result) for j in listed][-2:] == ["onpolicy-small-g1-jsd.result.json",
                                                                 "onpolicy-small-g0-jsd.result.json"]


def test_horizon_task_has_two_answers_at_every_h():
    for h in (1, 2, 4, 8):
        t = MirrorTask(digits=8, answer_len=h)
        assert t.answers("12345678=") == ["+" + "12345678"[:h], "-" + "87654321"[:h]]


def test_toy_command_prints_the_table(tmp_path):
    out = subprocess.run([sys.executable, "-m", "research.toy", "--out-dir", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "reverse KL (online IL)" in out.stdout


def test_eval_cli_errors_are_one_line():
    out = subprocess.run([sys.executable, "eval.py", "/no/such.pt"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and out.stderr.strip() == "error: /no/such.pt: no such checkpoint"


@pytest.mark.parametrize("args,message", [
    (["--grid", "--seeds", "0"], "--seeds and --jobs must be >= 1"),
    (["--ablation", "--sizes", "medium"], "--sizes 'medium'"),
    (["--horizon", "--horizons", "1,x"], "--horizons '1,x'"),
    (["--grid", "--task", "nope"], "invalid choice: 'nope'"),
    (["--grid", "--ablation"], "choose one of"),
    (["--grid", "--train-args", "--no-sign", "--seeds", "0"], "--seeds and --jobs"),  # not "expected one argument"
])
def test_eval_bad_flags_are_one_line(args, message, tmp_path):
    out = subprocess.run([sys.executable, "-m", "research.experiments", *args, "--out-dir", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], out.stderr


def test_sparkline_maps_rewards_to_block_heights():
    assert eval_module.sparkline([0, 0.5, 1]) == " ▄█"
    assert eval_module.sparkline([-1, 2]) == " █"  # out of range: clipped, never an index error
    assert eval_module.sparkline([0.25], lo=0, hi=0.5) == "▄"


def test_reward_curve_reads_eval_rewards_and_averages_seeds(tmp_path):
    for s, rewards in enumerate(([0.0, 0.5, 1.0], [0.0, 0.5, 0.0])):
        d = tmp_path / f"seed{s}" / "mirror"
        d.mkdir(parents=True)
        with open(d / "sft-small.metrics.jsonl", "w") as f:
            for i, r in enumerate(rewards):
                f.write(json.dumps(dict(step=i, loss=1.0)) + "\n" + json.dumps(dict(step=i, eval_reward=r)) + "\n")
    paths = [str(tmp_path / f"seed{s}" / "mirror" / "sft-small.metrics.jsonl") for s in range(2)]
    assert eval_module.reward_curve(paths) == "[ ▄▄] 0.00 -> 0.50 by step 2"  # means 0, 0.5, 0.5
    assert eval_module.reward_curve([str(tmp_path / "no-such-run.metrics.jsonl")]) == ""


def test_claim_counts_name_every_failing_seed():
    res = {("expert", "medium"): [dict(reward=1.0), dict(reward=0.6)],
           ("offline SFT", "medium"): [dict(reward=0.97), dict(reward=0.6)],
           ("offline SFT", "small"): [dict(reward=0.2), dict(reward=0.5)],
           ("online (γ=1)", "small"): [dict(reward=1.0), dict(reward=0.7)]}
    lines = experiments.claim_counts(res, "medium", ["small"])
    assert "holds on 1/2 seeds; fails on seed 1 (expert 0.600)" in lines[0]
    assert "holds on 2/2 seeds" in lines[1]  # 0.6 is within 0.05 of 0.6
    assert "holds on 1/2 seeds; fails on seed 1 (online 0.700, SFT 0.500)" in lines[2]


def test_report_md_holds_the_tables_command_and_machine(tmp_path):
    report = Report("a title")
    report.add("a table", ["row 1", "row 2"])
    report.write(str(tmp_path))
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# a title") and "## a table" in text and "row 1\nrow 2" in text
    assert "- command: `python " in text and "- machine: " in text and "- commit: " in text and "- wall time: " in text


def test_first_errors_by_hand():
    t = MirrorTask(digits=5)
    texts = ["+31415", "+31414", "+3141", "+314155", "-5", "x"]
    # right; wrong at the last digit (5); stopped early (the end where digit 5 goes); too long (6);
    # '-5' then nothing (position 2); garbage (0)
    assert eval_module.first_errors(t, ["31415="] * 6, texts) == [1, 0, 1, 0, 0, 2, 1]


def test_mean_follow_averages_each_position_over_seeds():
    assert experiments.mean_follow([dict(follow=[1.0, 0.5]), dict(follow=[0.0, 0.5])]) == [0.5, 0.5]


def test_horizon_sweep_runs_end_to_end_and_train_args_override_its_recipe(tmp_path):
    tiny = ("--expert-steps 4 --base-steps 2 --steps 2 --batch-size 8 --eval-prompts 16 --eval-every 1 "
            "--log-every 1 --expert-min-reward 0")  # the recipe's gate would refuse a 4-step expert
    out = subprocess.run([sys.executable, "-m", "research.experiments", "--horizon", "--horizons", "2", "--seeds", "1", "--sizes",
                          "small,tiny", "--out-dir", str(tmp_path), "--train-args", tiny],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    with open(tmp_path / "H2" / "seed0" / "pointer" / "expert.result.json") as f:
        assert json.load(f)["n_prompts"] == 16
    steps = [json.loads(line)["step"] for line in open(tmp_path / "H2" / "seed0" / "pointer" / "expert.metrics.jsonl")]
    assert max(steps) == 4  # --train-args came after the recipe's 6000 steps, and won
    for log in ("expert-small.log", "base-tiny.log", "online_(γ=1)-tiny.log"):  # what each run was given
        with open(tmp_path / "H2" / "seed0" / "logs" / log) as f:
            cfg = json.loads(next(line for line in f if line.startswith("config: "))[len("config: "):])
        assert (cfg["expert_lr"], cfg["lr"], cfg["eval_every"]) == (0.0, 0.0, 1)  # the sizes' own lr at H=2; the override's
        assert (cfg["task"], cfg["task_args"]["digits"], cfg["task_args"]["answer_len"], cfg["expert_steps"]) == (
            "pointer", 10, 2, 4)
    report = (tmp_path / "report.md").read_text()
    assert "pointer (16 digits" not in report and "pointer (10 digits), student small (realizable)" in report
    assert "where the realizable models' errors start at H=2" in report and "rate per position" in report
    assert "claims at H=2" in report and "expert reaches >= 0.95" in report
    assert "wall time, in one piece" in report and "min for 9 train.py runs, 2 at a time" in report
    plot = report[report.index("as a text plot"):].splitlines()
    assert plot[3].split()[:2] == ["student", "method"] and plot[3].split()[-1] == "H=2"
    assert plot[4].startswith("small (realizable)") and plot[4].split()[2] == "expert"
    steps = next(line for line in report.splitlines() if line.startswith("H=2   expert"))
    assert steps.split()[3:] == ["4", "attempts", "1"]  # 4 steps (its check, on 4 prompts, never reached 1), one attempt
    with open(tmp_path / "data.json") as f:  # the figure's data, and the figure drawn from it
        data = json.load(f)
    with open(tmp_path / "H2" / "seed0" / "pointer" / "sft-tiny.result.json") as f:
        assert data["reward"]["tiny"]["offline SFT"] == {"mean": [json.load(f)["reward"]], "std": [0.0]}
    assert (tmp_path / "reward_vs_horizon.svg").exists() and "reward_vs_horizon.svg" in report


def test_a_finished_run_with_other_settings_is_refused_not_reused(tmp_path):
    """The experiments reuse a finished run (its result.json) only if every flag that changes it
    has this job's value; one that does not record a flag was made by an older version."""
    from dataclasses import asdict
    from errors import UsageError
    argv = ["--mode", "sft", "--seed", "1", "--expert-steps", "6000"]
    done = tmp_path / "sft-small.result.json"
    done.write_text(json.dumps(dict(reward=1.0, config=asdict(parse_args(["--threads", "1", *argv])))))
    jobs.check_done(str(done), argv)  # the same settings: reused
    jobs.check_done(str(done), [*argv, "--log-every", "7", "--gamma", "0"])  # flags that do not change an SFT run
    with pytest.raises(UsageError, match=r"--expert-steps 6000 \(this run: 1500\)"):
        jobs.check_done(str(done), argv[:-2])
    with pytest.raises(UsageError, match=r"--lr 0.0 \(this run: 0.003\)"):
        jobs.check_done(str(done), [*argv, "--lr", "3e-3"])
    with pytest.raises(UsageError, match=r"--digits 5 \(this run: 6\); --answer-len 5 \(this run: 6\)"):
        jobs.check_done(str(done), [*argv, "--digits", "6"])
    old = asdict(parse_args(["--threads", "1", *argv]))
    del old["warmup"]  # a run made before --warmup existed
    done.write_text(json.dumps(dict(reward=1.0, config=old)))
    with pytest.raises(UsageError, match="made by an older version of this code \\(--warmup not recorded\\)"):
        jobs.check_done(str(done), argv)


def test_countdown_grid_takes_its_recipe_and_number_tokens(tmp_path):
    """experiments.py --grid --task countdown: the recipe (experiments.task_recipe) reaches every run,
    --train-args override it, the bar for the expert is countdown's, and a checkpoint made with
    number tokens evaluates on its own (eval.py rebuilds the task's tokenizer), with --draws on the
    prompts it trained on."""
    tiny = "--expert-steps 4 --base-steps 2 --steps 2 --batch-size 8 --eval-prompts 16 --log-every 1"
    out = subprocess.run([sys.executable, "-m", "research.experiments", "--grid", "--task", "countdown", "--seeds", "1", "--sizes",
                          "small,tiny", "--out-dir", str(tmp_path), "--train-args", tiny],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for log in ("expert-small.log", "base-tiny.log", "online_(γ=0)-tiny.log"):
        with open(tmp_path / "seed0" / "logs" / log) as f:
            cfg = json.loads(next(line for line in f if line.startswith("config: "))[len("config: "):])
        assert (cfg["task"], cfg["eval_every"], cfg["expert_steps"], cfg["base_steps"]) == ("countdown", 1000, 4, 2)
        assert (cfg["task_args"]["format"], cfg["task_args"]["number_tokens"]) == ("steps", True)
    report = (tmp_path / "report.md").read_text()
    assert "expert reaches >= 0.8" in report
    with open(tmp_path / "data.json") as f:  # every run's held-out curve, for the figure drawn beside it
        runs = {(r["method"], r["size"]): r for r in json.load(f)["runs"]}
    assert len(runs) == 9 and runs[("online (γ=0)", "tiny")]["step"] and (tmp_path / "reward_vs_step.svg").exists()
    assert "--expert-steps 24000" in report and "--eval-prompts 1024" in report  # the recipe, then --train-args
    ck = torch.load(tmp_path / "seed0" / "countdown" / "sft-tiny.pt", weights_only=False)
    assert ck["tokenizer"].startswith("numbers:")
    with open(tmp_path / "seed0" / "logs" / "base-tiny.log") as f:  # it reused the samples base-small drew
        assert "expert responses" not in f.read()
    out = subprocess.run([sys.executable, "eval.py", str(tmp_path / "seed0" / "countdown" / "sft-tiny.pt"), "--draws", "3"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "reward" in out.stdout and "mistakes (temperature 1" in out.stdout, out.stderr[-2000:]
    draws = re.findall(r"(held-out|training) prompts \(16\), reward over 3 sampling\(s\): ([0-9.]+) \(one sampling: "
                       r"([0-9.]+) to ([0-9.]+)\)", out.stdout)
    assert [d[0] for d in draws] == ["held-out", "training"], out.stdout[-1000:]
    assert all(float(lo) <= float(mean) <= float(hi) <= 1 for _, mean, lo, hi in draws)
    # the prompts --draws calls training prompts are the ones the runs trained on: the expert samples they cached
    task, tok = CountdownTask(), Tokenizer(numbers=True)
    held_out = eval_prompts(task, 16, seed=seed_for(0, "held-out"))
    for name, role in (("sft-tiny", "sft/data"), ("base-tiny", "base/data")):
        cached = torch.load(tmp_path / "seed0" / "countdown" / f"expert-samples-16-{seed_for(0, role)}.pt")["data"]
        seen = [tok.decode(row[ok].tolist()[1:]) for row, ok in zip(cached["prompt"], cached["prompt_valid"])]
        assert eval_module.training_prompts(task, held_out, name, 0, 16) == seen and not set(seen) & set(held_out)
    for bad, says in ((["--draws", "-1", "x.pt"], "--draws must be >= 0"), (["--draws", "2"], "the following arguments")):
        out = subprocess.run([sys.executable, "eval.py", *bad], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and says in out.stderr, out.stderr
    for name in ("sft-tiny", "expert"):  # as a student and its expert from before written steps and number tokens
        ck = torch.load(tmp_path / "seed0" / "countdown" / f"{name}.pt", weights_only=False)
        ck["tokenizer"] = "chars:0123456789+-*/()=,;"
        ck["task"] = {k: v for k, v in ck["task"].items() if k not in ("format", "number_tokens")}
        torch.save(ck, tmp_path / f"old-{name}.pt")
    out = subprocess.run([sys.executable, "eval.py", str(tmp_path / "old-sft-tiny.pt"), "--expert",
                          str(tmp_path / "old-expert.pt")], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0 and "older version" in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("p,H,eps", [(0.5, 1, 0.01), (0.1, 1, 0.01), (0.05, 2, 0.05), (0.2, 2, 1e-3), (0.3, 3, 0.1)])
def test_mode_weight_law_closed_form_matches_enumeration(p, H, eps):
    """q* = sigmoid(logit p + H c) for online IL and q = p for SFT, against the sequence-level KLs
    summed over every response and every target string (toy.mode_weight_enumerated), to the
    enumeration's grid step; the price c of "-" per digit as well."""
    law, enum = toy.mode_weight_law(p, H, eps), toy.mode_weight_enumerated(p, H, eps)
    assert abs(law["c"] - enum["c"]) < 1e-9
    assert abs(law["q_online"] - enum["q_online"]) < 1e-4 and abs(enum["q_sft"] - p) < 1e-4
    assert abs(law["reward_online"] - enum["reward_online"]) < 1e-4
    assert law["q_online"] > p and law["reward_online"] > law["reward_sft"]  # online prefers the representable mode


def test_mode_weight_price_is_least_at_a_uniform_guess():
    best, uniform, closed = toy.mode_weight_r_is_uniform(eps=0.01)
    assert abs(uniform - closed) < 1e-12 and best >= uniform - 1e-12
    # and c grows with the expert's confidence: about (V-1)/V ln((V-1)/eps) - ln V, far above ln V
    assert toy.mode_weight_law(0.5, 1, 1e-4)["c"] > 2 * toy.mode_weight_law(0.5, 1, 0.01)["c"] - 1


def test_modes_runs_end_to_end_and_measures_p_plus(tmp_path):
    """research/modes.py, tiny: every run, P('+') read from the first-token distribution (a
    probability), the expert's price c of '-' measured (>= 0 nats: no guess beats the expert), the report."""
    from research import modes
    out = subprocess.run([sys.executable, "-m", "research.modes", "--seeds", "1", "--weights", "0.2", "--out-dir", str(tmp_path),
                          "--train-args", "--expert-steps 40 --base-steps 10 --steps 10 --batch-size 16 "
                          "--eval-prompts 16 --eval-every 10 --log-every 10"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    text = (tmp_path / "report.md").read_text()
    assert "p=0.2, H=1" in text and "predicted q*" in text and "claims, each a count over seeds" in text
    with open(tmp_path / "data.json") as f:
        row, = json.load(f)["modes"]
    assert (row["p"], row["H"]) == (0.2, 1) and 0 < row["online (γ=1)"]["q"]["mean"] < 1
    assert (tmp_path / "mode_weight.svg").exists()
    from model import load_checkpoint
    task = make_task("pointer", digits=10, answer_len=1)
    tok = task_tokenizer(task)
    expert, _ = load_checkpoint(tmp_path / "p0.2" / "H1" / "seed0" / "pointer" / "expert.pt")
    prompts = eval_prompts(task, 16, seed=seed_for(0, "held-out"))
    q = modes.first_token_plus(expert, tok, prompts)
    assert 0 < q < 1
    c, c_uniform, c_guess = modes.minus_price(expert, tok, task, prompts)
    assert c == min(c_uniform, c_guess) and c >= 0
