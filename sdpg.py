"""SDPG: Self-Distilled Policy Gradient, in one readable file.

Paper: Liu, Zhang, Zhang, Gu, "Self-Distilled Policy Gradient", arXiv 2606.04036 (2026); equation numbers in
the comments are the paper's. SDPG trains a language model with a verifier (a checker that says whether an
answer is right), like GRPO, and adds a dense per-token teacher that costs no second model:

  1. Sample G answers per question from the model (the "student" view: the question only).
  2. Grade each with the verifier; compare it with the other answers to the same question (the group-relative,
     std-normalised advantage A, Eq. 2.1).
  3. Show the SAME model the question plus privileged context (the reference answer and a worked solution) and
     read its next-token distribution q_t at every position of the sampled answer (the "teacher" view). Pull the
     student's p_t towards q_t with the exact reverse KL(p_t || q_t) over the whole vocabulary (Eq. 3.2), on
     answers with A > 0 only (the gate, Eq. 3.5).
  4. Keep the policy near the frozen initial model with a per-token KL anchor (Section 3.4).

  L_SDPG = L_out + beta(k) * L_OPD+ + alpha * L_K                                       (Eq. 3.1)

  (L_out: the outcome policy-gradient term; L_OPD+: on-policy distillation on the positively rewarded answers;
  L_K: the KL anchor to the frozen initial model.)

Run it:
  python sdpg.py --model tiny --dataset toy     # offline demo on a laptop CPU, about half a minute
  python sdpg.py --model Qwen2.5-0.5B           # GSM8K on one GPU
  python sdpg.py --help                         # every setting, with the paper's values

In order: 1. the maths; 2. scoring the three views of an answer; 3. one training step (the method ends there);
4. settings, models, data, prompts, evaluation, checkpoints and main; 5. sampling, with a decoding loop of our own.
"""

from __future__ import annotations  # annotations may name classes defined further down

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import string
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import NamedTuple, get_type_hints

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from verifiers import gsm8k_gold, math_reward


# -----------------------------------------------------------------------------
# 1. The SDPG maths. Rewards and advantages are (N,), one per answer; loss terms are (n, L): n rows of the
# batch by L response positions, with `weights` holding each token's share of the update. Every function
# here is pure on tensors: copy it into another trainer as it is. SG[x] is stop-gradient (x.detach()).


# A_i = (R_i - mean_G(R)) / (std_G(R) + eps), unbiased std                          (Eq. 2.1)
def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """Group-relative, std-normalised advantages. rewards (N,) grouped contiguously, N = prompts * G. A group
    whose rewards are all equal gets A = 0 (nothing to learn from it).
    >>> group_advantages(torch.tensor([1., 0., 0., 0., 1., 1., 1., 1.]), group_size=4).round(decimals=4)
    tensor([ 1.5000, -0.5000, -0.5000, -0.5000,  0.0000,  0.0000,  0.0000,  0.0000])
    """
    if group_size < 2:
        raise ValueError("group_size must be >= 2: the std of a single reward is undefined")
    if rewards.shape[0] % group_size:  # rows come in groups of G answers to one prompt
        raise ValueError(f"the number of rows N ({len(rewards)}) must be a multiple of the group size G ({group_size})")
    r = rewards.float().view(-1, group_size)  # (B, G)
    A = (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + eps)  # (B, G), torch.std is unbiased
    return A.view(-1)  # (N,)


# Each token's share of the loss of one update, w_{i,t}, with sum over i, t of w_{i,t} = 1:
#   group       w_{i,t} = mask_{i,t} / (B * sum_{j in group(i)} |y_j|)  (Eq. 3.4; B prompts; all G answers counted)
#   token-mean  w_{i,t} = mask_{i,t} / sum_{j,s} mask_{j,s}            (the authors' released code)
# 'group' weighs every prompt the same, 'token-mean' every token (so long answers weigh more). The weights sum to 1
# over the update, so sum(w * per_token_loss) splits over micro-batches of any size without changing the result.
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
    if m.shape[0] % group_size:
        raise ValueError(f"the number of rows N ({m.shape[0]}) must be a multiple of the group size G ({group_size})")
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


# Per sampled token, log w = log p_t(y_t) - log pi_ref(y_t) (Section 3.4, Appendix A.2). UKL is the KL between
# unnormalised distributions; k2, k3 are Schulman's per-sample estimators (k3 = exp(-log w) - 1 + log w: kl_ref).
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
    """logp, old_logp (n, L); A (n, 1) -> (n, L). When logp == old_logp (one update per batch), rho = 1, nothing
    is clipped, and the gradient is exactly -A * grad log p: plain REINFORCE with the group advantage."""
    rho = torch.exp(logp - old_logp.detach())  # (n, L)
    pg = torch.maximum(-A * rho, -A * rho.clamp(1 - eps_low, 1 + eps_high))  # (n, L)
    return torch.where(A < 0, torch.minimum(pg, -A * c), pg)  # (n, L)


