"""Tests for sdpg.py and verifiers.py. CPU only, no network: models and tokenizers are built in code.

Each maths test compares against an independent reference: torch.distributions, a naive loop,
a closed-form gradient, or the same computation done another way.

    python -m pytest -q test_sdpg.py
"""

import ast
import contextlib
import copy
import dataclasses
import doctest
import json
import math
import os
import pathlib
import random
import re
import statistics
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import sdpg
import verifiers
from verifiers import extract_answer, gsm8k_gold, is_equiv, math_reward

HERE = os.path.dirname(os.path.abspath(__file__))
# Subprocesses are given this long against a hang only: each takes seconds to a minute, more on a busy machine.
HANG_TIMEOUT = 900
sys.path.insert(0, os.path.join(HERE, "benchmarks"))  # the benchmark scripts' functions are tested too


@pytest.fixture(scope="module")
def tiny():
    tok = sdpg.build_char_tokenizer()
    return sdpg.build_tiny_model(tok, seed=0), tok


def _models(model, tok, reference=None, teacher=None, stop_ids=None):
    """The Models of a run on the CPU: the policy samples itself, and teaches unless a teacher is given."""
    return sdpg.Models(model, reference, model if teacher is None else teacher, model, tok,
                       [tok.eos_token_id] if stop_ids is None else stop_ids)


# -----------------------------------------------------------------------------
# The docstring examples are part of the documentation: run them so they cannot drift.


@pytest.mark.parametrize("module", [sdpg, verifiers])
def test_doctests(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


# -----------------------------------------------------------------------------
# Exact full-vocabulary reverse KL (Eq. 3.2)


def test_reverse_kl_matches_torch_distributions():
    torch.manual_seed(0)
    s, t = torch.randn(3, 5, 50) * 3, torch.randn(3, 5, 50) * 3
    ours = sdpg.full_vocab_reverse_kl(s, t)
    ref = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=s),
                                            torch.distributions.Categorical(logits=t))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    # and NOT the other direction, which is what F.kl_div(log p, q) would give
    forward = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=t),
                                                torch.distributions.Categorical(logits=s))
    assert not torch.allclose(ours, forward, atol=1e-3)


def test_reverse_kl_is_float32_and_teacher_gets_no_gradient():
    s = torch.randn(4, 30, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(4, 30, requires_grad=True)
    kl = sdpg.full_vocab_reverse_kl(s, t)
    assert kl.dtype == torch.float32
    kl.sum().backward()
    assert s.grad is not None and t.grad is None


def test_proposition_3_1_identity():
    """On a fixed prefix, grad of KL(p || SG q) equals grad of -E_{a~p}[A_dist(a) log p(a)] with
    A_dist(a) = SG[KL - log(p(a)/q(a))], and E_{a~p}[A_dist] = 0. Both sides use our KL: the gradient
    guards its derivative, the zero mean its value (a KL off by a constant or a factor would not centre
    A_dist; a gradient-only check would miss a constant)."""
    torch.manual_seed(1)
    s = torch.randn(7, 40, dtype=torch.float64, requires_grad=True)
    t = torch.randn(7, 40, dtype=torch.float64)
    ours = sdpg.full_vocab_reverse_kl(s, t)  # (7,)
    (g_kl,) = torch.autograd.grad(ours.sum(), s)
    logp, logq = F.log_softmax(s, -1), F.log_softmax(t, -1)
    A_dist = (ours[:, None] - (logp - logq)).detach()  # (7, 40)
    surrogate = -(logp.exp().detach() * A_dist * logp).sum()  # expectation over a ~ p, exact
    (g_pg,) = torch.autograd.grad(surrogate, s)
    torch.testing.assert_close(g_kl, g_pg, rtol=1e-4, atol=1e-6)  # our KL runs in float32
    torch.testing.assert_close((logp.exp() * A_dist).sum(-1), torch.zeros(7, dtype=torch.float64), atol=1e-5, rtol=0)


def test_chunked_terms_equal_unchunked_values_and_gradients():
    torch.manual_seed(2)
    H, V, M, T = 16, 97, 23, 0.7
    head = torch.nn.Linear(H, V, bias=False)
    hs0, ht = torch.randn(M, H), torch.randn(M, H)
    y = torch.randint(0, V, (M,))

    def run(chunk):
        head.zero_grad()
        hs = hs0.clone().requires_grad_(True)
        logp, kl, ent = sdpg.chunked_token_terms(hs, ht, y, head, T, chunk)
        (logp * torch.linspace(-1, 1, M) + kl).sum().backward()
        return logp.detach(), kl.detach(), ent, hs.grad.clone(), head.weight.grad.clone()

    whole, chunked = run(M), run(5)
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=5e-5)
    # and against a naive per-token loop over the vocabulary
    logits_s, logits_t = head(hs0) / T, head(ht) / T
    for i in range(M):
        p, q = logits_s[i].softmax(-1), logits_t[i].softmax(-1)
        naive_kl = sum(p[a] * (p[a].log() - q[a].log()) for a in range(V))
        assert math.isclose(whole[1][i].item(), naive_kl.item(), rel_tol=1e-4, abs_tol=1e-6)
        assert math.isclose(whole[0][i].item(), p[y[i]].log().item(), rel_tol=1e-5)
        assert math.isclose(whole[2][i].item(), -(p * p.log()).sum().item(), rel_tol=1e-5)


@pytest.mark.parametrize("M", [1, 4, 5, 9, 13])
def test_chunked_terms_keep_a_partial_last_chunk(M):
    """Guards against the last chunk dropped or cut short when the number of response tokens is not a
    multiple of --chunk-size (here 4): M = 1, 5, 9, 13 leave one token in the last chunk, M = 4 none.
    Values and gradients must equal one chunk over all M tokens, token by token."""
    torch.manual_seed(M)
    H, V = 8, 31
    head = torch.nn.Linear(H, V, bias=False)
    hs0, ht, y = torch.randn(M, H), torch.randn(M, H), torch.randint(0, V, (M,))

    def run(chunk):
        head.zero_grad()
        hs = hs0.clone().requires_grad_(True)
        logp, kl, ent = sdpg.chunked_token_terms(hs, ht, y, head, 1.0, chunk)
        (logp * torch.arange(1.0, M + 1) + kl).sum().backward()
        return logp.detach(), kl.detach(), ent, hs.grad.clone(), head.weight.grad.clone()

    for whole, chunked in zip(run(M), run(4), strict=True):
        assert whole.shape == chunked.shape
        torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    assert run(4)[3][-1].abs().sum() > 0  # the last token's own gradient is there


# -----------------------------------------------------------------------------
# Advantages, gate, normalisation, schedule


def test_group_advantages_worked_example_and_identical_groups():
    A = sdpg.group_advantages(torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 1]), group_size=4)
    expected = torch.tensor([1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0, 0.5, 0.5, -1.5, 0.5])
    torch.testing.assert_close(A, expected, atol=1e-5, rtol=0)
    # independent reference: a loop with statistics.stdev (Bessel-corrected)
    r = [random.Random(3).random() for _ in range(12)]
    A = sdpg.group_advantages(torch.tensor(r), group_size=6)
    for g in range(2):
        grp = r[6 * g:6 * g + 6]
        for j, x in enumerate(grp):
            want = (x - statistics.mean(grp)) / (statistics.stdev(grp) + 1e-6)
            assert math.isclose(A[6 * g + j].item(), want, rel_tol=1e-5)
    with pytest.raises(ValueError):
        sdpg.group_advantages(torch.tensor([1.0, 0.0]), group_size=1)


def test_token_weights_normalise_per_group_and_average_over_prompts():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    w = sdpg.token_weights(mask, group_size=2)
    # group 0 has 4 tokens, group 1 has 6; 2 groups
    torch.testing.assert_close(w[0], torch.tensor([1, 1, 1, 0]) / 4 / 2)
    torch.testing.assert_close(w[3], torch.tensor([1, 1, 0, 0]) / 6 / 2)
    assert math.isclose(w.sum().item(), 1.0, rel_tol=1e-6)


def test_rows_that_are_not_whole_groups_get_one_clear_error():
    """N = 6 rows with G = 4: both functions name the two numbers instead of failing in a reshape (guards
    against the bare view() error, which says nothing of groups)."""
    message = r"^the number of rows N \(6\) must be a multiple of the group size G \(4\)$"
    with pytest.raises(ValueError, match=message):
        sdpg.group_advantages(torch.zeros(6), group_size=4)
    with pytest.raises(ValueError, match=message):
        sdpg.token_weights(torch.ones(6, 3), group_size=4)
    # whole groups still pass, and token-mean, which needs no groups, is not checked
    assert sdpg.group_advantages(torch.zeros(8), group_size=4).shape == (8,)
    assert sdpg.token_weights(torch.ones(6, 3), group_size=4, agg="token-mean").sum().item() == pytest.approx(1.0)


def test_positive_advantage_gate_and_loss_normaliser():
    torch.manual_seed(4)
    n, L = 4, 3
    mask = torch.ones(n, L)
    logp = torch.randn(n, L)
    kl = torch.rand(n, L, requires_grad=True)
    A = torch.tensor([1.5, -0.5, 0.0, -1.0])
    w = sdpg.token_weights(mask, group_size=4)
    loss = sdpg.sdpg_loss(logp, logp.detach(), kl, None, A, w, beta_k=0.3, alpha=0.0, kl_mode="urkl")
    loss.backward()
    # d loss / d kl = beta * m_i / (all tokens of the group), m_i = 1[A_i > 0]
    expected = 0.3 * (A > 0).float()[:, None].expand(n, L) / (n * L)
    torch.testing.assert_close(kl.grad, expected)


def test_on_policy_outcome_term_is_reinforce():
    torch.manual_seed(5)
    logp = torch.randn(6, 4, requires_grad=True)
    A = torch.randn(6, 1)
    loss = sdpg.policy_loss(logp, logp.detach(), A, 0.2, 0.28, 10.0).sum()
    (g,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(g, -A.expand(6, 4))


def test_dual_clip_values():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([2.0, 0.5, 20.0, 2.0]))  # rho = 2, 0.5, 20, 2
    A = torch.tensor([1.0, 1.0, -1.0, -1.0])
    out = sdpg.policy_loss(logp, old, A, 0.2, 0.28, 10.0)
    # A>0, rho=2: max(-2, -1.28) = -1.28; A>0, rho=.5: max(-.5, -.8) = -.5
    # A<0, rho=20: min(max(20, 1.28), 10) = 10; A<0, rho=2: min(max(2, 1.28), 10) = 2
    torch.testing.assert_close(out, torch.tensor([-1.28, -0.5, 10.0, 2.0]))


def test_beta_schedule_edges():
    f = sdpg.beta_schedule
    assert f(0, 400, 1e-3, 50, 350) == 0.0
    assert math.isclose(f(50, 400, 1e-3, 50, 350), 1e-3 * 350 / 350 * 1.0)
    assert math.isclose(f(51, 400, 1e-3, 50, 350), 1e-3 * 349 / 350)  # windows overlap: peak < beta_base
    assert f(400, 400, 1e-3, 50, 350) == 0.0
    assert f(500, 400, 1e-3, 50, 350) == 0.0
    assert f(1, 10, 0.5, 0, 0) == 0.5  # both windows switched off
    assert math.isclose(f(5, 10, 0.5, 10, 0), 0.25)


