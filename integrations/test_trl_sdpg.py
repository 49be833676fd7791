"""Tests of the TRL bridge (integrations/trl_sdpg.py) on the CPU, offline, with the tiny model of sdpg.py.

Skipped, with the reason, when trl is not installed (pip install -r integrations/requirements.txt).
"""

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("trl", reason="the TRL bridge needs trl: pip install -r integrations/requirements.txt")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE, os.path.join(ROOT, "benchmarks")]

import sdpg  # noqa: E402
import tiny_reader  # noqa: E402  (toy-reverse's questions)
from datasets import Dataset  # noqa: E402
from trl import GRPOTrainer  # noqa: E402
from trl_sdpg import SDPGConfig, SDPGTrainer, verifier_reward  # noqa: E402

CHAT = "q: {{ messages[-1]['content'] }}\na: "  # for the character tokenizer: sdpg.encode_prompt's format


def _rows(n: int, solution: str = "digits backwards"):
    return Dataset.from_list([{"prompt": [{"role": "user", "content": ex["question"]}], "answer": ex["answer"],
                               "solution": solution} for ex in tiny_reader.reverse_examples(n, 0, held_out=False)])


def _trainer(tmp_path, cls=SDPGTrainer, model=None, data=None, peft_config=None, **overrides):
    tok = sdpg.build_char_tokenizer()
    tok.chat_template = CHAT
    model = sdpg.build_tiny_model(tok, seed=0) if model is None else model
    settings = dict(output_dir=str(tmp_path / "out"), use_cpu=True, per_device_train_batch_size=16, num_generations=4,
                    max_completion_length=4, max_steps=2, learning_rate=3e-3, report_to="none", save_strategy="no",
                    bf16=False, logging_steps=1, seed=0, distill_beta=1.0, distill_gate=False,
                    distill_warmup_ratio=0.0, distill_decay_ratio=0.0)
    settings.update(overrides)
    config = SDPGConfig(**settings)
    trainer = cls(model=model, reward_funcs=verifier_reward, args=config, train_dataset=data or _rows(32),
                  processing_class=tok, peft_config=peft_config)
    trainer.current_gradient_accumulation_steps = 1  # set by train(); these tests call the loss directly
    trainer.model.train()
    return trainer


def _batch(trainer):
    """One generation batch as TRL builds it (completion ids, advantages, ...), with the teacher's prompts."""
    rows = [r for r in trainer.train_dataset.select(range(4)) for _ in range(trainer.num_generations)]
    torch.manual_seed(0)
    return trainer._generate_and_score_completions(rows)


def _loss_and_grads(trainer, inputs):
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def _close(grads_a, grads_b):
    return grads_a.keys() == grads_b.keys() and all(torch.allclose(grads_a[k], grads_b[k], rtol=1e-5, atol=1e-7)
                                                    for k in grads_a)


def test_without_the_distillation_the_loss_and_gradients_are_grpotrainers(tmp_path):
    model = sdpg.build_tiny_model(sdpg.build_char_tokenizer(), seed=0)
    bridge = _trainer(tmp_path, model=copy.deepcopy(model))
    inputs = _batch(bridge)
    trl = _trainer(tmp_path, cls=GRPOTrainer, model=copy.deepcopy(model))
    want = _loss_and_grads(trl, inputs)
    for settings in (dict(distill_beta=0.0), dict(distill_gate=True)):  # off; or on with every answer gated out
        for k, v in settings.items():
            setattr(bridge.args, k, v)
        batch = {**inputs, "advantages": -inputs["advantages"].abs()} if "distill_gate" in settings else inputs
        expected = want if "distill_gate" not in settings else _loss_and_grads(trl, batch)
        loss, grads = _loss_and_grads(bridge, batch)
        assert torch.equal(loss, expected[0]) and _close(grads, expected[1]), settings


