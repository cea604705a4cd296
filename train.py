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
  3. <mode>-<size>.pt  the student after offline or online IL, with the same number of
                       optimizer steps and response tokens per step (budget parity).
Each checkpoint has a <name>.metrics.jsonl beside it. Every flag comes from Config below.
"""
import argparse
import json
import math
import os
import sys
import traceback
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.distributed as dist

import distill
import eval as evaluation
import sft
from data import PROMPT_STREAMS, PromptStream, sample_answer, saved_task, seed_for
from errors import OneLineParser, UsageError
from model import fingerprint, load_checkpoint, make_model, size_spec
from runtime import Run, exit_distributed, identity, rank0_print, setup, write_atomic


def opt(default, help, group):
    """A Config field: its default, the one-line help its flag shows and its --help group."""
    return field(default=default, metadata=dict(help=help, group=group))


PIPELINE, OFFLINE, ONLINE, LOGGING, ADVANCED = "pipeline", "offline IL", "online IL", "logging and checkpoints", "advanced"


@dataclass
class Config:
    # ---- the pipeline: which run, on which task, with which models
    mode: str = opt("onpolicy", "expert | base (the warm-started student) | sft | onpolicy", PIPELINE)
    task: str = opt("mirror", "mirror (default) | pointer (the horizon task) | countdown (countdown.py)", PIPELINE)
    digits: int = opt(0, "mirror, pointer: prompt digits (0: the task's own, 5 and 10)", PIPELINE)
    answer_len: int = opt(0, "mirror, pointer: answer digits H (0: mirror all of them, pointer 1)", PIPELINE)
    sign: bool = opt(True, "mirror, pointer: the answer starts with + or - naming its mode (off: implicit)", PIPELINE)
    copy: bool = opt(True, "pointer: + copies (off: + and - both follow pointers, neither in a 1-layer student's reach)", PIPELINE)
    mode_weight: float = opt(0.5, "mirror, pointer: the expert's ground truth is the + answer with this probability", PIPELINE)
    n_numbers: int = opt(3, "countdown: how many numbers", PIPELINE)
    max_number: int = opt(20, "countdown: numbers are drawn from 1..max_number", PIPELINE)
    max_target: int = opt(100, "countdown: targets are in 1..max_target", PIPELINE)
    number_tokens: bool = opt(True, "countdown: one token per number below 1000 (off: one per character)", PIPELINE)
    countdown_format: str = opt("steps", "countdown: steps (written steps: 25-7=18,18*3=54) | expression ((25-7)*3)", PIPELINE)
    expert_size: str = opt("medium", "size of the expert: a name in model.SIZES, or LxWxH", PIPELINE)
    student_size: str = opt("small", "size of the student: medium is realizable, small misspecified", PIPELINE)
    seed: int = opt(0, "seeds every generator: each role (init, data, sampling, rank) derives its own", PIPELINE)
    expert_steps: int = opt(1500, "expert: optimizer steps on ground truth", PIPELINE)
    expert_lr: float = opt(0.0, "expert: peak learning rate (0: the size's own, model.SIZES)", PIPELINE)
    expert_min_reward: float = opt(0.95, "quality gate: stop if the expert's held-out reward is below this (0: off)", PIPELINE)
    expert_restarts: int = opt(2, "an expert below --expert-min-reward is trained again from another init, this often", PIPELINE)
    stop_at: float = opt(0.0, "expert, base: stop at the first held-out check (--eval-every) at or above this reward "
                              "(0: run every step; a base stops at its expert's reward if that is lower)", PIPELINE)
    base_steps: int = opt(600, "student base: warm-start SFT steps on expert samples", PIPELINE)
    steps: int = opt(600, "offline and online IL: optimizer steps (the same for both)", PIPELINE)
    batch_size: int = opt(128, "sequences per step, over all ranks (the same for both)", PIPELINE)
    lr: float = opt(0.0, "student: peak learning rate, cosine decay to 10% (0: the size's own)", PIPELINE)
    temperature: float = opt(1.0, "sampling temperature of expert samples and student rollouts", PIPELINE)
    # ---- offline IL (sft.py)
    sft_loss: str = opt("ce", "ce (SFT on the expert's tokens) | forward_kl (word-level distillation)", OFFLINE)
    # ---- online IL (distill.py)
    gamma: float = opt(1.0, "discount of future per-token KLs (1: sequence-level, 0: per-token)", ONLINE)
    estimator: str = opt("full", "full (per-token full-vocab KL + REINFORCE) | sampled (sampled-token cost)", ONLINE)
    divergence: str = opt("reverse", "divergence at the student's states: reverse | forward | jsd", ONLINE)
    beta: float = opt(0.5, "JSD beta (0 forward KL, 1 reverse KL)", ONLINE)
    mix: float = opt(0.0, "GKD lambda: the fraction of each batch sampled by the expert", ONLINE)
    baseline: bool = opt(True, "subtract a leave-one-out batch-mean baseline from each return", ONLINE)
    normalize_adv: bool = opt(True, "divide advantages by their std (floored at 1 nat)", ONLINE)
    # ---- logging and checkpoints
    out_dir: str = opt("out", "checkpoints go to <out-dir>/<task>/", LOGGING)
    expert_ckpt: str = opt("", "an expert checkpoint to use ('': <out-dir>/<task>/expert.pt, trained if missing)", LOGGING)
    eval_prompts: int = opt(256, "held-out prompts for the final evaluation (a quarter: the checks)", LOGGING)
    log_every: int = opt(50, "steps between progress lines", LOGGING)
    eval_every: int = opt(50, "steps between held-out reward checks (metrics.jsonl; --stop-at acts on them)", LOGGING)
    save_every: int = opt(100, "steps between checkpoints", LOGGING)
    resume: bool = opt(False, "continue from this run's checkpoint (step, optimizer, RNG states)", LOGGING)
    # ---- advanced
    device: str = opt("auto", "auto (cuda if present) | cpu | cuda", ADVANCED)
    threads: int = opt(1, "torch CPU threads (1: fastest at these sizes; results depend on it; 0: torch's default)", ADVANCED)
    block_size: int = opt(0, "context length (0: just enough for the task's prompt and response)", ADVANCED)
    weight_decay: float = opt(0.0, "AdamW weight decay (linear layers' matrices only)", ADVANCED)
    grad_clip: float = opt(1.0, "clip the gradient norm to this", ADVANCED)
    fused: bool = opt(True, "fused log-prob kernels (kernels.py; off: the naive log_softmax reference)", ADVANCED)
    compile: bool = opt(False, "torch.compile the training forward", ADVANCED)


MODES = ("expert", "base", "sft", "onpolicy")
CHOICES = dict(mode=MODES, task=("mirror", "pointer", "countdown"), countdown_format=("steps", "expression"),
               device=("auto", "cpu", "cuda"), sft_loss=("ce", "forward_kl"), estimator=("full", "sampled"),
               divergence=("reverse", "forward", "jsd"))


def parse_args(argv=None):
    p = OneLineParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups = {}
    for f in fields(Config):
        g = groups.get(f.metadata["group"]) or groups.setdefault(f.metadata["group"], p.add_argument_group(f.metadata["group"]))
        flag, text = "--" + f.name.replace("_", "-"), f.metadata["help"].replace("%", "%%")  # argparse %-formats help
        if f.type is bool or f.type == "bool":
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            g.add_argument(flag, type=typ, default=f.default, help=text, choices=CHOICES.get(f.name))
    cfg = Config(**vars(p.parse_args(argv)))
    check(cfg)
    return cfg


def check(cfg):
    """Every bad value is one line before any work is done, never a traceback after the expert trained."""
    flag = lambda k: "--" + k.replace("_", "-")  # noqa: E731
    floats = [f.name for f in fields(Config) if f.type in (float, "float")]
    bad = [f"{flag(k)} must be a finite number" for k in floats if not math.isfinite(getattr(cfg, k))]
    if bad:  # the range checks below would misread NaN
        raise UsageError("; ".join(bad))
    bad = [f"{flag(k)} must be >= {lo}" for k, lo in
           (("steps", 0), ("expert_steps", 0), ("base_steps", 0), ("batch_size", 1), ("eval_prompts", 1),
            ("log_every", 1), ("eval_every", 1), ("save_every", 1), ("threads", 0), ("lr", 0), ("expert_lr", 0),
            ("weight_decay", 0), ("expert_restarts", 0), ("digits", 0), ("answer_len", 0), ("block_size", 0)) if getattr(cfg, k) < lo]
    bad += [f"{flag(k)} must be in {lo}..{hi}" for k, lo, hi in
            (("seed", 0, 2**31 - 1), ("threads", 0, 1024), ("expert_min_reward", 0, 1), ("stop_at", 0, 1),
             ("gamma", 0, 1), ("beta", 0, 1)) if not lo <= getattr(cfg, k) <= hi]
    if not 0 < cfg.mode_weight < 1 or (cfg.mode_weight != 0.5 and (cfg.task == "countdown" or not cfg.sign)):
        bad.append("--mode-weight is a probability in (0, 1), for mirror or pointer with a sign")
    if not cfg.copy and cfg.task != "pointer":
        bad.append("--no-copy is a pointer setting")
    if not 0 <= cfg.mix < 1:
        bad.append("--mix must be in [0, 1)")
    # a negative clip norm would flip the gradient: ascent
    bad += [f"{flag(k)} must be > 0" for k in ("temperature", "grad_clip") if not getattr(cfg, k) > 0]
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


# ----------------------------------------------------------------------------- the pipeline
def new_model(cfg, env, size, role):
    """A fresh model whose init depends only on --seed and its role (expert, student)."""
    return make_model(size, env["block_size"], env["tok"].vocab_size, seed_for(cfg.seed, f"{role}/init")).to(env["device"])


def load_finished(path, env, size, expert_id, made_by=None):
    """The model of a finished run's checkpoint, None if there is none yet; a checkpoint
    made for another task, tokenizer, size or expert is an error, never a silent load.
    made_by: settings it must also have been trained with (seed, steps), for the checkpoints
    a run finds in its --out-dir and reuses (the expert, the bases)."""
    if not os.path.exists(path):
        return None
    expect = identity(env, make_model(size, env["block_size"], env["tok"].vocab_size, seed=0).cfg, expert_id)
    model, ck = load_checkpoint(path, device=env["device"])
    for k, v in expect.items():  # a task field added since the checkpoint was saved keeps its old meaning
        if (saved_task(ck.get(k) or {}) if k == "task" else ck.get(k)) != v:
            raise UsageError(f"{path}: made for {k}={ck.get(k)!r}, but this run needs {k}={v!r}")
    if ck.get("step") != ck.get("total") and not ck.get("converged"):  # unfinished: to be trained on
        return None
    for k, (flag, v) in (made_by or {}).items():
        made = ck.get(k, ck.get("config", {}).get(k, getattr(Config, k, None)))  # its fields, else its flags
        if made != v:
            raise UsageError(f"{path} was trained with {flag} {made}, this run asks for {v}: give this run "
                             f"another --out-dir (or delete the file to retrain it)")
    return model


def fit(cfg, env, name, model, steps, lr, loop, *args, prompts=None, expert_id=None, stop_at=0.0):
    """Run one training loop in a Run (resume, logging, checkpoints) and return the model."""
    reward = lambda m, ps, seed: evaluation.quick_eval(m, env["tok"], env["task"], ps, seed)["reward"]  # noqa: E731
    loop(Run(cfg, env, name, model, steps, lr, prompts=prompts, expert_id=expert_id, eval_reward=reward,
             stop_at=stop_at), *args)
    return model


def stopped_by(cfg):
    """What a reused checkpoint must share with this run for --stop-at: the checks that end it too."""
    keys = ("stop_at", "eval_every", "eval_prompts") if cfg.stop_at else ("stop_at",)
    return {k: ("--" + k.replace("_", "-"), getattr(cfg, k)) for k in keys}


def get_expert(cfg, env):
    """Load <out>/<task>/expert.pt, or train it: SFT on ground-truth answers drawn uniformly
    among all valid ones (so the expert is multimodal). Returns it frozen, and its fingerprint,
    which every later checkpoint records and is checked against."""
    if cfg.expert_ckpt:  # an expert named on the command line must fit this run
        expert = load_finished(cfg.expert_ckpt, env, cfg.expert_size, None)
        if expert is None:
            raise UsageError(f"--expert-ckpt {cfg.expert_ckpt}: the expert's training did not finish")
    else:
        path = os.path.join(env["dir"], "expert.pt")
        expert = None if cfg.mode == "expert" else load_finished(
            path, env, cfg.expert_size, None, dict(seed=("--seed", cfg.seed), total=("--expert-steps", cfg.expert_steps),
                                                   mode_weight=("--mode-weight", cfg.mode_weight), **stopped_by(cfg)))
    if expert is None:
        expert = train_expert(cfg, env)
    expert.eval().requires_grad_(False)  # frozen and replicated: no DDP wrapper
    return expert, fingerprint(expert)


def train_expert(cfg, env):
    """SFT on ground truth. On a few seeds in ten the 2-layer expert stays on a plateau (one answer
    position left at a coin flip: RESULTS.md, "Training that converges"); an attempt that ends
    below --expert-min-reward is trained again from another init, on the same data, up to
    --expert-restarts times. A seed whose first attempt converges is trained exactly as before."""
    data = None  # a zero-step run needs no data
    if cfg.expert_steps:  # every rank builds the same dataset; sft.train gives each rank its own rows
        texts = PromptStream(env["task"], env["held_out"], seed=seed_for(cfg.seed, PROMPT_STREAMS["expert"])).batch(
            cfg.expert_steps * cfg.batch_size)
        g = torch.Generator().manual_seed(seed_for(cfg.seed, "expert/answers"))
        answers = [sample_answer(env["task"], p, g, plus=cfg.mode_weight) for p in texts]
        data = sft.ground_truth_dataset(env["tok"], env["task"], texts, answers, env["device"])
    bar = cfg.expert_min_reward  # 0: the gate is off, and so are the restarts
    return fit_until(cfg, env, "expert", cfg.expert_size, "expert", cfg.expert_steps,
                     cfg.expert_lr or size_spec(cfg.expert_size)["lr"], data, bar, None, cfg.stop_at)


def fit_until(cfg, env, name, size, role, steps, lr, data, bar, expert_id, stop_at):
    """SFT on `data` (fit) from the init of `role`, stopping early at a held-out check >= stop_at
    (0: never); while the model's held-out reward at temperature 1 is below `bar`, again from
    another init, up to --expert-restarts times. The failed attempts are kept beside it
    (<name>-attempt<k>.pt). The first attempt is the model as it always was."""
    for attempt in range(cfg.expert_restarts + 1):
        model = new_model(cfg, env, size, role if attempt == 0 else f"{role}-restart{attempt}")
        rank0_print(env, f"training {name} ({size}, {model.n_params():,} parameters)"
                         + (f" (restart {attempt} of {cfg.expert_restarts})" if attempt else ""))
        run_cfg = cfg if attempt == 0 else replace(cfg, resume=False)  # a restart starts afresh, --resume or not
        fit(run_cfg, env, name, model, steps, lr, sft.train, data, run_cfg, expert_id=expert_id, stop_at=stop_at)
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
        tmp = f"{path}.tmp.{os.getpid()}"
        torch.save(dict(key=key, data=data), tmp)
        os.replace(tmp, path)
    return data


def get_student_base(cfg, env, expert, expert_id, expert_reward):
    """The student both methods start from: a short SFT warm start on expert samples. A base of
    the expert's own class (realizable) that ends more than 0.05 below the expert is trained
    again from another init, as the expert is (only with the gate on)."""
    name = f"base-{cfg.student_size}"
    base = load_finished(os.path.join(env["dir"], f"{name}.pt"), env, cfg.student_size, expert_id,
                         dict(seed=("--seed", cfg.seed), total=("--base-steps", cfg.base_steps), **stopped_by(cfg)))
    if base is None:
        data = expert_samples(cfg, env, expert, expert_id, cfg.base_steps * cfg.batch_size,
                              seed_for(cfg.seed, PROMPT_STREAMS["base"]))
        realizable = cfg.student_size == cfg.expert_size and cfg.expert_min_reward
        base = fit_until(cfg, env, name, cfg.student_size, "student", cfg.base_steps, student_lr(cfg), data,
                         expert_reward - 0.05 if realizable else 0, expert_id, min(cfg.stop_at, expert_reward))
    return base


def student_lr(cfg):
    return cfg.lr or size_spec(cfg.student_size)["lr"]


def run_name(cfg):
    if cfg.mode == "sft":
        return f"sft-{cfg.student_size}" + ("-fkl" if cfg.sft_loss == "forward_kl" else "")
    extra = (f"-{cfg.estimator}" if cfg.estimator != "full" else "") + \
            (f"-{cfg.divergence}" if cfg.divergence != "reverse" else "") + \
            (f"-beta{cfg.beta:g}" if cfg.divergence == "jsd" else "") + (f"-mix{cfg.mix:g}" if cfg.mix else "")
    return f"onpolicy-{cfg.student_size}-g{cfg.gamma:g}{extra}"


def main(argv=None):
    cfg = parse_args(argv)
    env = setup(cfg)
    rank0_print(env, "config: " + json.dumps(asdict(cfg)))
    expert, expert_id = get_expert(cfg, env)
    expert_reward = gate_expert(cfg, env, expert) if cfg.mode != "expert" else None
    if cfg.mode == "expert":
        model, name = expert, "expert"
    else:
        student = get_student_base(cfg, env, expert, expert_id, expert_reward)
        name = run_name(cfg) if cfg.mode != "base" else f"base-{cfg.student_size}"
        rank0_print(env, f"student ({cfg.student_size}): {student.n_params():,} parameters; expert "
                       f"({cfg.expert_size}): {expert.n_params():,}")
        if cfg.mode == "base":
            model = student
        elif cfg.mode == "sft":  # offline IL: the expert is queried before training only
            data = expert_samples(cfg, env, expert, expert_id, cfg.steps * cfg.batch_size,
                                  seed_for(cfg.seed, PROMPT_STREAMS["sft"]))
            model = fit(cfg, env, name, student, cfg.steps, student_lr(cfg), sft.train, data, cfg, cfg.sft_loss,
                        expert_id=expert_id)
        else:  # online IL: the student samples, the expert scores every token
            prompts = PromptStream(env["task"], env["held_out"], seed=seed_for(cfg.seed, PROMPT_STREAMS["onpolicy"], env["rank"]))
            model = fit(cfg, env, name, student, cfg.steps, student_lr(cfg), distill.train, expert, prompts, env["tok"],
                        env["task"], cfg, prompts=prompts, expert_id=expert_id)
    if env["rank"] == 0:
        result = evaluation.evaluate(model, expert, env["tok"], env["task"], env["held_out"], seed=cfg.seed)
        # the grid's "done" marker: written whole or not at all
        write_atomic(os.path.join(env["dir"], f"{name}.result.json"),
                     json.dumps(dict(name=name, n_params=model.n_params(), **result, config=asdict(cfg))))
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
