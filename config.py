"""The configuration: every flag, declared once, and what follows from the declarations.

Config is every flag of train.py, a field each: its default, its --help line and group, its
choices and range, and `changes`, the runs whose result it changes. From those come the parser
and its checks (parse_args), the name of a student's run (run_name), the learning-rate schedule
(SCHEDULES), and the check that a checkpoint or a finished run is the run asked for
(differences, load_fitting: the reuse of an expert or base, --resume, the experiments' reuse).
The task flags are the fields of the tasks in data.TASKS.
"""
import argparse
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields

import torch

import distill
import kernels
import sft
from data import TASKS, make_task, task_flags
from errors import OneLineParser, UsageError
from model import load_checkpoint

# ----------------------------------------------------------------------------- the learning rate
# After a linear warmup, the schedule's factor of the peak learning rate at `done` of `length` steps.
SCHEDULES = dict(
    cosine=lambda done, length: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done / length)),  # down to 10%
    constant=lambda done, length: 1.0,
)


def lr_factor(step, total, schedule, warmup):
    if step < warmup:
        return (step + 1) / warmup
    return SCHEDULES[schedule](step - warmup, max(1, total - warmup))


PIPELINE, OFFLINE, ONLINE, LOGGING, ADVANCED = "pipeline", "offline IL", "online IL", "logging and checkpoints", "advanced"


def opt(default, help, group, changes=None, choices=None, lo=None, hi=None, positive=False, **meta):
    """A Config field, and so a flag: its default, its --help line and group, its choices and range,
    and `changes`, the first run whose result it changes (and so every run trained from it):
    "expert", "base" (the student bases), "students" (both methods), "sft" or "onpolicy" (that
    method alone: such a flag names the run, run_name), or None (where files go, logging,
    numerics). The reuse of an expert or base, --resume and the experiments' check of a finished
    run all compare the flags that change the run (differences, below). Other keys:
    when="flag": it changes runs only where that flag is set; budget=True: --resume may extend
    it; tag="g": always in the run name, as g<value>."""
    changes = changes or {OFFLINE: "sft", ONLINE: "onpolicy"}.get(group)
    return field(default=default, metadata=dict(help=help, group=group, changes=changes, choices=choices, lo=lo, hi=hi,
                                                positive=positive, **meta))


