"""SDPG: Self-Distilled Policy Gradient, in one readable file.

Paper: Liu, Zhang, Zhang, Gu, "Self-Distilled Policy Gradient", arXiv 2606.04036 (2026).
Equation numbers in the comments are the paper's.

SDPG trains a language model with a verifier (a checker that says whether an answer is right),
like GRPO, and adds a dense per-token teacher that costs no second model:

  1. Sample G answers per question from the model (the "student" view: question only).
  2. Score each answer with the verifier; compare it with the other answers to the same question
     (group-relative, std-normalised advantage A, Eq. 2.1).
  3. Show the SAME model the question plus privileged context (the reference answer and a worked
     solution) and read its next-token distribution q_t at every position of the sampled answer
     (the "teacher" view). Pull the student distribution p_t towards q_t with the exact reverse
     KL(p_t || q_t) summed over the whole vocabulary (Eq. 3.2), but only on answers with A > 0
     (the positive-advantage gate, Eq. 3.5).
  4. Keep the policy near the frozen initial model with a per-token KL anchor (Section 3.4).

  L_SDPG = L_out + beta(k) * L_OPD+ + alpha * L_K                                       (Eq. 3.1)

  (L_out: the outcome, policy-gradient term; L_OPD+: on-policy distillation on the positively
  rewarded answers; L_K: the KL anchor to the frozen initial model.)

Choices made here, each on purpose:
  * The distillation KL is exact: every logit column, not only the sampled token. It is computed
    from the final hidden states in chunks of tokens, with the chunk's logits recomputed in the
    backward pass, so float32 (tokens, V) logits never exist for more than one chunk at a time.
  * Advantages use the unbiased (Bessel) std of the group, as the authors' code does (torch.std).
  * Every sum over tokens is divided by the total response tokens of the group (all G answers,
    gated or not), then averaged over the prompts of the batch.
  * beta warms up and decays linearly (Section 3.5.2); the reference KL has four modes (urkl,
    the authors' default; ufkl, best in their tables; fkl; rkl: Appendix A.2).
  * One optimiser step per batch of rollouts by default, which is exactly on-policy; with
    --updates-per-batch > 1 the importance ratio and DAPO's dual clip come in (Appendix A.3).
  * The defaults follow the paper's method, except --kl-mode urkl and --clip-high 0.28, the released
    script's (the paper reports both urkl and ufkl, ufkl best), and a run scaled down to one GPU (16
    prompts, not 128; 512-token answers, not 4096). Where the authors' released training script differs (no gate,
    constant beta, a token mean, +1/-1 rewards with an overlong penalty, 8 updates per batch), a
    flag gives its value; --help names both, and README.md has both command lines.
  * Sampling, nearly all of a step's time, is a decoding loop of our own: a static KV cache and one
    fixed-shape step, recorded once as a CUDA graph on a GPU, instead of transformers' generate().

Run it:
  python sdpg.py --model tiny --dataset toy     # offline demo on a laptop CPU, about a minute
  python sdpg.py --model Qwen2.5-0.5B           # GSM8K on one GPU
  python sdpg.py --help                         # every setting, with the paper's values

The file, in order (a reader who stops at the end of part 4 has read the whole method):
  1. The SDPG maths: advantages, token weights, the exact reverse KL (and two cheaper stand-ins), the
     reference-KL anchor, the outcome loss and its clips, sdpg_loss, beta's schedule, the rewards.
  2. Scoring: the student, teacher and reference views of one sampled answer, a chunk of tokens at a time.
  3. Sampling: the decoding loop (a static KV cache, one fixed-shape step, a CUDA graph on a GPU); all
     the method needs of it is generate()'s contract, so a first read may skim it.
  4. One training step: sample, grade with the verifier, score the three views (score), update.
  5. The machinery: settings, device, models, data, prompts, more than one process, evaluation,
     checkpoints, run bookkeeping, and main, which only wires the parts together.
"""

from __future__ import annotations  # annotations may name classes defined further down (Args, Compute)

import argparse
import contextlib
import copy
import dataclasses
import importlib.util
import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import string
import sys
import time
import weakref
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, TextIO, get_type_hints

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from verifiers import extract_answer, gsm8k_gold, math_reward


# -----------------------------------------------------------------------------
# The SDPG maths. Rewards and advantages are (N,), one per answer; loss terms are (n, L): n rows of the
# batch (an update or a micro-batch) by L response positions, with `weights` holding each token's share
# of the update. Every function here but reward_function (which picks the verifier) is pure on tensors:
# copy it into another trainer as it is. SG[x] is stop-gradient (x.detach()): x's value, no gradient.


# The rows of a batch come in groups of G answers to one prompt, laid out contiguously, and the group
# statistics below reshape (N,) into (N / G, G). A row count that is not a multiple of G means the caller
# mixed up its batch (a group cut in two, or the wrong --group-size); without this check the reshape would
# fail with a message about shapes that names neither number.
def check_whole_groups(rows: int, group_size: int) -> None:
    """Raises a one-line ValueError unless `rows` is a whole number of groups of `group_size` rows."""
    if rows % group_size:
        raise ValueError(f"the number of rows N ({rows}) must be a multiple of the group size G ({group_size})")


# A_i = (R_i - mean_G(R)) / (std_G(R) + eps), unbiased std                          (Eq. 2.1)
def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """Group-relative, std-normalised advantages. rewards (N,) grouped contiguously, N = prompts * G.

    A group whose rewards are all equal gets A = 0 (nothing to learn from it).
    >>> group_advantages(torch.tensor([1., 0., 0., 0., 1., 1., 1., 1.]), group_size=4).round(decimals=4)
    tensor([ 1.5000, -0.5000, -0.5000, -0.5000,  0.0000,  0.0000,  0.0000,  0.0000])
    """
    if group_size < 2:
        raise ValueError("group_size must be >= 2: the std of a single reward is undefined")
    check_whole_groups(rewards.shape[0], group_size)
    r = rewards.float().view(-1, group_size)  # (B, G)
    A = (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + eps)  # (B, G), torch.std is unbiased
    return A.view(-1)  # (N,)


# Each token's share of the loss of one update, w_{i,t}, with sum over i, t of w_{i,t} = 1:
#   group       w_{i,t} = mask_{i,t} / (B * sum_{j in group(i)} |y_j|)   (Eq. 3.4; B prompts, all G answers
#               of the group counted, gated or not)
#   token-mean  w_{i,t} = mask_{i,t} / sum_{j,s} mask_{j,s}             (the authors' released code)
# 'group' gives each prompt the same weight and, inside a group, each token; 'token-mean' gives every
# token of the update the same weight, so a prompt with long answers weighs more. (The released code
# takes the mean over each micro-batch and weighs micro-batches by their answer count, which equals
# this when an update is one micro-batch; the mean over the whole update lets --micro-batch change
# memory only.) Either way the weights sum to 1 over the update, so sum(w * per_token_loss) splits
# over micro-batches of any size without changing the result.
def token_weights(mask: Tensor, group_size: int, agg: str = "group") -> Tensor:
    """Each token's weight: mask (N, L) of one update, N = prompts x G grouped contiguously -> (N, L).

    >>> token_weights(torch.tensor([[1, 1, 0], [1, 0, 0]]), group_size=2)
    tensor([[0.3333, 0.3333, 0.0000],
            [0.3333, 0.0000, 0.0000]])
    """
    m = mask.float()
    if agg == "token-mean":
        return m / m.sum()  # (N, L)
    if agg != "group":
        raise ValueError(f"unknown loss aggregation {agg!r}; use group or token-mean")
    check_whole_groups(m.shape[0], group_size)
    tokens_per_group = m.view(-1, group_size, m.shape[1]).sum(dim=(1, 2))  # (B,)
    per_sequence = tokens_per_group.repeat_interleave(group_size)[:, None]  # (N, 1)
    return m / per_sequence / tokens_per_group.shape[0]  # (N, L)


# KL(p || SG[q]) = sum_{a in V} p(a) (log p(a) - log q(a))                          (Eq. 3.2, 3.4)
def full_vocab_reverse_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Exact reverse KL over the whole vocabulary, teacher detached: (..., V), (..., V) -> (...).

    Reverse = student first, p = softmax(student_logits); the teacher is detached, so only p gets a
    gradient. Beware F.kl_div(input, target), which computes KL(target || input): the other direction.
    Computed in float32 whatever the input dtype.
    >>> s, t = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    >>> round(full_vocab_reverse_kl(s, t).item(), 4)  # p = (.881, .119), q = (.119, .881)
    1.5232
    """
    logp = F.log_softmax(student_logits.float(), dim=-1)  # (..., V)
    logq = F.log_softmax(teacher_logits.detach().float(), dim=-1)  # (..., V)
    return (logp.exp() * (logp - logq)).sum(dim=-1)  # (...)


# Two cheaper stand-ins for the exact KL, as other trainers use them; --distill-estimator picks one. Each is
# pure on tensors like full_vocab_reverse_kl, and each is 0 with zero gradient when q = p.
#
# Top-K with a tail bucket (SDPO, arXiv 2601.20802, in TRL as SDPOTrainer): S = the student's K likeliest tokens
# (chosen without gradient), and one more outcome, "any other token", holding the rest of each distribution's
# mass, so that the KL is still one between two proper distributions over K + 1 outcomes:
#   KL_K(p || SG[q]) = sum_{a in S} p(a) (log p(a) - log q(a)) + p(~S) (log p(~S) - log q(~S))
# With K = V there is no tail and it is the exact KL; with K < V it is a lower bound (merging outcomes never
# raises a KL).
def topk_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, k: int) -> Tensor:
    """Reverse KL over the student's top-k tokens plus a tail bucket, teacher detached: (..., V), (..., V) -> (...).
    >>> s, t = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.0, 2.0, 0.0]])
    >>> round(topk_reverse_kl(s, t, 3).item(), 4) == round(full_vocab_reverse_kl(s, t).item(), 4)
    True
    """
    if k >= student_logits.shape[-1]:  # no tail left: the full sum
        return full_vocab_reverse_kl(student_logits, teacher_logits)
    logp = F.log_softmax(student_logits.float(), dim=-1)  # (..., V)
    logq = F.log_softmax(teacher_logits.detach().float(), dim=-1)  # (..., V)
    top = logp.detach().topk(k, dim=-1).indices  # (..., K) the student's likeliest tokens
    in_top = torch.zeros_like(logp, dtype=torch.bool).scatter(-1, top, True)  # (..., V)
    lp_top, lq_top = logp.gather(-1, top), logq.gather(-1, top)  # (..., K)
    # log of each tail mass as a logsumexp over the columns outside S: exact and finite (S leaves one out at least)
    lp_tail = logp.masked_fill(in_top, float("-inf")).logsumexp(dim=-1)  # (...)
    lq_tail = logq.masked_fill(in_top, float("-inf")).logsumexp(dim=-1)  # (...)
    return (lp_top.exp() * (lp_top - lq_top)).sum(dim=-1) + lp_tail.exp() * (lp_tail - lq_tail)  # (...)


# The sampled token alone (on-policy distillation's usual estimate): y_t was drawn from p_t, so
#   r_t = log p_t(y_t) - log q_t(y_t)   has  E_{y~p}[r_t] = KL(p_t || q_t),
# and since E_{y~p}[grad log p(y)] = 0, the gradient of the KL is E_{y~p}[r_t grad log p_t(y_t)]: a per-token
# penalty r_t with the REINFORCE gradient SG[r_t] grad log p_t(y_t). Both are unbiased, with the variance of
# one draw per position. Only the sampled column of the teacher is needed.
def sampled_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> Tensor:
    """r_t = log p_t(y_t) - log q_t(y_t) for the sampled tokens, with the gradient SG[r_t] grad log p_t(y_t):
    (..., V), (..., V), (...) -> (...)."""
    logp = F.log_softmax(student_logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)  # (...)
    logq = F.log_softmax(teacher_logits.detach().float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    r = (logp - logq).detach()  # (...)
    return r + r * (logp - logp.detach())  # value r, gradient r * grad log p


def distill_kl(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, estimator: str, k: int) -> Tensor:
    """The per-token distillation term that --distill-estimator names: (..., V), (..., V), (...) -> (...)."""
    if estimator == "full":
        return full_vocab_reverse_kl(student_logits, teacher_logits)
    if estimator == "topk":
        return topk_reverse_kl(student_logits, teacher_logits, k)
    return sampled_reverse_kl(student_logits, teacher_logits, targets)


# Per sampled token, log w = log p_t(y_t) - log pi_ref(y_t)              (Section 3.4, Appendix A.2)
# UKL is the KL between unnormalised distributions; k2 and k3 are the names of Schulman's per-sample
# KL estimators (k3 = exp(-log w) - 1 + log w, the kl_ref metric).
#   urkl  0.5 (log w)^2           gradient  log w            UKL(pi_theta, pi_ref), "k2"
#   ufkl  exp(-log w) + log w     gradient  1 - exp(-log w)  UKL(pi_ref, pi_theta), "k3" + 1
#   fkl   exp(-log w)             gradient  -exp(-log w)     normalised forward KL
#   rkl   0.5 (log w + 1)^2       gradient  log w + 1        normalised reverse KL
# (gradient = d f / d log p_t(y_t), which then multiplies grad log p_t(y_t))
def reference_kl(logp: Tensor, ref_logp: Tensor, mode: str) -> Tensor:
    """Per-token reference-KL surrogate f(log w); any shape, ref_logp is treated as a constant.

    >>> reference_kl(torch.tensor([-1.0]), torch.tensor([-2.0]), "urkl")
    tensor([0.5000])
    """
    log_w = logp - ref_logp.detach()
    if mode == "urkl":
        return 0.5 * log_w**2
    if mode == "ufkl":
        return torch.exp(-log_w) + log_w
    if mode == "fkl":
        return torch.exp(-log_w)
    if mode == "rkl":
        return 0.5 * (log_w + 1) ** 2
    raise ValueError(f"unknown kl mode {mode!r}; use urkl, ufkl, fkl or rkl")


# Outcome term, per token. On-policy (Section 3.2): -SG[A] * log p_t(y_t). With several updates per
# batch (Appendix A.3), rho = p_theta / p_rollout and the PPO clip with DAPO's dual clip:
#   A >= 0: max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high));  A < 0: min(that, -A c)
def policy_loss(logp: Tensor, old_logp: Tensor, A: Tensor, eps_low: float, eps_high: float, c: float) -> Tensor:
    """logp, old_logp (n, L); A (n, 1) -> (n, L).

    When logp == old_logp (one update per batch), rho = 1, nothing is clipped, and the gradient is
    exactly -A * grad log p: plain REINFORCE with the group advantage.
    """
    rho = torch.exp(logp - old_logp.detach())  # (n, L)
    pg = torch.maximum(-A * rho, -A * rho.clamp(1 - eps_low, 1 + eps_high))  # (n, L)
    return torch.where(A < 0, torch.minimum(pg, -A * c), pg)  # (n, L)


# Per token: policy_loss(rho, A) + beta(k) * m_i * SG[rho] * KL_t + alpha * SG[rho] * f(log w_t), weighted and
# summed (Eq. 3.1). rho = p_theta(y_t) / p_rollout(y_t) is 1 with one update per batch; with several, the
# distillation and the anchor are reweighted by SG[rho] like the outcome term (Appendix A.3).
def sdpg_loss(logp: Tensor, old_logp: Tensor, kl_distill: Tensor | None, ref_logp: Tensor | None,
              advantages: Tensor, weights: Tensor, beta_k: float, alpha: float, kl_mode: str,
              clip_low: float = 0.2, clip_high: float = 0.28, clip_c: float = 10.0, gate: bool = True) -> Tensor:
    # (the clip defaults are the released script's, as in Args; they act only when old_logp != logp)
    """L_SDPG = L_out + beta(k) L_OPD+ + alpha L_K (Eq. 3.1) for a slice of the batch.

    logp, old_logp, kl_distill, ref_logp, weights: (n, L); advantages: (n,). kl_distill None means
    beta = 0 (no teacher), ref_logp None means alpha = 0 (no reference). gate=False distils every
    answer (m_i = 1), as the authors' released script does.
    """
    A = advantages[:, None].detach()  # (n, 1), SG[A]
    per_token = policy_loss(logp, old_logp, A, clip_low, clip_high, clip_c)  # (n, L)
    rho = torch.exp(logp - old_logp).detach()  # (n, L), 1 when on-policy
    if kl_distill is not None:
        m = (A > 0).float() if gate else torch.ones_like(A)  # (n, 1), the gate m_i = 1[A_i > 0]  (Eq. 3.5)
        per_token = per_token + beta_k * m * rho * kl_distill
    if ref_logp is not None:
        per_token = per_token + alpha * rho * reference_kl(logp, ref_logp, kl_mode)
    return (weights * per_token).sum()


# beta(k) = beta_base * min(1, k / T_warm) * min(1, (T - k) / T_decay)          (Section 3.5.2)
def beta_schedule(step: int, total_steps: int, beta: float, warmup_steps: int, decay_steps: int) -> float:
    """Weight of the distillation term at training step k = step (1-based); a window of 0 is off.

    With the paper's windows (50 up, 350 down, of 400) beta_base is reached at k = 50 only:
    >>> [round(beta_schedule(k, 400, 1e-3, 50, 350), 6) for k in (1, 25, 50, 51, 200, 400)]
    [2e-05, 0.0005, 0.001, 0.000997, 0.000571, 0.0]
    """
    warm = min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0
    decay = min(1.0, (total_steps - step) / decay_steps) if decay_steps > 0 else 1.0
    return beta * max(0.0, warm) * max(0.0, decay)


# DAPO's overlong penalty (Yu et al., 2025) on an answer of |y| tokens, with L = --max-new-tokens
# and a buffer of B tokens:  0 for |y| <= L - B,  (L - B - |y|) / B for L - B < |y| <= L (-1 at L).
def overlong_penalty(lengths: Tensor, max_len: int, buffer: int) -> Tensor:
    """lengths (N,) in tokens -> (N,) penalties in [-1, 0]; a buffer of 0 switches it off.

    >>> overlong_penalty(torch.tensor([6, 7, 8, 10]), max_len=10, buffer=4)
    tensor([ 0.0000, -0.2500, -0.5000, -1.0000])
    """
    if buffer <= 0:
        return torch.zeros(lengths.shape, device=lengths.device)
    return ((max_len - buffer - lengths) / buffer).clamp(max=0.0)  # (N,)


# R_i = 1 if the verifier accepts y_i, else r_wrong; plus the overlong penalty.
# An affine change of every reward, R -> a R + b with a > 0, leaves the std-normalised advantage of
# Eq. 2.1 as it was (up to the 1e-6 in its denominator), so the released script's -1 for a wrong
# answer changes nothing alone: it only sets how much a penalty of up to -1 weighs next to the gap
# between a right and a wrong answer (1 with r_wrong = 0, 2 with r_wrong = -1).
def shaped_reward(correct: Tensor, lengths: Tensor, wrong_reward: float, max_len: int, buffer: int) -> Tensor:
    """correct (N,) 1.0 or 0.0 from the verifier, lengths (N,) answer tokens -> (N,) rewards.

    >>> shaped_reward(torch.tensor([1., 0., 1.]), torch.tensor([5, 9, 10]), -1.0, max_len=10, buffer=4)
    tensor([ 1.0000, -1.7500,  0.0000])
    """
    reward = torch.where(correct > 0, 1.0, wrong_reward).to(correct.device)  # (N,)
    return reward + overlong_penalty(lengths, max_len, buffer)  # (N,)


# The verifier, a (completion, gold) -> 1.0 or 0.0 function: ours, or Hugging Face's Math-Verify (an
# optional package, imported only when asked for). Math-Verify reads LaTeX only inside maths delimiters,
# hence the gold in $...$, and bounds each parse and each comparison with a SIGALRM timeout, which works in
# the main thread only (where sdpg.py scores).
MATH_VERIFY_TIMEOUT_S = 2


def reward_function(verifier: str):
    """--verifier's name -> its (completion, gold) -> reward function."""
    if verifier == "ours":
        return math_reward
    try:
        import math_verify
    except ImportError:
        raise SystemExit("error: --verifier math-verify needs the math-verify package: "
                         "pip install math-verify") from None
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its timeout warnings repeat the whole answer

    def math_verify_reward(completion: str, gold: str) -> float:
        if not isinstance(completion, str) or not isinstance(gold, str):
            return 0.0
        gold_parsed = math_verify.parse(f"${gold}$", parsing_timeout=MATH_VERIFY_TIMEOUT_S)
        answer = math_verify.parse(completion, parsing_timeout=MATH_VERIFY_TIMEOUT_S)
        return float(math_verify.verify(gold_parsed, answer, timeout_seconds=MATH_VERIFY_TIMEOUT_S))  # gold first

    return math_verify_reward


