"""Train LayerRoute (LoRA + routers) on a frozen Qwen2. --recipe picks a set of defaults: layerroute (ours:
routers taught by measured costs, LoRA rank 32 on attention and MLP), paper (the method as the paper
describes it: straight-through gates, LoRA rank 8 on q/k/v/o) or reference (the authors' code); any flag
overrides its part, and `--help` shows every default.

    python train.py --steps 3000                                   # Qwen2.5-0.5B-Instruct, the four datasets
    python train.py --recipe paper --steps 3000
    python train.py --device cpu --steps 300 --max-len 256 --batch-size 4 --out runs/cpu   # a CPU run
    python train.py --random-init configs/qwen2.5-0.5b-instruct.json --steps 300  # timing, no download
    torchrun --nproc-per-node 4 train.py --steps 3000                 # data-parallel on 4 GPUs

Writes OUT/log.jsonl (one line per logged step) and, every --save-every steps and at the end, a
checkpoint OUT/checkpoint-STEP/ as one unit (written aside, then renamed into place; the newest two
kept): adapters.safetensors (trainable tensors only), run.json (every setting, so eval.py needs nothing
else) and optimizer.safetensors. A run already in OUT is never touched unless --resume continues it
(every setting that changes the result must match) or --overwrite replaces it. Resuming continues the
same learning-rate schedule, data order and dropout masks: the result equals an uninterrupted run.

Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK in the environment) each process trains data-parallel, NCCL
on CUDA (cuda:LOCAL_RANK) and gloo on CPU: every micro-batch is drawn as one process draws it, rank r
computes its rows r, r + N, ..., and the gradients are summed, so a step equals the one-process step to
round-off (the LoRA dropout masks aside: they are drawn per process). Rank 0 alone prints, logs and saves.
A rank that fails reports it and leaves; torchrun then stops the others, and a rank that stops answering
fails the others' next collective after $LAYERROUTE_DIST_TIMEOUT seconds (default 600).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import errno
import json
import math
import os
import shutil
import sys
import time
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import layerroute as lr
import qwen


# A recipe is a coherent set of defaults; every flag still overrides its part, and run.json records both.
RECIPES = {
    # ours: routers taught by measured costs, LoRA rank 32 on attention and MLP (why: results/README.md,
    # "The defaults in short")
    "layerroute": dict(gate_grad="measured", lora_rank=32, lora_targets="all", pooling="prompt", router_init="neutral"),
    # the method as the paper describes it: straight-through gates, lambda * mean(sigmoid), LoRA r 8 on q/k/v/o
    "paper": dict(gate_grad="ste", lora_rank=8, lora_targets="attn", pooling="prompt", router_init="neutral"),
    # the authors' code: the raw stream pooled over the whole padded sequence, the middle third closed at step 0
    "reference": dict(gate_grad="ste", lora_rank=8, lora_targets="attn", pooling="reference", router_init="band"),
}
# What follows from the gate's gradient: a straight-through router gets a gradient every step, a measured
# one only on the micro-batches that flip its block, so it learns faster; measured costs start near the
# threshold, as they cannot misprice a block they close.
GATE_DEFAULTS = {"ste": dict(router_lr_mult=30.0, router_bias=1.0),
                 "measured": dict(router_lr_mult=300.0, router_bias=0.3)}
TOOL_CALL = 0  # data.KINDS.index("tool_call"), as on_device numbers the kinds
MAX_DEFAULT_FLIPS = 6  # a short trial run must not rerun every block per micro-batch


def per_recipe(key: str) -> str:
    return "default per --recipe: " + ", ".join(f"{name} {r[key]}" for name, r in RECIPES.items())


def parser() -> argparse.ArgumentParser:
    p = qwen.Parser(description="Train LayerRoute: LoRA + per-block routers on a frozen Qwen2.")
    p.add_argument("--recipe", choices=list(RECIPES), default="layerroute", help="a set of defaults: layerroute "
                   "(ours), paper (the method as the paper describes it), reference (the authors' code)")
    p.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct", help="hub id or checkpoint folder")
    p.add_argument("--random-init", metavar="CONFIG.json", help="random weights of this config's exact shapes "
                   "and synthetic batches, for timing with no download (default: none, --model's weights)")
    p.add_argument("--data-dir", help="read every data file under this folder (default: download the four sources)")
    p.add_argument("--out", default="runs/layerroute", help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out (without it, or "
                   "--resume, a run there is never touched)")
    p.add_argument("--seed", type=qwen.number(int, lo=0), default=0, help="seed for init, data order and dropout")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], help="compute dtype (default: bfloat16 "
                   "autocast on CUDA, float32 on CPU)")
    p.add_argument("--steps", type=qwen.number(int, lo=0), default=3000, help="optimiser steps (0: build, print counts, exit)")
    p.add_argument("--batch-size", type=qwen.number(int, lo=1), default=16, help="sequences per micro-batch (16 x 1: the paper's 16 "
                   "rows a step, its 4 x 4 in one pass; the loss is per target token of the step either way)")
    p.add_argument("--grad-accum", type=qwen.number(int, lo=1), default=1, help="micro-batches per optimiser step")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, help="the fixed-shape step: every block "
                   "computed for every row and kept by its gate, rows padded to --pad-multiple, no host "
                   "synchronisation inside a step (default: on with a cuda --device, off on cpu, where measured "
                   "gates then skip closed blocks' compute)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the fixed-shape "
                   "step's routed block, gated block and loss, once each (default: as --fast; needs --fast)")
    p.add_argument("--pad-multiple", type=qwen.number(int, lo=1), help="pad each micro-batch's length to a multiple of this "
                   "(default: 16 with --fast, 1 without)")
    p.add_argument("--lr", type=qwen.number(float, above=0), default=2e-4, help="peak learning rate of LoRA")
    p.add_argument("--warmup", type=qwen.number(int, lo=0), default=100, help="linear warm-up steps before the cosine decay")
    p.add_argument("--max-len", type=qwen.number(int, lo=8), default=512, help="tokens per sequence: a longer "
                   "planning or reply step loses its oldest prompt tokens, a longer tool call is dropped and counted")
    p.add_argument("--gate-grad", choices=["ste", "measured"], help="measured: each micro-batch reruns --flips "
                   "blocks with their gate flipped, and those routers learn from the measured loss difference "
                   "against --price; ste: the paper's straight-through gradient with the regulariser "
                   "--gate-lambda * mean(sigmoid) (" + per_recipe("gate_grad") + ")")
    p.add_argument("--router-lr-mult", type=qwen.number(float, above=0), help="router learning rate = --lr x this (default: "
                   + ", ".join(f"{v['router_lr_mult']:g} with {k}" for k, v in GATE_DEFAULTS.items()) + " gates)")
    p.add_argument("--flips", type=qwen.number(int, lo=1), help="measured: blocks flipped per micro-batch, each a forward pass from "
                   "that block on without gradient (default: enough to measure each router about 60 times in the "
                   f"run, at least 2 and at most {MAX_DEFAULT_FLIPS})")
    p.add_argument("--price", type=qwen.number(float), default=0.02, help="measured: skip a block where skipping it costs "
                   "less than this many nats per target token")
    p.add_argument("--cost", choices=["loss", "argmax"], default="loss", help="measured: what a flip costs a row. "
                   "loss: the change of its mean target loss, against --price; argmax: whether skipping the block "
                   "breaks a target position whose teacher-forced argmax is right (greedy decoding would then write "
                   "another token), the target's lead over the best other token falling to --margin or below")
    p.add_argument("--margin", type=qwen.number(float, lo=0), default=0.0, help="argmax cost: a lead (in logits) "
                   "that skipping may not push the target's below; 0 counts only argmaxes turned wrong")
    p.add_argument("--router-only", type=qwen.number(float, lo=0, hi=1), default=0.0, help="measured: the share of "
                   "the training tool calls' functions whose calls teach the routers only (data.router_only_step): "
                   "LoRA never fits them, and the routers learn from them and the other kinds' rows, not from "
                   "the calls LoRA fits, whose skips cost what they would not cost an unseen call")
    p.add_argument("--distill", type=qwen.number(float, lo=0, below=1), default=0.0, help="the share of each "
                   "target that is the gates-open model's next-token distribution (the same LoRA, every block on, "
                   "no gradient) instead of the data's token: the loss then also prices what a skip changes "
                   "beyond the target's probability, and so do the measured costs; the logged lm loss includes "
                   "the teacher's entropy (0: the data's tokens alone)")
    p.add_argument("--open-loss", type=qwen.number(float, lo=0), default=0.0, help="weight of a second LM loss: "
                   "the same rows through the same LoRA with every block on (no router, no block dropped), so "
                   "that LoRA also answers with every block on, as LoRA trained alone does, where the routed "
                   "pass alone lets it lean on the skips it trains with; about one more forward and backward "
                   "pass a micro-batch; the logged lm loss includes it (0: the routed pass alone)")
    p.add_argument("--gate-unit", choices=list(lr.GATE_UNITS), default="block", help="what one router gates: "
                   "block (a whole block, the paper's), or sublayer (each block's attention and MLP apart, two "
                   "routers a block: attention alone can close where the MLP is needed, and costs less)")
    p.add_argument("--block-drop", type=qwen.number(float, lo=0, below=1), default=0.0, help="training only: the "
                   "chance that a row skips a block whatever its router says (LayerSkip's layer dropout), so that "
                   "LoRA learns to do without any one block; the logged skip shares count these skips too")
    p.add_argument("--gate-lambda", type=qwen.number(float, lo=0), default=1.0, help="ste: weight of the gate regulariser mean(sigmoid)")
    p.add_argument("--skip-target", type=qwen.number(float, above=0, below=1), help="a share of blocks to skip over training (e.g. 0.25): "
                   "lambda (ste) or the price (measured) then follows dual ascent, the same for every step type, "
                   "so the LM loss alone decides which inputs skip (default: none, a fixed --gate-lambda or --price)")
    p.add_argument("--lambda-rate", type=qwen.number(float, lo=0), default=0.2, help="dual-ascent rate: per step, lambda (or price) *= "
                   "exp(rate * (skip target - skipped share))")
    p.add_argument("--router-bias", type=qwen.number(float), help="initial router bias; weights start at 0, so every input "
                   "gets sigmoid(bias) at step 0 (default: " +
                   ", ".join(f"{v['router_bias']:g} with {k}" for k, v in GATE_DEFAULTS.items()) + " gates)")
    p.add_argument("--router-init", choices=["neutral", "band"], help="neutral: every layer starts at "
                   "--router-bias; band: the reference code's start, the middle third closed ("
                   + per_recipe("router_init") + ")")
    p.add_argument("--pooling", choices=["prompt", "reference"], help="router input: input_layernorm(h) over "
                   "the prompt's real tokens (ours), or the reference code's raw h over the whole sequence padded "
                   "to --max-len (" + per_recipe("pooling") + ")")
    p.add_argument("--tool-fraction", type=qwen.number(float, hi=1), default=0.5, help="share of tool_call steps in the training "
                   "mix, planning and replies the rest (the paper's is about half); <0: the natural mix")
    p.add_argument("--lora-rank", type=qwen.number(int, lo=1), help="LoRA rank (" + per_recipe("lora_rank") + ")")
    p.add_argument("--lora-alpha", type=qwen.number(float, above=0), help="LoRA alpha, scale = alpha / rank (default: 2 x --lora-rank, "
                   "the paper's 16 / 8)")
    p.add_argument("--lora-targets", choices=sorted(lr.LORA_TARGETS), help="attn: q/k/v/o (the paper's); all: "
                   "the MLP's gate/up/down too, so the open blocks can take over a closed one's work ("
                   + per_recipe("lora_targets") + ")")
    p.add_argument("--lora-dropout", type=qwen.number(float, lo=0, below=1), default=0.05, help="dropout on the LoRA input")
    p.add_argument("--clip", type=qwen.number(float, above=0), default=1.0, help="gradient-norm clip")
    p.add_argument("--checkpoint-blocks", action="store_true", help="activation checkpointing: each block's "
                   "activations are recomputed in the backward pass instead of kept, for bigger models and "
                   "batches at about a third more compute (default: off)")
    p.add_argument("--check-syncs", action="store_true", help="CUDA: fail on any host synchronisation inside "
                   "a step from step 2 on (torch.cuda.set_sync_debug_mode); log lines and saves may wait")
    p.add_argument("--log-every", type=qwen.number(int, lo=1), default=10, help="steps between log lines")
    p.add_argument("--save-every", type=qwen.number(int, lo=1), default=250, help="steps between checkpoints")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, with every default that depends on another flag resolved (the recipe's, the gate's)."""
    p = parser()
    args = p.parse_args(argv)
    for k, v in RECIPES[args.recipe].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k, v in GATE_DEFAULTS[args.gate_grad].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.cost == "argmax" and args.gate_grad != "measured":
        p.error("--cost argmax needs --gate-grad measured: only measured gates price their flips")
    if args.router_only and args.gate_grad != "measured":
        p.error("--router-only needs --gate-grad measured: a straight-through router learns from the LM loss, "
                "which router-only rows do not have")
    if args.distill and args.cost == "argmax":
        p.error("--distill with --cost argmax: the argmax cost scores the data's tokens, not a distribution")
    if args.cost == "argmax" and args.skip_target is not None:
        p.error("--cost argmax with --skip-target: dual ascent moves the price, which the argmax cost does not use")
    args.fast = args.device.startswith("cuda") if args.fast is None else args.fast
    args.compile = args.fast if args.compile is None else args.compile
    if args.compile and not args.fast:
        p.error("--compile needs --fast: the eager step's shapes follow its gates")
    args.pad_multiple = args.pad_multiple or (16 if args.fast else 1)
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
    return wrap(base, args).to(args.device), dtype