@dataclass
class Config:
    # ---- the pipeline: which run, with which models and budgets
    mode: str = opt("onpolicy", "expert | base (the warm-started student) | sft | onpolicy", PIPELINE,
                    choices=("expert", "base", "sft", "onpolicy"))
    task: str = opt("mirror", "the task (data.TASKS; pointer is the horizon task); its flags: below", PIPELINE, "expert",
                    choices=TASKS)
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
    lr_schedule: str = opt("cosine", "after the warmup, a factor of the peak (SCHEDULES; cosine: down to 10%)", PIPELINE,
                           "expert", choices=SCHEDULES)
    warmup: int = opt(50, "learning-rate warmup steps (linear from 0)", PIPELINE, "expert", lo=0)
    temperature: float = opt(1.0, "sampling temperature of expert samples and student rollouts", PIPELINE, "base",
                             positive=True)
    # ---- offline IL (sft.py)
    sft_loss: str = opt("ce", "ce (SFT on the expert's tokens) | forward_kl (word-level distillation)", OFFLINE,
                        choices=sft.LOSSES)
    # ---- online IL (distill.py)
    gamma: float = opt(1.0, "discount of future per-token KLs (1: sequence-level, 0: per-token)", ONLINE, lo=0, hi=1,
                       tag="g")
    estimator: str = opt("full", "full: per-token divergence + REINFORCE on the later ones; sampled: REINFORCE on the "
                                 "sampled token's --cost; direct: that cost differentiated (distill.LOSSES)", ONLINE,
                         choices=distill.LOSSES)
    divergence: str = opt("reverse", f"divergence at the student's states: {' | '.join(kernels.DIVERGENCES)} (mixed: "
                                     f"the mean of forward and reverse)", ONLINE, choices=kernels.DIVERGENCES)
    beta: float = opt(0.5, "JSD beta (0 forward KL, 1 reverse KL)", ONLINE, lo=0, hi=1)
    cost: str = opt("k1", "sampled and direct estimators: the sampled token's cost, k1 = log q/p | k3 (verl's "
                          "low_var_kl)", ONLINE, choices=distill.COSTS)
    top_k: int = opt(0, "the expert gives its top k log-probs only, as a served teacher does (0: every token)", ONLINE,
                     lo=0)
    top_k_rest: str = opt("ignore", "--top-k: the mass outside the k ids, ignored (verl) | one bucket | renormalize "
                                    "(NeMo-RL)", ONLINE, choices=kernels.TOP_K_REST)
    return_norm: str = opt("none", "divide each return by: none | discount (sum of gamma^(t-s), TRL's MiniLLM) | count "
                                   "(tokens left, MiniLLM's)", ONLINE, choices=distill.RETURN_NORMS)
    mix: float = opt(0.0, "GKD lambda: the fraction of each batch sampled by the expert", ONLINE, lo=0)
    baseline: bool = opt(True, "subtract a leave-one-out batch-mean baseline from each return", ONLINE)
    normalize_adv: bool = opt(True, "divide advantages by their std (never by less than --adv-std-floor)", ONLINE)
    adv_std_floor: float = opt(1.0, "the least std advantages are divided by (nats; 0: plain whitening, MiniLLM's)",
                               ONLINE, lo=0)
    # ---- logging and checkpoints
    out_dir: str = opt("out", "checkpoints go to <out-dir>/<task>/", LOGGING)
    expert_ckpt: str = opt("", "an expert checkpoint to use ('': <out-dir>/<task>/expert.pt, trained if missing)",
                           LOGGING)
    # the held-out prompts are never trained on: their number changes every run's training prompts
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
    p = OneLineParser(description="Train the expert, then a student by offline IL (SFT) or online IL (on-policy "
                                  "distillation).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups = {}
    for f in fields(Config):
        if "group" in f.metadata:
            if f.metadata["group"] not in groups:
                groups[f.metadata["group"]] = p.add_argument_group(f.metadata["group"])
            add_flag(groups[f.metadata["group"]], f.name, f.type, f.default, f.metadata)
    shared = {}  # a task flag that several tasks take (--digits) is one flag; its default is each task's own
    for task in TASKS:
        for name, f in task_flags(task).items():
            shared.setdefault(name, []).append((task, f))
    group = p.add_argument_group("task (a flag given to a task that does not take it is an error)")
    for name, owners in shared.items():
        first = owners[0][1]
        defaults = ", ".join(f"{t}: {f.default}" for t, f in owners)
        add_flag(group, name, first.type, argparse.SUPPRESS, dict(first.metadata, help=f"{first.metadata['help']} ({defaults})"))
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
    if cfg.estimator != "full" and (cfg.divergence != "reverse" or cfg.mix or cfg.top_k):
        bad.append(f"--estimator {cfg.estimator} scores the sampled token on the student's own rollouts: "
                   f"it takes no --divergence, --mix or --top-k")
    if cfg.estimator == "full" and cfg.cost != Config.cost:
        bad.append("--cost applies to --estimator sampled or direct")
    if cfg.estimator == "direct" and (cfg.cost == "k1" or cfg.gamma or cfg.return_norm != Config.return_norm or
                                      not cfg.baseline or not cfg.normalize_adv or cfg.adv_std_floor != Config.adv_std_floor):
        bad.append("--estimator direct differentiates the cost itself, with no returns: it takes --cost k3 (k1's "
                   "expected gradient is 0), --gamma 0, and no --return-norm, --no-baseline, --no-normalize-adv or "
                   "--adv-std-floor")
    if cfg.estimator == "full" and not cfg.gamma and cfg.return_norm != Config.return_norm:
        bad.append("--return-norm divides the returns, and at --gamma 0 the full estimator has none")
    if not cfg.normalize_adv and cfg.adv_std_floor != Config.adv_std_floor:
        bad.append("--adv-std-floor applies with advantage normalisation only (not --no-normalize-adv)")
    if cfg.top_k and cfg.divergence == "jsd":
        bad.append("--top-k takes --divergence reverse, forward or mixed")
    if not cfg.top_k and cfg.top_k_rest != Config.top_k_rest:
        bad.append("--top-k-rest applies with --top-k only")
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
        return f"{f.metadata['tag']}{v:.12g}"  # g1, g0.5
    if isinstance(v, bool):
        return ("" if v else "no-") + flag_name(f.name)[2:]  # no-baseline
    return v if isinstance(v, str) else f"{flag_name(f.name)[2:]}{v:.12g}"  # sampled, mix0.5


# ----------------------------------------------------------------------------- is this the run asked for?
def flag_name(field_name):
    return "--" + field_name.replace("_", "-")


# a run of each kind depends on the flags that change it and those that change the runs it learns from
UPSTREAM = dict(expert=("expert",), base=("expert", "base"), sft=("expert", "base", "students", "sft"),
                onpolicy=("expert", "base", "students", "onpolicy"))


def differences(made, cfg, kind, resuming=False):
    """The flags on which a run of `kind` made with the config `made` (a checkpoint's or a
    result.json's) differs from cfg, as "--flag MADE (this run: WANTED)": every flag whose
    `changes` (Config) is upstream of kind; resuming: not the step budgets, which --resume
    may extend. A flag `made` does not record means it was made by an older version: one line."""
    out = []
    for f in fields(cfg):
        when = f.metadata.get("when")
        if f.metadata.get("changes") not in UPSTREAM[kind] or (when and not getattr(cfg, when)):
            continue
        if resuming and f.metadata.get("budget"):
            continue
        want = getattr(cfg, f.name)
        if isinstance(want, dict):  # task_args: the task's flags, one by one
            pairs = [(k, made.get(f.name, {}).get(k, MISSING), v) for k, v in want.items()]
        else:
            pairs = [(f.name, made.get(f.name, MISSING), want)]
        for name, was, now in pairs:
            if was is MISSING:
                raise UsageError(f"made by an older version of this code ({flag_name(name)} not recorded): train "
                                 f"it again, or give this run another --out-dir")
            if was != now:
                out.append(f"{flag_name(name)} {was} (this run: {now})")
    return out


def identity(env, model_cfg, expert_id):
    """What a checkpoint must match to be loaded by this run: task, tokenizer, model shape, and
    the fingerprint of the expert it learned from (None for the expert itself), so a retrained
    expert.pt is never silently paired with old bases and students."""
    return dict(task=env["task_id"], tokenizer=env["tok"].identity, model_args=asdict(model_cfg), expert=expert_id)


def refuse_other(path, made, cfg, kind, resuming=False):
    """One UsageError line if the run of `kind` at `path`, made with the config `made`, is not the
    run cfg asks for (differences)."""
    try:
        diff = differences(made, cfg, kind, resuming)
    except UsageError as e:
        raise UsageError(f"{path}: {e}") from None
    if diff:
        raise UsageError(f"{path} was trained with {'; '.join(diff)}: give this run another --out-dir "
                         f"(or delete the file to train it again)")


def load_fitting(path, cfg, env, kind, model_cfg, expert_id, device=None, resuming=False, **expect):
    """The model and checkpoint at `path` if it fits this run: its identity (task, tokenizer,
    shape model_cfg, expert; and `expect`), and for kind ("expert", "base", "sft", "onpolicy"; None:
    the identity alone) every flag that changes that run. Anything else is one UsageError line."""
    model, ck = load_checkpoint(path, expect=dict(identity(env, model_cfg, expert_id), **expect),
                                device=device or env["device"])
    if kind is not None:
        refuse_other(path, ck.get("config", {}), cfg, kind, resuming)
    return model, ck