# -----------------------------------------------------------------------------
# Scoring. The logits at response positions come from three views of the same answer ids:
#   student   pi_theta(. | x, y_<t)     with gradients
#   teacher   pi_theta(. | c, x, y_<t)  same weights, privileged prompt, no gradients (stop-grad)
#   reference pi_ref(. | x, y_<t)       frozen initial weights, no gradients
# We stop at the final hidden states (N, L, H) and turn them into logits a chunk of tokens at a
# time: (tokens, V) float32 logits at V = 151,936 are the memory wall of full-vocabulary methods.


def response_hidden_states(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor,
                           response_ids: Tensor, response_mask: Tensor) -> Tensor:
    """Final hidden states that predict each response token: (N, P), (N, L) -> (N, L, H).

    The input is prompt ids + the SAMPLED response ids, never re-tokenised text, so the teacher
    scores exactly the tokens the student produced.
    """
    ids = torch.cat([prompt_ids, response_ids], dim=1)  # (N, P + L)
    attn = torch.cat([prompt_mask, response_mask], dim=1)  # (N, P + L)
    # Left padding: position ids count real tokens only, so a padded prompt sees the same positions
    # as the same prompt alone.
    position_ids = (attn.cumsum(dim=1) - 1).clamp(min=0)  # (N, P + L)
    h = model.base_model(input_ids=ids, attention_mask=attn, position_ids=position_ids,
                         use_cache=False).last_hidden_state  # (N, P + L, H)
    P = prompt_ids.shape[1]
    return h[:, P - 1:-1]  # (N, L, H): the state at position t predicts token t + 1


class ChunkTerms(NamedTuple):
    """Per-token terms of M response tokens, each (M,)."""
    logp: Tensor  # log p_t(y_t), with grad
    kl: Tensor  # the distillation term whose gradient trains (the exact KL with estimator 'full'); 0 without teacher
    kl_exact: Tensor  # the exact KL(p_t || q_t), no grad: the logged kl_distill, whatever the estimator
    entropy: Tensor  # H(p_t), no grad, a metric


def _chunk_terms(h_student: Tensor, h_teacher: Tensor | None, targets: Tensor, lm_head: nn.Module,
                 teacher_head: nn.Module, temperature: float, estimator: str, k: int) -> tuple[Tensor, ...]:
    """One chunk of chunked_token_terms: the hidden states (C, H) of its C tokens -> the four (C,) ChunkTerms."""
    logits = lm_head(h_student).float() / temperature  # (C, V), the only place (C, V) logits live
    lse = torch.logsumexp(logits, dim=-1)  # (C,)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - lse  # (C,) log p_t(y_t)
    with torch.no_grad():  # a metric only: no autograd buffers for it
        entropy = lse - (logits.softmax(dim=-1) * logits).sum(-1)  # (C,) H(p_t)
    if h_teacher is None:
        return logp, torch.zeros_like(logp), torch.zeros_like(entropy), entropy
    with torch.no_grad():  # the teacher is a stop-gradient target: no graph for its (C, V) logits
        teacher_logits = teacher_head(h_teacher).float() / temperature  # (C, V)
    kl = distill_kl(logits, teacher_logits, targets, estimator, k)  # (C,)
    if estimator == "full":
        return logp, kl, kl.detach(), entropy
    with torch.no_grad():  # the exact KL as the metric: one more pass over the (C, V) logits, no graph
        kl_exact = full_vocab_reverse_kl(logits, teacher_logits)  # (C,)
    return logp, kl, kl_exact, entropy


def chunked_token_terms(h_student: Tensor, h_teacher: Tensor | None, targets: Tensor, lm_head: nn.Module,
                        temperature: float, chunk_size: int, teacher_head: nn.Module | None = None,
                        estimator: str = "full", k: int = 64) -> ChunkTerms:
    """Per-token log p_t(y_t), the distillation term, the exact KL(p_t || q_t) and the entropy of p_t, computed
    chunk by chunk.

    h_student (M, H) with grad, h_teacher (M, H) or None, targets (M,) -> four (M,) tensors. M counts
    real response tokens only (padding was dropped before). teacher_head turns the teacher's hidden
    states into logits [default: lm_head, the policy's own, as in SDPG]. With gradients on, each
    chunk is wrapped in torch.utils.checkpoint: the forward keeps only the (C, H) inputs and the
    backward recomputes the chunk's (C, V) logits, so peak memory is about chunk_size x V x 4 bytes
    x a few, instead of M x V x 4 bytes x a few. The result equals the unchunked computation.
    """
    teacher_head = lm_head if teacher_head is None else teacher_head
    outs = []
    for i in range(0, targets.shape[0], chunk_size):
        hs, y = h_student[i:i + chunk_size], targets[i:i + chunk_size]  # (C, H), (C,)
        ht = None if h_teacher is None else h_teacher[i:i + chunk_size].detach()  # (C, H)
        terms = (hs, ht, y, lm_head, teacher_head, temperature, estimator, k)
        if torch.is_grad_enabled() and hs.requires_grad:
            outs.append(checkpoint(_chunk_terms, *terms, use_reentrant=False))
        else:
            outs.append(_chunk_terms(*terms))
    return ChunkTerms(*(torch.cat(parts) for parts in zip(*outs)))  # each (M,)


def scatter_tokens(values: Tensor, mask: Tensor) -> Tensor:
    """(M,) values of the real tokens -> (N, L) with zeros at padding (keeps gradients)."""
    out = values.new_zeros(mask.shape)  # (N, L)
    out[mask.bool()] = values
    return out


# -----------------------------------------------------------------------------
# Sampling


# Decoding is nearly all of an SDPG step's time: 512 new tokens are 512 forward passes one after
# the other, each reading every weight once. transformers' generate() runs each pass as about a
# thousand small kernel launches and then waits on the host to ask whether every row has stopped,
# so on a GPU the host, not the hardware, sets its pace. The loop below keeps everything one step
# touches in tensors of a fixed shape, allocated once per batch shape: a key/value cache with a
# column for every position of prompt + answer, the token ids, the positions and the stop flags.
# A step is then the same kernels on the same memory every time, which CUDA records once as a graph
# and replays with a single launch per token. The loop calls the model's own embeddings, norms,
# projections, MLPs and rotary embedding; only attention over the cache is written out here (the
# cache classes of transformers change their API from one release to the next).

FAST_DECODING_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # decoder layers made of exactly those parts


def fast_decoding_unsupported(model: nn.Module) -> str | None:
    """Why decode_step cannot serve this model, or None when it can."""
    config = model.config
    if config.model_type not in FAST_DECODING_MODEL_TYPES:
        return f"model type '{config.model_type}' (the loop serves {', '.join(FAST_DECODING_MODEL_TYPES)})"
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    if sliding or any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return "sliding-window attention"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if rope_type in ("dynamic", "longrope"):  # these rescale RoPE from the sequence length, on the host
        return f"RoPE type '{rope_type}'"
    return None


@dataclass
class DecodeState:
    """Every tensor a decoding step reads or writes, for one batch shape. Allocated once and updated
    in place: a CUDA graph replays the same memory addresses."""
    keys: Tensor  # (layers, N, H_kv, C, D) the KV cache: a column per position of prompt + answer
    values: Tensor  # (layers, N, H_kv, C, D)
    ids: Tensor  # (N, C) the left-padded prompt ids, then the sampled ids
    visible: Tensor  # (N, C) bool: the column holds a real token (not padding, not yet written)
    position: Tensor  # (N,) RoPE position of the token in `column`: the number of real tokens before it
    column: Tensor  # (1,) the column of the newest token, the input of the next step
    done: Tensor  # (N,) bool: the row has sampled a stop token
    stop_ids: Tensor  # (S,)
    pad_id: int
    graphs: dict = field(default_factory=dict)  # temperature -> torch.cuda.CUDAGraph of decode_step


def new_decode_state(model: nn.Module, n: int, columns: int, stop_ids: list[int], pad_id: int) -> DecodeState:
    """Zeroed state for n rows and a cache of `columns` positions, on the model's device and in its dtype."""
    p, config = next(model.parameters()), model.config
    head_dim = model.base_model.layers[0].self_attn.head_dim
    cache_shape = (config.num_hidden_layers, n, config.num_key_value_heads, columns, head_dim)

    def zeros(*shape, dtype=torch.long):
        return torch.zeros(shape, dtype=dtype, device=p.device)
    return DecodeState(keys=zeros(*cache_shape, dtype=p.dtype), values=zeros(*cache_shape, dtype=p.dtype),
                       ids=zeros(n, columns), visible=zeros(n, columns, dtype=torch.bool), position=zeros(n),
                       column=zeros(1), done=zeros(n, dtype=torch.bool),
                       stop_ids=torch.tensor(stop_ids, device=p.device), pad_id=pad_id)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position embedding in the half-split layout of Hugging Face checkpoints.
    x (N, heads, T, D), cos and sin (N, T, D) from the model's own rotary_emb -> (N, heads, T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]