def wrap(base: qwen.Qwen2, args: argparse.Namespace) -> lr.LayerRoute:
    """LoRA and routers around base, as the resolved flags say."""
    L = base.cfg.num_hidden_layers
    per_block = len(lr.gated_units(base, args.gate_unit)) // L  # routers a block: 1, or 2 with sublayer gates
    bias = args.router_bias if args.router_init == "neutral" else \
        [-args.router_bias if L // 3 <= i // per_block < 2 * L // 3 else args.router_bias for i in range(L * per_block)]
    model = lr.LayerRoute(base, args.lora_rank, args.lora_alpha, args.lora_dropout, bias, args.pooling,
                          args.lora_targets, args.gate_unit)
    model.straight_through = args.gate_grad == "ste"
    model.checkpoint_blocks = args.checkpoint_blocks  # read by LayerRoute's training pass
    model.block_drop = args.block_drop
    return model


def training_batches(args, model, start: int):
    """An endless, deterministic stream of micro-batches, beginning at micro-batch `start`."""
    import data
    if args.random_init:  # synthetic: full-length rows, half prompt, half target
        return synthetic_batches(args, model.base.cfg.vocab_size, start)
    tok = qwen.load_tokenizer(args.model)
    steps, summary = data.load_steps(args.data_dir)
    steps, dropped = data.fitting(steps, tok, args.max_len)
    summary["too_long"] = {"max_len": args.max_len, "dropped": dropped}
    print(data.skip_report(summary), file=sys.stderr)
    data.require_kinds(steps, ("tool_call", "planning"), "train", args.data_dir or "the downloaded data", summary)
    train = [s for s in steps if s.split == "train"]
    kinds = {k: sum(s.kind == k for s in train) for k in data.KINDS}
    print(f"data: {len(train)} training steps, " + ", ".join(f"{k} {v}" for k, v in kinds.items()), file=sys.stderr)
    only = [data.router_only_step(s, args.router_only) for s in train] if args.router_only else None
    if only is not None:
        print(f"router-only: {sum(only)} of the {kinds['tool_call']} training tool calls (--router-only "
              f"{args.router_only:g} of their functions) teach the routers alone", file=sys.stderr)
        if sum(only) in (0, kinds["tool_call"]):
            raise ValueError(f"--router-only {args.router_only:g} leaves {'no' if not sum(only) else 'every'} "
                             "training tool call to the routers alone: choose a share that splits them")
    encoded = data.encode_all(train, tok)
    pad = data.pad_id(tok)
    frac = None if args.tool_fraction < 0 else args.tool_fraction
    pad_to = args.max_len if args.pooling == "reference" else None
    return data.batches(encoded, args.batch_size, args.max_len, pad, args.seed, frac, start=start, pad_to=pad_to,
                        pad_multiple=args.pad_multiple, router_only=only)


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


# Flags that never change what a run computes, so a resume may change them; every other one must match.
RESUME_FREE = {"out", "resume", "overwrite", "device", "log_every", "save_every", "check_syncs", "checkpoint_blocks"}


def save(model, opt, args, step: int, counts: dict, lam: float, processes: int = 1):
    """One checkpoint, whole or not at all (lr.save_checkpoint): adapters, optimiser moments, run.json."""
    names = {id(p): n for n, p in model.trainable().items()}
    moments = {}
    for p, st in opt.state.items():
        for k in ("exp_avg", "exp_avg_sq"):
            moments[f"{names[id(p)]}.{k}"] = st[k].detach().cpu().contiguous()
        moments[f"{names[id(p)]}.step"] = st["step"].detach().float().cpu().reshape(1)
    adapters = {n: p.detach().float().contiguous().cpu() for n, p in model.trainable().items()}
    settings = {**vars(args), "step": step, "counts": counts, "lora": model.settings, "lambda_now": lam,
                "processes": processes}
    lr.save_checkpoint(args.out, step, {"optimizer.safetensors": lambda path: save_file(moments, path),
                                        "adapters.safetensors": lambda path: save_file(adapters, path),
                                        "run.json": lambda path: lr.write_json(path, settings)})


def prepare_out(args):
    """Make args.out ready: a run already there is continued (--resume), replaced (--overwrite) or refused."""
    held = lr.latest_checkpoint(args.out)
    old = [n for n in ("log.jsonl", "run.json", "adapters.safetensors") if os.path.exists(os.path.join(args.out, n))]
    if args.resume:
        if held is None:
            raise FileNotFoundError(f"--resume: {args.out} holds no complete checkpoint to continue from")
        return
    if held is None and not old:
        os.makedirs(args.out, exist_ok=True)
        return
    if not args.overwrite:
        what = os.path.basename(held) if held else ", ".join(old)
        raise FileExistsError(f"--out {args.out} already holds a run ({what}): --resume continues it, --overwrite "
                              "replaces it, or pass another --out")
    for name in os.listdir(args.out):  # only what train.py and eval.py write: nothing else of the user's
        path = os.path.join(args.out, name)
        if lr.CHECKPOINT.fullmatch(name) or name.startswith(".checkpoint-"):
            shutil.rmtree(path)
        elif name in ("log.jsonl", "run.json", "adapters.safetensors", "optimizer.safetensors") or \
                (name.startswith("report") and name.endswith((".json", ".png"))):
            os.remove(path)
    print(f"--overwrite: replacing the run in {args.out}", file=sys.stderr)


def restore(model, opt, args, processes: int = 1, writes: bool = True) -> tuple[int, float]:
    """Load the newest complete checkpoint of args.out; return the step to continue from and lambda. Every
    setting that changes the result must equal the run's, or the resume is refused naming it. writes: this
    process keeps the log (rank 0); every rank loads the same checkpoint."""
    folder = lr.latest_checkpoint(args.out)
    saved = qwen.read_json(os.path.join(folder, "run.json"))
    defaults = parser()  # a flag newer than the run: the run used what its default does
    changed = [f"--{k.replace('_', '-')} {v} but the run in {args.out} used {saved.get(k)}"
               for k, v in vars(args).items() if k not in RESUME_FREE and saved.get(k, defaults.get_default(k)) != v]
    if changed:  # every one named: a default resolved from another flag (--flips) may differ only through it
        raise ValueError(f"--resume: {'; '.join(changed)}: resume with the run's settings, or train afresh into "
                         "another --out")
    before = saved.get("processes", 1)
    if before != processes and args.lora_dropout > 0:  # the other settings leave the result to round-off
        raise ValueError(f"--resume: {processes} processes but the run in {args.out} used {before}, and the LoRA "
                         f"dropout masks are drawn per process: resume with torchrun --nproc-per-node {before}")
    lr.load_adapters(model, os.path.join(folder, "adapters.safetensors"))
    moments = load_file(os.path.join(folder, "optimizer.safetensors"))
    for n, p in model.trainable().items():
        if f"{n}.exp_avg" in moments:
            # fused AdamW keeps its step count on the parameter's device, the others on the CPU
            step_device = p.device if opt.defaults["fused"] else "cpu"
            opt.state[p] = {"step": moments[f"{n}.step"].reshape(()).to(step_device),
                            "exp_avg": moments[f"{n}.exp_avg"].to(p.device),
                            "exp_avg_sq": moments[f"{n}.exp_avg_sq"].to(p.device)}
    if writes:
        keep_log_until(os.path.join(args.out, "log.jsonl"), saved["step"])
    print(f"--resume: from {folder}, step {saved['step']} of {args.steps}", file=sys.stderr)
    return saved["step"], saved["lambda_now"]


def keep_log_until(path: str, step: int):
    """Drop the log lines past the checkpoint a resume starts from: they are about to be logged again."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if logged_step(line) <= step]

    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(lines)
    lr.atomic_write(path, write)


def logged_step(line: str) -> float:
    """A log line's step; a line cut short by a kill counts as past every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def append_line(path: str, line: str):
    """Append to a log, never through a symbolic link planted at its name."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise OSError(f"{path}: a symbolic link; the log is never written through one (remove it)") from None
    with os.fdopen(fd, "a") as f:
        f.write(line)


def default_flips(layers: int, micro_batches: int, measurements: int = 60) -> int:
    """Blocks to flip per micro-batch so that each router is measured about `measurements` times over the
    run, between 2 and MAX_DEFAULT_FLIPS (a short run measures fewer times rather than rerun every block)."""
    return min(layers, MAX_DEFAULT_FLIPS, max(2, math.ceil(measurements * layers / micro_batches)))


def flipped_blocks(layers: int, flips: int, g: torch.Generator) -> list[int]:
    """The blocks one micro-batch flips: the next draw from the step's generator."""
    return torch.randperm(layers, generator=g)[:flips].tolist()


def measured_router_loss(model, x: dict, token_loss, scores, gates, inputs, price, flips: int,
                         g: torch.Generator, autocast, fixed: bool, cost: str = "loss", margin: float = 0.0,
                         weight: torch.Tensor | None = None):
    """Flip `flips` blocks (a fresh draw each micro-batch), measure what closing each costs every row, and
    return the routers' classification loss and its labels (B, flips): 1 where the block should stay. cost
    "loss": closing costs more than the price in nats per target token; "argmax": closing breaks a target
    position the open block gets right (lr.broken_targets with `margin`). weight (B,): 0 for a row the
    routers do not learn from (the loss stays a mean over every row, so ranks' losses still add up)."""
    blocks = flipped_blocks(len(model.routers), flips, g)
    rows, at = x["ids"].shape[0], x["target_rows"]
    if cost == "loss":
        now = lr.row_means(token_loss, at, rows)  # (B,) mean nats/token under the gates actually used
    else:
        with torch.no_grad(), autocast:  # (N,) the pass's own margins, from the last block's output
            now = lr.target_margins(model.base.norm, model.base.lm_head, inputs[-1], x["target_idx"], x["targets"])
    loss, keep = 0.0, []
    for k in blocks:
        open_now = gates[:, k] > 0
        with autocast:  # the rerun in the training pass's precision; the loss below stays float32
            if cost == "loss":
                flipped = model.flip_losses(k, inputs, gates, x["target_idx"], x["targets"], at, fixed)
            else:
                flipped = model.flip_margins(k, inputs, gates, x["target_idx"], x["targets"], fixed)
        if cost == "loss":
            # closed minus open, per row. The rerun draws fresh LoRA dropout in blocks k..; that noise is about a
            # tenth of the default price (results/README.md, "Notes behind the code").
            row_cost = torch.where(open_now, flipped - now, now - flipped)
            loss = loss + lr.measured_gate_loss(scores[:, k], row_cost, price, weight)
            keep.append(row_cost > price)
        else:
            open_t = open_now[at]  # (N,) each target's row: is block k open in the pass?
            broken = lr.broken_targets(torch.where(open_t, now, flipped), torch.where(open_t, flipped, now), at,
                                       rows, margin)
            loss = loss + lr.argmax_gate_loss(scores[:, k], broken, weight)
            keep.append(broken > 0)
    return loss, torch.stack(keep, 1).float()


def micro_loss(model, x: dict, n_target: int, lam, args, flip_rng: torch.Generator, autocast, share: float = 1.0):
    """One micro-batch's two losses as train() backpropagates them, each already scaled for the step:
    (LM loss per target token of the step, gate loss, gates (B, L), measured labels (B, flips), 1 where a
    flipped block should stay, or None).
    n_target counts the whole step's targets, every rank's, and share is this rank's part of the
    micro-batch's rows, so that the ranks' losses sum to the one-process step's."""
    measured = not model.straight_through
    only = x["router_only"]
    # Router-only rows run the pass (the flips need it) but add nothing to the LM loss; the routers learn
    # from them and the other kinds' rows, not from the tool calls LoRA fits.
    counted = (~only)[x["target_rows"]]

    def lm_of(token_loss):
        return (token_loss * counted).sum() / n_target
    lm = 0.0
    if args.open_loss:  # the data's tokens, every block on: the same LoRA trained as if alone
        with model.every_block_on(), autocast:
            open_loss = model.train_forward(x["ids"], x["prompt_lens"], x["target_idx"], x["targets"], fixed=args.fast)[0]
        lm = args.open_loss * lm_of(open_loss)
    if args.distill:  # soft targets: cross_entropy against them is (1 - a) CE + a KL(open || routed) + const
        # the teacher's own pass, not the open loss's: without dropout, so it is the model eval.py scores
        with torch.no_grad(), autocast:
            teacher = model.open_probs(x["ids"], x["prompt_lens"], x["target_idx"])
        hard = F.one_hot(x["targets"], teacher.shape[1]).float()
        x = {**x, "targets": torch.lerp(hard, teacher, args.distill)}
    with autocast:  # the head and the loss run only where the next token is a target
        token_loss, scores, gates, inputs = model.train_forward(
            x["ids"], x["prompt_lens"], x["target_idx"], x["targets"], fixed=args.fast, keep_inputs=measured)
    lm = lm + lm_of(token_loss)
    weight = (only | (x["kinds"] != TOOL_CALL)).float() if args.router_only else None
    # The gate losses are means over this rank's rows: times its share of the rows, they sum over the
    # ranks to the mean over the whole micro-batch, as one process has it.
    if not measured:
        return lm, lam * lr.gate_loss(scores) * share / args.grad_accum, gates, None
    gate, keep = measured_router_loss(model, x, token_loss.detach(), scores, gates, inputs, lam, args.flips,
                                      flip_rng, autocast, args.fast, args.cost, args.margin, weight)
    return lm, gate * share / args.grad_accum, gates, keep


def on_device(b, device: str) -> dict:
    """The batch's tensors on the device, its target positions found on the host first, so that the
    step never waits for the GPU: target_idx (N,) flat positions b * T + t whose next token is a target,
    targets (N,), target_rows (N,), kinds (B,) as indices of data.KINDS, router_only (B,). Pinned copies run
    asynchronously."""
    import data
    at = F.pad(b.labels[:, 1:] != -100, (0, 1))  # (B, T); labels[t] is what position t-1 predicts
    target_idx = at.flatten().nonzero().squeeze(1)
    tensors = {"ids": b.ids, "prompt_lens": b.prompt_lens, "target_idx": target_idx,
               "targets": b.labels[:, 1:][at[:, :-1]], "target_rows": target_idx // b.ids.shape[1],
               "kinds": torch.tensor([data.KINDS.index(k) for k in b.kinds]), "router_only": b.router_only}
    pin = device.startswith("cuda")
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=pin) for k, v in tensors.items()}