# Per token: policy_loss(rho, A) + beta(k) * m_i * SG[rho] * KL_t + alpha * SG[rho] * f(log w_t), weighted and
# summed (Eq. 3.1). The gate m_i = 1[A_i > 0] (Eq. 3.5) spends the dense pull on answers the outcome term rewards.
# rho = p_theta(y_t) / p_rollout(y_t) is 1 with one update per batch; with several, the distillation and the
# anchor are reweighted by SG[rho] like the outcome term (Appendix A.3).
def sdpg_loss(logp: Tensor, old_logp: Tensor, kl_distill: Tensor | None, ref_logp: Tensor | None,
              advantages: Tensor, weights: Tensor, beta_k: float, alpha: float, kl_mode: str,
              clip_low: float = 0.2, clip_high: float = 0.28, clip_c: float = 10.0, gate: bool = True) -> Tensor:
    """L_SDPG = L_out + beta(k) L_OPD+ + alpha L_K (Eq. 3.1) for a slice of the batch. logp, old_logp,
    kl_distill, ref_logp, weights: (n, L); advantages: (n,). kl_distill None means no teacher (beta = 0), ref_logp
    None no anchor (alpha = 0); gate=False distils every answer (m_i = 1). The clips act only if old_logp != logp."""
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
    """Weight of the distillation term at training step k = step (1-based); a window of 0 is off. With the
    paper's windows (50 up, 350 down, of 400) beta_base is reached at k = 50 only:
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


# R_i = 1 if the verifier accepts y_i, else r_wrong; plus the overlong penalty. R -> a R + b (a > 0) leaves the
# advantage of Eq. 2.1 as it was, so the released script's -1 for a wrong answer changes nothing alone: it sets
# how much a penalty of up to -1 weighs against the gap between right and wrong (1 with r_wrong = 0, 2 with -1).
def shaped_reward(correct: Tensor, lengths: Tensor, wrong_reward: float, max_len: int, buffer: int) -> Tensor:
    """correct (N,) 1.0 or 0.0 from the verifier, lengths (N,) answer tokens -> (N,) rewards.
    >>> shaped_reward(torch.tensor([1., 0., 1.]), torch.tensor([5, 9, 10]), -1.0, max_len=10, buffer=4)
    tensor([ 1.0000, -1.7500,  0.0000])
    """
    reward = torch.where(correct > 0, 1.0, wrong_reward).to(correct.device)  # (N,)
    return reward + overlong_penalty(lengths, max_len, buffer)  # (N,)


# -----------------------------------------------------------------------------
# 2. Scoring. The logits at response positions come from three views of the same answer ids: the student
# pi_theta(. | x, y_<t) with gradients; the teacher pi_theta(. | c, x, y_<t), same weights, privileged prompt,
# no gradients (stop-grad); the reference pi_ref(. | x, y_<t), frozen initial weights. We stop at the final hidden
# states (N, L, H) and make logits a chunk of tokens at a time: (tokens, V) float32 logits at V = 151,936 are
# the memory wall of full-vocabulary methods.


def response_hidden_states(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor,
                           response_ids: Tensor, response_mask: Tensor) -> Tensor:
    """Final hidden states that predict each response token: (N, P), (N, L) -> (N, L, H). The input is prompt
    ids + the SAMPLED response ids, never re-tokenised text: the teacher scores the very tokens the student chose."""
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
    kl: Tensor  # KL(p_t || SG[q_t]) over the whole vocabulary, with grad; 0 without a teacher
    entropy: Tensor  # H(p_t), no grad, a metric


def _chunk_terms(h_student: Tensor, h_teacher: Tensor | None, targets: Tensor, lm_head: nn.Module,
                 teacher_head: nn.Module, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """One chunk of chunked_token_terms: the hidden states (C, H) of its C tokens -> the three (C,) ChunkTerms."""
    logits = lm_head(h_student).float() / temperature  # (C, V) at the T that drew the answers; only here
    lse = torch.logsumexp(logits, dim=-1)  # (C,)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - lse  # (C,) log p_t(y_t)
    with torch.no_grad():  # a metric only: no autograd buffers for it
        entropy = lse - (logits.softmax(dim=-1) * logits).sum(-1)  # (C,) H(p_t)
    if h_teacher is None:
        return logp, torch.zeros_like(logp), entropy
    with torch.no_grad():  # the teacher is a stop-gradient target: no graph for its (C, V) logits
        teacher_logits = teacher_head(h_teacher).float() / temperature  # (C, V)
    return logp, full_vocab_reverse_kl(logits, teacher_logits), entropy


def chunked_token_terms(h_student: Tensor, h_teacher: Tensor | None, targets: Tensor, lm_head: nn.Module,
                        temperature: float, chunk_size: int, teacher_head: nn.Module | None = None) -> ChunkTerms:
    """Per-token log p_t(y_t), KL(p_t || q_t) and entropy of p_t, chunk by chunk: h_student (M, H) with grad,
    h_teacher (M, H) or None, targets (M,) -> three (M,), for the M real response tokens (padding dropped).
    teacher_head turns the teacher's states into logits [default: lm_head, the policy's own, as in SDPG]. With
    gradients on, each chunk runs in torch.utils.checkpoint: the forward keeps only its (C, H) inputs and the
    backward recomputes its (C, V) logits, so the peak memory is about chunk_size x V x 4 bytes x a few, not
    M x V x 4 bytes x a few. The result equals the unchunked computation."""
    teacher_head = lm_head if teacher_head is None else teacher_head
    outs = []
    for i in range(0, targets.shape[0], chunk_size):
        hs, y = h_student[i:i + chunk_size], targets[i:i + chunk_size]  # (C, H), (C,)
        ht = None if h_teacher is None else h_teacher[i:i + chunk_size].detach()  # (C, H)
        if torch.is_grad_enabled() and hs.requires_grad:
            outs.append(checkpoint(_chunk_terms, hs, ht, y, lm_head, teacher_head, temperature, use_reentrant=False))
        else:
            outs.append(_chunk_terms(hs, ht, y, lm_head, teacher_head, temperature))
    return ChunkTerms(*(torch.cat(parts) for parts in zip(*outs)))  # each (M,)


def scatter_tokens(values: Tensor, mask: Tensor) -> Tensor:
    """(M,) values of the real tokens -> (N, L) with zeros at padding (keeps gradients)."""
    out = values.new_zeros(mask.shape)  # (N, L)
    out[mask.bool()] = values
    return out


# -----------------------------------------------------------------------------
# 3. One training step: sample G answers per question, grade them, score the three views, update.

# The paper's optimiser settings (also the released script's): AdamW's weight decay, the learning-rate warm-up
# in optimiser steps, the gradient-norm clip, PPO's lower clip and DAPO's dual-clip bound c.
WEIGHT_DECAY, LR_WARMUP, MAX_GRAD_NORM, CLIP_LOW, CLIP_C = 0.1, 10, 1.0, 0.2, 10.0


class Models(NamedTuple):
    """The weights of a run: ONE policy, read through two prompts, and a frozen copy of where it started."""
    policy: nn.Module  # trained; float32 weights (AdamW's 1e-6 steps would round away in bf16)
    reference: nn.Module | None  # the frozen initial weights: the anchor, or the teacher; None if neither (--alpha 0)
    teacher: nn.Module  # reads the privileged prompt: the policy itself (SDPG), or the reference (--teacher reference)
    sampler: nn.Module  # generates: the policy itself, or on CUDA its bf16 copy, refreshed before each rollout
    tokenizer: object
    stop_ids: list[int]  # every id that ends an answer (stop_token_ids)


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


def answer_and_grade(model: nn.Module, tokenizer, stop_ids: list[int], texts: list[str], golds: list[str],
                     max_new_tokens: int, temperature: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One answer to each user message, all in ONE generate call, graded against its gold answer by the verifier
    -> prompt ids and mask (N, P), response ids and mask (N, L), correct (N,): 1.0 or 0.0."""
    ids, mask = left_pad([encode_prompt(tokenizer, t) for t in texts], tokenizer.pad_token_id, model.device)  # (N, P)
    model.eval()
    with autocast(model.device):
        response_ids, response_mask = generate(model, ids, mask, max_new_tokens, temperature, top_p=1.0,
                                               stop_ids=stop_ids, pad_id=tokenizer.pad_token_id)  # (N, L) each
    said = decode_responses(tokenizer, response_ids, response_mask)
    correct = torch.tensor([math_reward(text, gold) for text, gold in zip(said, golds)], device=model.device)  # (N,)
    return ids, mask, response_ids, response_mask, correct


def collect_rollouts(m: Models, examples: list[dict], args: Args) -> Rollouts:
    """G graded answers to each example; the teacher's prompt adds c, the gold answer and worked solution."""
    G, tok = args.group_size, m.tokenizer
    texts = [prompt_texts(ex, args.instruction, templates_for(tok)) for ex in examples for _ in range(G)]  # N pairs
    prompt_ids, prompt_mask, response_ids, response_mask, correct = answer_and_grade(
        m.sampler, tok, m.stop_ids, [s for s, _ in texts], [ex["answer"] for ex in examples for _ in range(G)],
        args.max_new_tokens, args.temperature)
    teacher_ids, teacher_mask = left_pad([encode_prompt(tok, t) for _, t in texts], tok.pad_token_id,
                                         m.policy.device)  # (N, Pc)
    rewards = shaped_reward(correct, response_mask.sum(dim=1), args.wrong_reward, args.max_new_tokens,
                            args.overlong_buffer)  # (N,)
    return Rollouts(prompt_ids, prompt_mask, teacher_ids, teacher_mask, response_ids, response_mask,
                    rewards, group_advantages(rewards, G))


def score(m: Models, rb: Rollouts, rows: slice, args: Args, teacher: bool, reference: bool) -> tuple:
    """Per-token (n, L) terms of rows of the batch, zeros at padding: log p_t(y_t) (with grad if enabled), the
    KL(p_t || SG[q_t]) against the teacher (None without), log pi_ref(y_t) (None without anchor) and H(p_t)."""
    mask = rb.response_mask[rows]  # (n, L)
    real = mask.bool()
    targets = rb.response_ids[rows][real]  # (M,) real response tokens, flattened
    with autocast(m.policy.device):
        h_teacher, ref_logp = None, None
        if teacher:
            with torch.no_grad():  # the teacher (by default the current policy) is a stop-gradient target
                h_teacher = response_hidden_states(m.teacher, rb.teacher_ids[rows], rb.teacher_mask[rows],
                                                   rb.response_ids[rows], mask)[real]  # (M, H)
        if reference:
            with torch.no_grad():
                h_ref = response_hidden_states(m.reference, rb.prompt_ids[rows], rb.prompt_mask[rows],
                                               rb.response_ids[rows], mask)[real]  # (M, H)
                ref_logp = scatter_tokens(chunked_token_terms(h_ref, None, targets, m.reference.get_output_embeddings(),
                                                              args.temperature, args.chunk_size).logp, mask)  # (n, L)
        h_student = response_hidden_states(m.policy, rb.prompt_ids[rows], rb.prompt_mask[rows],
                                           rb.response_ids[rows], mask)[real]  # (M, H)
        logp, kl, entropy = chunked_token_terms(h_student, h_teacher, targets, m.policy.get_output_embeddings(),
                                                args.temperature, args.chunk_size, m.teacher.get_output_embeddings())
    return scatter_tokens(logp, mask), scatter_tokens(kl, mask) if teacher else None, ref_logp, scatter_tokens(
        entropy, mask)


