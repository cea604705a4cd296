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
                       random init gets ~0 reward: the expert cannot grade noise);
  3. <mode>-<size>.pt  the student after offline or online IL, with the same number of
                       optimizer steps and response tokens per step (budget parity).
Each checkpoint has a <name>.metrics.jsonl beside it. Every flag comes from Config below.
"""
import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time
import zlib
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist

import distill
import eval as evaluation
import sft
from data import PromptStream, Tokenizer, eval_prompts, make_task, sample_answer
from model import SIZES, load_checkpoint, make_model, save_checkpoint, unwrap


@dataclass
class Config:
    mode: str = "onpolicy"  # expert | base (the warm-started student) | sft | onpolicy
    task: str = "mirror"  # mirror (default) | countdown
    digits: int = 5  # mirror: prompt digits
    answer_len: int = 0  # mirror: answer digits H (0: all of them)
    n_numbers: int = 3  # countdown: how many numbers
    max_number: int = 20  # countdown: numbers are drawn from 1..max_number
    max_target: int = 100  # countdown: targets are in 1..max_target
    expert_size: str = "medium"  # named size of the expert (model.SIZES)
    student_size: str = "small"  # named size of the student: medium is realizable, small misspecified
    out_dir: str = "out"  # checkpoints go to <out-dir>/<task>/
    seed: int = 0  # seeds every generator (data, sampling, init); rank r adds 1000*r
    device: str = "auto"  # auto (cuda if present) | cpu | cuda
    threads: int = 0  # torch CPU threads (0: torch's default)
    expert_steps: int = 2000  # expert: optimizer steps on ground truth
    expert_lr: float = 0.0  # expert: peak learning rate (0: the size's own, model.SIZES)
    base_steps: int = 200  # student base: warm-start SFT steps on expert samples
    steps: int = 500  # offline and online IL: optimizer steps (the same for both)
    batch_size: int = 64  # sequences per step, over all ranks (the same for both)
    lr: float = 0.0  # student: peak learning rate, cosine decay to 10% (0: the size's own)
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # clip the gradient norm to this
    temperature: float = 1.0  # sampling temperature of expert samples and student rollouts
    sft_loss: str = "ce"  # offline: ce (SFT) | forward_kl (word-level distillation)
    gamma: float = 1.0  # online: discount of future per-token KLs (1: sequence-level, 0: per-token)
    estimator: str = "full"  # online: full (per-token full-vocab KL + REINFORCE) | sampled
    divergence: str = "reverse"  # online: divergence at student states: reverse | forward | jsd
    beta: float = 0.5  # online: JSD beta (0 forward KL, 1 reverse KL)
    mix: float = 0.0  # online: GKD lambda, the fraction of each batch sampled by the expert
    normalize_adv: bool = True  # online: divide advantages by their std
    fused: bool = True  # use the fused log-prob kernels (False: naive log_softmax)
    compile: bool = False  # torch.compile the training forward
    eval_prompts: int = 256  # held-out prompts for the final evaluation
    log_every: int = 50  # steps between progress lines
    eval_every: int = 100  # steps between held-out reward checks (logged to metrics.jsonl)
    save_every: int = 100  # steps between checkpoints
    resume: bool = False  # continue from this run's checkpoint (step, optimizer, RNG states)


MODES = ("expert", "base", "sft", "onpolicy")
CHOICES = dict(mode=MODES, task=("mirror", "countdown"), expert_size=tuple(SIZES), student_size=tuple(SIZES),
               device=("auto", "cpu", "cuda"), sft_loss=("ce", "forward_kl"), estimator=("full", "sampled"),
               divergence=("reverse", "forward", "jsd"))


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one clear line, not a usage dump
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv=None):
    p = OneLineParser(description=__doc__.split("\n")[0])
    comments = _field_comments()
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=comments[f.name])
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            p.add_argument(flag, type=typ, default=f.default, help=comments[f.name], choices=CHOICES.get(f.name))
    cfg = Config(**vars(p.parse_args(argv)))
    check(cfg)
    return cfg


def _field_comments():
    """Each field's help line is its comment in Config (one source for flags and docs)."""
    import inspect
    out = {}
    for line in inspect.getsource(Config).splitlines():
        if ":" in line and "#" in line:
            out[line.split(":")[0].strip()] = line.split("#", 1)[1].strip()
    return out


