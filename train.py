"""Train the expert, then a student by offline IL (SFT) or online IL (on-policy distillation).

    python train.py --mode expert      # train the expert on ground-truth answers
    python train.py --mode sft         # offline IL: learn from the expert's samples
    python train.py --mode onpolicy    # online IL: learn at the student's own states
    torchrun --nproc_per_node 2 train.py --mode onpolicy     # same, distributed (DDP)

The pipeline, per task (checkpoints under <out-dir>/<task>/):
  1. expert.pt         the expert, trained on ground truth (uniform over all valid answers),
                       loaded if present;
  2. base-<size>.pt    a student warm-started by a short SFT phase on expert samples, shared
                       by both methods so they start from the same point (online IL from a
                       random init spends its first ~350 steps at reward 0: EXERCISES.md, 6);
  3. <run name>.pt     the student after offline or online IL (run_name: the method and its own
                       flags), with the same optimizer steps and sequences per step (budget parity).
Each checkpoint has a <name>.metrics.jsonl beside it. Every flag is a field of Config below,
declared once; the task flags are the fields of the tasks in data.TASKS.
"""
import argparse
import json
import math
import os
import sys
import traceback
from pathlib import Path
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.distributed as dist

import distill
import eval as evaluation
import sft
from data import PROMPT_STREAMS, TASKS, PromptStream, make_task, seed_for, task_flags
from errors import OneLineParser, UsageError
from model import fingerprint, make_model, size_spec, write_atomic
from runtime import SCHEDULES, Run, exit_distributed, flag_name, load_fitting, rank0_print, setup

PIPELINE, OFFLINE, ONLINE, LOGGING, ADVANCED = "pipeline", "offline IL", "online IL", "logging and checkpoints", "advanced"


def opt(default, help, group, changes=None, choices=None, lo=None, hi=None, positive=False, **meta):
    """A Config field, and so a flag: its default, its --help line and group, its choices and range,
    and `changes`, the first run whose result it changes (and so every run trained from it):
    "expert", "base" (the student bases), "students" (both methods), "sft" or "onpolicy" (that
    method alone: such a flag names the run, run_name), or None (where files go, logging,
    numerics). The reuse of an expert or base, --resume and the experiments' check of a finished
    run all compare the flags that change the run (runtime.differences). Other keys:
    when="flag": it changes runs only where that flag is set; budget=True: --resume may extend
    it; tag="g": always in the run name, as g<value>."""
    changes = changes or dict(zip((OFFLINE, ONLINE), ("sft", "onpolicy"))).get(group)
    return field(default=default, metadata=dict(help=help, group=group, changes=changes, choices=choices, lo=lo, hi=hi,
                                                positive=positive, **meta))