def policy_update(m: Models, optimizer, scheduler, rb: Rollouts, beta_k: float, args: Args) -> dict:
    """--updates-per-batch optimiser steps on one batch of rollouts, each accumulated over micro-batches."""
    m.policy.train()
    N, G = rb.response_ids.shape[0], args.group_size
    teacher, reference = args.beta > 0, m.reference is not None and args.alpha > 0
    rollout_logp = None  # (N, L) the rollout policy's log-probs, for the ratio rho (Appendix A.3)
    if args.updates_per_batch > 1:  # with one update the policy is still the rollout policy: rho = 1
        with torch.no_grad():
            rollout_logp = torch.cat([score(m, rb, slice(i, i + args.micro_batch), args, False, False)[0]
                                      for i in range(0, N, args.micro_batch)])  # (N, L)
    sums = dict(loss=0.0, kl_distill=0.0, kl_ref=0.0, entropy=0.0, grad_norm=0.0, skipped_updates=0)
    per_update = N // args.updates_per_batch  # whole groups, checked in check_args()
    for u in range(0, N, per_update):
        weights = token_weights(rb.response_mask[u:u + per_update], G, args.loss_agg)  # (n, L), sum to 1
        update_loss = 0.0
        for i in range(u, u + per_update, args.micro_batch):
            rows = slice(i, min(i + args.micro_batch, u + per_update))
            logp, kl, ref_logp, entropy = score(m, rb, rows, args, teacher, reference)
            old_logp = logp.detach() if rollout_logp is None else rollout_logp[rows]
            w = weights[rows.start - u:rows.stop - u]  # (n, L)
            loss = sdpg_loss(logp, old_logp, kl, ref_logp, rb.advantages[rows], w, beta_k, args.alpha, args.kl_mode,
                             CLIP_LOW, args.clip_high, CLIP_C, args.gate)
            loss.backward()  # gradients accumulate over the micro-batches of the update
            update_loss += loss.item()
            # Metrics, weighted like the loss over the whole batch (w / updates sums to 1 over everything).
            w = w / args.updates_per_batch
            sums["loss"] += loss.item() / args.updates_per_batch  # the mean over updates
            sums["entropy"] += (w * entropy).sum().item()
            if kl is not None:
                sums["kl_distill"] += (w * kl.detach()).sum().item()
            if ref_logp is not None:  # k3 estimate of KL(pi_theta || pi_ref), >= 0 per token
                log_ratio = (logp - ref_logp).detach()
                sums["kl_ref"] += (w * (torch.exp(-log_ratio) - 1 + log_ratio)).sum().item()
        grad_norm = torch.nn.utils.clip_grad_norm_(m.policy.parameters(), MAX_GRAD_NORM).item()
        sums["grad_norm"] += grad_norm / args.updates_per_batch
        if math.isfinite(grad_norm) and math.isfinite(update_loss):
            optimizer.step()
            scheduler.step()
        else:  # a NaN/inf would poison the weights and AdamW's moments for good: skip this update
            sums["skipped_updates"] += 1
        optimizer.zero_grad(set_to_none=True)
    sums["kl_distill"] = sums["kl_distill"] if teacher else None
    sums["kl_ref"] = sums["kl_ref"] if reference else None
    return sums


