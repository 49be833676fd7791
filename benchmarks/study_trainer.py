"""sdpg.py with the distillation studies' instruments: other teachers, other contexts, cheaper KL estimators.

    python benchmarks/study_trainer.py [sdpg.py flags] [the flags below]

  --teacher ema --ema-rate R      the teacher is an exponential moving average of the policy (SDPO's choice):
                                  after each optimiser step teacher <- R * teacher + (1 - R) * policy
  --teacher-context C             what the teacher is shown: 'solution' (the row's answer and worked solution, as
                                  sdpg.py), 'answer' (the answer alone), 'other' (another question's answer and
                                  solution, never the row's own answer: OP2SD's control), 'peer' (the answer, and as
                                  the solution a right answer of ANOTHER row of the group: SDPO's choice)
  --distill-estimator E           what drives the distillation's gradient: 'full' (the exact KL, sdpg.py's), 'topk'
  --distill-topk K                (the KL over the student's K likeliest tokens and one tail bucket, SDPO's) or
                                  'sampled' (the sampled token's log p - log q, on-policy distillation's usual one)
  --teacher-template FILE         the teacher's prompt, with the slots {question}, {instruction}, {answer}, {solution}

sdpg.py stays as it is: this module replaces, in its own process only, the few sdpg.py functions an instrument
changes (_chunk_terms, build_models, build_optimizer, collect_rollouts, evaluate, templates_for), then runs
sdpg.main. The logged kl_distill stays the exact KL whatever the estimator (only the gradient changes). The
moving average is not saved in checkpoints: a study run is not meant to be continued.
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sdpg  # noqa: E402


# --- the estimators: two cheaper stand-ins for the exact KL, each 0 with zero gradient when q = p --------------
# Top-K with a tail bucket (SDPO, arXiv 2601.20802): S = the student's K likeliest tokens (chosen without gradient)
# and one more outcome, "any other token", holding the rest of each distribution's mass, so that it is still a KL
# between two proper distributions over K + 1 outcomes:
#   KL_K(p || SG[q]) = sum_{a in S} p(a) (log p(a) - log q(a)) + p(~S) (log p(~S) - log q(~S))
# With K = V it is the exact KL; with K < V a lower bound (merging outcomes never raises a KL).
def topk_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, k: int) -> Tensor:
    """(..., V), (..., V) -> (...), the teacher detached."""
    if k >= student_logits.shape[-1]:  # no tail left: the full sum
        return sdpg.full_vocab_reverse_kl(student_logits, teacher_logits)
    logp = F.log_softmax(student_logits.float(), dim=-1)  # (..., V)
    logq = F.log_softmax(teacher_logits.detach().float(), dim=-1)  # (..., V)
    top = logp.detach().topk(k, dim=-1).indices  # (..., K) the student's likeliest tokens
    in_top = torch.zeros_like(logp, dtype=torch.bool).scatter(-1, top, True)  # (..., V)
    lp_top, lq_top = logp.gather(-1, top), logq.gather(-1, top)  # (..., K)
    lp_tail = logp.masked_fill(in_top, float("-inf")).logsumexp(dim=-1)  # (...) log of each tail's mass
    lq_tail = logq.masked_fill(in_top, float("-inf")).logsumexp(dim=-1)  # (...)
    return (lp_top.exp() * (lp_top - lq_top)).sum(dim=-1) + lp_tail.exp() * (lp_tail - lq_tail)  # (...)


# The sampled token alone: y_t ~ p_t, so r_t = log p_t(y_t) - log q_t(y_t) has E[r_t] = KL(p_t || q_t), and since
# E_{y~p}[grad log p(y)] = 0 the KL's gradient is E[r_t grad log p_t(y_t)]: the value r_t, the gradient
# SG[r_t] grad log p_t(y_t), both unbiased, with the variance of one draw per position.
def sampled_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> Tensor:
    """(..., V), (..., V), (...) -> (...)."""
    logp = F.log_softmax(student_logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)  # (...)
    logq = F.log_softmax(teacher_logits.detach().float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    r = (logp - logq).detach()  # (...)
    return r + r * (logp - logp.detach())  # value r, gradient r * grad log p


def ema_update(teacher: torch.nn.Module, model: torch.nn.Module, rate: float) -> None:
    """Moves every parameter of `teacher` to rate * itself + (1 - rate) * the same parameter of `model`, in place."""
    with torch.no_grad():
        for t, p in zip(teacher.parameters(), model.parameters()):
            t.lerp_(p.to(t.dtype), 1 - rate)


def privileged_contexts(examples: list[dict], context: str, group_size: int = 1, completions: list[str] | None = None,
                        correct: list[bool] | None = None) -> list[tuple[str, str]]:
    """(answer, solution) shown to the teacher for each of the len(examples) x group_size rows (G rows per example):
    'solution' the example's own; 'answer' its answer alone; 'other' those of the next example in the list whose
    answer differs from its own (('', '') if none does); 'peer' its answer and, as the solution, the first
    completion of ANOTHER row of the group that the verifier accepted (none: the answer alone).
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
            out += [(ex["answer"], next((completions[j] for j in right if j != r), ""))
                    for r in range(i * G, i * G + G)]
    return out


