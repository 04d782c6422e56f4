"""Every GPU speed number of the Speed table (results/README.md, "Speed"), in one run of under 8 minutes.

    python bench/gpu_speed.py --data-dir DATA --tokenizer TOKENIZER.json \
        --config configs/qwen2.5-0.5b-instruct.json

DATA: a folder of the real data files (data.py reads every file under it); TOKENIZER.json: the real
Qwen tokenizer; configs/qwen2.5-0.5b-instruct.json: Qwen2.5-0.5B-Instruct's config.json (random
weights of its exact shapes stand in for the download). It prints, with the machine, torch version
and date:

1. main: `python train.py --steps 3000` with the defaults, in a fresh process each with an empty
   compile cache, at the default price and at --price 0, and the paper's recipe (--gate-grad ste
   --lora-rank 8 --lora-targets attn) likewise. Each runs until --timed steps after --warm steps
   (or --cap seconds); the 3,000-step wall-clock is the time to step --warm (setup, compilation and
   warm-up, measured) plus the rest at the measured rate after it.
2. mfu: the optimiser step at the paper's shapes (16 rows of 512, half of each a target): tokens/s,
   model-FLOP utilisation and peak memory, for our defaults and the paper's recipe. Model FLOPs are
   what the math needs: each block's matmuls and attention forward (2 per multiply-add, causal mean
   context) and their activation gradients backward (the backbone is frozen: no weight gradients;
   attention backward twice its forward), LoRA forward, activation and weight gradients, the LM
   head forward and backward at the target positions only, and for measured gates the flip reruns
   (forward, from a uniformly drawn block: (L + 1) / 2 blocks on average, and the head).
3. hf: the same step side by side, interleaved, with the same straight-through routers: ours
   (fixed-shape, compiled) against transformers + peft eager with SDPA, and under torch.compile.
4. check: the compiled bf16 step against the eager bf16 step on one batch (dropout 0, fixed gates):
   loss within 1% relative, each gradient's cosine similarity at least 0.99; and train.py
   --check-syncs for 20 steps (no host synchronisation inside a step).

5. big (only when asked: --parts big): Qwen2.5-7B's shapes (configs/qwen2.5-7b-instruct.json, random
   weights) on one GPU at 16 x 512: the defaults with and without --checkpoint-blocks, and the paper's
   recipe: tokens/s, model-FLOP utilisation and peak memory (bench/memory.py gives the estimate).

--parts picks some of them (e.g. --parts mfu,hf to rerun two).
"""
import argparse
import datetime
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qwen  # noqa: E402
import train  # noqa: E402

DEVICE = "cuda"
PAPER = ["--recipe", "paper"]