def build_optimizer(model: nn.Module, args: Args):
    """AdamW with the paper's betas and weight decay, and a linear learning-rate warm-up, then constant."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s, w=LR_WARMUP: min(1.0, (s + 1) / w))
    return optimizer, scheduler


def training_step(step: int, examples: list[dict], m: Models, optimizer, scheduler, args: Args) -> dict:
    """Step k (1-based): G answers to each example from the current weights, graded, an update -> the metrics row."""
    t0 = time.time()
    refresh_sampler(m.sampler, m.policy)  # on-policy: the answers come from the weights being trained
    rb = collect_rollouts(m, examples, args)
    beta_k = beta_schedule(step, args.steps, args.beta, args.beta_warmup, args.beta_decay)
    sums = policy_update(m, optimizer, scheduler, rb, beta_k, args)
    return {"step": step, "reward_mean": rb.rewards.mean().item(), **sums, "beta": beta_k,
            "gate_frac": (rb.advantages > 0).float().mean().item(),  # A > 0; with --no-gate all are distilled
            "response_len": rb.response_mask.sum(1).float().mean().item(),
            "lr": scheduler.get_last_lr()[0], "time_s": time.time() - t0}


# =============================================================================
# 4. Above is the method; below, what serves it: settings, models, data, prompts, evaluation, checkpoints, main.

# -----------------------------------------------------------------------------
# Settings. Each field of Args is a command-line flag (--batch-prompts for batch_prompts) with its help text;
# parse_args fills an [auto] default from PRESETS (the tiny demo model, or a pretrained one) and --steps.

INSTRUCTION = "Reason step by step, then put the final answer in \\boxed{}."  # the verifier reads \boxed{} first

# A pretrained LLM needs a small learning rate and long answers; the tiny model learns from scratch in 2 tokens.
PRESETS = {
    "pretrained": dict(dataset="gsm8k", steps=200, batch_prompts=16, max_new_tokens=512, lr=1e-6, alpha=1e-3,
                       micro_batch=8, eval_every=50, eval_n=200, save_every=100, instruction=INSTRUCTION),
    "tiny": dict(dataset="toy", steps=200, batch_prompts=16, max_new_tokens=2, lr=3e-3, alpha=0.05,
                 micro_batch=128, eval_every=50, eval_n=100, save_every=0, instruction=""),
}


def _arg(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Args:
    model: str = _arg("Qwen2.5-0.5B", "Hub id, local directory, 'Qwen...'/'SmolLM...' short name, or 'tiny' (offline)")
    dataset: str | None = _arg(None, "'gsm8k', 'toy' (a 2-digit number's second digit) or a .jsonl/.json/.parquet file "
                               "of question, answer, solution rows, the last --eval-n held out [auto: toy for tiny]")
    instruction: str | None = _arg(None, f"text after every question [auto: none for tiny, else '{INSTRUCTION}']")
    steps: int | None = _arg(None, "training steps, each on fresh rollouts [auto: 200] (paper: 400)")
    batch_prompts: int | None = _arg(None, "questions per step [auto: 16] (paper: 128)")
    group_size: int = _arg(8, "G, answers sampled per question (paper: 8)")
    max_new_tokens: int | None = _arg(None, "longest answer in tokens [auto: 512; tiny 2] (paper: 4096)")
    temperature: float = _arg(1.0, "sampling temperature, also of every log-prob and KL, and of mean@K (paper: 1.0)")
    lr: float | None = _arg(None, "AdamW learning rate after 10 warm-up steps [auto: 1e-6; tiny 3e-3] (paper: 1e-6)")
    micro_batch: int | None = _arg(None, "answers per forward/backward (memory, not the result) [auto: 8; tiny 128]")
    chunk_size: int = _arg(256, "response tokens per chunk of the exact KL, whose memory grows with chunk x vocabulary")
    gradient_checkpointing: bool = _arg(False, "recompute the layers in the backward pass: less memory, more time")
    beta: float = _arg(1e-3, "beta_base, weight of the distillation KL; 0 is the GRPO-style baseline (paper: 1e-3)")
    gate: bool = _arg(True, "distil only answers with A > 0 (Eq. 3.5); --no-gate: all (released: off)")
    beta_warmup: int | None = _arg(None, "T_warm, steps of beta's linear warm-up [auto: steps/8] (paper: 50 of 400)")
    beta_decay: int | None = _arg(None, "T_decay, last steps of beta's linear decay [auto: 7*steps/8] (paper: 350)")
    teacher: str = _arg("policy", "who reads the privileged prompt: 'policy' (SDPG) or 'reference' (the frozen "
                        "initial model)", choices=("policy", "reference"))
    alpha: float | None = _arg(None, "weight of the KL anchor to the initial model [auto: 1e-3; tiny 0.05]")
    kl_mode: str = _arg("urkl", "the anchor's surrogate (Appendix A.2): urkl (released), ufkl (best in the paper)",
                        choices=("urkl", "ufkl", "fkl", "rkl"))
    updates_per_batch: int = _arg(1, "optimiser steps per batch of rollouts, clipped (Appendix A.3) (released: 8)")
    clip_high: float = _arg(0.28, "PPO's upper clip, when --updates-per-batch > 1 (released; paper's baselines 0.2)")
    loss_agg: str = _arg("group", "'group' (Eq. 3.4) or 'token-mean' over the update (released)",
                         choices=("group", "token-mean"))
    wrong_reward: float = _arg(0.0, "reward of a wrong answer, a right one gets 1 (released: -1)")
    overlong_buffer: int = _arg(0, "DAPO's length penalty on the last N tokens of --max-new-tokens (released: 512)")
    seed: int = _arg(0, "seed for data order, sampling and the tiny model's weights")
    output_dir: str = _arg("runs/sdpg", "config.json, metrics.jsonl, checkpoints; rerun, a command continues its run")
    eval_every: int | None = _arg(None, "greedy accuracy on held-out questions every N steps; 0: the ends [auto: 50]")
    eval_n: int | None = _arg(None, "held-out questions [auto: 200; tiny 100]")
    eval_samples: int = _arg(0, "K > 0 also logs mean@K, the accuracy of K sampled answers per question (paper: 32)")
    save_every: int | None = _arg(None, "a checkpoint every N steps, 0 = at the end and on Ctrl-C [auto: 100; tiny 0]")


def parse_args(argv: list[str] | None = None) -> Args:
    """Command line -> Args, the [auto] defaults filled in; one line for what cannot work."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="examples:\n" + __doc__.split(
        "Run it:\n")[1].split("\n\n")[0] + "\n", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = lambda message: parser.exit(2, f"error: {message} (python sdpg.py --help lists every flag)\n")
    types = get_type_hints(Args)  # the fields' types as classes (annotations are strings in this file)
    for f in dataclasses.fields(Args):
        ftype = next(t for t in getattr(types[f.name], "__args__", (types[f.name],)) if t is not type(None))
        kind = dict(action=argparse.BooleanOptionalAction) if ftype is bool else dict(type=ftype)
        parser.add_argument("--" + f.name.replace("_", "-"), default=f.default, choices=f.metadata.get("choices"),
                            help=f.metadata["help"] + ("" if f.default is None else f" (default: {f.default})"), **kind)
    args = Args(**vars(parser.parse_args(argv)))
    tiny = args.model == "tiny" or is_char_tokenizer(args.model)  # a tiny model saved by sdpg.py is tiny too
    for name, value in PRESETS["tiny" if tiny else "pretrained"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.beta_warmup = round(args.steps / 8) if args.beta_warmup is None else args.beta_warmup
    args.beta_decay = round(args.steps * 7 / 8) if args.beta_decay is None else args.beta_decay
    for name in ("steps", "batch_prompts", "max_new_tokens", "lr", "micro_batch", "chunk_size", "updates_per_batch",
                 "eval_n", "temperature"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for bad, message in ((min(args.eval_samples, args.beta, args.alpha) < 0, "--eval-samples, --beta, --alpha: >= 0"),
                         (args.group_size < 2, "--group-size must be >= 2: one answer per question has no group std"),
                         (not 0 <= args.overlong_buffer <= args.max_new_tokens, "--overlong-buffer: 0 to "
                          "--max-new-tokens"),
                         (args.batch_prompts % args.updates_per_batch, "--batch-prompts must be a multiple of "
                          "--updates-per-batch: an update takes whole groups")):
        if bad:
            raise SystemExit(f"error: {message}")
    return args


# -----------------------------------------------------------------------------
# Precision. On CUDA the matmuls run in bf16 under autocast and the weights stay float32 (AdamW's 1e-6 steps would
# round away in bf16); the sampler and the reference are bf16 copies.


def autocast(device: torch.device):
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


# -----------------------------------------------------------------------------
# Models. The policy and the teacher are ONE model read through two prompts; the reference is a frozen copy.


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


CHAR_TOKENIZER_MARK = "sdpg_char_tokenizer"  # in tokenizer_config.json: AutoTokenizer would load a Qwen2Tokenizer


def build_char_tokenizer():
    """A character-level tokenizer built in code: digits, lower-case letters, some punctuation, lower-cased text. A
    small alphabet on purpose: a model trained from scratch starts uniform over it and is right often enough."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    chars = ["<pad>", "<eos>", "<unk>", *string.digits, *string.ascii_lowercase, *" \n.,:;?!'()+-*/=$%#"]
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[], unk_token="<unk>"))  # no merges:
    tok.normalizer, tok.decoder = normalizers.Lowercase(), decoders.Fuse()  # one token per character, joined back
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tokenizer.init_kwargs[CHAR_TOKENIZER_MARK] = True
    return tokenizer


def is_char_tokenizer(directory: str) -> bool:
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


OFFLINE = "(no network? the offline demo needs none: python sdpg.py --model tiny --dataset toy)"


def load_model(name: str, seed: int):
    """Returns (model in float32, tokenizer); one clear line when the model is not there."""
    if name == "tiny":
        tokenizer = build_char_tokenizer()
        return build_tiny_model(tokenizer, seed), tokenizer
    from huggingface_hub.utils import logging as hub_logging
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    hub_logging.set_verbosity_error()  # no retry warnings: a failed download is reported in one line
    if name.startswith((".", "/", "~")) and not os.path.isdir(name):
        raise SystemExit(f"error: no such model directory: {name}")
    orgs = {"Qwen": "Qwen", "SmolLM": "HuggingFaceTB"}  # 'Qwen2.5-0.5B' -> 'Qwen/Qwen2.5-0.5B'
    repo = name if os.path.isdir(name) or "/" in name else next(
        (f"{org}/{name}" for prefix, org in orgs.items() if name.startswith(prefix)), name)
    try:
        tokenizer = (PreTrainedTokenizerFast if is_char_tokenizer(repo) else AutoTokenizer).from_pretrained(repo)
        model = AutoModelForCausalLM.from_pretrained(repo, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: could not load model '{repo}': {first_line(e)} {OFFLINE}")
    if tokenizer.pad_token_id is None:  # many base models have none; any id works, it is always masked
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def stop_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """Every id that ends an answer: both EOS ids and chat templates' end of turn (a base model's <|im_end|>)."""
    ids = {tokenizer.eos_token_id}
    gen_eos = model.generation_config.eos_token_id
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    for marker in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(ids - {None})


def frozen_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A frozen copy with its parameters in `dtype`. Only the parameters: RoPE's inverse frequencies (a buffer) in
    bf16 would put position 1,000 off by most of a radian, and the copy would be another model."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():  # tied weights are one Parameter, cast once
        p.data = p.data.to(dtype)
    return ref.requires_grad_(False)


def build_models(args: Args, device: torch.device) -> Models:
    """The policy (float32), the reference (if the anchor or the teacher needs it), teacher, sampler, tokenizer."""
    from transformers import GenerationConfig

    model, tokenizer = load_model(args.model, args.seed)
    if tokenizer.eos_token_id is None:
        raise SystemExit(f"error: the tokenizer of {args.model} has no EOS token, so answers could never end")
    stop_ids = stop_token_ids(model, tokenizer)
    # Saved beside every checkpoint (never read by sampling): a plain one with our stop ids, as training had them.
    model.generation_config = GenerationConfig(eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    needs_ref = args.alpha > 0 or args.teacher == "reference"  # copied on the CPU: one float32 model on the device
    ref = frozen_copy(model, torch.bfloat16 if bf16 else torch.float32).to(device) if needs_ref else None
    sampler = make_sampler(model, bf16).to(device)
    model.to(device)
    if args.gradient_checkpointing:  # transformers 5.2x renamed gradient_ to activation_checkpointing
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    return Models(model, ref, model if args.teacher == "policy" else ref, sampler, tokenizer, stop_ids)


# -----------------------------------------------------------------------------
# Data. An example is {question, answer, solution}: the answer is the verifier's gold; answer and solution are c.


def toy_examples(n: int, seed: int) -> list[dict]:
    """A copy-like task that a 2-layer model learns from scratch in a minute: the second digit of a 2-digit number."""
    rng = random.Random(seed)
    return [{"question": q, "answer": q[1], "solution": ""} for q in (f"{rng.randrange(100):02d}" for _ in range(n))]


def load_examples(dataset: str, eval_n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out): GSM8K's train split and the first eval_n of its test split, a file's rows but its last eval_n
    and those, or the toy task. GSM8K's "<solution> #### 72" gives 72 and the solution without <<48/2=24>> notes."""
    if dataset == "toy":
        return toy_examples(5000, seed), toy_examples(eval_n, seed + 1)
    if dataset != "gsm8k" and not (os.path.isfile(dataset) and dataset.endswith((".jsonl", ".json", ".parquet"))):
        raise SystemExit(f"error: no such dataset: {dataset} (gsm8k, toy or a .jsonl/.json/.parquet file)")
    import datasets

    try:
        if dataset == "gsm8k":
            splits = datasets.load_dataset("openai/gsm8k", "main")
            train_rows, eval_rows = list(splits["train"]), list(splits["test"])[:eval_n]
        else:
            rows = list(datasets.load_dataset("parquet" if dataset.endswith(".parquet") else "json",
                                              data_files=dataset, split="train"))
            train_rows, eval_rows = rows[:-eval_n], rows[-eval_n:]
    except Exception as e:  # datasets raises many types for a missing network or a bad file
        raise SystemExit(f"error: could not load {dataset}: {first_line(e)} {OFFLINE}")
    if not train_rows:
        raise SystemExit(f"error: {dataset} has {len(eval_rows)} rows, and its last --eval-n {eval_n} are held out")
    examples = []
    for i, row in enumerate(train_rows + eval_rows):
        if not isinstance(row.get("question"), str) or row.get("answer") in (None, ""):
            raise SystemExit(f"error: {dataset} row {i} needs a 'question' and an 'answer' (its fields: "
                             f"{', '.join(row)}); data/prepare.py converts other layouts")
        gold = str(row["answer"])
        answer, solution = (gsm8k_gold(gold), re.sub(r"<<[^>]*>>", "", gold.rsplit("####", 1)[0]).strip()) \
            if "####" in gold else (gold, "")
        examples.append({"question": row["question"], "answer": answer, "solution": row.get("solution") or solution})
    return examples[:len(train_rows)], examples[len(train_rows):]


def next_batch(queue: list[int], order: random.Random, n_train: int, k: int) -> tuple[list[int], list[int]]:
    """The next k training indices and the queue left after them; a new epoch reshuffles all n_train."""
    while len(queue) < k:
        queue = queue + order.sample(range(n_train), n_train)
    return queue[:k], queue[k:]


# -----------------------------------------------------------------------------
# Prompts. A template is text with {slots}: the student's the question and the instruction, the teacher's also the
# privileged context c. Both go through the tokenizer's chat template when it has one.


STUDENT_TEMPLATE = "{question}\n{instruction}"

# The paper's teacher prompt (its Fig. 4) is the student prompt followed by the answer, a worked solution, and
# a request to reach that answer by another, equally rigorous route (or, if there is none, to set out the usual
# one very clearly) without saying that the answer was given. The words below are ours. The wording shapes q_t
# and so the size of the KL: it is part of the method. Edit it here to try another.
TEACHER_TEMPLATE = ("{question}\n{instruction}\n\n"
                    "Final answer: {answer}\n"
                    "Worked solution: {solution}\n"
                    "Reach {answer} by another route just as rigorous, if there is one; else explain the usual "
                    "route very clearly. Never mention knowing the answer.")

# The tiny model takes a short teacher prompt in its own alphabet: a line stating the answer.
TOY_TEACHER_TEMPLATE = "{question}\n{instruction}\nanswer: {answer}\nsolution: {solution}"
DEFAULT_TEMPLATES, TOY_TEMPLATES = (STUDENT_TEMPLATE, TEACHER_TEMPLATE), (STUDENT_TEMPLATE, TOY_TEACHER_TEMPLATE)

# A slot is {name} after anything but a letter, digit, '_', '}', '^' or '\', so that the LaTeX in a
# template (\boxed{x}, \frac{a}{b}, x^{n}) stays as it is.
SLOT = re.compile(r"(?<![\w}^\\])\{([A-Za-z_]\w*)\}")


def fill_template(template: str, values: dict[str, str]) -> str:
    r"""Puts each value into its {slot}. A line with an empty slot (no instruction, no worked solution) is
    left out, so that no label stands alone.
    >>> fill_template("{question}\n{instruction}\nAnswer in $\\boxed{x}$.", {"question": "2+2?", "instruction": ""})
    '2+2?\nAnswer in $\\boxed{x}$.'
    """
    lines = [line for line in template.split("\n") if all(values[name].strip() for name in SLOT.findall(line))]
    return SLOT.sub(lambda m: values[m.group(1)], "\n".join(lines)).strip()


def prompt_texts(example: dict, instruction: str, templates: tuple[str, str] = DEFAULT_TEMPLATES) -> tuple[str, str]:
    """Returns the (student, teacher) user messages for one example."""
    values = {"question": example["question"], "instruction": instruction, "answer": example["answer"],
              "solution": example["solution"]}
    return fill_template(templates[0], values), fill_template(templates[1], values)


def templates_for(tokenizer) -> tuple[str, str]:  # the tiny model's short ones for its character tokenizer
    return TOY_TEMPLATES if tokenizer.init_kwargs.get(CHAR_TOKENIZER_MARK) else DEFAULT_TEMPLATES


def encode_prompt(tokenizer, user_text: str) -> list[int]:
    """One user turn -> token ids ending where the model's answer starts."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = f"Q: {user_text}\nA: "
    return tokenizer(text, add_special_tokens=False).input_ids


def left_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Token lists -> (ids, attention mask), both (N, P), padded on the LEFT so that every sequence ends at
    column P-1 and generation appends at the same column for all of them."""
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), P), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, P - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, P - len(s):] = 1
    return ids.to(device), mask.to(device)


