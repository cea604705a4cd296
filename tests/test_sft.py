"""Offline IL's loss is cross-entropy on the expert's tokens, and prompts get no gradient."""
import contextlib

import torch
import torch.nn.functional as F

import sft
from data import Tokenizer, encode_prompts, encode_responses
from kernels import IGNORE
from model import make_model, response_hidden
from config import parse_args

tok = Tokenizer()


class RecordingRun:
    """Stands in for runtime.Run: one step, records the loss instead of stepping."""
    world, rank, start, total = 1, 0, 0, 1

    def __init__(self, model):
        self.model, self.losses = model, []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def set_lr(self, step):
        return 0.0

    def held_out_check(self, step):
        return False

    def checkpoint(self, step, converged):
        return False

    def autocast(self):
        return contextlib.nullcontext()

    def global_sum(self, x):
        return x

    def optimize(self, loss):
        self.losses.append(loss)
        return 0.0

    def log(self, step, **metrics):
        pass


def batch():
    prompts, answers = ["31415=", "1,2;3=", "12="], ["31415", "1+2", "21"]
    prompt, pvalid = encode_prompts(tok, prompts)
    resp, rmask = encode_responses(tok, answers)
    return dict(prompt=prompt, prompt_valid=pvalid, response=resp, response_mask=rmask)


def test_sft_loss_is_cross_entropy_on_expert_tokens():
    student, data = make_model("tiny", 16, tok.vocab_size, seed=0), batch()
    run = RecordingRun(student)
    sft.train(run, data, parse_args(["--batch-size", "3"]))
    P = data["prompt"].shape[1]
    tokens = torch.cat([data["prompt"], data["response"]], 1)
    logits = student.logits(tokens, torch.cat([data["prompt_valid"], data["response_mask"]], 1))[:, P - 1:-1]
    targets = torch.where(data["response_mask"], data["response"], IGNORE)
    ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    assert torch.allclose(run.losses[0], ref, atol=1e-6)


def test_prompt_positions_get_no_direct_gradient():
    """Only the states that predict response tokens carry a loss: the hidden states at
    prompt positions (but the last, which predicts the first answer token) get zero gradient
    from the loss head; their only influence is through attention, as it should be."""
    student, data = make_model("tiny", 16, tok.vocab_size, seed=0), batch()
    P = data["prompt"].shape[1]
    h_full = student(torch.cat([data["prompt"], data["response"]], 1),
                     torch.cat([data["prompt_valid"], data["response_mask"]], 1))
    h_full.retain_grad()
    h = h_full[:, P - 1:-1]
    targets = torch.where(data["response_mask"], data["response"], IGNORE)
    from kernels import token_logprobs
    (-token_logprobs(h.flatten(0, 1), student.unembedding, targets.flatten())).sum().backward()
    assert h_full.grad[:, :P - 1].abs().max() == 0 and h_full.grad[:, P - 1].abs().min() > 0
    # padding after the end token too
    pad_cols = ~data["response_mask"][:, 1:]
    assert h_full.grad[:, P:-1][pad_cols].abs().max() == 0
    assert torch.allclose(response_hidden(student, data["prompt"], data["prompt_valid"], data["response"],
                                          data["response_mask"]), h.detach())


def test_word_level_distillation_scores_at_the_sampling_temperature():
    """--sft-loss forward_kl at --temperature T: the expert sampled from softmax(z / T), so the
    KL it distils is KL(softmax(z_e / T) || softmax(z_s / T)), not the one at T=1.
    Oracle: float64 log_softmax of the full logits."""
    student, expert, data = make_model("tiny", 16, tok.vocab_size, seed=0), make_model("tiny", 16, tok.vocab_size, seed=1), batch()
    mask = data["response_mask"]
    ze = expert.logits(torch.cat([data["prompt"], data["response"]], 1),
                       torch.cat([data["prompt_valid"], mask], 1))[:, data["prompt"].shape[1] - 1:-1].detach()
    zs = student.logits(torch.cat([data["prompt"], data["response"]], 1),
                        torch.cat([data["prompt_valid"], mask], 1))[:, data["prompt"].shape[1] - 1:-1]
    T = 0.5
    lp, lq = torch.log_softmax(ze.double() / T, -1), torch.log_softmax(zs.double() / T, -1)
    ref = (lp.exp() * (lp - lq)).sum(-1) * mask
    run = RecordingRun(student)
    cfg = parse_args(["--temperature", str(T)])
    got = sft.word_level_loss(run, dict(data, expert_logits=ze), cfg)
    assert torch.allclose(got.double(), ref, atol=1e-5)
    assert not torch.allclose(got.double(), ((lambda a, b: (a.exp() * (a - b)).sum(-1))(
        torch.log_softmax(ze.double(), -1), torch.log_softmax(zs.double(), -1)) * mask), atol=1e-3)  # T=1 differs
