"""The mechanics every training loop calls, so that sft.train and distill.train hold the algorithm.

setup(cfg) -> env: device (CUDA when present), torch.distributed ranks when launched by
    torchrun (gloo on CPU, NCCL on CUDA), threads, output folder, tokenizer, task, held-out
    prompts.
Run: the optimizer and the learning-rate schedule (config.SCHEDULES), progress lines and metrics.jsonl,
    atomic checkpoints with RNG states (--resume continues exactly), Ctrl-C (save at the end of
    the step, then exit 130), a non-finite loss or gradient (stop before the step, keep the last
    good checkpoint), the held-out check and --stop-at, and the votes of the ranks under torchrun.
"""
import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from config import identity, load_fitting, lr_factor
from data import PromptStream, eval_prompts, make_task, seed_for, task_tokenizer
from errors import UsageError
from model import make_model, save_checkpoint, write_atomic


def setup(cfg):
    """Device, distributed ranks (torchrun sets RANK/WORLD_SIZE), threads, output folder."""
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
        if cfg.batch_size % world:
            raise UsageError(f"--batch-size {cfg.batch_size} is not divisible by {world} ranks")
    device = f"cuda:{local}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    task = make_task(cfg.task, **cfg.task_args)
    tok = task_tokenizer(task)
    out = os.path.join(cfg.out_dir, cfg.task)
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"cannot write to output folder {out}: {e.strerror}") from None
    block_size = 1 + task.max_prompt_len + task.max_response_len + 1  # bos ... end
    if cfg.block_size and cfg.block_size < block_size:
        raise UsageError(f"--block-size {cfg.block_size} is shorter than this task's prompt + response "
                         f"({block_size} tokens)")
    block_size = cfg.block_size or block_size
    if cfg.top_k >= tok.vocab_size:
        raise UsageError(f"--top-k {cfg.top_k}: this task's vocabulary has {tok.vocab_size} tokens; take fewer")
    for size in (cfg.expert_size, cfg.student_size):  # a bad size fails now, not after training
        make_model(size, block_size, tok.vocab_size, seed=0)
    held_out = eval_prompts(task, cfg.eval_prompts, seed=seed_for(cfg.seed, "held-out"))
    PromptStream(task, held_out, seed=0).batch(1)  # and so does a held-out set that leaves no training prompts
    return dict(device=device, rank=rank, world=world, dir=out, tok=tok, task=task, block_size=block_size,
                task_id=dict(asdict(task)), held_out=held_out)


# ----------------------------------------------------------------------------- the run
def rank0_print(env, *a):
    if env["rank"] == 0:
        print(*a, flush=True)


