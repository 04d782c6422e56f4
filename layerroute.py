"""LayerRoute on a frozen Qwen2: LoRA (q/k/v/o, or every Linear) plus one router (a hard gate) per block.

A sequence's gates are decided once, from its prompt (every token before the first target token):
at block i the router reads the mean of `input_layernorm(h)` over the prompt's real tokens, the
first token excluded (its "massive activation" is a constant that a mean turns into a length
signal), padding excluded, scaled to unit length. sigmoid(router) > 0.5 opens the gate; closed means h_out = h.
Evaluation may lower that threshold (`LayerRoute.threshold`): then only the surest skips are taken.
With gate_unit="sublayer" each block has two routers, one for its attention half (reading
input_layernorm) and one for its MLP half (reading post_attention_layernorm): "block" below then means
either half.

- The routers learn in one of two ways. Straight-through (the paper): forward uses the hard
  gate, backward the sigmoid, so training computes every block, block(h) is needed even where
  g = 0, and mixes g * block(h) + (1 - g) * h. Measured (train.py --gate-grad measured): training
  runs only the open blocks, and flip_losses reruns the rest of the network with one gate flipped,
  so a router learns what skipping its block really costs each input: its loss in nats, or (--cost
  argmax, flip_margins) whether it turns a right teacher-forced argmax wrong, which is what greedy
  decoding of a call is lost to.
- Evaluation and generation compute a block only for the rows whose gate is open, and a KV cache
  exists only for those rows: skipped compute is really not done.
- The fixed-shape training pass (`train_forward(..., fixed=True)`, train.py's default on CUDA) computes
  every block for every row and keeps block(h) or h by the gate, in both modes: the same loss and
  gradients, with shapes that never depend on a gate and no host synchronisation, so each piece
  compiles once (`compile_training`). Closed blocks then cost their FLOPs, traded for a step whose
  kernels never wait for the host (a GPU step is bound by kernel launches more than by arithmetic).
Because the prompt's hidden states are causal, teacher-forced scoring and generation see exactly
the same gates, and no gate ever sees the tokens it is scored on.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qwen import KVCache, Qwen2, rope_rows


class LoRALinear(nn.Module):
    """A frozen Linear's weight and bias, with a trainable low-rank update beside them.

    The base tensors keep their names (`q_proj.weight`), so the checkpoint's keys are unchanged;
    the adapter adds `lora_A` (r, in) and `lora_B` (out, r). B starts at zero: output == base.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # the usual nn.Linear / peft init
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.enabled = True
        self.register_buffer("base_weight", None, persistent=False)  # set by merge()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.base_weight is not None:  # merged: the update is in self.weight, the base kept beside it
            return F.linear(x, self.weight if self.enabled else self.base_weight, self.bias)
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        return y + F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.scale

    @torch.no_grad()
    def merge(self):
        """Fold scale * B @ A into the weight, once (inference: one matmul instead of three). The base
        weight stays beside it, so switching the adapter off still gives the base layer exactly."""
        if self.base_weight is not None:
            return
        self.base_weight = self.weight.detach().clone()
        self.weight += (self.scale * self.lora_B.float() @ self.lora_A.float()).to(self.weight.dtype)


# Which Linear layers of a block get an adapter: the paper's attention projections, or every one.
ATTN = ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj"))
LORA_TARGETS = {"attn": [ATTN], "all": [ATTN, ("mlp", ("gate_proj", "up_proj", "down_proj"))]}


class Unit(NamedTuple):
    """What one router gates. run(h, cos, sin, kv) -> h; norm: the normalisation its router pools (the one
    the unit applies first); attends: whether it keeps a KV cache."""
    run: Callable
    norm: nn.Module
    attends: bool


# What one router gates: a whole block (the paper's), or each block's attention and MLP halves apart
# (Router-Tuning skips attention alone; its cost and its harm differ from the MLP's).
GATE_UNITS = ("block", "sublayer")


def gated_units(base: Qwen2, gate_unit: str) -> list[Unit]:
    """The routed units in order: L blocks, or 2L halves (block i's attention is unit 2i, its MLP 2i + 1)."""
    if gate_unit == "block":
        return [Unit(b, b.input_layernorm, True) for b in base.layers]
    return [u for b in base.layers for u in (Unit(b.attend, b.input_layernorm, True),
                                             Unit(b.feed, b.post_attention_layernorm, False))]