def random_checkpoint(config: str, tokenizer: str, folder: str) -> str:
    """Random weights of the config's exact shapes in the official layout, with the real tokenizer."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    net = qwen.random_model(qwen.QwenConfig.from_json(config), "cpu", torch.bfloat16)
    tensors = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v.contiguous()
               for k, v in net.state_dict().items() if k != "lm_head.weight" or not net.cfg.tie_word_embeddings}
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(config, os.path.join(folder, "config.json"))
    shutil.copy(tokenizer, os.path.join(folder, "tokenizer.json"))
    return folder


def main_job(name: str, extra: list, args, model_dir: str, work: str):
    """train.py --steps 3000 in a fresh process, stopped after warm + timed steps or the time cap."""
    out = os.path.join(work, name.replace(" ", "_"))
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, not a continuation of an earlier call's
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": os.path.join(work, name + "-inductor")}  # a cold compile
    stop = args.warm + args.timed
    code = ("import sys, train; a = train.parse_args(sys.argv[1:]); train.train(a, stop_at=%d)" % stop)
    cmd = [sys.executable, "-c", code, "--model", model_dir, "--data-dir", args.data_dir, "--steps", "3000",
           "--out", out, "--log-every", "10", "--save-every", "100000", "--device", args.device, *extra]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.cap)
        err, note = p.stderr, "" if p.returncode == 0 else f" (exit {p.returncode})"
    except subprocess.TimeoutExpired as e:
        err, note = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or ""), " (time cap)"
    wall = time.time() - t0
    recs = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))] if os.path.exists(
        os.path.join(out, "log.jsonl")) else []
    compile_line = [line for line in err.splitlines() if "with compilation" in line or "graphs compiled" in line]
    warm = [r for r in recs if r["step"] >= args.warm]
    if len(warm) < 2:
        print(f"main {name}: too few steps logged{note}; last stderr:\n" + "\n".join(err.splitlines()[-15:]))
        return
    a, b = warm[0], warm[-1]
    per_step = (b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"])
    setup = wall - recs[-1]["elapsed_s"] if note == "" else float("nan")  # process start to the first step
    total = a["elapsed_s"] + per_step * (3000 - a["step"])
    skips = {k: v for k, v in b.items() if k.startswith("skip_")}
    print(f"main {name}: steps {a['step']}-{b['step']} at {1000 * per_step:.1f} ms/step "
          f"({statistics.median(r['tok_per_s'] for r in warm):,.0f} tok/s median), first {a['step']} steps "
          f"{a['elapsed_s']:.1f} s, process setup {setup:.1f} s; 3,000 steps: {total / 60:.2f} min "
          f"(+ setup {(total + setup) / 60:.2f} min){note}; at step {b['step']} skip % "
          + " ".join(f"{k[5:]} {v:.1f}" for k, v in skips.items()) + "; " + "; ".join(compile_line), flush=True)


def step_flops(cfg, B: int, T: int, n_target: int, rank: int, targets: str, flips: int) -> float:
    """Model FLOPs of one optimiser step, as the module docstring counts them."""
    weights, head = qwen.forward_flops(cfg, 0)
    attn = qwen.forward_flops(cfg, (T + 1) / 2)[0] - weights
    d, hd, L = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
    q, kv, m = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.intermediate_size
    shapes = [(d, q), (d, kv), (d, kv), (q, d)] + ([(d, m), (d, m), (m, d)] if targets == "all" else [])
    lora = sum(2 * rank * (i + o) for i, o in shapes)  # forward, per token; backward twice that
    block = B * T * (weights + attn + weights + 2 * attn + 3 * lora)
    flip_blocks = flips * (L + 1) / 2
    return L * block + 2 * n_target * head + flips * n_target * head + flip_blocks * B * T * (weights + attn)


def timed_step(args_list: list, model_dir: str, shape=(16, 512), extra_model=None):
    """A closure running one optimiser step of train.py's loop on one synthetic batch, and its FLOPs.
    model_dir may be a config.json instead: random weights of its shapes, built on the device."""
    source = ["--random-init", model_dir] if model_dir.endswith(".json") else ["--model", model_dir]
    a = train.parse_args([*source, "--batch-size", str(shape[0]), "--max-len", str(shape[1]),
                          "--out", tempfile.mkdtemp(), "--device", DEVICE, "--fast", *args_list])
    model, dtype = train.build(a)
    model.straight_through = a.gate_grad == "ste"
    if a.gate_grad == "measured" and a.flips is None:
        a.flips = train.default_flips(len(model.routers), 3000)
    if a.compile:
        model.compile_training()
    model.train()
    opt = train.make_optimizer(model, a)
    ids = torch.randint(0, model.base.cfg.vocab_size, shape, generator=torch.Generator().manual_seed(0)).tolist()
    import data
    half = shape[1] // 2
    b = data.collate([(r[:half], r[half:]) for r in ids], ["tool_call", "planning"] * (shape[0] // 2), 0)
    x = train.on_device(b, a.device)
    lam = torch.tensor(a.price if a.gate_grad == "measured" else a.gate_lambda, dtype=torch.float64, device=a.device)
    autocast = torch.autocast(a.device, dtype=dtype, enabled=dtype != torch.float32)
    params = list(model.trainable().values())

    def step():
        lm, gate, _, _ = train.micro_loss(model, x, b.n_target, lam, a, torch.Generator().manual_seed(0), autocast)
        (lm + gate).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    flops = step_flops(model.base.cfg, shape[0], shape[1], b.n_target, a.lora_rank, a.lora_targets,
                       a.flips if a.gate_grad == "measured" else 0)
    return step, flops, shape[0] * shape[1]


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def seconds(step, n: int) -> float:
    sync()
    t = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    return (time.perf_counter() - t) / n


def mfu(args, model_dir: str):
    for name, extra in (("defaults", []), ("paper recipe", PAPER)):
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        step, flops, tokens = timed_step(extra, model_dir)
        for _ in range(3):  # compile and warm up
            step()
        warm = time.time() - t0
        s = statistics.median(seconds(step, 10) for _ in range(3))
        print(f"mfu {name}: 16 x 512, {1000 * s:.1f} ms/step, {tokens / s:,.0f} tok/s, {flops / 1e12:.2f} TFLOP "
              f"per step, {flops / s / 1e12:.1f} TFLOP/s, MFU {100 * flops / s / (1e12 * args.peak_tflops):.1f}% "
              f"of {args.peak_tflops:g}; peak memory {peak_gib():.1f} GiB; build + compile + 3 steps {warm:.0f} s",
              flush=True)
        del step
        torch._dynamo.reset()


def big(args):
    """--big-config's shapes (Qwen2.5-7B) on one GPU at the paper batch: the defaults with and without
    --checkpoint-blocks, and the paper's recipe: tok/s, MFU, peak memory against train.py's estimate."""
    for name, extra in (("defaults", []), ("defaults --checkpoint-blocks", ["--checkpoint-blocks"]),
                        ("paper recipe", PAPER)):
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        try:
            step, flops, tokens = timed_step(extra, args.big_config)
            for _ in range(2):
                step()
            s = statistics.median(seconds(step, 3) for _ in range(3))
        except torch.OutOfMemoryError as e:
            print(f"big {name}: out of memory ({str(e)[:120]})", flush=True)
            continue
        print(f"big {name}: {os.path.basename(args.big_config)}, 16 x 512, {1000 * s:.0f} ms/step, {tokens / s:,.0f} "
              f"tok/s, MFU {100 * flops / s / (1e12 * args.peak_tflops):.1f}%; peak memory {peak_gib():.1f} GiB; "
              f"build + compile + 2 steps {time.time() - t0:.0f} s", flush=True)
        del step
        torch._dynamo.reset()


def hf_side_by_side(args, model_dir: str):
    """Ours (fixed-shape, compiled) vs transformers + peft eager and compiled, interleaved, 16 x 512, STE."""
    import train_speed
    ns = argparse.Namespace(model=model_dir, device=DEVICE, random_init=None)
    fwd, params = train_speed.build_theirs(ns, torch.bfloat16)
    B, T = args.hf_shape
    ids = torch.randint(0, 151_000, (B, T), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    labels = ids.clone()
    labels[:, :T // 2] = -100
    batch = (ids, labels, torch.full((B,), T // 2, device=DEVICE))
    sides = {"ours": timed_step(PAPER, model_dir, (B, T))[0],
             "theirs eager": train_speed.make_step(fwd, params, ns, torch.bfloat16, batch)}
    t0 = time.time()
    try:
        cfwd, cparams = train_speed.build_theirs(ns, torch.bfloat16, compiled=True)
        sides["theirs compiled"] = train_speed.make_step(cfwd, cparams, ns, torch.bfloat16, batch)
    except Exception as e:  # report, and time the rest
        print(f"hf: transformers + peft under torch.compile failed to build: {type(e).__name__}: {e}")
    for name, step in list(sides.items()):
        t1 = time.time()
        try:
            for _ in range(3):
                step()
        except Exception as e:
            print(f"hf: {name} failed: {type(e).__name__}: {str(e)[:300]}")
            del sides[name]
            continue
        print(f"hf: {name} warm-up (compile included) {time.time() - t1:.0f} s", flush=True)
    rates = {k: [] for k in sides}
    for r in range(5):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            rates[name].append(B * T / seconds(sides[name], 5))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print("hf: median tok/s " + ", ".join(f"{k} {v:,.0f}" for k, v in med.items()) + "; ours / " + ", ours / ".join(
        f"{k} {med['ours'] / v:.2f}x (per repeat {min(a / b for a, b in zip(rates['ours'], rates[k])):.2f}-"
        f"{max(a / b for a, b in zip(rates['ours'], rates[k])):.2f})" for k, v in med.items() if k != "ours")
        + f"; {time.time() - t0:.0f} s", flush=True)


def check(args, model_dir: str, work: str):
    """Compiled bf16 against eager bf16 on one batch; then --check-syncs on the main job for 20 steps."""
    res = {}
    for fast in (False, True):
        a = train.parse_args(["--model", model_dir, "--batch-size", "16", "--max-len", "512", "--lora-dropout", "0",
                              "--out", tempfile.mkdtemp(), "--device", DEVICE, "--fast" if fast else "--no-fast",
                              *PAPER])
        model, dtype = train.build(a)
        with torch.no_grad():
            for i, r in enumerate(model.routers):
                r.bias.fill_(-1.0 if i % 5 == 3 else 1.0)  # blocks 3, 8, ... closed for every row
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.01, generator=torch.Generator().manual_seed(len(n)))
        if a.compile:
            model.compile_training()
        model.train()
        ids = torch.randint(0, 151_000, (16, 512), generator=torch.Generator().manual_seed(0)).tolist()
        import data
        b = data.collate([(r[:256], r[256:]) for r in ids], ["planning"] * 16, 0)
        lam = torch.tensor(1.0, dtype=torch.float64, device=DEVICE)
        lm, gate, gates, _ = train.micro_loss(model, train.on_device(b, DEVICE), b.n_target, lam, a, torch.Generator(),
                                              torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32))
        (lm + gate).backward()
        res[fast] = lm.item(), {n: p.grad.float() for n, p in model.trainable().items() if p.grad is not None}
    (l0, g0), (l1, g1) = res[False], res[True]
    cos = {n: F.cosine_similarity(g0[n].flatten(), g1[n].flatten(), dim=0).item() for n in g0 if g0[n].any()}
    worst = min(cos, key=cos.get)
    ok = abs(l1 - l0) / abs(l0) <= 0.01 and cos[worst] >= 0.99
    print(f"check bf16: loss eager {l0:.5f}, fast {l1:.5f} (rel {abs(l1 - l0) / abs(l0):.2e}); gradient cosine "
          f"min {cos[worst]:.5f} ({worst}), median {statistics.median(cos.values()):.5f} over {len(cos)} tensors: "
          f"{'within' if ok else 'OUTSIDE'} the tolerance (1% and 0.99)", flush=True)
    out = os.path.join(work, "syncs")
    if DEVICE != "cuda":
        return print("check syncs: needs CUDA")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "train.py", "--model", model_dir, "--data-dir", args.data_dir, "--steps", "20",
           "--out", out, "--check-syncs", "--log-every", "10"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.cap)
    tail = [line for line in p.stderr.splitlines() if "sync" in line.lower() or "Error" in line][-3:]
    print("check syncs: train.py --check-syncs, 20 steps: " +
          ("no host synchronisation inside a step" if p.returncode == 0 else f"exit {p.returncode}: {tail}"),
          flush=True)


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", required=True, help="the real data copies")
    p.add_argument("--tokenizer", required=True, help="the real Qwen tokenizer.json")
    p.add_argument("--config", required=True,
                   help="Qwen2.5-0.5B-Instruct's config.json (configs/qwen2.5-0.5b-instruct.json)")
    p.add_argument("--parts", default="main,mfu,hf,check", help="which measurements, comma-separated (big: "
                   "--big-config's shapes, about 3 more minutes)")
    p.add_argument("--big-config", default=os.path.join(ROOT, "configs", "qwen2.5-7b-instruct.json"),
                   help="big: the config.json whose shapes to train (random weights)")
    p.add_argument("--warm", type=int, default=30, help="main: steps before the timed ones (compile, warm-up)")
    p.add_argument("--timed", type=int, default=300, help="main: steps timed after --warm")
    p.add_argument("--cap", type=float, default=100, help="main: seconds a run may take at most")
    p.add_argument("--peak-tflops", type=float, default=989, help="the GPU's dense bf16 peak (H100/H200 SXM: 989)")
    p.add_argument("--device", default="cuda", help="cuda; cpu only to try the script's logic on a tiny config")
    p.add_argument("--hf-shape", type=int, nargs=2, default=[16, 512], help="hf: rows and tokens of the batch")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "layerroute-gpu"), help="scratch folder")
    args = p.parse_args()
    qwen.set_attention_backends()
    global DEVICE
    DEVICE = args.device
    parts = args.parts.split(",")
    print(f"{torch.cuda.get_device_name() if DEVICE == 'cuda' else 'CPU'}, torch {torch.__version__}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", flush=True)
    t0 = time.time()
    model_dir = random_checkpoint(args.config, args.tokenizer, os.path.join(args.work, "random-qwen2.5-0.5b"))
    if "main" in parts:
        for name, extra in (("defaults", []), ("defaults --price 0", ["--price", "0"]),
                            ("paper recipe", PAPER), ("paper recipe --gate-lambda 0", PAPER + ["--gate-lambda", "0"])):
            main_job(name, extra, args, model_dir, args.work)
    if "mfu" in parts:
        mfu(args, model_dir)
    if "hf" in parts:
        hf_side_by_side(args, model_dir)
    if "check" in parts:
        check(args, model_dir, args.work)
    if "big" in parts:
        big(args)
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
