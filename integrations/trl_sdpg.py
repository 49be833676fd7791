"""SDPG inside TRL: GRPOTrainer plus SDPG's exact self-distillation term, computed by sdpg.py's own functions.

TRL keeps all it does: sampling (transformers or vLLM), the advantages, its policy loss with its clipping and
aggregation, its reference anchor, accelerate (DDP, FSDP2, DeepSpeed ZeRO-1/2), PEFT, logging and checkpoints.
SDPGTrainer adds one term to TRL's per-token loss (Eq. 3.1), summed as TRL's `loss_type` sums its own:

    beta(k) * m_i * SG[rho] * KL(p_t || SG[q_t])     (the exact reverse KL over the whole vocabulary)

p_t is the student (the prompt TRL sampled from), q_t the teacher (the same completion ids after a prompt that also
holds the row's answer and worked solution), m_i = 1[A_i > 0] the gate, rho = p / p_old (1 unless TRL reuses a
batch). TRL's `beta` stays TRL's: its anchor (k3, whose gradient is sdpg.py's --kl-mode ufkl; sdpg.py's --alpha);
sdpg.py's --beta is `distill_beta`. Launch lines: README.md, "Many GPUs, vLLM, LoRA: SDPG inside TRL".
"""

import contextlib
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from torch import Tensor
from torch.distributed.tensor import DTensor
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import use_adapter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sdpg  # noqa: E402
from verifiers import math_reward  # noqa: E402


@dataclass
class SDPGConfig(GRPOConfig):
    distill_beta: float = field(default=1e-3, metadata={"help": "beta_base, the weight of the distillation KL "
                                "(sdpg.py's --beta; TRL's own `beta` is the reference anchor, sdpg.py's --alpha)"})
    distill_warmup_ratio: float = field(default=0.125, metadata={"help": "beta's linear warm-up, a fraction of "
                                        "max_steps (paper: 50 of 400; released script: 0)"})
    distill_decay_ratio: float = field(default=0.875, metadata={"help": "beta's linear decay to 0 over the last "
                                       "fraction of max_steps (paper: 350 of 400; released script: 0)"})
    distill_gate: bool = field(default=True, metadata={"help": "distil only answers with A > 0 (Eq. 3.5)"})
    distill_teacher: str = field(default="policy", metadata={"help": "who reads the privileged prompt: 'policy' "
                                 "(SDPG) or 'reference', the frozen initial model (TRL's ref model when beta > 0; "
                                 "under LoRA, the model with its adapters off)"})
    answer_column: str = field(default="answer", metadata={"help": "dataset column with the gold answer"})
    solution_column: str = field(default="solution", metadata={"help": "column with a worked solution ('' for none)"})
    teacher_template: str = field(default=sdpg.TEACHER_TEMPLATE, metadata={"help": "the teacher's user message; "
                                  "{question} is the student's last user message (or its text prompt)"})
    distill_chunk_size: int = field(default=256, metadata={"help": "tokens per vocabulary chunk of the KL"})