class Window:
    """Per-kind sums of the metrics between two log lines, kept on the device (no sync per step)."""

    def __init__(self, device: str):
        import data
        self.kinds, self.device, self.tokens = data.KINDS, device, 0
        self.sums, self.counts = {}, {}

    def add(self, name: str, kinds: torch.Tensor, totals: torch.Tensor, count: int = 1):
        """totals (B,): row b's sum of `count` values, row b of kind kinds[b]."""
        n = len(self.kinds)
        if name not in self.sums:
            self.sums[name] = torch.zeros(n, dtype=torch.float64, device=self.device)
            self.counts[name] = torch.zeros(n, dtype=torch.float64, device=self.device)
        self.sums[name].index_add_(0, kinds, totals.double())
        self.counts[name].index_add_(0, kinds, torch.full_like(totals, count, dtype=torch.float64))

    def sum_ranks(self, *scalars: torch.Tensor) -> list[torch.Tensor]:
        """Sum every rank's window into this one, and the scalars with it, in one all_reduce (at log lines
        only: the window's names are the same on every rank, as every rank runs the same code)."""
        names, n = sorted(self.sums), len(self.kinds)
        extra = torch.stack([torch.as_tensor(s, dtype=torch.float64, device=self.device)
                             for s in (self.tokens, *scalars)])
        flat = torch.cat([*(self.sums[k] for k in names), *(self.counts[k] for k in names), extra])
        dist.all_reduce(flat)
        pieces = flat.split([n] * 2 * len(names) + [len(extra)])
        self.sums = dict(zip(names, pieces[:len(names)]))
        self.counts = dict(zip(names, pieces[len(names):2 * len(names)]))
        self.tokens = int(pieces[-1][0])
        return list(pieces[-1][1:])

    def percents(self) -> dict:
        """{f"{name}_{kind}": mean in %} for every kind seen: the one read of these sums."""
        out = {}
        for name in sorted(self.sums):
            sums, counts = self.sums[name].tolist(), self.counts[name].tolist()
            out.update({f"{name}_{k}": 100 * s / c for k, s, c in zip(self.kinds, sums, counts) if c})
        return out