@dataclass
class Config:
    # ---- the pipeline: which run, with which models and budgets
    mode: str = opt("onpolicy", "expert | base (the warm-started student) | sft | onpolicy", PIPELINE,
                    choices=("expert", "base", "sft", "onpolicy"))
    task: str = opt("mirror", "mirror | pointer (the horizon task) | countdown (countdown.py); its flags: below",
                    PIPELINE, "expert", choices=tuple(TASKS))
    expert_size: str = opt("medium", "size of the expert: a name in model.SIZES, or LxWxH", PIPELINE, "expert")
    student_size: str = opt("small", "size of the student: medium is realizable, small misspecified", PIPELINE, "base")
    seed: int = opt(0, "seeds every generator: each role (init, data, sampling, rank) derives its own", PIPELINE,
                    "expert", lo=0, hi=2**31 - 1)
    expert_steps: int = opt(1500, "expert: optimizer steps on ground truth", PIPELINE, "expert", lo=0, budget=True)
    expert_lr: float = opt(0.0, "expert: peak learning rate (0: the size's own, model.SIZES)", PIPELINE, "expert", lo=0)
    expert_min_reward: float = opt(0.95, "quality gate: stop if the expert's held-out reward is below this (0: off)",
                                   PIPELINE, lo=0, hi=1)
    expert_restarts: int = opt(2, "an expert below --expert-min-reward is trained again from another init, this often",
                               PIPELINE, lo=0)
    stop_at: float = opt(0.0, "expert, base: stop at the first held-out check (--eval-every) at or above this reward "
                              "(0: run every step; a base stops at its expert's reward if that is lower)", PIPELINE,
                         "expert", lo=0, hi=1)
    base_steps: int = opt(600, "student base: warm-start SFT steps on expert samples", PIPELINE, "base", lo=0, budget=True)
    steps: int = opt(600, "offline and online IL: optimizer steps (the same for both)", PIPELINE, "students", lo=0,
                     budget=True)
    batch_size: int = opt(128, "sequences per step, over all ranks (the same for both)", PIPELINE, "expert", lo=1)
    lr: float = opt(0.0, "student (base, SFT, online): peak learning rate (0: the size's own)", PIPELINE, "base", lo=0)
    lr_schedule: str = opt("cosine", "after the warmup: cosine (decay to 10% of the peak) | constant", PIPELINE, "expert",
                           choices=tuple(SCHEDULES))
    warmup: int = opt(50, "learning-rate warmup steps (linear from 0)", PIPELINE, "expert", lo=0)
    temperature: float = opt(1.0, "sampling temperature of expert samples and student rollouts", PIPELINE, "base",
                             positive=True)
    # ---- offline IL (sft.py)
    sft_loss: str = opt("ce", "ce (SFT on the expert's tokens) | forward_kl (word-level distillation)", OFFLINE,
                        choices=tuple(sft.LOSSES))
    # ---- online IL (distill.py)
    gamma: float = opt(1.0, "discount of future per-token KLs (1: sequence-level, 0: per-token)", ONLINE, lo=0, hi=1,
                       tag="g")
    estimator: str = opt("full", "full (per-token full-vocab KL + REINFORCE) | sampled (sampled-token cost)", ONLINE,
                         choices=tuple(distill.LOSSES))
    divergence: str = opt("reverse", "divergence at the student's states: reverse | forward | jsd", ONLINE,
                          choices=("reverse", "forward", "jsd"))
    beta: float = opt(0.5, "JSD beta (0 forward KL, 1 reverse KL)", ONLINE, lo=0, hi=1)
    mix: float = opt(0.0, "GKD lambda: the fraction of each batch sampled by the expert", ONLINE, lo=0)
    baseline: bool = opt(True, "subtract a leave-one-out batch-mean baseline from each return", ONLINE)
    normalize_adv: bool = opt(True, "divide advantages by their std (floored at 1 nat)", ONLINE)
    # ---- logging and checkpoints
    out_dir: str = opt("out", "checkpoints go to <out-dir>/<task>/", LOGGING)
    expert_ckpt: str = opt("", "an expert checkpoint to use ('': <out-dir>/<task>/expert.pt, trained if missing)",
                           LOGGING)
    eval_prompts: int = opt(256, "held-out prompts for the final evaluation (a quarter: the checks)", LOGGING, "expert",
                            lo=1)
    log_every: int = opt(50, "steps between progress lines", LOGGING, lo=1)
    eval_every: int = opt(50, "steps between held-out reward checks (metrics.jsonl; --stop-at acts on them)", LOGGING,
                          "expert", lo=1, when="stop_at")
    save_every: int = opt(100, "steps between checkpoints", LOGGING, lo=1)
    resume: bool = opt(False, "continue from this run's checkpoint (step, optimizer, RNG states)", LOGGING)
    # ---- advanced (device, threads, fused and compile change the last digits, not the run)
    device: str = opt("auto", "auto (cuda if present) | cpu | cuda", ADVANCED, choices=("auto", "cpu", "cuda"))
    threads: int = opt(1, "torch CPU threads (1: fastest at these sizes; results depend on it; 0: torch's default)",
                       ADVANCED, lo=0, hi=1024)
    block_size: int = opt(0, "context length (0: just enough for the task's prompt and response)", ADVANCED, "expert",
                          lo=0)
    weight_decay: float = opt(0.0, "AdamW weight decay (linear layers' matrices only)", ADVANCED, "expert", lo=0)
    grad_clip: float = opt(1.0, "clip the gradient norm to this", ADVANCED, "expert", positive=True)
    fused: bool = opt(True, "fused log-prob kernels (kernels.py; off: the naive log_softmax reference)", ADVANCED)
    compile: bool = opt(False, "torch.compile the training forward", ADVANCED)
    # ---- not a flag: the task's flags (data.TASKS), resolved to the task's own values
    task_args: dict = field(default_factory=dict, metadata=dict(changes="expert"))


