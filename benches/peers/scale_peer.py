#!/usr/bin/env python3
"""The PyTorch peer of `crates/forkrl-trainer/examples/scale.rs`: the same Qwen2.5-0.5B-shaped checkpoint (the one the
Rust `prepare` phase wrote), the same shapes, in PyTorch eager with transformers' `Qwen2ForCausalLM`.

One phase per process, so that each reports its own peak resident memory (`ru_maxrss`):

    scale_peer.py load DIR     from_pretrained(DIR) in f32
    scale_peer.py sample DIR   model.generate: 8 rows x 128 new tokens from 32-token prompts, KV cache, T = 1
    scale_peer.py grpo DIR     one GRPO step of 8 prompts x 4 responses x 256 tokens: the rollout policy's log-probs
                               without a graph (micro-batches of 4 rows), then forward + backward per micro-batch of 4
                               rows with verl's entropy / log-prob formulas on full logits, the 80/20 top-20 % entropy
                               mask, the PPO-clip loss (clip 0.2 / 0.28, token-mean), gradient clipping at 1, AdamW

Each prints one JSON line like the Rust phases. Threads: `torch.set_num_threads(os.cpu_count())`, as many as the Rust
side may use. `cargo xtask bench --scale` runs it with the interpreter named by `FORKRL_PEER_PYTHON` (default
`python3`) when that has torch and transformers, and skips it with a message otherwise.
"""

import json
import os
import resource
import sys
import time

import torch
from transformers import AutoModelForCausalLM

SAMPLE_ROWS, PROMPT, NEW_TOKENS = 8, 32, 128
PROMPTS, GROUP, RESPONSE, MICRO = 8, 4, 256, 4


def ids(n, seed, vocab):
    """The xorshift ids of scale.rs (same seeds, same values)."""
    mask = (1 << 64) - 1
    x = ((seed * 0x9E3779B97F4A7C15) & mask) | 1
    out = []
    for _ in range(n):
        x ^= (x << 13) & mask
        x ^= x >> 7
        x ^= (x << 17) & mask
        out.append(2 + x % (vocab - 2))
    return out


def report(phase, seconds, **extra):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    line = {"phase": phase, "seconds": round(seconds, 3), "peak_rss_mib": round(peak)}
    line.update({k: round(v, 3) for k, v in extra.items()})
    print(json.dumps(line))


def entropy_and_logprob(logits, targets):
    """verl's `entropy_from_logits` and `logprobs_from_logits` (log_softmax + gather)."""
    pd = torch.softmax(logits, dim=-1)
    entropy = torch.logsumexp(logits, dim=-1) - torch.sum(pd * logits, dim=-1)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return entropy, logp


def main():
    phase, path = sys.argv[1], sys.argv[2]
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    if phase == "load":
        start = time.time()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
        report("load", time.time() - start)
        return
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    vocab = model.config.vocab_size
    if phase == "sample":
        model.eval()
        prompts = torch.tensor([ids(PROMPT, r + 1, vocab) for r in range(SAMPLE_ROWS)])
        start = time.time()
        with torch.no_grad():
            out = model.generate(
                input_ids=prompts,
                attention_mask=torch.ones_like(prompts),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                pad_token_id=0,
            )
        seconds = time.time() - start
        tokens = (out.shape[1] - PROMPT) * SAMPLE_ROWS
        report("sample", seconds, tokens_per_s=tokens / seconds)
        return
    if phase == "grpo":
        eos = model.config.eos_token_id
        rows = []
        for r in range(PROMPTS * GROUP):
            rows.append(ids(PROMPT, r // GROUP + 1, vocab) + ids(RESPONSE - 1, 1000 + r, vocab) + [eos])
        seqs = torch.tensor(rows)
        inputs, targets = seqs[:, :-1], seqs[:, 1:]
        width = targets.shape[1]
        resp_mask = torch.zeros_like(targets, dtype=torch.bool)
        resp_mask[:, PROMPT - 1:] = True
        rewards = torch.tensor([1.0 if r % 2 == 0 else 0.0 for r in range(PROMPTS * GROUP)]).view(PROMPTS, GROUP)
        adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)).view(-1)
        optim = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01)
        start = time.time()
        model.eval()
        with torch.no_grad():
            old = torch.cat([
                entropy_and_logprob(model(input_ids=inputs[i:i + MICRO]).logits.float(), targets[i:i + MICRO])[1]
                for i in range(0, len(rows), MICRO)
            ])
        score = time.time() - start
        model.train()
        # Global token-mean denominator of the mini-batch (every row is one mini-batch here).
        n_tokens = None
        optim.zero_grad(set_to_none=True)
        for i in range(0, len(rows), MICRO):
            logits = model(input_ids=inputs[i:i + MICRO]).logits.float()
            entropy, logp = entropy_and_logprob(logits, targets[i:i + MICRO])
            mask = resp_mask[i:i + MICRO]
            # The 80/20 mask: the top 20 % response-token entropies of the micro-batch.
            h = entropy.detach()[mask]
            k = max(1, int(h.numel() * 0.2 + 0.9999))
            threshold = torch.topk(h, k).values.min()
            forking = mask & (entropy.detach() >= threshold)
            if n_tokens is None:
                n_tokens = forking.sum().item() * (len(rows) // MICRO)
            ratio = torch.exp(logp - old[i:i + MICRO])
            a = adv[i:i + MICRO].unsqueeze(1)
            pg = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - 0.2, 1 + 0.28))
            loss = (pg * forking).sum() / max(n_tokens, 1)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        seconds = time.time() - start
        report("grpo", seconds, score_seconds=score, response_tokens_per_s=PROMPTS * GROUP * RESPONSE / seconds)
        return
    raise SystemExit(f"unknown phase {phase!r}: load, sample or grpo")


if __name__ == "__main__":
    main()