# ---- several processes (torchrun)

TIMEOUT_ENV = "LAYERROUTE_DIST_TIMEOUT"


class Ranks(NamedTuple):
    """This process's place in a torchrun job: rank `rank` of `size`, on cuda:`local`. One process: (0, 1, 0)."""
    rank: int = 0
    size: int = 1
    local: int = 0


def collective_timeout() -> float:
    """Seconds a collective waits for the other ranks before it fails: $LAYERROUTE_DIST_TIMEOUT, default 600."""
    text = os.environ.get(TIMEOUT_ENV, "600")
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{TIMEOUT_ENV}={text}: expected a number of seconds > 0")
    return seconds


def join_ranks(args) -> Ranks:
    """Join torchrun's process group when torchrun started this process (WORLD_SIZE > 1): NCCL on CUDA, each
    process on cuda:LOCAL_RANK, gloo on CPU. Without torchrun, one process, as ever."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return Ranks()
    ranks = Ranks(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if args.batch_size % size:
        raise ValueError(f"--batch-size {args.batch_size}: not a multiple of the {size} processes, which take "
                         "equal shares of each micro-batch's rows")
    cuda = args.device.startswith("cuda")
    if cuda:
        if args.device != "cuda":
            raise ValueError(f"--device {args.device}: under torchrun each process takes cuda:LOCAL_RANK; "
                             "pass --device cuda")
        args.device = f"cuda:{ranks.local}"
        torch.cuda.set_device(ranks.local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=collective_timeout()),
                            device_id=torch.device(args.device) if cuda else None)
    return ranks


@contextlib.contextmanager
def rank0_speaks(ranks: Ranks):
    """Only rank 0 prints: the others' stderr goes nowhere while they train (train() reports their failures)."""
    if ranks.rank == 0:
        yield
        return
    with open(os.devnull, "w") as nowhere, contextlib.redirect_stderr(nowhere):
        yield