def parse_args(argv=None):
    """Config from the command line: a flag per Config field, and one per task flag (data.TASKS:
    a flag the chosen task does not take is refused). Then check()."""
    p = OneLineParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups = {}
    for f in fields(Config):
        if "group" in f.metadata:
            group = groups.get(f.metadata["group"]) or groups.setdefault(f.metadata["group"],
                                                                           p.add_argument_group(f.metadata["group"]))
            add_flag(group, f.name, f.type, f.default, f.metadata)
    shared = {}  # a task flag that several tasks take (--digits) is one flag; its default is each task's own
    for task in TASKS:
        for name, f in task_flags(task).items():
            shared.setdefault(name, []).append((task, f))
    group = p.add_argument_group("task (a flag given to a task that does not take it is an error)")
    for name, owners in shared.items():
        defaults = ", ".join(f"{t}: {f.default}" for t, f in owners)
        add_flag(group, name, owners[0][1].type, argparse.SUPPRESS, dict(owners[0][1].metadata, help=f"{owners[0][1].metadata['help']}"
                                                            f" ({defaults})"))
    args = vars(p.parse_args(argv))
    given = {k: args.pop(k) for k in shared if k in args}  # the task flags given: the rest keep the task's default
    refused = [k for k in given if k not in task_flags(args["task"])]
    if refused:
        raise UsageError(f"task {args['task']} takes no {', '.join(flag_name(k) for k in refused)} (its flags: "
                         f"{', '.join(map(flag_name, task_flags(args['task']))) or 'none'})")
    task = make_task(args["task"], **given)  # a bad task setting is one line here
    cfg = Config(**{f.name: args[f.name] for f in fields(Config) if "group" in f.metadata},
                 task_args={k: getattr(task, k) for k in task_flags(args["task"])})
    check(cfg)
    return cfg


def add_flag(group, name, typ, default, meta):
    typ = {"int": int, "float": float, "str": str, "bool": bool}.get(typ, typ)
    kw = dict(default=default, help=meta["help"].replace("%", "%%"))  # argparse %-formats help
    if typ is bool:
        group.add_argument(flag_name(name), action=argparse.BooleanOptionalAction, **kw)
    else:
        group.add_argument(flag_name(name), type=typ, choices=meta.get("choices"), **kw)


def check(cfg):
    """Every bad value is one line before any work is done, never a traceback after the expert trained."""
    numbers = [f for f in fields(Config) if f.type in (int, float, "int", "float")]
    bad = [f"{flag_name(f.name)} must be a finite number" for f in numbers if not math.isfinite(getattr(cfg, f.name))]
    if bad:  # the range checks below would misread NaN
        raise UsageError("; ".join(bad))
    for f in numbers:
        v, lo, hi = getattr(cfg, f.name), f.metadata["lo"], f.metadata["hi"]
        if lo is not None and hi is not None and not lo <= v <= hi:
            bad.append(f"{flag_name(f.name)} must be in {lo}..{hi}")
        elif lo is not None and v < lo:
            bad.append(f"{flag_name(f.name)} must be >= {lo}")
        elif f.metadata["positive"] and not v > 0:  # a negative clip norm would flip the gradient: ascent
            bad.append(f"{flag_name(f.name)} must be > 0")
    if not cfg.mix < 1:
        bad.append("--mix must be in [0, 1)")
    per_rank = cfg.batch_size // int(os.environ.get("WORLD_SIZE", 1))  # torchrun: rows each rank samples
    if cfg.mix and not 0 < round(cfg.mix * per_rank) < per_rank:
        bad.append(f"--mix {cfg.mix:g} gives {round(cfg.mix * per_rank)} expert rows of {per_rank} per rank: "
                   f"a mixed batch needs rows of both")
    if cfg.estimator == "sampled" and (cfg.divergence != "reverse" or cfg.mix):
        bad.append("--estimator sampled is the one-sample reverse KL on the student's own rollouts: "
                   "it takes no --divergence or --mix")
    if cfg.divergence != "jsd" and cfg.beta != Config.beta:
        bad.append("--beta applies to --divergence jsd only")
    if cfg.expert_ckpt and not os.path.exists(cfg.expert_ckpt):
        bad.append(f"--expert-ckpt {cfg.expert_ckpt}: no such file")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        bad.append("--device cuda, but no CUDA device is available")
    if bad:
        raise UsageError("; ".join(bad))


