"""runtime.Run in-process: non-finite gradients, Ctrl-C on every rank, the stop flags of two DDP
ranks, resuming a GPU run (simulated), the learning-rate schedule, and the held-out check."""
import multiprocessing
import os
import signal
import socket

import pytest
import torch

import config
from data import PromptStream
from errors import UsageError
from model import make_model
from config import lr_factor, parse_args
from runtime import Run, setup
from train import load_finished

FLAGS = ["--digits", "2", "--expert-size", "tiny", "--student-size", "tiny", "--batch-size", "4", "--eval-prompts", "8",
         "--device", "cpu"]


def make_run(out_dir, *flags, total=10, prompt_seed=None):
    cfg = parse_args([*FLAGS, "--out-dir", str(out_dir), *flags])
    env = setup(cfg)  # under torch.distributed's RANK/WORLD_SIZE variables this joins the group
    model = make_model("tiny", env["block_size"], env["tok"].vocab_size, seed=0).to(env["device"])
    prompts = None if prompt_seed is None else PromptStream(env["task"], env["held_out"], seed=prompt_seed)
    return Run(cfg, env, "sft", "t", model, total, 1e-3, prompts=prompts)


def drive(run, on_step=None):
    """The loop of sft.train and distill.train without their algorithm; returns the steps run."""
    done = []
    with run:
        for step in range(run.start, run.total):
            run.set_lr(step)
            if on_step:
                on_step(run)
            done.append(step)
            if run.checkpoint(step, run.held_out_check(step)):
                break
    return done


def test_non_finite_gradient_with_finite_loss_stops_before_the_step(tmp_path):
    """sqrt(0 * w) is 0, but its gradient is 0 * inf = NaN: the loss check alone let it through
    and opt.step() wrote NaN into every weight."""
    run = make_run(tmp_path)
    before = [p.detach().clone() for p in run.raw.parameters()]
    loss = torch.sqrt((run.raw.wte.weight * 0).sum())
    assert torch.isfinite(loss)
    with pytest.raises(UsageError, match="non-finite loss or gradient"):
        run.optimize(loss)
    assert all(torch.equal(a, b) for a, b in zip(before, run.raw.parameters()))


