#!/usr/bin/env python3
"""Checks a `forkrl-train export` directory with `transformers` (by hand, offline of the tests):

    cargo run --example export_check -- /tmp/export            # or: forkrl-train export ... plus the example's JSON
    python3 -m venv /tmp/hf && /tmp/hf/bin/pip install torch transformers safetensors
    /tmp/hf/bin/python scripts/check_hf_export.py /tmp/export

It loads the directory with `AutoModelForCausalLM` and `AutoTokenizer`, compares the full-sequence logits of the text
in `forkrl_logits.json` with forkrl's (max |diff|, must stay below 1e-4 in f32), checks that the tokenizer gives the
same ids and decodes them back, and greedily continues the text. Exit status 1 on a mismatch.
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> int:
    path = sys.argv[1]
    ours = json.load(open(f"{path}/forkrl_logits.json"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(ours["text"], add_special_tokens=True)["input_ids"]
    ok = True
    if ids != ours["input_ids"]:
        print(f"tokenizer: transformers {ids} vs forkrl {ours['input_ids']}")
        ok = False
    decoded = tok.decode(ours["input_ids"])
    if decoded != ours["text"]:
        print(f"decode: {decoded!r} vs {ours['text']!r}")
        ok = False
    with torch.no_grad():
        logits = model(torch.tensor([ours["input_ids"]])).logits[0].float()
    theirs = torch.tensor(ours["logits"]).reshape(ours["shape"])[0]
    diff = (logits - theirs).abs().max().item()
    print(f"{type(model).__name__}: max |logit diff| = {diff:.3e} over {tuple(logits.shape)}")
    ok &= diff < 1e-4
    out = model.generate(torch.tensor([ours["input_ids"]]), max_new_tokens=8, do_sample=False)
    print("greedy continuation:", repr(tok.decode(out[0][len(ours["input_ids"]):])))
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
