"""A single-file decoder for Qwen2, Qwen3 and Llama: config, weights, forward, KV cache, generation, tokenizer.

The three families share every module; what differs is a few flags on the config (biases on q/k/v/o and
the MLP, Qwen3's per-head norm of q and k, Llama 3's RoPE rescaling), set from config.json's model_type.
Reads the official checkpoint layout (config.json + model.safetensors, sharded or not)
with the checkpoint's own tensor names, so loading is a strict name match, checked against config.json
from the files' headers before anything is built. layerroute.py wraps this model with LoRA and routers;
nothing here knows about them, except that a KV cache keeps only the layers (and batch rows) that
actually ran, which is what makes skipped blocks free.

    python qwen.py --model PATH_OR_HUB_ID --prompt "The capital of France is" --max-new-tokens 16
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import math
import operator
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open


def read_json(path: str):
    """A JSON file's content; a file that is not JSON is a ValueError naming the file and where."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply to read") from None


def cli(main):
    """Run an entry point. A failure prints one line naming the input and what to do, exit status 2;
    LAYERROUTE_DEBUG=1 shows the traceback instead."""
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 (the boundary between the program and its user)
        if os.environ.get("LAYERROUTE_DEBUG"):
            raise
        known = isinstance(e, (ValueError, OSError))  # bad input: a file, field or flag
        text = " ".join(str(e).split()) if known else f"{type(e).__name__}: {e} (LAYERROUTE_DEBUG=1 shows where)"
        print(f"{os.path.basename(sys.argv[0])}: error: {text}", file=sys.stderr)
        sys.exit(2)


def set_attention_backends():
    """Process-wide, called by each entry point: SDPA never takes cuDNN's attention, which builds a plan
    for every new shape while our batches change length every step. Flash, memory-efficient and plain
    attention remain (results/README.md, "Speed, before the fixed-shape training step")."""
    torch.backends.cuda.enable_cudnn_sdp(False)


# ----------------------------------------------------------------------------- config