def share_of(b, ranks: Ranks):
    """Rank r's rows of a micro-batch: r, r + N, ... (rows come sorted by length, so every share is alike).
    The length stays the batch's, so each row is computed exactly as one process computes it."""
    if ranks.size == 1:
        return b
    rows = slice(ranks.rank, None, ranks.size)
    labels, only = b.labels[rows].contiguous(), b.router_only[rows].contiguous()
    return dataclasses.replace(b, ids=b.ids[rows].contiguous(), labels=labels,
                               prompt_lens=b.prompt_lens[rows].contiguous(), kinds=b.kinds[rows],
                               n_target=int((labels[~only] != -100).sum()), router_only=only)


def same_start(params: list):
    """Every rank starts from rank 0's tensors (each builds them from the same seed already; this makes
    sure of it whatever the device's random numbers)."""
    for p in params:
        dist.broadcast(p.data, 0)


def sum_gradients(params: list, may_differ: bool):
    """Sum the ranks' gradients into each rank's, in one all_reduce over a flat copy in model.trainable()'s
    order. SUM, not mean: each rank's loss is already its share of the step's, so the sum is the one-process
    gradient. A parameter with no gradient on any rank keeps none, so AdamW leaves it as one process does
    (moments not decayed, step not counted); a rank without one, where another has one, adds zeros."""
    present = [p.grad is not None for p in params]
    if may_differ:
        # The eager step runs a block only for its open rows, and a short micro-batch leaves a rank without
        # rows, so one rank may have a gradient where another has none. Reading the flags waits for the
        # device, as the eager step waits for its gates anyway. Otherwise (the fixed-shape step computes
        # every block for every row, and every rank flips the same routers) the flags are the same on every
        # rank, and nothing here waits for the device.
        flags = torch.tensor(present, dtype=torch.int32, device=params[0].device)
        dist.all_reduce(flags)
        present = [bool(f) for f in flags.tolist()]
    have = [p for p, has in zip(params, present) if has]
    if not have:
        return
    flat = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in have])
    dist.all_reduce(flat)
    for p, g in zip(have, flat.split([p.numel() for p in have])):
        p.grad = g.view_as(p)