# Grouped-query attention: Qwen2.5-0.5B's 14 query heads share 2 key/value heads, 7 to a group.
# Decoding reads the whole cache at every token, so each key/value head is read once for its group
# (the group's query heads become rows of one matmul) instead of being copied once per query head,
# which is what transformers' sdpa path does whenever there is a padding mask: 7x the cache traffic.
def grouped_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float) -> Tensor:
    """q (N, H_q, T, D); k, v (N, H_kv, S, D); allowed (N, 1, T, S) bool -> (N, H_q, T, D).
    Query head h attends with key/value head h // (H_q / H_kv), as in transformers."""
    N, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    q = q.reshape(N, Hkv, Hq // Hkv * T, D)  # (N, H_kv, group x T, D)
    scores = (q @ k.transpose(2, 3)).view(N, Hq, T, S) * scale  # (N, H_q, T, S)
    probs = scores.masked_fill(~allowed, float("-inf")).float().softmax(dim=-1).to(v.dtype)  # (N, H_q, T, S)
    return (probs.view(N, Hkv, Hq // Hkv * T, S) @ v).view(N, Hq, T, D)


def cached_attention(attn: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, keys: Tensor, values: Tensor,
                     columns: Tensor, allowed: Tensor) -> Tensor:
    """One attention block of the model for new tokens x (N, T, H) that sit in cache `columns` (T,).

    Writes their keys and values into keys, values (N, H_kv, C, D), then attends over the first S
    cache columns as allowed (N, T, S) says. Returns the block's output (N, T, H).
    """
    N, T, _ = x.shape
    D = attn.head_dim
    q = attn.q_proj(x).view(N, T, -1, D)  # (N, T, H_q, D)
    k = attn.k_proj(x).view(N, T, -1, D)  # (N, T, H_kv, D)
    v = attn.v_proj(x).view(N, T, -1, D).transpose(1, 2)  # (N, H_kv, T, D)
    if hasattr(attn, "q_norm"):  # Qwen3 normalises every query and key head before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = rotate(q.transpose(1, 2), cos, sin), rotate(k.transpose(1, 2), cos, sin)  # (N, H_q or H_kv, T, D)
    keys.index_copy_(2, columns, k)
    values.index_copy_(2, columns, v)
    S = allowed.shape[-1]
    k_seen, v_seen = keys[:, :, :S], values[:, :, :S]  # (N, H_kv, S, D)
    if T == 1:  # a decoding step: bandwidth-bound, read each key/value head once
        out = grouped_attention(q, k_seen, v_seen, allowed[:, None], attn.scaling)  # (N, H_q, 1, D)
    else:  # the prompt, once per call: torch's fused kernel, which never holds a (T, S) score matrix per head
        group = q.shape[1] // k_seen.shape[1]
        out = F.scaled_dot_product_attention(q, k_seen.repeat_interleave(group, dim=1),
                                             v_seen.repeat_interleave(group, dim=1), attn_mask=allowed[:, None],
                                             scale=attn.scaling)  # (N, H_q, T, D)
    return attn.o_proj(out.transpose(1, 2).reshape(N, T, -1))


def run_layers(model: nn.Module, ids: Tensor, positions: Tensor, state: DecodeState, columns: Tensor,
               allowed: Tensor) -> Tensor:
    """The model's transformer on new tokens: ids, positions (N, T) that go into cache `columns` (T,)
    -> final hidden states (N, T, H)."""
    base = model.base_model
    x = model.get_input_embeddings()(ids)  # (N, T, H)
    cos, sin = base.rotary_emb(x, positions)  # (N, T, D) each
    for i, layer in enumerate(base.layers):
        x = x + cached_attention(layer.self_attn, layer.input_layernorm(x), cos, sin, state.keys[i],
                                 state.values[i], columns, allowed)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return base.norm(x)


# Sampling inside the step, with no host sync (the Gumbel-max trick): with u ~ U(0, 1) drawn
# independently for every vocabulary entry, argmax(logits / T - log(-log u)) is an exact draw from
# softmax(logits / T). Temperature 0 is greedy decoding.
def sample_next(logits: Tensor, temperature: float) -> Tensor:
    """(N, V) logits -> (N,) token ids."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    u = torch.rand(logits.shape, device=logits.device).clamp_(min=torch.finfo(torch.float32).tiny)  # (N, V)
    return (logits.float() / temperature - torch.log(-torch.log(u))).argmax(dim=-1)


def prefill(model: nn.Module, state: DecodeState, prompt_ids: Tensor, prompt_mask: Tensor, temperature: float) -> None:
    """Runs the left-padded prompts (N, P) through the model into cache columns [0, P) and samples
    each row's first answer token into column P."""
    P = prompt_ids.shape[1]
    real = prompt_mask.bool()  # (N, P)
    state.ids[:, :P] = prompt_ids
    state.visible.zero_()
    state.visible[:, :P] = real
    positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)  # (N, P), as in response_hidden_states
    causal = torch.ones(P, P, dtype=torch.bool, device=real.device).tril()  # (P, P)
    # A token attends to the real tokens up to itself. A padding position attends to itself alone:
    # some attention kernels return NaN for a row with nothing allowed, and NaN values in the cache
    # would poison every later step even where they are masked (0 x NaN is NaN).
    allowed = causal & real[:, None, :] | torch.eye(P, dtype=torch.bool, device=real.device)  # (N, P, P)
    h = run_layers(model, prompt_ids, positions, state, torch.arange(P, device=real.device), allowed)  # (N, P, H)
    first = sample_next(model.get_output_embeddings()(h[:, -1]), temperature)  # (N,)
    state.ids[:, P] = first
    state.done.copy_((first[:, None] == state.stop_ids).any(dim=1))
    state.position.copy_(prompt_mask.sum(dim=1))
    state.column.fill_(P)


def decode_step(model: nn.Module, state: DecodeState, temperature: float) -> None:
    """Feeds the token in `column` to the model and samples the next one into `column` + 1.

    Fixed shapes, in place, and no .item(), .tolist() or Python branch on a tensor's value: CUDA can
    record it as a graph. A row that has stopped keeps running (fixed shapes) but only appends padding.
    """
    token = state.ids.index_select(1, state.column)  # (N, 1)
    state.visible.index_fill_(1, state.column, True)
    h = run_layers(model, token, state.position[:, None], state, state.column, state.visible[:, None, :])  # (N, 1, H)
    next_ids = sample_next(model.get_output_embeddings()(h[:, 0]), temperature)  # (N,)
    next_ids = torch.where(state.done, state.pad_id, next_ids)  # (N,)
    state.done |= (next_ids[:, None] == state.stop_ids).any(dim=1)
    state.ids.index_copy_(1, state.column + 1, next_ids[:, None])
    state.position += 1
    state.column += 1


# One DecodeState per model, batch size and stop ids, kept beside the model (weakly: it goes when
# the model goes), so a training run allocates its cache and records its graph once, not every step.
# Training and greedy evaluation with the same batch size share one cache, each with its own graph.
_DECODE_STATES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def decode_state_for(model: nn.Module, n: int, columns: int, temperature: float, stop_ids: list[int],
                     pad_id: int) -> DecodeState:
    """The state for n rows with room for `columns` positions (a new, larger one if it has too few),
    with a CUDA graph of decode_step at this temperature on CUDA."""
    states = _DECODE_STATES.setdefault(model, {})
    key = (n, tuple(stop_ids), pad_id)
    state = states.get(key)
    if state is None or state.ids.shape[1] < columns:
        states.pop(key, None)  # free the old cache first
        # Rounded up, so that a batch with slightly longer prompts still fits and needs no new graph.
        state = states[key] = new_decode_state(model, n, 64 * math.ceil(columns / 64), stop_ids, pad_id)
    if state.keys.is_cuda and temperature not in state.graphs:
        try:
            state.graphs[temperature] = capture_decode_step(model, state, temperature)  # the section's last function
        except RuntimeError as e:  # a model whose layers sync with the host cannot be recorded
            notice_once(f"decoding without a CUDA graph (slower): recording the step failed: {first_line(e)}")
            state.graphs[temperature] = None
    return state


_NOTICES: set[str] = set()


def notice_once(message: str) -> None:
    """Prints a message the first time it comes up in this process."""
    if message not in _NOTICES:
        _NOTICES.add(message)
        print(message)


@torch.no_grad()
def generate(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, max_new_tokens: int,
             temperature: float, top_p: float, stop_ids: list[int], pad_id: int) -> tuple[Tensor, Tensor]:
    """Samples one answer per row, all rows in ONE batched decoding loop (temperature 0 = greedy).

    prompt_ids, prompt_mask: (N, P) left-padded. Returns response ids and mask, both (N, L), where L
    is the longest answer (at most max_new_tokens); after its stop token a row holds pad_id.
    """
    # Nucleus sampling needs a sort of the vocabulary at every token, and its answers are only
    # approximately on-policy anyway; models with other layer types need transformers' own code.
    unsupported = "--top-p below 1" if top_p < 1 else fast_decoding_unsupported(model)
    if unsupported:
        notice_once(f"sampling with transformers' generate() (slower): {unsupported}")
        return hf_generate(model, prompt_ids, prompt_mask, max_new_tokens, temperature, top_p, stop_ids, pad_id)
    N, P = prompt_ids.shape
    # No autocast: the loop computes in the sampler's own dtype (bf16 on CUDA, see make_sampler). An
    # autocast that re-casts float32 weights at every token would cost bandwidth, and its cache of
    # cast weights does not mix with CUDA graphs.
    with torch.autocast(prompt_ids.device.type, enabled=False):
        state = decode_state_for(model, N, P + max_new_tokens, temperature, stop_ids, pad_id)
        graph = state.graphs.get(temperature)
        prefill(model, state, prompt_ids, prompt_mask, temperature)  # samples the first token
        new_tokens = 1
        while new_tokens < max_new_tokens:
            if graph is not None:
                graph.replay()
            else:
                decode_step(model, state, temperature)
            new_tokens += 1
            if new_tokens % 32 == 0 and state.done.all():  # the only host sync, once every 32 tokens
                break
    response_ids = state.ids[:, P:P + new_tokens].clone()  # (N, L)
    response_mask = response_mask_from_stops(response_ids, stop_ids)  # (N, L)
    longest = int(response_mask.sum(dim=1).max())
    return response_ids[:, :longest], response_mask[:, :longest]


def response_mask_from_stops(response_ids: Tensor, stop_ids: list[int]) -> Tensor:
    """(N, L) sampled ids -> (N, L) mask: 1 up to AND including the first stop token, 0 after.

    The mask comes from the stop tokens, never from pad_token_id: pad often equals EOS, and then a
    real EOS would be masked out and the model never learns to stop.
    >>> response_mask_from_stops(torch.tensor([[5, 2, 9, 2], [7, 7, 7, 7]]), stop_ids=[2])
    tensor([[1, 1, 0, 0],
            [1, 1, 1, 1]])
    """
    is_stop = torch.isin(response_ids, torch.tensor(stop_ids, device=response_ids.device)).long()  # (N, L)
    stops_before = is_stop.cumsum(dim=1) - is_stop  # (N, L) stop tokens strictly before t
    return (stops_before == 0).long()


def decode_responses(tokenizer, response_ids: Tensor, response_mask: Tensor) -> list[str]:
    """(N, L) ids and mask -> N strings, each decoded from its own tokens only.

    Never decode `ids * mask`: the zeros become token 0, which in Qwen's vocabulary is "!" and would
    turn "#### 18" into "#### 18!!!!" and a right answer into reward 0.
    """
    return [tokenizer.decode(ids[m.bool()].tolist(), skip_special_tokens=True)
            for ids, m in zip(response_ids, response_mask)]


@torch.no_grad()
def hf_generate(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, max_new_tokens: int,
                temperature: float, top_p: float, stop_ids: list[int], pad_id: int) -> tuple[Tensor, Tensor]:
    """generate() through transformers' model.generate: every model, top-p, and host-bound speed.
    It derives position ids from the attention mask, so left padding shifts nothing. The answers come from
    softmax(logits / temperature) (cut to the top-p nucleus) and nothing else, whoever calls this: no setting
    is taken from model.generation_config (a Hub model's may hold a repetition penalty, top_k, min_p...,
    which would draw the answers from another distribution than p_t). top_k=0 because transformers would
    otherwise keep only the 50 likeliest tokens."""
    from transformers import GenerationConfig

    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else \
        dict(do_sample=False)
    # use_cache=True: with gradient checkpointing switched on, some transformers versions would
    # otherwise drop the KV cache and recompute the whole sequence at every new token.
    plain = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id,
                             use_cache=True, **sampling)
    # Passing `plain` alone is not enough: transformers (5.x) fills every setting that a passed config leaves
    # unset (None: repetition_penalty, min_p, no_repeat_ngram_size...) from model.generation_config, and only
    # then from its neutral defaults. So for this one call the model's own config is `plain` too, and every
    # setting not named above gets transformers' neutral default; the model's config is put back afterwards,
    # also on an error, so a caller (or save_pretrained) finds it unchanged.
    kept = model.generation_config
    model.generation_config = plain
    try:
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=plain)  # (N, P + L)
    finally:
        model.generation_config = kept
    response_ids = out[:, prompt_ids.shape[1]:]  # (N, L)
    return response_ids, response_mask_from_stops(response_ids, stop_ids)


# The decoding loop computes in its model's dtype, and a decoding step is bound by reading the
# weights: float32 weights read 4 bytes per parameter per token, bf16 ones 2 (what was measured:
# benchmarks/results/performance.md). So on CUDA the answers come from a bf16 copy of the policy
# whose weights are refreshed from the float32 master weights before each rollout, in place so that
# the recorded CUDA graph reads them, for 2 bytes per parameter of extra memory. The copy is close
# to, not bit-identical with, the autocast forward that scores the answers (autocast keeps norms and
# the residual stream in float32): like every RL system with a separate inference engine, the
# rollouts are on-policy up to bf16 rounding.
def make_sampler(model: nn.Module, bf16: bool, whole_copy: bool = False) -> nn.Module:
    """The model that generates: a frozen bf16 copy when computing in bf16, else the model itself (or, with
    whole_copy=True, for --fsdp whose policy is sharded, a whole float32 copy)."""
    return frozen_copy(model, torch.bfloat16 if bf16 else torch.float32) if bf16 or whole_copy else model


@torch.no_grad()
def refresh_sampler(sampler: nn.Module, model: nn.Module) -> None:
    """Copies the current policy weights into the sampler (a no-op when they are one model)."""
    if sampler is not model:
        for dst, src in zip(sampler.parameters(), model.parameters()):
            dst.copy_(whole(src))  # whole(): the tensor itself, or with --fsdp gathered from the ranks' shards


def capture_decode_step(model: nn.Module, state: DecodeState, temperature: float) -> "torch.cuda.CUDAGraph":
    """Records decode_step once as a CUDA graph: graph.replay() reruns all its kernels with one launch.

    The graph reads and writes the memory it was recorded on: the state tensors, and the model's
    weights. refresh_sampler copies the new policy INTO those weights (copy_), and an optimiser step
    updates them in place, so every replay decodes with the current weights without a new capture.
    (Assigning new tensors to the parameters, p.data = ..., would not be seen.) The warm-up steps run
    outside the capture, as CUDA graphs require; they only scribble on the state, which prefill resets.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            decode_step(model, state, temperature)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_step(model, state, temperature)
    return graph


# -----------------------------------------------------------------------------
# One training step: sample, score, update.


@dataclass
class Rollouts:
    """One step's batch, N = prompts x G rows, grouped contiguously."""
    prompt_ids: Tensor  # (N, P) student prompts, left-padded
    prompt_mask: Tensor  # (N, P)
    teacher_ids: Tensor  # (N, Pc) teacher prompts (with privileged context), left-padded
    teacher_mask: Tensor  # (N, Pc)
    response_ids: Tensor  # (N, L) sampled ids
    response_mask: Tensor  # (N, L) 1 up to and including the first stop token
    rewards: Tensor  # (N,)
    advantages: Tensor  # (N,)


def collect_rollouts(sampler, tokenizer, examples: list[dict], args: Args, instruction: str, stop_ids: list[int],
                     compute: Compute, templates: tuple[str, str], reward=math_reward) -> Rollouts:
    """Samples G answers for each example in one generate call and scores them with the verifier `reward`; the
    teacher's prompts carry the privileged context that --teacher-context names (privileged_contexts)."""
    G = args.group_size
    student = [encode_prompt(tokenizer, prompt_texts(ex, instruction, templates)[0]) for ex in examples
               for _ in range(G)]  # N lists, G copies each
    prompt_ids, prompt_mask = left_pad(student, tokenizer.pad_token_id, compute.device)  # (N, P)
    sampler.eval()
    with autocast(compute):
        response_ids, response_mask = generate(sampler, prompt_ids, prompt_mask, args.max_new_tokens,
                                               args.temperature, args.top_p, stop_ids, tokenizer.pad_token_id)
    completions = decode_responses(tokenizer, response_ids, response_mask)
    golds = [ex["answer"] for ex in examples for _ in range(G)]
    correct = torch.tensor([reward(c, g) for c, g in zip(completions, golds)], device=compute.device)  # (N,)
    # The teacher's prompt: the student's, plus the privileged context c (by default a line with the gold answer
    # and one with the worked solution: TEACHER_TEMPLATE, and privileged_contexts for --teacher-context, both in
    # the Prompts section). It is built after the verifier, because the 'peer' context shows another right answer.
    contexts = privileged_contexts(examples, args.teacher_context, G, completions, correct.bool().tolist())
    teacher = [encode_prompt(tokenizer, t) for t in teacher_texts(examples, instruction, templates[1], contexts, G)]
    teacher_ids, teacher_mask = left_pad(teacher, tokenizer.pad_token_id, compute.device)  # (N, Pc)
    rewards = shaped_reward(correct, response_mask.sum(dim=1), args.wrong_reward, args.max_new_tokens,
                            args.overlong_buffer)  # (N,)
    return Rollouts(prompt_ids, prompt_mask, teacher_ids, teacher_mask, response_ids, response_mask,
                    rewards, group_advantages(rewards, G))


class TokenTerms(NamedTuple):
    """Per-token (n, L) terms of some rows of the batch; zeros at padding."""
    logp: Tensor  # log p_t(y_t), student, with grad when grad is enabled
    kl_distill: Tensor | None  # the distillation term (--distill-estimator) against the privileged teacher, or None
    ref_logp: Tensor | None  # log pi_ref(y_t); None without the KL anchor
    entropy: Tensor  # H(p_t), a metric
    kl_exact: Tensor | None  # the exact KL(p_t || q_t), a metric (= kl_distill with the 'full' estimator)


def score(model, ref_model, rb: Rollouts, rows: slice, use_teacher: bool, args: Args,
          compute: Compute, teacher_model: nn.Module | None = None) -> TokenTerms:
    """Student (with grad if enabled), teacher and reference terms for rows of the batch. teacher_model is the
    model that reads the privileged prompt [default: `model` itself, SDPG's teacher]; ref_model gives the KL anchor
    when --alpha > 0."""
    mask = rb.response_mask[rows]  # (n, L)
    targets = rb.response_ids[rows][mask.bool()]  # (M,) real response tokens, flattened
    lm_head = model.get_output_embeddings()
    teacher_model = model if teacher_model is None else teacher_model
    # whole_root does nothing in one process; with --fsdp it gathers the embeddings and the output layer,
    # which scoring calls directly (section "More than one process").
    with autocast(compute), whole_root(model), whole_root(ref_model):
        h_teacher = None
        if use_teacher:
            with torch.no_grad():  # the teacher (by default the current model) is a stop-gradient target
                h_teacher = response_hidden_states(teacher_model, rb.teacher_ids[rows], rb.teacher_mask[rows],
                                                   rb.response_ids[rows], mask)[mask.bool()]  # (M, H)
        ref_logp = None
        if ref_model is not None and args.alpha > 0:
            with torch.no_grad():
                h_ref = response_hidden_states(ref_model, rb.prompt_ids[rows], rb.prompt_mask[rows],
                                               rb.response_ids[rows], mask)[mask.bool()]  # (M, H)
                ref_logp = chunked_token_terms(h_ref, None, targets, ref_model.get_output_embeddings(),
                                               args.temperature, args.chunk_size).logp  # (M,)
                ref_logp = scatter_tokens(ref_logp, mask)  # (n, L)
        h_student = response_hidden_states(model, rb.prompt_ids[rows], rb.prompt_mask[rows],
                                           rb.response_ids[rows], mask)[mask.bool()]  # (M, H)
        logp, kl, kl_exact, entropy = chunked_token_terms(
            h_student, h_teacher, targets, lm_head, args.temperature, args.chunk_size,
            teacher_model.get_output_embeddings(), args.distill_estimator, args.distill_topk)  # (M,) each
    kl_distill, kl_exact = (scatter_tokens(kl, mask), scatter_tokens(kl_exact, mask)) if use_teacher else (None, None)
    return TokenTerms(scatter_tokens(logp, mask), kl_distill, ref_logp, scatter_tokens(entropy, mask), kl_exact)