# Far above any released Qwen2, Qwen3 or Llama (Llama 3.1 405B: 126 layers, d 16384, ff 53248, 128 heads;
# Qwen2.5-72B: vocab 152064) and far below
# what stalls the machine: a mistyped or hostile config.json fails here, before a module is built.
SIZE_LIMITS = {"hidden_size": 65_536, "intermediate_size": 1_048_576, "num_hidden_layers": 1_000,
               "num_attention_heads": 1_024, "num_key_value_heads": 1_024, "vocab_size": 4_194_304}


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not a layer count


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# What a field that config.json leaves out means, where a family's transformers config class differs from
# Qwen2Config (the dataclass defaults): Qwen3Config's head_dim is 128 whatever the hidden size, LlamaConfig's
# bos/eos ids are 1 and 2. max_position_embeddings is llama3 RoPE's original context where a config gives
# none, and the longest request chat.py accepts.
FAMILY_DEFAULTS = {"qwen2": {"max_position_embeddings": 32768},
                   "qwen3": {"max_position_embeddings": 32768, "head_dim": 128},
                   "llama": {"max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2}}
LLAMA3_ROPE = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
FEATURES = "model_type qwen2, qwen3 or llama, silu, default or llama3 RoPE, no sliding window"


@dataclass
class QwenConfig:
    """The fields this decoder reads. The optional ones default as transformers' Qwen2Config does, so a
    config.json that leaves them out means here what it means there (untied head, RoPE theta 1e4);
    from_json sets the other families' defaults and flags."""
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    head_dim: int = 0  # 0 = hidden_size // num_attention_heads, as Qwen2 defines it
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    max_position_embeddings: int = 32768  # the context it was trained for: chat.py refuses a longer request
    # The family flags, read by the shared modules; the defaults are Qwen2's.
    qkv_bias: bool = True  # biases on q, k and v (Qwen2 always; Qwen3 and Llama when attention_bias)
    o_bias: bool = False  # a bias on o (Qwen3 and Llama when attention_bias)
    qk_norm: bool = False  # Qwen3: an RMSNorm over each head's q and k, before RoPE
    mlp_bias: bool = False  # Llama's mlp_bias: biases on gate, up and down
    llama3_rope: dict | None = None  # Llama 3's rescaled RoPE frequencies: LLAMA3_ROPE's four numbers

    def __post_init__(self):
        self.check()
        given = self.head_dim
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.head_dim % 2:
            source = "" if given else " (hidden_size / num_attention_heads)"
            raise ValueError(f"head_dim={self.head_dim}{source} is odd: RoPE rotates pairs of dimensions")

    def check(self):
        """Each number a whole size within SIZE_LIMITS, the heads consistent: one line naming the field."""
        for name, limit in SIZE_LIMITS.items():
            v = getattr(self, name)
            if not is_int(v) or not 0 < v <= limit:
                raise ValueError(f"{name}={v!r}: expected a whole number from 1 to {limit:,} "
                                 "(qwen.SIZE_LIMITS, far above any released model)")
        if not is_int(self.head_dim) or not 0 <= self.head_dim <= 4096:
            raise ValueError(f"head_dim={self.head_dim!r}: expected a whole number from 1 to 4,096 (or leave it out)")
        if not self.head_dim and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
                             f"{self.num_attention_heads}: fix the head count or give head_dim")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if not is_int(self.max_position_embeddings) or self.max_position_embeddings < 1:
            raise ValueError(f"max_position_embeddings={self.max_position_embeddings!r}: expected a whole number >= 1")
        for name in ("rms_norm_eps", "rope_theta"):
            if not is_number(getattr(self, name)) or getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected a positive number")
        for name in ("tie_word_embeddings", "qkv_bias", "o_bias", "qk_norm", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}: expected true or false")
        if self.llama3_rope is not None:
            check_llama3_rope(self.llama3_rope)

    @classmethod
    def from_json(cls, path: str) -> "QwenConfig":
        """Read a checkpoint's config.json, refusing the features this decoder does not implement."""
        raw = read_json(path)
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object")
        kind = "qwen2" if raw.get("model_type") is None else raw["model_type"]
        # Each refusal names the field and its value: better a loud error than silently wrong logits.
        unsupported = {
            "model_type": not isinstance(kind, str) or kind not in FAMILY_DEFAULTS,
            "use_sliding_window": bool(raw.get("use_sliding_window", False)),
            "layer_types": any(t != "full_attention" for t in raw.get("layer_types") or []),
            "hidden_act": raw.get("hidden_act", "silu") != "silu",
        }
        for field, bad in unsupported.items():
            if bad:
                raise ValueError(f"{path}: unsupported {field}={raw[field]!r} (this decoder implements {FEATURES})")
        theta, llama3 = read_rope(raw, path, kind)
        # transformers: null, and for Llama absent, means one key-value head per attention head
        if raw.get("num_key_value_heads") is None and ("num_key_value_heads" in raw or kind == "llama"):
            raw["num_key_value_heads"] = raw.get("num_attention_heads")
        names = {f.name for f in dataclasses.fields(cls)}
        # The sizes have no default here (transformers' are a 7B's): a config.json must give them.
        missing = [n for n in SIZE_LIMITS if raw.get(n) is None]
        if missing:
            raise ValueError(f"{path}: missing required field(s) {missing}")
        fields = {**FAMILY_DEFAULTS[kind], **raw, "rope_theta": theta, "llama3_rope": llama3,
                  **family_flags(raw, path, kind)}
        try:
            return cls(**{k: v for k, v in fields.items() if k in names and v is not None})
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def read_rope(raw: dict, path: str, kind: str) -> tuple[float | None, dict | None]:
    """config.json's RoPE theta and llama3 rescaling (None: plain RoPE), read as transformers reads them:
    older exports describe RoPE in rope_scaling, newer ones in rope_parameters (rope_scaling wins when both
    are there), and a rope_theta inside wins over a top-level one. Any type but default and llama3 is refused."""
    for field in ("rope_scaling", "rope_parameters"):
        if not isinstance(raw.get(field) or {}, dict):
            raise ValueError(f"{path}: {field}={raw[field]!r}: expected a JSON object")
    field = "rope_scaling" if raw.get("rope_scaling") else "rope_parameters"
    rope = raw.get(field) or {}
    theta = rope.get("rope_theta", raw.get("rope_theta"))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"{path}: unsupported {field}={rope!r} (this decoder implements {FEATURES})")
    llama3 = {k: rope.get(k) for k in LLAMA3_ROPE}
    # The pretraining context: a top-level original_max_position_embeddings wins (transformers, for Phi-3),
    # then the one in the RoPE settings, then max_position_embeddings.
    llama3["original_max_position_embeddings"] = (
        raw.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
        or raw.get("max_position_embeddings") or FAMILY_DEFAULTS[kind]["max_position_embeddings"])
    try:
        check_llama3_rope(llama3)
    except ValueError as e:
        raise ValueError(f"{path}: {field}: {e}") from None
    return theta, llama3


