"""Running train.py jobs for the experiments (experiments.py, modes.py): the methods a grid
trains, the jobs of a grid (expert, bases, methods; dependencies first), a pool that runs them a
few at a time (or prints their commands for a scheduler of your own), and the check that a
finished run found in an out-dir is the run asked for. Every run name, and every setting that
check compares, comes from config.Config (config.run_name, config.refuse_other).
"""
import json
import os
import shlex
import subprocess
import sys
import time
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor

from errors import UsageError
from config import parse_args, refuse_other, run_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A method is (column label, train.py flags); config.run_name names its run.
EXPERT, BASE, SFT = ("expert", ["--mode", "expert"]), ("base", ["--mode", "base"]), ("offline SFT", ["--mode", "sft"])
ONLINE, ONLINE_G0 = ("online (γ=1)", ["--mode", "onpolicy"]), ("online (γ=0)", ["--mode", "onpolicy", "--gamma", "0"])
GRID = [EXPERT, BASE, SFT, ONLINE, ONLINE_G0]
ABLATION = [EXPERT, BASE, SFT, ("online γ=1", ONLINE[1]), ("online γ=0.5", [*ONLINE[1], "--gamma", "0.5"]),
            ("online γ=0", ONLINE_G0[1]),
            ("sampled-token γ=0", [*ONLINE_G0[1], "--estimator", "sampled"]),
            ("sampled-token γ=1", [*ONLINE[1], "--estimator", "sampled"]),
            ("forward KL γ=1", [*ONLINE[1], "--divergence", "forward"]),
            ("JSD(0.5) γ=1", [*ONLINE[1], "--divergence", "jsd", "--beta", "0.5"]),
            ("λ=0.5 mix γ=1", [*ONLINE[1], "--mix", "0.5"])]


def long_horizon_lr(h):
    """Above H = 2 every run (expert, base, SFT, online, both sizes) takes 3e-3: at the sizes' own
    lr the signed pointer expert stays on its plateau (RESULTS.md, "Beyond horizon")."""
    return [] if h <= 2 else ["--expert-lr", "3e-3", "--lr", "3e-3"]


# key: (run dir, method label, student size); deps: the keys it waits for; result: its result.json
Job = namedtuple("Job", "key argv log deps result")


def job(key, argv, log, deps):
    """A train.py job; its result file is where train.py will write it (config.run_name)."""
    cfg = parse_args(["--threads", "1", *argv])
    return Job(key, ["--threads", "1", *argv], log, deps,
               os.path.join(cfg.out_dir, cfg.task, f"{run_name(cfg)}.result.json"))


def grid_jobs(runs, expert_size, student_sizes, methods):
    """runs: (run dir, train.py flags) per seed/setting. Experts first, then student bases,
    then the methods, so that every job's dependencies were submitted before it."""
    jobs = []
    for label, flags in methods:  # sizes outer, seeds inner: the seeds' bases of one size run side by side
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
                jobs.append(job((d, label, size), ["--expert-min-reward", "0", *flags, *args, "--out-dir", d,
                                                   "--expert-size", expert_size, "--student-size", size], log, deps))
    return jobs


def run_jobs(jobs, parallel, print_only=False):
    """Run train.py jobs, `parallel` at a time, listed dependencies first, so a worker only waits
    on a job already running. A job whose result file exists, made with the same settings, is
    skipped (check_done). One progress line per job, with a rough ETA. print_only: print the
    commands instead, for a scheduler of your own, in waves: the jobs of a wave need only those of
    the waves before (a Slurm array per wave, or GNU parallel per wave); return None."""
    if print_only:
        wave = {}
        for j in jobs:  # dependencies come first in the list
            wave[j.key] = 1 + max((wave[d] for d in j.deps), default=-1)
        print("# train.py commands, to run from the repository root; each wave needs the waves before it")
        for k in range(max(wave.values(), default=-1) + 1):
            print(f"# wave {k}")
            print("\n".join(shlex.join(["python", "train.py", *j.argv]) for j in jobs if wave[j.key] == k))
        return None
    futures, t0, done = {}, time.time(), []

    def one(j):
        for d in j.deps:
            futures[d].result()
        if os.path.exists(j.result):  # finished earlier (a rerun, or a shared run): keep it, if it is this job
            check_done(j.result, j.argv)
            print(f"[{time.time() - t0:5.0f}s] already done: {' '.join(map(str, j.key))}", flush=True)
            return
        os.makedirs(os.path.dirname(j.log), exist_ok=True)
        with open(j.log, "w") as f:
            rc = subprocess.call([sys.executable, os.path.join(ROOT, "train.py"), *j.argv], stdout=f,
                                 stderr=subprocess.STDOUT)
        if rc != 0:
            raise UsageError(f"{' '.join(map(str, j.key))} failed (exit {rc}); its log, with the reason, is {j.log}")
        done.append(j.key)
        elapsed = time.time() - t0
        print(f"[{elapsed:5.0f}s] done {len(done)}/{len(jobs)}: {' '.join(map(str, j.key))} | eta "
              f"{elapsed / len(done) * (len(jobs) - len(done)):.0f}s", flush=True)

    with ThreadPoolExecutor(parallel) as pool:
        for j in jobs:
            futures[j.key] = pool.submit(one, j)
        for f in futures.values():
            f.result()
    return time.time() - t0


def check_done(done_file, argv):
    """A finished run is reused only if it was made with the settings of every flag that changes
    it (config.Config): an out-dir left by another recipe is an error, never silently mixed in."""
    with open(done_file) as f:
        made = json.load(f).get("config") or {}
    cfg = parse_args(argv)
    refuse_other(done_file, made, cfg, cfg.mode)


def read_results(jobs, run_dirs):
    """{(label, size): [result per run dir, in the order of run_dirs]} of the jobs in those dirs;
    the expert's (one per dir) under every student size too, for tables with an expert column."""
    res = {}
    for d in run_dirs:
        for j in jobs:
            if j.key[0] == d:
                with open(j.result) as f:
                    res.setdefault(j.key[1:], []).append(json.load(f))
    experts = [v for (label, _), v in res.items() if label == "expert"]
    for size in {size for _, size in res}:
        res.setdefault(("expert", size), experts[0])
    return res


def metrics_paths(jobs, run_dirs, label, size):
    """The metrics.jsonl of one method and size, one per run dir."""
    return [j.result.replace(".result.json", ".metrics.jsonl") for d in run_dirs for j in jobs
            if j.key == (d, label, size)]


def add_job_flags(p, out_dir):
    """The flags every experiment takes: its seeds, its parallel jobs, its folder, --train-args
    and --print-commands."""
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    p.add_argument("--jobs", type=int, default=2, help="training runs in parallel")
    p.add_argument("--out-dir", default="", help=f"where runs go (default {out_dir})")
    p.add_argument("--train-args", default="", help="extra flags for every train.py run, quoted")
    p.add_argument("--print-commands", action="store_true", help="print the train.py commands in dependency order "
                   "(for a scheduler of your own) instead of running them")


def glue_train_args(argv):
    """--train-args' value starts with "--": glue it on, or argparse takes it for a flag."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--train-args" in argv[:-1]:
        i = argv.index("--train-args")
        argv[i:i + 2] = [f"--train-args={argv[i + 1]}"]
    return argv