# -----------------------------------------------------------------------------
# Evaluation on held-out questions: greedy pass@1, the teacher's view, and the paper's mean@K.


def evaluate(model: nn.Module, tokenizer, stop_ids: list[int], examples: list[dict], args: Args,
             teacher_view: bool = False, samples: int = 1, temperature: float = 0.0) -> list[float]:
    """Per question, the fraction of its `samples` answers at `temperature` that the verifier accepts (one greedy
    answer by default: 1.0 or 0.0). teacher_view answers the teacher's prompt, the privileged context in it."""
    texts = [prompt_texts(ex, args.instruction, templates_for(tokenizer))[int(teacher_view)] for ex in examples]
    rows = [(text, ex["answer"]) for ex, text in zip(examples, texts) for _ in range(samples)]  # K copies each
    batch, correct = args.batch_prompts * args.group_size, []
    for i in range(0, len(rows), batch):
        texts, golds = zip(*rows[i:i + batch])
        correct += answer_and_grade(model, tokenizer, stop_ids, texts, golds, args.max_new_tokens,
                                    temperature)[-1].tolist()
    return [sum(correct[q * samples:(q + 1) * samples]) / samples for q in range(len(examples))]


def evaluation_metrics(m: Models, held_out: list[dict], args: Args) -> dict:
    """eval_accuracy (greedy pass@1); eval_teacher_accuracy (--beta > 0: the teacher on its prompt); eval_mean_at_k."""
    def mean(model, teacher_view=False, samples=1, temperature=0.0) -> float:
        right = evaluate(model, m.tokenizer, m.stop_ids, held_out, args, teacher_view, samples, temperature)
        return sum(right) / len(right)

    row = {"eval_accuracy": mean(m.sampler)}
    if args.beta > 0:  # the policy's teacher view is read from the sampler, its copy for generation
        row["eval_teacher_accuracy"] = mean(m.sampler if args.teacher == "policy" else m.teacher, True)
    if args.eval_samples:  # the same seed at every evaluation, in a forked RNG: the training run is not changed
        with torch.random.fork_rng(devices=[m.sampler.device] if m.sampler.device.type == "cuda" else []):
            torch.manual_seed(args.seed)
            row["eval_mean_at_k"] = mean(m.sampler, False, args.eval_samples, args.temperature)
    return row