def check_llama3_rope(llama3: dict):
    """LLAMA3_ROPE's four numbers, each positive, the high-frequency factor above the low one."""
    if not isinstance(llama3, dict) or set(llama3) != set(LLAMA3_ROPE):
        raise ValueError(f"llama3_rope={llama3!r}: expected a dict of {', '.join(LLAMA3_ROPE)}")
    for name in LLAMA3_ROPE:
        v = llama3.get(name)
        if not is_number(v) or v <= 0 or (name == "original_max_position_embeddings" and not is_int(v)):
            raise ValueError(f"llama3 RoPE {name}={v!r}: expected a positive number")
    if llama3["high_freq_factor"] <= llama3["low_freq_factor"]:
        raise ValueError(f"llama3 RoPE high_freq_factor={llama3['high_freq_factor']!r}: expected more than "
                         f"low_freq_factor={llama3['low_freq_factor']!r}")


def family_flags(raw: dict, path: str, kind: str) -> dict:
    """The flags of model_type's attention and MLP, as transformers' Qwen2, Qwen3 and Llama modules set them
    (every flag, so a config.json field of the same name sets none)."""
    if kind == "qwen2":  # biases on q, k and v; its modules read neither attention_bias nor mlp_bias
        return {"qkv_bias": True, "o_bias": False, "qk_norm": False, "mlp_bias": False}
    bias = read_bool(raw, "attention_bias", path)
    return {"qkv_bias": bias, "o_bias": bias, "qk_norm": kind == "qwen3",
            "mlp_bias": kind == "llama" and read_bool(raw, "mlp_bias", path)}


def read_bool(raw: dict, name: str, path: str) -> bool:
    """A true/false field of config.json, false when absent or null."""
    v = raw.get(name)
    if v is not None and not isinstance(v, bool):
        raise ValueError(f"{path}: {name}={v!r}: expected true or false")
    return bool(v)


def parameter_count(cfg: QwenConfig) -> int:
    """The parameters of Qwen2(cfg), counted without building it (a tied head adds none)."""
    d, ff = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    attn = 2 * d * q + 2 * d * kv + cfg.qkv_bias * (q + 2 * kv) + cfg.o_bias * d + cfg.qk_norm * 2 * cfg.head_dim
    mlp = 3 * d * ff + cfg.mlp_bias * (2 * ff + d)
    block = attn + mlp + 2 * d  # and the two norms
    head = 0 if cfg.tie_word_embeddings else d * cfg.vocab_size
    return cfg.vocab_size * d + cfg.num_hidden_layers * block + d + head


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


def rope_inv_freq(cfg: QwenConfig, device) -> torch.Tensor:
    """RoPE's angle per position for each pair of dimensions (head_dim/2,), Llama 3's rescaling applied."""
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=device,
                                                     dtype=torch.float32) / cfg.head_dim)
    return inv_freq if cfg.llama3_rope is None else llama3_inv_freq(inv_freq, **cfg.llama3_rope)


def llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_position_embeddings: int) -> torch.Tensor:
    """Llama 3.1's longer context (transformers' _compute_llama3_parameters, op for op): wavelengths shorter
    than the pretraining context / high_freq_factor stay, those longer than context / low_freq_factor are
    stretched by `factor`, and the band between moves smoothly from one to the other."""
    context = original_max_position_embeddings
    low_freq_wavelen, high_freq_wavelen = context / low_freq_factor, context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    stretched = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * stretched / factor + smooth * stretched
    between = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(between, smoothed, stretched)