def _independent_term(model, inputs, temperature, gate):
    """The distillation term computed from full logits with torch.distributions, summed as TRL's default loss
    ('dapo': over the tokens of the batch, divided by their number)."""
    C = inputs["completion_ids"].shape[1]
    mask = inputs["completion_mask"].float()

    def logits(prompt_ids, prompt_mask):
        ids = torch.cat([prompt_ids, inputs["completion_ids"]], dim=1)
        attn = torch.cat([prompt_mask, inputs["completion_mask"]], dim=1)
        return model(input_ids=ids, attention_mask=attn).logits[:, -C - 1:-1].float() / temperature  # (B, C, V)

    p = torch.distributions.Categorical(logits=logits(inputs["prompt_ids"], inputs["prompt_mask"]))
    with torch.no_grad():
        q = torch.distributions.Categorical(logits=logits(inputs["teacher_ids"], inputs["teacher_mask"]))
    kl = torch.distributions.kl_divergence(p, q)  # (B, C), KL(p || q)
    m = (inputs["advantages"] > 0).float()[:, None] if gate else torch.ones_like(kl[:, :1])
    return (m * kl * mask).sum() / inputs["num_items_in_batch"]


@pytest.mark.parametrize("gate", [False, True])
def test_the_added_term_is_the_exact_kl_of_the_sampled_ids_and_trains_the_student_only(tmp_path, gate):
    model = sdpg.build_tiny_model(sdpg.build_char_tokenizer(), seed=0)
    bridge = _trainer(tmp_path, model=copy.deepcopy(model), temperature=0.7, distill_gate=gate)
    trl = _trainer(tmp_path, cls=GRPOTrainer, model=copy.deepcopy(model), temperature=0.7)
    inputs = _batch(bridge)
    inputs["advantages"] = torch.tensor([1.5, -0.5, -0.5, -0.5] * 4)  # a right answer in each group of 4
    loss, grads = _loss_and_grads(bridge, inputs)
    trl_loss, trl_grads = _loss_and_grads(trl, inputs)
    reference = copy.deepcopy(model).train()  # the same weights, outside TRL
    term = _independent_term(reference, inputs, 0.7, gate)
    term.backward()
    want = {n: trl_grads.get(n, 0) + p.grad for n, p in reference.named_parameters()}
    assert term.item() > 1e-3 and torch.allclose(loss - trl_loss, term.detach(), rtol=1e-4)
    assert _close(grads, want)  # the gradient of KL(p || SG[q]): the teacher's view is a constant
    if gate:  # the gate matters here: distilling every answer would give another value
        assert not torch.allclose(_independent_term(reference, inputs, 0.7, False), term, rtol=1e-2)


def test_the_teacher_reads_the_rows_answer_and_solution_before_the_sampled_ids(tmp_path):
    bridge = _trainer(tmp_path, teacher_template=sdpg.TOY_TEACHER_TEMPLATE)
    inputs = _batch(bridge)
    tok = bridge.processing_class
    rows = [r for r in bridge.train_dataset.select(range(4)) for _ in range(4)]
    for i, row in enumerate(rows):
        teacher = tok.decode(inputs["teacher_ids"][i][inputs["teacher_mask"][i].bool()])
        student = tok.decode(inputs["prompt_ids"][i][inputs["prompt_mask"][i].bool()])
        assert teacher == f"q: {row['answer'][::-1]}\nanswer: {row['answer']}\nsolution: digits backwards\na: "
        assert row["answer"] not in student.replace(row["answer"][::-1], "")  # the student never sees it
    seen = []
    hook = bridge.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"]), with_kwargs=True)
    bridge._compute_loss(bridge.model, inputs)
    hook.remove()
    C = inputs["completion_ids"].shape[1]
    assert torch.equal(seen[0][:, -C:], inputs["completion_ids"])  # the teacher scores the sampled ids
    assert torch.equal(seen[0][:, :-C], inputs["teacher_ids"])


def test_each_loss_type_sums_the_term_as_trl_sums_its_own(tmp_path):
    """On the policy's own samples TRL's per-token loss is -A (ratio 1), so its loss is the sum of -A that
    _aggregate must give; any other weighting of the distillation term would differ. (The per-token loss of cispo
    and vespo holds log p, sapo's a factor 2 / temperature: TRL sums the first two as dapo, sapo as grpo.)"""
    bridge = _trainer(tmp_path)
    inputs = _batch(bridge)
    inputs["advantages"] = torch.linspace(-1, 1, 16)
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        bridge.loss_type = loss_type
        want = GRPOTrainer._compute_loss(bridge, bridge.model, inputs)
        ones = torch.ones_like(inputs["completion_mask"], dtype=torch.float)
        got = bridge._aggregate(-inputs["advantages"][:, None] * ones, inputs["completion_mask"], inputs)
        assert torch.allclose(got, want.detach(), atol=1e-6), loss_type


