"""Train LayerRoute (LoRA + routers) on a frozen Qwen2: the paper's setup by default (model, data, LoRA
targets, schedule), except that routers learn from measured costs (--gate-grad ste is the paper's gradient)
and LoRA has rank 32 (--lora-rank 8 is the paper's).

    python train.py --steps 3000                          # Qwen2.5-0.5B-Instruct, the four datasets
    python train.py --model DIR --data-dir ../shared/data --device cpu --steps 300 --max-len 256
    python train.py --random-init ../shared/configs/qwen2.5-0.5b-instruct.json --steps 300  # timing only

Writes OUT/log.jsonl (one line per logged step), OUT/adapters.safetensors (trainable tensors only),
OUT/run.json (every setting, so eval.py needs nothing else) and OUT/optimizer.safetensors (for
--resume), all atomically, every --save-every steps and at the end. Resuming continues the same
learning-rate schedule, data order and dropout masks: the result equals an uninterrupted run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import layerroute as lr
import qwen


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train LayerRoute: LoRA + per-block routers on a frozen Qwen2.")
    p.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct", help="hub id or checkpoint folder")
    p.add_argument("--random-init", metavar="CONFIG.json", help="random weights of this config's exact shapes "
                   "and synthetic batches (timing with no download)")
    p.add_argument("--data-dir", help="read local data files instead of downloading the four sources")
    p.add_argument("--out", default="runs/layerroute", help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last save")
    p.add_argument("--seed", type=int, default=0, help="seed for init, data order and dropout")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], help="compute dtype (default: bfloat16 "
                   "autocast on CUDA, float32 on CPU)")
    p.add_argument("--steps", type=int, default=3000, help="optimiser steps (0: build, print counts, exit)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimiser step")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate of LoRA")
    p.add_argument("--router-lr-mult", type=float, help="router learning rate = lr x this (default: 30 with "
                   "ste, where at 10 the unit-length router closed no gate in 300 steps; 300 with measured, "
                   "where a router is updated only on the micro-batches that flip its block)")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps before the cosine decay")
    p.add_argument("--max-len", type=int, default=512, help="tokens per sequence (oldest prompt tokens cut)")
    p.add_argument("--gate-grad", choices=["ste", "measured"], default="measured", help="measured (default): "
                   "each micro-batch reruns --flips blocks with their gate flipped, and those routers learn from "
                   "the measured loss difference against --price; ste: the paper's straight-through gradient with "
                   "the regulariser lambda * mean(sigmoid) (README: 'How the defaults were chosen')")
    p.add_argument("--flips", type=int, help="measured: blocks flipped per micro-batch (each costs a forward "
                   "pass from that block on, without gradient); default: enough to measure each router about 60 "
                   "times in the run, at least 2 (6 on 30 layers x 300 micro-batches, 2 at the paper's scale)")
    p.add_argument("--price", type=float, default=0.02, help="measured: skip a block where skipping it costs "
                   "less than this many nats per target token (0.02 with --lora-targets all: README, 'The defaults')")
    p.add_argument("--gate-lambda", type=float, default=1.0, help="ste: weight of the gate regulariser mean(sigmoid)")
    p.add_argument("--skip-target", type=float, help="a share of blocks to skip over training (e.g. 0.25): "
                   "lambda (ste) or the price (measured) then follows dual ascent, the same for every step type, "
                   "so the LM loss alone decides which inputs skip; unset = fixed --gate-lambda / --price")
    p.add_argument("--lambda-rate", type=float, default=0.2, help="dual-ascent rate: per step, lambda (or price) *= "
                   "exp(rate * (skip target - skipped share))")
    p.add_argument("--router-bias", type=float, help="initial router bias of every layer; weights start at 0, "
                   "so every gate is open at step 0 (default: 1.0 with ste, sigmoid 0.73; 0.3 with measured, "
                   "sigmoid 0.57, near the threshold, as measured costs cannot misprice a block it closes)")
    p.add_argument("--router-init", choices=["neutral", "band"], default="neutral", help="neutral: every "
                   "layer starts at --router-bias; band: the reference code's start, the middle third closed")
    p.add_argument("--pooling", choices=["prompt", "reference"], default="prompt", help="router input: "
                   "input_layernorm(h) over the prompt's real tokens (ours), or the reference code's raw h "
                   "over the whole sequence padded to --max-len (for comparison only)")
    p.add_argument("--tool-fraction", type=float, default=0.5, help="share of tool_call steps in the training "
                   "mix, planning and replies the rest (the paper was about half); <0: the natural mix")
    p.add_argument("--lora-rank", type=int, default=32, help="LoRA rank (the paper's is 8; at 32 the routers "
                   "closed more tool-call blocks in every seed measured: README, 'The defaults, per seed')")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha, scale = alpha / rank (default: 2 x rank, the "
                   "paper's scale of 16 / 8)")
    p.add_argument("--lora-targets", choices=sorted(lr.LORA_TARGETS), default="all", help="all (default): "
                   "q/k/v/o and the MLP's gate/up/down, so the open blocks can take over a closed one's work "
                   "(cheaper skips at 0.79x the training speed: README, 'The defaults, per seed'); attn: q/k/v/o, "
                   "the paper's")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    p.add_argument("--save-every", type=int, default=250, help="steps between checkpoints")
    args = p.parse_args(argv)
    lr_mult, bias = {"ste": (30.0, 1.0), "measured": (300.0, 0.3)}[args.gate_grad]
    args.router_lr_mult = lr_mult if args.router_lr_mult is None else args.router_lr_mult
    args.router_bias = bias if args.router_bias is None else args.router_bias
    # alpha follows the rank, so --lora-rank alone never changes the adapter's scale
    args.lora_alpha = 2.0 * args.lora_rank if args.lora_alpha is None else args.lora_alpha
    # run.json must locate everything from any working directory: make local paths absolute.
    for k in ("model", "random_init", "data_dir", "out"):
        v = getattr(args, k)
        if v and os.path.exists(v):
            setattr(args, k, os.path.abspath(v))
    return args


def build(args: argparse.Namespace):
    """The wrapped model and the compute dtype. The frozen backbone is stored in the compute dtype;
    LoRA and routers stay float32 (bf16 autocast on CUDA does the mixed precision)."""
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    torch.manual_seed(args.seed)
    if args.random_init:
        base = qwen.random_model(qwen.QwenConfig.from_json(args.random_init), args.device, dtype, args.seed)
    else:
        base = qwen.load_model(args.model, args.device, dtype)
    L = base.cfg.num_hidden_layers
    bias = args.router_bias if args.router_init == "neutral" else \
        [-args.router_bias if L // 3 <= i < 2 * L // 3 else args.router_bias for i in range(L)]
    model = lr.LayerRoute(base, args.lora_rank, args.lora_alpha, args.lora_dropout, bias, args.pooling,
                          args.lora_targets)
    return model.to(args.device), dtype


def training_batches(args, model, start: int):
    """An endless, deterministic stream of micro-batches, beginning at micro-batch `start`."""
    import data
    if args.random_init:  # synthetic: full-length rows, half prompt, half target
        return synthetic_batches(args, model.base.cfg.vocab_size, start)
    tok = qwen.load_tokenizer(args.model)
    steps, summary = data.load_steps(args.data_dir)
    train = [s for s in steps if s.split == "train"]
    print(f"data: {len(train)} training steps, " + ", ".join(f"{k} {v}" for k, v in summary["steps"].items()),
          file=sys.stderr)
    encoded = data.encode_all(train, tok)
    pad = data.pad_id(tok)
    frac = None if args.tool_fraction < 0 else args.tool_fraction
    pad_to = args.max_len if args.pooling == "reference" else None
    return data.batches(encoded, args.batch_size, args.max_len, pad, args.seed, frac, start=start, pad_to=pad_to)


def synthetic_batches(args, vocab: int, start: int):
    import data
    g = torch.Generator().manual_seed(args.seed)
    kinds = ["tool_call", "planning"]
    i = 0
    while True:
        ids = torch.randint(0, vocab, (args.batch_size, args.max_len), generator=g).tolist()
        if i >= start:
            half = args.max_len // 2
            yield data.collate([(r[:half], r[half:]) for r in ids],
                               [kinds[(i + b) % 2] for b in range(args.batch_size)], 0)
        i += 1


def lr_at(step: int, args) -> float:
    """Linear warm-up to 1, then cosine to 0 over the remaining steps (a multiplier of --lr)."""
    if step < args.warmup:
        return (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: lr.LayerRoute, args) -> torch.optim.AdamW:
    named = model.trainable()
    groups = [{"params": [p for n, p in named.items() if "lora_" in n], "lr": args.lr},
              {"params": [p for n, p in named.items() if n.startswith("routers.")], "lr": args.lr * args.router_lr_mult}]
    for g in groups:
        g["base_lr"] = g["lr"]
    fused = args.device.startswith("cuda")
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=0.0, fused=fused)


def save(model, opt, args, step: int, counts: dict, lam: float):
    """adapters + run.json (lr.save_adapters) and the optimiser moments for --resume."""
    names = {id(p): n for n, p in model.trainable().items()}
    moments = {}
    for p, st in opt.state.items():
        for k in ("exp_avg", "exp_avg_sq"):
            moments[f"{names[id(p)]}.{k}"] = st[k].detach().cpu().contiguous()
        moments[f"{names[id(p)]}.step"] = st["step"].detach().float().cpu().reshape(1)
    lr.atomic_write(os.path.join(args.out, "optimizer.safetensors"), lambda tmp: save_file(moments, tmp))
    settings = {**vars(args), "step": step, "counts": counts, "lora": model.settings, "lambda_now": lam}
    lr.save_adapters(model, args.out, settings)


def restore(model, opt, args) -> tuple[int, float]:
    """Load adapters and optimiser moments from args.out; return the step to continue from and lambda."""
    with open(os.path.join(args.out, "run.json")) as f:
        saved = json.load(f)
    for k in ("steps", "seed", "batch_size", "grad_accum", "lr", "max_len", "model", "random_init", "skip_target",
              "gate_grad"):
        if saved.get(k) != getattr(args, k):
            raise ValueError(f"--resume: {k}={getattr(args, k)!r} but the run in {args.out} used {saved.get(k)!r}")
    lr.load_adapters(model, os.path.join(args.out, "adapters.safetensors"))
    moments = load_file(os.path.join(args.out, "optimizer.safetensors"))
    for n, p in model.trainable().items():
        if f"{n}.exp_avg" in moments:
            opt.state[p] = {"step": moments[f"{n}.step"].reshape(()),
                            "exp_avg": moments[f"{n}.exp_avg"].to(p.device),
                            "exp_avg_sq": moments[f"{n}.exp_avg_sq"].to(p.device)}
    return saved["step"], saved["lambda_now"]


def default_flips(layers: int, micro_batches: int, measurements: int = 60) -> int:
    """Blocks to flip per micro-batch so that each router is measured about `measurements` times over the
    run. Two measured each router ~20 times in 300 steps, too few to settle (README: "How the defaults were
    chosen"); at the paper's 3,000 x 4 micro-batches two already measure each ~1,000 times."""
    return min(layers, max(2, math.ceil(measurements * layers / micro_batches)))


def measured_router_loss(model, token_loss, at, targets, price: float, flips: int, g: torch.Generator, autocast):
    """Flip `flips` blocks (a fresh draw each micro-batch), measure what closing each costs every row,
    and return the routers' classification loss against the price and the costs (B, flips)."""
    blocks = torch.randperm(len(model.routers), generator=g)[:flips].tolist()
    now = lr.row_means(token_loss, at)  # (B,) mean nats/token under the gates actually used
    loss, costs = 0.0, []
    for k in blocks:
        with autocast:  # the rerun in the training pass's precision; the loss below stays float32
            flipped = model.flip_losses(k, at, targets)
        open_now = model.last_gates[:, k] > 0
        # closed minus open, per row. The rerun draws fresh LoRA dropout in blocks k..: on seed 0's trained
        # run two draws differ by 0.002 nats/token on average (max 0.01), a tenth of the 0.02 price.
        cost = torch.where(open_now, flipped - now, now - flipped)
        loss = loss + lr.measured_gate_loss(model.last_scores[:, k], cost, price)
        costs.append(cost)
    return loss, torch.stack(costs, 1)


def train(args: argparse.Namespace, stop_at: int | None = None) -> lr.LayerRoute:
    """The training loop. stop_at ends early after that step, as an interruption would (tests)."""
    model, dtype = build(args)
    counts = model.counts()
    print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()) +
          f" ({100 * counts['trainable'] / counts['backbone']:.2f}% trainable)", file=sys.stderr)
    if args.steps == 0:
        return model
    os.makedirs(args.out, exist_ok=True)
    opt = make_optimizer(model, args)
    measured = args.gate_grad == "measured"
    if measured:
        if args.flips is None:
            args.flips = default_flips(len(model.routers), args.steps * args.grad_accum)
        print(f"measured costs: {args.flips} blocks flipped per micro-batch, each router measured about "
              f"{args.flips * args.steps * args.grad_accum / len(model.routers):,.0f} times", file=sys.stderr)
    model.straight_through = not measured
    model.block_inputs = [] if measured else None
    # lam: the regulariser's weight (ste) or the price of a kept block in nats/token (measured)
    step, lam = restore(model, opt, args) if args.resume else (0, args.price if measured else args.gate_lambda)
    batches = training_batches(args, model, start=step * args.grad_accum)
    autocast = torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)
    log = open(os.path.join(args.out, "log.jsonl"), "a")
    model.train()
    t_last, tokens, skips, costs = time.time(), 0, {}, {}
    while step < args.steps:
        torch.manual_seed(args.seed * 1_000_003 + step)  # dropout masks depend on the step alone
        flip_rng = torch.Generator().manual_seed(args.seed * 1_000_003 + step)  # so do the flipped blocks
        micro = [next(batches) for _ in range(args.grad_accum)]
        n_target = sum(b.n_target for b in micro)  # the loss is per target token of the whole step
        lm_sum = gate_sum = 0.0
        closed_now = []  # per row of this step: share of its blocks skipped
        for b in micro:
            ids, labels = b.ids.to(args.device), b.labels.to(args.device)
            # labels[t] is the token that position t-1 predicts; prompt and padding are -100.
            # The head and the loss run only where the next token is a target.
            at = F.pad(labels[:, 1:] != -100, (0, 1))
            with autocast:
                logits = model(ids, b.prompt_lens.to(args.device), logits_at=at)
            targets = labels[:, 1:][at[:, :-1]]
            token_loss = F.cross_entropy(logits.float(), targets, reduction="none")
            lm = token_loss.sum() / n_target
            if measured:
                gate, cost = measured_router_loss(model, token_loss.detach(), at, targets, lam, args.flips, flip_rng,
                                                  autocast)
                gate = gate / args.grad_accum
                for kind, c in zip(b.kinds, (cost < lam).float().tolist()):
                    costs.setdefault(kind, []).extend(c)
            else:
                gate = lam * lr.gate_loss(model.last_scores) / args.grad_accum
            (lm + gate).backward()
            lm_sum, gate_sum = lm_sum + lm.item(), gate_sum + gate.item()
            tokens += int(b.ids.numel())
            closed_now += (1 - model.last_gates).mean(1).tolist()
            for kind, closed in zip(b.kinds, closed_now[-len(b.kinds):]):
                skips.setdefault(kind, []).append(closed)
        torch.nn.utils.clip_grad_norm_(list(model.trainable().values()), args.clip)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_at(step, args)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.skip_target is not None:  # dual ascent: more pressure while too few blocks close
            lam = min(1e4, lam * math.exp(args.lambda_rate * (args.skip_target - sum(closed_now) / len(closed_now))))
        step += 1
        if step % args.log_every == 0 or step == args.steps:
            dt, t_last = time.time() - t_last, time.time()
            rec = {"step": step, "loss": lm_sum, "gate_loss": gate_sum, "lambda": lam, "lr": opt.param_groups[0]["lr"],
                   "tok_per_s": tokens / dt, **{f"skip_{k}": 100 * sum(v) / len(v) for k, v in sorted(skips.items())},
                   **{f"cheap_{k}": 100 * sum(v) / len(v) for k, v in sorted(costs.items())}}
            eta = (args.steps - step) * dt / args.log_every
            cheap = " | flips cheaper than the price % " + " ".join(
                f"{k} {rec['cheap_' + k]:.0f}" for k in sorted(costs)) if costs else ""
            print(f"step {step}/{args.steps} | lm {lm_sum:.4f} | gate {gate_sum:.4f} | skip % " +
                  " ".join(f"{k} {rec['skip_' + k]:.1f}" for k in sorted(skips)) + cheap +
                  f" | {rec['tok_per_s']:,.0f} tok/s | eta {eta / 60:.1f} min", file=sys.stderr, flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            tokens, skips, costs = 0, {}, {}
        if step % args.save_every == 0 or step == args.steps:
            save(model, opt, args, step, counts, lam)
        if stop_at is not None and step >= stop_at:
            break
    log.close()
    return model


if __name__ == "__main__":
    train(parse_args())