def check(cfg):
    bad = [f"--{k.replace('_', '-')} must be >= {lo}" for k, lo in
           (("steps", 0), ("expert_steps", 0), ("base_steps", 0), ("batch_size", 1), ("eval_prompts", 1),
            ("log_every", 1), ("eval_every", 1), ("save_every", 1), ("threads", 0), ("lr", 0), ("expert_lr", 0)) if getattr(cfg, k) < lo]
    if not 0 <= cfg.gamma <= 1:
        bad.append("--gamma must be in [0, 1]")
    if not 0 <= cfg.mix < 1:
        bad.append("--mix must be in [0, 1)")
    if not 0 <= cfg.beta <= 1:
        bad.append("--beta must be in [0, 1]")
    if not cfg.temperature > 0:
        bad.append("--temperature must be > 0")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        bad.append("--device cuda, but no CUDA device is available")
    if bad:
        raise ValueError("; ".join(bad))


def build_task(cfg):
    if cfg.task == "mirror":
        return make_task("mirror", digits=cfg.digits, answer_len=cfg.answer_len)
    return make_task("countdown", n_numbers=cfg.n_numbers, max_number=cfg.max_number, max_target=cfg.max_target)


# ----------------------------------------------------------------------------- the run
def lr_factor(step, total, warmup=50):
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))



