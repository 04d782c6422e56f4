"""Check qwen.py against transformers' Qwen2ForCausalLM on a real checkpoint (needs transformers).

Greedy continuations from our command line (`python qwen.py`) and from transformers' generate,
and the float32 logits of both on the same prompts.

DIR: a checkpoint folder (e.g. SmolLM2-135M-Instruct in the Qwen2 layout).

    python bench/parity.py --model DIR --max-new-tokens 64
"""
import argparse
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import qwen  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,",
           "Photosynthesis is the process by which", "1, 1, 2, 3, 5, 8,"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per continuation")
    args = p.parse_args()
    qwen.set_attention_backends()
    from transformers import Qwen2ForCausalLM
    ref = Qwen2ForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ours = qwen.load_model(args.model)
    tok = qwen.load_tokenizer(args.model)
    qwen_py = os.path.join(os.path.dirname(__file__), "..", "qwen.py")
    worst, same = 0.0, 0
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=False).ids])
        with torch.no_grad():
            worst = max(worst, (ours(ids) - ref(ids).logits).abs().max().item())
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                           do_sample=False, eos_token_id=sorted(qwen.stop_ids(ours.cfg, tok)))[0, ids.shape[1]:]
        theirs = tok.decode(out.tolist(), skip_special_tokens=False)
        cli = subprocess.run([sys.executable, qwen_py, "--model", args.model, "--prompt", prompt,
                              "--max-new-tokens", str(args.max_new_tokens), "--device", "cpu"],
                             capture_output=True, text=True, check=True).stdout.removesuffix("\n")
        same += cli == theirs
        print(f"{'same' if cli == theirs else 'DIFFERENT'} ({len(out)} tokens): {prompt!r} -> {cli[:60]!r}...")
    print(f"{same}/{len(PROMPTS)} greedy continuations identical; max |logit diff| float32 = {worst:.2e}")
    sys.exit(0 if same == len(PROMPTS) and worst <= 1e-3 else 1)


if __name__ == "__main__":
    main()