def run_name(cfg):
    """The checkpoint name of cfg's run: expert, base-<size>, or <mode>-<size> followed by each
    flag of the method's own (changes=mode) that is not at its default, and the tagged ones
    always: onpolicy-small-g1, onpolicy-small-g0-sampled, sft-small-forward_kl, ..."""
    if cfg.mode in ("expert", "base"):
        return "expert" if cfg.mode == "expert" else f"base-{cfg.student_size}"
    name = f"{cfg.mode}-{cfg.student_size}"
    for f in fields(Config):
        v = getattr(cfg, f.name)
        if f.metadata.get("changes") == cfg.mode and (v != f.default or "tag" in f.metadata):
            name += "-" + name_tag(f, v)
    return name


def name_tag(f, v):
    if "tag" in f.metadata:
        return f"{f.metadata['tag']}{v:g}"  # g1, g0.5
    if isinstance(v, bool):
        return ("" if v else "no-") + flag_name(f.name)[2:]  # no-baseline
    return v if isinstance(v, str) else f"{flag_name(f.name)[2:]}{v:g}"  # sampled, mix0.5


# ----------------------------------------------------------------------------- the pipeline
def new_model(cfg, env, size, role):
    """A fresh model whose init depends only on --seed and its role (expert, student)."""
    return make_model(size, env["block_size"], env["tok"].vocab_size, seed_for(cfg.seed, f"{role}/init")).to(env["device"])


def load_finished(path, cfg, env, kind, size, expert_id):
    """The model of a finished run's checkpoint, None if there is none yet. One made for another
    task, tokenizer, size or expert, or (kind: "expert", "base") with other settings of a flag
    that changes that run, is a one-line error, never a silent load (runtime.load_fitting)."""
    if not os.path.exists(path):
        return None
    model_cfg = make_model(size, env["block_size"], env["tok"].vocab_size, seed=0).cfg
    model, ck = load_fitting(path, cfg, env, kind, model_cfg, expert_id)
    if ck.get("step") != ck.get("total") and not ck.get("converged"):  # unfinished: to be trained on
        return None
    return model


def fit(cfg, env, kind, name, model, steps, lr, loop, *args, prompts=None, expert_id=None, stop_at=0.0):
    """Run one training loop in a Run (resume, logging, checkpoints) and return the model."""
    reward = lambda m, ps, seed: evaluation.quick_eval(m, env["tok"], env["task"], ps, seed)["reward"]  # noqa: E731
    loop(Run(cfg, env, kind, name, model, steps, lr, prompts=prompts, expert_id=expert_id, eval_reward=reward,
             stop_at=stop_at), *args)
    return model


def get_expert(cfg, env):
    """Load <out>/<task>/expert.pt, or train it: SFT on ground-truth answers drawn uniformly
    among all valid ones (so the expert is multimodal). Returns it frozen, and its fingerprint,
    which every later checkpoint records and is checked against."""
    if cfg.expert_ckpt:  # an expert named on the command line must fit this run's task and size
        expert = load_finished(cfg.expert_ckpt, cfg, env, None, cfg.expert_size, None)
        if expert is None:
            raise UsageError(f"--expert-ckpt {cfg.expert_ckpt}: the expert's training did not finish")
    else:
        path = os.path.join(env["dir"], "expert.pt")
        expert = None if cfg.mode == "expert" else load_finished(path, cfg, env, "expert", cfg.expert_size, None)
    if expert is None:
        expert = train_expert(cfg, env)
    expert.eval().requires_grad_(False)  # frozen and replicated: no DDP wrapper
    return expert, fingerprint(expert)


def train_expert(cfg, env):
    """SFT on ground truth. On a few seeds in ten the 2-layer expert stays on a plateau (one answer
    position left at a coin flip: RESULTS.md, "Training that converges"); an attempt that ends
    below --expert-min-reward is trained again from another init, on the same data, up to
    --expert-restarts times (fit_until)."""
    data = None  # a zero-step run needs no data
    if cfg.expert_steps:  # every rank builds the same dataset; sft.train gives each rank its own rows
        texts = PromptStream(env["task"], env["held_out"], seed=seed_for(cfg.seed, PROMPT_STREAMS["expert"])).batch(
            cfg.expert_steps * cfg.batch_size)
        g = torch.Generator().manual_seed(seed_for(cfg.seed, "expert/answers"))
        answers = [env["task"].sample_answer(p, g) for p in texts]
        data = sft.ground_truth_dataset(env["tok"], env["task"], texts, answers, env["device"])
    bar = cfg.expert_min_reward  # 0: the gate is off, and so are the restarts
    return fit_until(cfg, env, "expert", cfg.expert_size, "expert", cfg.expert_steps,
                     cfg.expert_lr or size_spec(cfg.expert_size)["lr"], data, bar, None, cfg.stop_at)