# --teacher ema: after each optimiser step the teacher's weights move a (1 - rate) part of the way to the policy's,
#   theta_teacher <- rate * theta_teacher + (1 - rate) * theta
def ema_update(teacher: nn.Module, model: nn.Module, rate: float) -> None:
    """Moves every parameter of `teacher` to rate * itself + (1 - rate) * the same parameter of `model`, in place."""
    with torch.no_grad():
        for t, p in zip(teacher.parameters(), model.parameters()):
            t.lerp_(p.to(t.dtype), 1 - rate)


def policy_update(model, ref_model, optimizer, scheduler, rb: Rollouts, beta_k: float, args: Args,
                  compute: Compute, teacher_model: nn.Module | None = None) -> dict:
    """--updates-per-batch optimiser steps on one batch of rollouts, micro-batched. teacher_model: the weights that
    read the privileged prompt [default: `model`]; with --teacher ema it is the average, updated after each step."""
    model.train()
    N, G = rb.response_ids.shape[0], args.group_size
    use_teacher = args.beta > 0
    rollout_logp = None  # (N, L) the rollout policy's log-probs, for the ratio rho (Appendix A.3)
    if args.updates_per_batch > 1:  # with one update the policy is still the rollout policy: rho = 1
        with torch.no_grad():
            rollout_logp = torch.cat([score(model, None, rb, slice(i, i + args.micro_batch), False, args,
                                           compute).logp for i in range(0, N, args.micro_batch)])  # (N, L)
    sums = dict(loss=0.0, kl_distill=0.0, kl_ref=0.0, entropy=0.0, grad_norm=0.0, skipped_updates=0)
    per_update = N // args.updates_per_batch  # whole groups, checked in check_args()
    for u in range(0, N, per_update):
        mask = rb.response_mask[u:u + per_update]  # (n, L)
        # (n, L); sum to 1 over the update (over all ranks': update_share is 1 in one process)
        weights = token_weights(mask, G, args.loss_agg) * update_share(mask, args.loss_agg)
        update_loss = 0.0
        for i in range(u, u + per_update, args.micro_batch):
            rows = slice(i, min(i + args.micro_batch, u + per_update))
            logp, kl, ref_logp, entropy, kl_exact = score(model, ref_model, rb, rows, use_teacher, args, compute,
                                                          teacher_model)
            old_logp = logp.detach() if rollout_logp is None else rollout_logp[rows]
            w = weights[rows.start - u:rows.stop - u]  # (n, L)
            loss = sdpg_loss(logp, old_logp, kl, ref_logp, rb.advantages[rows], w, beta_k, args.alpha,
                             args.kl_mode, args.clip_low, args.clip_high, args.clip_c, args.gate)
            loss.backward()
            update_loss += loss.item()
            # Metrics, weighted like the loss over the whole batch (w / updates sums to 1 over everything).
            w = w / args.updates_per_batch
            sums["loss"] += loss.item() / args.updates_per_batch  # the mean over updates
            sums["entropy"] += (w * entropy).sum().item()
            if kl is not None:  # the exact KL, whichever estimator trains
                sums["kl_distill"] += (w * kl_exact).sum().item()
            if ref_logp is not None:  # k3 estimate of KL(pi_theta || pi_ref), >= 0 per token
                log_ratio = (logp - ref_logp).detach()
                sums["kl_ref"] += (w * (torch.exp(-log_ratio) - 1 + log_ratio)).sum().item()
        all_reduce_gradients(model)  # every rank now holds the gradient of the global update (no-op in one process)
        update_loss = global_sum({"loss": update_loss})["loss"]  # so that every rank skips the same updates
        grad_norm = whole(torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)).item()
        sums["grad_norm"] += grad_norm / args.updates_per_batch
        if math.isfinite(grad_norm) and math.isfinite(update_loss):
            optimizer.step()
            scheduler.step()
            if args.teacher == "ema":
                ema_update(teacher_model, model, args.ema_rate)
        else:  # a NaN/inf would poison the weights and AdamW's moments for good: skip this update
            sums["skipped_updates"] += 1
        optimizer.zero_grad(set_to_none=True)
    sums.update(global_sum({k: sums[k] for k in ("loss", "entropy", "kl_distill", "kl_ref")}))
    sums["kl_distill"] = sums["kl_distill"] if use_teacher else None
    sums["kl_ref"] = sums["kl_ref"] if ref_model is not None else None
    return sums


def build_optimizer(model: nn.Module, args: Args):
    """AdamW with the paper's betas and a linear learning-rate warm-up, then constant."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, args.lr_warmup)))
    return optimizer, scheduler


def training_step(step: int, examples: list[dict], model, ref_model, sampler, tokenizer, optimizer, scheduler,
                  stop_ids: list[int], args: Args, compute: Compute, templates: tuple[str, str], reward,
                  teacher_model: nn.Module | None = None) -> dict:
    """Training step k (1-based) on this rank's examples: sample G answers to each with the current
    weights, score them with the verifier, update. Returns the step's metrics row (means over ranks)."""
    t0 = time.time()
    refresh_sampler(sampler, model)  # on-policy: the answers come from the weights being trained
    rb = collect_rollouts(sampler, tokenizer, examples, args, args.instruction, stop_ids, compute, templates, reward)
    beta_k = beta_schedule(step, args.steps, args.beta, args.beta_warmup, args.beta_decay)
    sums = policy_update(model, ref_model, optimizer, scheduler, rb, beta_k, args, compute, teacher_model)
    row = {"step": step, "reward_mean": rb.rewards.mean().item(), **sums, "beta": beta_k,
           "gate_frac": (rb.advantages > 0).float().mean().item(),  # A > 0; with --no-gate all are distilled
           "response_len": rb.response_mask.sum(1).float().mean().item(),
           "lr": scheduler.get_last_lr()[0], "time_s": time.time() - t0}
    row.update(global_mean({k: row[k] for k in ("reward_mean", "gate_frac", "response_len")}))
    return row


def count_bad_steps(bad_in_a_row: int, skipped_updates: int) -> int:
    """Steps in a row with a skipped (NaN/inf) update; the third in a row stops the run."""
    bad_in_a_row = bad_in_a_row + 1 if skipped_updates else 0
    if bad_in_a_row >= 3:
        raise SystemExit(f"error: the loss or gradient was NaN/inf in {bad_in_a_row} steps in a row (those "
                         f"updates were skipped; the weights are intact). Try a lower --lr.")
    return bad_in_a_row


# =============================================================================
# The machinery. Everything above is the method; everything below serves it: the settings, the models
# and data, the prompts, several processes, evaluation, checkpoints and the run's bookkeeping.

# -----------------------------------------------------------------------------
# Settings. Each field becomes a command-line flag (--batch-prompts for batch_prompts); its help
# text is the string in `field(metadata=...)`. A default of None is filled in by parse_args: from
# PRESETS (one value for --model tiny, another for every pretrained model), from --steps (the beta
# windows) or from --dataset (the instruction).


