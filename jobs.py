"""Running train.py jobs for the experiments (experiments.py, modes.py): the methods a grid
trains, the jobs of a grid (expert, bases, methods; dependencies first), a pool that runs them a
few at a time, and the check that a finished run found in an out-dir is the run asked for.
"""
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, fields

from errors import UsageError
from train import Config, parse_args

# A method is (column label, train.py flags, the run name train.py gives it for a student size).
EXPERT = ("expert", ["--mode", "expert"], lambda s: "expert")
BASE = ("base", ["--mode", "base"], lambda s: f"base-{s}")
SFT = ("offline SFT", ["--mode", "sft"], lambda s: f"sft-{s}")


def online(label, *flags, suffix=""):
    """An online IL method: --gamma (default 1) goes first; every other flag, with its value, follows."""
    flags = list(flags)
    gamma = "1"
    if "--gamma" in flags:  # remove the flag and its own value only (another flag may share the value)
        i = flags.index("--gamma")
        gamma = flags.pop(i + 1)
        flags.pop(i)
    return (label, ["--mode", "onpolicy", "--gamma", gamma, *flags], lambda s: f"onpolicy-{s}-g{float(gamma):g}{suffix}")


GRID = [EXPERT, BASE, SFT, online("online (γ=1)"), online("online (γ=0)", "--gamma", "0")]
ABLATION = [EXPERT, BASE, SFT, online("online γ=1"), online("online γ=0.5", "--gamma", "0.5"),
            online("online γ=0", "--gamma", "0"),
            online("sampled-token γ=0", "--gamma", "0", "--estimator", "sampled", suffix="-sampled"),
            online("sampled-token γ=1", "--estimator", "sampled", suffix="-sampled"),
            online("forward KL γ=1", "--divergence", "forward", suffix="-forward"),
            online("JSD(0.5) γ=1", "--divergence", "jsd", "--beta", "0.5", suffix="-jsd-beta0.5"),
            online("λ=0.5 mix γ=1", "--mix", "0.5", suffix="-mix0.5")]


# ----------------------------------------------------------------------------- running jobs
def run_jobs(jobs, parallel):
    """Run train.py jobs, `parallel` at a time. jobs: (key, argv, log_path, keys it waits for,
    result file), listed dependencies first, so a worker only waits on a job already running.
    A job whose result file exists, made with the same settings, is skipped (check_done). One
    progress line per job, with a rough ETA."""
    futures, t0, done = {}, time.time(), []

    def one(key, argv, log, deps, done_file):
        for d in deps:
            futures[d].result()
        if os.path.exists(done_file):  # finished earlier (a rerun, or a shared run): keep it, if it is this job
            check_done(done_file, argv)
            print(f"[{time.time() - t0:5.0f}s] already done: {' '.join(map(str, key))}", flush=True)
            return
        os.makedirs(os.path.dirname(log), exist_ok=True)
        with open(log, "w") as f:
            rc = subprocess.call([sys.executable, "train.py", "--threads", "1", *argv], stdout=f, stderr=subprocess.STDOUT)
        if rc != 0:
            raise UsageError(f"{' '.join(map(str, key))} failed (exit {rc}); its log, with the reason, is {log}")
        done.append(key)
        elapsed = time.time() - t0
        left = len(jobs) - len(done)
        print(f"[{elapsed:5.0f}s] done {len(done)}/{len(jobs)}: {' '.join(map(str, key))} | eta "
              f"{elapsed / len(done) * left:.0f}s", flush=True)

    with ThreadPoolExecutor(parallel) as pool:
        for job in jobs:
            futures[job[0]] = pool.submit(one, *job)
        for f in futures.values():
            f.result()
    return time.time() - t0


# flags added since runs were made, at defaults that do what the code did before them (restarts only
# run with the gate on, which the grid and the ablation turn off; the sweep that turns it on is newer)
ADDED_SINCE = ("mode_weight", "expert_restarts", "copy", "stop_at")


def check_done(done_file, argv):
    """A finished run is reused only if train.py was given these very settings: an out-dir left
    by another recipe (other steps, lr, sizes) is an error, never silently mixed in."""
    with open(done_file) as f:
        made = json.load(f).get("config")
    want = asdict(parse_args(["--threads", "1", *argv]))
    if made and want["task"] != "countdown":  # a countdown-only flag added since the run was made changes nothing else
        made = {**{f.name: want[f.name] for f in fields(Config) if f.metadata["help"].startswith("countdown:")}, **made}
    if made:  # flags added since, whose defaults do what the code did before them; and where it lives
        made = {**{k: getattr(Config, k) for k in ADDED_SINCE}, **made, "out_dir": want["out_dir"]}
    if made != want:
        what = (", ".join(f"--{k.replace('_', '-')} {made.get(k, '(not recorded)')} (this run: {want[k]})"
                          for k in want if made.get(k) != want[k])
                if made else "settings not recorded (an older version)")
        raise UsageError(f"{done_file} is a finished run with other settings: {what}; give another --out-dir")


def grid_jobs(runs, task, expert_size, student_sizes, methods):
    """runs: (run dir, train.py flags) per seed/setting. Experts first, then student bases,
    then the methods, so that every job's dependencies were submitted before it."""
    jobs = []
    for label, flags, name in methods:  # sizes outer, seeds inner: the seeds' bases of one size run side by side
        for size in student_sizes if label != "expert" else [expert_size]:
            for d, args in runs:
                deps = [] if label == "expert" else [(d, "expert", expert_size)]
                deps += [(d, "base", size)] if label not in ("expert", "base") else []
                if label in ("base", "offline SFT") and size != student_sizes[0]:
                    # every size learns from the same cached expert samples: the first size's run
                    # samples them, the others wait for it and reuse them (not sample them again)
                    deps.append((d, label, student_sizes[0]))
                log = os.path.join(d, "logs", f"{label}-{size}.log".replace(" ", "_"))
                # the quality gate is off inside an experiment: a seed whose expert did not converge is
                # counted and named in the claims table, not a stop. A recipe or --train-args can turn it
                # back on (the horizon sweep's does, for the restarts): then such an expert stops the run.
                jobs.append(((d, label, size), ["--expert-min-reward", "0", *flags, *args, "--out-dir", d,
                                                "--expert-size", expert_size, "--student-size", size], log, deps,
                             os.path.join(d, task, f"{name(size)}.result.json")))
    return jobs


def read_results(run_dirs, task, student_sizes, methods):
    """{(label, size): [result per run dir]} from the <name>.result.json files train.py writes."""
    res = {}
    for d in run_dirs:
        for label, _, name in methods:
            for size in student_sizes:
                with open(os.path.join(d, task, f"{name(size)}.result.json")) as f:
                    res.setdefault((label, size), []).append(json.load(f))
    return res


def glue_train_args(argv):
    """--train-args' value starts with "--": glue it on, or argparse takes it for a flag."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--train-args" in argv[:-1]:
        i = argv.index("--train-args")
        argv[i:i + 2] = [f"--train-args={argv[i + 1]}"]
    return argv