@pytest.mark.parametrize("mode", ["urkl", "ufkl", "fkl", "rkl"])
def test_reference_kl_gradient_matches_closed_form(mode):
    """SDPG_MATH.md section 6: d f / d log p, with log w = log p - log pi_ref. Guards against a wrong
    surrogate for a mode and against a reference that is not a constant (gradient flowing into it)."""
    closed_form = {"urkl": lambda lw: lw, "ufkl": lambda lw: 1 - torch.exp(-lw),
                   "fkl": lambda lw: -torch.exp(-lw), "rkl": lambda lw: lw + 1}[mode]
    torch.manual_seed(6)
    logp = torch.randn(20, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(20, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(sdpg.reference_kl(logp, ref, mode).sum(), logp)
    torch.testing.assert_close(g, closed_form((logp - ref).detach()))
    # ref_logp is a constant: no gradient reaches it (a live reference would be pulled towards the policy)
    (g_ref,) = torch.autograd.grad(sdpg.reference_kl(logp, ref, mode).sum(), ref, allow_unused=True)
    assert g_ref is None
    with pytest.raises(ValueError):
        sdpg.reference_kl(logp, ref, "kl")


def test_micro_batches_sum_to_the_whole_batch():
    torch.manual_seed(7)
    N, L = 8, 5
    mask = (torch.rand(N, L) > 0.3).long()
    mask[:, 0] = 1
    logp = (-torch.rand(N, L) * mask).requires_grad_(True)
    kl, ref = torch.rand(N, L) * mask, -torch.rand(N, L) * mask
    A = sdpg.group_advantages(torch.randint(0, 2, (N,)).float(), 4)
    w = sdpg.token_weights(mask, 4)
    args = dict(beta_k=0.1, alpha=0.2, kl_mode="ufkl")
    whole = sdpg.sdpg_loss(logp, logp.detach(), kl, ref, A, w, **args)
    parts = sum(sdpg.sdpg_loss(logp[i:i + 3], logp[i:i + 3].detach(), kl[i:i + 3], ref[i:i + 3], A[i:i + 3],
                               w[i:i + 3], **args) for i in range(0, N, 3))
    torch.testing.assert_close(whole, parts)


# -----------------------------------------------------------------------------
# Sampling, padding and the teacher's view


def test_response_mask_when_pad_equals_eos():
    eos = 1
    ids = torch.tensor([[7, 8, eos, eos, eos], [eos, eos, eos, eos, eos], [5, 5, 5, 5, 5]])
    mask = sdpg.response_mask_from_stops(ids, [eos])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    # several stop ids: the first of any of them ends the answer
    assert sdpg.response_mask_from_stops(torch.tensor([[4, 9, 3, 9]]), [3, 9]).tolist() == [[1, 1, 0, 0]]


def test_decoding_uses_only_each_answers_own_tokens():
    tok = sdpg.build_char_tokenizer()
    ids = lambda text: tok(text, add_special_tokens=False).input_ids  # noqa: E731
    # after the stop token the rows hold ordinary characters ("!"), as generate()'s padding or a
    # multiplication by the mask (token 0 is "!" in Qwen's vocabulary) would leave them
    rows = torch.tensor([ids("18") + [tok.eos_token_id] + ids("!!"), ids("7!!!!")])
    mask = sdpg.response_mask_from_stops(rows, [tok.eos_token_id])
    mask[1, 1:] = 0
    assert sdpg.decode_responses(tok, rows, mask) == ["18", "7"]


def _logp_alone(model, prompt, response):
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1]
    return F.log_softmax(logits.float(), -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def test_left_padded_batch_equals_each_sequence_alone(tiny):
    model, tok = tiny
    model.eval()
    prompts = [tok("q: 12\na: ").input_ids, tok("a much longer prompt: 345\na: ").input_ids]
    responses = [[5, 6, 7, tok.eos_token_id], [8, tok.eos_token_id, tok.pad_token_id, tok.pad_token_id]]
    ids, mask = sdpg.left_pad(prompts, tok.pad_token_id, torch.device("cpu"))
    resp = torch.tensor(responses)
    rmask = sdpg.response_mask_from_stops(resp, [tok.eos_token_id])
    with torch.no_grad():
        h = sdpg.response_hidden_states(model, ids, mask, resp, rmask)  # (2, 4, H)
        logp = sdpg.chunked_token_terms(h[rmask.bool()], None, resp[rmask.bool()], model.lm_head, 1.0, 3).logp
        logp = sdpg.scatter_tokens(logp, rmask)
        for i in range(2):
            n = int(rmask[i].sum())
            torch.testing.assert_close(logp[i, :n], _logp_alone(model, prompts[i], responses[i][:n]),
                                       rtol=1e-4, atol=1e-5)


def test_scored_logprobs_equal_the_sampling_distribution(tiny):
    # generate()'s processed scores (temperature applied) must give the same log-probs as our
    # scoring path: otherwise the "on-policy" gradient is taken on another distribution.
    model, tok = tiny
    model.eval()
    T = 0.7
    prompts = [tok("q: 12\na: ").input_ids, tok("q: 3\na: ").input_ids]
    ids, mask = sdpg.left_pad(prompts, tok.pad_token_id, torch.device("cpu"))
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=True, temperature=T,
                         top_k=0, top_p=1.0, eos_token_id=[tok.eos_token_id], pad_token_id=tok.pad_token_id,
                         output_scores=True, return_dict_in_generate=True)
    resp = out.sequences[:, ids.shape[1]:]
    rmask = sdpg.response_mask_from_stops(resp, [tok.eos_token_id])
    gen_logp = torch.stack([F.log_softmax(s, -1) for s in out.scores], 1).gather(-1, resp[..., None]).squeeze(-1)
    with torch.no_grad():
        h = sdpg.response_hidden_states(model, ids, mask, resp, rmask)
        logp = sdpg.chunked_token_terms(h[rmask.bool()], None, resp[rmask.bool()], model.lm_head, T, 4).logp
    torch.testing.assert_close(sdpg.scatter_tokens(logp, rmask), gen_logp * rmask, rtol=1e-4, atol=1e-5)


def _chat_tokenizer():
    """The character tokenizer with a chat template and without its mark: it takes the default templates."""
    tok = sdpg.build_char_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    del tok.init_kwargs[sdpg.CHAR_TOKENIZER_MARK]
    return tok


def test_teacher_scores_exactly_the_sampled_ids():
    tok = _chat_tokenizer()
    model = sdpg.build_tiny_model(tok, seed=1)
    args = sdpg.parse_args(["--model", "tiny", "--group-size", "3", "--max-new-tokens", "6"])
    examples = sdpg.toy_examples(2, seed=0)
    rb = sdpg.collect_rollouts(_models(model, tok), examples, args)
    # both prompts went through the chat template, the teacher's with the privileged context
    assert tok.decode(rb.prompt_ids[0][rb.prompt_mask[0].bool()]).startswith("user: ")
    teacher_text = tok.decode(rb.teacher_ids[0][rb.teacher_mask[0].bool()])
    assert "\nfinal answer: " + examples[0]["answer"] in teacher_text and teacher_text.endswith("assistant: ")
    # the teacher's hidden states at response positions are those of teacher prompt + the SAME ids, alone
    with torch.no_grad():
        h = sdpg.response_hidden_states(model, rb.teacher_ids, rb.teacher_mask, rb.response_ids, rb.response_mask)
        for i in range(rb.response_ids.shape[0]):
            n = int(rb.response_mask[i].sum())
            teacher_prompt = rb.teacher_ids[i][rb.teacher_mask[i].bool()].tolist()
            sampled = rb.response_ids[i, :n].tolist()
            torch.testing.assert_close(h[i, :n], _hidden_alone(model, teacher_prompt, sampled), rtol=1e-4, atol=1e-5)


def _hidden_alone(model, prompt, response):
    ids = torch.tensor([prompt + response])
    return model.base_model(input_ids=ids).last_hidden_state[0, len(prompt) - 1:-1]


# -----------------------------------------------------------------------------
# The decoding loop (generate): the same answers as transformers' generate, exact sampling


SHARED_DATA = os.path.join(HERE, "..", "shared", "data")  # real data beside the project; absent in a user's clone


def _decoder_model(config_class, vocab=97, **extra):
    """A small random decoder with weights large enough that greedy answers vary from token to token."""
    from transformers import AutoModelForCausalLM

    settings = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                    initializer_range=0.3, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    config = config_class(**{**settings, **extra})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).eval()


def _random_prompts(lengths, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]
    return sdpg.left_pad(prompts, 0, torch.device("cpu"))


@contextlib.contextmanager
def _one_thread():
    """torch on one thread inside: a tiny model decodes up to 100x slower when its threads compete for the
    cores of a busy machine (measured on 2 cores: 6.5 s against 0.03 s for 30 tokens of 4 rows)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _assert_same_answers(model, ids, mask, max_new_tokens, stop_ids, pad_id):
    ours, ours_mask = sdpg.generate(model, ids, mask, max_new_tokens, 0.0, 1.0, stop_ids, pad_id)
    theirs, theirs_mask = sdpg.hf_generate(model, ids, mask, max_new_tokens, 0.0, 1.0, stop_ids, pad_id)
    assert torch.equal(ours, theirs) and torch.equal(ours_mask, theirs_mask)
    return ours, ours_mask


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3", "mistral"])
def test_greedy_answers_equal_transformers_generate_on_left_padded_prompts(arch):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    config_class, extra = {"qwen2": (Qwen2Config, {}), "llama": (LlamaConfig, {}),
                           "qwen3": (Qwen3Config, dict(head_dim=16)),  # Qwen3: per-head q/k norms
                           "mistral": (MistralConfig, dict(sliding_window=None))}[arch]
    model = _decoder_model(config_class, **extra)
    assert sdpg.fast_decoding_unsupported(model) is None
    ids, mask = _random_prompts([3, 11, 7, 1])  # left padding of 0 to 10 tokens
    answers, answer_mask = _assert_same_answers(model, ids, mask, 40, stop_ids=[1, 5], pad_id=0)
    assert answers.shape == (4, 40) and len(set(answers.flatten().tolist())) > 20  # a real test, not one token
    lengths = answer_mask.sum(1).tolist()
    assert min(lengths) < 40 and max(lengths) == 40  # some rows stop early, some run to the end


def test_greedy_answers_with_the_real_qwen_tokenizer_and_chat_template():
    path = os.path.join(SHARED_DATA, "qwen2.5-tokenizer")
    if not os.path.isdir(path):
        pytest.skip("needs ../shared/data/qwen2.5-tokenizer (the project's shared data, absent in a user's clone)")
    from transformers import AutoTokenizer, Qwen2Config

    tok = AutoTokenizer.from_pretrained(path)
    model = _decoder_model(Qwen2Config, vocab=151936, initializer_range=0.1)  # Qwen2.5's vocabulary, tiny layers
    questions = ["What is 2 + 2?", "Natalia sold clips to 48 of her friends in April, and then she sold half as "
                 "many clips in May. How many clips did Natalia sell altogether in April and May?", "1"]
    ids, mask = sdpg.left_pad([sdpg.encode_prompt(tok, q) for q in questions], tok.pad_token_id, torch.device("cpu"))
    assert mask.sum(1).tolist()[1] > mask.sum(1).tolist()[0] > mask.sum(1).tolist()[2]  # three prompt lengths
    stop_ids = sdpg.stop_token_ids(model, tok)
    assert tok.convert_tokens_to_ids("<|im_end|>") in stop_ids
    _assert_same_answers(model, ids, mask, 24, stop_ids, tok.pad_token_id)


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_sampled_tokens_follow_the_softmax_at_the_temperature(temperature):
    """A chi-square test of 6,000 first tokens against softmax(logits / T); a sampler that ignored the
    temperature (or sampled from another distribution) fails it."""
    from transformers import Qwen2Config

    model = _decoder_model(Qwen2Config, vocab=40)
    with torch.no_grad():
        model.model.norm.weight.mul_(3.0)  # sharper logits, so that T = 0.7 and T = 1 differ clearly
    ids, mask = _random_prompts([5], vocab=40)
    logits = model(input_ids=ids, attention_mask=mask).logits[0, -1].detach()  # (V,)
    torch.manual_seed(0)
    n = 6000
    answers, _ = sdpg.generate(model, ids.expand(n, -1), mask.expand(n, -1), 1, temperature, 1.0, [1], 0)
    counts = torch.bincount(answers[:, 0], minlength=logits.shape[0]).double()  # (V,)

    def chi_square(probs):
        expected = n * probs.double()
        big = expected >= 5  # pool the rare tokens into one bin, as the test requires
        obs = torch.cat([counts[big], counts[~big].sum()[None]])
        exp = torch.cat([expected[big], expected[~big].sum()[None]])
        stat = ((obs - exp) ** 2 / exp).sum().item()
        k = len(obs) - 1  # degrees of freedom; 99.9% point by the Wilson-Hilferty approximation
        return stat, k * (1 - 2 / (9 * k) + 3.09 * math.sqrt(2 / (9 * k))) ** 3

    stat, limit = chi_square(F.softmax(logits / temperature, -1))
    assert stat < limit, (stat, limit)
    other = 1.0 if temperature != 1.0 else 0.7
    stat, limit = chi_square(F.softmax(logits / other, -1))
    assert stat > limit, (stat, limit)  # the test can tell the two temperatures apart


def test_rows_stop_at_their_first_stop_token_and_pad_after_it():
    from transformers import LlamaConfig

    model = _decoder_model(LlamaConfig)
    ids, mask = _random_prompts([4, 9, 2, 6, 3], seed=1)
    free, _ = sdpg.generate(model, ids, mask, 50, 0.0, 1.0, stop_ids=[97], pad_id=0)  # 97: not in the vocabulary
    assert free.shape[1] == 50  # no row stops: the loop runs to max_new_tokens
    stops = [free[0, 5].item(), free[2, 40].item()]  # tokens that rows 0 and 2 write
    answers, answer_mask = _assert_same_answers(model, ids, mask, 50, stops, pad_id=0)
    torch.testing.assert_close(answer_mask, sdpg.response_mask_from_stops(answers, stops))
    for row, m in zip(answers, answer_mask):
        n = int(m.sum())
        assert row[n - 1].item() in stops or n == answers.shape[1]  # ends at its first stop token
        assert all(t not in stops for t in row[:n - 1].tolist()) and (row[n:] == 0).all()
    # every row stops early: the answers are as long as the longest one, as transformers' generate gives them
    answers, answer_mask = _assert_same_answers(model, ids, mask, 50, sorted(set(free[:, 3].tolist())), pad_id=0)
    assert answers.shape[1] == 4 and answer_mask.sum(1).max() == 4


def test_the_next_call_decodes_with_weights_changed_in_place():
    from transformers import Qwen2Config

    model = _decoder_model(Qwen2Config)
    ids, mask = _random_prompts([6, 3, 8])
    before, _ = _assert_same_answers(model, ids, mask, 20, [1], 0)
    with torch.no_grad():  # what an optimiser step and refresh_sampler do: new values, the same tensors
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    after, _ = _assert_same_answers(model, ids, mask, 20, [1], 0)
    assert not torch.equal(before, after)


def test_batch_size_and_prompt_length_may_change_between_calls():
    from transformers import Qwen2Config

    model = _decoder_model(Qwen2Config)
    for lengths in ([5, 2, 7, 3, 4], [6, 1, 2], [60, 2, 9, 3, 4]):  # smaller batch, then longer prompts (more columns)
        ids, mask = _random_prompts(lengths, seed=len(lengths))
        _assert_same_answers(model, ids, mask, 30, [1], 0)
    (state,) = [s for s in sdpg._DECODE_STATES[model].values() if s.ids.shape[0] == 5]
    assert state.ids.shape[1] == 128  # grown once for 60 + 30 columns, rounded up to a multiple of 64


def test_decode_step_never_waits_on_the_host():
    """A CUDA graph can only record a step with no .item(), .tolist() or branch on a tensor's value.
    torch.compile with fullgraph=True refuses exactly those, so tracing the step checks it on the CPU."""
    from transformers import Qwen2Config

    model = _decoder_model(Qwen2Config)
    state = sdpg.decode_state_for(model, 3, 64, 0.7, [1], 0)
    step = torch.compile(sdpg.decode_step, fullgraph=True, backend="eager")
    with torch.no_grad():
        step(model, state, 0.7)
    assert state.column.item() == 1 and state.position.tolist() == [1, 1, 1]


def test_top_p_and_unsupported_models_fall_back_to_transformers_generate():
    from transformers import GPT2Config, Qwen2Config

    ids, mask = _random_prompts([4, 2])
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="top_p below 1"):
        answers, _ = sdpg.generate(_decoder_model(Qwen2Config), ids, mask, 5, 1.0, 0.9, [1], 0)
    assert answers.shape[0] == 2
    gpt2 = _decoder_model(lambda **kw: GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, vocab_size=97,
                                                  pad_token_id=0, eos_token_id=1, bos_token_id=None))
    assert "gpt2" in sdpg.fast_decoding_unsupported(gpt2)
    with pytest.warns(UserWarning, match="model type 'gpt2'"):
        sdpg.generate(gpt2, ids, mask, 5, 0.0, 1.0, [1], 0)


def test_transformers_generate_ignores_the_models_generation_config():
    """A generation_config as a Hub model may ship it (a repetition penalty, top_k, min_p, a minimum length that
    keeps the stop tokens out...) changes nothing in hf_generate: greedy answers equal our own decoding loop's,
    sampled ones equal, draw for draw, those of the same weights with a plain config, and the model's config
    is left as it was. Guards against settings that hf_generate does not pass being taken from the model's
    config, which would draw the answers from another distribution than softmax(logits / T)."""
    from transformers import GenerationConfig, Qwen2Config

    clean = _decoder_model(Qwen2Config)
    harmful = copy.deepcopy(clean)
    harmful.generation_config = GenerationConfig(repetition_penalty=5.0, no_repeat_ngram_size=1, top_k=1, min_p=0.9,
                                                 min_new_tokens=30, do_sample=True, temperature=0.1)
    kept = harmful.generation_config
    ids, mask = _random_prompts([3, 11, 7, 1])
    stops = [1, 5]
    # the settings do matter: transformers' generate, given only what hf_generate names, inherits them
    with _one_thread():
        inherited = harmful.generate(input_ids=ids, attention_mask=mask, generation_config=GenerationConfig(
            max_new_tokens=30, eos_token_id=stops, pad_token_id=0, do_sample=False))[:, ids.shape[1]:]  # (N, 30)
        ours, ours_mask = sdpg.generate(clean, ids, mask, 30, 0.0, 1.0, stops, 0)  # our loop, the reference
        theirs, theirs_mask = sdpg.hf_generate(harmful, ids, mask, 30, 0.0, 1.0, stops, 0)
    assert ours_mask.sum(1).min() < 30 and not torch.equal(inherited[:, :ours.shape[1]], ours)
    assert torch.equal(theirs, ours) and torch.equal(theirs_mask, ours_mask)
    for top_p in (1.0, 0.9):  # full softmax, and the nucleus
        draws = []
        for model in (clean, harmful):
            torch.manual_seed(0)
            with _one_thread():
                draws.append(sdpg.hf_generate(model, ids.repeat(8, 1), mask.repeat(8, 1), 30, 1.0, top_p, stops, 0))
        assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
        assert len(set(draws[1][0].flatten().tolist())) > 20  # real sampling, not one token drawn again and again
    assert harmful.generation_config is kept and kept.repetition_penalty == 5.0  # put back as it was


# -----------------------------------------------------------------------------
# The command line and whole runs


def test_help_reads_like_documentation():
    out = subprocess.run([sys.executable, os.path.join(HERE, "sdpg.py"), "--help"], capture_output=True, text=True,
                         timeout=HANG_TIMEOUT)
    assert out.returncode == 0
    for flag in ("--model", "--dataset", "--steps", "--group-size", "--batch-prompts", "--max-new-tokens",
                 "--temperature", "--lr", "--beta", "--beta-warmup", "--beta-decay", "--alpha", "--kl-mode",
                 "--updates-per-batch", "--seed", "--output-dir", "--eval-every", "--eval-n", "--save-every",
                 "--teacher", "--gate", "--no-gate", "--loss-agg", "--clip-high", "--eval-samples"):
        assert flag in out.stdout
    assert "paper: 1e-3" in out.stdout and "released: -1" in out.stdout
    fields = [f.name for f in dataclasses.fields(sdpg.Args)]
    assert len(fields) <= 30 and all(f.metadata["help"] for f in dataclasses.fields(sdpg.Args))


def test_presets_and_short_names():
    a = sdpg.parse_args(["--model", "tiny"])
    assert (a.dataset, a.lr, a.alpha, a.beta_warmup, a.beta_decay) == ("toy", 3e-3, 0.05, 25, 175)
    b = sdpg.parse_args(["--model", "Qwen2.5-0.5B", "--steps", "400", "--lr", "2e-6"])
    assert (b.dataset, b.lr, b.alpha, b.beta_warmup, b.beta_decay) == ("gsm8k", 2e-6, 1e-3, 50, 350)
    assert (a.instruction, b.instruction) == ("", sdpg.INSTRUCTION)
    c = sdpg.parse_args(["--model", "tiny", "--dataset", "d.jsonl", "--instruction", "Answer briefly."])
    example = {"question": "2+2?", "answer": "4", "solution": ""}
    assert sdpg.prompt_texts(example, c.instruction)[0] == "2+2?\nAnswer briefly."
    assert sdpg.parse_args(["--model", "x", "--instruction", ""]).instruction == ""


def test_a_tiny_model_saved_by_sdpg_is_tiny_again(tiny, tmp_path):
    """A saved tiny model (the tiny reader, a final/ directory) takes the tiny presets, its character tokenizer
    back (AutoTokenizer would read its qwen2 config and return a Qwen2Tokenizer that loses case and spaces) and
    the short teacher template; a chat model's tokenizer takes the default one."""
    model, tok = tiny
    sdpg.save_checkpoint(model, tok, str(tmp_path / "ck"))
    args = sdpg.parse_args(["--model", str(tmp_path / "ck")])
    assert (args.dataset, args.lr, args.max_new_tokens, args.instruction) == ("toy", 3e-3, 2, "")
    loaded_model, loaded = sdpg.load_model(str(tmp_path / "ck"), seed=0)
    for text in ("Q: 47\nA: 7", "Mixed Case,  two spaces\n\nand (brackets) + $5%?"):
        ids = tok(text, add_special_tokens=False).input_ids
        assert loaded(text, add_special_tokens=False).input_ids == ids and len(ids) == len(text)
        assert loaded.decode(ids) == tok.decode(ids) == text.lower()
    assert sdpg.templates_for(loaded) == sdpg.templates_for(tok) == sdpg.TOY_TEMPLATES
    assert sdpg.templates_for(_chat_tokenizer()) == sdpg.DEFAULT_TEMPLATES