def run_ranks(n, args, target):
    """Start n spawned processes target(*args(rank, port, results)) on a free port; return what
    each put in `results`, one item per process."""
    ctx = multiprocessing.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=args(r, port, results)) for r in range(n)]
    for p in procs:
        p.start()
    try:
        return [results.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


def _one_rank_has_a_nan_loss(rank, port, out_dir, results):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    run = make_run(out_dir)
    tokens = torch.tensor([[1, 2, 3]])
    loss = run.model(tokens, torch.ones_like(tokens, dtype=torch.bool)).sum() * (float("nan") if rank else 1.0)
    try:
        run.optimize(loss)
        results.put((rank, "stepped"))
    except UsageError:
        results.put((rank, "stopped"))


def test_non_finite_loss_on_one_rank_stops_every_rank(tmp_path):
    """Under torchrun one rank's NaN must stop all of them: a rank that raised alone left the
    others waiting in DDP's gradient all-reduce for ever."""
    got = sorted(run_ranks(2, lambda r, port, results: (r, port, str(tmp_path), results), _one_rank_has_a_nan_loss))
    assert got == [(0, "stopped"), (1, "stopped")]


def test_every_rank_finishes_its_step_on_ctrl_c(tmp_path):
    """torchrun passes Ctrl-C to every worker: each rank (here rank 1) finishes its step, and
    they stop together (exit 130) after the checkpoint, with the old handler back in place."""
    run = make_run(tmp_path)
    run.rank = 1  # a second rank (world 1 here, so no process group is needed)
    before, code, finished = signal.getsignal(signal.SIGINT), None, []

    def interrupt(run):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C arrives mid-step
        finished.append(run.step)

    try:
        drive(run, interrupt)
    except KeyboardInterrupt:
        pytest.fail("a rank other than 0 died on Ctrl-C instead of finishing its step")
    except SystemExit as e:
        code = e.code
    assert code == 130 and finished == [0] and signal.getsignal(signal.SIGINT) is before


def test_resume_reads_the_checkpoint_on_the_cpu(tmp_path, monkeypatch):
    """--resume on CUDA must read the checkpoint on the CPU: the prompt generator lives there and
    refuses a CUDA state (TypeError). Simulated: a run that believes it is on cuda:0, and a
    load_checkpoint that puts the prompt generator's state on the device it is asked for ('meta'
    stands in for the GPU). Resume must read on the CPU and restore both generators."""
    run = make_run(tmp_path, prompt_seed=1)
    run.prompts.batch(3)
    run.save(run.snapshot(3))
    saved = run.prompts.g.get_state(), run.sample_gen.get_state()
    run = make_run(tmp_path, prompt_seed=2)  # resumed by hand below, as --resume does in Run()
    run.device = "cuda:0"  # what a GPU run holds (its sample generator is built already)
    real = config.load_checkpoint

    def mapped(path, expect=None, device="cpu"):
        model, ck = real(path, expect, "cpu")
        if device != "cpu":
            ck["rng"]["prompts"] = [s.to("meta") for s in ck["rng"]["prompts"]]
        return model, ck

    monkeypatch.setattr(config, "load_checkpoint", mapped)
    run.resume()
    assert run.start == 3 and torch.equal(run.prompts.g.get_state(), saved[0])
    assert torch.equal(run.sample_gen.get_state(), saved[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_resume_on_cuda_restores_every_generator(tmp_path):
    """The real case the test above simulates: a run on the GPU, its CPU prompt generator and
    its CUDA sampling generator, saved and resumed."""
    run = make_run(tmp_path, "--device", "cuda", prompt_seed=1)
    run.prompts.batch(3)
    torch.rand(5, device="cuda", generator=run.sample_gen)
    run.save(run.snapshot(3))
    saved = run.prompts.g.get_state(), run.sample_gen.get_state(), [p.detach().cpu() for p in run.raw.parameters()]
    run = make_run(tmp_path, "--device", "cuda", "--resume", prompt_seed=2)
    assert run.start == 3 and torch.equal(run.prompts.g.get_state(), saved[0])
    assert torch.equal(run.sample_gen.get_state(), saved[1])
    assert all(p.is_cuda and torch.equal(p.cpu(), q) for p, q in zip(run.raw.parameters(), saved[2]))


def test_weight_decay_reaches_the_linear_matrices_only(tmp_path):
    """--weight-decay decays the matrices of the linear layers, not LayerNorm gains or embeddings."""
    run = make_run(tmp_path, "--weight-decay", "0.1")
    decayed = {id(p) for g in run.opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {n for n, p in run.raw.named_parameters() if id(p) in decayed}
    assert names and all(n.endswith("weight") and ".ln" not in n and not n.startswith(("wte", "wpe")) for n in names)
    assert {n for n, p in run.raw.named_parameters() if p.dim() >= 2 and not n.startswith(("wte", "wpe"))} == names
    assert sum(len(g["params"]) for g in run.opt.param_groups) == len(list(run.raw.parameters()))


def _online_gradient(rank, world, port, out_dir, results):
    """The gradient of online IL's objective on a fixed global batch of 8 rollouts of different
    lengths, the rows split evenly over `world` gloo ranks (DDP), as distill.train computes it."""
    import distill
    if world > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    torch.set_num_threads(1)
    run = make_run(out_dir, "--batch-size", "8")
    tok = run.env["tok"]
    expert = make_model("tiny", run.env["block_size"], tok.vocab_size, seed=1)
    g = torch.Generator().manual_seed(0)
    lengths = [1, 4, 2, 3, 3, 1, 3, 2]  # on 2 ranks, rank 1's half (3 wide) is narrower than rank 0's (4)
    resp = torch.randint(0, 10, (8, 4), generator=g)
    mask = torch.arange(4)[None, :] < torch.tensor(lengths)[:, None]
    prompts = [f"{i}{i + 1}=" for i in range(8)]
    prompt = torch.stack([torch.tensor(tok.encode(p)) for p in prompts])
    rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
    m = mask[rows]
    R = int(m.sum(1).max())
    batch = dict(prompt=prompt[rows], prompt_valid=torch.ones_like(prompt[rows], dtype=torch.bool),
                 response=torch.where(m, resp[rows], tok.pad)[:, :R], response_mask=m[:, :R],
                 on_policy=torch.ones(m.shape[0], dtype=torch.bool))
    per_token, _ = distill.online_loss(run, expert, batch, run.cfg)
    objective = per_token.sum() / run.global_sum(batch["response_mask"].sum()) * run.world
    objective.backward()
    results.put((rank, [p.grad.numpy().copy() for p in run.raw.parameters()]))  # by value: the process ends


@pytest.mark.parametrize("world", [2])
def test_online_gradient_does_not_depend_on_the_number_of_ranks(tmp_path, world):
    """The leave-one-out baseline and the advantage std are the global batch's (all-reduced), so
    the same global batch gives the same gradient on 2 ranks as on 1."""
    grads = {}
    for n in (1, world):
        got = run_ranks(n, lambda r, port, results: (r, n, port, str(tmp_path / str(n)), results), _online_gradient)
        got = {r: [torch.from_numpy(g) for g in gs] for r, gs in got}
        grads[n] = got[0]
        for r in range(1, n):  # DDP: every rank holds the same averaged gradient
            assert all(torch.equal(a, b) for a, b in zip(got[0], got[r]))
    assert any(g.abs().max() > 0 for g in grads[1])
    for a, b in zip(grads[1], grads[world]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7), (a - b).abs().max()


def test_a_held_out_check_that_overflows_stops_the_run_in_one_line(tmp_path):
    """Finite weights can still overflow the logits: the held-out check (rank 0 alone) raises
    FloatingPointError, and every rank stops together with one line."""
    run = make_run(tmp_path, "--eval-every", "1")

    def overflow(model, prompts, seed):
        raise FloatingPointError("non-finite logits while sampling")

    run.eval_reward = overflow
    with pytest.raises(UsageError, match="non-finite logits in the held-out check at step 1 of t"):
        drive(run)
    assert not os.path.exists(run.path)  # nothing written from weights that diverged


def test_a_run_stops_at_its_first_held_out_check_at_or_above_stop_at(tmp_path):
    """stop_at: the run ends at the first check (every --eval-every steps) at or above it, and its
    checkpoint is a finished one: --resume trains it no further, load_finished returns it; a
    --resume asking for another --stop-at is refused (it is another run)."""
    for stop_at, checks, steps in ((0.9, [0.5, 0.95, 1.0], 4), (0.0, [0.5, 0.95, 1.0, 1.0, 1.0], 10)):
        run = make_run(tmp_path / str(stop_at), "--eval-every", "2", "--stop-at", str(stop_at))
        run.stop_at, it = stop_at, iter(checks)
        run.eval_reward = lambda model, prompts, seed: next(it)
        assert len(drive(run)) == steps
        ck = torch.load(run.path, weights_only=False)
        assert (ck["step"], ck["total"], ck["converged"]) == (steps, 10, steps < 10)
        assert load_finished(run.path, run.cfg, run.env, None, "tiny", None) is not None
    again = make_run(tmp_path / "0.9", "--eval-every", "2", "--stop-at", "0.9", "--resume")
    assert drive(again) == [] and again.start == again.total
    with pytest.raises(UsageError, match="--stop-at 0.9 \\(this run: 0.0\\)"):
        make_run(tmp_path / "0.9", "--eval-every", "2", "--resume")


def test_ctrl_c_on_the_step_that_converges_still_stops_the_command(tmp_path):
    """Convergence ends the run; a Ctrl-C on that very step must still end the whole command."""
    run = make_run(tmp_path, "--eval-every", "1", "--stop-at", "0.5")
    run.stop_at, run.eval_reward = 0.5, lambda model, prompts, seed: 1.0

    def ctrl_c(run):
        run.stop_requested = True

    with pytest.raises(SystemExit) as e:
        drive(run, ctrl_c)
    assert e.value.code == 130 and torch.load(run.path, weights_only=False)["step"] == 1


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_the_learning_rate_follows_warmup_then_the_schedule(tmp_path, schedule):
    """--warmup steps rising linearly to the peak, then --lr-schedule; by hand."""
    run = make_run(tmp_path, "--warmup", "4", "--lr-schedule", schedule, total=12)
    lrs = [run.set_lr(step) for step in range(12)]
    assert lrs[:4] == pytest.approx([1e-3 * k / 4 for k in (1, 2, 3, 4)])
    if schedule == "constant":
        assert lrs[4:] == pytest.approx([1e-3] * 8)
    else:  # from the peak at step 4, half-way (0.55) at step 8, down towards 10% at the end
        assert lrs[4] == pytest.approx(1e-3) and lrs[8] == pytest.approx(0.55e-3) and lrs[-1] > 0.1e-3
    assert run.opt.param_groups[0]["lr"] == lrs[-1] and lr_factor(0, 10, "cosine", 0) == 1.0


def test_resume_refuses_another_learning_rate_or_schedule(tmp_path):
    """--resume continues a run with its own settings: another --lr, --lr-schedule or --warmup
    would silently change its schedule, so it is one line; more steps are allowed, fewer are not."""
    run = make_run(tmp_path)
    run.save(run.snapshot(3))
    for flags, said in ((["--lr", "0.5"], "--lr 0.0 (this run: 0.5)"),
                        (["--lr-schedule", "constant"], "--lr-schedule cosine (this run: constant)"),
                        (["--warmup", "10"], "--warmup 50 (this run: 10)")):
        with pytest.raises(UsageError, match=said.replace("(", "\\(").replace(")", "\\)")):
            make_run(tmp_path, "--resume", *flags)
    assert make_run(tmp_path, "--resume", "--steps", "700").start == 3
    with pytest.raises(UsageError, match="is a run of 10 steps: --resume may give it more, not 5"):
        make_run(tmp_path, "--resume", total=5)