def memory_use(model: lr.LayerRoute, args, dtype: torch.dtype, processes: int = 1) -> dict:
    """Bytes one process holds at the peak of a step: backbone, trainable (with gradients and AdamW's moments)
    and activations, and their total. Activations are rough: about 18 d + 5 f values a token in each block
    with LoRA dropout, 8 d + 4 f without (counted with saved-tensor hooks on a small model, LoRA on every
    Linear), d with --checkpoint-blocks plus one block recomputed; the LM head's logits, their float32 copy
    and log-softmax for every token, as if every token a target."""
    cfg = model.base.cfg
    backbone = {}
    for p in model.base.parameters():
        if not p.requires_grad:
            backbone[p.dtype] = backbone.get(p.dtype, 0) + p.numel() * p.element_size()
    n_train = model.counts()["trainable"]
    per_param = 16 + 4 * (processes > 1)  # float32 weight, gradient and AdamW's two moments (+ the all-reduce copy)
    rows, size = args.batch_size // processes, torch.finfo(dtype).bits // 8
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    per_block = 18 * d + 5 * f if args.lora_dropout > 0 else 8 * d + 4 * f
    kept = L * d + per_block if args.checkpoint_blocks else L * per_block
    tokens = rows * args.max_len  # the most a micro-batch holds
    passes = 2 if args.open_loss else 1  # --open-loss keeps a second pass's activations for the same backward
    use = {"backbone": sum(backbone.values()), "trainable": n_train * per_param,
           "activations": passes * (tokens * kept * size + tokens * cfg.vocab_size * (size + 8))}
    return {**use, "total": sum(use.values()), "backbone_dtypes": backbone, "n_trainable": n_train,
            "per_param": per_param, "rows": rows, "per_token_block": kept // L}


def memory_estimate(model: lr.LayerRoute, args, dtype: torch.dtype, processes: int = 1) -> str:
    """memory_use as one line, in GiB."""
    m, gib = memory_use(model, args, dtype, processes), 2 ** 30
    dtypes = ", ".join(f"{str(t).removeprefix('torch.')} {b / gib:.2f}" for t, b in m["backbone_dtypes"].items())
    return (f"memory per process, rough: backbone {m['backbone'] / gib:.2f} GiB ({dtypes}), trainable "
            f"{m['trainable'] / gib:.2f} GiB ({m['n_trainable']:,} x {m['per_param']} bytes: float32 weight, "
            f"gradient, AdamW's two moments{', all-reduce copy' if processes > 1 else ''}), activations at most "
            f"{m['activations'] / gib:.2f} GiB ({'two passes of ' if args.open_loss else ''}{m['rows']} rows x "
            f"{args.max_len} tokens, ~{m['per_token_block']:,} values a token a block{' checkpointed' if args.checkpoint_blocks else ''}, the LM head's logits for "
            f"every token) = {m['total'] / gib:.2f} GiB")


def train(args: argparse.Namespace, stop_at: int | None = None) -> lr.LayerRoute:
    """Train, as one process or as one rank of a torchrun job. stop_at ends early after that step, as an
    interruption would (tests). A rank that fails says so and leaves the process group; torchrun then
    stops the other ranks (and a rank that hangs fails the others' next collective, after the timeout)."""
    ranks = join_ranks(args)
    try:
        with rank0_speaks(ranks):
            model = train_steps(args, ranks, stop_at)
        if ranks.size > 1:
            dist.barrier()  # rank 0 may still be saving: a rank that leaves the group first can abort in gloo
        return model
    except Exception:
        if ranks.size > 1:
            print(f"rank {ranks.rank} of {ranks.size} failed: ending the run (torchrun stops the other ranks)",
                  file=sys.stderr, flush=True)
        raise
    finally:
        if ranks.size > 1:
            dist.destroy_process_group()


def train_steps(args: argparse.Namespace, ranks: Ranks, stop_at: int | None) -> lr.LayerRoute:
    """The training loop, on this process's share of every micro-batch's rows."""
    qwen.set_attention_backends()
    if args.steps > 0:
        if ranks.rank == 0:
            prepare_out(args)  # before the model loads: a run in --out is refused at once
        if ranks.size > 1:
            dist.barrier()  # the others start once --out is ready (with --overwrite, the old run gone)
    model, dtype = build(args)
    counts = model.counts()
    print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()) +
          f" ({100 * counts['trainable'] / counts['backbone']:.2f}% trainable)", file=sys.stderr)
    if args.steps == 0:
        return model
    opt = make_optimizer(model, args)
    measured = args.gate_grad == "measured"
    if measured:
        if args.flips is None:
            args.flips = default_flips(len(model.routers), args.steps * args.grad_accum)
        if args.flips > len(model.routers):
            raise ValueError(f"--flips {args.flips}: the model has {len(model.routers)} blocks")
        print(f"measured costs: {args.flips} blocks flipped per micro-batch, each router measured about "
              f"{args.flips * args.steps * args.grad_accum / len(model.routers):,.0f} times", file=sys.stderr)
    if args.compile:
        model.compile_training()
        print("compiling the fixed-shape step: the first step compiles its graphs (a symbolic length), "
              "every later step and block reuses them", file=sys.stderr)
    # lam: the regulariser's weight (ste) or the price of a kept block in nats/token (measured); a device
    # tensor, so that dual ascent (--skip-target) moves it without waiting for the GPU
    step, lam = restore(model, opt, args, ranks.size, writes=ranks.rank == 0) if args.resume else \
        (0, args.price if measured else args.gate_lambda)
    lam = torch.tensor(lam, dtype=torch.float64, device=args.device)
    params = list(model.trainable().values())
    if ranks.size > 1:
        same_start(params)
    batches = training_batches(args, model, start=step * args.grad_accum)
    autocast = torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)
    print(memory_estimate(model, args, dtype, ranks.size), file=sys.stderr)
    model.train()
    t_start = t_last = time.time()
    t_first, window = None, Window(args.device)
    while step < args.steps:
        if args.check_syncs and t_first is not None:  # step 1 may compile, and compiling may wait
            torch.cuda.set_sync_debug_mode("error")
        # Dropout masks depend on the step alone, and on the rank: each rank draws masks for its own rows
        # (one process: the seed is the step's), so runs compared across process counts use --lora-dropout 0.
        torch.manual_seed((args.seed * 1_000_003 + step) * ranks.size + ranks.rank)
        # The flipped blocks depend on the step alone, the same on every rank: each row is then measured on
        # the blocks one process would flip for it, each router's loss is the mean over every rank's rows of
        # the same blocks (micro_loss), and the step equals the one-process step. Flipping other blocks per
        # rank would measure more blocks a step, but train another run than one process does.
        flip_rng = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        micro = [next(batches) for _ in range(args.grad_accum)]  # every rank draws every micro-batch
        n_target = sum(b.n_target for b in micro)  # the loss is per target token of the whole step, every rank's
        if not any((b.labels != -100).any() for b in micro):
            raise ValueError(f"step {step + 1}: no target token in its rows (--max-len {args.max_len} leaves "
                             "no room for an answer?)")
        n_target = max(n_target, 1)  # a step of router-only rows alone has no LM loss
        lm_step = gate_step = closed_step = 0.0  # device tensors after the first micro-batch: read at log lines
        for b in micro:
            mine = share_of(b, ranks)
            if not mine.kinds:  # a short micro-batch (an epoch's last) leaves this rank no row
                if measured:
                    flipped_blocks(len(model.routers), args.flips, flip_rng)  # in step with the other ranks
                continue
            x = on_device(mine, args.device)
            lm, gate, gates, keep = micro_loss(model, x, n_target, lam, args, flip_rng, autocast,
                                               len(mine.kinds) / len(b.kinds))
            if measured:
                window.add("cheap", x["kinds"], (1 - keep).sum(1), args.flips)
            (lm + gate).backward()
            closed = (1 - gates).mean(1)  # (B,) share of each row's blocks skipped
            window.add("skip", x["kinds"], closed)
            lm_step, gate_step = lm_step + lm.detach(), gate_step + gate.detach()
            closed_step = closed_step + closed.double().sum() / (len(micro) * len(b.kinds))  # b: every rank's rows
            window.tokens += int(x["ids"].numel())
        if ranks.size > 1:  # the eager step, or a rank left without a row, may lack gradients others have
            sum_gradients(params, may_differ=not args.fast or any(len(b.kinds) < ranks.size for b in micro))
        torch.nn.utils.clip_grad_norm_(params, args.clip)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_at(step, args)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.skip_target is not None:  # dual ascent: more pressure while too few blocks close
            if ranks.size > 1:  # every rank's rows, so that lambda stays the same on every rank
                closed_step = torch.as_tensor(closed_step, dtype=torch.float64, device=args.device)
                dist.all_reduce(closed_step)
            lam = (lam * torch.exp(args.lambda_rate * (args.skip_target - closed_step))).clamp(max=1e4)
        step += 1
        if args.check_syncs:
            torch.cuda.set_sync_debug_mode("default")
        if t_first is None:
            t_first = time.time() - t_last
            if args.compile:
                print(f"step 1 with compilation: {t_first:.1f} s", file=sys.stderr, flush=True)
        if step % args.log_every == 0 or step == args.steps:
            dt, t_last = time.time() - t_last, time.time()  # reading the metrics below waits for the GPU once
            if ranks.size > 1:
                lm_step, gate_step = window.sum_ranks(lm_step, gate_step)
            rec = {"step": step, "loss": float(lm_step), "gate_loss": float(gate_step), "lambda": float(lam),
                   "lr": opt.param_groups[0]["lr"], "tok_per_s": window.tokens / dt,
                   "elapsed_s": time.time() - t_start, **window.percents()}
            eta = (args.steps - step) * dt / args.log_every
            kinds = sorted(k[5:] for k in rec if k.startswith("skip_"))
            said = "cheaper than the price" if args.cost == "loss" else "that break no argmax"
            cheap = f" | flips {said} % " + " ".join(
                f"{k} {rec['cheap_' + k]:.0f}" for k in kinds if "cheap_" + k in rec) if measured else ""
            print(f"step {step}/{args.steps} | lm {rec['loss']:.4f} | gate {rec['gate_loss']:.4f} | skip % " +
                  " ".join(f"{k} {rec['skip_' + k]:.1f}" for k in kinds) + cheap +
                  f" | {rec['tok_per_s']:,.0f} tok/s | eta {eta / 60:.1f} min", file=sys.stderr, flush=True)
            if ranks.rank == 0:
                append_line(os.path.join(args.out, "log.jsonl"), json.dumps(rec) + "\n")
            window = Window(args.device)
        if (step % args.save_every == 0 or step == args.steps) and ranks.rank == 0:
            save(model, opt, args, step, counts, float(lam), ranks.size)
        if stop_at is not None and step >= stop_at:
            break
    if args.compile:
        stats = torch._dynamo.utils.counters["stats"]
        print(f"torch.compile: {stats['unique_graphs']} graphs compiled in this process", file=sys.stderr)
    return model


def main(argv=None):
    train(parse_args(argv))


if __name__ == "__main__":
    qwen.cli(main)