def rope_cos_sin(cfg: QwenConfig, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape (*positions.shape, head_dim) for the given positions, in the half-split layout:
    (T, hd) for positions (T,), or (B, 1, T, hd) for per-row positions (B, 1, T)."""
    inv_freq = rope_inv_freq(cfg, positions.device)
    freqs = positions.float()[..., None] * inv_freq  # (..., T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (..., T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, nh, T, hd), cos and sin (T, hd) or (B, 1, T, hd); the first and second halves of hd are the
    # rotated pairs.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def rope_rows(cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor):
    """cos, sin for a subset of the batch rows: per-row ones (B, 1, T, hd) follow the rows, shared ones
    (T, hd) serve any row."""
    if cos.dim() == 2:
        return cos, sin
    return cos.index_select(0, rows), sin.index_select(0, rows)


class KVCache:
    """Keys and values of one layer for the batch rows that run it, preallocated to max_len.

    `rows` are the batch rows this layer computes (all rows for the plain model; layerroute.py
    gives a layer only the rows whose gate is open, and no cache at all to a layer nobody runs).
    `pad` (len(rows),): each of those rows' left padding, the keys attention never reads; None when
    no row is padded, which keeps the unmasked causal attention.
    """

    def __init__(self, rows: torch.Tensor, n_kv: int, max_len: int, head_dim: int, device, dtype,
                 pad: torch.Tensor | None = None):
        self.rows, self.pad = rows, pad
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


def padding_mask(pad: torch.Tensor, past: int, T: int) -> torch.Tensor:
    """(B, 1, T, past + T) bool, True where a query may attend: causal, and never to a row's left padding
    pad (B,). Every query sees at least itself: a pad query with no key at all is NaN in some SDPA kernels,
    and that NaN, cached as a value, would reach the real tokens through a zero weight (0 * NaN = NaN)."""
    q = torch.arange(past, past + T, device=pad.device)[:, None]  # (T, 1)
    k = torch.arange(past + T, device=pad.device)  # (S,)
    real = (k >= pad[:, None])[:, None, None, :]  # (B, 1, 1, S)
    return (k <= q) & (real | (k == q))


class Attention(nn.Module):
    def __init__(self, cfg: QwenConfig):
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.hd, cfg.hidden_size, bias=cfg.o_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:  # one weight of head_dim, shared by every head (checkpoint names q_norm, k_norm)
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd)
        if self.qk_norm:  # Qwen3: each head's q and k normalised over head_dim, before RoPE rotates them
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh, T, hd), (B, nkv, T, hd)
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
        if cache is not None and cache.pad is not None:  # left-padded generation: every pad key masked out
            mask, causal = padding_mask(cache.pad, past, T), False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: QwenConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

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
        return self.feed(self.attend(h, cos, sin, cache))

    # The block's two residual halves, each a step of its own (layerroute.py can gate them apart)
    def attend(self, h: torch.Tensor, cos, sin, cache: KVCache | None = None) -> torch.Tensor:
        return h + self.self_attn(self.input_layernorm(h), cos, sin, cache)

    def feed(self, h: torch.Tensor, cos=None, sin=None, cache=None) -> torch.Tensor:
        """The MLP half; it takes (and ignores) attend's other arguments, so the two are called alike."""
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen2(nn.Module):
    """The decoder (Qwen2, Qwen3 or Llama, by cfg's flags). Parameter names are the checkpoint's, minus the
    leading `model.`."""

    def __init__(self, cfg: QwenConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # the one place the tie is made

    def rope(self, start: int, T: int, device, dtype, pad: torch.Tensor | None = None):
        """cos, sin (T, hd) of positions start .. start + T - 1; with left padding pad (B,), each row's own
        positions, index - pad[b] (B, 1, T, hd), so a padded row sees the positions it has alone (a pad
        position gets 0: no real token attends to it)."""
        positions = torch.arange(start, start + T, device=device)
        if pad is not None:
            positions = (positions - pad[:, None]).clamp(min=0)[:, None]  # (B, 1, T)
        return rope_cos_sin(self.cfg, positions, dtype)

    def new_cache(self, batch: int, max_len: int, pad: torch.Tensor | None = None) -> list[KVCache | None]:
        """One KVCache per layer, every row in every layer (the plain model skips nothing).
        pad (batch,): each row's left padding (decode), None for none."""
        p = self.embed_tokens.weight
        rows = torch.arange(batch, device=p.device)
        return [KVCache(rows, self.cfg.num_key_value_heads, max_len, self.cfg.head_dim, p.device, p.dtype, pad)
                for _ in self.layers]

    def forward(self, ids: torch.Tensor, cache: list[KVCache | None] | None = None,
                last_only: bool = False) -> torch.Tensor:
        """ids (B, T) -> logits (B, T, vocab). With a cache, positions continue after its length, less
        each row's left padding.
        last_only: logits (B, 1, vocab) of the last position, all a generation step needs."""
        h = self.embed_tokens(ids)  # (B, T, d)
        start, pad = (0, None) if cache is None else (cache[0].len, cache[0].pad)
        cos, sin = self.rope(start, ids.shape[1], ids.device, h.dtype, pad)
        for i, block in enumerate(self.layers):
            h = block(h, cos, sin, None if cache is None else cache[i])
        return self.lm_head(self.norm(h[:, -1:] if last_only else h))


def forward_flops(cfg: QwenConfig, context: int) -> tuple[float, float]:
    """Multiply-add FLOPs (x2) of one token's forward pass at a given attention context length.

    Returns (per_block, lm_head). A block: the q/k/v/o and SwiGLU matmuls (2 FLOPs per weight)
    plus attention's QK^T and AV over `context` keys (2 * 2 * n_head * head_dim * context), with the
    projections' sizes from the config's head_dim (Qwen3's need not be hidden_size / n_head).
    The tied LM head is a full d x vocab matmul (27.6% of Qwen2.5-0.5B's per-token weights);
    embeddings are a lookup (0 FLOPs). Norms (Qwen3's q/k norms too), biases, RoPE, softmax and residual
    adds are omitted (<1%).
    """
    attention, mlp = half_flops(cfg, context)
    return attention + mlp, float(2 * cfg.hidden_size * cfg.vocab_size)


def half_flops(cfg: QwenConfig, context: int) -> tuple[float, float]:
    """(attention, MLP): forward_flops' per_block in the block's two halves, as Block.attend and
    Block.feed compute them."""
    d, hd = cfg.hidden_size, cfg.head_dim
    q_dim, kv_dim = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    attention = 2 * (d * q_dim + 2 * d * kv_dim + q_dim * d) + 2 * 2 * q_dim * context
    return float(attention), float(2 * 3 * d * cfg.intermediate_size)


# ----------------------------------------------------------------------------- loading

MODEL_FILES = "expected config.json and *.safetensors"
INDEX = "model.safetensors.index.json"


def names_a_local_path(name: str) -> bool:
    """Whether a name that exists as nothing here still means a local path, not a hub id. A hub id is
    `name` or `owner/name`: a leading `.`, `~` or `/`, a second `/`, or a first part that is a folder
    here (`runs/mdoel` beside `runs/`) is a mistyped path, which the hub would reject in its own words."""
    return (name.startswith((".", "~", "/")) or name.count("/") > 1 or "\\" in name
            or ("/" in name and os.path.isdir(name.split("/")[0])))


def hub_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub raises for an id it cannot fetch: invalid, not found, gated, offline, no network."""
    from huggingface_hub import errors
    found = [errors.HFValidationError, errors.LocalEntryNotFoundError, errors.EntryNotFoundError,
             errors.OfflineModeIsEnabled, errors.RepositoryNotFoundError, errors.HfHubHTTPError,
             ConnectionError, TimeoutError]
    for module, name in (("httpx", "TransportError"), ("requests", "RequestException")):
        try:  # huggingface_hub 1.x talks through httpx, older versions through requests
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def from_hub(name: str, fetch, instead: str) -> str:
    """fetch() a hub id's files; failing, one line saying what to pass instead (the cause stays chained)."""
    try:
        return fetch()
    except hub_errors() as e:
        raise OSError(f"cannot download {name} from the hub (offline?): {instead} [{type(e).__name__}]") from e


def resolve(model: str) -> str:
    """A local model folder as is; otherwise a hub id, fetching only config, tokenizer and safetensors."""
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{model}: no config.json in this folder ({MODEL_FILES})")
        return path
    if os.path.exists(path):
        raise FileNotFoundError(f"{model}: a file, not a model folder ({MODEL_FILES})")
    if names_a_local_path(model):
        raise FileNotFoundError(f"{model}: no such model folder ({MODEL_FILES})")
    from huggingface_hub import snapshot_download  # honours HF_HOME, HF_HUB_OFFLINE and its cache
    patterns = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "*.safetensors", INDEX]
    return from_hub(model, lambda: snapshot_download(model, allow_patterns=patterns),
                    "pass --model DIR, a folder with config.json and *.safetensors")


def shard_files(folder: str) -> list[str]:
    """The safetensors files of a model folder: model.safetensors, or the shards its index lists."""
    index = os.path.join(folder, INDEX)
    if os.path.exists(index):
        return [shard_path(folder, index, name) for name in index_shards(index)]
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        return [os.path.join(folder, "model.safetensors")]
    raise FileNotFoundError(f"{folder}: no model.safetensors or {INDEX}")


def index_shards(index: str) -> list[str]:
    """The shard file names an index's weight_map lists, each once."""
    raw = read_json(index)
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f'{index}: expected {{"weight_map": {{tensor name: shard file name, ...}}}}; '
                         "re-download or re-save the checkpoint")
    return sorted(set(weight_map.values()))


