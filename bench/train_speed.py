"""Training-step throughput: our LayerRoute against transformers' Qwen2ForCausalLM + peft LoRA.

Both sides do the same work per step: forward with 30 (or 24) routed blocks, the loss of train.py
(cross-entropy on the target half + lambda * mean router score), backward, grad-norm clip, AdamW
over LoRA (q/k/v/o, r 8, alpha 16, dropout 0.05) + routers, on the same frozen checkpoint, batch,
length and dtype. The reference's routers are the same STE gates, pooled the same way (mean of
input_layernorm(h) over prompt tokens 1..prompt_len-1, unit length), wrapped around each HF decoder layer.
The two are timed interleaved in one process (k steps ours, k steps theirs, repeated), so machine
noise hits both alike; the ratio of medians is the result.

DIR: a checkpoint folder (e.g. SmolLM2-135M-Instruct in the Qwen2 layout).

    python bench/train_speed.py --model DIR --repeats 5
    python bench/train_speed.py --model DIR --profile     # where one step of ours spends its time
    python bench/train_speed.py --random-init configs/qwen2.5-0.5b-instruct.json \
        --device cuda --dtype bfloat16 --batch-size 4 --seq-len 512 --ours-only --steps 20 --repeats 10
"""
import argparse
import inspect
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import layerroute as lr  # noqa: E402
import qwen  # noqa: E402


class RoutedLayer(nn.Module):
    """An HF decoder layer behind a straight-through gate: h + g * (layer(h) - h)."""

    def __init__(self, layer: nn.Module, d: int, state: dict, bias: float = 1.0):
        super().__init__()
        self.layer, self.state = layer, state  # state: prompt_lens in, scores out (shared by layers)
        self.router = nn.Linear(d, 1, device=layer.input_layernorm.weight.device)
        nn.init.zeros_(self.router.weight)
        nn.init.constant_(self.router.bias, bias)

    def forward(self, hidden_states, *args, **kwargs):
        h = hidden_states
        s = lr.router_score(self.router, self.layer.input_layernorm, h, self.state["prompt_lens"])  # as ours
        g = (s > 0.5).float() + (s - s.detach())  # value: hard gate; gradient: sigmoid's
        self.state["scores"].append(s)
        return h + g.to(h.dtype)[:, None, None] * (self.layer(h, *args, **kwargs) - h)


def build_ours(args, dtype):
    if args.random_init:
        base = qwen.random_model(qwen.QwenConfig.from_json(args.random_init), args.device, dtype)
    else:
        base = qwen.load_model(args.model, args.device, dtype)
    # the paper's adapters and gate, as build_theirs gives peft
    model = lr.LayerRoute(base, rank=8, alpha=16, router_bias=1.0, targets="attn").to(args.device).train()
    model.straight_through = True
    # As train.py: where LayerRoute.forward takes logits_at, the head runs on target positions only.
    target_only = "logits_at" in inspect.signature(model.forward).parameters

    def forward(ids, labels, prompt_lens):
        if target_only:
            at = F.pad(labels[:, 1:] != -100, (0, 1))  # (B, T): positions whose next token is a target
            return model(ids, prompt_lens, logits_at=at), labels[:, 1:][at[:, :-1]], model.last_scores
        return model(ids, prompt_lens)[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), model.last_scores
    return forward, list(model.trainable().values())


def build_theirs(args, dtype, compiled: bool = False):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2ForCausalLM
    hf = Qwen2ForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa").to(args.device)
    hf = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    state = {"prompt_lens": None, "scores": []}
    layers = hf.base_model.model.model.layers
    for i in range(len(layers)):  # routers are added after peft froze the backbone: they train
        layers[i] = RoutedLayer(layers[i], hf.config.hidden_size, state)
    hf.train()
    run = torch.compile(hf) if compiled else hf  # compiled: what a transformers user can do in one line

    def forward(ids, labels, prompt_lens):
        state["prompt_lens"], state["scores"] = prompt_lens, []
        logits = run(input_ids=ids, use_cache=False).logits  # (B, T, vocab), every position
        return logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), torch.stack(state["scores"], 1)
    return forward, [p for p in hf.parameters() if p.requires_grad]


