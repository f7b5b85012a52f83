"""The tool-calling specialist's training set and training path: a held-out split that shares no template and no
values with training, targets the server's tool grammar accepts token by token with the loss only on them, and a
few LoRA steps that lower the loss of held-out calls."""

import copy

import pytest

from slimswarm.agents.agent import Tool
from slimswarm.agents.tool_calls_data import (TOOL_FUNCS, chat_set, prompt_messages, target_text, tool_call_set,
                                              training_pairs)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_held_out_split_shares_no_template_and_no_values_with_training():
    train, held = tool_call_set("train", 720), tool_call_set("held_out", 48)
    assert {e.template for e in train}.isdisjoint({e.template for e in held})
    assert {e.values for e in train}.isdisjoint({e.values for e in held})
    assert len({(e.template, e.values) for e in held}) == 48  # distinct
    assert [sum(e.tool == f.__name__ for e in held) for f in TOOL_FUNCS] == [16, 16, 16]
    tools = {f.__name__: Tool(f) for f in TOOL_FUNCS}
    for e in train[:60] + held:  # every target call, run, gives the answer the benchmark scores against
        assert tools[e.tool](e.arguments) == e.want
        assert all(str(v) in e.question for v in e.values if not isinstance(v, str) or len(v) > 1)
    assert tool_call_set("held_out", 48) == held  # seeded: the benchmark's set is the same every run
    chat_train, chat_held = chat_set("train", 60), chat_set("held_out", 12)  # the prompts no tool answers
    assert {e.template for e in chat_train}.isdisjoint({e.template for e in chat_held})
    assert {e.values for e in chat_train}.isdisjoint({e.values for e in chat_held})
    assert all(e.tool is None for e in chat_train + chat_held) and len({e.question for e in chat_held}) == 12


def test_targets_are_what_the_tool_grammar_writes_and_only_they_carry_the_loss(smollm2):
    from slimswarm.compress.lora import encode_pairs
    from slimswarm.engine.chat_plan import plan_chat
    from slimswarm.engine.grammar import GrammarCompiler, allowed

    tok = smollm2.tokenizer
    compiler = GrammarCompiler(tok, smollm2.model.config.vocab_size)
    for e in tool_call_set("held_out", 6):
        messages, tools = prompt_messages(e)
        plan = plan_chat(messages, tools, "required", parallel_tool_calls=False)
        row = compiler.row(plan.grammar)
        ids = tok.encode(target_text(e), bos=False)
        for i, t in enumerate(ids):
            assert allowed(row.mask, t), (target_text(e), i)
            done = row.accept(t)
        assert done  # the grammar is complete exactly at the end of the call
        [(prompt, target)] = training_pairs(tok, [e], vary=False)
        assert prompt == tok.chat(plan.messages)  # rendered as the server renders the request
        [(x, labels)] = encode_pairs(tok, [(prompt, target)], 320)
        assert [t for t, lab in zip(x, labels) if lab != -100] == ids + [tok.eos_ids[0]]  # the call, end of turn
        assert tok.decode(ids) == target


def test_a_few_lora_steps_on_the_call_tokens_lower_the_loss_of_held_out_calls(smollm2):
    from slimswarm.agents.specialists import lora_targets
    from slimswarm.agents.tool_specialist import tool_call_loss
    from slimswarm.compress.lora import FinetuneConfig, LoRAConfig, finetune_lora

    model, tok = copy.deepcopy(smollm2.model), smollm2.tokenizer
    train = training_pairs(tok, tool_call_set("train", 24), seed=0)
    held = training_pairs(tok, tool_call_set("held_out", 4), vary=False)
    before = tool_call_loss(model, tok, held)
    cfg = FinetuneConfig(lora=LoRAConfig(r=4, alpha=8, targets=lora_targets(30, 2)), steps=6, batch_size=2,
                         lr=3e-3, warmup=1, max_len=320, log_every=1)
    res = finetune_lora(model, tok, train, cfg)
    after = tool_call_loss(model, tok, held)
    first, last = res.history[0]["loss"], sum(h["loss"] for h in res.history[-3:]) / 3
    print(f"held-out call loss {before:.3f} -> {after:.3f}; train {first:.3f} -> {last:.3f}")
    assert after < 0.8 * before and last < first