def fit_until(cfg, env, name, size, role, steps, lr, data, bar, expert_id, stop_at):
    """SFT on `data` (fit) from the init of `role`, stopping early at a held-out check >= stop_at
    (0: never); while the model's held-out reward at temperature 1 is below `bar`, again from
    another init, up to --expert-restarts times. The failed attempts are kept beside it
    (<name>-attempt<k>.pt). The first attempt's init is the role's own: a seed that converges at
    once never sees a restart."""
    kind = "expert" if role == "expert" else "base"
    for attempt in range(cfg.expert_restarts + 1):
        model = new_model(cfg, env, size, role if attempt == 0 else f"{role}-restart{attempt}")
        rank0_print(env, f"training {name} ({size}, {model.n_params():,} parameters)"
                         + (f" (restart {attempt} of {cfg.expert_restarts})" if attempt else ""))
        run_cfg = cfg if attempt == 0 else replace(cfg, resume=False)  # a restart starts afresh, --resume or not
        fit(run_cfg, env, kind, name, model, steps, lr, sft.train, data, run_cfg, expert_id=expert_id, stop_at=stop_at)
        if not bar or attempt == cfg.expert_restarts:
            return model
        reward = evaluation.quick_eval(model, env["tok"], env["task"], env["held_out"], seed=cfg.seed)["reward"]
        if reward >= bar:
            return model
        kept = os.path.join(env["dir"], f"{name}-attempt{attempt}")
        if env["rank"] == 0:  # kept for a look, out of the way of the next attempt
            for ext in (".pt", ".metrics.jsonl"):
                if os.path.exists(os.path.join(env["dir"], name + ext)):
                    os.replace(os.path.join(env["dir"], name + ext), kept + ext)
        rank0_print(env, f"{name} reached a held-out reward of {reward:.3f} < {bar:.3f} ({kept}.pt): training it again "
                         f"from another init")
    return model


def gate_expert(cfg, env, expert):
    """The quality gate: an expert that did not converge is refused, not distilled from (a
    student would only learn its mistakes). Returns its held-out reward at temperature 1."""
    reward = evaluation.quick_eval(expert, env["tok"], env["task"], env["held_out"], seed=cfg.seed)["reward"]
    if reward < cfg.expert_min_reward:
        where = cfg.expert_ckpt or os.path.join(env["dir"], "expert.pt")
        raise UsageError(f"the expert {where} did not converge: held-out reward {reward:.3f} < --expert-min-reward "
                         f"{cfg.expert_min_reward:g}; retrain it (more --expert-steps, or another --seed), or pass "
                         f"--expert-min-reward 0 to use it anyway")
    return reward


def expert_samples(cfg, env, expert, expert_id, n, seed):
    """n expert responses to fresh training prompts, cached on disk (students of every size
    share them). None for n=0: a zero-step run needs no data."""
    if n == 0:
        return None
    score = cfg.sft_loss == "forward_kl"
    path = os.path.join(env["dir"], f"expert-samples-{n}-{seed}{'-scored' if score else ''}.pt")
    key = dict(n=n, seed=seed, temperature=cfg.temperature, score=score, expert=expert_id)
    if os.path.exists(path):
        try:
            cached = torch.load(path, map_location=env["device"], weights_only=True)
            if cached["key"] == key:
                return cached["data"]
        except Exception as e:  # a damaged cache (an interrupted copy, a full disk) is only a cache
            rank0_print(env, f"{path}: unreadable ({type(e).__name__}), sampling it again")
    texts = PromptStream(env["task"], env["held_out"], seed=seed).batch(n)
    data = sft.expert_dataset(expert, env["tok"], env["task"], texts, cfg, torch.Generator(env["device"]).manual_seed(seed),
                              env["device"], score=score)
    if env["rank"] == 0:
        write_atomic(path, lambda tmp: torch.save(dict(key=key, data=data), tmp))
    return data