def teacher_texts(examples: list[dict], instruction: str, template: str, contexts: list[tuple[str, str]],
                  group_size: int = 1) -> list[str]:
    """The teacher's user message for each row: its example's question with the row's (answer, solution)."""
    return [sdpg.fill_template(template, {"question": examples[r // group_size]["question"], "instruction": instruction,
                                          "answer": answer, "solution": solution})
            for r, (answer, solution) in enumerate(contexts)]


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(this module's options, the sdpg.py flags); --teacher ema becomes sdpg.py's --teacher reference (whose frozen
    copy the moving average replaces)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--teacher", default="policy", choices=("policy", "reference", "ema"))
    p.add_argument("--ema-rate", type=float, default=0.99)
    p.add_argument("--teacher-context", default="solution", choices=("solution", "answer", "other", "peer"))
    p.add_argument("--distill-estimator", default="full", choices=("full", "topk", "sampled"))
    p.add_argument("--distill-topk", type=int, default=64)
    p.add_argument("--teacher-template")
    opts, rest = p.parse_known_args(argv)
    if not 0 <= opts.ema_rate <= 1 or opts.distill_topk < 1:
        raise SystemExit("error: --ema-rate must be between 0 and 1 and --distill-topk positive")
    return opts, rest + ["--teacher", "reference" if opts.teacher == "ema" else opts.teacher]


def install(opts: argparse.Namespace) -> None:
    """Replaces the sdpg.py functions that the options change, in this process."""
    template = None
    if opts.teacher_template:
        if not os.path.isfile(opts.teacher_template):
            raise SystemExit(f"error: no such template file: {opts.teacher_template}")
        template = open(opts.teacher_template).read()
        sdpg.templates_for = lambda tokenizer: (sdpg.STUDENT_TEMPLATE, template)
    if opts.distill_estimator != "full":
        exact_terms = sdpg._chunk_terms

        def chunk_terms(h_student, h_teacher, targets, lm_head, teacher_head, temperature):
            """sdpg._chunk_terms, with the estimator's gradient under the exact KL's value (the logged kl_distill)."""
            logp, kl, entropy = exact_terms(h_student, h_teacher, targets, lm_head, teacher_head, temperature)
            if h_teacher is None:
                return logp, kl, entropy
            logits = lm_head(h_student).float() / temperature  # (C, V)
            with torch.no_grad():
                teacher_logits = teacher_head(h_teacher).float() / temperature  # (C, V)
            est = (topk_reverse_kl(logits, teacher_logits, opts.distill_topk) if opts.distill_estimator == "topk"
                   else sampled_reverse_kl(logits, teacher_logits, targets))  # (C,)
            return logp, kl.detach() + est - est.detach(), entropy
        sdpg._chunk_terms = chunk_terms
    if opts.teacher == "ema":
        build_models, build_optimizer, ema = sdpg.build_models, sdpg.build_optimizer, []

        def models(args, device):  # the average starts as a float32 copy of the initial policy
            m = build_models(args, device)
            ema.append(sdpg.frozen_copy(m.policy, torch.float32))
            return m._replace(teacher=ema[0])

        def optimizer_with_ema(model, args):  # each optimiser step moves the average towards the policy
            optimizer, scheduler = build_optimizer(model, args)
            step = optimizer.step

            def step_and_average(*a, **kw):
                out = step(*a, **kw)
                ema_update(ema[0], model, opts.ema_rate)
                return out
            optimizer.step = step_and_average
            return optimizer, scheduler
        sdpg.build_models, sdpg.build_optimizer = models, optimizer_with_ema
    if opts.teacher_context != "solution":
        sdpg.collect_rollouts, sdpg.evaluate = collect_rollouts_in_context(opts), evaluate_in_context(opts)


def collect_rollouts_in_context(opts):
    def collect_rollouts(m, examples, args):
        """sdpg.collect_rollouts with the teacher shown --teacher-context (built after grading: 'peer' needs it)."""
        G, tok = args.group_size, m.tokenizer
        student = [sdpg.prompt_texts(ex, args.instruction, sdpg.templates_for(tok))[0]
                   for ex in examples for _ in range(G)]
        prompt_ids, prompt_mask, response_ids, response_mask, correct = sdpg.answer_and_grade(
            m.sampler, tok, m.stop_ids, student, [ex["answer"] for ex in examples for _ in range(G)],
            args.max_new_tokens, args.temperature)
        completions = sdpg.decode_responses(tok, response_ids, response_mask)
        contexts = privileged_contexts(examples, opts.teacher_context, G, completions, correct.bool().tolist())
        teacher = teacher_texts(examples, args.instruction, sdpg.templates_for(tok)[1], contexts, G)
        teacher_ids, teacher_mask = sdpg.left_pad([sdpg.encode_prompt(tok, t) for t in teacher], tok.pad_token_id,
                                                  m.policy.device)
        rewards = sdpg.shaped_reward(correct, response_mask.sum(dim=1), args.wrong_reward, args.max_new_tokens,
                                     args.overlong_buffer)
        return sdpg.Rollouts(prompt_ids, prompt_mask, teacher_ids, teacher_mask, response_ids, response_mask,
                             rewards, sdpg.group_advantages(rewards, G))
    return collect_rollouts


def evaluate_in_context(opts):
    plain = sdpg.evaluate

    def evaluate(model, tokenizer, stop_ids, examples, args, teacher_view=False, samples=1, temperature=0.0):
        """sdpg.evaluate, the teacher's view shown --teacher-context ('peer', which needs a group: the answer)."""
        if not teacher_view:
            return plain(model, tokenizer, stop_ids, examples, args, teacher_view, samples, temperature)
        context = "answer" if opts.teacher_context == "peer" else opts.teacher_context
        texts = teacher_texts(examples, args.instruction, sdpg.templates_for(tokenizer)[1],
                              privileged_contexts(examples, context))
        correct, batch = [], args.batch_prompts * args.group_size
        for i in range(0, len(texts), batch):
            correct += sdpg.answer_and_grade(model, tokenizer, stop_ids, texts[i:i + batch],
                                             [ex["answer"] for ex in examples[i:i + batch]], args.max_new_tokens,
                                             temperature)[-1].tolist()
        return correct
    return evaluate


def main(argv: list[str] | None = None) -> None:
    opts, sdpg_argv = parse(sys.argv[1:] if argv is None else argv)
    install(opts)
    sdpg.main(sdpg_argv)


if __name__ == "__main__":
    main()