def test_settings_that_cannot_work_are_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="set beta"):
        _trainer(tmp_path, distill_teacher="reference")  # no reference model: TRL's beta is 0, no LoRA
    with pytest.raises(ValueError, match="'policy' or 'reference'"):
        _trainer(tmp_path, distill_teacher="ema")
    with pytest.raises(ValueError, match="no 'gold' column"):
        _trainer(tmp_path, answer_column="gold")


def test_lora_trains_only_the_adapters_and_the_reference_teacher_is_the_model_without_them(tmp_path):
    from peft import LoraConfig

    bridge = _trainer(tmp_path, distill_teacher="reference",
                      peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    before = {n: p.detach().clone() for n, p in bridge.model.named_parameters()}
    bridge.train()
    after = dict(bridge.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any(r.get("distill/kl", 0) > 0 for r in bridge.state.log_history)
    base = sdpg.build_tiny_model(bridge.processing_class, seed=0).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(), bridge._teacher(bridge.model) as teacher:
        assert torch.allclose(teacher(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(bridge.model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-6)


TWO_RANKS = textwrap.dedent("""
    import os, sys, torch
    sys.path[:0] = [{root!r}, {here!r}]
    import test_trl_sdpg as t, pathlib
    trainer = t._trainer(pathlib.Path({out!r}))
    trainer.train()
    flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    torch.save(flat, os.path.join({out!r}, f"rank{{os.environ['RANK']}}.pt"))
    kl = [r["distill/kl"] for r in trainer.state.log_history if "distill/kl" in r]
    torch.save(torch.tensor(kl), os.path.join({out!r}, f"kl{{os.environ['RANK']}}.pt"))
""")


def test_two_processes_train_two_steps_and_end_with_the_same_weights(tmp_path):
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS.format(root=ROOT, here=HERE, out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    initial = sdpg.build_tiny_model(sdpg.build_char_tokenizer(), 0)
    start = torch.cat([p.detach().flatten() for p in initial.parameters()])
    assert torch.equal(ranks[0], ranks[1]) and not torch.equal(ranks[0], start)
    assert len(torch.load(tmp_path / "kl0.pt")) == 2 and (torch.load(tmp_path / "kl0.pt") > 0).all()


def test_a_frozen_teacher_lifts_the_hard_task_inside_trl_where_trl_alone_does_not(tmp_path):
    """The learning check of benchmarks/trl_learning_check.py, shortened: the tiny reader on toy-reverse, 80 steps
    (its 200-step, 5-seed numbers are in benchmarks/results/trl/)."""
    import trl_learning_check as check

    reader = str(tmp_path / "reader")
    alone = check.one_run("trl-only", 0, 80, 80, str(tmp_path / "alone"), reader)
    frozen = check.one_run("teacher-reference", 0, 80, 80, str(tmp_path / "frozen"), reader)
    assert alone["evals"][0]["accuracy"] == frozen["evals"][0]["accuracy"] == 0.0
    assert alone["final_accuracy"] == 0.0 and frozen["final_accuracy"] >= 0.04


SHARED_TOKENIZER = os.path.join(ROOT, "..", "shared", "data", "qwen2.5-tokenizer")


@pytest.mark.skipif(not os.path.isdir(SHARED_TOKENIZER), reason="needs ../shared/data/qwen2.5-tokenizer (a chat "
                    "model's tokenizer), which the project's own clone does not hold")
def test_the_command_line_trains_a_chat_model_on_a_local_file(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    tok = AutoTokenizer.from_pretrained(SHARED_TOKENIZER)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    with open(tmp_path / "data.jsonl", "w") as f:
        f.writelines(f'{{"question": "What is {i} + {i}?", "answer": "{2 * i}", "solution": "{i} + {i} = {2 * i}."}}\n'
                     for i in range(12))
    done = subprocess.run([sys.executable, os.path.join(HERE, "trl_sdpg.py"), "--model_name_or_path",
                           str(tmp_path / "model"), "--dataset", str(tmp_path / "data.jsonl"), "--eval_n", "4",
                           "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--use_cpu",
                           "--per_device_train_batch_size", "4", "--num_generations", "2", "--max_completion_length",
                           "4", "--report_to", "none", "--bf16", "false", "--distill_decay_ratio", "0",
                           "--distill_warmup_ratio", "0", "--logging_steps", "1"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "distill/kl" in done.stdout + done.stderr and os.path.isfile(tmp_path / "out" / "model.safetensors")