def make_step(forward, params, args, dtype, batch):
    """One optimiser step exactly as train.py does it (grad-accum 1): returns a closure."""
    ids, labels, prompt_lens = batch
    n_target = int((labels != -100).sum())
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, fused=args.device.startswith("cuda"))
    autocast = torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with autocast:
            logits, targets, scores = forward(ids, labels, prompt_lens)  # (N, vocab), (N,), (B, L)
        lm = F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum") / n_target
        (lm + 1.0 * scores.mean()).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def step_flops(cfg: qwen.QwenConfig, B: int, T: int, n_target: int) -> float:
    """Model FLOPs of one step (the MFU numerator): the forward (qwen.forward_flops at
    the causal mean context (T+1)/2 for B*T positions, the LM head at the n_target scored positions),
    plus a backward of activation gradients only (the frozen weights get none): the same matmul
    FLOPs again, and twice the attention (dQ, dK, dV). LoRA and routers (<1%) are left out."""
    weights, head = qwen.forward_flops(cfg, 0)  # per token: the block's matmuls; the head
    attn = qwen.forward_flops(cfg, (T + 1) / 2)[0] - weights
    L = cfg.num_hidden_layers
    return B * T * L * (weights + attn) + n_target * head + B * T * L * (weights + 2 * attn) + n_target * head


def timed(step, n: int, device: str) -> float:
    """Seconds for n steps (synchronising the GPU at both ends)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    return time.perf_counter() - t


def profile(step, args):
    """Top ops by self CPU time over one step of ours, after one warm-up step."""
    from torch.profiler import ProfilerActivity, profile as prof
    step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with prof(activities=acts) as p:
        step()
    key = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    print(p.key_averages().table(sort_by=key, row_limit=args.profile_rows, max_name_column_width=40))


def main():
    p = argparse.ArgumentParser(description="Training-step tokens/s: LayerRoute vs transformers + peft.")
    p.add_argument("--model", help="checkpoint folder (e.g. SmolLM2-135M-Instruct in the Qwen2 layout)")
    p.add_argument("--random-init", metavar="CONFIG.json", help="random weights of this config (ours only)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (first half prompt, second target)")
    p.add_argument("--steps", type=int, default=2, help="steps timed per side in each repeat")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side first")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="backbone / autocast dtype")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (on a shared CPU, more threads than "
                   "free cores makes every op spin-wait, so next to another job 1 thread runs faster: "
                   'results/README.md, "Notes behind the code")')
    p.add_argument("--ours-only", action="store_true", help="time only ours (e.g. on a GPU, with --random-init)")
    p.add_argument("--peak-tflops", type=float, help="peak of the device in the run's dtype, for MFU "
                   "(H100 SXM bf16 dense: 989; A100: 312)")
    p.add_argument("--profile", action="store_true", help="print a profile of one step of ours and exit")
    p.add_argument("--profile-rows", type=int, default=15, help="rows of the profile table")
    args = p.parse_args()
    qwen.set_attention_backends()
    if not (args.model or args.random_init):
        p.error("give --model or --random-init")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    B, T = args.batch_size, args.seq_len

    torch.manual_seed(0)  # the same synthetic batch for both: random ids, half prompt, half target
    fwd, params = build_ours(args, dtype)
    cfg = qwen.QwenConfig.from_json(args.random_init or os.path.join(args.model, "config.json"))
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(0)).to(args.device)
    labels = ids.clone()
    labels[:, :T // 2] = -100
    batch = (ids, labels, torch.full((B,), T // 2, device=args.device))
    sides = {"ours": make_step(fwd, params, args, dtype, batch)}
    if args.profile:
        return profile(sides["ours"], args)
    if not args.ours_only:
        sides["theirs"] = make_step(*build_theirs(args, dtype), args, dtype, batch)
    print(f"batch {B} x {T} tokens, {args.dtype}, {args.device}, {torch.get_num_threads()} threads, "
          f"{args.steps} steps x {args.repeats} repeats per side", flush=True)
    for step in sides.values():
        timed(step, args.warmup, args.device)
    rates = {k: [] for k in sides}
    for r in range(args.repeats):  # interleaved; the order alternates so neither always goes first
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            rates[name].append(args.steps * B * T / timed(sides[name], args.steps, args.device))
        print(f"repeat {r}: " + ", ".join(f"{k} {v[-1]:,.0f} tok/s" for k, v in rates.items()), flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print("median: " + ", ".join(f"{k} {v:,.0f} tok/s" for k, v in med.items()))
    if args.peak_tflops:
        flops = step_flops(cfg, B, T, int((labels != -100).sum()))
        print(f"ours: {flops / 1e9:,.0f} GFLOP per step (model FLOPs), {flops * med['ours'] / (B * T) / 1e12:.2f} "
              f"TFLOP/s, MFU {100 * flops * med['ours'] / (B * T) / (1e12 * args.peak_tflops):.1f}% "
              f"of {args.peak_tflops:g} TFLOP/s")
    if "theirs" in med:
        ratios = [a / b for a, b in zip(rates["ours"], rates["theirs"])]
        print(f"ours / theirs: {med['ours'] / med['theirs']:.3f} (ratio of medians); "
              f"per repeat {min(ratios):.3f}..{max(ratios):.3f}, median {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
