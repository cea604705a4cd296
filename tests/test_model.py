"""The GPT: padding changes nothing, KV-cache sampling equals full recompute, checkpoints."""
import os

import pytest
import torch

from data import Tokenizer, encode_prompts
from errors import UsageError
from model import SIZES, GPTConfig, load_checkpoint, make_model, response_logprobs, save_checkpoint

tok = Tokenizer()
PROMPTS = ["1,2;3=", "12,7,19;100=", "5=", "3,3,3;9="]  # different lengths in one batch


def model(seed=0, size="tiny"):
    return make_model(size, 32, tok.vocab_size, seed=seed).eval()


def test_padding_changes_nothing():
    m = model()
    prompt, valid = encode_prompts(tok, PROMPTS)
    batched = m(prompt, valid)
    for i, p in enumerate(PROMPTS):
        alone = m(*encode_prompts(tok, [p]))[0]
        assert torch.allclose(batched[i, valid[i]], alone, atol=1e-5)


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.7, 5), (0.0, None)])
def test_kv_cache_sampling_equals_full_recompute(temperature, top_k):
    m = model(size="small")
    prompt, valid = encode_prompts(tok, PROMPTS)
    outs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(3)
        outs.append(m.generate(prompt, valid, 12, tok.end, tok.pad, temperature=temperature, top_k=top_k,
                               generator=g, use_cache=use_cache))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_sampler_picks_from_fp32_logits_under_bf16_autocast(device):
    """On CUDA the sampler runs under bf16 autocast, while training scores tokens with fp32
    logits (kernels.py), so the sampler must use fp32 logits too: the policy sampled is the
    policy trained. Logits 1.000 and 1.001 are equal in bf16; greedy decoding must still pick
    the larger. Without a GPU, CPU autocast stands in for CUDA's."""
    m = model().to(device)
    d = m.cfg.n_embd
    with torch.no_grad():
        m.wte.weight.zero_()
        m.wte.weight[:, 0] = -1.0
        m.wte.weight[3, 0], m.wte.weight[7, 0] = 1.0, 1.001
    h = torch.zeros(1, 1, d, device=device)
    h[..., 0] = 1.0
    m.forward = lambda tokens, valid, cache=None, start=0, pos=None: h.expand(tokens.shape[0], tokens.shape[1], d)
    prompt, valid = encode_prompts(tok, ["1="], device)
    with torch.autocast(device, dtype=torch.bfloat16):
        resp, _ = m.generate(prompt, valid, 1, tok.end, tok.pad, temperature=0.0)
    assert resp[0, 0] == 7


def test_seeded_sampling_repeats_and_stops_at_end():
    m = model()
    prompt, valid = encode_prompts(tok, PROMPTS * 8)
    a = m.generate(prompt, valid, 10, tok.end, tok.pad, generator=torch.Generator().manual_seed(1))
    b = m.generate(prompt, valid, 10, tok.end, tok.pad, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0])
    resp, mask = a
    for r, msk in zip(resp, mask):
        n = int(msk.sum())
        assert msk[:n].all() and not msk[n:].any()  # real tokens are a prefix
        assert (r[n:] == tok.pad).all()
        ends = (r[:n] == tok.end).nonzero()
        assert len(ends) == 0 or (len(ends) == 1 and ends[0] == n - 1)  # end is the last real token


def test_response_logprobs_match_full_logits():
    m = model()
    prompt, valid = encode_prompts(tok, PROMPTS)
    resp, mask = m.generate(prompt, valid, 6, tok.end, tok.pad, generator=torch.Generator().manual_seed(0))
    lp = response_logprobs(m, prompt, valid, resp, mask)
    full = torch.log_softmax(m.logits(torch.cat([prompt, resp], 1), torch.cat([valid, mask], 1)), -1)
    P = prompt.shape[1]
    ref = full[:, P - 1:-1].gather(2, resp[..., None]).squeeze(2)
    assert torch.allclose(lp[mask], ref[mask], atol=1e-5) and (lp[~mask] == 0).all()


def test_sizes_and_config_errors():
    n = {name: make_model(name, 16, 22, seed=0).n_params() for name in SIZES}
    assert n["tiny"] < n["small"] < n["medium"] < n["large"]
    with pytest.raises(ValueError, match="not divisible"):
        GPTConfig(n_embd=10, n_head=3)
    with pytest.raises(ValueError, match="n_layer must be at least 1"):
        GPTConfig(n_layer=0)
    with pytest.raises(ValueError, match="exceeds block_size"):
        make_model("tiny", 4, 22, seed=0)(*encode_prompts(tok, ["12345="]))


def test_forward_reads_no_tensor_value_on_the_host(monkeypatch):
    """The block_size check uses shapes only: a forward (a whole batch, or one decoding step
    with the KV cache) never turns a tensor into a Python value, which on a GPU is a sync."""
    prompt, valid = encode_prompts(tok, PROMPTS)
    B, P = prompt.shape
    m = make_model("tiny", P, tok.vocab_size, seed=0).eval()  # exactly the batch's columns
    cache = [tuple(torch.zeros(B, m.cfg.n_head, P, m.cfg.n_embd // m.cfg.n_head) for _ in "kv")]

    def refuse(*a):
        raise AssertionError("a tensor value was read on the host")

    with monkeypatch.context() as patch:
        for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist"):
            patch.setattr(torch.Tensor, name, refuse)
        m(prompt, valid)
        m(prompt[:, :-1], valid[:, :-1], cache, 0)
        m(prompt[:, -1:], valid, cache, P - 1, pos=valid.sum(1, keepdim=True) - 1)  # a decoding step
    with pytest.raises(ValueError, match=rf"sequence of {P + 1} columns .* exceeds block_size {P}"):
        m(torch.cat([prompt, prompt[:, -1:]], 1), torch.cat([valid, valid[:, -1:]], 1))


def test_checkpoint_atomic_and_refuses_mismatch(tmp_path):
    m = model()
    path = str(tmp_path / "m.pt")
    save_checkpoint(path, m, task="mirror")
    assert os.listdir(tmp_path) == ["m.pt"]  # no temporary file left behind
    loaded, ck = load_checkpoint(path, expect=dict(task="mirror"))
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(ValueError, match="made for task='mirror'"):
        load_checkpoint(path, expect=dict(task="countdown"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(str(bad))
    with pytest.raises(ValueError, match="no such checkpoint"):
        load_checkpoint(str(tmp_path / "missing.pt"))


def test_checkpoint_with_unknown_model_args_says_train_again(tmp_path):
    """A checkpoint whose model_args has a field GPTConfig lacks (dropout) gets one line."""
    path = str(tmp_path / "old.pt")
    save_checkpoint(path, model())
    ck = torch.load(path, weights_only=True)
    ck["model_args"]["dropout"] = 0.0
    torch.save(ck, path)
    with pytest.raises(UsageError) as e:
        load_checkpoint(path)
    assert str(e.value) == f"{path}: made by an older version of this code (model_args has 'dropout'); train it again"


class Payload:
    """Any pickled object that is not a tensor or plain data: unpickling it could run code."""


def test_checkpoint_loads_only_tensors_and_plain_data(tmp_path):
    """load_checkpoint uses torch.load(weights_only=True): a checkpoint is data, never code."""
    path = str(tmp_path / "m.pt")
    save_checkpoint(path, model(), step=3, config=dict(lr=0.1), rng=[torch.Generator().get_state()])
    assert load_checkpoint(path)[1]["step"] == 3  # what run checkpoints hold loads
    save_checkpoint(path, model(), extra=Payload())
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(path)