def shard_path(folder: str, index: str, name: str) -> str:
    """The path of shard `name`, which must lie in the model folder: an index names files, it is no licence
    to read elsewhere. A hub snapshot's files are links into its repository's blobs/, which stay allowed."""
    if os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == os.pardir:
        raise ValueError(f"{index}: weight_map entry {name!r} is outside the model folder "
                         f"(shards are files in {folder})")
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{index}: weight_map entry {name!r} is not a file in {folder}; re-download it")
    home = os.path.realpath(folder)
    allowed = [home]
    if os.path.basename(os.path.dirname(home)) == "snapshots":  # <hub cache>/models--owner--name/snapshots/<rev>
        allowed.append(os.path.join(os.path.dirname(os.path.dirname(home)), "blobs"))
    real = os.path.realpath(path)
    if not any(os.path.commonpath([real, root]) == root for root in allowed):
        raise ValueError(f"{index}: weight_map entry {name!r} links outside the model folder (to {real}); "
                         f"copy the shard into {folder}")
    return path


@contextlib.contextmanager
def safetensors_file(path: str):
    """safe_open(path); what safetensors refuses (a truncated file, a garbage header) is a ValueError naming it."""
    try:
        with safe_open(path, framework="pt") as f:
            yield f
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e}); re-download or re-save it") from None