def _arg(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


# What a question is followed by in the prompt (sdpg.py's default for maths datasets): the verifier
# reads a \boxed{} answer first, and the paper's models reason before answering.
INSTRUCTION = "Reason step by step, then put the final answer in \\boxed{}."


@dataclass
class Args:
    # model and data
    model: str = _arg("Qwen2.5-0.5B", "Hub id (Qwen/Qwen2.5-0.5B), local directory, short name (a bare "
                      "'Qwen...' or 'SmolLM...' gets its organisation prefixed), 'tiny': a 2-layer Qwen2 "
                      "with a character tokenizer built in code, trained from scratch, no network needed, or "
                      "'tiny-reader': the same model first taught to read its prompt (pretrain_to_read, 10 to 40 s "
                      "on a CPU), so that the teacher's privileged context means something to it")
    dataset: str | None = _arg(None, "'gsm8k' (openai/gsm8k, main), 'toy' (generated in code: the second digit of "
                               "a 2-digit number, easy: 1 draw in 10 is right at the start), 'toy-reverse' (a 3-digit "
                               "number reversed, hard: about 1 draw in 1,000 is right at the start), a local "
                               ".jsonl/.json/.parquet file or a Hub id whose fields follow a known layout (GSM8K, "
                               "MATH/NuminaMath, DAPO-Math-17k, problem/answer; README, Settings) or are named by "
                               "the three flags below; evaluation uses a Hub dataset's test split, else the last "
                               "--eval-n rows [auto: toy for --model tiny, else gsm8k] (paper: DAPO-Math-17k, "
                               "English part, with worked solutions they generated)")
    question_field: str | None = _arg(None, "field holding the question; a dotted path such as extra_info.problem "
                                      "reaches inside a record, a list of chat messages gives its last user message "
                                      "[auto: from the dataset's layout]")
    answer_field: str | None = _arg(None, "field holding the gold answer; a worked solution with a \\boxed{} or "
                                    "'#### X' answer is split into answer and solution [auto: from the layout]")
    solution_field: str | None = _arg(None, "field holding a worked solution for the teacher's context "
                                      "[auto: from the layout; none for DAPO-Math-17k]")
    steps: int | None = _arg(None, "training steps; each samples a fresh batch of rollouts "
                             "[auto: 200] (paper: 400)")
    batch_prompts: int | None = _arg(None, "questions per step [auto: 16] (paper: 128)")
    instruction: str | None = _arg(None, "text that follows every question (the {instruction} slot of both "
                                   f"prompt templates); '' for none [auto: none for toy, else: '{INSTRUCTION}']")
    student_template: str | None = _arg(None, "FILE holding the student's prompt, with the slots {question} and "
                                        "optionally {instruction} [default: the question, then the instruction] "
                                        "(paper: its Fig. 4, whose words are not copied here; released script: "
                                        "taken to be the same)")
    teacher_template: str | None = _arg(None, "FILE holding the teacher's prompt, with the slots {question}, "
                                        "{instruction}, {answer} and {solution}; a line whose slot is empty is left "
                                        "out [default: TEACHER_TEMPLATE in sdpg.py, Fig. 4's content in our words] "
                                        "(paper: its Fig. 4; released script: taken to be the same)")
    group_size: int = _arg(8, "G, answers sampled per question (paper: 8)")
    max_new_tokens: int | None = _arg(None, "longest sampled answer, in tokens [auto: 512; tiny 2, on toy-reverse "
                                      "4] (paper: 4096)")
    temperature: float = _arg(1.0, "sampling temperature; every log-prob and KL uses it too, so p_t is the "
                              "distribution the answers were drawn from (paper: 1.0)")
    top_p: float = _arg(1.0, "nucleus sampling; below 1 the answers no longer come from p_t exactly, so "
                        "the on-policy maths only holds approximately")
    # reward
    verifier: str = _arg("ours", "what scores an answer: 'ours' (verifiers.py: exact, standard library only; README, "
                         "The verifier) or 'math-verify' (Hugging Face's Math-Verify: SymPy, numbers rounded to 6 "
                         "decimals; an optional package, pip install math-verify)", choices=("ours", "math-verify"))
    wrong_reward: float = _arg(0.0, "reward of an answer the verifier rejects (a right one gets 1); alone it "
                               "changes no advantage, see shaped_reward (paper: 0; released script: -1)")
    overlong_buffer: int = _arg(0, "DAPO's overlong penalty: the last N tokens before --max-new-tokens cost a "
                                "reward falling linearly from 0 to -1; 0 = off (paper: off; released script: 512 "
                                "of 4096)")
    # optimiser
    lr: float | None = _arg(None, "AdamW learning rate [auto: 1e-6; tiny 3e-3] (paper: 1e-6)")
    weight_decay: float = _arg(0.1, "AdamW weight decay (paper: 0.1)")
    lr_warmup: int = _arg(10, "optimiser steps of linear learning-rate warm-up (paper: 10)")
    max_grad_norm: float = _arg(1.0, "gradient-norm clip (paper: 1.0)")
    micro_batch: int | None = _arg(None, "answers per forward/backward; gradients are accumulated over "
                                   "the batch, so it changes memory and speed, not the result [auto: 8; tiny 128]")
    gradient_checkpointing: bool = _arg(False, "recompute the transformer layers in the backward pass "
                                        "(less activation memory, one more forward pass of time)")
    fsdp: bool = _arg(False, "under torchrun, shard the policy and the reference model over the processes with "
                      "FSDP2 (per decoder layer and the root), for a model that does not fit one GPU with AdamW "
                      "(README: More than one GPU); the sampler stays a whole copy on every GPU")
    # SDPG terms
    beta: float = _arg(1e-3, "beta_base, weight of the gated self-distillation KL; 0 gives the paper's plain "
                       "policy-gradient baseline (GRPO-style) and skips the teacher forward (paper: 1e-3)")
    gate: bool = _arg(True, "positive-advantage gate m_i = 1[A_i > 0] (Eq. 3.5): distil only answers that beat "
                      "their group; --no-gate distils every answer (paper: on; released script: off)")
    beta_warmup: int | None = _arg(None, "T_warm, steps of linear beta warm-up, 0 = none "
                                   "[auto: steps/8] (paper: 50 of 400; released script: 0)")
    beta_decay: int | None = _arg(None, "T_decay, final steps of linear beta decay to 0, 0 = none "
                                  "[auto: 7*steps/8] (paper: 350 of 400; released script: 0)")
    alpha: float | None = _arg(None, "weight of the KL anchor to the frozen initial model; 0 drops it and "
                               "the reference copy [auto: 1e-3; tiny 0.05, where the anchor to the uniform "
                               "initial model keeps the answers from collapsing onto one digit] (paper: 1e-3)")
    kl_mode: str = _arg("urkl", "per-token reference-KL surrogate (Appendix A.2): urkl (the authors' "
                        "default), ufkl (best in the paper's tables), fkl, rkl",
                        choices=("urkl", "ufkl", "fkl", "rkl"))
    updates_per_batch: int = _arg(1, "split each batch of rollouts into this many optimiser steps; 1 is exactly "
                                  "on-policy; with more, later steps see answers from an older policy and use the "
                                  "importance ratio with the dual clip of Appendix A.3 (paper: not stated; "
                                  "released script: 8, mini-batches of 16 of the 128 prompts)")
    clip_low: float = _arg(0.2, "PPO clip eps_low, used only when --updates-per-batch > 1 (paper: 0.2)")
    clip_high: float = _arg(0.28, "PPO clip eps_high, used only when --updates-per-batch > 1 (paper, Section 4.1, "
                           "for its baselines: 0.2; released script: 0.28)")
    clip_c: float = _arg(10.0, "dual-clip bound c for negative advantages, used only when --updates-per-batch > 1 "
                         "(paper: not stated; released script: 10)")
    loss_agg: str = _arg("group", "how per-token losses are averaged: 'group' divides each group's sum by its "
                         "answers' total tokens, then averages over prompts (Eq. 3.4); 'token-mean' is a plain mean "
                         "over all tokens of the update, so longer answers weigh more (paper: group; released "
                         "script: token-mean)", choices=("group", "token-mean"))
    teacher_context: str = _arg("solution", "the privileged context the teacher is shown: 'solution', the "
                                "example's answer and worked solution (the paper); 'answer', the answer alone; "
                                "'other', another question's answer and solution, never one equal to the row's own "
                                "answer (the control of OP2SD, arXiv 2608.09228: does the gain come from the "
                                "information or from the changed prompt?); 'peer', for data without worked solutions, "
                                "a right answer from the same group as the solution, never the answer being scored, "
                                "and the answer alone when the group has none (SDPO's choice)",
                                choices=("solution", "answer", "other", "peer"))
    teacher: str = _arg("policy", "which weights read the privileged context: 'policy', the model being trained "
                        "(SDPG: one model, two prompts); 'reference', the frozen initial model; 'ema', an exponential "
                        "moving average of the policy (SDPO's choice, see --ema-rate) (paper: policy)",
                        choices=("policy", "reference", "ema"))
    ema_rate: float = _arg(0.99, "with --teacher ema, after each optimiser step teacher <- rate * teacher + "
                           "(1 - rate) * policy; 0 is the policy itself, 1 the frozen initial model")
    distill_estimator: str = _arg("full", "what drives the distillation gradient: 'full', the exact reverse KL "
                                  "over every vocabulary column (the paper); 'topk', the KL over the student's "
                                  "--distill-topk likeliest tokens plus one bucket for the rest of each distribution's "
                                  "mass (SDPO); "
                                  "'sampled', the sampled token's log-ratio log p - log q as a per-token penalty "
                                  "(on-policy distillation's usual estimate); the logged kl_distill is the exact KL "
                                  "whichever is chosen (paper: full)", choices=("full", "topk", "sampled"))
    distill_topk: int = _arg(64, "K of --distill-estimator topk")
    chunk_size: int = _arg(256, "response tokens per vocabulary chunk: peak memory of the exact KL grows "
                           "with chunk_size x vocabulary size, not with the whole batch")
    # run
    seed: int = _arg(0, "seed for data order, sampling and the tiny model's initial weights")
    output_dir: str = _arg("runs/sdpg", "where config.json, metrics.jsonl and checkpoints go")
    report_to: str = _arg("none", "also send every metrics row and the settings to 'tensorboard' (event files in "
                          "OUTPUT_DIR/tensorboard) or 'wandb' (Weights & Biases; WANDB_MODE=offline keeps it on this "
                          "machine), as transformers' report_to; needs that package, which the core install lacks",
                          choices=("none", "tensorboard", "wandb"))
    run_name: str | None = _arg(None, "the run's name in W&B [default: one W&B makes up]; TensorBoard has no names "
                                "but directories: tensorboard --logdir runs shows each as OUTPUT_DIR/tensorboard")
    eval_every: int | None = _arg(None, "greedy pass@1 on held-out questions every this many steps, 0 = "
                                  "only before and after training [auto: 50]")
    eval_n: int | None = _arg(None, "held-out questions per evaluation [auto: 200; tiny 100]")
    eval_samples: int = _arg(0, "K: also sample K answers per held-out question at --eval-temperature and log "
                             "their mean accuracy, mean@K, as eval_mean_at_k; 0 = greedy pass@1 only (paper and "
                             "released script: 32)")
    eval_temperature: float = _arg(1.0, "sampling temperature of the mean@K evaluation (paper and released "
                                   "script: 1.0)")
    save_every: int | None = _arg(None, "save a checkpoint every this many steps, 0 = only at the end "
                                  "[auto: 100; tiny 0]")
    resume: bool = _arg(False, "continue from the newest checkpoint in --output-dir: weights, optimiser, "
                        "schedules, RNG states and data position; give the same flags as the first run")
    overwrite: bool = _arg(False, "start afresh in an --output-dir that holds another run, deleting its "
                           "metrics and checkpoints")
    keep_checkpoints: int = _arg(2, "how many of the newest checkpoint-STEP directories to keep")
    device: str = _arg("auto", "auto (cuda > mps > cpu), cuda, mps or cpu; CUDA computes in bf16 where "
                       "the card supports it, with float32 master weights")
    trust_remote_code: bool = _arg(False, "allow a Hub model to run its own Python code (off: only "
                                   "architectures that transformers ships)")


# Defaults that depend on the model. A pretrained LLM needs a small learning rate and long answers;
# the tiny demo model learns from scratch and answers with one character.
PRESETS = {
    "pretrained": dict(dataset="gsm8k", steps=200, batch_prompts=16, max_new_tokens=512, lr=1e-6, alpha=1e-3,
                       micro_batch=8, eval_every=50, eval_n=200, save_every=100),
    "tiny": dict(dataset="toy", steps=200, batch_prompts=16, max_new_tokens=2, lr=3e-3, alpha=0.05,
                 micro_batch=128, eval_every=50, eval_n=100, save_every=0),
}


class OneLineErrors(argparse.ArgumentParser):
    """argparse, except that a bad flag or value gets one line instead of the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (python sdpg.py --help lists every flag)\n")  # 2: argparse's usage code


def parse_args(argv: list[str] | None = None) -> Args:
    """Command line -> Args, with the "auto" defaults filled in."""
    parser = OneLineErrors(description=__doc__.split("\n\n")[0] + " See README.md.",
                                     epilog="examples:\n" + __doc__.split("Run it:\n")[1].split("\n\n")[0] + "\n",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    types = get_type_hints(Args)  # the fields' types as classes (the annotations are strings in this file)
    for f in dataclasses.fields(Args):
        flag = "--" + f.name.replace("_", "-")
        ftype = next(t for t in getattr(types[f.name], "__args__", (types[f.name],)) if t is not type(None))
        help = f.metadata["help"] + ("" if f.default is None else f" (default: {f.default})")
        if ftype is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help)
        else:
            parser.add_argument(flag, type=ftype, default=f.default, help=help, choices=f.metadata.get("choices"))
    args = Args(**vars(parser.parse_args(argv)))
    if args.max_new_tokens is None and args.dataset == "toy-reverse":
        args.max_new_tokens = 4  # three digits and the stop token
    for name, value in PRESETS["tiny" if args.model in TINY_MODELS else "pretrained"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.instruction is None:
        args.instruction = "" if args.dataset in TOY_TASKS else INSTRUCTION
    if args.beta_warmup is None:
        args.beta_warmup = round(args.steps / 8)
    if args.beta_decay is None:
        args.beta_decay = round(args.steps * 7 / 8)
    check_args(args)
    return args


def check_args(args: Args) -> None:
    """Refuses settings that cannot work, with one line that says what to do."""
    for name in ("steps", "batch_prompts", "max_new_tokens", "lr", "micro_batch", "chunk_size",
                 "updates_per_batch", "eval_n", "temperature", "keep_checkpoints"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.eval_samples < 0 or args.eval_temperature < 0:
        raise SystemExit("error: --eval-samples and --eval-temperature must be >= 0")
    if not 0 <= args.overlong_buffer <= args.max_new_tokens:
        raise SystemExit(f"error: --overlong-buffer must be between 0 and --max-new-tokens ({args.max_new_tokens}): "
                         f"the penalty acts on the last N tokens an answer may have")
    if args.group_size < 2:
        raise SystemExit("error: --group-size must be >= 2: with one answer per question the group std is "
                         "undefined and every advantage is 0, so nothing would be learned")
    if args.batch_prompts % args.updates_per_batch:
        raise SystemExit("error: --batch-prompts must be a multiple of --updates-per-batch (updates take whole groups)")
    if args.resume and args.overwrite:
        raise SystemExit("error: give --resume or --overwrite, not both")
    if not 0 <= args.ema_rate <= 1:
        raise SystemExit(f"error: --ema-rate must be between 0 and 1, got {args.ema_rate}")
    if args.distill_topk < 1:
        raise SystemExit(f"error: --distill-topk must be positive, got {args.distill_topk}")
    if args.fsdp and args.teacher != "policy":
        raise SystemExit(f"error: --teacher {args.teacher} is not supported with --fsdp (only the policy teacher is)")
    # Checked here, before a model is loaded: the two trackers' packages are named as the --report-to values.
    if args.report_to != "none" and importlib.util.find_spec(args.report_to) is None:
        raise SystemExit(f"error: --report-to {args.report_to} needs the {args.report_to} package: "
                         f"pip install {args.report_to}")


# -----------------------------------------------------------------------------
# Device, precision and seeding


class Compute(NamedTuple):
    """Where and in what precision to compute: decided once (pick_device) and passed around as one thing."""
    device: torch.device
    bf16: bool  # matmuls in bf16 under autocast (CUDA cards that support it); the weights stay float32


def pick_device(name: str) -> Compute:
    """The device ("auto": CUDA, then MPS, then CPU) and whether to compute in bf16 there."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(name)
    return Compute(device, device.type == "cuda" and torch.cuda.is_bf16_supported())


def autocast(compute: Compute):
    # Weights stay float32 (AdamW's 1e-6 steps would round away in bf16 weights); matmuls run in bf16.
    return torch.autocast(device_type=compute.device.type, dtype=torch.bfloat16, enabled=compute.bf16)


def seed_everything(seed: int) -> None:
    # Seeds Python, torch and every CUDA device. Still not bit-for-bit reproducible on a GPU: some
    # CUDA kernels (atomics in matmul reductions, SDPA backward) are non-deterministic.
    random.seed(seed)
    torch.manual_seed(seed)


# -----------------------------------------------------------------------------
# Models. The policy and the teacher are ONE model (two prompts); the reference is a frozen copy.


SHORT_NAME_ORGS = {"Qwen": "Qwen", "SmolLM": "HuggingFaceTB"}  # 'Qwen2.5-0.5B' -> 'Qwen/Qwen2.5-0.5B'

OFFLINE_HINT = "(no network? the offline demo needs none: python sdpg.py --model tiny --dataset toy)"

TINY_MODELS = ("tiny", "tiny-reader")  # built in code; both take PRESETS["tiny"]


def first_line(e: Exception) -> str:
    """The first line of an exception's message, for one-line errors."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def build_char_tokenizer():
    """A character-level tokenizer built in code: digits, lower-case letters and some punctuation.

    Text is lower-cased first. The alphabet is kept small on purpose: a model trained from scratch
    starts out uniform over it, and a small alphabet makes a right answer likely enough to learn from.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    chars = list(string.digits + string.ascii_lowercase + " \n.,:;?!'()+-*/=$%#")
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    # BPE without merges and without a pre-tokenizer splits any text into single characters.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.decoder = decoders.Fuse()  # join characters back without spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    # A mark that save_pretrained writes into tokenizer_config.json: AutoTokenizer would load a saved tiny model's
    # tokenizer as a Qwen2Tokenizer (its config says qwen2), which loses case, spaces and newlines; load_model
    # reads the mark and loads the tokenizer as it was built (see is_char_tokenizer).
    tokenizer.init_kwargs[CHAR_TOKENIZER_MARK] = True
    return tokenizer


CHAR_TOKENIZER_MARK = "sdpg_char_tokenizer"


def is_char_tokenizer(directory: str) -> bool:
    """Whether a saved model directory holds build_char_tokenizer's tokenizer (its mark in tokenizer_config.json).
    Such a directory is loaded with PreTrainedTokenizerFast.from_pretrained(directory), not AutoTokenizer."""
    path = os.path.join(directory, "tokenizer_config.json")
    return os.path.isfile(path) and bool(json.load(open(path)).get(CHAR_TOKENIZER_MARK))


def build_tiny_model(tokenizer, seed: int) -> nn.Module:
    """A small random-init Qwen2 (a real architecture, so every code path is the GPU one)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


# The tiny model cannot read: trained from scratch, its teacher view (the prompt with the answer in it) knows no
# more than its student view, so the distillation term has nothing to pass on. pretrain_to_read gives it the one
# skill every pretrained model has, using what its prompt says: it learns to repeat an answer that the prompt
# states, on lessons whose questions and answers are random digits. The answer of a lesson is never the answer
# of a task in TOY_TASKS to its question, so the lessons teach reading and never a task itself.
READING_BATCH, READING_LR, READING_MAX_STEPS = 64, 3e-3, 2000

READING_TARGET = 0.99  # stop once the teacher view repeats this fraction of a fixed probe of lessons


def reading_lessons(seed: int) -> Iterator[dict]:
    """An endless stream of examples {question, answer, solution} for pretrain_to_read, the same for the same
    seed: a random 2- or 3-digit question, a random 1- to 3-digit answer that no toy task gives for that
    question, no solution."""
    rng = random.Random(seed)
    while True:
        question = "".join(rng.choices(string.digits, k=rng.choice((2, 3))))
        answer = "".join(rng.choices(string.digits, k=rng.choice((1, 2, 3))))
        if all(answer != task(question) for task in TOY_TASKS.values()) and answer != question:
            yield {"question": question, "answer": answer, "solution": ""}


def reading_batch(tokenizer, lessons: list[dict]) -> tuple[Tensor, Tensor, Tensor]:
    """Lessons -> (ids, attention mask, labels), each (B, T), right-padded: the teacher's prompt (the question
    with the answer stated, TOY_TEACHER_TEMPLATE), then the answer and EOS, which alone are learned (labels
    -100 elsewhere)."""
    rows, labels = [], []
    for ex in lessons:
        prompt = encode_prompt(tokenizer, prompt_texts(ex, "", TOY_TEMPLATES)[1])
        target = tokenizer(ex["answer"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append(prompt + target)
        labels.append([-100] * len(prompt) + target)
    T = max(len(r) for r in rows)
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (T - len(r)) for r in rows])  # (B, T)
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])  # (B, T)
    return ids, mask, torch.tensor([y + [-100] * (T - len(y)) for y in labels])  # (B, T)


def pretrain_to_read(model: nn.Module, tokenizer, seed: int, max_steps: int = READING_MAX_STEPS) -> int:
    """Teaches the tiny model to repeat the answer its prompt states (reading_lessons), on the CPU, the same
    weights for the same seed. Stops once greedy answers to 128 probe lessons are READING_TARGET right, checked
    every 100 steps, at most max_steps steps of READING_BATCH lessons. Returns the steps taken."""
    probe = list(itertools.islice(reading_lessons(seed + 10_000), 128))
    probe_ids, probe_mask = left_pad([encode_prompt(tokenizer, prompt_texts(ex, "", TOY_TEMPLATES)[1]) for ex in probe],
                                     tokenizer.pad_token_id, torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=READING_LR, weight_decay=0.0)
    lessons = reading_lessons(seed)  # drawn as needed: most runs stop long before max_steps
    for step in range(1, max_steps + 1):
        model.train()
        ids, mask, labels = reading_batch(tokenizer, list(itertools.islice(lessons, READING_BATCH)))
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0:
            model.eval()
            with torch.no_grad():
                resp, resp_mask = generate(model, probe_ids, probe_mask, 4, 0.0, 1.0, [tokenizer.eos_token_id],
                                           tokenizer.pad_token_id)
            said = decode_responses(tokenizer, resp, resp_mask)
            if sum(s.strip() == ex["answer"] for s, ex in zip(said, probe)) >= READING_TARGET * len(probe):
                break
    model.eval()
    return step


def resolve_model_name(name: str) -> str:
    """'Qwen2.5-0.5B' -> 'Qwen/Qwen2.5-0.5B'; a local directory or an 'org/name' id is kept."""
    if os.path.isdir(name) or "/" in name:
        return name
    for prefix, org in SHORT_NAME_ORGS.items():
        if name.startswith(prefix):
            return f"{org}/{name}"
    return name


def load_model(name: str, seed: int, trust_remote_code: bool = False):
    """Returns (model in float32, tokenizer). Exits with one clear line when the model is not there."""
    if name in TINY_MODELS:
        tokenizer = build_char_tokenizer()
        model = build_tiny_model(tokenizer, seed)
        if name == "tiny-reader":
            pretrain_to_read(model, tokenizer, seed)
        return model, tokenizer
    from huggingface_hub.utils import logging as hub_logging
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    hub_logging.set_verbosity_error()  # no retry warnings: a failed download is reported in one line
    repo = resolve_model_name(name)
    if name.startswith((".", "/", "~")) and not os.path.isdir(name):
        raise SystemExit(f"error: no such model directory: {name}")
    try:
        if is_char_tokenizer(repo):  # a saved tiny model (build_char_tokenizer)
            tokenizer = PreTrainedTokenizerFast.from_pretrained(repo)
        else:
            tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(repo, dtype=torch.float32, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: could not load model '{repo}': {first_line(e)} {OFFLINE_HINT}")
    if tokenizer.pad_token_id is None:  # many base models have none; any id works, it is always masked
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def stop_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS, the model's configured EOS, and the
    end-of-turn marker of common chat templates (a base model prompted through a chat template
    ends its turn with <|im_end|>, which is not its EOS)."""
    ids = {tokenizer.eos_token_id}
    gen_eos = model.generation_config.eos_token_id
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    for marker in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    ids.discard(None)
    return sorted(ids)