def verifier_reward(completions: list, answer: list[str], **kwargs) -> list[float]:
    """A TRL reward function: 1.0 when verifiers.py accepts the completion's final answer, else 0.0."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [math_reward(text, gold) for text, gold in zip(texts, answer)]


class SDPGTrainer(GRPOTrainer):
    """GRPOTrainer whose loss also pulls the student towards the privileged teacher (SDPGConfig's distill_*)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        a = self.args
        if a.distill_teacher not in ("policy", "reference"):
            raise ValueError(f"distill_teacher must be 'policy' or 'reference', not {a.distill_teacher!r}")
        if a.distill_teacher == "reference" and self.ref_model is None and not is_peft_model(self.model):
            raise ValueError("distill_teacher='reference' reads TRL's reference model, which it loads only when "
                             "beta > 0 (or under LoRA): set beta, e.g. 1e-3, the paper's anchor")
        if is_deepspeed_zero3_enabled():
            raise ValueError("DeepSpeed ZeRO-3 is not supported: the distillation reads the output layer outside the "
                             "model's forward; use FSDP2 or ZeRO-2")
        if a.answer_column not in self.train_dataset.column_names:
            raise ValueError(f"the training dataset has no '{a.answer_column}' column (answer_column)")
        self._hidden: list[Tensor] | None = None  # while a list, the backbone's forward appends its output to it
        for model in (self.model, self.ref_model):
            if model is not None:
                self._causal_lm(model).base_model.register_forward_hook(self._keep_hidden)

    def _causal_lm(self, model):  # the transformers model inside accelerate's and PEFT's wrappers
        model = self.accelerator.unwrap_model(model)
        return model.get_base_model() if is_peft_model(model) else model

    def _keep_hidden(self, module, args, output):
        if self._hidden is not None:
            self._hidden.append(output.last_hidden_state)  # (B, T, H), with grad when the forward has it

    def _captured(self, run):
        """Calls run() and returns (its result, the final hidden states (B, T, H) its forward passes made)."""
        self._hidden = []
        try:
            result = run()
            return result, torch.cat(self._hidden)
        finally:
            self._hidden = None

    def _output_layer(self, model):
        """h -> logits with the model's output layer. FSDP2 keeps 1/N of its weight per rank: gathered here whole,
        differentiably, as TRL's fused head does."""
        head = self._causal_lm(model).get_output_embeddings()
        w, b = head.weight, head.bias
        if isinstance(w, DTensor):
            w, b = w.full_tensor(), None if b is None else b.full_tensor()
        return lambda h: F.linear(h, w, b)

    @contextlib.contextmanager
    def _teacher(self, model):
        """The model that reads the privileged prompt: the policy itself, TRL's reference, or the adapters off."""
        if self.args.distill_teacher == "policy":
            yield model
        elif self.ref_model is not None:
            yield self.ref_model
        else:
            peft = self.accelerator.unwrap_model(model)
            with use_adapter(peft, adapter_name="ref" if "ref" in peft.peft_config else None):
                yield model

    def _teacher_prompt(self, row: dict):
        """The row's prompt with its last user message (or its text) put into teacher_template beside the row's
        answer and worked solution (a slot left empty drops its line, sdpg.fill_template)."""
        a = self.args
        values = {"instruction": "", "answer": str(row[a.answer_column]),
                  "solution": str(row.get(a.solution_column) or "") if a.solution_column else ""}
        prompt = row["prompt"]
        if isinstance(prompt, str):
            return sdpg.fill_template(a.teacher_template, {**values, "question": prompt})
        last = max(i for i, m in enumerate(prompt) if m["role"] == "user")
        text = sdpg.fill_template(a.teacher_template, {**values, "question": prompt[last]["content"]})
        return [*prompt[:last], {**prompt[last], "content": text}, *prompt[last + 1:]]

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)  # one row of out per row of inputs, in order
        if self.args.distill_beta > 0:
            ids = self._tokenize_prompts([self._teacher_prompt(row) for row in inputs])[0]
            out["teacher_ids"], out["teacher_mask"] = sdpg.left_pad(  # (B, Pt) each; TRL shuffles and splits them
                [list(x) for x in ids], self._tokenizer.pad_token_id, self.accelerator.device)
        return out

    def _aggregate(self, per_token: Tensor, mask: Tensor, inputs: dict) -> Tensor:
        """Sums (B, C) per-token values as TRL's loss_type sums its own per-token loss (its _compute_loss)."""
        x, t = per_token * mask, self.loss_type
        accumulation = self.current_gradient_accumulation_steps if self.model.training else 1.0
        if t in ("grpo", "sapo"):
            return (x.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
        if t == "bnpo":
            return x.sum() / mask.sum().clamp(min=1.0) / accumulation
        if t == "dr_grpo":
            return x.sum() / (x.size(0) * self.max_completion_length) / accumulation
        if t == "luspo":
            return x.sum(-1).mean() / accumulation
        normaliser = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes  # dapo, cispo, vespo
        if self.model.training:
            normaliser = normaliser * accumulation / self.args.steps_per_generation
        return x.sum() / normaliser

    def _compute_loss(self, model, inputs):
        a, T = self.args, self.state.max_steps
        beta_k = sdpg.beta_schedule(self.state.global_step + 1, T, a.distill_beta, round(a.distill_warmup_ratio * T),
                                    round(a.distill_decay_ratio * T))
        if beta_k == 0:
            return super()._compute_loss(model, inputs)
        y, C = inputs["completion_ids"], inputs["completion_ids"].shape[1]  # (B, C) the sampled ids
        mask = inputs["completion_mask"] * inputs.get("tool_mask", 1)  # (B, C), the tokens TRL's loss counts
        real = mask.bool()
        with torch.no_grad(), self._teacher(model) as teacher:  # first the teacher: privileged prompt + the same ids
            ids = torch.cat([inputs["teacher_ids"], y], dim=1)  # (B, Pt + C)
            attn = torch.cat([inputs["teacher_mask"], inputs["completion_mask"]], dim=1)
            _, h = self._captured(lambda: teacher(input_ids=ids, attention_mask=attn, logits_to_keep=1,
                                                  use_cache=False))  # (B, Pt + C, H); one column of logits
            h_teacher = h[:, -C - 1:-1][real]  # (M, H): the state before each completion token predicts it
            teacher_head = self._output_layer(teacher)
        # TRL's own loss; its forward of the student leaves the final hidden states, with grad, for the KL
        loss, h = self._captured(lambda: super(SDPGTrainer, self)._compute_loss(model, inputs))
        terms = sdpg.chunked_token_terms(h[:, -C - 1:-1][real], h_teacher, y[real], self._output_layer(model),
                                         self.temperature, a.distill_chunk_size, teacher_head=teacher_head)
        kl, logp = sdpg.scatter_tokens(terms.kl, mask), sdpg.scatter_tokens(terms.logp, mask)  # (B, C) each
        A = inputs["advantages"].view(len(y), -1)[:, :1]  # (B, 1)
        m = (A > 0).float() if a.distill_gate else torch.ones_like(A)  # the gate m_i (Eq. 3.5)
        old = inputs.get("old_per_token_logps")  # present when TRL reuses a batch (Appendix A.3)
        rho = torch.ones_like(kl) if old is None else torch.exp(logp - old).detach()  # (B, C)
        sums = torch.stack([(kl * mask).sum(), mask.sum(), (A > 0).sum(), A.new_tensor(len(A))]).detach().float()
        kl_sum, tokens, positive, rows = self.accelerator.reduce(sums, "sum")  # over the ranks
        metrics = self._metrics["train" if self.model.training else "eval"]
        metrics["distill/kl"].append((kl_sum / tokens.clamp(min=1)).item())  # the exact KL per token
        metrics["distill/gate_frac"].append((positive / rows).item())  # answers with A > 0 (all distilled if no gate)
        metrics["distill/beta"].append(beta_k)
        return loss + beta_k * self._aggregate(m * rho * kl, mask, inputs)


def main() -> None:
    """Trains on GSM8K (or a local question/answer/solution file, as sdpg.py reads it) with TRL's command-line flags
    plus SDPGConfig's; the held-out questions are TRL's eval_dataset (its eval_strategy decides when)."""
    from datasets import Dataset
    from trl import ModelConfig, TrlParser, get_peft_config

    @dataclass
    class Data:
        dataset: str = field(default="gsm8k", metadata={"help": "gsm8k or a local .jsonl/.parquet file, as sdpg.py"})
        eval_n: int = field(default=200, metadata={"help": "held-out rows: GSM8K's test split, a file's last rows"})

    config, model_args, data = TrlParser((SDPGConfig, ModelConfig, Data)).parse_args_and_config()

    def as_trl(examples: list[dict]) -> Dataset:  # sdpg.py's student prompt as one user message
        return Dataset.from_list([{"prompt": [{"role": "user", "content": sdpg.fill_template(sdpg.STUDENT_TEMPLATE, {
            "question": ex["question"], "instruction": sdpg.INSTRUCTION})}], "answer": ex["answer"],
            "solution": ex["solution"]} for ex in examples])

    train, held_out = sdpg.load_examples(data.dataset, data.eval_n, config.seed)
    trainer = SDPGTrainer(model=model_args.model_name_or_path, reward_funcs=verifier_reward, args=config,
                          train_dataset=as_trl(train), eval_dataset=as_trl(held_out),
                          peft_config=get_peft_config(model_args))
    trainer.train()
    trainer.save_model(config.output_dir)


if __name__ == "__main__":
    main()
