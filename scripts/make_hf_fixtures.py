#!/usr/bin/env python3
"""Writes the Hugging Face parity fixtures of forkrl-trainer.

Run once, by hand, to regenerate `crates/forkrl-trainer/tests/fixtures/hf/`; the Rust tests only read its output, so
Python is never needed to test:

    python3 -m venv /tmp/hf && /tmp/hf/bin/pip install torch transformers tokenizers safetensors
    /tmp/hf/bin/python scripts/make_hf_fixtures.py

What it writes, per model directory (all `save_pretrained` output of `transformers`, plus two reference files):
- `config.json`, `generation_config.json`, weights (`model.safetensors`, or shards + `model.safetensors.index.json`),
  `tokenizer.json`, `tokenizer_config.json`;
- `reference.safetensors`: `input_ids` [2, 12] (i64) and their full-sequence `logits` [2, 12, V] (f32), computed by
  transformers in f32 from the saved weights (eager attention);
- `reference.json`: greedy continuations of a left-padded batch of two prompts of different lengths
  (`model.generate(do_sample=False)`), and tokenizer encode/decode cases.

The six models cover: Qwen2 with tied embeddings saved in bf16; Qwen2 untied, f32, sharded; Qwen3 (q/k norms, an
explicit `head_dim` different from hidden/heads) saved in f16; Llama with grouped-query attention, f32, one file; Llama
with Llama 3's RoPE scaling (`rope_type = "llama3"`, a pre-training context of 32 so that the scaling changes the
logits of 12 positions); Qwen2 with YaRN (factor 4, attention factor 0.1·ln 4 + 1).

Names given on the command line rebuild only those fixtures (`... make_hf_fixtures.py llama3-rope qwen2-yarn`). Every
parameter, RMSNorm gains included, is drawn at random so that a weight loaded into the wrong place changes the logits.
"""

import json
import os
import random
import shutil
import sys

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates", "forkrl-trainer", "tests", "fixtures", "hf")
VOCAB = 320
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus():
    rng = random.Random(0)
    lines = []
    for _ in range(3000):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op = rng.choice("+-*")
        value = a + b if op == "+" else a - b if op == "-" else a * b
        lines.append(f"Question: what is {a} {op} {b}? Let me think step by step. The answer is \\boxed{{{value}}}.")
    lines += [
        "Wait, however, suppose we try another approach. Therefore the result follows.",
        "Reach the target 24 with the numbers 3, 4, 6 and 1 using + - * / once each.",
        "The quick brown fox jumps over the lazy dog; naïve café déjà vu — 東京 ✓",
    ] * 50
    return lines


def make_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    return fast


def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def build_one(name, cls, config, dtype, shard, seed, tok):
    out = os.path.join(ROOT, name)
    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(seed)
    model = cls(config).eval()
    randomise(model, seed)
    model.to(dtype).save_pretrained(out, max_shard_size=shard, safe_serialization=True)
    tok.save_pretrained(out)
    # The reference runs in f32 from exactly the saved (possibly bf16/f16-rounded) weights.
    ref = cls.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    with torch.no_grad():
        logits = ref(input_ids=ids).logits.float().contiguous()
    save_file({"input_ids": ids.contiguous(), "logits": logits}, os.path.join(out, "reference.safetensors"))

    prompts = ["Question: what is 12 + 7?", "Wait, suppose"]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        gen = ref.generate(
            **enc,
            do_sample=False,
            max_new_tokens=10,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    width = enc["input_ids"].shape[1]
    cases = [
        "Question: what is 12 + 7? The answer is \\boxed{19}.",
        "naïve café déjà vu — 東京 ✓",
        "<|im_start|>user\nReach 24<|im_end|>",
        "",
    ]
    reference = {
        "generator": "scripts/make_hf_fixtures.py",
        "transformers_model": cls.__name__,
        "prompts": [tok(p)["input_ids"] for p in prompts],
        "greedy_new_tokens": [row[width:].tolist() for row in gen],
        "max_new_tokens": 10,
        "tokenizer_cases": [
            {"text": t, "ids": tok(t)["input_ids"], "decoded": tok.decode(tok(t)["input_ids"], skip_special_tokens=False)}
            for t in cases
        ],
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(reference, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(name, "logits", tuple(logits.shape), "greedy", reference["greedy_new_tokens"])


def main():
    tok = make_tokenizer()
    eos, pad = tok.eos_token_id, tok.pad_token_id
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=None,
    )
    only = set(sys.argv[1:])

    def build(name, *args):
        if not only or name in only:
            build_one(name, *args)

    build("qwen2-tied", Qwen2ForCausalLM, Qwen2Config(**common, tie_word_embeddings=True, rms_norm_eps=1e-6),
          torch.bfloat16, "5GB", 1, tok)
    build("qwen2-untied", Qwen2ForCausalLM, Qwen2Config(**common, tie_word_embeddings=False, rope_theta=1e6),
          torch.float32, "60KB", 2, tok)
    build("qwen3", Qwen3ForCausalLM, Qwen3Config(**common, head_dim=32, tie_word_embeddings=False),
          torch.float16, "5GB", 3, tok)
    build("llama", LlamaForCausalLM,
          LlamaConfig(**{**common, "num_key_value_heads": 1}, tie_word_embeddings=False, rope_theta=5e5,
                      rms_norm_eps=1e-5), torch.float32, "5GB", 4, tok)
    llama3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    build("llama3-rope", LlamaForCausalLM,
          LlamaConfig(**{**common, "num_key_value_heads": 1}, tie_word_embeddings=False, rope_parameters=llama3,
                      rms_norm_eps=1e-5), torch.float32, "5GB", 5, tok)
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}
    build("qwen2-yarn", Qwen2ForCausalLM,
          Qwen2Config(**common, tie_word_embeddings=True, rope_parameters=yarn, rms_norm_eps=1e-6),
          torch.float32, "5GB", 6, tok)


if __name__ == "__main__":
    main()