def frozen_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A frozen copy with its parameters in `dtype` (bf16 on CUDA, to save memory).

    Only the parameters are cast, not the buffers: RoPE's inverse frequencies in bf16 would put
    position 1,000 off by most of a radian, and the copy would be another model.
    """
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():  # tied weights are one Parameter, cast once
        p.data = p.data.to(dtype)
    ref.requires_grad_(False)
    return ref


# -----------------------------------------------------------------------------
# Data. Every example is {question, answer, solution}; `answer` is the verifier's gold answer,
# `answer` and `solution` together are the privileged context c.


def toy_examples(n: int, seed: int) -> list[dict]:
    """A copy-like task that a 2-layer model learns from scratch in a minute: the question is a
    two-digit number and the answer is its second digit ('47' -> '7')."""
    rng = random.Random(seed)
    return [{"question": q, "answer": q[1], "solution": ""} for q in (f"{rng.randrange(100):02d}" for _ in range(n))]


def reverse_examples(n: int, seed: int, held_out: bool) -> list[dict]:
    """A hard task: the question is a 3-digit number and the answer is its digits reversed ('472' -> '274').
    A model that answers with 3 random digits is right once in 1,000 draws. Palindromes are left out (copying
    the question would answer them). The numbers divisible by 8 (112 of them) are the held-out questions, the
    other 788 the training ones, so evaluation asks what was never trained; training rows are drawn with
    replacement, held-out ones without (n <= 112)."""
    rng = random.Random(seed)
    numbers = [f"{i:03d}" for i in range(1000) if (i % 8 == 0) == held_out and f"{i:03d}" != f"{i:03d}"[::-1]]
    if held_out and n > len(numbers):
        raise SystemExit(f"error: toy-reverse holds out {len(numbers)} questions; --eval-n {n} asks for more")
    questions = rng.sample(numbers, n) if held_out else rng.choices(numbers, k=n)
    return [{"question": q, "answer": q[::-1], "solution": ""} for q in questions]


# The tasks generated in code, each as its answer to a question (reading_lessons avoids these answers).
TOY_TASKS = {"toy": lambda question: question[1:2], "toy-reverse": lambda question: question[::-1]}


class Fields(NamedTuple):
    """Where a dataset row keeps each part of an example: dotted paths, '' for none."""
    question: str
    answer: str
    solution: str


def dataset_fields(row: dict, question: str | None, answer: str | None, solution: str | None, where: str) -> Fields:
    """The field paths given on the command line; the others from the layout of a known dataset:

        DAPO-Math-17k          prompt (chat messages or text), reward_model.ground_truth; no worked solution
        GSM8K                  question, answer ("<worked solution> #### 72")
        MATH-500 and others    problem, answer, solution
        MATH, NuminaMath       problem, solution (a worked solution with a \\boxed{} answer)
    """
    if "prompt" in row and isinstance(row.get("reward_model"), dict):
        auto = Fields("prompt", "reward_model.ground_truth", "")
    else:
        auto_answer = next((k for k in ("answer", "solution") if k in row), "answer")
        auto = Fields(next((k for k in ("question", "problem") if k in row), ""), auto_answer,
                      "solution" if auto_answer == "answer" and "solution" in row else "")
    fields = Fields(question or auto.question, answer or auto.answer, auto.solution if solution is None else solution)
    if not fields.question:
        raise SystemExit(f"error: {where} matches no known layout (its fields: {', '.join(map(str, row))}); "
                         f"name them with --question-field and --answer-field")
    return fields


def field_value(row: dict, path: str):
    """row['a']['b'] for the path 'a.b'; None when a part is missing."""
    value = row
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def as_text(value) -> str | None:
    """A field's value as text: a number as written, a list of chat messages as its last user message."""
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        value = ([m for m in value if m.get("role") == "user"] or value)[-1].get("content")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or str(value).strip() == "":
        return None
    return str(value)


def split_gold(gold: str) -> tuple[str, str]:
    r"""A gold field -> (answer, worked solution). GSM8K's "<solution> #### 72" gives its solution
    without the calculator notes such as <<48/2=24>>; a worked solution with a \boxed{} answer (MATH,
    NuminaMath) is kept whole; anything else is the answer itself, with no solution.
    >>> split_gold("Half of 8 is $\\boxed{4}$.")
    ('4', 'Half of 8 is $\\boxed{4}$.')
    """
    if "####" in gold:
        # the answer follows the last #### (gsm8k_gold); the worked solution is the text before it
        return gsm8k_gold(gold), re.sub(r"<<[^>]*>>", "", gold.rsplit("####", 1)[0]).strip()
    if "\\boxed" in gold or "\\fbox" in gold:
        return extract_answer(gold) or "", gold
    return gold, ""


def normalise_row(row: dict, where: str, fields: Fields | None = None) -> dict:
    """A dataset row -> {question, answer, solution}; `fields` defaults to the row's own layout."""
    fields = fields or dataset_fields(row, None, None, None, where)
    question, gold = as_text(field_value(row, fields.question)), as_text(field_value(row, fields.answer))
    for path, value in ((fields.question, question), (fields.answer, gold)):
        if value is None:
            raise SystemExit(f"error: {where} has no '{path}' field (its fields: {', '.join(map(str, row))}; name "
                             f"the right ones with --question-field and --answer-field)")
    answer, solution = split_gold(gold)
    if answer.strip() == "":
        raise SystemExit(f"error: {where}: no final answer found in its '{fields.answer}' field")
    given = as_text(field_value(row, fields.solution)) if fields.solution else None
    return {"question": question, "answer": answer, "solution": given or solution}


def hold_out_last(rows, eval_n: int, where: str):
    """(all rows but the last eval_n, the last eval_n) of a datasets.Dataset."""
    if len(rows) <= eval_n:
        raise SystemExit(f"error: {where} has {len(rows)} rows; it needs more than --eval-n {eval_n} "
                         f"(the last --eval-n rows are held out for evaluation)")
    n_train = len(rows) - eval_n
    return rows.select(range(n_train)), rows.select(range(n_train, len(rows)))


def load_examples(dataset: str, eval_n: int, seed: int, question_field: str | None = None,
                  answer_field: str | None = None, solution_field: str | None = None) -> tuple[list[dict], list[dict]]:
    """Returns (train, held-out eval) examples. A Hub dataset gives its test split's first eval_n rows for
    evaluation; a local file, or a Hub dataset without a test split, keeps its last eval_n rows instead.
    The field flags name where the question, gold answer and worked solution are (dataset_fields)."""
    if dataset == "toy":
        return toy_examples(5000, seed), toy_examples(eval_n, seed + 1)
    if dataset == "toy-reverse":
        return reverse_examples(5000, seed, held_out=False), reverse_examples(eval_n, seed + 1, held_out=True)
    import datasets

    if dataset.endswith((".jsonl", ".json", ".parquet")) or os.path.exists(dataset):
        if not os.path.isfile(dataset):
            raise SystemExit(f"error: no such dataset file: {dataset}")
        if os.path.getsize(dataset) == 0:
            raise SystemExit(f"error: {dataset} is empty")
        try:
            rows = datasets.load_dataset("parquet" if dataset.endswith(".parquet") else "json",
                                         data_files=dataset, split="train")
        except Exception as e:  # datasets raises many types for a malformed file
            raise SystemExit(f"error: could not read {dataset}: {first_line(e)}")
        train_rows, eval_rows = hold_out_last(rows, eval_n, dataset)
    else:
        name, config = ("openai/gsm8k", "main") if dataset == "gsm8k" else (dataset, None)
        try:
            splits = datasets.load_dataset(name, config)
        except (OSError, ValueError, ConnectionError) as e:
            raise SystemExit(f"error: could not load dataset '{name}': {first_line(e)} {OFFLINE_HINT}")
        if "train" not in splits:
            raise SystemExit(f"error: dataset '{name}' has no train split (its splits: {', '.join(splits)})")
        if "test" in splits:
            train_rows, eval_rows = splits["train"], splits["test"].select(range(min(eval_n, len(splits["test"]))))
        else:  # DAPO-Math-17k and many RL sets have only a train split
            train_rows, eval_rows = hold_out_last(splits["train"], eval_n, name)
    fields = dataset_fields(train_rows[0], question_field, answer_field, solution_field, dataset)
    train = [normalise_row(r, f"{dataset} train row {i}", fields) for i, r in enumerate(train_rows)]
    held_out = [normalise_row(r, f"{dataset} eval row {i}", fields) for i, r in enumerate(eval_rows)]
    return train, held_out


def next_batch(queue: list[int], order: random.Random, n_train: int, k: int) -> tuple[list[int], list[int]]:
    """The next k training indices and the queue left after them; a new epoch reshuffles all n_train."""
    while len(queue) < k:
        queue = queue + order.sample(range(n_train), n_train)
    return queue[:k], queue[k:]


# -----------------------------------------------------------------------------
# Prompts. A template is text with {slots}. The student's holds the question and the instruction;
# the teacher's adds the privileged context c: the gold answer and a worked solution. Both go
# through the chat template when the tokenizer has one.


STUDENT_TEMPLATE = "{question}\n{instruction}"

# The paper's teacher prompt (its Fig. 4) is the student prompt followed by the answer, a worked
# solution, and a request to reach that answer by another, equally rigorous route (or, if there is
# none, to set out the usual one very clearly) without saying that the answer was given. The words
# below are ours. The wording shapes q_t and so the size of the KL: it is part of the method.
TEACHER_TEMPLATE = ("{question}\n{instruction}\n\n"
                    "Final answer: {answer}\n"
                    "Worked solution: {solution}\n"
                    "Reach {answer} by another route just as rigorous, if there is one; else explain the usual "
                    "route very clearly. Never mention knowing the answer.")

DEFAULT_TEMPLATES = (STUDENT_TEMPLATE, TEACHER_TEMPLATE)

# The tasks generated in code (TOY_TASKS) take a short teacher prompt in the tiny models' alphabet, the one the
# reading pretraining teaches: the question, then a line stating the answer.
TOY_TEACHER_TEMPLATE = "{question}\n{instruction}\nanswer: {answer}\nsolution: {solution}"

TOY_TEMPLATES = (STUDENT_TEMPLATE, TOY_TEACHER_TEMPLATE)

STUDENT_SLOTS, TEACHER_SLOTS = {"question", "instruction"}, {"question", "instruction", "answer", "solution"}

# A slot is {name} after anything but a letter, digit, '_', '}', '^' or '\', so that the LaTeX in a
# template (\boxed{x}, \frac{a}{b}, x^{n}) stays as it is.
SLOT = re.compile(r"(?<![\w}^\\])\{([A-Za-z_]\w*)\}")


def check_template(template: str, slots: set[str], flag: str) -> str:
    """Returns the template; one clear line when it uses a slot outside `slots` or lacks {question}."""
    used = set(SLOT.findall(template))
    if used - slots or "question" not in used:
        problem = f"unknown slot {{{sorted(used - slots)[0]}}}" if used - slots else "no {question} slot"
        raise SystemExit(f"error: {flag} has {problem}; its slots are "
                         + ", ".join(f"{{{name}}}" for name in sorted(slots)))
    return template


def read_templates(student_file: str | None, teacher_file: str | None,
                   defaults: tuple[str, str] = DEFAULT_TEMPLATES) -> tuple[str, str]:
    """The (student, teacher) templates: the text of the files given, else the defaults."""
    texts = []
    for path, default in zip((student_file, teacher_file), defaults):
        if path is not None and not os.path.isfile(path):
            raise SystemExit(f"error: no such template file: {path}")
        texts.append(default if path is None else open(path).read())
    return (check_template(texts[0], STUDENT_SLOTS, "--student-template"),
            check_template(texts[1], TEACHER_SLOTS, "--teacher-template"))


def default_templates(dataset: str) -> tuple[str, str]:
    """The (student, teacher) templates used when no file is given: the short one for the tasks made in code."""
    return TOY_TEMPLATES if dataset in TOY_TASKS else DEFAULT_TEMPLATES


def fill_template(template: str, values: dict[str, str]) -> str:
    r"""Puts each value into its {slot}. A line with an empty slot (no instruction, no worked
    solution) is left out, so that no label stands alone.
    >>> fill_template("{question}\n{instruction}\nAnswer in $\\boxed{x}$.", {"question": "2+2?", "instruction": ""})
    '2+2?\nAnswer in $\\boxed{x}$.'
    """
    lines = [line for line in template.split("\n") if all(values[name].strip() for name in SLOT.findall(line))]
    return SLOT.sub(lambda m: values[m.group(1)], "\n".join(lines)).strip()


def prompt_texts(example: dict, instruction: str,
                 templates: tuple[str, str] = DEFAULT_TEMPLATES) -> tuple[str, str]:
    """Returns the (student, teacher) user messages for one example."""
    values = {"question": example["question"], "instruction": instruction, "answer": example["answer"],
              "solution": example["solution"]}
    return fill_template(templates[0], values), fill_template(templates[1], values)


# Where the teacher's privileged context comes from (--teacher-context). Each row of the batch gets an
# (answer, solution) pair for the {answer} and {solution} slots of the teacher's template.
def privileged_contexts(examples: list[dict], context: str, group_size: int = 1, completions: list[str] | None = None,
                        correct: list[bool] | None = None) -> list[tuple[str, str]]:
    """(answer, solution) shown to the teacher for each of the len(examples) x group_size rows (G rows per example,
    contiguous, as in the batch):
      'solution'  the example's own answer and worked solution (the paper);
      'answer'    its answer alone;
      'other'     the answer and solution of the next example in the list whose answer differs from its own, so
                  a row never sees its own answer; ('', '') when every example has the same answer;
      'peer'      its answer, and as the solution a completion of ANOTHER row of the same group that the verifier
                  accepted (the first one), never the row's own; the answer alone when no other row is right.
    >>> privileged_contexts([{"answer": "7", "solution": "s"}, {"answer": "2", "solution": "t"}], "other")
    [('2', 't'), ('7', 's')]
    """
    G, out = group_size, []
    for i, ex in enumerate(examples):
        if context in ("solution", "answer"):
            out += [(ex["answer"], ex["solution"] if context == "solution" else "")] * G
        elif context == "other":
            others = [examples[(i + d) % len(examples)] for d in range(1, len(examples))]
            other = next((o for o in others if o["answer"] != ex["answer"]), {"answer": "", "solution": ""})
            out += [(other["answer"], other["solution"])] * G
        else:  # peer
            right = [i * G + j for j in range(G) if correct[i * G + j]]  # the group's accepted rows
            for r in range(i * G, i * G + G):
                peer = next((completions[j] for j in right if j != r), "")
                out.append((ex["answer"], peer))
    return out


def teacher_texts(examples: list[dict], instruction: str, template: str, contexts: list[tuple[str, str]],
                  group_size: int = 1) -> list[str]:
    """The teacher's user message for each row: the example's question with the row's (answer, solution)."""
    return [fill_template(template, {"question": examples[r // group_size]["question"], "instruction": instruction,
                                     "answer": answer, "solution": solution})
            for r, (answer, solution) in enumerate(contexts)]


def encode_prompt(tokenizer, user_text: str) -> list[int]:
    """One user turn -> token ids ending where the model's answer starts."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = f"Q: {user_text}\nA: "
    return tokenizer(text, add_special_tokens=False).input_ids


def left_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Token lists -> (ids, attention mask), both (N, P), padded on the LEFT so that every sequence
    ends at column P-1 and generation appends at the same column for all of them."""
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), P), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, P - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, P - len(s):] = 1
    return ids.to(device), mask.to(device)


# -----------------------------------------------------------------------------
# More than one process: `torchrun --nproc-per-node N sdpg.py ...` runs N copies of this file, one per
# GPU (rank), which talk through torch.distributed. Plain data parallel: every rank holds the whole
# model (unless --fsdp, below), samples and scores its own share of the prompts, and the gradients
# are summed over the ranks before each optimiser step, so every rank takes the same step. A rank
# owns whole groups, so the group advantages (Eq. 2.1) need no communication. With one process none
# of this does anything.


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) without torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def start_distributed(args: Args) -> Compute:
    """Joins the process group when started by torchrun; returns where to compute, as pick_device.
    Each rank computes on its own GPU (cuda:LOCAL_RANK) and talks over NCCL; on CPUs it uses gloo."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        if args.fsdp:
            raise SystemExit("error: --fsdp shards the model over the processes that torchrun starts: "
                             "torchrun --nproc-per-node N sdpg.py ... --fsdp")
        return pick_device(args.device)
    device, bf16 = pick_device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    world = dist.get_world_size()
    if dist.get_rank() > 0:  # only rank 0 prints; errors still reach stderr
        sys.stdout = open(os.devnull, "w")
    check_world(args, world)
    return Compute(device, bf16)


# How a run under torchrun ends matters: a rank that dies at exit after finishing its work (SIGABRT,
# "terminate called without an active exception") makes a job scheduler read a finished run as a failed
# one. Every rank waits for the others at the end (a barrier), so that none leaves while another still
# talks to it, then destroys its process group. That is not enough with --fsdp on gloo: FSDP2 keeps the
# process group alive in C++, so its worker threads outlive destroy_process_group. A worker releases each
# finished collective a moment after the collective returns, and releasing tensors made in Python needs
# the GIL; if that moment falls in the interpreter's teardown, the interpreter ends the thread instead, and
# the C++ runtime aborts the process (seen in a core dump: a pt_gloo_runloop thread in
# ~AsyncBroadcastWork -> TensorImpl::decref_pyobject -> take_gil -> pthread_exit -> std::terminate, while
# the main thread was in Py_FinalizeEx). So under torchrun the process ends with end_process(), which skips
# the teardown once everything is written. On an error there is no barrier (the other ranks may never come
# to it, and the run is failing anyway): the rank destroys its own process group and the error goes on.
@contextlib.contextmanager
def distributed(args: Args):
    """Joins the process group when started by torchrun (start_distributed) and yields where to compute;
    leaves the process group in order at the end. Without torchrun: pick_device, and nothing else."""
    try:
        yield start_distributed(args)
    except BaseException:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        raise
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def end_process() -> None:
    """After main: under torchrun, exits this rank at once with status 0, skipping the interpreter's teardown
    (the comment above distributed() says why); in one process, nothing. Call it only after a normal end:
    every file is closed by then, and the output streams are flushed here."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def check_world(args: Args, world: int) -> None:
    """Every rank takes the same number of whole groups in every update."""
    if args.batch_prompts % (world * args.updates_per_batch):
        raise SystemExit(f"error: --batch-prompts ({args.batch_prompts}) must be a multiple of processes x "
                         f"--updates-per-batch ({world} x {args.updates_per_batch}): each rank takes whole groups")