def test_dataset_rows_and_gsm8k_context(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"question": f"what is {i}+1?", "answer": str(i + 1)} for i in range(6)]
    rows[1] = {"question": "q", "answer": "2 * 3 = <<2*3=6>>6 apples\n#### 1,006", "solution": ""}
    rows[2]["solution"] = "add one"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, held_out = sdpg.load_examples(str(path), eval_n=2, seed=0)
    assert len(train) == 4 and [e["answer"] for e in held_out] == ["5", "6"]
    assert train[1] == {"question": "q", "answer": "1006", "solution": "2 * 3 = 6 apples"}  # GSM8K's layout
    assert train[2] == {"question": "what is 2+1?", "answer": "3", "solution": "add one"}
    assert train[0]["solution"] == "" and held_out[0]["solution"] == ""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + [{"question": "q", "solution": "s"}]))
    with pytest.raises(SystemExit, match="row 6 needs a 'question' and an 'answer'"):
        sdpg.load_examples(str(path), eval_n=1, seed=0)


def _rows(path):
    return [json.loads(line) for line in open(path)]


def test_one_training_step_changes_weights_and_writes_metrics(tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    sdpg.main(["--model", "tiny", "--steps", "2", "--batch-prompts", "4", "--group-size", "4", "--eval-n", "8",
               "--beta", "0.5", "--beta-warmup", "0", "--updates-per-batch", "2", "--micro-batch", "3",
               "--output-dir", str(out)])
    rows = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    for key in ("step", "reward_mean", "kl_distill", "kl_ref", "beta", "gate_frac", "loss", "entropy",
                "response_len", "lr", "time_s"):
        assert key in rows[1] and math.isfinite(rows[1][key]), key
    # Values by hand. beta(k) = 0.5 min(1, (T - k) / T_decay) with T = 2 and T_decay = round(2 * 7 / 8) = 2;
    # lr is the rate after the step's 2 optimiser steps: 3e-3 min(1, (2k + 1) / 10) with LR_WARMUP 10.
    assert [r["beta"] for r in rows[1:]] == pytest.approx([0.25, 0.0], abs=1e-12)
    assert [r["lr"] for r in rows[1:]] == pytest.approx([3e-3 * 3 / 10, 3e-3 * 5 / 10], rel=1e-9)
    for r in rows[1:]:  # 16 answers of at most 2 tokens; group advantages > 0 only where a group has a right answer
        assert 16 * r["reward_mean"] == pytest.approx(round(16 * r["reward_mean"])) and 0 <= r["reward_mean"] <= 1
        assert 16 * r["gate_frac"] == pytest.approx(round(16 * r["gate_frac"]))
        assert r["gate_frac"] == 0 or 0 < r["reward_mean"] < 1
        assert 1 <= r["response_len"] <= 2 and 0 < r["entropy"] <= math.log(len(sdpg.build_char_tokenizer()))
        assert r["kl_distill"] > 0 and r["kl_ref"] >= 0 and r["grad_norm"] > 0 and r["skipped_updates"] == 0
    for r in (rows[0], rows[2]):
        assert 8 * r["eval_accuracy"] == pytest.approx(round(8 * r["eval_accuracy"]))
    assert "eval_accuracy" not in rows[1]
    assert json.loads((out / "config.json").read_text())["model"] == "tiny"
    trained = AutoModelForCausalLM.from_pretrained(out / "final")
    init = sdpg.build_tiny_model(sdpg.build_char_tokenizer(), seed=0)
    trained, init = trained.state_dict(), init.state_dict()
    assert trained.keys() == init.keys() and all(not torch.equal(w, init[name]) for name, w in trained.items())


def test_gradient_checkpointing_changes_memory_not_results(tmp_path, monkeypatch):
    """Guards against --gradient-checkpointing never switching checkpointing on (the equal metrics would
    then prove nothing) and against it changing a training number; runs of different lengths fail too."""
    run = SMALL_RUN + ["--steps", "2"]
    models, load = [], sdpg.load_model

    def keep(*a):
        model, tokenizer = load(*a)
        models.append(model)
        return model, tokenizer

    monkeypatch.setattr(sdpg, "load_model", keep)
    sdpg.main(run + ["--output-dir", str(tmp_path / "plain")])
    sdpg.main(run + ["--output-dir", str(tmp_path / "ckpt"), "--gradient-checkpointing"])
    assert [all(layer.gradient_checkpointing for layer in m.model.layers) for m in models] == [False, True]
    plain = _comparable(_rows(tmp_path / "plain" / "metrics.jsonl"))
    ckpt = _comparable(_rows(tmp_path / "ckpt" / "metrics.jsonl"))
    assert [r["step"] for r in plain] == [r["step"] for r in ckpt] == [0, 1, 2]
    for a, b in zip(plain, ckpt, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)


def _demo(tmp_path, extra=()):
    out = tmp_path / "demo"
    sdpg.main(["--model", "tiny", "--dataset", "toy", "--output-dir", str(out), *extra])
    rewards = [r["reward_mean"] for r in _rows(out / "metrics.jsonl") if "reward_mean" in r]
    return statistics.mean(rewards[:10]), statistics.mean(rewards[-10:])


def test_offline_demo_learns(tmp_path):
    """The README's demo, as it runs: the reward rises by 0.3 or more within its 200 steps of 16 x 8 answers (its
    budget is in steps, not seconds: how long it takes is the benchmark's number, and a shared CI machine may be
    slow)."""
    first, last = _demo(tmp_path)
    assert last - first >= 0.3, (first, last)
    assert [r["step"] for r in _rows(tmp_path / "demo" / "metrics.jsonl")] == list(range(201))


def test_offline_demo_does_not_learn_with_the_advantage_sign_flipped(tmp_path, monkeypatch):
    real = sdpg.group_advantages
    monkeypatch.setattr(sdpg, "group_advantages", lambda r, g, eps=1e-6: -real(r, g, eps))
    first, last = _demo(tmp_path, ["--steps", "100", "--eval-every", "0", "--eval-n", "10"])
    assert last <= first + 0.05, (first, last)


# -----------------------------------------------------------------------------
# The paper's and the released script's settings (issue 13): each option against a hand computation


def _loss_inputs(seed, N=6, L=4):
    torch.manual_seed(seed)
    mask = (torch.rand(N, L) > 0.3).long()
    mask[:, 0] = 1
    return mask, -torch.rand(N, L) * mask, torch.rand(N, L) * mask, -torch.rand(N, L) * mask  # mask, logp, kl, ref


def test_defaults_give_the_loss_of_eq_3_1_with_the_gate_and_per_group_weights():
    # A naive loop over groups, answers and tokens of Eq. 3.1 with Eq. 3.4's normaliser, Eq. 3.5's gate
    # and the urkl anchor, on-policy (rho = 1, so the outcome term is -A per token).
    mask, logp, kl, ref = _loss_inputs(11)
    G, beta, alpha = 3, 0.3, 0.2
    A = sdpg.group_advantages(torch.tensor([1.0, 0, 0, 1, 1, 0]), G)
    expected = 0.0
    for g in range(2):
        rows = range(g * G, g * G + G)
        tokens = sum(int(mask[i].sum()) for i in rows)
        for i in rows:
            for t in range(mask.shape[1]):
                if mask[i, t]:
                    per_token = -A[i] + beta * float(A[i] > 0) * kl[i, t] + alpha * 0.5 * (logp[i, t] - ref[i, t]) ** 2
                    expected += per_token / tokens / 2
    loss = sdpg.sdpg_loss(logp, logp, kl, ref, A, sdpg.token_weights(mask, G), beta, alpha, "urkl")
    torch.testing.assert_close(loss, torch.as_tensor(expected, dtype=loss.dtype))


def test_no_gate_distils_answers_with_nonpositive_advantage():
    mask = torch.ones(4, 3)
    kl = torch.rand(4, 3, requires_grad=True)
    A = torch.tensor([1.5, -0.5, 0.0, -1.0])
    w = sdpg.token_weights(mask, group_size=4)
    for gate, m in ((True, [1.0, 0, 0, 0]), (False, [1.0, 1, 1, 1])):
        (g,) = torch.autograd.grad(sdpg.sdpg_loss(torch.zeros(4, 3), torch.zeros(4, 3), kl, None, A, w, beta_k=0.3,
                                                  alpha=0.0, kl_mode="urkl", gate=gate), kl)
        # d loss / d kl_{i,t} = beta * m_i / (tokens of the group): with no gate m_i = 1 for A_i <= 0 too
        torch.testing.assert_close(g, 0.3 * torch.tensor(m)[:, None].expand(4, 3) / 12)


def test_token_mean_is_a_plain_mean_over_real_tokens_and_group_is_eq_3_4():
    mask, x, _, _ = _loss_inputs(12)
    mask[0, 1:] = 1  # the groups' token counts differ, so the two aggregations differ
    G = 3
    plain = x[mask.bool()].mean()
    torch.testing.assert_close((sdpg.token_weights(mask, G, "token-mean") * x).sum(), plain)
    per_group = [x[g * G:g * G + G][mask[g * G:g * G + G].bool()].mean() for g in range(2)]
    group = (sdpg.token_weights(mask, G, "group") * x).sum()
    torch.testing.assert_close(group, (per_group[0] + per_group[1]) / 2)
    assert not torch.isclose(group, plain)
    with pytest.raises(ValueError):
        sdpg.token_weights(mask, G, "seq-mean")


def test_token_mean_splits_over_micro_batches():
    mask, logp, kl, ref = _loss_inputs(13, N=8, L=5)
    logp.requires_grad_(True)
    A = sdpg.group_advantages(torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 1]), 4)
    w = sdpg.token_weights(mask, 4, "token-mean")
    args = dict(beta_k=0.1, alpha=0.2, kl_mode="ufkl", gate=False)
    whole = sdpg.sdpg_loss(logp, logp.detach(), kl, ref, A, w, **args)
    parts = sum(sdpg.sdpg_loss(logp[i:i + 3], logp[i:i + 3].detach(), kl[i:i + 3], ref[i:i + 3], A[i:i + 3],
                               w[i:i + 3], **args) for i in range(0, 8, 3))
    torch.testing.assert_close(whole, parts)


