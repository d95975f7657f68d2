#!/usr/bin/env python3
"""The PyTorch peer of the criterion benches `throughput` (forkrl-trainer), `losses` (forkrl-advantage) and
`tensor_path` (forkrl-entropy): the same shapes, in PyTorch eager, on the same CPU.

- `sampling_kv_cache`: the built-in tiny policy's shape as a transformers `LlamaForCausalLM` (vocabulary 23, width 64,
  4 heads, MLP 192, 2 blocks, tied embeddings), random weights, `model.generate` of 64 rows x 128 new tokens from
  8-token prompts (sampling at T = 1, `min_new_tokens` so that every row generates 128);
- `sampling_manual_kv_loop`: the same with a hand-written loop over `past_key_values` (no `generate` overhead);
- `train_fwd_bwd`: forward + backward of the mean target log-prob over 64 x 135 tokens; `train_fwd_bwd_compiled`: the
  same with the model under `torch.compile` (inductor, compiled in the warm-up call);
- `policy_loss_fwd_bwd` / `baseline_exp_sum_fwd_bwd`: the PPO-clip loss (clip 0.2 / 0.28, token-mean over a mask) on
  [512, 4096] log-probs, forward + backward, against `exp(logp - old).sum()` forward + backward;
- `entropy_verl_fwd`: verl's `entropy_from_logits` + `logprobs_from_logits` on [512, 151936] f32 logits, forward.

Prints one JSON line per measurement: `{"name": ..., "ms": ...}` (median of the repetitions). Threads:
`torch.set_num_threads(os.cpu_count())`. `cargo xtask bench --peers` runs it with `FORKRL_PEER_PYTHON` (default
`python3`) and prints forkrl / PyTorch ratios from the same run; never run by the tests.
"""

import json
import os
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROWS, PROMPT, NEW = 64, 8, 128
VOCAB = 23


def timed(fn, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def report(name, ms):
    print(json.dumps({"name": name, "ms": round(ms, 3)}), flush=True)


def main():
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=PROMPT + NEW, tie_word_embeddings=True, rope_theta=10000.0,
        rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(2, VOCAB, (ROWS, PROMPT), generator=g)

    def generate():
        with torch.no_grad():
            model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                           temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=NEW, min_new_tokens=NEW,
                           pad_token_id=0)

    report("sampling_kv_cache", timed(generate, 5))

    def manual():
        with torch.no_grad():
            out = model(input_ids=prompts, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
            for _ in range(NEW):
                token = torch.multinomial(torch.softmax(logits, -1), 1)
                out = model(input_ids=token, past_key_values=past, use_cache=True)
                past, logits = out.past_key_values, out.logits[:, -1]

    report("sampling_manual_kv_loop", timed(manual, 5))

    model.train()
    seqs = torch.randint(2, VOCAB, (ROWS, PROMPT + NEW), generator=g)

    def train():
        logits = model(input_ids=seqs[:, :-1]).logits
        logp = torch.log_softmax(logits, -1).gather(-1, seqs[:, 1:].unsqueeze(-1)).squeeze(-1)
        (-logp.mean()).backward()
        model.zero_grad(set_to_none=True)

    report("train_fwd_bwd", timed(train, 10))

    # The same step with the model under torch.compile (inductor; the warm-up call compiles). Skipped with a message
    # where inductor cannot build its CPU kernels.
    compiled = torch.compile(model)

    def train_compiled():
        logits = compiled(input_ids=seqs[:, :-1]).logits
        logp = torch.log_softmax(logits, -1).gather(-1, seqs[:, 1:].unsqueeze(-1)).squeeze(-1)
        (-logp.mean()).backward()
        model.zero_grad(set_to_none=True)

    try:
        report("train_fwd_bwd_compiled", timed(train_compiled, 10))
    except Exception as e:  # noqa: BLE001 - any compiler failure means the row is skipped
        print(json.dumps({"name": "train_fwd_bwd_compiled", "skipped": f"{type(e).__name__}: {e}"[:300]}), flush=True)

    b, t = 512, 4096
    logp = torch.randn(b, t, generator=g) * 0.1 - 1.0
    old = logp + torch.randn(b, t, generator=g) * 0.05
    adv = torch.randn(b, 1, generator=g)
    mask = torch.rand(b, t, generator=g) < 0.8

    def loss():
        x = logp.clone().requires_grad_(True)
        ratio = torch.exp(x - old)
        pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - 0.2, 1 + 0.28))
        ((pg * mask).sum() / mask.sum()).backward()

    def baseline():
        x = logp.clone().requires_grad_(True)
        torch.exp(x - old).sum().backward()

    report("policy_loss_fwd_bwd", timed(loss, 10))
    report("baseline_exp_sum_fwd_bwd", timed(baseline, 10))

    logits = torch.randn(512, 151_936, generator=g) * 3.0
    targets = torch.randint(0, 151_936, (512,), generator=g)

    def entropy():
        with torch.no_grad():
            pd = torch.softmax(logits, -1)
            h = torch.logsumexp(logits, -1) - (pd * logits).sum(-1)
            lp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1))
            return h.sum() + lp.sum()

    report("entropy_verl_fwd", timed(entropy, 5))


if __name__ == "__main__":
    main()