def rank_share(batch: list, updates: int, rank: int, world: int) -> list:
    """This rank's prompts of the global batch. Each update's prompts are dealt out in equal blocks, one
    per rank, so optimiser step u sees the same prompts as it would in one process.
    >>> rank_share(list(range(8)), updates=2, rank=1, world=2)
    [2, 3, 6, 7]
    """
    per_update = len(batch) // updates
    k = per_update // world
    return [x for u in range(0, len(batch), per_update) for x in batch[u + rank * k:u + (rank + 1) * k]]


def global_sum(values: dict) -> dict:
    """Sums each number (None stays None) over the ranks; every rank gets the totals."""
    world = rank_and_world()[1]
    keys = [k for k, v in values.items() if v is not None]
    if world == 1 or not keys:
        return values
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)  # (K,)
    dist.all_reduce(total)
    return {**values, **dict(zip(keys, total.tolist()))}


def global_mean(values: dict) -> dict:
    """The mean of each number over the ranks (each rank holds the same number of answers)."""
    world = rank_and_world()[1]
    return values if world == 1 else {k: v / world for k, v in global_sum(values).items()}


def update_share(mask: Tensor, agg: str) -> float:
    """What this rank's token weights are scaled by so that they sum to 1 over the GLOBAL update.
    token_weights() normalises over the rank's own rows: with 'group' each rank holds the same number
    of prompts, so 1 / ranks; with 'token-mean' the rank's share of the update's tokens."""
    world = rank_and_world()[1]
    if world == 1:
        return 1.0
    if agg == "group":
        return 1.0 / world
    mine = float(mask.sum())
    return mine / global_sum({"tokens": mine})["tokens"]


# Why an explicit all-reduce and not DistributedDataParallel: DDP sums gradients from hooks that it
# sets up when ITS forward is called, but score() calls model.base_model and the output layer directly,
# which would bypass those hooks and silently train every rank on its own gradient. Summing by hand
# after all micro-batches is a few lines, runs once per update, and cannot be bypassed. Sum, not mean:
# the token weights already make the loss the global one (update_share).
# One collective per bucket of gradients, not per parameter: each collective pays a fixed cost (a round
# trip between the ranks, a launch), which a model of hundreds of small tensors pays hundreds of times.
# Measured on CPU, gloo, 2 processes, ms per call: the tiny model (26 tensors, 0.5 MB) 15 per parameter
# against 1 in buckets of 25 MB; a 24-layer Qwen2 of hidden size 256 (290 tensors, 121 MB) 350-410 against
# 150-230. One bucket for everything was slower (310-370 ms on the big shape): a copy that large no longer
# fits in the caches. A bucket costs a copy of its gradients, 25 MB at most, while it is summed.
GRAD_BUCKET_BYTES = 25 * 2**20


def gradient_buckets(grads: list[Tensor], bucket_bytes: int = GRAD_BUCKET_BYTES) -> list[list[Tensor]]:
    """Splits grads, in order, into runs of one device and dtype (a flat tensor has one of each) holding at
    most bucket_bytes; a gradient bigger than that has a bucket of its own.

    >>> [len(b) for b in gradient_buckets([torch.zeros(3), torch.zeros(2), torch.zeros(9), torch.zeros(1)], 20)]
    [2, 1, 1]
    """
    buckets: list[list[Tensor]] = []
    size = 0  # bytes in the last bucket
    for g in grads:
        n = g.numel() * g.element_size()
        last = buckets[-1] if buckets else None
        if last is None or (last[0].device, last[0].dtype) != (g.device, g.dtype) or size + n > bucket_bytes:
            buckets.append([g])
            size = n
        else:
            last.append(g)
            size += n
    return buckets


def all_reduce_gradients(model: nn.Module, bucket_bytes: int = GRAD_BUCKET_BYTES) -> None:
    """Sums every parameter's gradient over the ranks, in place, one all-reduce per bucket of gradients
    (gradient_buckets); nothing to do in one process."""
    if rank_and_world()[1] == 1 or isinstance(model, FSDPModule):  # FSDP has summed them in the backward pass
        return
    for p in model.parameters():
        if p.grad is None:  # every rank must send the same tensors; a gradient nobody produced is 0
            p.grad = torch.zeros_like(p)
    # Every rank walks the same parameters in the same order, so every rank builds the same buckets and the
    # collectives pair up.
    for bucket in gradient_buckets([p.grad for p in model.parameters()], bucket_bytes):
        flat = torch.cat([g.reshape(-1) for g in bucket])  # (sum of the bucket's numels,), a copy
        dist.all_reduce(flat)
        for g, summed in zip(bucket, flat.split([g.numel() for g in bucket])):
            g.copy_(summed.view_as(g))  # back into the gradient tensors that the optimiser reads


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on at least one (a Ctrl-C or SIGTERM reaches one rank only)."""
    return global_sum({"flag": float(flag)})["flag"] > 0


def on_rank_zero(fn, *args):
    """Runs fn on rank 0 only (file system work) and gives its result to every rank; a SystemExit
    there exits every rank with the same line, instead of leaving the others waiting."""
    rank, world = rank_and_world()
    if world == 1:
        return fn(*args)
    box = [None, None]
    if rank == 0:
        try:
            box[0] = fn(*args)
        except SystemExit as e:
            box[1] = str(e)
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise SystemExit(box[1])
    return box[0]


def check_shared_output_dir(output_dir: str) -> None:
    """Every rank reads checkpoints that rank 0 wrote: rank 0 leaves a marker, every rank looks for it."""
    rank, world = rank_and_world()
    if world == 1:
        return
    name = [f".rank-zero-was-here-{time.time_ns()}"]
    dist.broadcast_object_list(name, src=0)
    marker = os.path.join(output_dir, name[0])
    if rank == 0:
        open(marker, "w").close()
    dist.barrier()  # the marker exists before anyone looks
    missing_somewhere = any_rank(not os.path.exists(marker))
    if rank == 0:
        os.remove(marker)
    if missing_somewhere:
        raise SystemExit(f"error: not every process can see --output-dir {output_dir}: with several nodes it must "
                         f"be on a shared filesystem (rank 0 writes the checkpoints, every rank reads them)")


# --fsdp: FSDP2 (torch.distributed.fsdp.fully_shard) keeps 1/N of every parameter, gradient and AdamW moment
# on each of N ranks, as DTensors. A sharded module gathers its whole weights in a hook before its forward
# and frees them after; in the backward pass it reduce-scatters the gradients, each rank keeping the sum
# for its own shard. Each decoder layer is one such module, so only one layer is whole at a time, and the
# root (the whole model) holds the rest: embeddings, final norm, output layer.
def shard_model(model: nn.Module) -> nn.Module:
    """Shards the model in place over the ranks, per decoder layer and the root; returns it."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.layers:
        fully_shard(layer)
    fully_shard(model)
    for module in model.modules():
        if isinstance(module, FSDPModule):  # a plain sum, as all_reduce_gradients: the token weights are global
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a sum op, which gloo has (no pre-multiplied sum)
    with torch.no_grad():  # FSDP takes the module of the first forward pass as its root: let it be the model
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=next(model.parameters()).device))
    # The root keeps its weights whole after a forward, and while they are whole model.parameters() gives those
    # whole tensors, not the shards that the optimiser must update.
    model.reshard()
    return model


def whole(t: Tensor) -> Tensor:
    """A sharded tensor (DTensor) gathered whole on every rank; any other tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


@contextlib.contextmanager
def whole_root(model: nn.Module | None):
    """Gathers the root's own weights for code that calls model.base_model and the output layer instead of
    the model's forward (score, check_output_head), where FSDP's hooks would not. Without grad they are
    freed again at the end; with grad, after the backward pass, when FSDP has reduced their gradients."""
    if not isinstance(model, FSDPModule):
        yield
        return
    model.reshard()  # drops a whole copy kept since the last backward pass: the optimiser has changed the shards
    model.unshard()
    free_now = not (torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()))
    try:
        yield
    finally:
        if free_now:
            model.reshard()


def full_model_state(model: nn.Module) -> dict | None:
    """With --fsdp the whole float32 state dict, gathered onto rank 0's CPU (empty on the other ranks), for
    save_pretrained; None for a model that holds its whole weights."""
    if not isinstance(model, FSDPModule):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(model: nn.Module, optimizer) -> dict:
    """The optimiser's state dict; with --fsdp gathered whole onto rank 0, keyed by parameter name."""
    if not isinstance(model, FSDPModule):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                               cpu_offload=True))


def load_states(model: nn.Module, optimizer, weights: dict, optim_state: dict) -> None:
    """Loads whole weights and optimiser state; with --fsdp each rank keeps its own shards of them."""
    if not isinstance(model, FSDPModule):
        model.load_state_dict(weights)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, optim_state, options=options)


# -----------------------------------------------------------------------------
# Evaluation on held-out questions: greedy pass@1 and, optionally, the paper's mean@K (K answers
# sampled per question at a temperature, the fraction right averaged over questions).


def evaluate(model, tokenizer, examples: list[dict], instruction: str, stop_ids: list[int], max_new_tokens: int,
             batch_size: int, compute: Compute, samples: int = 1, temperature: float = 0.0,
             templates: tuple[str, str] = DEFAULT_TEMPLATES, reward=math_reward,
             teacher_context: str | None = None) -> list[float]:
    """Per question, the fraction of its `samples` answers at `temperature` that the verifier `reward` accepts.
    With the defaults (one greedy answer) each is 1.0 or 0.0 and their mean is greedy pass@1; with
    samples=K and a temperature it is mean@K. With a teacher_context the model answers the teacher's prompt,
    with that privileged context ('peer', which needs a group, shows the answer alone)."""
    model.eval()
    texts = [prompt_texts(ex, instruction, templates)[0] for ex in examples]
    if teacher_context is not None:
        contexts = privileged_contexts(examples, "answer" if teacher_context == "peer" else teacher_context)
        texts = teacher_texts(examples, instruction, templates[1], contexts)
    rows = [(ex, text) for ex, text in zip(examples, texts) for _ in range(samples)]  # question-major: K copies
    correct = []
    for i in range(0, len(rows), batch_size):
        batch = [ex for ex, _ in rows[i:i + batch_size]]
        ids, mask = left_pad([encode_prompt(tokenizer, text) for _, text in rows[i:i + batch_size]],
                             tokenizer.pad_token_id, compute.device)
        with autocast(compute):
            resp, resp_mask = generate(model, ids, mask, max_new_tokens, temperature, 1.0, stop_ids,
                                       tokenizer.pad_token_id)
        texts = decode_responses(tokenizer, resp, resp_mask)
        correct += [reward(t, ex["answer"]) for t, ex in zip(texts, batch)]
    return [sum(correct[q * samples:(q + 1) * samples]) / samples for q in range(len(examples))]


def evaluation_metrics(model, tokenizer, held_out: list[dict], instruction: str, templates: tuple[str, str],
                       stop_ids: list[int], args: Args, compute: Compute, reward=math_reward,
                       teacher_model: nn.Module | None = None) -> dict:
    """eval_accuracy (greedy pass@1) and, with --eval-samples K, eval_mean_at_k (mean@K). With a teacher_model
    (when --beta > 0), eval_teacher_accuracy: greedy pass@1 of the teacher's view, the teacher's weights shown the
    privileged context of --teacher-context; it is what the distillation has to pass on. Under torchrun each
    rank answers every world-th question and the sums are added up."""
    batch = args.batch_prompts * args.group_size
    rank, world = rank_and_world()

    def fraction_right(k: int, temperature: float, who: nn.Module = model, context: str | None = None) -> float:
        mine = evaluate(who, tokenizer, held_out[rank::world], instruction, stop_ids, args.max_new_tokens, batch,
                        compute, k, temperature, templates, reward, context)
        return global_sum({"right": sum(mine)})["right"] / len(held_out)  # over all ranks' questions

    row = {"eval_accuracy": fraction_right(1, 0.0)}
    if teacher_model is not None:
        row["eval_teacher_accuracy"] = fraction_right(1, 0.0, teacher_model, args.teacher_context)
    if args.eval_samples:
        # The same seed at every evaluation, in a forked RNG: the training run stays the one it would
        # be without this evaluation, and the mean@K of two steps is drawn with the same noise.
        with torch.random.fork_rng(devices=[compute.device] if compute.device.type == "cuda" else []):
            torch.manual_seed(args.seed + rank)
            row["eval_mean_at_k"] = fraction_right(args.eval_samples, args.eval_temperature)
    return row


# -----------------------------------------------------------------------------
# Checkpoints and resuming. A checkpoint is a save_pretrained directory (loadable with
# AutoModelForCausalLM.from_pretrained) plus trainer_state.pt: optimiser, lr schedule, step, RNG
# states and data position. It is written to a temporary directory and renamed when complete,
# so a crash while saving never leaves a checkpoint that looks complete.