def test_overlong_penalty_is_linear_in_the_buffer():
    L, B = 20, 8
    lengths = torch.arange(0, L + 1)
    hand = torch.tensor([0.0 if n <= L - B else -(n - (L - B)) / B for n in range(L + 1)])
    penalty = sdpg.overlong_penalty(lengths, L, B)
    torch.testing.assert_close(penalty, hand)
    torch.testing.assert_close(penalty[L - B:].diff(), torch.full((B,), -1 / B))  # equal steps of -1/B
    assert penalty[L] == -1.0 and penalty[L - B] == 0.0
    assert torch.equal(sdpg.overlong_penalty(lengths, L, 0), torch.zeros(L + 1))
    correct = (lengths % 3 == 0).float()
    torch.testing.assert_close(sdpg.shaped_reward(correct, lengths, -1.0, L, B),
                               torch.where(correct > 0, 1.0, -1.0) + hand)
    torch.testing.assert_close(sdpg.shaped_reward(correct, lengths, 0.0, L, 0), correct)  # the default: R = 1 or 0


def test_wrong_reward_changes_the_advantages_only_with_the_overlong_penalty():
    correct = torch.tensor([1.0, 0, 0, 1, 1, 1, 0, 0])
    lengths = torch.tensor([3, 10, 4, 9, 10, 2, 8, 1])
    def adv(r_wrong, buffer):
        return sdpg.group_advantages(sdpg.shaped_reward(correct, lengths, r_wrong, 10, buffer), 4)

    torch.testing.assert_close(adv(0.0, 0), adv(-1.0, 0), atol=1e-5, rtol=0)  # affine in R: A unchanged
    assert not torch.allclose(adv(0.0, 4), adv(-1.0, 4), atol=1e-2)


def _fake_generate(tok, said, calls):
    """A stand-in for sdpg.generate whose j-th answer row (counted over calls) says said[j]."""
    def generate(model, ids, mask, max_new_tokens, temperature, top_p, stop_ids, pad_id):
        start = sum(n for n, _ in calls)
        calls.append((ids.shape[0], temperature))
        resp = torch.tensor([tok(t).input_ids + [tok.eos_token_id] for t in said[start:start + ids.shape[0]]])
        return resp, sdpg.response_mask_from_stops(resp, stop_ids)
    return generate


def test_mean_at_k_averages_each_questions_k_answers(tiny, monkeypatch):
    model, tok = tiny
    examples = [{"question": str(n), "answer": str(n % 10), "solution": ""} for n in (12, 34, 56)]
    said = ["2", "2", "9", "4", "0", "0", "1", "6", "1"]  # row j: question j // 3, sample j % 3
    calls = []
    monkeypatch.setattr(sdpg, "generate", _fake_generate(tok, said, calls))
    args = sdpg.parse_args(["--model", "tiny", "--batch-prompts", "2", "--group-size", "2"])  # batches of 4
    acc = sdpg.evaluate(model, tok, [tok.eos_token_id], examples, args, samples=3, temperature=0.7)
    assert acc == pytest.approx([2 / 3, 1 / 3, 1 / 3])
    assert calls == [(4, 0.7), (4, 0.7), (1, 0.7)]  # K copies of each question, sampled at T


def test_mean_at_k_at_k1_t0_equals_greedy_accuracy(tiny, monkeypatch):
    # A stand-in sampler: greedily (T = 0) it answers an even question right and an odd one wrong;
    # sampling (T > 0) it says a random digit. (The untrained tiny model only ever says spaces.)
    def generate(model, ids, mask, max_new_tokens, temperature, top_p, stop_ids, pad_id):
        numbers = [int(re.search(r"\d+", tok.decode(row[m.bool()])).group()) for row, m in zip(ids, mask)]
        said = [(str(n % 10) if n % 2 == 0 else "x") if temperature == 0 else str(int(torch.randint(10, ())))
                for n in numbers]
        resp = torch.tensor([tok(t).input_ids + [tok.eos_token_id] for t in said])
        return resp, sdpg.response_mask_from_stops(resp, stop_ids)

    model, tok = tiny
    monkeypatch.setattr(sdpg, "generate", generate)
    held_out = sdpg.toy_examples(12, seed=4)
    greedy = [float(int(ex["question"]) % 2 == 0) for ex in held_out]  # by hand
    args = sdpg.parse_args(["--model", "tiny", "--batch-prompts", "2", "--group-size", "2", "--eval-samples", "1",
                            "--beta", "0"])
    args.temperature = 0.0  # mean@K at T = 0 (the flag refuses it for training)
    row = sdpg.evaluation_metrics(_models(model, tok), held_out, args)
    assert 0 < sum(greedy) < 12 and row == {"eval_accuracy": sum(greedy) / 12, "eval_mean_at_k": sum(greedy) / 12}
    # K greedy answers to a question are K copies of the one
    assert sdpg.evaluate(model, tok, [tok.eos_token_id], held_out, args, samples=3, temperature=0.0) == greedy


GSM8K_DIR = os.path.join(HERE, "..", "shared", "data", "gsm8k")


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_gsm8k_reference_solution_earns_reward_1(split):
    path = os.path.join(GSM8K_DIR, f"{split}.jsonl")
    if not os.path.isfile(path):
        pytest.skip("GSM8K's published files are not at ../shared/data/gsm8k (they are not part of the repository)")
    raw = [json.loads(line) for line in open(path)]
    train, held_out = sdpg.load_examples(path, eval_n=1, seed=0)
    assert len(train) + len(held_out) == len(raw) > 1000
    bad = [(row["answer"][-60:], ex["answer"]) for row, ex in zip(raw, train + held_out)
           if ex["question"] != row["question"] or math_reward(row["answer"], ex["answer"]) != 1.0
           or not ex["solution"] or "####" in ex["solution"] or "<<" in ex["solution"]]
    assert not bad, bad[:5]


def test_default_teacher_prompt_carries_figure_4s_content():
    ex = {"question": "What is 6 x 7?", "answer": "42", "solution": "6 x 7 = 42."}
    student, teacher = sdpg.prompt_texts(ex, sdpg.INSTRUCTION)
    assert student == "What is 6 x 7?\n" + sdpg.INSTRUCTION  # the student's prompt as before
    assert teacher.startswith(student + "\n")  # the teacher sees it too, then the privileged context
    context = teacher[len(student):]
    for part in ("Final answer: 42", "Worked solution: 6 x 7 = 42.", "Reach 42 by another route just as rigorous",
                 "explain the usual route very clearly", "Never mention knowing the answer"):
        assert part in context, part
    _, no_solution = sdpg.prompt_texts({**ex, "solution": ""}, "")
    assert "Worked solution" not in no_solution and "{" not in no_solution and "Final answer: 42" in no_solution


def test_help_gives_the_paper_or_the_released_value_of_each_option_where_they_differ():
    fields = {f.name: f for f in dataclasses.fields(sdpg.Args)}
    for name in ("gate", "loss_agg", "wrong_reward", "overlong_buffer", "updates_per_batch", "clip_high", "kl_mode"):
        assert "released" in fields[name].metadata["help"], name
    for name in ("eval_samples", "beta_warmup", "beta_decay", "steps", "batch_prompts", "group_size", "beta"):
        assert "paper" in fields[name].metadata["help"], name
    a = sdpg.parse_args(["--model", "tiny"])
    assert (a.gate, a.loss_agg, a.wrong_reward, a.overlong_buffer, a.eval_samples) == (True, "group", 0.0, 0, 0)
    assert sdpg.parse_args(["--model", "tiny", "--no-gate"]).gate is False
    for flags, message in ((["--overlong-buffer", "3"], "--overlong-buffer: 0 to --max-new-tokens"),
                           (["--eval-samples", "-1"], "--eval-samples, --beta, --alpha: >= 0")):
        with pytest.raises(SystemExit, match=message):
            sdpg.parse_args(["--model", "tiny", *flags])


def test_released_configuration_runs_and_splits_over_micro_batches(tmp_path):
    # The released script's settings end to end on a local file. The same run with another --micro-batch and
    # with a mean@K evaluation trains the same: neither changes a training number.
    from transformers import AutoModelForCausalLM

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"question": f"{n:02d}", "answer": f"{n % 10}"}) + "\n" for n in range(40)))
    run = ["--model", "tiny", "--dataset", str(data), "--steps", "1", "--batch-prompts", "2", "--group-size", "4",
           "--eval-n", "4", "--no-gate", "--loss-agg", "token-mean", "--wrong-reward", "-1", "--overlong-buffer", "1",
           "--updates-per-batch", "2", "--clip-high", "0.28", "--beta", "0.5", "--beta-warmup", "0",
           "--beta-decay", "0"]
    sdpg.main(run + ["--micro-batch", "3", "--output-dir", str(tmp_path / "a")])
    sdpg.main(run + ["--micro-batch", "8", "--eval-samples", "2", "--output-dir", str(tmp_path / "b")])
    a, b = _rows(tmp_path / "a" / "metrics.jsonl"), _rows(tmp_path / "b" / "metrics.jsonl")
    assert "eval_mean_at_k" not in a[0] and all(0 <= r.pop("eval_mean_at_k") <= 1 for r in b)
    for x, y in zip(_comparable(a), _comparable(b), strict=True):
        assert x == pytest.approx(y, rel=1e-5, abs=1e-7)
    assert -2 <= a[1]["reward_mean"] <= 1 and a[1]["kl_distill"] > 0
    final = [AutoModelForCausalLM.from_pretrained(tmp_path / run / "final").state_dict() for run in "ab"]
    for name, weight in final[0].items():  # AdamW turns float-order noise in a gradient near 0 into ~lr / 1e3
        torch.testing.assert_close(weight, final[1][name], rtol=1e-4, atol=1e-5)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (config["gate"], config["loss_agg"], config["overlong_buffer"]) == (False, "token-mean", 1)


# -----------------------------------------------------------------------------
# Several updates per batch (issue 17): each optimiser step against a computation from scratch


def _updates_with_a_spy(lr_warmup=1):
    """policy_update with 2 updates of 4 answers each, in micro-batches of 3 and 1, on fixed
    advantages; returns what each optimiser step saw (the weights it started from and its gradient),
    the metrics, and the pieces to redo each update from scratch."""
    tok = sdpg.build_char_tokenizer()
    model = sdpg.build_tiny_model(tok, seed=4)
    args = sdpg.parse_args(["--model", "tiny", "--batch-prompts", "4", "--group-size", "2", "--updates-per-batch", "2",
                            "--micro-batch", "3", "--beta", "0.5", "--alpha", "0.1", "--max-new-tokens", "5",
                            "--temperature", "1.5"])
    ref = sdpg.frozen_copy(model, torch.float32)
    m = _models(model, tok, reference=ref, stop_ids=sdpg.stop_token_ids(model, tok))
    torch.manual_seed(0)
    rb = sdpg.collect_rollouts(m, sdpg.toy_examples(4, seed=1), args)
    rb.advantages = sdpg.group_advantages(torch.tensor([1.0, 0, 0, 1, 1, 0, 0.5, 0]), 2)
    with pytest.MonkeyPatch.context() as patch:  # no gradient clipping; the warm-up asked for
        patch.setattr(sdpg, "LR_WARMUP", lr_warmup)
        patch.setattr(sdpg, "MAX_GRAD_NORM", 1e9)
        optimizer, scheduler = sdpg.build_optimizer(model, args)
        seen = []

        def spy(optimizer, args, kwargs):
            seen.append(dict(weights={n: t.clone() for n, t in model.state_dict().items()},
                             grads={n: p.grad.clone() for n, p in model.named_parameters()},
                             lr=optimizer.param_groups[0]["lr"]))

        optimizer.register_step_pre_hook(spy)
        sums = sdpg.policy_update(m, optimizer, scheduler, rb, 0.5, args)
    return seen, sums, (m, rb, args)