def exit_distributed(code=0):
    """End a torchrun rank without Python's interpreter teardown: gloo's worker thread may free a
    finished collective's tensors while the interpreter finalizes, which aborts the process
    (SIGABRT). Everything this run writes is closed by then, so flush and leave at once."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _step_of(line):
    """The step of a metrics.jsonl row; infinite for a line cut short by a crash (dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class Run:
    """What a loop needs besides its algorithm. kind: expert, base, sft or onpolicy (which flags a
    --resume must share); name: the checkpoint's; lr: the peak learning rate; prompts: the
    PromptStream the loop draws from (its generator is checkpointed); expert_id: the fingerprint
    of the expert this model learns from (None for the expert itself); eval_reward(model, prompts,
    seed) -> the held-out reward of a check; stop_at: end the run at the first check at or above
    it (0: never), a run that converged. `with run:` installs the Ctrl-C handler for the loop."""

    def __init__(self, cfg, env, kind, name, model, total_steps, lr, prompts=None, expert_id=None, eval_reward=None,
                 stop_at=0.0):
        self.cfg, self.env, self.kind, self.name, self.total, self.lr = cfg, env, kind, name, total_steps, lr
        self.prompts, self.expert_id, self.eval_reward, self.stop_at = prompts, expert_id, eval_reward, stop_at
        self.converged = False  # stopped early at a held-out check >= stop_at: finished, like step == total
        self.device, self.rank, self.world = env["device"], env["rank"], env["world"]
        self.path = os.path.join(env["dir"], f"{name}.pt")
        self.metrics = os.path.join(env["dir"], f"{name}.metrics.jsonl")
        # this run's rows go to a file of its own until its first checkpoint, then over metrics.jsonl:
        # a run that fails before its first checkpoint leaves a finished run's files as they were
        self.rows = f"{self.metrics}.part.{os.getpid()}"
        self.raw = self.model = model
        # weight decay on the matrices of the linear layers only; not on biases, LayerNorm gains or
        # the (tied) embeddings, which only ever meet one token at a time. Two groups even at decay 0.
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith(("wte", "wpe"))]
        rest = [p for p in model.parameters() if all(p is not q for q in decay)]
        self.opt = torch.optim.AdamW([dict(params=decay, weight_decay=cfg.weight_decay),
                                      dict(params=rest, weight_decay=0.0)], lr=lr, betas=(0.9, 0.99))
        self.sample_gen = torch.Generator(self.device).manual_seed(seed_for(cfg.seed, f"{name}/sampling", self.rank))
        self.start, self.totals, self.stop_requested, self.t0 = 0, {}, False, time.time()
        self.step, self.saved, self.pending = 0, None, None  # saved: step of the last checkpoint written
        self.wrote = False  # whether this process has written a checkpoint yet
        if self.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(model)
        if cfg.compile:
            self.model = torch.compile(self.model)
        if cfg.resume and os.path.exists(self.path):
            self.resume()
        elif cfg.resume:  # e.g. a method's flag changed, and with it the run's name
            rank0_print(env, f"note: --resume, but there is no {self.path}: {name} starts from step 0")
        if self.rank == 0:  # this run's rows: none on a fresh start, the checkpoint's on a resume
            rows = []
            if self.start and os.path.exists(self.metrics):
                with open(self.metrics) as f:
                    rows = [line for line in f if _step_of(line) <= self.start]
            write_atomic(self.rows, lambda tmp: Path(tmp).write_text("".join(rows)))

    def resume(self):
        # read on the CPU: generator states must be CPU ByteTensors (the prompt stream's generator
        # lives on the CPU even on a GPU run); load_state_dict copies weights and optimizer state
        # to the model's device. The run it continues must be this one: its name, seed and flags.
        _, ck = load_fitting(self.path, self.cfg, self.env, self.kind, self.raw.cfg, self.expert_id, device="cpu",
                             resuming=True, name=self.name)
        if len(ck["rng"]["sample"]) != self.world:  # each rank resumes its own sampling stream
            raise UsageError(f"{self.path} was saved by {len(ck['rng']['sample'])} rank(s): resume it with as many "
                             f"(torchrun --nproc_per_node {len(ck['rng']['sample'])}), not {self.world}")
        if self.total < ck["total"]:
            raise UsageError(f"{self.path} is a run of {ck['total']} steps: --resume may give it more, not {self.total}")
        self.raw.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sample_gen.set_state(ck["rng"]["sample"][self.rank])
        if self.prompts is not None:
            self.prompts.g.set_state(ck["rng"]["prompts"][self.rank])
        self.start, self.totals, self.saved = ck["step"], ck["totals"], ck["step"]
        self.converged = ck.get("converged", False)
        rank0_print(self.env, f"resumed {self.path} at step {self.start}")
        if self.converged:  # it finished early at a check >= --stop-at: nothing is left to train
            self.start = self.total
        elif ck["total"] != self.total:  # allowed (train on for longer), but the lr schedule is another one
            rank0_print(self.env, f"note: {self.path} was a run of {ck['total']} steps, continued as one of "
                                  f"{self.total}: its learning-rate schedule changes from here")

    # ------------------------------------------------------------------ what the loop calls, in order
    def __enter__(self):
        self.old_sigint = signal.signal(signal.SIGINT, self._on_sigint)  # every rank: torchrun passes Ctrl-C to each
        if self.total == 0:  # a run of no steps is finished as it is
            try:
                self.save(self.snapshot(0))
            except BaseException:
                self.__exit__()
                raise
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.old_sigint)
        if self.rows != self.metrics and os.path.exists(self.rows):
            os.remove(self.rows)
        return False

    def set_lr(self, step):
        """The learning rate of this step (--warmup, then --lr-schedule), set on the optimizer."""
        self.step = step
        lr = self.lr * lr_factor(step, self.total, self.cfg.lr_schedule, self.cfg.warmup)
        for group in self.opt.param_groups:
            group["lr"] = lr
        return lr

    @contextlib.contextmanager
    def stop_on_overflow(self, where):
        """Sampling from weights whose logits overflow raises FloatingPointError on one rank: every
        rank learns of it and they stop together with one line (the others would wait for ever)."""
        overflow = 0
        try:
            yield
        except FloatingPointError:
            overflow = 1
        if self.global_sum(torch.tensor(overflow)) > 0:
            raise UsageError(f"non-finite logits {where} at step {self.step + 1} of {self.name} (the weights have "
                             f"diverged); {self.kept()}")

    def optimize(self, loss):
        """Backward, clip and step, unless the loss or the gradient is not finite on any rank:
        then every rank stops before the step, and the last checkpoint written stays. Weights that
        a step made to overflow are caught by the next loss, or by sampling (model.generate)."""
        loss.backward()  # on every rank, finite or not: DDP's gradient all-reduce needs them all
        norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), self.cfg.grad_clip)
        if self.global_sum(torch.tensor(int(not (torch.isfinite(loss) and torch.isfinite(norm))))) > 0:
            raise UsageError(f"non-finite loss or gradient at step {self.step + 1} of {self.name} (loss "
                             f"{loss.item():.4g}, grad_norm {norm.item():.4g}); {self.kept()}")
        if self.pending is not None:  # the weights it holds just gave a finite loss and gradient
            self.save(self.pending)
            self.pending = None
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return norm.item()

    def log(self, step, **metrics):
        """One metrics.jsonl row per step; a progress line every --log-every steps. *_tokens
        metrics are summed over the ranks by the caller and accumulate into total_*."""
        for k, v in metrics.items():
            if k.endswith("_tokens"):
                self.totals[k] = self.totals.get(k, 0) + v
        if self.rank != 0:
            return
        rec = dict(step=step + 1, **metrics, **{f"total_{k}": v for k, v in self.totals.items()},
                   elapsed=time.time() - self.t0)
        with open(self.rows, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if (step + 1) % self.cfg.log_every == 0 or step + 1 == self.total:
            done = step + 1 - self.start
            eta = (time.time() - self.t0) / done * (self.total - step - 1)
            shown = " | ".join(f"{k} {v:.0f}" if k == "tok_per_s" else f"{k} {v:.2e}" if k == "lr" else f"{k} {v:.4f}"
                               for k, v in metrics.items() if not k.endswith("_tokens"))
            print(f"{self.name} step {step + 1}/{self.total} | {shown} | elapsed {time.time() - self.t0:.0f}s "
                  f"| eta {eta:.0f}s", flush=True)

    def held_out_check(self, step):
        """Every --eval-every steps and at the last: rank 0 samples the held-out reward at
        temperature 1 on a fixed quarter of the held-out prompts (metrics.jsonl: eval_reward, the
        curve per method). Returns whether it reached --stop-at; every rank gets the same answer."""
        if not self.eval_reward or not ((step + 1) % self.cfg.eval_every == 0 or step + 1 == self.total):
            return False
        reached = 0
        with self.stop_on_overflow("in the held-out check"):
            if self.rank == 0:
                prompts = self.env["held_out"][:max(1, len(self.env["held_out"]) // 4)]
                reward = self.eval_reward(self.raw, prompts, step)
                self.raw.train()
                with open(self.rows, "a") as f:
                    f.write(json.dumps(dict(step=step + 1, eval_reward=reward)) + "\n")
                reached = int(bool(self.stop_at) and reward >= self.stop_at)
        return bool(self.global_sum(torch.tensor(reached)) > 0)

    def checkpoint(self, step, converged=False):
        """Save at the last step, on convergence and on Ctrl-C; every --save-every steps, hold the
        snapshot back until the next step has found these weights good (finite loss and gradient:
        optimize), so a checkpoint kept after a divergence is one that trains on. Ctrl-C then exits
        130. Returns True when the run is finished early (converged)."""
        stop = bool(self.global_sum(torch.tensor(int(self.stop_requested))) > 0)  # the ranks stop together
        last = step + 1 == self.total
        if converged and not last:
            self.converged = True
            rank0_print(self.env, f"{self.name} converged: its held-out check reached {self.stop_at:.3g} at step "
                                  f"{step + 1} of {self.total} (--stop-at); stopping here")
        if stop or self.converged or last:  # no later step will check these weights
            self.save(self.snapshot(step + 1))
        elif (step + 1) % self.cfg.save_every == 0:
            self.pending = self.snapshot(step + 1)
        if stop:  # Ctrl-C wins over convergence: the user asked to stop the whole command
            rank0_print(self.env, f"interrupted: saved {self.path} at step {step + 1}; continue with --resume")
            raise SystemExit(130)
        return self.converged

    # ------------------------------------------------------------------ helpers
    def _on_sigint(self, *_):
        if self.stop_requested:  # a second Ctrl-C stops at once (the last checkpoint stays)
            raise KeyboardInterrupt
        self.stop_requested = True  # the ranks agree on stopping at the step's end (checkpoint)
        rank0_print(self.env, "\nCtrl-C: saving at the end of this step (again to abort)")

    def global_sum(self, x):
        """x summed over the ranks; on one process a copy of x, left where it is (a flag on the
        CPU is not sent to the GPU and read back)."""
        if self.world == 1:
            return torch.as_tensor(x).clone()
        x = torch.as_tensor(x, device=self.device).clone()
        dist.all_reduce(x)
        return x

    def autocast(self):
        if "cuda" in str(self.device):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def kept(self):
        return (f"the last good checkpoint is kept ({self.path}, step {self.saved})" if self.saved is not None
                else "no checkpoint of this run was written")

    def snapshot(self, step):
        """What a checkpoint at `step` holds besides the weights and the optimizer state (those
        stay as they are until the next opt.step(), so a snapshot can be written later)."""
        return dict(step=step, totals=dict(self.totals), rng=dict(
            sample=self.gather_rng(self.sample_gen), prompts=self.gather_rng(self.prompts.g) if self.prompts else None))

    def save(self, snap):
        """The checkpoint, then this run's metrics up to it over metrics.jsonl; the first one this
        process writes also removes the run's result.json (it described the old checkpoint)."""
        if not all(torch.isfinite(p).all() for p in self.raw.parameters()):
            raise UsageError(f"non-finite weights at step {snap['step']} of {self.name}; {self.kept()}")
        first, self.saved, self.wrote = not self.wrote, snap["step"], True
        if self.rank == 0:
            save_checkpoint(self.path, self.raw, optimizer=self.opt.state_dict(), step=snap["step"], total=self.total,
                            converged=self.converged, totals=snap["totals"], config=asdict(self.cfg), seed=self.cfg.seed,
                            rng=snap["rng"], name=self.name, **identity(self.env, self.raw.cfg, self.expert_id))
            if self.rows != self.metrics:  # from now on this run owns metrics.jsonl: its rows go there
                with open(self.rows) as f:
                    rows = "".join(line for line in f if _step_of(line) <= snap["step"])
                write_atomic(self.metrics, lambda tmp: Path(tmp).write_text(rows))
                os.remove(self.rows)
                self.rows = self.metrics
            result = os.path.join(self.env["dir"], f"{self.name}.result.json")
            if first and os.path.exists(result):
                os.remove(result)

    def gather_rng(self, g):
        states = [g.get_state()]
        if self.world > 1:  # every rank's generator state, so each rank resumes its own stream
            states = [None] * self.world
            dist.all_gather_object(states, g.get_state())
        return states
