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
Each checkpoint has a <name>.metrics.jsonl beside it. Every flag is a field of config.Config,
declared once; the task flags are the fields of the tasks in data.TASKS.
"""
import json
import os
import sys
import traceback
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist

import distill
import eval as evaluation
import sft
from config import load_fitting, parse_args, refuse_other, run_name
from data import PROMPT_STREAMS, PromptStream, seed_for
from errors import UsageError
from model import fingerprint, make_model, size_spec, write_atomic
from runtime import Run, exit_distributed, rank0_print, setup

# ----------------------------------------------------------------------------- the pipeline
def new_model(cfg, env, size, role):
    """A fresh model whose init depends only on --seed and its role (expert, student)."""
    return make_model(size, env["block_size"], env["tok"].vocab_size, seed_for(cfg.seed, f"{role}/init")).to(env["device"])


def load_finished(path, cfg, env, kind, size, expert_id):
    """The model of a finished run's checkpoint, None if there is none yet. One made for another
    task, tokenizer, size or expert, or (kind: "expert", "base") with other settings of a flag
    that changes that run, is a one-line error, never a silent load (config.load_fitting)."""
    if not os.path.exists(path):
        return None
    model_cfg = make_model(size, env["block_size"], env["tok"].vocab_size, seed=0).cfg
    model, ck = load_fitting(path, cfg, env, kind, model_cfg, expert_id, resuming=True)
    if ck.get("step") != ck.get("total") and not ck.get("converged"):
        return None  # unfinished: to be trained on (--resume continues it, and may give it more steps)
    if kind is not None:  # a finished run: its step budget must be this run's too
        refuse_other(path, ck["config"], cfg, kind)
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
    score = sft.LOSSES[cfg.sft_loss] is sft.word_level_loss  # it distils the expert's scores
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