def _rollout_logp(weights, parts):
    """The rollout policy's log-probs of all 8 answers: the weights before the batch's first update."""
    m, rb, args = parts
    first = sdpg.frozen_copy(m.policy, torch.float32)
    first.load_state_dict(weights)
    with torch.no_grad():
        return sdpg.score(m._replace(policy=first), rb, slice(0, 8), args, False, False)[0]


def _update_from_scratch(weights, rows, old_logp, parts):
    """One update's loss, gradient and token-averaged metrics, all its answers in one forward pass
    at the given weights, with fresh gradients."""
    m, rb, args = parts
    model = sdpg.frozen_copy(m.policy, torch.float32)
    model.load_state_dict(weights)
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    logp, kl, ref_logp, entropy = sdpg.score(m._replace(policy=model, teacher=model), rb, rows, args, True, True)
    w = sdpg.token_weights(rb.response_mask[rows], 2)
    loss = sdpg.sdpg_loss(logp, old_logp[rows], kl, ref_logp, rb.advantages[rows], w, 0.5, 0.1, "urkl")
    loss.backward()
    log_w = (logp - ref_logp).detach()
    metrics = dict(loss=loss.item(), kl_distill=(w * kl).sum().item(), entropy=(w * entropy).sum().item(),
                   kl_ref=(w * (torch.exp(-log_w) - 1 + log_w)).sum().item())
    return {n: p.grad for n, p in model.named_parameters()}, metrics


def test_each_optimiser_step_sees_only_its_own_micro_batches():
    """Guards against gradients cleared once per batch instead of once per optimiser step (the second
    update would carry the first one's gradient), and against clearing them per micro-batch (a step
    would see only its last micro-batch): each step's gradient must equal that of its own 4 answers
    computed from scratch at the weights the step started from."""
    seen, _, parts = _updates_with_a_spy()
    assert len(seen) == 2
    old_logp = _rollout_logp(seen[0]["weights"], parts)
    for u, step in enumerate(seen):
        grads, _ = _update_from_scratch(step["weights"], slice(4 * u, 4 * u + 4), old_logp, parts)
        for name, g in grads.items():
            torch.testing.assert_close(step["grads"][name], g, rtol=1e-4, atol=1e-7, msg=f"update {u}: {name}")


def test_metrics_with_several_updates_are_means_over_the_updates():
    """Guards against the loss (or another metric) summed over updates instead of averaged, or taken
    from the last update only: with 2 updates, each metric must be the mean of the two updates'
    values computed from scratch, and grad_norm the mean of the two gradients' norms."""
    seen, sums, parts = _updates_with_a_spy()
    old_logp = _rollout_logp(seen[0]["weights"], parts)
    per_update = [_update_from_scratch(step["weights"], slice(4 * u, 4 * u + 4), old_logp, parts)[1]
                  for u, step in enumerate(seen)]
    assert per_update[0]["loss"] != pytest.approx(per_update[1]["loss"], rel=1e-2)  # a mean, not either one
    for key in ("loss", "kl_distill", "kl_ref", "entropy"):
        assert sums[key] == pytest.approx(statistics.mean(m[key] for m in per_update), rel=1e-4, abs=1e-7), key
    norms = [torch.cat([g.flatten() for g in step["grads"].values()]).norm().item() for step in seen]
    assert sums["grad_norm"] == pytest.approx(statistics.mean(norms), rel=1e-4)
    assert sums["skipped_updates"] == 0


