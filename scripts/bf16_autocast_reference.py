"""How far PyTorch's own bf16 mixed precision lands from the f32 reference logits of the committed fixtures.

The scale for `hf_parity.rs::bf16_mixed_precision_logits_stay_within_tolerance_of_transformers`: run with a Python that
has torch, transformers and safetensors, from the repository root:

    python scripts/bf16_autocast_reference.py
"""

import torch
import transformers
from safetensors.torch import load_file

MODELS = ["qwen2-tied", "qwen2-untied", "qwen3", "llama", "llama3-rope", "qwen2-yarn"]

for name in MODELS:
    d = f"crates/forkrl-trainer/tests/fixtures/hf/{name}"
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ref = load_file(f"{d}/reference.safetensors")
    ids, want = ref["input_ids"], ref["logits"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(ids).logits.float()
    err = got - want
    print(f"{name}: autocast bf16 max |dlogit| = {err.abs().max().item():.4f}, "
          f"relative RMS {(err.norm() / want.norm()).item():.4f}")