def read_shapes(files: list[str]) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape, from the files' headers alone: no weight is read."""
    shapes, where = {}, {}
    for path in files:
        with safetensors_file(path) as f:
            for k in f.keys():
                if k in where:
                    raise ValueError(f"{path}: tensor {k} is also in {where[k]}; a checkpoint stores each tensor once")
                shapes[k], where[k] = tuple(f.get_slice(k).get_shape()), path
    return shapes


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file (never pickle). NaN or inf is refused: a corrupt or diverged
    checkpoint would otherwise load without a word and give NaN logits."""
    with safetensors_file(path) as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for k, t in tensors.items():
        if t.is_floating_point() and not all_finite(t):
            bad = t.numel() - int(torch.isfinite(t).sum())
            raise ValueError(f"{path}: tensor {k} has {bad:,} NaN or inf values of {t.numel():,}; "
                             "the file is damaged or the weights diverged: re-download or re-save it")
    return tensors


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in t. A finite sum proves it (both propagate), some 30x faster than isfinite() over
    every element, which runs only when the sum is not finite (a NaN, or a sum that overflowed)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def read_safetensors(folder: str) -> dict[str, torch.Tensor]:
    """Every tensor of `model.safetensors` or of the shards its index lists, by its checkpoint name."""
    return {k: v for path in shard_files(folder) for k, v in read_tensors(path).items()}


def our_name(key: str) -> str:
    """Checkpoint keys are `model.<name>` and `lm_head.weight`; ours drop the `model.` prefix."""
    return key[len("model."):] if key.startswith("model.") else key


def check_sizes(cfg: QwenConfig, shapes: dict[str, tuple[int, ...]], config: str):
    """config.json's layer count and embedding shape against the checkpoint's headers, before anything is
    built: every layer costs time to build, so a bomb (100,000 layers) has to fail here."""
    layers = {int(k.split(".")[1]) for k in shapes if k.startswith("layers.") and k.split(".")[1].isdigit()}
    n = max(layers) + 1 if layers else 0
    if cfg.num_hidden_layers != n:
        raise ValueError(f"{config}: num_hidden_layers={cfg.num_hidden_layers} but the checkpoint has {n} layers; "
                         "fix config.json to match its checkpoint")
    emb = shapes.get("embed_tokens.weight")
    if emb is not None and emb != (cfg.vocab_size, cfg.hidden_size):
        raise ValueError(f"{config}: vocab_size={cfg.vocab_size}, hidden_size={cfg.hidden_size} but the checkpoint's "
                         f"embed_tokens.weight is {emb}; fix config.json to match its checkpoint")


def mismatches(expected: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Each way the checkpoint's tensors differ from the model's, by name. `expected` has lm_head.weight
    only when config.json leaves the head untied, so a checkpoint without it says how to tie."""
    untied = " (config.json unties the head: set tie_word_embeddings true if the head is the embedding)"
    problems = [f"missing {k} {s}" + (untied if k == "lm_head.weight" else "")
                for k, s in expected.items() if k not in shapes]
    problems += [f"unexpected {k}" for k in shapes if k not in expected]
    problems += [f"shape of {k}: checkpoint {shapes[k]} vs model {s}"
                 for k, s in expected.items() if k in shapes and shapes[k] != s]
    return problems