class Run:
    """What every loop needs besides its algorithm: device and ranks, the optimizer and its
    schedule, progress lines and metrics.jsonl, checkpoints, --resume and Ctrl-C."""

    def __init__(self, cfg, env, name, model, total_steps, lr):
        self.cfg, self.env, self.name, self.total = cfg, env, name, total_steps
        self.device, self.rank, self.world = env["device"], env["rank"], env["world"]
        self.path = os.path.join(env["dir"], f"{name}.pt")
        self.raw = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
        self.lr = lr
        seed = cfg.seed + 1000 * self.rank + zlib.crc32(name.encode()) % 997
        self.sample_gen = torch.Generator(self.device).manual_seed(seed)
        self.prompts = None  # a PromptStream whose generator is checkpointed, set by the caller
        self.start, self.totals, self.stop_requested, self.t0 = 0, {}, False, time.time()
        self.model = model
        if self.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(model)
        if cfg.compile:
            self.model = torch.compile(self.model)

    def resume_if_asked(self):
        if not (self.cfg.resume and os.path.exists(self.path)):
            return
        _, ck = load_checkpoint(self.path, expect=self.identity(), device=self.device)
        self.raw.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sample_gen.set_state(ck["rng"]["sample"][self.rank].cpu())
        if self.prompts is not None:
            self.prompts.g.set_state(ck["rng"]["prompts"][self.rank])
        self.start, self.totals = ck["step"], ck["totals"]
        self.print(f"resumed {self.path} at step {self.start}")

    def identity(self):
        return dict(task=self.env["task_id"], tokenizer=self.env["tok"].identity,
                    model_args=asdict(self.raw.cfg), name=self.name)

    def steps(self):
        """Yield step numbers; save every save_every steps, on Ctrl-C, and at the end."""
        old = signal.signal(signal.SIGINT, self._on_sigint) if self.rank == 0 else None
        try:
            if self.total == 0:
                self.save(0)
            for step in range(self.start, self.total):
                for group in self.opt.param_groups:
                    group["lr"] = self.lr * lr_factor(step, self.total)
                yield step
                if self.rank == 0 and ((step + 1) % self.cfg.eval_every == 0 or step + 1 == self.total):
                    self.log_eval(step)
                stop = self.global_sum(torch.tensor(int(self.stop_requested))) > 0
                if stop or (step + 1) % self.cfg.save_every == 0 or step + 1 == self.total:
                    self.save(step + 1)
                if stop:
                    self.print(f"interrupted: saved {self.path} at step {step + 1}; continue with --resume")
                    raise SystemExit(130)
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)

    def _on_sigint(self, *_):
        if self.stop_requested:  # a second Ctrl-C stops at once (the last checkpoint stays)
            raise KeyboardInterrupt
        self.stop_requested = True
        print("\nCtrl-C: saving at the end of this step (again to abort)", flush=True)

    def optimize(self, loss):
        if not torch.isfinite(loss):
            raise ValueError(f"non-finite loss ({loss.item()}) in {self.name}; "
                             f"the last good checkpoint is kept ({self.path})")
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return norm.item()

    def global_sum(self, x):
        x = torch.as_tensor(x, device=self.device).clone()
        if self.world > 1:
            dist.all_reduce(x)
        return x

    def autocast(self):
        if "cuda" in str(self.device):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def log(self, step, **metrics):
        for k, v in metrics.items():
            if k.endswith("_tokens"):
                self.totals[k] = self.totals.get(k, 0) + v
        if self.rank != 0:
            return
        rec = dict(step=step + 1, **metrics, **{f"total_{k}": v for k, v in self.totals.items()},
                   elapsed=time.time() - self.t0)
        with open(os.path.join(self.env["dir"], f"{self.name}.metrics.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")
        if (step + 1) % self.cfg.log_every == 0 or step + 1 == self.total:
            done = step + 1 - self.start
            eta = (time.time() - self.t0) / done * (self.total - step - 1)
            shown = " | ".join(f"{k} {v:.4f}" if isinstance(v, float) and k != "tok_per_s" else f"{k} {v:.0f}"
                               for k, v in metrics.items() if not k.endswith("_tokens") or k == "tok_per_s")
            print(f"{self.name} step {step + 1}/{self.total} | {shown} | eta {eta:.0f}s", flush=True)

    def log_eval(self, step):
        """Reward at temperature 1 on a fixed quarter of the held-out prompts: the curve per method."""
        prompts = self.env["held_out"][:max(1, len(self.env["held_out"]) // 4)]
        reward = evaluation.quick_eval(self.raw, self.env["tok"], self.env["task"], prompts, seed=step)["reward"]
        self.raw.train()
        with open(os.path.join(self.env["dir"], f"{self.name}.metrics.jsonl"), "a") as f:
            f.write(json.dumps(dict(step=step + 1, eval_reward=reward)) + "\n")

    def save(self, step):
        rng = dict(sample=self.gather_rng(self.sample_gen), prompts=self.gather_rng(self.prompts.g) if self.prompts else None)
        if self.rank != 0:
            return
        save_checkpoint(self.path, self.raw, optimizer=self.opt.state_dict(), step=step, total=self.total, totals=self.totals,
                        config=asdict(self.cfg), seed=self.cfg.seed, rng=rng, **self.identity())

    def gather_rng(self, g):
        states = [g.get_state()]
        if self.world > 1:  # every rank's generator state, so each rank resumes its own stream
            states = [None] * self.world
            dist.all_gather_object(states, g.get_state())
        return states

    def print(self, *a):
        if self.rank == 0:
            print(*a, flush=True)


# ----------------------------------------------------------------------------- the pipeline
def setup(cfg):
    """Device, distributed ranks (torchrun sets RANK/WORLD_SIZE), threads, output folder."""
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
        if cfg.batch_size % world:
            raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by {world} ranks")
    device = f"cuda:{local}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tok, task = Tokenizer(), build_task(cfg)
    out = os.path.join(cfg.out_dir, cfg.task)
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"cannot write to output folder {out}: {e.strerror}") from None
    torch.manual_seed(cfg.seed)
    block_size = 1 + task.max_prompt_len + task.max_response_len + 1  # bos ... end
    return dict(device=device, rank=rank, world=world, dir=out, tok=tok, task=task, block_size=block_size,
                task_id=dict(asdict(task)), held_out=eval_prompts(task, cfg.eval_prompts, seed=10_000 + cfg.seed))


def new_model(cfg, env, size):
    return make_model(size, env["block_size"], env["tok"].vocab_size).to(env["device"])


def load_finished(path, env, size):
    """The model of a finished run's checkpoint, None if there is none yet; a checkpoint
    made for another task, tokenizer or size is an error, never a silent load."""
    if not os.path.exists(path):
        return None
    expect = dict(task=env["task_id"], tokenizer=env["tok"].identity,
                  model_args=asdict(make_model(size, env["block_size"], env["tok"].vocab_size).cfg))
    model, ck = load_checkpoint(path, expect=expect, device=env["device"])
    return model if ck.get("step") == ck.get("total") else None


def fit(cfg, env, name, model, steps, lr, loop, *args, prompts=None):
    """Run one training loop in a Run (resume, logging, checkpoints) and return the model."""
    run = Run(cfg, env, name, model, steps, lr)
    run.prompts = prompts
    run.resume_if_asked()
    loop(run, *args)
    return model


def get_expert(cfg, env):
    """Load <out>/<task>/expert.pt, or train it: SFT on ground-truth answers drawn uniformly
    among all valid ones (so the expert is multimodal)."""
    path = os.path.join(env["dir"], "expert.pt")
    expert = None if cfg.mode == "expert" else load_finished(path, env, cfg.expert_size)
    if expert is None:
        expert = new_model(cfg, env, cfg.expert_size)
        env_print(env, f"training the expert ({cfg.expert_size}, {expert.n_params():,} parameters) on ground truth")
        # every rank builds the same dataset; sft.train gives each rank its own rows
        texts = PromptStream(env["task"], env["held_out"], seed=cfg.seed).batch(cfg.expert_steps * cfg.batch_size)
        g = torch.Generator().manual_seed(cfg.seed + 1)
        answers = [sample_answer(env["task"], p, g) for p in texts]
        data = sft.ground_truth_dataset(env["tok"], env["task"], texts, answers, env["device"])
        fit(cfg, env, "expert", expert, cfg.expert_steps, cfg.expert_lr or SIZES[cfg.expert_size]["lr"], sft.train, data, cfg)
    expert.eval().requires_grad_(False)  # frozen and replicated: no DDP wrapper
    return expert


def expert_samples(cfg, env, expert, n, seed, name):
    """n expert responses to fresh training prompts, cached as <name>.data.pt."""
    path = os.path.join(env["dir"], f"{name}.data.pt")
    key = dict(n=n, seed=seed, temperature=cfg.temperature, score=cfg.sft_loss == "forward_kl",
               expert_mtime=os.path.getmtime(os.path.join(env["dir"], "expert.pt")))
    if os.path.exists(path):
        cached = torch.load(path, map_location=env["device"])
        if cached["key"] == key:
            return cached["data"]
    texts = PromptStream(env["task"], env["held_out"], seed=seed).batch(n)
    data = sft.expert_dataset(expert, env["tok"], env["task"], texts, cfg, torch.Generator(env["device"]).manual_seed(seed),
                              env["device"], score=key["score"])
    if env["rank"] == 0:
        tmp = f"{path}.tmp.{os.getpid()}"
        torch.save(dict(key=key, data=data), tmp)
        os.replace(tmp, path)
    return data


def get_student_base(cfg, env, expert):
    """The student both methods start from: a short SFT warm start on expert samples."""
    name = f"base-{cfg.student_size}"
    base = load_finished(os.path.join(env["dir"], f"{name}.pt"), env, cfg.student_size)
    if base is None:
        torch.manual_seed(cfg.seed + 7)  # the student's init
        base = new_model(cfg, env, cfg.student_size)
        data = expert_samples(cfg, env, expert, cfg.base_steps * cfg.batch_size, cfg.seed + 2, name)
        fit(cfg, env, name, base, cfg.base_steps, student_lr(cfg), sft.train, data, cfg)
    return base


def student_lr(cfg):
    return cfg.lr or SIZES[cfg.student_size]["lr"]


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
    env_print(env, "config: " + json.dumps(asdict(cfg)))
    expert = get_expert(cfg, env)
    if cfg.mode == "expert":
        model, name = expert, "expert"
    else:
        student = get_student_base(cfg, env, expert)
        name = run_name(cfg) if cfg.mode != "base" else f"base-{cfg.student_size}"
        env_print(env, f"student ({cfg.student_size}): {student.n_params():,} parameters; expert "
                       f"({cfg.expert_size}): {expert.n_params():,}")
        if cfg.mode == "base":
            model = student
        elif cfg.mode == "sft":  # offline IL: the expert is queried before training only
            data = expert_samples(cfg, env, expert, cfg.steps * cfg.batch_size, cfg.seed + 3, name)
            model = fit(cfg, env, name, student, cfg.steps, student_lr(cfg), sft.train, data, cfg, cfg.sft_loss)
        else:  # online IL: the student samples, the expert scores every token
            prompts = PromptStream(env["task"], env["held_out"], seed=cfg.seed + 4 + 1000 * env["rank"])
            model = fit(cfg, env, name, student, cfg.steps, student_lr(cfg), distill.train, expert, prompts, env["tok"],
                        env["task"], cfg, prompts=prompts)
    if env["rank"] == 0:
        result = evaluation.evaluate(model, expert, env["tok"], env["task"], env["held_out"], seed=cfg.seed)
        with open(os.path.join(env["dir"], f"{name}.result.json"), "w") as f:
            json.dump(dict(name=name, n_params=model.n_params(), **result), f)
        print(evaluation.describe(f"{name} ({model.n_params():,} params) on {cfg.task}", result, len(env["held_out"])))
    if env["world"] > 1:
        dist.destroy_process_group()
    return model


def env_print(env, *a):
    if env["rank"] == 0:
        print(*a, flush=True)


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")