# -----------------------------------------------------------------------------
# Checkpoints: a save_pretrained directory and trainer_state.pt (optimiser, schedule, step, RNG states, data
# position), written to a temporary directory and renamed when complete: a crash never leaves a half one.


def save_checkpoint(model, tokenizer, path: str, state: dict | None = None) -> None:
    """Writes model and tokenizer (save_pretrained) and the trainer state to path, atomically."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if state is not None:
        torch.save(state, os.path.join(tmp, "trainer_state.pt"))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)  # atomic on one filesystem


def checkpoints(output_dir: str) -> list[str]:  # complete checkpoint-STEP directories, oldest first (not *.tmp)
    names = [n for n in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+", n)]
    return [os.path.join(output_dir, n) for n in sorted(names, key=lambda n: int(n.split("-")[1]))]


def prepare_output_dir(args: Args) -> str | None:
    """A new --output-dir starts a run; the same command run again (--steps may differ) continues it from its newest
    checkpoint (or its start) -> that checkpoint. A finished run, or one with other settings, is refused."""
    config = os.path.join(args.output_dir, "config.json")
    if not os.path.isfile(config):
        os.makedirs(args.output_dir, exist_ok=True)
        return None
    if os.path.isdir(os.path.join(args.output_dir, "final")):
        raise SystemExit(f"error: {args.output_dir} holds a finished run; choose another --output-dir")
    saved = json.load(open(config))
    differ = [k for k, v in dataclasses.asdict(args).items() if saved.get(k) != v and k != "steps"]  # may grow
    if differ:
        raise SystemExit(f"error: {args.output_dir} holds a run with other settings (--{differ[0].replace('_', '-')} "
                         f"{saved.get(differ[0])!r}); give its flags to continue it, or another --output-dir")
    found = checkpoints(args.output_dir) or [None]
    print(f"continuing the run in {args.output_dir} from {found[-1] or 'its start'}")
    return found[-1]


def restore_checkpoint(path: str, model, optimizer, scheduler, order: random.Random) -> dict:
    """Loads a checkpoint into the policy (not the reference: it stays the initial weights) and the trainer, RNG
    states included, so that the run goes on as if it had never stopped; returns its trainer state."""
    from transformers import AutoModelForCausalLM

    state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    # Through from_pretrained, not the safetensors file: save_pretrained writes the Hub's layout (no tied output
    # layer; in transformers 5, an MoE model's fused experts split per expert), which from_pretrained undoes.
    model.load_state_dict(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict())
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    order.setstate(state["order"])
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state


def save_training_checkpoint(args: Args, m: Models, optimizer, scheduler, trainer_state: dict) -> str:
    """checkpoint-STEP/ with everything a continued run needs; only the newest two are kept."""
    path = os.path.join(args.output_dir, f"checkpoint-{trainer_state['step']}")
    rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    save_checkpoint(m.policy, m.tokenizer, path, {**trainer_state, "optimizer": optimizer.state_dict(),
                                                  "scheduler": scheduler.state_dict(), "rng": rng})
    for old in checkpoints(args.output_dir)[:-2]:
        shutil.rmtree(old)
    return path


# -----------------------------------------------------------------------------
# main: the checks made before training, the metrics file, interrupts, and the loop.


def check_model_and_prompts(m: Models, examples: list[dict], args: Args) -> None:
    """One line for a model whose logits are not lm_head(final state) (Gemma-2's soft-capping, Cohere's scale: scoring
    would use another distribution than sampling), or a prompt that with an answer exceeds the model's context."""
    ids = torch.tensor([m.tokenizer("1 + 1 =").input_ids], device=m.policy.device)
    with torch.no_grad():
        full = m.policy(input_ids=ids).logits[0, -1].float()
        ours = m.policy.get_output_embeddings()(m.policy.base_model(input_ids=ids).last_hidden_state[0, -1]).float()
    if not torch.allclose(full, ours, rtol=1e-3, atol=1e-3):
        raise SystemExit("error: this model transforms its logits after the output layer (soft-capping or "
                         "scaling), which sdpg.py's scoring does not reproduce; use a Qwen, Llama or SmolLM model")
    limit = getattr(m.policy.config, "max_position_embeddings", None)
    for i, ex in enumerate(examples if limit else []):
        n = len(encode_prompt(m.tokenizer, prompt_texts(ex, args.instruction, templates_for(m.tokenizer))[
            1 if args.beta > 0 else 0]))
        if n + args.max_new_tokens > limit:
            raise SystemExit(f"error: example {i}'s prompt has {n} tokens; with --max-new-tokens "
                             f"{args.max_new_tokens} that exceeds the model's context of {limit}")


def open_metrics(path: str, first_step: int):
    """metrics.jsonl to append to, less rows of steps >= first_step (a continued run redoes them) and a cut last row."""
    lines = open(path).readlines() if os.path.exists(path) else []
    rows = [json.loads(line) for line in lines if line.endswith("\n")]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows if r["step"] < first_step)
    return open(path, "a")


@contextlib.contextmanager
def catch_interrupts():
    """Ctrl-C or SIGTERM lands in the list yielded: the loop finishes its step and saves. A second Ctrl-C quits."""
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