def first_few(problems: list[str], shown: int = 5) -> str:
    """One line: the first problems, then how many more (a wrong size repeats in every layer)."""
    more = f"; and {len(problems) - shown} more" if len(problems) > shown else ""
    return "; ".join(problems[:shown]) + more


def load_model(model: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Qwen2:
    """Check config.json against the checkpoint's headers, build on the meta device, then assign every
    checkpoint tensor by its own name."""
    folder = resolve(model)
    config = os.path.join(folder, "config.json")
    cfg = QwenConfig.from_json(config)
    files = shard_files(folder)
    shapes = {our_name(k): s for k, s in read_shapes(files).items()}
    check_sizes(cfg, shapes, config)
    with torch.device("meta"):
        net = Qwen2(cfg)
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)  # tied: the head is the embedding (some exports store a copy)
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()
                if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    problems = mismatches(expected, shapes)
    if problems:
        raise ValueError(f"{folder}: checkpoint does not match config.json: {first_few(problems)}")
    sd = {}
    for path in files:  # one file's tensors at a time, cast as they come
        sd.update({our_name(k): v.to(device=device, dtype=dtype) for k, v in read_tensors(path).items()
                   if our_name(k) in expected})
    net.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        net.lm_head.weight = net.embed_tokens.weight  # assign=True replaced the embedding: re-tie
    return net.eval()


def check_fits_memory(cfg: QwenConfig):
    """On the CPU random_model builds in float32: a config that cannot fit fails now, not after minutes of
    allocating or at the kernel's OOM killer."""
    n = parameter_count(cfg)
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return  # this OS does not say (Windows): the allocator decides
    if 4 * n > have:
        raise ValueError(f"random_model: the config's {n:,} parameters need {4 * n / 2**30:,.1f} GiB in float32, more "
                         f"than this machine's {have / 2**30:,.1f} GiB: check hidden_size, intermediate_size, "
                         "num_hidden_layers and vocab_size")