def get_student_base(cfg, env, expert, expert_id, expert_reward):
    """The student both methods start from: a short SFT warm start on expert samples. A base of
    the expert's own class (realizable) that ends more than 0.05 below the expert is trained
    again from another init, as the expert is (only with the gate on)."""
    name = f"base-{cfg.student_size}"
    base = load_finished(os.path.join(env["dir"], f"{name}.pt"), cfg, env, "base", cfg.student_size, expert_id)
    if base is None:
        data = expert_samples(cfg, env, expert, expert_id, cfg.base_steps * cfg.batch_size,
                              seed_for(cfg.seed, PROMPT_STREAMS["base"]))
        realizable = cfg.student_size == cfg.expert_size and cfg.expert_min_reward
        base = fit_until(cfg, env, name, cfg.student_size, "student", cfg.base_steps, student_lr(cfg), data,
                         expert_reward - 0.05 if realizable else 0, expert_id, min(cfg.stop_at, expert_reward))
    return base


def student_lr(cfg):
    return cfg.lr or size_spec(cfg.student_size)["lr"]


def main(argv=None):
    cfg = parse_args(argv)
    env = setup(cfg)
    rank0_print(env, "config: " + json.dumps(asdict(cfg)))
    expert, expert_id = get_expert(cfg, env)
    expert_reward = gate_expert(cfg, env, expert) if cfg.mode != "expert" else None
    name = run_name(cfg)
    if cfg.mode == "expert":
        model = expert
    else:
        student = get_student_base(cfg, env, expert, expert_id, expert_reward)
        rank0_print(env, f"student ({cfg.student_size}): {student.n_params():,} parameters; expert "
                         f"({cfg.expert_size}): {expert.n_params():,}")
        if cfg.mode == "base":
            model = student
        elif cfg.mode == "sft":  # offline IL: the expert is queried before training only
            data = expert_samples(cfg, env, expert, expert_id, cfg.steps * cfg.batch_size,
                                  seed_for(cfg.seed, PROMPT_STREAMS["sft"]))
            model = fit(cfg, env, "sft", name, student, cfg.steps, student_lr(cfg), sft.train, data, cfg, cfg.sft_loss,
                        expert_id=expert_id)
        else:  # online IL: the student samples, the expert scores every token
            prompts = PromptStream(env["task"], env["held_out"], seed=seed_for(cfg.seed, PROMPT_STREAMS["onpolicy"], env["rank"]))
            model = fit(cfg, env, "onpolicy", name, student, cfg.steps, student_lr(cfg), distill.train, expert, prompts,
                        env["tok"], env["task"], cfg, prompts=prompts, expert_id=expert_id)
    if env["rank"] == 0:
        result = evaluation.evaluate(model, expert, env["tok"], env["task"], env["held_out"], seed=cfg.seed)
        # the experiments' "done" marker: written whole or not at all
        text = json.dumps(dict(name=name, n_params=model.n_params(), **result, config=asdict(cfg)))
        write_atomic(os.path.join(env["dir"], f"{name}.result.json"), lambda tmp: Path(tmp).write_text(text))
        print(evaluation.describe(f"{name} ({model.n_params():,} params) on {cfg.task}", result, len(env["held_out"])))
        curve = evaluation.reward_curve([os.path.join(env["dir"], f"{name}.metrics.jsonl")])
        if curve:  # the run's held-out reward checks as a text plot, 0 (blank) to 1 (full block)
            print(f"  held-out reward vs step: {curve}")
        if cfg.mode == "base" and cfg.student_size == cfg.expert_size and result["reward"] < expert_reward - 0.05:
            print(f"warning: {name} is the expert's own class but reaches {result['reward']:.3f} against the expert's "
                  f"{expert_reward:.3f}: this warm start did not converge")
    if cfg.mode == "expert":
        gate_expert(cfg, env, expert)
    if env["world"] > 1:  # DDP keeps replicas equal; check it rather than trust it
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        lo, hi = flat.clone(), flat.clone()
        dist.all_reduce(lo, dist.ReduceOp.MIN)
        dist.all_reduce(hi, dist.ReduceOp.MAX)
        if not torch.equal(lo, hi):
            raise RuntimeError("ranks ended with different weights")
        rank0_print(env, f"all {env['world']} ranks hold identical weights")
        dist.barrier()
        dist.destroy_process_group()
    return model


if __name__ == "__main__":
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    try:
        main()
    except (UsageError, FloatingPointError) as e:  # bad input, or weights that diverged: one line
        if distributed:
            print(f"error: {e}", file=sys.stderr)
            exit_distributed(1)
        sys.exit(f"error: {e}")
    except BaseException as e:  # Ctrl-C's exit 130, or a bug (which keeps its traceback)
        if not distributed:
            raise
        if not isinstance(e, SystemExit):
            traceback.print_exc()
        exit_distributed(e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 1)
    if distributed:
        exit_distributed(0)