def main(argv: list[str] | None = None) -> None:
    from tqdm import tqdm

    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    random.seed(args.seed)  # not bit-for-bit reproducible on a GPU, where some kernels are non-deterministic
    torch.manual_seed(args.seed)
    resume_from = prepare_output_dir(args)
    m = build_models(args, device)
    train, held_out = load_examples(args.dataset, args.eval_n, args.seed)
    check_model_and_prompts(m, train + held_out, args)
    optimizer, scheduler = build_optimizer(m.policy, args)
    order = random.Random(args.seed)  # data order: a reshuffle of the training set per epoch
    queue, start, bad_in_a_row = [], 1, 0  # indices still to come in this epoch, the first step, NaN steps in a row
    if resume_from:
        state = restore_checkpoint(resume_from, m.policy, optimizer, scheduler, order)
        queue, start, bad_in_a_row = state["queue"], state["step"] + 1, state["bad_in_a_row"]
    with open(os.path.join(args.output_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(args), f, indent=2)
    print(f"model {args.model} ({sum(p.numel() for p in m.policy.parameters()) / 1e6:.1f}M parameters) | dataset "
          f"{args.dataset} ({len(train)} train, {len(held_out)} held out) | device {device} | output {args.output_dir}")
    with open_metrics(os.path.join(args.output_dir, "metrics.jsonl"), start if resume_from else 0) as metrics, \
            catch_interrupts() as stop:
        def log(row: dict) -> None:  # one line per step, '-' for a metric that is off; flushed: a kill loses one row
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            tqdm.write(" | ".join(f"{k} {'-' if v is None else format(v, '.4g')}" for k, v in row.items()))

        if start == 1:
            log({"step": 0, **evaluation_metrics(m, held_out, args)})
        for step in tqdm(range(start, args.steps + 1), desc="sdpg", initial=start - 1, total=args.steps):
            batch, queue = next_batch(queue, order, len(train), args.batch_prompts)
            row = training_step(step, [train[i] for i in batch], m, optimizer, scheduler, args)
            if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
                refresh_sampler(m.sampler, m.policy)  # evaluate the weights after this step's update
                row.update(evaluation_metrics(m, held_out, args))
            log(row)
            bad_in_a_row = bad_in_a_row + 1 if row["skipped_updates"] else 0
            if bad_in_a_row >= 3:
                raise SystemExit("error: the loss or gradient was NaN/inf in 3 steps in a row (those updates were "
                                 "skipped; the weights are intact). Try a lower --lr.")
            trainer_state = {"step": step, "order": order.getstate(), "queue": queue, "bad_in_a_row": bad_in_a_row}
            if stop or (args.save_every and step % args.save_every == 0 and step != args.steps):
                path = save_training_checkpoint(args, m, optimizer, scheduler, trainer_state)
            if stop:
                print(f"saved {path}. To continue: python sdpg.py <the same flags>")
                return
    save_checkpoint(m.policy, m.tokenizer, os.path.join(args.output_dir, "final"))
    print(f"done: final model in {os.path.join(args.output_dir, 'final')}")


# -----------------------------------------------------------------------------
# 5. Sampling. The method needs only generate()'s contract: answers drawn from softmax(logits / temperature), as
# token ids, each ending at its first stop token. A first read may stop here.
#
# Decoding is nearly all of a step's time: 512 new tokens are 512 forward passes one after the other. transformers'
# generate() runs each as about a thousand kernel launches and then asks the host whether every row has stopped,
# so on a GPU the host sets its pace. The loop below keeps all a step touches in tensors of a fixed shape (a KV
# cache with a column per position, the ids, positions and stop flags): every step runs the same kernels on the
# same memory, which CUDA records once as a graph and replays with one launch per token. It calls the model's
# own embeddings, norms, projections and MLPs; only attention over the cache is written here.


@torch.no_grad()
def generate(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, max_new_tokens: int,
             temperature: float, top_p: float, stop_ids: list[int], pad_id: int) -> tuple[Tensor, Tensor]:
    """One answer per row, all rows in ONE decoding loop (temperature 0: greedy): left-padded prompt ids and mask
    (N, P) -> response ids and mask (N, L), L the longest answer (<= max_new_tokens), pad_id after a stop token."""
    # Nucleus sampling needs a sort of the vocabulary at every token (and is only roughly on-policy anyway);
    # models with other layer types need transformers' own code.
    unsupported = "top_p below 1" if top_p < 1 else fast_decoding_unsupported(model)
    if unsupported:
        warnings.warn(f"sampling with transformers' generate() (slower): {unsupported}")  # shown once
        return hf_generate(model, prompt_ids, prompt_mask, max_new_tokens, temperature, top_p, stop_ids, pad_id)
    N, P = prompt_ids.shape
    # No autocast: the loop computes in the sampler's own dtype (bf16 on CUDA); re-casting float32 weights at
    # every token would cost bandwidth, and autocast's cache does not mix with CUDA graphs.
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
    """(N, L) sampled ids -> (N, L) mask: 1 up to AND including the first stop token, 0 after. From the stop
    tokens, never from pad_token_id: pad often equals EOS, and a masked EOS would never teach the model to stop.
    >>> response_mask_from_stops(torch.tensor([[5, 2, 9, 2], [7, 7, 7, 7]]), stop_ids=[2])
    tensor([[1, 1, 0, 0],
            [1, 1, 1, 1]])
    """
    is_stop = torch.isin(response_ids, torch.tensor(stop_ids, device=response_ids.device)).long()  # (N, L)
    stops_before = is_stop.cumsum(dim=1) - is_stop  # (N, L) stop tokens strictly before t
    return (stops_before == 0).long()


def decode_responses(tokenizer, response_ids: Tensor, response_mask: Tensor) -> list[str]:
    """(N, L) ids and mask -> N strings, each from its own tokens only (`ids * mask` would decode Qwen's token 0,
    "!", turning "#### 18" into "#### 18!!!!" and reward 0)."""
    return [tokenizer.decode(ids[m.bool()].tolist(), skip_special_tokens=True)
            for ids, m in zip(response_ids, response_mask)]


@torch.no_grad()
def hf_generate(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, max_new_tokens: int,
                temperature: float, top_p: float, stop_ids: list[int], pad_id: int) -> tuple[Tensor, Tensor]:
    """generate() by transformers' model.generate (every model, top-p; host-bound speed), from softmax(logits / T)
    and its top-p nucleus only: nothing from the model's generation_config (a repetition penalty, top_k, min_p...)."""
    from transformers import GenerationConfig

    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else \
        dict(do_sample=False)  # top_k=0: transformers would otherwise keep only the 50 likeliest tokens
    # transformers 5 fills what a passed config leaves unset from model.generation_config, so for this call that is
    # the plain one too (put back after). use_cache: with gradient checkpointing some versions drop the cache.
    kept, model.generation_config = model.generation_config, GenerationConfig(
        max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id, use_cache=True, **sampling)
    try:
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask)  # (N, P + L)
    finally:
        model.generation_config = kept
    response_ids = out[:, prompt_ids.shape[1]:]  # (N, L)
    return response_ids, response_mask_from_stops(response_ids, stop_ids)


# Decoding reads every weight per token: 4 bytes per parameter in float32, 2 in bf16. So on CUDA the answers come
# from a bf16 copy of the policy, refreshed in place before each rollout (the CUDA graph reads those weights): the
# rollouts are on-policy up to bf16 rounding, like any RL system's with a separate inference engine.
def make_sampler(model: nn.Module, bf16: bool) -> nn.Module:
    """The model that generates: a frozen bf16 copy when computing in bf16, else the model itself."""
    return frozen_copy(model, torch.bfloat16) if bf16 else model


@torch.no_grad()
def refresh_sampler(sampler: nn.Module, model: nn.Module) -> None:
    """Copies the current policy weights into the sampler (a no-op when they are one model)."""
    if sampler is not model:
        for dst, src in zip(sampler.parameters(), model.parameters()):
            dst.copy_(src)


def fast_decoding_unsupported(model: nn.Module) -> str | None:
    """Why the decoding loop cannot serve this model (it knows decoder layers made of Llama's parts), or None."""
    config = model.config
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if config.model_type not in ("llama", "mistral", "qwen2", "qwen3"):
        return f"model type '{config.model_type}' (the loop serves llama, mistral, qwen2 and qwen3)"
    if (getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)) or any(
            t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return "sliding-window attention"
    dynamic = isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) in ("dynamic", "longrope")
    return "a RoPE rescaled from the length" if dynamic else None