class RoutedCache:
    """The KV cache of routed generation: the gates decided at prefill, each unit's open rows, and one
    KVCache per unit holding only those rows (None for a unit every row skips, or one without attention).
    pad (batch,): each row's left padding, None for none."""

    def __init__(self, batch: int, max_len: int, pad: torch.Tensor | None = None):
        self.batch, self.max_len, self.len, self.pad = batch, max_len, 0, pad
        self.gates: torch.Tensor | None = None  # (B, U), set at prefill
        self.rows: list[torch.Tensor] = []  # per unit, the rows that run it
        self.layers: list[KVCache | None] = []


class LayerRoute(nn.Module):
    """Wraps a Qwen2: freezes it, adds LoRA and routers, and runs the routed block loop."""

    def __init__(self, base: Qwen2, rank: int = 32, alpha: float = 64.0, dropout: float = 0.05,
                 router_bias: float | list[float] = 0.3, pooling: str = "prompt", targets: str = "all",
                 gate_unit: str = "block"):
        super().__init__()
        if pooling not in ("prompt", "reference"):
            raise ValueError(f"pooling={pooling!r}: expected 'prompt' or 'reference'")
        if targets not in LORA_TARGETS:
            raise ValueError(f"targets={targets!r}: expected one of {sorted(LORA_TARGETS)}")
        if gate_unit not in GATE_UNITS:
            raise ValueError(f"gate_unit={gate_unit!r}: expected one of {', '.join(GATE_UNITS)}")
        self.base, self.pooling, self.gate_unit = base, pooling, gate_unit
        self.settings = dict(rank=rank, alpha=alpha, dropout=dropout, router_bias=router_bias, pooling=pooling,
                             targets=targets, gate_unit=gate_unit)
        base.requires_grad_(False)
        for block in base.layers:
            for part, names in LORA_TARGETS[targets]:
                module = getattr(block, part)
                for name in names:
                    setattr(module, name, LoRALinear(getattr(module, name), rank, alpha, dropout))
        self.units = gated_units(base, gate_unit)  # a plain list: the modules are base's, registered there
        d, U = base.cfg.hidden_size, len(self.units)
        dev = base.embed_tokens.weight.device
        self.routers = nn.ModuleList(nn.Linear(d, 1, device=dev) for _ in range(U))
        # Neutral start: weight 0 gives every input the same score, sigmoid(bias); the bias is
        # the same for every unit unless a list is given, so no layer band is pre-selected.
        biases = router_bias if isinstance(router_bias, list) else [router_bias] * U
        for router, b in zip(self.routers, biases):
            nn.init.zeros_(router.weight)
            nn.init.constant_(router.bias, b)
        self.open_gates = False  # True: every gate open (LoRA-only), routers untouched
        # A gate opens when its score is above this. Training keeps 0.5 (the straight-through gate and
        # the measured costs assume it); lower at inference closes only the blocks a router is surest of.
        self.threshold = 0.5
        # False (measured costs): training runs only the open blocks, and the routers learn from measured
        # loss differences (flip_losses); True: the paper's straight-through gradient, every block computed.
        self.straight_through = False
        self.block_inputs: list[torch.Tensor] | None = None  # set to [] to keep each block's input h
        # Training only: each row skips each block with this probability on top of its router's gate
        # (LayerSkip's layer dropout), so that LoRA learns to do without any one block.
        self.block_drop = 0.0
        # True: training keeps each block's input only and recomputes the block in backward (memory for
        # bigger models, at about one more forward pass)
        self.checkpoint_blocks = False
        # The pieces of the fixed-shape training pass; compile_training() swaps in compiled ones.
        self.routed_block, self.gated, self.target_loss = routed_block, gated, target_loss
        self.last_scores: torch.Tensor | None = None  # (B, L) sigmoid scores of the last forward
        self.last_gates: torch.Tensor | None = None  # (B, L) hard 0/1 gates of the last forward

    # ---- switches and parameter bookkeeping

    def lora(self, enabled: bool):
        """Turn every adapter on or off (off + open gates = the frozen base model)."""
        for m in self.modules():
            if isinstance(m, LoRALinear):
                m.enabled = enabled

    def trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def counts(self) -> dict[str, int]:
        t = self.trainable()
        lora = sum(p.numel() for n, p in t.items() if "lora_" in n)
        routers = sum(p.numel() for n, p in t.items() if n.startswith("routers."))
        backbone = sum(p.numel() for p in self.base.parameters() if not p.requires_grad)
        return dict(lora=lora, routers=routers, trainable=lora + routers, backbone=backbone)

    # ---- routing

    def route(self, i: int, h: torch.Tensor, prompt_lens: torch.Tensor,
              pad: torch.Tensor | None = None) -> torch.Tensor:
        """Router score of unit i for each row (B,): router_score with this model's pooling (pad: each
        row's left padding, at a batched generation's prefill)."""
        return router_score(self.routers[i], self.units[i].norm, h, prompt_lens, self.pooling, pad)

    def gate(self, s: torch.Tensor) -> torch.Tensor:
        """The 0/1 gate of scores s (B,); straight-through, its gradient is sigmoid's."""
        return gate_of(s, self.threshold, self.open_gates, self.straight_through)

    def new_cache(self, batch: int, max_len: int, pad: torch.Tensor | None = None) -> RoutedCache:
        return RoutedCache(batch, max_len, pad)

    def forward(self, ids: torch.Tensor, prompt_lens: torch.Tensor | None = None,
                cache: RoutedCache | None = None, logits_at: torch.Tensor | None = None,
                return_hidden: bool = False, last_only: bool = False) -> torch.Tensor:
        """ids (B, T) -> logits (B, T, vocab); the routing decision lands in last_scores/last_gates.

        prompt_lens (B,): prompt tokens per row (teacher forcing). Without it the whole input is
        the prompt (a generation prefill), less the cache's left padding. With a cache past its prefill,
        the stored gates are used.
        logits_at (B, T) bool: the LM head runs at those positions only, giving (N, vocab) in
        row-major order. Training scores targets only, and the head is the biggest single matmul.
        return_hidden: the last block's output h (B, T, d) instead of logits (for target_loss).
        last_only: logits (B, 1, vocab) of the last position, all a generation step needs.
        """
        B, T = ids.shape
        base, cfg = self.base, self.base.cfg
        h = base.embed_tokens(ids)  # (B, T, d)
        start, pad = (0, None) if cache is None else (cache.len, cache.pad)
        cos, sin = base.rope(start, T, ids.device, h.dtype, pad)
        prefill = cache is None or cache.gates is None
        if prompt_lens is None:
            prompt_lens = torch.full((B,), T, device=ids.device)
        mix = self.training and torch.is_grad_enabled() and self.straight_through
        if self.block_inputs is not None:
            self.block_inputs = []
        keep = self.kept_blocks(B, ids.device)
        scores, gates = [], []
        for i, unit in enumerate(self.units):  # a block, or a block's attention or MLP half (gate_unit)
            if prefill:
                s = self.route(i, h, prompt_lens, pad)  # (B,)
                g = self.gate(s) * keep[:, i]
            else:
                s = g = cache.gates[:, i]
            scores.append(s)
            gates.append(g)
            if self.block_inputs is not None:
                self.block_inputs.append(h.detach())
            if mix:  # training computes every block; g*f + (1-g)*h is exactly f or h for a 0/1 gate
                h = self.recomputed(gated, unit.run, h, g, cos, sin)
                continue
            if prefill and cache is not None:  # keep KV only for the rows that run this unit
                rows = g.nonzero().squeeze(-1)
                rows_pad = None if pad is None else pad.index_select(0, rows)
                cache.rows.append(rows)
                cache.layers.append(KVCache(rows, cfg.num_key_value_heads, cache.max_len, cfg.head_dim,
                                            h.device, h.dtype, rows_pad) if unit.attends and len(rows) else None)
            kv, rows = (None, None) if cache is None else (cache.layers[i], cache.rows[i])
            h = self.recomputed(self.run_block, unit.run, h, g, cos, sin, kv, rows)
        self.last_scores, self.last_gates = torch.stack(scores, 1), torch.stack(gates, 1).detach()
        if cache is not None:
            cache.gates = self.last_gates if prefill else cache.gates
            cache.len += T
        if return_hidden:
            return h
        if logits_at is not None:
            h = h[logits_at]
        elif last_only:
            h = h[:, -1:]
        return base.lm_head(base.norm(h))

    def train_forward(self, ids: torch.Tensor, prompt_lens: torch.Tensor, target_idx: torch.Tensor,
                      targets: torch.Tensor, fixed: bool = False, keep_inputs: bool = False):
        """One training pass: (token losses (N,) in nats, scores (B, L), gates (B, L), block inputs or None).

        target_idx (N,): flat positions b * T + t, ascending, whose next token targets (N,) are scored.
        fixed=False runs forward() (the straight-through gate computes every block, measured gates only
        the open ones); fixed=True computes every block for every row, its output kept by the gate,
        with no host synchronisation: the same values, and shapes that do not depend on any gate.
        keep_inputs keeps each block's input h, which flip_losses reruns from, and then the last block's
        output (L + 1 tensors), which the argmax cost scores the pass's own answers from.
        """
        if not fixed:
            self.block_inputs = [] if keep_inputs else None
            h = self(ids, prompt_lens, return_hidden=True)
            losses = self.target_loss(self.base.norm, self.base.lm_head, h, target_idx, targets)
            if keep_inputs:
                self.block_inputs.append(h.detach())
            return losses, self.last_scores, self.last_gates, self.block_inputs
        base = self.base
        h = base.embed_tokens(ids)  # (B, T, d)
        cos, sin = base.rope(0, ids.shape[1], ids.device, h.dtype)
        inputs, scores, gates = [], [], []
        keep = self.kept_blocks(ids.shape[0], ids.device)
        for i, unit in enumerate(self.units):
            if keep_inputs:
                inputs.append(h.detach())
            h, s, g = self.recomputed(self.routed_block, unit.run, unit.norm, self.routers[i], h, cos, sin, prompt_lens,
                                      self.pooling, self.threshold, self.open_gates, self.straight_through,
                                      keep[:, i])
            scores.append(s)
            gates.append(g)
        losses = self.target_loss(base.norm, base.lm_head, h, target_idx, targets)
        self.last_scores, self.last_gates = torch.stack(scores, 1), torch.stack(gates, 1).detach()
        return losses, self.last_scores, self.last_gates, inputs + [h.detach()] if keep_inputs else None

    @contextlib.contextmanager
    def every_block_on(self):
        """Within: every gate open, no block dropped at random, no gradient through a gate to its router:
        LoRA alone's pass (train.py's --open-loss and --distill's teacher). block_inputs is left unset."""
        saved = self.open_gates, self.block_drop, self.straight_through
        self.open_gates, self.block_drop, self.straight_through, self.block_inputs = True, 0.0, False, None
        try:
            yield self
        finally:
            self.open_gates, self.block_drop, self.straight_through = saved

    @torch.no_grad()
    def open_probs(self, ids: torch.Tensor, prompt_lens: torch.Tensor, target_idx: torch.Tensor) -> torch.Tensor:
        """The next-token distribution (N, vocab), float32, at the flat positions target_idx, of this model
        with every gate open and no dropout: the teacher of train.py's --distill."""
        was_training = self.training
        self.eval()
        try:
            with self.every_block_on():
                h = self(ids, prompt_lens, return_hidden=True)
            logits = self.base.lm_head(self.base.norm(h.flatten(0, 1).index_select(0, target_idx)))
        finally:
            self.train(was_training)
        return logits.float().softmax(-1)

    @torch.no_grad()
    def flip_losses(self, k: int, inputs: list[torch.Tensor], gates: torch.Tensor, target_idx: torch.Tensor,
                    targets: torch.Tensor, target_rows: torch.Tensor, fixed: bool = False) -> torch.Tensor:
        """Each row's mean target loss (nats/token) had block k's gate been the other way in the pass
        that gave `inputs` and `gates` (train_forward), every other gate unchanged: blocks k.. rerun
        from block k's kept input. target_rows (N,): the row of each target (target_idx // T).

        With that pass's own row losses this measures what skipping block k costs each row, the full
        nonlinear effect, where the straight-through gradient sees only a first-order guess.
        """
        h = self.flipped(k, inputs, gates, fixed)
        losses = self.target_loss(self.base.norm, self.base.lm_head, h, target_idx, targets)
        return row_means(losses, target_rows, h.shape[0])

    @torch.no_grad()
    def flip_margins(self, k: int, inputs: list[torch.Tensor], gates: torch.Tensor, target_idx: torch.Tensor,
                     targets: torch.Tensor, fixed: bool = False) -> torch.Tensor:
        """target_margins (N,) had block k's gate been the other way, as flip_losses reruns it; the pass's
        own margins are target_margins of inputs[-1]."""
        h = self.flipped(k, inputs, gates, fixed)
        return target_margins(self.base.norm, self.base.lm_head, h, target_idx, targets)

    def flipped(self, k: int, inputs: list[torch.Tensor], gates: torch.Tensor, fixed: bool) -> torch.Tensor:
        """The last unit's output h (B, T, d) with unit k's gate flipped: units k.. rerun from its kept input."""
        h = inputs[k]
        gates = gates.clone()
        gates[:, k] = 1 - gates[:, k]
        cos, sin = self.base.rope(0, h.shape[1], h.device, h.dtype)
        for i in range(k, len(self.units)):
            run = self.units[i].run
            h = self.gated(run, h, gates[:, i], cos, sin) if fixed else self.run_block(run, h, gates[:, i], cos, sin)
        return h

    def compile_training(self, **options):
        """torch.compile the pieces of the fixed-shape pass: a routed block with its backward, a gated
        block without gradient (the flips) and the head with its loss. Each compiles a few graphs, with a
        symbolic sequence length, that serve every block: the weights are inputs of the graph."""
        # fullgraph: a piece that needed the host (.item(), nonzero(), a boolean mask) fails here, loudly
        options = {"dynamic": True, "fullgraph": True, **options}
        # A few graphs per model (attention or MLP half, a first block without gradient, STE or not), and
        # dynamo keeps them per function: a process that trains several models (a notebook, the tests)
        # would pass the default limit of 8 and, with fullgraph, fail.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.routed_block = torch.compile(routed_block, **options)
        self.gated = torch.compile(gated, **options)
        self.target_loss = torch.compile(target_loss, **options)

    def kept_blocks(self, batch: int, device) -> torch.Tensor:
        """(B, U) 1 where a row may run a unit, 0 where block_drop skips it at random (training only)."""
        L = len(self.units)
        if not (self.block_drop and self.training and torch.is_grad_enabled()):
            return torch.ones(batch, L, device=device)
        return (torch.rand(batch, L, device=device) >= self.block_drop).float()

    def recomputed(self, fn, *args):
        """fn(*args); with checkpoint_blocks in training, its activations are recomputed in backward
        (the same dropout masks: the RNG state is replayed) instead of kept."""
        if self.checkpoint_blocks and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    @staticmethod
    def run_block(run, h, g, cos, sin, kv: KVCache | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Compute a unit (run) only for the rows whose gate is open (rows, where a cache knows them: no wait
        for the device); the others pass h through."""
        if rows is None:
            rows = g.nonzero().squeeze(-1)
        if len(rows) == 0:
            return h
        if len(rows) == h.shape[0]:
            return run(h, cos, sin, kv)
        return h.index_copy(0, rows, run(h.index_select(0, rows), *rope_rows(cos, sin, rows), kv))


def router_score(router: nn.Linear, norm: nn.Module, h: torch.Tensor, prompt_lens: torch.Tensor,
                 pooling: str = "prompt", pad: torch.Tensor | None = None) -> torch.Tensor:
    """Router score sigmoid(w . pooled + b) for each row: (B,), float32.

    pooled = mean of norm(h) (the block's input_layernorm) over positions 1 <= t < prompt_len (real
    prompt tokens only, the first one excluded), scaled to unit length. With left padding pad (B,),
    a row's prompt starts at pad[b]: pad[b] + 1 <= t < prompt_len, so the row pools what it pools alone.
    The input is detached: the router reads the residual stream, it does not steer it.
    """
    if pooling == "reference":
        if pad is not None:
            raise ValueError("pooling='reference' pools every position, padding included: its gates depend on "
                             "the padding, so left-padded (batched) generation cannot give a prompt its own gates; "
                             "generate one prompt at a time")
        # The authors' recipe, kept only to measure against: the raw stream over every position,
        # padding and answer included (their batches are padded to max_len).
        pooled = h.detach().float().mean(1)
    else:
        pooled = pooled_prompt(norm, h, prompt_lens, pad)
    return torch.sigmoid(F.linear(pooled, router.weight.float(), router.bias.float())).squeeze(-1)


def pooled_prompt(norm: nn.Module, h: torch.Tensor, prompt_lens: torch.Tensor,
                  pad: torch.Tensor | None = None) -> torch.Tensor:
    """What a router with pooling='prompt' reads (B, d), float32: norm(h) averaged over each row's real
    prompt tokens but the first (router_score), scaled to unit length."""
    pos = torch.arange(h.shape[1], device=h.device)
    first = 1 if pad is None else pad[:, None] + 1  # the first real token is left out
    mask = ((pos >= first) & (pos < prompt_lens[:, None])).unsqueeze(-1)  # (B, T, 1)
    normed = norm(h.detach()).float()
    pooled = (normed * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, d)
    # Unit length: Adam moves each weight by about lr a step, so the score moves by about
    # lr * |pooled|_1. At unit length that is ~lr * sqrt(d), not ~lr * d: the router
    # steers instead of flipping every gate at once.
    return F.normalize(pooled, dim=-1)


def gate_of(s: torch.Tensor, threshold: float, open_gates: bool, straight_through: bool) -> torch.Tensor:
    """0/1 gates (B,) from scores s: open above the threshold (all open with open_gates)."""
    hard = torch.ones_like(s) if open_gates else (s > threshold).float()
    # Straight-through: value = the hard gate, gradient = sigmoid's. The bracket matters:
    # hard + s - s.detach() would round 1 + s - s to 0.99999994.
    return hard + (s - s.detach()) if straight_through else hard


def gated(run, h: torch.Tensor, g: torch.Tensor, cos, sin) -> torch.Tensor:
    """The unit (a block or a half) computed for every row, its output kept where g (B,) is 1: g*f + (1-g)*h
    is exactly f or h for a 0/1 gate, and its gradient with respect to g is the straight-through one."""
    g3 = g.to(h.dtype)[:, None, None]
    return g3 * run(h, cos, sin) + (1 - g3) * h


def routed_block(run, norm, router, h, cos, sin, prompt_lens, pooling, threshold, open_gates, straight_through, keep):
    """One unit of the fixed-shape pass (run, the norm its router reads): its router decides, then gated().
    (h, scores, gates). keep (B,): 0 where the row skips the unit whatever its router says (block_drop)."""
    s = router_score(router, norm, h, prompt_lens, pooling)
    g = gate_of(s, threshold, open_gates, straight_through) * keep
    return gated(run, h, g, cos, sin), s, g


def target_loss(norm: nn.Module, head: nn.Module, h: torch.Tensor, target_idx: torch.Tensor,
                targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (N,) in nats at the flat positions target_idx of h (B, T, d): the head runs there only.
    targets: token ids (N,), or distributions (N, vocab) (train.py's --distill)."""
    return F.cross_entropy(head(norm(h.flatten(0, 1).index_select(0, target_idx))).float(), targets,
                           reduction="none")


def target_margins(norm: nn.Module, head: nn.Module, h: torch.Tensor, target_idx: torch.Tensor,
                   targets: torch.Tensor) -> torch.Tensor:
    """Target logit minus the best other logit (N,), float32, at the flat positions target_idx of h (B, T, d):
    above 0 exactly where the teacher-forced argmax is the target. Greedy decoding reproduces a target
    if and only if every one of its positions is above 0."""
    logits = head(norm(h.flatten(0, 1).index_select(0, target_idx))).float()  # (N, vocab)
    own = logits.gather(1, targets[:, None]).squeeze(1)
    return own - logits.scatter(1, targets[:, None], float("-inf")).amax(1)


def row_means(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Per-row mean (n_rows,) of values (N,), value j belonging to row rows[j]."""
    sums = torch.zeros(n_rows, device=values.device).index_add_(0, rows, values.float())
    counts = torch.zeros(n_rows, device=values.device).index_add_(0, rows, torch.ones(len(rows), device=values.device))
    return sums / counts.clamp(min=1)


def measured_gate_loss(scores: torch.Tensor, cost: torch.Tensor, price: float,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
    """The router as a classifier: its score should say whether skipping its block costs this row
    more than the price (label 1: keep the block) or less (label 0: skip it). Not weighted by the cost,
    so that the many cheap rows count as much as the few costly ones (results/README.md, "How the
    defaults were chosen"); weight (B,), if given, takes rows out (0) of the mean over rows."""
    return F.binary_cross_entropy(scores.float(), (cost > price).float(), weight)


def broken_targets(open_margins: torch.Tensor, closed_margins: torch.Tensor, rows: torch.Tensor, n_rows: int,
                   margin: float = 0.0) -> torch.Tensor:
    """Per row (n_rows,), the target positions that skipping a block breaks: right with the block
    (open margin > 0), and without it the target's lead falls to `margin` or below, lower than with it
    (margin 0: the argmax turns wrong). Margins (N,) as target_margins gives them, rows (N,) their rows.
    A call is lost to one wrong token, so one broken position is what a skip must not cost."""
    broken = (open_margins > 0) & (closed_margins <= margin) & (closed_margins < open_margins)
    return torch.zeros(n_rows, device=rows.device).index_add_(0, rows, broken.float())


def argmax_gate_loss(scores: torch.Tensor, broken: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The router as a classifier of answers: label 1 (keep the block) where skipping it breaks at least one
    of the row's target positions (broken_targets), 0 where every position keeps its argmax. Weighted as
    measured_gate_loss is."""
    return F.binary_cross_entropy(scores.float(), (broken > 0).float(), weight)


def gate_loss(scores: torch.Tensor) -> torch.Tensor:
    """The paper's regulariser: mean router probability over layers and batch (times lambda outside)."""
    return scores.mean()


# ---- adapters on disk

def save_adapters(model: LayerRoute, folder: str, settings: dict):
    """Trainable tensors only (LoRA + routers) as safetensors, settings as JSON; both atomic."""
    os.makedirs(folder, exist_ok=True)
    tensors = {n: p.detach().float().contiguous().cpu() for n, p in model.trainable().items()}
    atomic_write(os.path.join(folder, "adapters.safetensors"), lambda tmp: save_file(tensors, tmp))
    write_json(os.path.join(folder, "run.json"), settings)


def load_adapters(model: LayerRoute, path: str):
    """Load LoRA + router tensors, checking names and shapes against the model."""
    try:
        tensors = load_file(path)
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    expected = model.trainable()
    missing, unexpected = set(expected) - set(tensors), set(tensors) - set(expected)
    bad = [n for n in set(expected) & set(tensors) if expected[n].shape != tensors[n].shape]
    if missing or unexpected or bad:
        raise ValueError(f"{path}: adapters do not match the model: missing {sorted(missing)[:4]}, "
                         f"unexpected {sorted(unexpected)[:4]}, wrong shape {sorted(bad)[:4]}")
    with torch.no_grad():
        for n, p in expected.items():
            p.copy_(tensors[n])


def atomic_write(path: str, write):
    """write(tmp_path), then rename over path: a reader never sees a half-written file. The temporary
    file is created afresh (a name nobody can have planted a link at), and removed if write fails."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix="." + os.path.basename(path) + ".")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, obj, indent: int = 2):
    """obj as JSON, atomically (atomic_write)."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent, default=str)
    atomic_write(path, write)


# ---- checkpoints: one folder per save, renamed into place whole

CHECKPOINT = re.compile(r"checkpoint-(\d{6,})")
CHECKPOINT_FILES = ("adapters.safetensors", "optimizer.safetensors", "run.json")


def checkpoints(run: str) -> list[str]:
    """The run's complete checkpoint folders, oldest first (a save is written elsewhere, then renamed)."""
    found = [(int(m.group(1)), n) for n in os.listdir(run) if (m := CHECKPOINT.fullmatch(n))] \
        if os.path.isdir(run) else []
    return [os.path.join(run, n) for _, n in sorted(found)]


def latest_checkpoint(run: str) -> str | None:
    """The newest complete checkpoint folder of a run, or None."""
    found = checkpoints(run)
    return found[-1] if found else None


def save_checkpoint(run: str, step: int, files: dict, keep: int = 2) -> str:
    """Write a checkpoint as one unit: files {name: write(path)} into a fresh hidden folder, then one
    rename makes it run/checkpoint-STEP. A fault or a kill mid-save leaves the previous checkpoint the
    newest complete one. Keeps the newest `keep`."""
    final = os.path.join(run, f"checkpoint-{step:06d}")
    tmp = tempfile.mkdtemp(dir=run, prefix=f".checkpoint-{step:06d}.")
    try:
        for name, write in files.items():
            write(os.path.join(tmp, name))
        os.chmod(tmp, 0o755)
        if os.path.exists(final):  # the same step saved again (a resumed run): the new one replaces it
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoints(run)[:-keep]:
        shutil.rmtree(old)
    return final


def read_settings(run: str) -> tuple[str, dict]:
    """(folder holding the run's adapters and run.json, its settings): the newest checkpoint's, or the run
    folder's own files for a run saved without checkpoints."""
    from qwen import read_json
    folder = latest_checkpoint(run) or run
    path = os.path.join(folder, "run.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run}: no run here (no checkpoint-* folder or run.json): train one with "
                                "train.py --out, or name its folder")
    settings = read_json(path)
    if not isinstance(settings, dict) or "lora" not in settings:
        raise ValueError(f"{path}: not a run.json written by train.py (no 'lora' settings)")
    return folder, settings


def load_run(run: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Rebuild a trained LayerRoute from its run folder alone: (model in eval mode, tokenizer or None, settings)."""
    from qwen import QwenConfig, load_model, load_tokenizer, random_model
    folder, settings = read_settings(run)
    if settings.get("random_init"):
        base, tok = random_model(QwenConfig.from_json(settings["random_init"]), device, dtype, settings["seed"]), None
    else:
        base, tok = load_model(settings["model"], device, dtype), load_tokenizer(settings["model"])
    model = LayerRoute(base, **settings["lora"])
    load_adapters(model, os.path.join(folder, "adapters.safetensors"))
    return model.to(device).eval(), tok, settings


# ---- exports

def export_peft(model: LayerRoute, base_model: str, out: str):
    """The LoRA of a run as a PEFT adapter (adapter_config.json + adapter_model.safetensors) that
    `peft.PeftModel.from_pretrained` loads onto transformers' model of base_model: the LoRA-only model,
    every block on. Routing does not carry over (PEFT has no gates)."""
    s = model.settings
    tensors = {}
    for name, p in model.named_parameters():
        if ".lora_A" in name or ".lora_B" in name:  # base.layers.0.self_attn.q_proj.lora_A -> PEFT's key
            tensors[f"base_model.model.model.{name[len('base.'):]}.weight"] = p.detach().float().contiguous().cpu()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": s["rank"], "lora_alpha": s["alpha"], "lora_dropout": s["dropout"], "bias": "none",
              "target_modules": sorted(n for _, names in LORA_TARGETS[s["targets"]] for n in names),
              "fan_in_fan_out": False, "inference_mode": True}
    os.makedirs(out, exist_ok=True)
    atomic_write(os.path.join(out, "adapter_model.safetensors"), lambda tmp: save_file(tensors, tmp))
    write_json(os.path.join(out, "adapter_config.json"), config)


MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def export_merged(model: LayerRoute, base_model: str, out: str):
    """The run as a checkpoint in the official layout, LoRA folded into the weights (W + scale * B @ A):
    config.json, tokenizer files and model.safetensors, which qwen.py and transformers load as the LoRA-only
    model; and routers.safetensors with layerroute.json beside them, so that load_merged gives back the
    routed model."""
    from qwen import resolve
    source = resolve(base_model)
    os.makedirs(out, exist_ok=True)
    for name in MODEL_FILES:
        if os.path.exists(os.path.join(source, name)):
            shutil.copyfile(os.path.join(source, name), os.path.join(out, name))
    merged = {}
    with torch.no_grad():
        for name, m in model.base.named_modules():
            if isinstance(m, LoRALinear) and m.base_weight is None:
                merged[f"{name}.weight"] = m.weight.float() + m.scale * m.lora_B.float() @ m.lora_A.float()
        tensors = {}
        for name, t in model.base.state_dict().items():
            if ".lora_" in name or (name == "lm_head.weight" and model.base.cfg.tie_word_embeddings):
                continue
            key = name if name.startswith("lm_head.") else f"model.{name}"
            tensors[key] = merged.get(name, t).to(t.dtype).contiguous().cpu()
    atomic_write(os.path.join(out, "model.safetensors"),
                 lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    routers = {n: p.detach().float().contiguous().cpu() for n, p in model.routers.named_parameters()}
    atomic_write(os.path.join(out, "routers.safetensors"), lambda tmp: save_file(routers, tmp))
    write_json(os.path.join(out, "layerroute.json"), {"pooling": model.pooling, "threshold": model.threshold,
                                                      "gate_unit": model.gate_unit})


def load_merged(folder: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LayerRoute:
    """The routed model of an export_merged folder: its checkpoint (LoRA inside) with the routers beside it."""
    from qwen import load_model, read_json
    settings = read_json(os.path.join(folder, "layerroute.json"))
    model = LayerRoute(load_model(folder, device, dtype), rank=1, alpha=1.0, pooling=settings["pooling"],
                       gate_unit=settings.get("gate_unit", "block"))
    model.lora(False)  # the update is in the weights already
    tensors = load_file(os.path.join(folder, "routers.safetensors"))
    with torch.no_grad():
        for n, p in model.routers.named_parameters():
            p.copy_(tensors[n])
    model.threshold = settings["threshold"]
    return model.to(device).eval()


def main(argv=None):
    from qwen import Parser
    p = Parser(description="Export a trained run.")
    sub = p.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="a run as a PEFT adapter or a merged checkpoint")
    export.add_argument("--run", required=True, help="a run folder written by train.py")
    export.add_argument("--peft", metavar="OUT", help="folder for adapter_config.json and "
                        "adapter_model.safetensors (the LoRA-only model: PEFT has no routing)")
    export.add_argument("--merged", metavar="OUT", help="folder for a checkpoint with LoRA folded in (what "
                        "transformers loads is the LoRA-only model), the routers beside it (lr.load_merged)")
    args = p.parse_args(argv)
    if not (args.peft or args.merged):
        p.error("export: give --peft OUT, --merged OUT or both")
    model, _, settings = load_run(args.run)
    if settings.get("random_init"):
        raise ValueError(f"{args.run}: trained on random weights (--random-init): no checkpoint to adapt")
    if args.peft:
        export_peft(model, settings["model"], args.peft)
        print(f"wrote {args.peft}: PEFT loads it onto {settings['model']} (LoRA only, every block on)")
    if args.merged:
        export_merged(model, settings["model"], args.merged)
        print(f"wrote {args.merged}: a checkpoint with LoRA folded in (LoRA only, every block on, for "
              "transformers); layerroute.load_merged adds the routers")


if __name__ == "__main__":
    from qwen import cli
    cli(main)
