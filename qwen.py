"""A single-file Qwen2 decoder: config, weights, forward, KV cache, generation, tokenizer.

Reads the official Qwen2 checkpoint layout (config.json + model.safetensors, sharded or not)
with the checkpoint's own tensor names, so loading is a strict name match. layerroute.py wraps
this model with LoRA and routers; nothing here knows about them, except that a KV cache keeps
only the layers (and batch rows) that actually ran, which is what makes skipped blocks free.

    python qwen.py --model PATH_OR_HUB_ID --prompt "The capital of France is" --max-new-tokens 16
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open


def set_attention_backends():
    """Process-wide, called by each entry point: SDPA never takes cuDNN's attention, which builds a plan
    for every new shape while our batches change length every step. Flash, memory-efficient and plain
    attention remain (results/README.md, "Speed, before the fixed-shape training step")."""
    torch.backends.cuda.enable_cudnn_sdp(False)


# ----------------------------------------------------------------------------- config

@dataclass
class QwenConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    tie_word_embeddings: bool = True
    head_dim: int = 0  # 0 = hidden_size // num_attention_heads, as Qwen2 defines it
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")

    @classmethod
    def from_json(cls, path: str) -> "QwenConfig":
        """Read a checkpoint's config.json, refusing the features this decoder does not implement."""
        with open(path) as f:
            raw = json.load(f)
        # Newer exports put rope_theta inside rope_parameters; older ones use rope_scaling for
        # non-default RoPE. Either way only the plain ("default") rotation is implemented.
        rope = raw.get("rope_parameters") or {}
        raw.setdefault("rope_theta", rope.get("rope_theta"))
        rope_type = {k: (v or {}).get("rope_type", (v or {}).get("type", "default"))
                     for k, v in (("rope_scaling", raw.get("rope_scaling")), ("rope_parameters", rope))}
        # Each refusal names the field and its value: better a loud error than silently wrong logits.
        unsupported = {
            "model_type": raw.get("model_type") not in ("qwen2", None),
            "rope_scaling": rope_type["rope_scaling"] != "default",
            "rope_parameters": rope_type["rope_parameters"] != "default",
            "use_sliding_window": bool(raw.get("use_sliding_window", False)),
            "layer_types": any(t != "full_attention" for t in raw.get("layer_types") or []),
            "hidden_act": raw.get("hidden_act", "silu") != "silu",
        }
        for field, bad in unsupported.items():
            if bad:
                raise ValueError(f"{path}: unsupported {field}={raw[field]!r} (this decoder implements "
                                 "model_type 'qwen2', silu, default RoPE, no sliding window)")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [n for n in ("hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "num_key_value_heads", "vocab_size") if n not in raw]
        if missing:
            raise ValueError(f"{path}: missing required field(s) {missing}")
        return cls(**{k: v for k, v in raw.items() if k in names and v is not None})


# ----------------------------------------------------------------------------- modules

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and cast back before the weight, exactly as Qwen2 does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(cfg: QwenConfig, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape (T, head_dim) for the given positions, in the half-split layout."""
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=positions.device,
                                                     dtype=torch.float32) / cfg.head_dim)
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, nh, T, hd); the first and second halves of hd are the rotated pairs.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """Keys and values of one layer for the batch rows that run it, preallocated to max_len.

    `rows` are the batch rows this layer computes (all rows for the plain model; layerroute.py
    gives a layer only the rows whose gate is open, and no cache at all to a layer nobody runs).
    """

    def __init__(self, rows: torch.Tensor, n_kv: int, max_len: int, head_dim: int, device, dtype):
        self.rows = rows
        self.k = torch.empty(len(rows), n_kv, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.len = 0

    def append(self, k: torch.Tensor, v: torch.Tensor):
        t = k.shape[2]
        if self.len + t > self.k.shape[2]:
            raise ValueError(f"KV cache full: {self.len} + {t} > max_len {self.k.shape[2]}")
        self.k[:, :, self.len:self.len + t] = k
        self.v[:, :, self.len:self.len + t] = v
        self.len += t
        return self.k[:, :, :self.len], self.v[:, :, :self.len]


class Attention(nn.Module):
    def __init__(self, cfg: QwenConfig):
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.hd, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=True)
        self.o_proj = nn.Linear(self.n_head * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0 if cache is None else cache.len
        if cache is not None:
            k, v = cache.append(k, v)  # (B, nkv, past + T, hd)
        # Right-padded batches need no attention mask: under the causal mask a real token never
        # sees the padding after it, so SDPA can take the flash kernel on CUDA (bf16).
        # A multi-token chunk after a non-empty cache needs an explicit offset causal mask.
        mask = None if past == 0 or T == 1 else torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
        # Without a cache, a plain bool (causal over one token is no mask at all): under torch.compile
        # with a symbolic T, `T > 1` would be a symbolic bool, which SDPA does not take.
        causal = cache is None or (past == 0 and T > 1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: QwenConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: QwenConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h: torch.Tensor, cos, sin, cache: KVCache | None = None) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen2(nn.Module):
    """The decoder. Parameter names are the checkpoint's, minus the leading `model.`."""

    def __init__(self, cfg: QwenConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # the one place the tie is made

    def rope(self, start: int, T: int, device, dtype):
        return rope_cos_sin(self.cfg, torch.arange(start, start + T, device=device), dtype)

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None) -> list[KVCache | None]:
        """One KVCache per layer, every row in every layer (the plain model skips nothing)."""
        p = self.embed_tokens.weight
        rows = torch.arange(batch, device=device or p.device)
        return [KVCache(rows, self.cfg.num_key_value_heads, max_len, self.cfg.head_dim,
                        device or p.device, dtype or p.dtype) for _ in self.layers]

    def forward(self, ids: torch.Tensor, cache: list[KVCache | None] | None = None) -> torch.Tensor:
        """ids (B, T) -> logits (B, T, vocab). With a cache, positions continue after its length."""
        h = self.embed_tokens(ids)  # (B, T, d)
        start = 0 if cache is None else cache[0].len
        cos, sin = self.rope(start, ids.shape[1], ids.device, h.dtype)
        for i, block in enumerate(self.layers):
            h = block(h, cos, sin, None if cache is None else cache[i])
        return self.lm_head(self.norm(h))


def forward_flops(cfg: QwenConfig, context: int) -> tuple[float, float]:
    """Multiply-add FLOPs (x2) of one token's forward pass at a given attention context length.

    Returns (per_block, lm_head). A block: the q/k/v/o and SwiGLU matmuls (2 FLOPs per weight)
    plus attention's QK^T and AV over `context` keys (2 * 2 * n_head * head_dim * context).
    The tied LM head is a full d x vocab matmul (27.6% of Qwen2.5-0.5B's per-token weights);
    embeddings are a lookup (0 FLOPs). Norms, RoPE, softmax and residual adds are omitted (<1%).
    """
    d, hd = cfg.hidden_size, cfg.head_dim
    q_dim, kv_dim = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    weights = d * q_dim + 2 * d * kv_dim + q_dim * d + 3 * d * cfg.intermediate_size
    per_block = 2 * weights + 2 * 2 * q_dim * context
    return float(per_block), float(2 * d * cfg.vocab_size)


# ----------------------------------------------------------------------------- loading

def resolve(model: str) -> str:
    """A local folder as is; otherwise a hub id, fetching only config, tokenizer and safetensors."""
    if os.path.isdir(model):
        return model
    if os.path.exists(model) or model.startswith((".", "/")):
        raise FileNotFoundError(f"{model}: not a model folder (expected config.json + *.safetensors)")
    from huggingface_hub import snapshot_download  # honours HF_HOME, HF_HUB_OFFLINE and its cache
    return snapshot_download(model, allow_patterns=["config.json", "generation_config.json", "tokenizer.json",
                                                    "tokenizer_config.json", "*.safetensors",
                                                    "model.safetensors.index.json"])


def read_safetensors(folder: str) -> dict[str, torch.Tensor]:
    """Every tensor of `model.safetensors` or of the shards its index lists. Never pickle."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    tensors = {}
    for name in files:
        with safe_open(os.path.join(folder, name), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def load_model(model: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Qwen2:
    """Build on the meta device, then assign every checkpoint tensor by its own name."""
    folder = resolve(model)
    cfg = QwenConfig.from_json(os.path.join(folder, "config.json"))
    with torch.device("meta"):
        net = Qwen2(cfg)
    # Checkpoint keys are `model.<name>` and `lm_head.weight`; ours drop the `model.` prefix.
    sd = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in read_safetensors(folder).items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # tied: the head is the embedding (some exports store a copy)
    expected = {k: v.shape for k, v in net.state_dict().items()
                if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    problems = [f"missing {k} {tuple(s)}" for k, s in expected.items() if k not in sd]
    problems += [f"unexpected {k}" for k in sd if k not in expected]
    problems += [f"shape of {k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(s)}"
                 for k, s in expected.items() if k in sd and sd[k].shape != s]
    if problems:
        raise ValueError(f"{folder}: checkpoint does not match config.json:\n  " + "\n  ".join(problems))
    net.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        net.lm_head.weight = net.embed_tokens.weight  # assign=True replaced the embedding: re-tie
    return net.eval()


def random_model(cfg: QwenConfig, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> Qwen2:
    """Exact shapes, random weights (std 0.02, norms 1): for timing and tests with no download."""
    torch.manual_seed(seed)
    net = Qwen2(cfg)
    for name, p in net.named_parameters():
        if "norm" not in name:
            nn.init.normal_(p, std=0.02)
    return net.to(device=device, dtype=dtype).eval()


def load_tokenizer(source: str):
    """The tokenizer of a model folder or hub id, or a tokenizer.json path (a hub id fetches only that file)."""
    from tokenizers import Tokenizer
    if os.path.isfile(source):
        path = source
    elif os.path.isdir(source):
        path = os.path.join(source, "tokenizer.json")
    elif source.startswith((".", "/")) or source.endswith(".json"):
        raise FileNotFoundError(f"{source}: no such tokenizer.json or model folder")
    else:
        from huggingface_hub import hf_hub_download  # honours HF_HOME, HF_HUB_OFFLINE and its cache
        path = hf_hub_download(source, "tokenizer.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: missing (the tokenizer is read from tokenizer.json)")
    return Tokenizer.from_file(path)


def stop_ids(cfg: QwenConfig, tokenizer=None) -> set[int]:
    """The model's stop tokens: eos id(s) from config.json plus ChatML's end-of-turn markers."""
    eos = cfg.eos_token_id
    ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    for tok in ("<|im_end|>", "<|endoftext|>"):
        i = tokenizer.token_to_id(tok) if tokenizer is not None else None
        if i is not None:
            ids.add(i)
    return ids


# ----------------------------------------------------------------------------- generation

def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0) -> torch.Tensor:
    """logits (B, vocab) -> next ids (B,). temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1).squeeze(-1)


@torch.no_grad()
def generate(model: nn.Module, ids: torch.Tensor, max_new_tokens: int, stop: set[int] = frozenset(),
             temperature: float = 0.0, top_p: float = 1.0) -> list[list[int]]:
    """Continue equal-length prompts ids (B, T) with the KV cache; a row ends at its first stop token.

    `model` is anything with `new_cache(B, max_len)` and `forward(ids, cache=...)`: this Qwen2,
    or layerroute.LayerRoute, whose cache also carries the gates decided at prefill.
    """
    B = ids.shape[0]
    cache = model.new_cache(B, ids.shape[1] + max_new_tokens)
    logits = model(ids, cache=cache)[:, -1]  # prefill
    out, done = [[] for _ in range(B)], torch.zeros(B, dtype=torch.bool)
    for _ in range(max_new_tokens):
        nxt = sample(logits, temperature, top_p)
        for b, t in enumerate(nxt.tolist()):
            if not done[b]:
                out[b].append(t)
                done[b] = t in stop
        if done.all():
            break
        logits = model(nxt[:, None], cache=cache)[:, -1]
    return out


class ShowDefaults(argparse.HelpFormatter):
    """--help states every default: its value, or the rule that sets it when the help already says one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or action.default is None or action.default is False \
                or action.default == argparse.SUPPRESS:
            return text
        return text + " (default: %(default)s)"


def chatml(prompt: str) -> str:
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def main(argv=None):
    p = argparse.ArgumentParser(description="Greedy continuation of a prompt with the Qwen2 decoder.",
                                formatter_class=ShowDefaults)
    p.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct", help="checkpoint folder or hub id")
    p.add_argument("--prompt", required=True, help="raw prompt text (see --chat)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a ChatML user turn")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights dtype")
    args = p.parse_args(argv)
    set_attention_backends()
    t0 = time.time()
    model = load_model(args.model, args.device, getattr(torch, args.dtype))
    tok = load_tokenizer(args.model)
    text = chatml(args.prompt) if args.chat else args.prompt
    ids = torch.tensor([tok.encode(text, add_special_tokens=False).ids], device=args.device)
    t1 = time.time()
    new = generate(model, ids, args.max_new_tokens, stop_ids(model.cfg, tok))[0]
    t2 = time.time()
    # Only the continuation goes to stdout, so it can be piped or compared; the rest to stderr.
    print(tok.decode(new, skip_special_tokens=False))
    print(f"load {t1 - t0:.1f} s, {len(new)} tokens in {t2 - t1:.2f} s "
          f"({1000 * (t2 - t1) / max(len(new), 1):.1f} ms/token)", file=sys.stderr)


if __name__ == "__main__":
    main()