def random_model(cfg: QwenConfig, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> Qwen2:
    """Exact shapes, random weights (std 0.02, norms 1): for timing and tests with no download."""
    if str(device) == "cpu":
        check_fits_memory(cfg)
    torch.manual_seed(seed)
    with torch.device(device):  # built where it runs: a 7B model never passes through host memory
        net = Qwen2(cfg)
    for name, p in net.named_parameters():
        if "norm" not in name:
            nn.init.normal_(p, std=0.02)
    return net.to(dtype=dtype).eval()


def load_tokenizer(source: str):
    """The tokenizer of a model folder or hub id, or a tokenizer.json path (a hub id fetches only that file)."""
    from tokenizers import Tokenizer
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    elif not os.path.isfile(path):
        if source.endswith(".json") or names_a_local_path(source):
            raise FileNotFoundError(f"{source}: no such tokenizer.json or model folder")
        from huggingface_hub import hf_hub_download  # honours HF_HOME, HF_HUB_OFFLINE and its cache
        path = from_hub(source, lambda: hf_hub_download(source, "tokenizer.json"),
                        "pass a model folder with tokenizer.json, or the file's path")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: missing (the tokenizer is read from tokenizer.json)")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 (tokenizers raises a bare Exception for a file it cannot parse)
        raise ValueError(f"{path}: not a readable tokenizer.json ({' '.join(str(e).split())})") from None


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


def left_pad(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompts of any lengths as ids (B, T), each row left-padded to the longest, and each row's pad count
    (B,), None when every prompt has the same length. The pad id is 0: attention never reads a pad key."""
    if not prompts or not all(prompts):
        raise ValueError(f"generation needs at least one prompt and a token in each, got lengths "
                         f"{[len(p) for p in prompts]}")
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (T - len(p)) + list(p) for p in prompts], device=device)
    pad = [T - len(p) for p in prompts]
    return ids, torch.tensor(pad, device=device) if any(pad) else None


@torch.no_grad()
def decode(model: nn.Module, prompts: list[list[int]] | torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
           top_p: float = 1.0) -> Iterator[torch.Tensor]:
    """Yield the next ids (B,) of the prompts, one step at a time, with the KV cache.

    prompts: a list of id lists of any lengths (left-padded here), or equal-length prompts ids (B, T).
    `model` is anything with `new_cache(B, max_len, pad)` and `forward(ids, cache=...)`: this Qwen2,
    or layerroute.LayerRoute, whose cache also carries the gates decided at prefill.
    """
    if isinstance(prompts, torch.Tensor):
        ids, pad = prompts, None
    else:
        ids, pad = left_pad(prompts, next(model.parameters()).device)
    cache = model.new_cache(ids.shape[0], ids.shape[1] + max_new_tokens, pad)
    logits = model(ids, cache=cache, last_only=True)[:, -1]  # prefill
    for step in range(max_new_tokens):
        nxt = sample(logits, temperature, top_p)
        yield nxt
        if step + 1 < max_new_tokens:
            logits = model(nxt[:, None], cache=cache, last_only=True)[:, -1]


def generate(model: nn.Module, prompts: list[list[int]] | torch.Tensor, max_new_tokens: int,
             stop: set[int] = frozenset(), temperature: float = 0.0, top_p: float = 1.0) -> list[list[int]]:
    """Continue prompts of any lengths (see decode); a row ends at its first stop token, the batch when
    every row has ended."""
    out, done = [[] for _ in range(len(prompts))], [False] * len(prompts)
    for nxt in decode(model, prompts, max_new_tokens, temperature, top_p):
        for b, t in enumerate(nxt.tolist()):
            if not done[b]:
                out[b].append(t)
                done[b] = t in stop
        if all(done):
            break
    return out


class ShowDefaults(argparse.HelpFormatter):
    """--help states every default: its value, or the rule that sets it when the help already says one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or action.default is None or action.default is False \
                or action.default == argparse.SUPPRESS:
            return text
        return text + " (default: %(default)s)"


BOUNDS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


def number(kind=int, lo=None, hi=None, above=None, below=None):
    """An argparse type: an int or a finite float within bounds (lo <= x <= hi, above < x < below);
    argparse's error then names the flag and the value, in one line."""
    def parse(text: str):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        bounds = {">=": lo, "<=": hi, ">": above, "<": below}
        bad = [f"{op} {b}" for op, b in bounds.items() if b is not None and not BOUNDS[op](x, b)]
        if bad or not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"must be {' and '.join(bad) or 'finite'}, got {text}")
        return x
    return parse


class Parser(argparse.ArgumentParser):
    """Every entry point's parser: --help shows each default (ShowDefaults), an error is one line naming
    the flag (argparse's usage block would bury it)."""

    def __init__(self, *args, formatter_class=None, **kwargs):
        super().__init__(*args, formatter_class=formatter_class or ShowDefaults, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists every flag)\n")


def chatml(prompt: str) -> str:
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def main(argv=None):
    p = Parser(description="Greedy continuation of a prompt with the Qwen2, Qwen3 or Llama decoder.")
    p.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct", help="checkpoint folder or hub id")
    p.add_argument("--prompt", required=True, help="raw prompt text (see --chat)")
    p.add_argument("--max-new-tokens", type=number(int, lo=1), default=64, help="tokens to generate at most")
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
    cli(main)