@dataclass
class DecodeState:
    """Every tensor a decoding step reads or writes, for one batch shape, updated in place (a graph's memory)."""
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


# One DecodeState per model, batch size and stop ids, kept beside the model (weakly: it goes with the model), so a
# run allocates its cache and records its graph once; training and evaluation share it, a graph each.
_DECODE_STATES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def decode_state_for(model: nn.Module, n: int, columns: int, temperature: float, stop_ids: list[int],
                     pad_id: int) -> DecodeState:
    """The state for n rows and `columns` positions (a new one if too few), with, on CUDA, a graph of decode_step."""
    states = _DECODE_STATES.setdefault(model, {})
    key = (n, tuple(stop_ids), pad_id)
    if key not in states or states[key].ids.shape[1] < columns:
        states.pop(key, None)  # free the old cache first
        C = 64 * math.ceil(columns / 64)  # rounded up: slightly longer prompts still fit, with no new graph
        p, config, head_dim = next(model.parameters()), model.config, model.base_model.layers[0].self_attn.head_dim
        cache = (config.num_hidden_layers, n, config.num_key_value_heads, C, head_dim)

        def zeros(*shape, dtype=torch.long):
            return torch.zeros(shape, dtype=dtype, device=p.device)
        states[key] = DecodeState(zeros(*cache, dtype=p.dtype), zeros(*cache, dtype=p.dtype), zeros(n, C),
                                  zeros(n, C, dtype=torch.bool), zeros(n), zeros(1), zeros(n, dtype=torch.bool),
                                  torch.tensor(stop_ids, device=p.device), pad_id)
    state = states[key]
    if state.keys.is_cuda and temperature not in state.graphs:
        try:
            state.graphs[temperature] = capture_decode_step(model, state, temperature)
        except RuntimeError as e:  # a model whose layers sync with the host cannot be recorded
            warnings.warn(f"decoding without a CUDA graph (slower): recording the step failed: {first_line(e)}")
            state.graphs[temperature] = None
    return state


# Grouped-query attention: Qwen2.5-0.5B's 14 query heads share 2 key/value heads. Each key/value head is read
# once for its group (rows of one matmul), not copied per query head as transformers' sdpa does with a mask.
def grouped_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float) -> Tensor:
    """q (N, H_q, T, D); k, v (N, H_kv, S, D); allowed (N, 1, T, S) -> (N, H_q, T, D); query head h uses h // group."""
    N, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    q = q.reshape(N, Hkv, Hq // Hkv * T, D)  # (N, H_kv, group x T, D)
    scores = (q @ k.transpose(2, 3)).view(N, Hq, T, S) * scale  # (N, H_q, T, S)
    probs = scores.masked_fill(~allowed, float("-inf")).float().softmax(dim=-1).to(v.dtype)  # (N, H_q, T, S)
    return (probs.view(N, Hkv, Hq // Hkv * T, S) @ v).view(N, Hq, T, D)


def cached_attention(attn: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, keys: Tensor, values: Tensor,
                     columns: Tensor, allowed: Tensor) -> Tensor:
    """One attention block for new tokens x (N, T, H) in cache `columns` (T,): writes their keys and values into
    keys, values (N, H_kv, C, D), attends over the first S columns as allowed (N, T, S) says -> (N, T, H)."""
    N, T, _ = x.shape
    D = attn.head_dim
    q = attn.q_proj(x).view(N, T, -1, D)  # (N, T, H_q, D)
    k = attn.k_proj(x).view(N, T, -1, D)  # (N, T, H_kv, D)
    v = attn.v_proj(x).view(N, T, -1, D).transpose(1, 2)  # (N, H_kv, T, D)
    if hasattr(attn, "q_norm"):  # Qwen3 normalises every query and key head before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)

    def rotate(x: Tensor) -> Tensor:  # RoPE in the half-split layout of Hugging Face checkpoints, cos, sin (N, T, D)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]
    q, k = rotate(q.transpose(1, 2)), rotate(k.transpose(1, 2))  # (N, H_q or H_kv, T, D)
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
    """The model's transformer on new tokens ids, positions (N, T) in cache `columns` (T,) -> final states (N, T, H)."""
    base = model.base_model
    x = model.get_input_embeddings()(ids)  # (N, T, H)
    cos, sin = base.rotary_emb(x, positions)  # (N, T, D) each
    for i, layer in enumerate(base.layers):
        x = x + cached_attention(layer.self_attn, layer.input_layernorm(x), cos, sin, state.keys[i],
                                 state.values[i], columns, allowed)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return base.norm(x)


# Sampling inside the step, with no host sync (the Gumbel-max trick): with u ~ U(0, 1) drawn independently for
# every vocabulary entry, argmax(logits / T - log(-log u)) is an exact draw from softmax(logits / T).
def sample_next(logits: Tensor, temperature: float) -> Tensor:
    """(N, V) logits -> (N,) token ids; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    u = torch.rand(logits.shape, device=logits.device).clamp_(min=torch.finfo(torch.float32).tiny)  # (N, V)
    return (logits.float() / temperature - torch.log(-torch.log(u))).argmax(dim=-1)


def prefill(model: nn.Module, state: DecodeState, prompt_ids: Tensor, prompt_mask: Tensor, temperature: float) -> None:
    """The left-padded prompts (N, P) into cache columns [0, P); each row's first answer token into column P."""
    P = prompt_ids.shape[1]
    real = prompt_mask.bool()  # (N, P)
    state.ids[:, :P] = prompt_ids
    state.visible.zero_()
    state.visible[:, :P] = real
    positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)  # (N, P), as in response_hidden_states
    causal = torch.ones(P, P, dtype=torch.bool, device=real.device).tril()  # (P, P)
    # A token attends to the real tokens up to itself; a padding position to itself alone: some kernels return
    # NaN for a row with nothing allowed, and NaN in the cache poisons every later step (0 x NaN is NaN).
    allowed = causal & real[:, None, :] | torch.eye(P, dtype=torch.bool, device=real.device)  # (N, P, P)
    h = run_layers(model, prompt_ids, positions, state, torch.arange(P, device=real.device), allowed)  # (N, P, H)
    first = sample_next(model.get_output_embeddings()(h[:, -1]), temperature)  # (N,)
    state.ids[:, P] = first
    state.done.copy_((first[:, None] == state.stop_ids).any(dim=1))
    state.position.copy_(prompt_mask.sum(dim=1))
    state.column.fill_(P)


def decode_step(model: nn.Module, state: DecodeState, temperature: float) -> None:
    """Feeds the token in `column` to the model and samples the next into `column` + 1: fixed shapes, in place, no
    .item() or branch on a tensor's value, so CUDA can record it. A row that has stopped only appends padding."""
    token = state.ids.index_select(1, state.column)  # (N, 1)
    state.visible.index_fill_(1, state.column, True)
    h = run_layers(model, token, state.position[:, None], state, state.column, state.visible[:, None, :])  # (N, 1, H)
    next_ids = sample_next(model.get_output_embeddings()(h[:, 0]), temperature)  # (N,)
    next_ids = torch.where(state.done, state.pad_id, next_ids)  # (N,)
    state.done |= (next_ids[:, None] == state.stop_ids).any(dim=1)
    state.ids.index_copy_(1, state.column + 1, next_ids[:, None])
    state.position += 1
    state.column += 1


def capture_decode_step(model: nn.Module, state: DecodeState, temperature: float) -> "torch.cuda.CUDAGraph":
    """Records decode_step once as a CUDA graph; graph.replay() reruns its kernels with one launch, on the memory it
    was recorded on: refresh_sampler copies the new policy INTO those weights, so every replay uses them (p.data
    = ... would not be seen). The warm-up steps before the capture only scribble on the state; prefill resets it."""
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


if __name__ == "__main__":
    main()