def test_a_skipped_update_leaves_no_gradient_to_the_next():
    """Guards against gradients cleared only after a successful step: when the first update's loss is
    NaN, that update is skipped, and the second must see only its own answers' gradient at the
    initial weights, with the warm-up's first rate (a skipped update does not count)."""
    real, calls = sdpg.sdpg_loss, []

    def nan_in_the_first_update(*a, **k):
        calls.append(1)
        return real(*a, **k) * (float("nan") if len(calls) <= 2 else 1.0)  # update 1 = micro-batches 1, 2

    with pytest.MonkeyPatch.context() as m:
        m.setattr(sdpg, "sdpg_loss", nan_in_the_first_update)
        seen, sums, parts = _updates_with_a_spy(lr_warmup=4)
    assert len(seen) == 1 and sums["skipped_updates"] == 1 and seen[0]["lr"] == pytest.approx(3e-3 / 4)
    old_logp = _rollout_logp(seen[0]["weights"], parts)
    grads, _ = _update_from_scratch(seen[0]["weights"], slice(4, 8), old_logp, parts)
    for name, g in grads.items():
        torch.testing.assert_close(seen[0]["grads"][name], g, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("warmup", [1, 4])
def test_learning_rate_warm_up_reaches_the_full_rate_at_optimiser_step_warmup(warmup):
    """Guards against an off-by-one in the warm-up: the first optimiser step at lr 0 (it would be
    wasted), or the full rate reached a step early or late. LR_WARMUP W means the k-th optimiser
    step uses lr * min(1, k / W), so step 1 uses lr / W and step W the full lr; W = 1 is no warm-up."""
    args = sdpg.parse_args(["--model", "tiny", "--lr", "0.5"])
    layer = torch.nn.Linear(2, 1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sdpg, "LR_WARMUP", warmup)
        optimizer, scheduler = sdpg.build_optimizer(layer, args)
    used = []
    optimizer.register_step_pre_hook(lambda opt, a, k: used.append(opt.param_groups[0]["lr"]))
    for _ in range(warmup + 2):
        layer(torch.ones(1, 2)).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    assert used == pytest.approx([0.5 * min(1, k / warmup) for k in range(1, warmup + 3)], rel=1e-12)
    # the trainer's own loop: with 2 updates per batch the warm-up counts optimiser steps, not batches
    seen, _, _ = _updates_with_a_spy(lr_warmup=4)
    assert [step["lr"] for step in seen] == pytest.approx([3e-3 / 4, 3e-3 * 2 / 4], rel=1e-12)


# -----------------------------------------------------------------------------
# verifiers.py: extraction, equivalence, rewards, robustness, security

# --- is_equiv ----------------------------------------------------------------

EQUIVALENT = [
    # fractions vs decimals
    (r"\frac{1}{2}", "0.5"),
    (r"\dfrac{1}{2}", "1/2"),
    (r"\tfrac{3}{4}", "0.75"),
    (r"\frac12", "0.5"),
    (r"-\frac{1}{2}", "-0.5"),
    (r"\frac{-1}{2}", "-1/2"),
    (".5", "1/2"),
    # thousands separators
    ("1,000", "1000"),
    ("1{,}000", "1000"),
    (r"1\,000", "1000"),
    ("1,234,567.5", "1234567.5"),
    # currency, units, degrees
    ("$18", "18"),
    (r"\$18", "18"),
    ("18 dollars", "18"),
    (r"5\text{ cm}", "5"),
    (r"5 \mbox{ cm}^2", "5"),
    (r"5\text{cm}", "5"),
    ("5 square feet", "5"),
    (r"90^\circ", "90"),
    (r"90^{\circ}", "90"),
    ("90°", "90"),
    ("45 degrees", "45"),
    # percent: the sign is dropped
    ("50%", "50"),
    (r"50\%", "50"),
    # trailing zeros
    ("5.0", "5"),
    ("5.50", "5.5"),
    ("005", "5"),
    # signs and the unicode minus
    ("\u22123", "-3"),
    ("+3", "3"),
    # LaTeX spacing, \left and \right, math delimiters
    (r"\left( 1,\! 2 \right)", "(1,2)"),
    (r"\frac{1}{2}\;", "0.5"),
    (r"3\ ", "3"),
    ("~3~", "3"),
    (r"\(7\)", "7"),
    ("$\\displaystyle 7$", "7"),
    # right-hand sides
    ("x = 5", "5"),
    ("x = y = 5", "5"),
    ("(x, y) = (1, 2)", "(1,2)"),
    # tuples, intervals, lists of solutions
    ("(1, 2)", "(1,2)"),
    ("(0.5, 1/2)", r"(\frac12, 0.5)"),
    (r"(-\infty, 2]", r"(-\infty,2]"),
    ("[1, 2)", "[1,2)"),
    ("2, -3", "-3, 2"),
    ("(5)", "5"),
    # scientific notation
    ("1e3", "1000"),
    ("1.5E-3", "0.0015"),
    (r"1.5 \times 10^{3}", "1500"),
    (r"1.5\cdot10^3", "1500"),
    # big integers are exact
    ("123456789012345678901234567890", "123456789012345678901234567890.0"),
    # non-numeric answers
    (r"\text{B}", "B"),
    ("(B)", "b"),
    (r"\textbf{Yes}.", "yes"),
    (r"\mathrm{even}", "Even"),
    (r"\dfrac{\pi}{2}", r"\frac{\pi}{2}"),
    (r"2\sqrt{3}", r"2 \sqrt{3}"),
    (r"\left[ 0, \infty \right)", r"[0,\infty)"),
]

NOT_EQUIVALENT = [
    ("0.333", "1/3"),
    ("0.3333333333", r"\frac{1}{3}"),
    ("0.5", "50%"),
    ("1,000", "1"),
    ("(1, 000)", "1000"),
    ("[1,2]", "(1,2)"),
    ("(1,2)", "(2,1)"),
    ("(1,2)", "1,2"),
    ("1,2", "12"),
    ("1 2", "12"),
    ("123456789012345678901234567890", "123456789012345678901234567891"),
    ("1e999999999", "1"),
    ("1 million", "1000000"),
    ("3 i", "3"),
    ("-3", "3"),
    ("5", "5.01"),
    (r"\frac{1}{0}", "0"),
    ("x + 1", "x - 1"),
    ("5x", "5"),
    ("x <= 5", "5"),
    ("a=1, b=2", "2"),
    (r"\sqrt{2}", "2"),
    ("", "0"),
    ("", ""),
    ("   ", "0"),
    ("$$", ""),
    (r"\text{}", "0"),
    ("0", ""),
    ("1" * 2000, "1" * 2000),
]


@pytest.mark.parametrize("pred,gold", EQUIVALENT)
def test_is_equiv_true(pred, gold):
    assert is_equiv(pred, gold)
    assert is_equiv(gold, pred)  # equivalence is symmetric


@pytest.mark.parametrize("pred,gold", NOT_EQUIVALENT)
def test_is_equiv_false(pred, gold):
    assert not is_equiv(pred, gold)
    assert not is_equiv(gold, pred)


# --- extract_answer ----------------------------------------------------------

EXTRACTIONS = [
    # boxes: last complete one, balanced braces
    (r"so \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed {x}", "x"),
    (r"first \boxed{3}, finally \boxed{4}.", "4"),
    (r"\fbox{7}", "7"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
    (r"\boxed{3} and then \boxed{4", "3"),
    (r"Answer: 12. \boxed{", "12"),
    (r"\boxed{} the answer is 6", "6"),
    (r"\boxed{5} \boxed{}", "5"),
    (r"$\boxed{\text{(B)}}$", r"\text{(B)}"),
    # GSM8K hashes
    ("3 + 4 = 7\n#### 7", "7"),
    ("#### 1,234\n", "1,234"),
    ("#### \nso it is 9", "9"),
    # 'answer is' / 'answer:' phrases
    ("The answer is 3.5.", "3.5"),
    ("The final answer is $\\frac{3}{4}$. I hope it is correct.", "$\\frac{3}{4}$"),
    ("So the answer is: 42\nDone with 7 steps", "42"),
    ("ANSWER: -2", "-2"),
    ("The answer is 5? Yes", "5"),
    # last-number fallback
    ("so 1,000 apples", "1,000"),
    ("3 cats and 3/4 of a pie", "3/4"),
    ("it is -5.", "-5"),
    ("the range 3-5", "5"),
    ("1,2,3", "3"),
    ("x = .5", ".5"),
    ("12,34", "34"),
    ("step 2.5 done.", "2.5"),
    # nothing to extract
    ("I have no idea.", None),
    ("", None),
    ("\\boxed{", None),
    ("9" * 5000, None),
]


@pytest.mark.parametrize("text,expected", EXTRACTIONS)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# --- math_reward and gsm8k_gold -----------------------------------------------

REWARDS = [
    (r"We get $\boxed{\frac{1}{2}}$.", "0.5", 1.0),
    (r"We get $\boxed{\frac{1}{2}}$.", "1", 0.0),  # not cut at the first '}'
    ("No boxed answer here, only words.", "0", 0.0),
    ("She earns 18 dollars.\n#### 18", "18", 1.0),
    ("The total is 1,000 apples.", "1000", 1.0),
    ("The total is 1,000 apples.", "1", 0.0),
    (r"\boxed{7} wait, no: \boxed{8}", "8", 1.0),
    (r"\boxed{7} wait, no: \boxed{8}", "7", 0.0),
    ("The answer is 50%.", "50", 1.0),
    (r"\boxed{(1, 2)}", "(1,2)", 1.0),
    (r"\boxed{[1, 2]}", "(1,2)", 0.0),
    (r"\boxed{0}", "", 0.0),
    ("", "0", 0.0),
]


@pytest.mark.parametrize("completion,gold,reward", REWARDS)
def test_math_reward(completion, gold, reward):
    assert math_reward(completion, gold) == reward


@pytest.mark.parametrize(
    "field,gold",
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 1,234", "1234"),
        ("It costs $5.\n#### $5", "5"),
        ("#### -3\n", "-3"),
        ("#### 72", "72"),
        ("no hashes here: 5", ""),
        ("", ""),
    ],
)
def test_gsm8k_gold(field, gold):
    assert gsm8k_gold(field) == gold


CORRECTED = "5 + 1 = 6\n#### 5\nWait, that is wrong: 5 + 2 = <<5+2=7>>7.\n#### 7"


def test_the_last_hashes_count_in_the_completion_and_in_the_gold(tmp_path):
    """Guards against the first '####' taken instead of the last: an answer that writes a wrong
    '#### 5', then corrects itself to '#### 7', is scored on 7, and a gold field written the same way
    gives 7 as the answer and, to the teacher, the solution up to the last '####'."""
    assert extract_answer(CORRECTED) == "7" and extract_answer(CORRECTED + "\nThat is all.") == "7"
    assert math_reward(CORRECTED, "7") == 1.0 and math_reward(CORRECTED, "5") == 0.0
    assert gsm8k_gold(CORRECTED) == "7"
    path = tmp_path / "g.jsonl"  # read as sdpg.py reads GSM8K
    path.write_text((json.dumps({"question": "q", "answer": CORRECTED}) + "\n") * 2)
    (row,), _ = sdpg.load_examples(str(path), eval_n=1, seed=0)
    assert row["answer"] == "7" and row["solution"] == "5 + 1 = 6\n#### 5\nWait, that is wrong: 5 + 2 = 7."


@pytest.mark.parametrize("bad", [None, 5, 5.0, b"5", ["5"], {"a": 1}])
def test_non_string_input(bad):
    assert extract_answer(bad) is None
    assert is_equiv(bad, "5") is False and is_equiv("5", bad) is False
    assert math_reward(bad, "5") == 0.0 and math_reward(r"\boxed{5}", bad) == 0.0
    assert gsm8k_gold(bad) == ""


# --- robustness: bounded time on degenerate completions -------------------------

HUGE = 200_000
DEGENERATE = [
    "1" * HUGE,
    "9" * HUGE,
    "\\boxed{" + "9" * HUGE + "}",
    "\\boxed{" * (HUGE // 7),
    "\\boxed{1}" * (HUGE // 9),
    "1," * (HUGE // 2),
    "1." * (HUGE // 2),
    "1/" * (HUGE // 2),
    "-" * HUGE + "5",
    "{" * HUGE,
    "}" * HUGE,
    "\\" * HUGE,
    "a" * HUGE,
    "the answer is " + "1" * HUGE,
    "the answer is " * (HUGE // 14),
    "#### " + "1," * (HUGE // 2),
    "\\boxed{" + "\\text{" * (HUGE // 6) + "}",
    "\\boxed{" + "(" * HUGE + "}",
    "9" * (HUGE // 2) + ",5",
    r"\boxed{1e999999999}",
    r"\boxed{1.5\times10^{999999999}}",
    r"\boxed{\frac{1e99999999}{1e-99999999}}",
]


# A bound against a hang (a regular expression or a parser that goes quadratic or worse on 200 KB), not a
# benchmark: the slowest of these inputs took 0.65 s on 2 cores under a load average of 10 (2026-12-02), so
# HANG_S is far above what a working verifier needs on a busy CI machine, and far below what a broken one takes.
HANG_S = 30.0


@pytest.mark.parametrize("text", DEGENERATE, ids=lambda t: repr(t[:20]) + f"x{len(t)}")
def test_degenerate_completion_is_fast(text):
    start = time.perf_counter()
    reward = math_reward(text, "1")
    assert time.perf_counter() - start < HANG_S
    assert reward in (0.0, 1.0)


@pytest.mark.parametrize(
    "answer,equal",
    [("9" * 990 + ",5", True), ("\\text{" * 160, False), ("(" * 500 + ")" * 500, True), ("1," * 500, True),
     ("((" * 250, True), ("1e" + "9" * 990, True)],
)
def test_worst_case_answer_within_cap_is_fast(answer, equal):
    """Long answers just within the length cap are compared, and quickly. Guards against a slow
    comparison and against one made fast by giving up: each answer must still equal itself (the
    unbalanced \\text{ one is junk, equal to nothing)."""
    start = time.perf_counter()
    result = is_equiv(answer, answer)
    assert time.perf_counter() - start < HANG_S
    assert result is equal


# --- security: model output is never evaluated -----------------------------------

PAYLOADS = [
    r"\boxed{__import__('os').system('touch pwned')}",
    "#### __import__('os').system('touch pwned')",
    "The answer is exec(\"open('pwned', 'w').write('x')\")",
    r"\boxed{eval(\"__import__('os').system('touch pwned')\")}",
    r"\boxed{().__class__.__base__.__subclasses__()}",
    r"\boxed{Symbol('x').__class__}",
]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_payload_is_not_executed(payload, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert math_reward(payload, "5") == 0.0
    assert not is_equiv(payload, "5")
    assert not (tmp_path / "pwned").exists()


def test_module_never_evaluates_text():
    tree = ast.parse(pathlib.Path(verifiers.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in {"eval", "exec", "compile", "__import__"}
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
            assert not any(name.split(".")[0] in {"sympy", "os", "subprocess"} for name in names)


# --- fuzz: random junk never raises ---------------------------------------------------

_FUZZ_TOKENS = list("0123456789{}\\()[],./-+$%=^ abxyz\n") + [
    "\\boxed", "\\fbox", "\\frac", "\\text", "\\left", "\\right", "\\times", "10^",
    "e9", "####", "answer is", "Answer:", "\u2212", "{,}", "\\,", "\\infty",
    "\\sqrt", "\\pi", "\\pm", "\\in", "\\cdot", ";", " and ", "\nQuestion:", "$", "\\{", "\\}", "x^",
    "\\begin{pmatrix}", "\\end{pmatrix}", "\\begin{bmatrix}", "\\end{bmatrix}", "&", "\\\\", "\\geq", "\\leq",
    "\\neq", "<", ">", "\\!", "\\ ", ":", "|", "AB", " = 0",
]


# junk put inside the shapes that the relation, equation and matrix rules read, so that it reaches them
_FUZZ_SHAPES = ["{}", "{}", "{} = {}", "{} \\geq {}", "x < {}", "\\begin{{pmatrix}} {} & {} \\\\ {} \\end{{pmatrix}}"]


def test_fuzz_never_raises():
    rng = random.Random(1234)

    def junk(most):
        shape = rng.choice(_FUZZ_SHAPES)
        return shape.format(*("".join(rng.choice(_FUZZ_TOKENS) for _ in range(rng.randint(0, most)))
                              for _ in range(shape.count("{}"))))

    for _ in range(3000):
        text, other = junk(40), junk(12)
        answer = extract_answer(text)
        assert answer is None or isinstance(answer, str)
        assert is_equiv(text, other) in (True, False)
        assert math_reward(text, other) in (0.0, 1.0)
        assert isinstance(gsm8k_gold(text), str)
        if answer is not None:
            assert is_equiv(answer, answer) in (True, False)


# --- answers a policy could game: each class refused, its honest forms still accepted ---------

EQUATION_GOLDS = ["x^2 - 4x - 2 = 0", "2x + z = 1", "7 = 11a + c", "3y - 2 = 0", "a + b = 0"]


@pytest.mark.parametrize("gold", EQUATION_GOLDS)
def test_equation_gold_is_not_cut_to_its_right_side(gold):
    """Guards against reducing 'expression = 0' to '0': a bare constant would score on every such gold."""
    rhs = gold.rsplit("=", 1)[1].strip()
    assert math_reward(rf"\boxed{{{rhs}}}", gold) == 0.0
    assert math_reward(rf"so \boxed{{{gold}}}", gold) == 1.0  # the whole equation still matches itself


@pytest.mark.parametrize("gold", ["x(x-4) = 0", "t(t + 2) = 0", "x(2x - 1) = 0", "a(b+c) = 0"])
def test_a_bracketed_expression_on_the_left_is_not_a_label(gold):
    """'x(x-4) = 0' is an equation, not the label f(x) = ...: the constant 0 must not score on it. Guards against
    a label rule that takes any name followed by brackets, whatever they hold, for a label."""
    assert math_reward(r"\boxed{0}", gold) == 0.0
    assert math_reward(rf"so \boxed{{{gold}}}", gold) == 1.0


@pytest.mark.parametrize("pred,gold,same", [("1, 1, 2", "2, 1", False), ("2, 1", "1, 1, 2", False),
                                            ("2, 1, 1", "1, 2, 1", True), ("3, 3", "3", False),
                                            ("x = 1, 1", "1", False)])
def test_a_list_is_a_multiset_where_repeated_items_count(pred, gold, same):
    """Guards against comparing lists as sets, under which '1, 1, 2' would match '2, 1'."""
    assert is_equiv(pred, gold) is same


@pytest.mark.parametrize("pred,gold", [("5", "x = 5"), ("5", "y = x = 5"), ("3", "f(x) = 3"), ("7", "a_3 = 7"),
                                       ("4", r"\text{r} = 4"), ("(1, 2)", "(x, y) = (1, 2)"),
                                       ("[-2, 7]", r"x \in [-2, 7]"), ("9", r"\theta = 9")])
def test_label_on_the_left_is_dropped(pred, gold):
    """Guards against the opposite mistake: a gold 'x = 5' (a label, then the value) must accept 5."""
    assert is_equiv(pred, gold) and is_equiv(gold, pred)


@pytest.mark.parametrize("pred,gold,same", [
    ("5125", "5, 125", False), ("125, 5", "5, 125", True), ("5,125", "5125", True), ("0,111", "111", False),
    ("32, 349", "32349", False), ("1,0000", "10000", False), ("12,345,678", "12345678", True),
    ("14{,}916", "14916", True), ("14 { , } 916", "14916", True), ("0{,}111", "111", False),
])
def test_comma_is_a_thousands_separator_only_in_groups_of_three(pred, gold, same):
    """Guards against reading a list as one number: '5, 125' is two answers, '1,000' one."""
    assert is_equiv(pred, gold) is same and is_equiv(gold, pred) is same


@pytest.mark.parametrize("text,expected", [("AZYUK2A", None), ("x2y", None), ("area 25cm", None),
                                           ("the code AB12 is 7", "7"), ("it is 12.", "12"), ("(3)", "3")])
def test_last_number_must_stand_on_its_own(text, expected):
    """Guards against digits glued to letters being read as the answer ('AZYUK2A' -> 2)."""
    assert extract_answer(text) == expected


# --- answer forms models write, accepted; their near misses refused ---------------------------

@pytest.mark.parametrize("pred,gold,same", [
    (r"\cfrac{3}{4}", "0.75", True), (r"\dfrac34", "3/4", True), (r"1+\frac12", "3/2", True),
    (r"\frac3{4}", "0.75", True), (r"\frac1{72}", "1/72", True), (r"\frac{1}2", "0.5", True), (r"\frac12", "12", False),
    ("1; 3", "1, 3", True), ("1 and 3", "3, 1", True), ("-1 or 4", "4, -1", True), ("1 and 3", "1, 3, 5", False),
    (r"\{1, 3\}", "1, 3", True), (r"\{1, 3\}", "1, 4", False), (r"\pm 2", "2, -2", True), (r"\pm 2", "2", False),
    (r"1 \pm \sqrt{2}", r"1 - \sqrt{2}, 1 + \sqrt{2}", True), (r"x \in [-2, 7]", "[-2, 7]", True),
    (r"x \in [-2, 7]", "(-2, 7)", False),
])
def test_answer_forms_models_write(pred, gold, same):
    """Guards against rejecting right answers in other spellings (and against the spellings matching wrong golds)."""
    assert is_equiv(pred, gold) is same and is_equiv(gold, pred) is same


@pytest.mark.parametrize("completion,gold,reward", [
    ("Final Answer: The largest $n$ is 34.", "34", 1.0),
    ("The final answer is: the number of pairs $k$ equals 12.", "12", 1.0),
    ("The final answer is 1 million.", "1", 0.0),  # the only number does not end the sentence
    ("The answer is 3 i.", "3", 0.0),
    (r"So the ratio is $\frac{10}{9}$.", "10/9", 1.0),
    (r"So the ratio is $\frac{10}{9}$.", "9", 0.0),
    ("The meeting point is $(7, 6)$", "(7, 6)", 1.0),
    ("It costs $5 and $6 in all", "6", 1.0),
    ("3 + 2 = 5 pens.\n#### 5\n\nQuestion: Ann has 4 cats and gets 3 more.\nAnswer: 7\n#### 7", "5", 1.0),
    ("3 + 2 = 5 pens.\n#### 5\n\nQuestion: Ann has 4 cats and gets 3 more.\nAnswer: 7\n#### 7", "7", 0.0),
    (r"The roots are $\boxed{-2}$ and $\boxed{1}$.", "1, -2", 1.0),
    (r"The roots are $\boxed{-2}$ and $\boxed{1}$.", "1", 1.0),  # the last box alone, as ever
    (r"Try \boxed{5}, then \boxed{-2} and \boxed{1}.", "5, 1", 0.0),  # only the last n boxes, together
    (r"\boxed{1}", "1, -2", 0.0),
])
def test_extraction_of_forms_models_write(completion, gold, reward):
    """Guards against the phrase, '$...$', run-on 'Question:' and several-box rules (each both ways)."""
    assert math_reward(completion, gold) == reward


@pytest.mark.parametrize("pred,gold", [
    (r"\sqrt3", r"\sqrt{3}"), (r"\sqrt{12}", r"2\sqrt{3}"), (r"\frac{\sqrt{3}}{3}", r"\frac{1}{\sqrt{3}}"),
    (r"\pi/4", r"\frac{\pi}{4}"), ("3π", r"3\pi"), ("2^{40}", "1099511627776"), ("3x+2", "2+3x"),
    (r"\sqrt{8}\cdot\sqrt{2}", "4"), (r"\frac{1}{1+\sqrt{2}}", r"\frac{1}{\sqrt{2}+1}"), ("(x+1)^2", "x^2+2x+1"),
    (r"\frac{3\sqrt{2}}{4}\pi", r"\frac{3\pi\sqrt{2}}{4}"), ("-(2)", "-2"), ("2^{-1}", "0.5"),
])
def test_closed_forms_equal(pred, gold):
    """Guards against the closed-form parser missing equal values written differently."""
    assert is_equiv(pred, gold) and is_equiv(gold, pred)


@pytest.mark.parametrize("pred,gold", [
    (r"\sqrt{12}", r"3\sqrt{2}"), (r"\pi/4", r"\pi/3"), ("3x+2", "3y+2"), ("3x+2", "2x+3"), ("(x+1)^2", "x^2+1"),
    ("2^{40}", "1099511627775"), (r"\sqrt{2}", "1.41421356237309504880168872420969807856967187537694"),
    ("2^10", "1024"), ("2^{99999}", r"2\cdot 2^{99998}"), (r"\sin x", r"\cos x"), (r"\log(8)", r"2\log(4)"),
    ("x" + "+x" * 150, "151x"), ("(" * 40 + "1" + ")" * 40, "2"), (r"\sqrt{2}", r"\sqrt{3}"), ("3i", "3"),
    ("x2", "2x"), (r"\pi 2", r"2\pi"), ("(" * 40 + "1" + ")" * 40, "1"),  # no implicit product before a number; depth
    (r"\frac{1}{1+\sqrt{2}}", r"\frac{1}{1.000000000000000000000000000000001+\sqrt{2}}"),  # agree to 30 digits
])
def test_closed_forms_refused(pred, gold):
    """Guards against accepting different values, decimals passed off as surds, and forms over the limits."""
    assert not is_equiv(pred, gold) and not is_equiv(gold, pred)


def test_closed_form_limits_are_fast():
    """Guards against a parser that a long, deep or high-power expression can stall."""
    for text in ["(" * 5000 + "1" + ")" * 5000, r"\sqrt{" * 300 + "2" + "}" * 300, "(1+x)^{64}" * 3,
                 r"(1+\sqrt{2}+\sqrt{3}+\sqrt{5}+\sqrt{7})^{9}", "9" * 150 + "^{64}", "x" * 199,
                 "1^{99999999}"]:
        start = time.perf_counter()
        assert math_reward(rf"\boxed{{{text}}}", "1") in (0.0, 1.0)
        assert time.perf_counter() - start < HANG_S, text[:30]


# --- third round: relations, matrices, equations and edge forms that MATH answers use ----------------

@pytest.mark.parametrize("pred,gold,same", [
    (r"x \geq 5", r"5 \leq x", True), (r"x \ge 5", "x >= 5", True), ("x ≥ 5", r"x \geqslant 5", True),
    ("-x > -1", "x < 1", True), (r"x \neq 3", r"3 \ne x", True), ("2x > 4", "x > 2", True),
    ("3(x+1) < 6", "x < 1", True), (r"\frac{x}{2} \geq 1", r"x \geq 2", True), (r"x \lt 2", "x < 2", True),
    (r"x > \sqrt{2}", r"\sqrt{2} < x", True), (r"-\sqrt{2}x > 2", r"x < -\sqrt{2}", True),
    (r"t \leq -\frac{3}{2}", r"-2t \geq 3", True), (r"\theta > 0", r"0 < \theta", True),
    ("x > 0", r"x \geq 0", False), ("x < 1", "x > 1", False), ("-x > -1", "x > 1", False),
    (r"5 \leq x", r"x \leq 5", False), (r"x \neq 3", "x = 3", False), (r"x \neq 3", "3", False),
    (r"x \geq 5", "5", False), ("y > 2", "x > 2", False), ("2x > 4", "x > 4", False),
    ("x^2 > 4", "x > 2", False), (r"\frac{2}{x} > 1", "x < 2", False),  # not linear: other solution sets
    ("x^2 > 4", "x > 4", False), (r"\frac{2}{x+1} > 1", "x < 1", False),  # what reading them at 0 and 1 gives
    ("x + y > 1", "y > 1 - x", False),  # two variables: not compared as a relation (P)
    ("x > 2", r"(2, \infty)", False),  # a relation is not an interval (P)
    ("x - x > -1", "0 < 1", False),  # no variable left: no solution set to compare
])
def test_relations_compare_as_solution_sets(pred, gold, same):
    """Guards against a relation read without its sign flipped (5 <= x is x >= 5, -x > -1 is x < 1), against
    strict and non-strict signs taken as one (x > 0 is not x >= 0), and against non-linear ones compared."""
    assert is_equiv(pred, gold) is same and is_equiv(gold, pred) is same


MATRIX = r"\begin{pmatrix} 0 & 3 \\ 0 & -1 \end{pmatrix}"


@pytest.mark.parametrize("pred,gold,same", [
    (MATRIX, r"\begin{bmatrix}0&3\\0&-1\end{bmatrix}", True),
    (r"\begin{pmatrix} \frac12 \\ \sqrt{8} \\ \end{pmatrix}", r"\begin{pmatrix} 0.5 \\ 2\sqrt{2} \end{pmatrix}", True),
    (r"\mathbf{M} = " + MATRIX, MATRIX, True), (r"\begin{pmatrix} x + 1 & 2x \end{pmatrix}",
                                                 r"\begin{pmatrix} 1 + x & x + x \end{pmatrix}", True),
    (MATRIX, r"\begin{pmatrix} 0 & 3 \\ 0 & 1 \end{pmatrix}", False),  # one wrong entry
    (MATRIX, r"\begin{pmatrix} 0 & 0 \\ 3 & -1 \end{pmatrix}", False),  # transposed
    (MATRIX, r"\begin{pmatrix} 0 & 3 & 0 & -1 \end{pmatrix}", False),  # the same entries, another shape
    (MATRIX, r"\begin{pmatrix} 0 & 3 \\ 0 & -1 \\ 0 & 0 \end{pmatrix}", False),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", "(1, 2)", False),  # a matrix is compared with matrices only (P)
    (r"\begin{vmatrix} 2 & 0 \\ 0 & 1 \end{vmatrix}", "2", False),  # a determinant is not read
    (r"\begin{pmatrix} 1 & 2 \\ 3 \end{pmatrix}", r"\begin{pmatrix} 1 & 2 \\ 3 & 0 \end{pmatrix}", False),
])
def test_matrices_compare_entry_by_entry(pred, gold, same):
    """Guards against matrices compared by shape or by their list of entries, and against a wrong entry."""
    assert is_equiv(pred, gold) is same and is_equiv(gold, pred) is same


def test_a_boxed_matrix_is_extracted_whole():
    """Guards against a box cut at the matrix's first row break or first closing brace."""
    gold = r"\begin{bmatrix} 0 & 3 \\ 0 & -1 \end{bmatrix}"
    assert math_reward(rf"So $\mathbf{{A}} = \boxed{{{MATRIX}}}$.", gold) == 1.0
    assert math_reward(rf"So $\boxed{{{MATRIX}}}$.", gold.replace("0 & -1", "1 & -1")) == 0.0


@pytest.mark.parametrize("pred,gold,same", [
    (r"y = -\frac{1}{2}x + \frac{3}{4}", "2x + 4y - 3 = 0", True), ("5 = x", "x = 5", True), ("2x = 10", "x = 5", True),
    ("c = 7 - 11a", "7 = 11a + c", True), ("x^2 = 4x + 2", "x^2 - 4x - 2 = 0", True),
    (r"\sqrt{2}x + \sqrt{2}y = \sqrt{2}", "x + y = 1", True), ("-(x + y) = -3", r"\frac{x+y}{3} = 1", True),
    ("0 = 0", "2x + 4y - 3 = 0", False), ("0(2x + 4y - 3) = 0", "2x + 4y - 3 = 0", False),  # factor 0
    (r"0 \cdot y = 0", "y = 0", False), ("x(2x + 4y - 3) = 0", "2x + 4y - 3 = 0", False),  # factor x
    ("2x + 4y - 3", "2x + 4y - 3 = 0", False), ("2x + 4y", "2x + 4y - 3 = 0", False),  # not an equation
    ("1 = 2", "3 = 4", False), ("x = x", "y = 2y", False),  # no variable left in lhs - rhs
    ("y = 2x + 3", "y = 3x + 2", False), ("y = 2x", "x = 2y", False), ("x + y = 1", "x + z = 1", False),
    ("x = 5", "x^2 = 25", False), ("2x + 4y = 3, y = 1", "2x + 4y = 3", False),
    (r"y = \frac{1}{x}", "xy = 1", False),  # equal for x != 0, but only constant factors are compared (P)
])
def test_equations_equal_up_to_a_nonzero_factor(pred, gold, same):
    """Guards against equations compared as text (y = -x/2 + 3/4 is 2x + 4y - 3 = 0) and against the
    degenerate matches a policy could use: 0 = 0, a factor of 0 or of a variable, an expression without '='."""
    assert is_equiv(pred, gold) is same and is_equiv(gold, pred) is same


@pytest.mark.parametrize("degenerate", ["0 = 0", "1 = 1", "x = x", "0x = 0", "x - x = 0", r"0 \cdot x = 0"])
def test_a_degenerate_equation_matches_no_equation(degenerate):
    for gold in EQUATION_GOLDS + ["y = 2x + 1", "2x + 4y - 3 = 0"]:
        assert math_reward(rf"\boxed{{{degenerate}}}", gold) == 0.0, gold


@pytest.mark.parametrize("pred,gold,same", [
    (r"11,\! 111,\! 100", "11111100", True), (r"11,\!111,\!100", "11,111,100", True),
    (r"11,\! 111,\! 100", "11, 111, 100", False), (r"0,\! 111", "111", False), (r"1,\! 23", "123", False),
    (r"1,\ 2,\ 3", r"\{1, 2, 3\}", True), (r"\{-1,\ 4\}", "4, -1", True), (r"(1,\ 2)", "(1, 2)", True),
    (r"1,\ 2", "1, 2, 3", False),
    ("|AB| = 1", "1", True), ("A:B = 1", "1", True), ("S_{ABC}:S = 7:32", "7:32", True), ("AB = 5", "5", True),
    (r"A:B = 1", "2", False), ("|x| = 5", "5", False), ("xy = 0", "0", False),  # |x|, xy are no labels
    ("S_{ABC}:S = 7:32", "7/32", False),  # a ratio stays a ratio: 6:30 is not the time 3:15 (P)
])
def test_edge_forms_models_write(pred, gold, same):
    """Guards against thin-space thousands separators read as lists, '\\ ' breaking a list, and label left
    sides (|AB|, A:B, S_{ABC}:S) kept; and against |x| and xy, which are values, taken as labels."""
    assert is_equiv(pred, gold) is same and is_equiv(gold, pred) is same


@pytest.mark.parametrize("completion,gold,reward", [
    (r"The roots are $\boxed{1}, \boxed{2}, \boxed{3}$.", r"\{1,2,3\}", 1.0),
    (r"The roots are $\boxed{3}, \boxed{1}, \boxed{2}$.", r"\{1, 2, 3\}", 1.0),
    (r"The roots are $\boxed{1}, \boxed{2}$.", r"\{1,2,3\}", 0.0),
    (r"The roots are $\boxed{1}, \boxed{2}, \boxed{4}$.", r"\{1,2,3\}", 0.0),
    (r"So $\boxed{x \geq 5}$.", r"[5, \infty)", 0.0),
])
def test_several_boxes_against_a_set_gold(completion, gold, reward):
    assert math_reward(completion, gold) == reward


def test_new_forms_within_the_caps_are_fast():
    """Guards against a relation, equation or matrix that stalls the verifier: each pair is decided in well under
    a second, and the well-formed ones are still read (each equals another spelling of itself, which a check
    that gave up on it and compared text would not see)."""
    row = " & ".join(["1"] * 15)
    big_matrix = r"\begin{pmatrix}" + row + (r" \\ " + row) * 14 + r"\end{pmatrix}"
    tall_matrix = r"\begin{pmatrix}" + r"1 \\ " * 190 + r"\end{pmatrix}"
    deep = "(" * 29 + "x" + ")" * 29
    root = r"9^{64}\sqrt{99999989}"
    for text, other, equal in [
        (big_matrix, big_matrix.replace("pmatrix", "bmatrix"), True),
        (tall_matrix, tall_matrix.replace("pmatrix", "bmatrix"), True),
        (deep + " > 1", "1 < " + deep, True), (f"x > {root}", f"{root} < x", True),
        ("(1+x)^{64} = (1+y)^{64}", "(1+y)^{64} = (1+x)^{64}", True), ("x" + "+x" * 95 + " = 1", "96x = 1", True),
        ("(1+x)^{64} > 0", "0 < (1+x)^{64}", False),  # not linear: refused, quickly
        (deep + " = " + deep.replace("x", "y"), "x - y = 0", True), ("x = " + "x" * 190, "x = x^{190}", False),
        (r"\begin{pmatrix}" * 60, r"\begin{bmatrix}" * 60, False), ("x > " * 200, "x < " * 200, False),
    ]:
        assert len(text) <= 1000 and len(other) <= 1000
        start = time.perf_counter()
        assert is_equiv(text, other) is equal, text[:40]
        assert math_reward(rf"\boxed{{{text}}}", "x > 1") in (0.0, 1.0)
        assert time.perf_counter() - start < HANG_S, text[:40]


def test_every_gsm8k_train_solution_scores_1_plain_and_boxed():
    """Guards against a verifier rule that rejects the answers GSM8K's own reference solutions give."""
    path = os.path.join(GSM8K_DIR, "train.jsonl")
    if not os.path.isfile(path):
        pytest.skip("GSM8K's published files are not at ../shared/data/gsm8k (they are not part of the repository)")
    rows = [json.loads(line) for line in open(path)]
    assert len(rows) == 7473
    bad = []
    for row in rows:
        gold = gsm8k_gold(row["answer"])
        body = row["answer"].rsplit("####", 1)[0]
        boxed = body + rf"So the answer is $\boxed{{{row['answer'].rsplit('####', 1)[1].strip()}}}$."
        if math_reward(row["answer"], gold) != 1.0 or math_reward(boxed, gold) != 1.0:
            bad.append(row["answer"][-60:])
    assert not bad, bad[:5]


# -----------------------------------------------------------------------------
# Reliability: interrupt and resume, atomic checkpoints, NaN guard, clear errors

SMALL_RUN = ["--model", "tiny", "--steps", "12", "--batch-prompts", "4", "--eval-every", "0", "--eval-n", "8"]


def _comparable(rows):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


@pytest.mark.parametrize("teacher", ["policy", "reference"])
def test_interrupt_then_continue_equals_an_uninterrupted_run(tmp_path, teacher):
    # The stopped run is given 400 steps so that it cannot end before the signal comes; a constant beta makes
    # its first steps identical to those of a 12-step run, and it is continued as one (--steps may differ).
    run = SMALL_RUN + ["--beta-warmup", "0", "--beta-decay", "0", "--teacher", teacher]
    sdpg.main(run + ["--output-dir", str(tmp_path / "straight")])
    out = tmp_path / "stopped"
    # A real SIGINT to a real process, once it has logged step 3.
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "sdpg.py"), *run, "--output-dir", str(out),
                             "--steps", "400"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + HANG_TIMEOUT
    while time.time() < deadline and not (out / "metrics.jsonl").exists() or \
            len(_rows(out / "metrics.jsonl")) < 4:
        time.sleep(0.05)
    proc.send_signal(2)  # SIGINT, as Ctrl-C sends
    output, _ = proc.communicate(timeout=HANG_TIMEOUT)
    assert proc.returncode == 0, output
    assert "To continue: python sdpg.py <the same flags>" in output
    (ckpt,) = sdpg.checkpoints(str(out))
    stopped_at = int(ckpt.rsplit("-", 1)[1])
    assert 3 <= stopped_at < 400 and [r["step"] for r in _rows(out / "metrics.jsonl")] == list(range(stopped_at + 1))
    sdpg.main(run + ["--output-dir", str(out)])
    resumed, straight = _rows(out / "metrics.jsonl"), _rows(tmp_path / "straight" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(13))
    # same data, same RNG states, same weights and optimiser: the same run (on CPU, bit for bit
    # up to the float rounding of summing metrics)
    for a, b in zip(_comparable(resumed), _comparable(straight), strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["step"], k)


class _HardKill(BaseException):
    """Stands for SIGKILL or a power cut: no handler catches it, no checkpoint is saved on the way out."""


def _killed_at(monkeypatch, step):
    """Makes the run die as it starts training step `step` (rows of the steps before it are on disk)."""
    real, calls = sdpg.collect_rollouts, []

    def collect(*a, **k):
        calls.append(1)
        if len(calls) == step:
            raise _HardKill
        return real(*a, **k)

    monkeypatch.setattr(sdpg, "collect_rollouts", collect)


KILL_RUN = ["--model", "tiny", "--steps", "4", "--batch-prompts", "2", "--group-size", "2", "--eval-every", "0",
            "--eval-n", "2", "--save-every", "2", "--beta-warmup", "0", "--beta-decay", "0"]


@pytest.fixture(scope="module")
def never_killed(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    sdpg.main(KILL_RUN + ["--output-dir", str(out)])
    return _comparable(_rows(out / "metrics.jsonl"))


@pytest.mark.parametrize("killed_at", [4, 2])
def test_hard_kill_between_checkpoints_then_resume_logs_each_step_once(killed_at, never_killed, tmp_path,
                                                                       monkeypatch):
    """Guards against a continued run logging steps twice: the rows written after the last checkpoint
    (step 3 when killed at 4, after checkpoint-2), or the step-0 evaluation when the run died before
    its first checkpoint and starts again from scratch; and against a half-written last line
    (the kill came during a write) making the continued run fail."""
    out, metrics = tmp_path / "killed", tmp_path / "killed" / "metrics.jsonl"
    with monkeypatch.context() as m:
        _killed_at(m, killed_at)
        with pytest.raises(_HardKill):
            sdpg.main(KILL_RUN + ["--output-dir", str(out)])
    assert [r["step"] for r in _rows(metrics)] == list(range(killed_at))
    assert [os.path.basename(p) for p in sdpg.checkpoints(str(out))] == (["checkpoint-2"] if killed_at > 2 else [])
    with open(metrics, "a") as f:
        f.write('{"step": %d, "reward_me' % killed_at)  # cut off mid-row, no newline
    sdpg.main(KILL_RUN + ["--output-dir", str(out)])  # the same command again
    resumed = _comparable(_rows(metrics))
    assert [r["step"] for r in resumed] == list(range(5))
    for a, b in zip(resumed, never_killed, strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6), a["step"]


def test_a_crash_while_saving_leaves_the_previous_checkpoint(tmp_path, tiny, monkeypatch):
    from transformers import AutoModelForCausalLM

    model, tok = tiny
    sdpg.save_checkpoint(model, tok, str(tmp_path / "checkpoint-1"), {"step": 1})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the machine dies half-way through writing checkpoint-2

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        sdpg.save_checkpoint(model, tok, str(tmp_path / "checkpoint-2"), {"step": 2})
    assert sdpg.checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint-1")]
    AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-1")


def test_a_checkpoint_of_a_model_whose_saved_layout_differs_restores_its_weights(tmp_path):
    """restore_checkpoint on an MoE model, which save_pretrained writes with one tensor per expert where the
    model holds them fused (transformers 5.x), gives back exactly the saved weights and optimiser state. Guards
    against reading the checkpoint's safetensors file straight into load_state_dict: its keys are not the
    model's, and the load fails."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(vocab_size=50, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                            num_experts=4, num_experts_per_tok=2, tie_word_embeddings=True)

    def model_and_optimizer(seed):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(input_ids=torch.tensor([[3, 4, 5]])).logits.sum().backward()
        optimizer.step()
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    saved, saved_optimizer, saved_scheduler = model_and_optimizer(0)
    state = {"optimizer": saved_optimizer.state_dict(), "scheduler": saved_scheduler.state_dict(),
             "order": random.Random(0).getstate(),
             "rng": {"python": random.getstate(), "torch": torch.get_rng_state(), "cuda": None}}
    sdpg.save_checkpoint(saved, sdpg.build_char_tokenizer(), str(tmp_path / "checkpoint-1"), state)
    on_disk = load_file(tmp_path / "checkpoint-1" / "model.safetensors")
    assert set(on_disk) != set(saved.state_dict())  # the layout on disk is not the model's: the case this guards
    model, optimizer, scheduler = model_and_optimizer(1)
    sdpg.restore_checkpoint(str(tmp_path / "checkpoint-1"), model, optimizer, scheduler, random.Random(5))
    for (name, a), b in zip(model.state_dict().items(), saved.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(optimizer.state.values(), saved_optimizer.state.values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_bad_steps_must_come_in_a_row_to_stop_the_run(tmp_path, monkeypatch):
    """A step with a skipped update counts, a good one resets the count: two NaN steps out of every three never stop
    a run (guards a count that never resets, which would stop a long run after any three scattered NaNs)."""
    real, calls = sdpg.sdpg_loss, []

    def nan_but_every_third(*a, **k):  # one call per step here: one update of one micro-batch
        calls.append(1)
        return real(*a, **k) * (1.0 if len(calls) % 3 == 0 else float("nan"))

    monkeypatch.setattr(sdpg, "sdpg_loss", nan_but_every_third)
    sdpg.main(SMALL_RUN + ["--steps", "6", "--output-dir", str(tmp_path)])
    assert [r["skipped_updates"] for r in _rows(tmp_path / "metrics.jsonl")[1:]] == [1, 1, 0, 1, 1, 0]


def test_only_the_newest_two_checkpoints_are_kept(tmp_path):
    sdpg.main(SMALL_RUN + ["--steps", "6", "--save-every", "1", "--output-dir", str(tmp_path)])
    assert [os.path.basename(p) for p in sdpg.checkpoints(str(tmp_path))] == ["checkpoint-4", "checkpoint-5"]
    assert (tmp_path / "final" / "config.json").exists()


def test_nan_loss_is_skipped_and_stops_the_run(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    real = sdpg.sdpg_loss
    monkeypatch.setattr(sdpg, "sdpg_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(SystemExit, match="NaN/inf in 3 steps in a row"):
        sdpg.main(SMALL_RUN + ["--output-dir", str(tmp_path)])
    rows = _rows(tmp_path / "metrics.jsonl")
    assert [r["skipped_updates"] for r in rows[1:]] == [1, 1, 1]
    # no update happened: a checkpoint saved now would hold the initial, finite weights
    monkeypatch.setattr(sdpg, "sdpg_loss", real)
    sdpg.main(SMALL_RUN + ["--steps", "1", "--output-dir", str(tmp_path / "ok")])
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "ok" / "final")
    assert all(torch.isfinite(p).all() for p in final.parameters())


@pytest.mark.parametrize("flags,message", [
    (["--group-size", "1"], "group-size must be >= 2"),
    (["--steps", "0"], "--steps must be positive"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be positive"),
    (["--batch-prompts", "3", "--updates-per-batch", "2"], "multiple of --updates-per-batch"),
    (["--dataset", "missing.jsonl"], "no such dataset: missing.jsonl"),
    (["--dataset", "toy-reverse"], "no such dataset: toy-reverse"),
    (["--model", "./no-such-model"], "no such model directory"),
    (["--max-new-tokens", "600"], "exceeds the model's context of 512"),
    (["--beta", "-1"], "--eval-samples, --beta, --alpha: >= 0"),
])
def test_bad_input_gets_one_clear_line(flags, message, tmp_path):
    with pytest.raises(SystemExit, match=message) as e:
        sdpg.main(["--model", "tiny", "--output-dir", str(tmp_path), *flags])
    assert "\n" not in str(e.value.code)


@pytest.mark.parametrize("flags,message", [
    (["--kl-mode", "bogus"], "argument --kl-mode: invalid choice: 'bogus'"),
    (["--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_command_line_errors_are_one_line(flags, message, capsys):
    """argparse's own errors (a bad choice, a bad number, an unknown flag) come as one line that names the
    flag and points to --help, not as a usage block (guards against the default argparse.ArgumentParser)."""
    with pytest.raises(SystemExit) as e:
        sdpg.parse_args(["--model", "tiny", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "--help" in err and len(err.strip().splitlines()) == 1, err


def test_one_line_per_step_shows_every_metric_and_a_dash_for_one_that_is_off(tmp_path, capsys):
    """The line printed per step holds every key of its metrics row, '-' for a metric that is off (--beta 0 gives
    kl_distill None; a None formatted as a number would raise), and step 0 only the evaluation before training."""
    sdpg.main(SMALL_RUN + ["--steps", "1", "--beta", "0", "--output-dir", str(tmp_path)])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    rows = _rows(tmp_path / "metrics.jsonl")
    assert len(lines) == len(rows) == 2 and lines[0] == f"step 0 | eval_accuracy {rows[0]['eval_accuracy']:.4g}"
    assert [part.split(" ")[0] for part in lines[1].split(" | ")] == list(rows[1])
    assert " | kl_distill - | " in lines[1] and f" | reward_mean {rows[1]['reward_mean']:.4g} | " in lines[1]


def test_bad_dataset_files(tmp_path):
    empty, bad = tmp_path / "empty.jsonl", tmp_path / "bad.jsonl"
    empty.write_text("")
    bad.write_text("".join(json.dumps({"question": "q", "answer": "1"}) + "\n" for _ in range(5))
                   + json.dumps({"question": "q", "solution": "s"}) + "\n"
                   + json.dumps({"question": "q", "answer": "1"}) + "\n")
    with pytest.raises(SystemExit, match="could not load .*empty.jsonl"):
        sdpg.load_examples(str(empty), eval_n=1, seed=0)
    with pytest.raises(SystemExit, match="row 5 needs a 'question' and an 'answer'"):
        sdpg.load_examples(str(bad), eval_n=1, seed=0)
    with pytest.raises(SystemExit, match="has 7 rows, and its last --eval-n 7 are held out"):
        sdpg.load_examples(str(bad), eval_n=7, seed=0)


def test_an_output_dir_holding_a_finished_run_or_other_settings_is_refused(tmp_path):
    sdpg.main(SMALL_RUN + ["--steps", "1", "--output-dir", str(tmp_path / "done")])
    with pytest.raises(SystemExit, match="holds a finished run; choose another --output-dir"):
        sdpg.main(SMALL_RUN + ["--steps", "1", "--output-dir", str(tmp_path / "done")])
    out = tmp_path / "stopped"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(sdpg.parse_args(SMALL_RUN + ["--lr", "1e-2"]))))
    with pytest.raises(SystemExit, match=r"holds a run with other settings \(--lr 0.01\)") as e:
        sdpg.main(SMALL_RUN + ["--output-dir", str(out)])
    assert "\n" not in str(e.value.code)


def test_errors_reach_the_user_as_one_line_without_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for flags, code in ((["--model", "nobody/no-such-model"], 1), (["--kl-mode", "kl"], 2)):
        out = subprocess.run([sys.executable, os.path.join(HERE, "sdpg.py"), *flags, "--output-dir", str(tmp_path)],
                             capture_output=True, text=True, timeout=HANG_TIMEOUT, env=env)
        assert out.returncode == code and "Traceback" not in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("error:"), out.stderr
        if code == 1:  # the Hub is unreachable: the one line points at the offline demo
            assert "--model tiny --dataset toy" in out.stderr


def test_tokenizer_without_eos_is_refused(tmp_path, monkeypatch):
    real = sdpg.load_model

    def no_eos(*a, **k):
        model, tok = real(*a, **k)
        tok.eos_token = None
        return model, tok

    monkeypatch.setattr(sdpg, "load_model", no_eos)
    with pytest.raises(SystemExit, match="no EOS token"):
        sdpg.main(["--model", "tiny", "--output-dir", str(tmp_path)])


def test_bf16_sampler_follows_the_policy():
    model = sdpg.build_tiny_model(sdpg.build_char_tokenizer(), seed=3)
    sampler = sdpg.make_sampler(model, bf16=True)
    assert sampler is not model and next(sampler.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    sdpg.refresh_sampler(sampler, model)
    for a, b in zip(sampler.state_dict().values(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b.to(torch.bfloat16))
    # buffers (RoPE's inverse frequencies) stay float32: in bf16 the copy would be another model
    for (name, a), (_, b) in zip(sampler.named_buffers(), model.named_buffers(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert sdpg.make_sampler(model, bf16=False) is model