def save_checkpoint(model, tokenizer, path: str, state: dict | None = None, weights: dict | None = None) -> None:
    """Writes model and tokenizer (save_pretrained) and the trainer state to path, atomically: into path.tmp,
    then renamed. weights: the model's whole state dict when the model itself holds only shards (--fsdp)."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=weights)
    tokenizer.save_pretrained(tmp)
    if state is not None:
        torch.save(state, os.path.join(tmp, "trainer_state.pt"))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)  # atomic on one filesystem


def checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoint-STEP directories, oldest first (*.tmp ones were never finished)."""
    if not os.path.isdir(output_dir):
        return []
    names = [n for n in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+", n)]
    return [os.path.join(output_dir, n) for n in sorted(names, key=lambda n: int(n.split("-")[1]))]


def rng_states() -> dict:
    """This process's random states: Python's (data order draws), torch's CPU and CUDA ones (sampling)."""
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(states: dict) -> None:
    """Puts back what rng_states() returned, so a resumed run samples what the uninterrupted one would."""
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def all_rng_states() -> list[dict]:
    """Every rank's RNG states, in rank order (rank 0 saves them all in a checkpoint)."""
    rank, world = rank_and_world()
    if world == 1:
        return [rng_states()]
    states = [None] * world
    dist.all_gather_object(states, rng_states())
    return states


def prepare_output_dir(args: Args) -> str | None:
    """Refuses to mix two runs in one directory. Returns the checkpoint to resume from, if any."""
    metrics = os.path.join(args.output_dir, "metrics.jsonl")
    if args.overwrite:
        shutil.rmtree(args.output_dir, ignore_errors=True)
    elif os.path.exists(metrics) and not args.resume:
        raise SystemExit(f"error: {args.output_dir} holds another run; add --resume to continue it, --overwrite "
                         f"to replace it, or choose another --output-dir")
    os.makedirs(args.output_dir, exist_ok=True)
    if args.resume and os.path.isdir(os.path.join(args.output_dir, "final")):
        raise SystemExit(f"error: {args.output_dir} holds a finished run (final/): nothing to resume")
    found = checkpoints(args.output_dir)
    if args.resume and not found:
        print(f"no checkpoint in {args.output_dir}: starting from step 0")
    return found[-1] if args.resume and found else None


def restore_checkpoint(path: str, model, optimizer, scheduler, order: random.Random,
                       trust_remote_code: bool = False) -> dict:
    """Loads a checkpoint into the policy and the trainer; returns its trainer state. The reference
    model is not touched: it stays the INITIAL weights."""
    from transformers import AutoModelForCausalLM

    state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    # The weights are read back through from_pretrained, not straight from the checkpoint's safetensors
    # file(s): save_pretrained writes the Hub's layout, not the model's own. It leaves out a tied output
    # layer, and (transformers 5.x) undoes the conversions that loading applies, e.g. an MoE model's fused
    # expert tensors are written as one tensor per expert under other names, so that file's keys would not
    # match the model's state dict. from_pretrained redoes exactly those conversions; it costs a second
    # float32 model on the CPU for a moment.
    weights = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    load_states(model, optimizer, weights.state_dict(), state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    order.setstate(state["order"])
    rank, world = rank_and_world()
    by_rank = state.get("rng_by_rank", [state["rng"]])
    if world > 1 and len(by_rank) != world:
        raise SystemExit(f"error: {path} was saved by {len(by_rank)} process(es); resume it with as many")
    set_rng_states(by_rank[rank])
    return state


def save_training_checkpoint(args: Args, model, tokenizer, optimizer, scheduler, trainer_state: dict) -> str:
    """checkpoint-STEP/ with everything --resume needs (trainer_state: step, data order and position, the
    count of skipped steps), written by rank 0; only the newest --keep-checkpoints are kept."""
    path = os.path.join(args.output_dir, f"checkpoint-{trainer_state['step']}")
    rngs = all_rng_states()
    state = {**trainer_state, "optimizer": optimizer_state(model, optimizer), "scheduler": scheduler.state_dict(),
             "rng": rngs[0], **({"rng_by_rank": rngs} if len(rngs) > 1 else {})}
    on_rank_zero(save_checkpoint, model, tokenizer, path, state, full_model_state(model))
    for old in checkpoints(args.output_dir)[:-args.keep_checkpoints] if rank_and_world()[0] == 0 else []:
        shutil.rmtree(old)
    return path


# -----------------------------------------------------------------------------
# Run bookkeeping (metrics file, interrupts) and the checks made before training starts.


def open_run_files(args: Args, first_step: int) -> tuple[TextIO, "Tracker"]:
    """Writes config.json, opens metrics.jsonl for appending from first_step on and starts the --report-to
    tracker (rank 0; the other ranks write nowhere and report nothing). Returns (metrics file, tracker)."""
    if rank_and_world()[0] > 0:
        return open(os.devnull, "w"), Tracker()
    config = dataclasses.asdict(args)
    with open(os.path.join(args.output_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    metrics_file = open_metrics(os.path.join(args.output_dir, "metrics.jsonl"), first_step)
    return metrics_file, start_tracker(args, config, first_step)


def log_row(metrics_file: TextIO, tracker: "Tracker", row: dict) -> None:
    """One JSON line per step, flushed at once so that a hard kill loses at most the row being written; the
    tracker gets the same row, so its curves and metrics.jsonl cannot disagree."""
    metrics_file.write(json.dumps(row) + "\n")
    metrics_file.flush()
    tracker.log(row)


def open_metrics(path: str, first_step: int):
    """Opens metrics.jsonl for appending, after dropping rows of steps >= first_step (a resumed run
    repeats the steps after its checkpoint, and every step must appear exactly once) and a last row
    that a hard kill cut off in the middle of its write (it has no newline)."""
    lines = open(path).readlines() if os.path.exists(path) else []
    rows = [json.loads(line) for line in lines if line.endswith("\n")]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows if r["step"] < first_step)
    return open(path, "a")


# Trackers (--report-to), for watching curves as in TRL or cleanrl. Each package is imported only when asked
# for, so the core install stays torch, transformers, datasets and tqdm. A tracker gets every row of
# metrics.jsonl under the same keys, at the row's step (the step-0 evaluation and the evaluation rows too), and
# the settings of config.json once at the start. A resumed run continues the same curves. main() closes the
# tracker on every way out (the end, Ctrl-C's checkpoint, an error), so nothing it buffered is lost.


class Tracker:
    """--report-to none, and every rank but 0 under torchrun: reports nothing."""

    def log(self, row: dict) -> None:
        pass

    def close(self, failed: bool) -> None:
        pass

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close(failed=exc_type is not None)


class TensorBoardTracker(Tracker):
    """Event files in OUTPUT_DIR/tensorboard, one scalar tag per metrics key."""

    def __init__(self, log_dir: str, config: dict, first_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run repeats the steps after its checkpoint, which the earlier event file may hold too:
        # purge_step tells TensorBoard to drop every earlier event from first_step on, so no step shows twice.
        self.writer = SummaryWriter(log_dir, purge_step=first_step)
        table = ["| setting | value |", "|---|---|", *(f"| {k} | {json.dumps(v)} |" for k, v in config.items())]
        self.writer.add_text("config", "\n".join(table), global_step=first_step)  # a resumed run: again, there

    def log(self, row: dict) -> None:
        for key, value in row.items():
            if key != "step" and value is not None:  # None: a metric that is off (kl_distill with --beta 0)
                self.writer.add_scalar(key, value, global_step=row["step"])
        self.writer.flush()  # as metrics.jsonl: a hard kill loses at most this row

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """A Weights & Biases run in project $WANDB_PROJECT (default sdpg); its files go to $WANDB_DIR, else
    OUTPUT_DIR/wandb. WANDB_MODE=offline keeps it on this machine (upload later with wandb sync)."""

    def __init__(self, args: Args, config: dict):
        import wandb

        # The run's id is kept in the output directory, so that --resume continues the same W&B run
        # (resume="allow" makes it when the id is new). A fresh start, --overwrite included, gets a new id.
        id_file = os.path.join(args.output_dir, "wandb_run_id")
        run_id = open(id_file).read().strip() if args.resume and os.path.exists(id_file) else None
        # The steps that a resumed run repeats after its checkpoint are already in the W&B run: W&B ignores a
        # step lower than the run's last one (with a warning), so it keeps the first row of each, which holds
        # the same values (resuming is exact).
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "sdpg"), name=args.run_name, id=run_id,
                              resume="allow", config=config, dir=os.environ.get("WANDB_DIR", args.output_dir))
        with open(id_file, "w") as f:
            f.write(self.run.id + "\n")

    def log(self, row: dict) -> None:
        values = {k: v for k, v in row.items() if k != "step" and v is not None}
        self.run.log(values, step=row["step"], commit=True)  # commit: the row is complete, send it now

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)  # W&B marks a run that ended in an error as failed


def start_tracker(args: Args, config: dict, first_step: int) -> Tracker:
    """The --report-to tracker, started where the run's metrics start (first_step: 0, or the step a resumed
    run continues at)."""
    if args.report_to == "tensorboard":
        return TensorBoardTracker(os.path.join(args.output_dir, "tensorboard"), config, first_step)
    if args.report_to == "wandb":
        return WandbTracker(args, config)
    return Tracker()


@contextlib.contextmanager
def catch_interrupts():
    """Ctrl-C or SIGTERM: yields a list that gets the signal, so the loop can finish its step and
    save. A second Ctrl-C goes to Python's default handler and stops at once."""
    stop: list[int] = []

    def on_signal(signum, frame):
        stop.append(signum)
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
        print("\ninterrupted: finishing this step, then saving a checkpoint (Ctrl-C again quits at once)")

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def check_prompt_lengths(model, tokenizer, examples: list[dict], instruction: str, max_new_tokens: int,
                         teacher: bool, templates: tuple[str, str] = DEFAULT_TEMPLATES) -> None:
    """Every prompt (the teacher's, the longest view, when there is a teacher) plus an answer must
    fit the model's context."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is None:
        return
    for i, ex in enumerate(examples):
        n = len(encode_prompt(tokenizer, prompt_texts(ex, instruction, templates)[1 if teacher else 0]))
        if n + max_new_tokens > limit:
            raise SystemExit(f"error: example {i}'s {'teacher ' if teacher else ''}prompt has {n} tokens; with "
                             f"--max-new-tokens {max_new_tokens} that exceeds the model's context of {limit} tokens")


def check_output_head(model, tokenizer, device: torch.device) -> None:
    """Scoring computes logits as lm_head(final hidden state). Some architectures change the logits
    after that (Gemma-2's soft-capping, Cohere's logit scale): refuse them rather than score answers
    from another distribution than the one they were sampled from."""
    ids = torch.tensor([tokenizer("1 + 1 =").input_ids], device=device)
    with torch.no_grad(), whole_root(model):
        full = model(input_ids=ids).logits[0, -1].float()
        ours = model.get_output_embeddings()(model.base_model(input_ids=ids).last_hidden_state[0, -1]).float()
    if not torch.allclose(full, ours, rtol=1e-3, atol=1e-3):
        raise SystemExit("error: this model transforms its logits after the output layer (soft-capping or "
                         "scaling), which sdpg.py's scoring does not reproduce; use a Qwen, Llama or SmolLM model")


# -----------------------------------------------------------------------------
# main: wiring only.


def build_models(args: Args, compute: Compute):
    """The policy (trained, float32), the frozen reference (None when --alpha 0 and it does not teach), the sampler,
    the tokenizer and the stop ids, on the device, and the teacher: the policy itself (SDPG), the reference, or with
    --teacher ema a float32 copy to average into; with --fsdp the policy and the reference are sharded."""
    device, bf16 = compute
    model, tokenizer = load_model(args.model, args.seed, args.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise SystemExit(f"error: the tokenizer of {args.model} has no EOS token, so answers could never end")
    stop_ids = stop_token_ids(model, tokenizer)
    # Sampling never reads the Hub's generation_config (hf_generate passes its own settings), but
    # save_pretrained writes it beside every checkpoint: a plain one with the stop ids we trained with
    # makes a checkpoint end its answers where training did, with no sampling setting we never used.
    from transformers import GenerationConfig
    model.generation_config = GenerationConfig(eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
    # The copy is made on the CPU, so the device never holds two float32 models at once.
    needs_ref = args.alpha > 0 or args.teacher == "reference"
    ref_model = frozen_copy(model, torch.bfloat16 if bf16 else torch.float32).to(device) if needs_ref else None
    ema = frozen_copy(model, torch.float32).to(device) if args.teacher == "ema" else None
    sampler = make_sampler(model, bf16, whole_copy=args.fsdp).to(device)
    model.to(device)
    if args.gradient_checkpointing:  # transformers 5.2x renamed gradient_ to activation_checkpointing
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    if args.fsdp:
        model = shard_model(model)
        ref_model = shard_model(ref_model) if ref_model is not None else None
    teacher_model = {"policy": model, "reference": ref_model, "ema": ema}[args.teacher]
    return model, ref_model, sampler, tokenizer, stop_ids, teacher_model


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with distributed(args) as compute:  # pick_device(), and the process group under torchrun
        run(args, compute)


def run(args: Args, compute: Compute) -> None:
    """The run on this process (rank): models, data, then the training steps with their evaluations and
    checkpoints."""
    reward = reward_function(args.verifier)
    templates = read_templates(args.student_template, args.teacher_template, default_templates(args.dataset))
    rank, world = rank_and_world()
    seed_everything(args.seed + rank)  # each rank samples its own answers; the data order below is shared
    resume_from = on_rank_zero(prepare_output_dir, args)
    check_shared_output_dir(args.output_dir)
    model, ref_model, sampler, tokenizer, stop_ids, teacher_model = build_models(args, compute)
    # The teacher's view is evaluated with the weights that teach: the sampler's copy of the policy, or the other model.
    eval_teacher = None if args.beta == 0 else sampler if args.teacher == "policy" else teacher_model
    train, held_out = load_examples(args.dataset, args.eval_n, args.seed, args.question_field, args.answer_field,
                                    args.solution_field)
    check_prompt_lengths(model, tokenizer, train + held_out, args.instruction, args.max_new_tokens, args.beta > 0,
                         templates)
    check_output_head(model, tokenizer, compute.device)

    optimizer, scheduler = build_optimizer(model, args)
    order = random.Random(args.seed)  # data order: a reshuffle of the training set per epoch
    queue: list[int] = []  # indices of the training examples still to come in this epoch
    start_step, bad_in_a_row = 1, 0
    if resume_from:
        state = restore_checkpoint(resume_from, model, optimizer, scheduler, order, args.trust_remote_code)
        queue, start_step, bad_in_a_row = state["queue"], state["step"] + 1, state["bad_in_a_row"]
        if args.teacher == "ema":  # the average is part of the run: without it the teacher would restart
            teacher_model.load_state_dict(state["ema"])
    # Without a checkpoint the run starts again at step 0, whose evaluation row is logged again.
    metrics_file, tracker = open_run_files(args, start_step if resume_from else 0)
    print(describe_run(args, model, len(train), len(held_out), compute, start_step if resume_from else None))

    from tqdm import tqdm
    with metrics_file, tracker:  # closed on every way out: the end, Ctrl-C's checkpoint, an error
        if start_step == 1:
            row = {"step": 0, **evaluation_metrics(sampler, tokenizer, held_out, args.instruction, templates,
                                                   stop_ids, args, compute, reward, eval_teacher)}
            log_row(metrics_file, tracker, row)
            print(format_row(row))
        with catch_interrupts() as stop:
            for step in tqdm(range(start_step, args.steps + 1), desc="sdpg", dynamic_ncols=True,
                             initial=start_step - 1, total=args.steps, disable=rank > 0):
                batch, queue = next_batch(queue, order, len(train), args.batch_prompts)
                # this rank's share of the batch (all of it in one process)
                examples = [train[i] for i in rank_share(batch, args.updates_per_batch, rank, world)]
                row = training_step(step, examples, model, ref_model, sampler, tokenizer, optimizer, scheduler,
                                    stop_ids, args, compute, templates, reward, teacher_model)
                if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
                    refresh_sampler(sampler, model)  # evaluate the weights after this step's update
                    row.update(evaluation_metrics(sampler, tokenizer, held_out, args.instruction, templates,
                                                  stop_ids, args, compute, reward, eval_teacher))
                log_row(metrics_file, tracker, row)
                tqdm.write(format_row(row))
                bad_in_a_row = count_bad_steps(bad_in_a_row, row["skipped_updates"])
                trainer_state = {"step": step, "order": order.getstate(), "queue": queue,
                                 "bad_in_a_row": bad_in_a_row}
                if args.teacher == "ema":
                    trainer_state["ema"] = teacher_model.state_dict()
                if any_rank(bool(stop)):
                    path = save_training_checkpoint(args, model, tokenizer, optimizer, scheduler, trainer_state)
                    print(f"saved {path}. To continue: python sdpg.py <the same flags> --resume")
                    return
                if args.save_every and step % args.save_every == 0 and step != args.steps:
                    save_training_checkpoint(args, model, tokenizer, optimizer, scheduler, trainer_state)
    on_rank_zero(save_checkpoint, model, tokenizer, os.path.join(args.output_dir, "final"), None,
                 full_model_state(model))
    print(f"done: final model in {os.path.join(args.output_dir, 'final')}")


def describe_run(args: Args, model: nn.Module, n_train: int, n_held_out: int, compute: Compute,
                 resuming_at: int | None) -> str:
    """The line printed before training: what runs, on what, and where it writes."""
    n_params = sum(p.numel() for p in model.parameters())
    world = rank_and_world()[1]
    return (f"model {args.model} ({n_params / 1e6:.1f}M parameters) | dataset {args.dataset} ({n_train} train, "
            f"{n_held_out} held out) | device {compute.device}{' bf16' if compute.bf16 else ''}"
            f"{f' x {world}' if world > 1 else ''} | output {args.output_dir}"
            + (f" | resuming at step {resuming_at}" if resuming_at else ""))


def format_row(row: dict) -> str:
    """One fixed-format line per step; step 0's row holds only the evaluation before training."""
    line = f"step {row['step']:4d}"
    if "reward_mean" in row:
        shown = {k: "-" if row.get(k) is None else format(row[k], spec) for k, spec in (
            ("reward_mean", ".3f"), ("kl_distill", ".4f"), ("kl_ref", ".4f"), ("beta", ".1e"), ("gate_frac", ".2f"),
            ("entropy", ".3f"), ("response_len", ".1f"), ("time_s", ".2f"))}  # a metric that is off shows as "-"
        line += (f" | reward {shown['reward_mean']} | kl_distill {shown['kl_distill']} | "
                 f"kl_ref {shown['kl_ref']} | beta {shown['beta']} | gate {shown['gate_frac']} | "
                 f"entropy {shown['entropy']} | len {shown['response_len']} | {shown['time_s']}s")
    return line + "".join(f" | {k} {row[k]:.3f}" for k in ("eval_accuracy", "eval_mean_at_k", "eval_teacher_accuracy")
                          if k in row)


if __name__ == "__main__":
    main()
    end_process()
