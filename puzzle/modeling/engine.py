"""A generation loop that runs a :class:`DeciLMForCausalLM` the way a serving engine does.

Measured costs are only worth something when the loop that measures them is not itself the
bottleneck: a Python loop over transformers' ``generate()`` spends most of a decode step
launching kernels, so its "throughput" says little about the GPU. This engine keeps the
model's mathematics and drops the overhead:

* **Static KV cache**: one preallocated ``[batch, kv_heads, capacity, head_dim]`` K and V
  tensor per GQA layer (slots numbered like the model's ``layer_idx``: linear and no-op
  attention have none), written in place at the current position.
* **Fused weights**: Q, K and V projections in one matrix, the FFN's gate and up projections
  in one matrix, the residual add fused into the output GEMM (``addmm``).
* **CUDA graphs** (on GPU): the prefill is one graph, and every decode step replays a graph
  captured for its *context bucket*: attention reads the cache cut to the next multiple of
  ``bucket`` (128) positions at or above the current length, with an additive mask for the
  unfilled tail, so a step reads only (about) the filled part of the cache. All sequences of a
  batch have the same length, as in a batched benchmark.
* Decode attention folds the query heads of each KV group into the query-length dimension
  (one query token per sequence), so grouped-query attention needs no K/V expansion.
* bfloat16 on CUDA by default, float32 on CPU; greedy (argmax) decoding; a warm-up before
  timing; medians over repeats. On CPU there are no graphs and attention reads exactly the
  filled prefix (``bucket=1``), which is what the tests compare with ``model.generate``.

A workload is ``batch_size`` prompts of ``prompt_len`` tokens, each followed by ``gen_len``
generated tokens: the prefill produces the first generated token, then ``gen_len - 1`` decode
steps produce the rest. :func:`measure_throughput` reports ``throughput`` = ``batch_size x
gen_len / (prefill + decode time)`` in generated tokens per second (the end-to-end rate of the
batch, which is what the cost tables predict), and ``decode_throughput`` = ``batch_size x
(gen_len - 1) / decode time``.
"""

from __future__ import annotations

import functools
import logging
import math
import platform
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, overload

import torch
import torch.nn.functional as F

from puzzle.errors import PuzzleError
from puzzle.modeling import BlockConfig, DeciLMConfig
from puzzle.modeling.devices import resolve_device, resolve_dtype

log = logging.getLogger(__name__)

BUCKET = 128
"""Decode graphs on GPU attend over the cache cut to a multiple of this many positions."""


class EngineError(PuzzleError, ValueError):
    """The engine cannot run this model or workload; the message names the field and the fix."""


# --------------------------------------------------------------------------- devices


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def _driver_version() -> str | None:
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # noqa: BLE001 - optional dependency; fall back to nvidia-smi
        pass
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = (
                subprocess.run(
                    [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=20,
                    check=True,
                )
                .stdout.strip()
                .splitlines()
            )
            if out:
                return out[0].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        # CUDA driver API version, e.g. 13000 (a private binding torch's stubs do not declare)
        cuda_driver = torch._C._cuda_getDriverVersion()  # type: ignore[attr-defined]
        return f"cuda-driver-api-{cuda_driver}"
    except Exception:  # noqa: BLE001
        return None


def hardware_identity(device: torch.device, dtype: torch.dtype, backend: str = "torch") -> dict[str, Any]:
    """What a measurement is only valid on: device, driver, software, dtype, measuring backend."""
    name = device_name(device)
    return {
        "device": str(device),
        "device_type": device.type,
        "name": name,
        "device_name": name,
        "driver": _driver_version() if device.type == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "dtype": str(dtype).removeprefix("torch."),
        "backend": backend,
        "host": socket.gethostname(),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
    }


# --------------------------------------------------------------------------- weights


@dataclass
class AttentionWeights:
    """A GQA attention sub-block with Q, K and V fused into one projection."""

    norm: torch.Tensor
    qkv: torch.Tensor  # [(heads + 2 kv_heads) * head_dim, hidden]
    qkv_bias: torch.Tensor | None
    o: torch.Tensor  # [hidden, heads * head_dim]
    o_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    num_kv_heads: int
    slot: int  # this layer's KV-cache slot


@dataclass
class LinearWeights:
    """A linear attention or linear FFN sub-block: one H x H matrix after the norm."""

    norm: torch.Tensor
    weight: torch.Tensor


@dataclass
class MLPWeights:
    """A SwiGLU FFN with gate and up fused into one projection."""

    norm: torch.Tensor
    gate_up: torch.Tensor  # [2 * width, hidden]
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor  # [hidden, width]
    down_bias: torch.Tensor | None


@dataclass
class EngineLayer:
    attention: AttentionWeights | LinearWeights | None
    ffn: MLPWeights | LinearWeights | None


@dataclass
class EngineWeights:
    """Everything one decode step reads, on one device, in one dtype."""

    config: DeciLMConfig
    embed: torch.Tensor
    norm: torch.Tensor
    lm_head: torch.Tensor
    layers: list[EngineLayer]
    device: torch.device
    dtype: torch.dtype

    @property
    def num_slots(self) -> int:
        return sum(isinstance(layer.attention, AttentionWeights) for layer in self.layers)

    def parameter_bytes(self) -> int:
        """Bytes of every weight (tied embeddings counted once)."""
        seen: set[int] = set()
        total = 0
        for t in self._tensors():
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total

    def bytes_read_per_decode_step(self, batch_size: int) -> int:
        """Weights a decode step reads: all but the embedding table (only ``batch_size`` rows)."""
        embed = self.embed.numel() * self.embed.element_size()
        tied = self.lm_head.data_ptr() == self.embed.data_ptr()
        rows = batch_size * self.embed.shape[1] * self.embed.element_size()
        return self.parameter_bytes() - (0 if tied else embed) + (0 if tied else rows)

    def _tensors(self) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = [self.embed, self.norm, self.lm_head]
        for layer in self.layers:
            for part in (layer.attention, layer.ffn):
                if part is not None:
                    out.extend(
                        getattr(part, f)
                        for f in part.__dataclass_fields__
                        if isinstance(getattr(part, f), torch.Tensor)
                    )
        return out

    @classmethod
    def from_model(cls, model: Any, *, device: torch.device, dtype: torch.dtype) -> EngineWeights:
        """Copies of a :class:`DeciLMForCausalLM`'s weights, fused, on ``device`` in ``dtype``."""
        from puzzle.modeling.modeling_decilm import (
            DeciLMAttention,
            DeciLMLinearAttention,
            DeciLMLinearMLP,
            DeciLMMLP,
        )

        @overload
        def take(t: torch.Tensor) -> torch.Tensor: ...
        @overload
        def take(t: torch.Tensor | None) -> torch.Tensor | None: ...
        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().to(device=device, dtype=dtype)

        @overload
        def cat(*ts: torch.Tensor) -> torch.Tensor: ...
        @overload
        def cat(*ts: torch.Tensor | None) -> torch.Tensor | None: ...
        def cat(*ts: torch.Tensor | None) -> torch.Tensor | None:
            if any(t is None for t in ts):
                return None
            return torch.cat([t.detach().to(device=device, dtype=dtype) for t in ts], dim=0)  # type: ignore[union-attr]

        config = model.config
        layers: list[EngineLayer] = []
        with torch.no_grad():
            for layer in model.model.layers:
                attention: AttentionWeights | LinearWeights | None = None
                attn = layer.self_attn
                if isinstance(attn, DeciLMAttention):
                    attention = AttentionWeights(
                        norm=take(layer.input_layernorm.weight),
                        qkv=cat(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight),
                        qkv_bias=cat(attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias),
                        o=take(attn.o_proj.weight),
                        o_bias=take(attn.o_proj.bias),
                        q_norm=take(attn.q_norm.weight) if config.qk_norm else None,
                        k_norm=take(attn.k_norm.weight) if config.qk_norm else None,
                        num_kv_heads=attn.num_key_value_heads,
                        slot=attn.layer_idx,
                    )
                elif isinstance(attn, DeciLMLinearAttention):
                    attention = LinearWeights(
                        norm=take(layer.input_layernorm.weight), weight=take(attn.linear_attn.weight)
                    )
                elif attn is not None:
                    raise EngineError(f"unsupported attention module {type(attn).__name__}")
                ffn: MLPWeights | LinearWeights | None = None
                mlp = layer.mlp
                if isinstance(mlp, DeciLMMLP):
                    ffn = MLPWeights(
                        norm=take(layer.post_attention_layernorm.weight),
                        gate_up=cat(mlp.gate_proj.weight, mlp.up_proj.weight),
                        gate_up_bias=cat(mlp.gate_proj.bias, mlp.up_proj.bias),
                        down=take(mlp.down_proj.weight),
                        down_bias=take(mlp.down_proj.bias),
                    )
                elif isinstance(mlp, DeciLMLinearMLP):
                    ffn = LinearWeights(
                        norm=take(layer.post_attention_layernorm.weight), weight=take(mlp.linear_mlp.weight)
                    )
                elif mlp is not None:
                    raise EngineError(f"unsupported FFN module {type(mlp).__name__}")
                layers.append(EngineLayer(attention, ffn))
            embed = take(model.model.embed_tokens.weight)
            tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
            lm_head = embed if tied else take(model.lm_head.weight)
            norm = take(model.model.norm.weight)
        return cls(config, embed, norm, lm_head, layers, device, dtype)

    @classmethod
    def random(
        cls,
        config: DeciLMConfig,
        *,
        device: torch.device,
        dtype: torch.dtype,
        seed: int = 0,
        fixed_from: EngineWeights | None = None,
    ) -> EngineWeights:
        """Random weights of ``config``'s shapes (speed does not depend on the values).

        ``fixed_from``: reuse that model's embeddings, final norm and LM head (same shapes), which
        saves memory and time when many models of one parent are measured one after another.
        """
        gen = torch.Generator(device=device).manual_seed(seed)
        hidden = config.hidden_size

        def rand(*shape: int) -> torch.Tensor:
            t = torch.empty(*shape, device=device, dtype=dtype)
            return t.normal_(0.0, 0.02, generator=gen)

        def ones(n: int) -> torch.Tensor:
            return torch.ones(n, device=device, dtype=dtype)

        layers: list[EngineLayer] = []
        slot = 0
        for block in config.blocks:
            layers.append(
                EngineLayer(
                    _random_attention(block, config, rand, ones, slot), _random_ffn(block, config, rand, ones)
                )
            )
            slot += int(block.attention.is_gqa)
        if fixed_from is not None:
            return cls(config, fixed_from.embed, fixed_from.norm, fixed_from.lm_head, layers, device, dtype)
        embed = rand(config.vocab_size, hidden)
        lm_head = embed if config.tie_word_embeddings else rand(config.vocab_size, hidden)
        return cls(config, embed, ones(hidden), lm_head, layers, device, dtype)


def _random_attention(
    block: BlockConfig,
    config: DeciLMConfig,
    rand: Callable[..., torch.Tensor],
    ones: Callable[[int], torch.Tensor],
    slot: int,
) -> AttentionWeights | LinearWeights | None:
    hidden, heads, hd = config.hidden_size, config.num_attention_heads, config.head_dim
    a = block.attention
    if a.no_op:
        return None
    if a.linear:
        return LinearWeights(norm=ones(hidden), weight=rand(hidden, hidden))
    kv = a.num_kv_heads or 0
    rows = (heads + 2 * kv) * hd
    return AttentionWeights(
        norm=ones(hidden),
        qkv=rand(rows, hidden),
        qkv_bias=rand(rows) if config.qkv_bias else None,
        o=rand(hidden, heads * hd),
        o_bias=rand(hidden) if config.o_proj_bias else None,
        q_norm=ones(hd) if config.qk_norm else None,
        k_norm=ones(hd) if config.qk_norm else None,
        num_kv_heads=kv,
        slot=slot,
    )


def _random_ffn(
    block: BlockConfig,
    config: DeciLMConfig,
    rand: Callable[..., torch.Tensor],
    ones: Callable[[int], torch.Tensor],
) -> MLPWeights | LinearWeights | None:
    hidden = config.hidden_size
    f = block.ffn
    if f.no_op:
        return None
    if f.linear:
        return LinearWeights(norm=ones(hidden), weight=rand(hidden, hidden))
    width = f.intermediate_size or 0
    return MLPWeights(
        norm=ones(hidden),
        gate_up=rand(2 * width, hidden),
        gate_up_bias=rand(2 * width) if config.mlp_bias else None,
        down=rand(hidden, width),
        down_bias=rand(hidden) if config.mlp_bias else None,
    )


# --------------------------------------------------------------------------- the math


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (one fused kernel on CUDA)."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) * sin == roll(x) * signed_sin``."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), signed_sin)


def _add_linear_(
    residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``residual += x @ weight.T (+ bias)`` in place: the residual add is the GEMM's accumulation."""
    flat = residual.view(-1, residual.shape[-1])
    flat.addmm_(x.reshape(-1, x.shape[-1]), weight.t())
    if bias is not None:
        flat.add_(bias)
    return residual


def _silu_mul(gate_up: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    width = gate_up.shape[-1] // 2
    return act(gate_up[..., :width]) * gate_up[..., width:]


def _activation(config: DeciLMConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    if config.hidden_act == "silu":
        return F.silu
    from transformers.activations import ACT2FN

    return ACT2FN[config.hidden_act]


def rope_tables(
    config: DeciLMConfig, length: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin ``[length, head_dim]`` (as the model computes them per position; the
    first half of sin negated, see :func:`rope`)."""
    from puzzle.modeling.modeling_decilm import DeciLMRotaryEmbedding

    rotary = DeciLMRotaryEmbedding(config)
    positions = torch.arange(length, dtype=torch.float32)
    freqs = positions[:, None] * rotary.inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * rotary.attention_scaling).to(device=device, dtype=dtype)
    sin = emb.sin() * rotary.attention_scaling
    half = sin.shape[-1] // 2
    signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1).to(device=device, dtype=dtype)
    return cos, signed_sin


# --------------------------------------------------------------------------- a batch in flight


def round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def decode_contexts(prompt_len: int, gen_len: int) -> list[int]:
    """Context length (filled cache positions) of each of the ``gen_len - 1`` decode steps."""
    return [prompt_len + i + 1 for i in range(gen_len - 1)]


class Session:
    """One batch in flight: the static KV cache, the token and position buffers, the graphs.

    ``prefill(ids)`` fills the cache with the prompts and leaves the first generated token in
    ``tokens``; each ``step()`` feeds ``tokens`` at the current position and leaves the next one.
    """

    def __init__(
        self,
        weights: EngineWeights,
        *,
        batch_size: int,
        max_len: int,
        graphs: bool | None = None,
        bucket: int | None = None,
    ) -> None:
        cfg = weights.config
        if cfg.sliding_window and max_len > cfg.sliding_window:
            raise EngineError(
                f"prompt_len + gen_len = {max_len} exceeds the model's sliding window "
                f"({cfg.sliding_window}); "
                "the engine keeps the whole context: use a shorter workload"
            )
        self.weights = weights
        self.config = cfg
        self.device = weights.device
        self.dtype = weights.dtype
        self.batch_size = batch_size
        self.graphs = (self.device.type == "cuda") if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise EngineError("CUDA graphs need a CUDA device; pass graphs=False on CPU")
        self.bucket = bucket if bucket is not None else (BUCKET if self.graphs else 1)
        self.capacity = round_up(max_len, self.bucket)
        self.max_len = max_len
        hd = cfg.head_dim
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        for layer in weights.layers:
            if isinstance(layer.attention, AttentionWeights):
                shape = (batch_size, layer.attention.num_kv_heads, self.capacity, hd)
                self.k_cache.append(torch.zeros(shape, device=self.device, dtype=self.dtype))
                self.v_cache.append(torch.zeros(shape, device=self.device, dtype=self.dtype))
        self.cos, self.sin = rope_tables(cfg, self.capacity, self.device, self.dtype)
        self.positions = torch.arange(self.capacity, device=self.device)
        self.tokens = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.pos_host = 0
        self.act = _activation(cfg)
        self._prompt: torch.Tensor | None = None
        self._prefill_graph: torch.cuda.CUDAGraph | None = None
        self._decode_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None

    @property
    def kv_cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k_cache, *self.v_cache))

    # ----------------------------------------------------------------- forward passes

    def _forward_prefill(self, ids: torch.Tensor) -> None:
        cfg, w = self.config, self.weights
        batch, length = ids.shape
        eps, heads, hd = cfg.rms_norm_eps, cfg.num_attention_heads, cfg.head_dim
        x = F.embedding(ids, w.embed)
        cos = self.cos[:length].view(1, length, 1, hd)
        sin = self.sin[:length].view(1, length, 1, hd)
        for layer in w.layers:
            a = layer.attention
            if isinstance(a, AttentionWeights):
                kv = a.num_kv_heads
                qkv = F.linear(rms_norm(x, a.norm, eps), a.qkv, a.qkv_bias).view(
                    batch, length, heads + 2 * kv, hd
                )
                q, k, v = self._qk_rope(qkv, a, cos, sin, heads, kv)
                q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
                self.k_cache[a.slot][:, :, :length].copy_(k)
                self.v_cache[a.slot][:, :, :length].copy_(v)
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv != heads)
                x = _add_linear_(x, o.transpose(1, 2).reshape(batch, length, heads * hd), a.o, a.o_bias)
            elif isinstance(a, LinearWeights):
                x = _add_linear_(x, rms_norm(x, a.norm, eps), a.weight, None)
            x = self._ffn(x, layer.ffn, eps)
        last = rms_norm(x[:, -1], w.norm, eps)
        self.tokens.copy_(F.linear(last, w.lm_head).argmax(-1))
        self.pos.fill_(length)

    def _forward_decode(self, length: int) -> None:
        """One decode step attending over the first ``length`` cache positions."""
        cfg, w = self.config, self.weights
        batch = self.batch_size
        eps, heads, hd = cfg.rms_norm_eps, cfg.num_attention_heads, cfg.head_dim
        x = F.embedding(self.tokens, w.embed)
        cos = self.cos.index_select(0, self.pos).view(1, 1, hd)
        sin = self.sin.index_select(0, self.pos).view(1, 1, hd)
        mask = None
        if self.bucket > 1:
            mask = torch.zeros(length, device=self.device, dtype=self.dtype)
            mask.masked_fill_(self.positions[:length] > self.pos, float("-inf"))
            mask = mask.view(1, 1, 1, length)
        for layer in w.layers:
            a = layer.attention
            if isinstance(a, AttentionWeights):
                kv = a.num_kv_heads
                qkv = F.linear(rms_norm(x, a.norm, eps), a.qkv, a.qkv_bias).view(batch, heads + 2 * kv, hd)
                q, k, v = self._qk_rope(qkv, a, cos, sin, heads, kv)
                kc, vc = self.k_cache[a.slot], self.v_cache[a.slot]
                kc.index_copy_(2, self.pos, k.unsqueeze(2))
                vc.index_copy_(2, self.pos, v.unsqueeze(2))
                # One query token: the heads sharing a KV head become that head's query rows.
                q = q.reshape(batch, kv, heads // kv, hd)
                o = F.scaled_dot_product_attention(q, kc[:, :, :length], vc[:, :, :length], attn_mask=mask)
                x = _add_linear_(x, o.reshape(batch, heads * hd), a.o, a.o_bias)
            elif isinstance(a, LinearWeights):
                x = _add_linear_(x, rms_norm(x, a.norm, eps), a.weight, None)
            x = self._ffn(x, layer.ffn, eps)
        logits = F.linear(rms_norm(x, w.norm, eps), w.lm_head)
        self.tokens.copy_(logits.argmax(-1))
        self.pos.add_(1)

    def _qk_rope(
        self,
        qkv: torch.Tensor,
        a: AttentionWeights,
        cos: torch.Tensor,
        sin: torch.Tensor,
        heads: int,
        kv: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        v = qkv[..., heads + kv :, :]
        if a.q_norm is None:
            qk = rope(qkv[..., : heads + kv, :], cos, sin)
            return qk[..., :heads, :], qk[..., heads:, :], v
        eps = self.config.rms_norm_eps
        q = rope(rms_norm(qkv[..., :heads, :], a.q_norm, eps), cos, sin)
        k = rope(rms_norm(qkv[..., heads : heads + kv, :], a.k_norm, eps), cos, sin)  # type: ignore[arg-type]
        return q, k, v

    def _ffn(self, x: torch.Tensor, f: MLPWeights | LinearWeights | None, eps: float) -> torch.Tensor:
        if isinstance(f, MLPWeights):
            h = _silu_mul(F.linear(rms_norm(x, f.norm, eps), f.gate_up, f.gate_up_bias), self.act)
            return _add_linear_(x, h, f.down, f.down_bias)
        if isinstance(f, LinearWeights):
            return _add_linear_(x, rms_norm(x, f.norm, eps), f.weight, None)
        return x

    # ----------------------------------------------------------------- graphs

    def _capture(self, fn: Callable[[], None]) -> torch.cuda.CUDAGraph:
        # Warm-up runs write tokens, position and cache; put back what a generation in flight needs.
        saved, saved_tokens = self.pos_host, self.tokens.clone()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            fn()
        self.pos.fill_(saved)
        self.tokens.copy_(saved_tokens)
        return graph

    def bucket_for(self, context: int) -> int:
        """Cache positions a decode step reads when ``context`` positions are filled."""
        if context > self.capacity:
            raise EngineError(f"context {context} exceeds the session's capacity {self.capacity}")
        return min(self.capacity, round_up(context, self.bucket))

    def prepare(self, prompt_len: int, contexts: list[int]) -> None:
        """Capture the prefill graph and the decode graphs these contexts need (GPU only)."""
        if not self.graphs:
            return
        if self._prompt is None or self._prompt.shape[1] != prompt_len:
            self._prompt = torch.zeros(self.batch_size, prompt_len, dtype=torch.long, device=self.device)
            self._prefill_graph = self._capture(lambda: self._forward_prefill(self._prompt))  # type: ignore[arg-type]
        for length in sorted({self.bucket_for(c) for c in contexts}):
            if length not in self._decode_graphs:
                self._decode_graphs[length] = self._capture(functools.partial(self._forward_decode, length))

    # ----------------------------------------------------------------- public steps

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> None:
        if ids.shape[0] != self.batch_size:
            raise EngineError(f"prompt batch is {ids.shape[0]}, the session was made for {self.batch_size}")
        if ids.shape[1] >= self.capacity:
            raise EngineError(f"prompt of {ids.shape[1]} tokens leaves no room in a cache of {self.capacity}")
        if self.graphs:
            self.prepare(ids.shape[1], [])
            assert self._prompt is not None and self._prefill_graph is not None
            self._prompt.copy_(ids)
            self._prefill_graph.replay()
        else:
            self._forward_prefill(ids.to(self.device))
        self.pos_host = ids.shape[1]

    @torch.no_grad()
    def step(self) -> None:
        length = self.bucket_for(self.pos_host + 1)
        if self.graphs:
            graph = self._decode_graphs.get(length)
            if graph is None:
                self.prepare(self._prompt.shape[1] if self._prompt is not None else 1, [self.pos_host + 1])
                graph = self._decode_graphs[length]
            graph.replay()
        else:
            self._forward_decode(length)
        self.pos_host += 1

    def set_position(self, position: int) -> None:
        """Make the next step feed ``tokens`` at ``position`` (for timing one context length)."""
        self.pos.fill_(position)
        self.pos_host = position

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, gen_len: int) -> torch.Tensor:
        """Greedy continuation ``[batch, gen_len]`` of ``ids``."""
        out = torch.empty(self.batch_size, gen_len, dtype=torch.long, device=self.device)
        self.prefill(ids)
        out[:, 0].copy_(self.tokens)
        for i in range(1, gen_len):
            self.step()
            out[:, i].copy_(self.tokens)
        return out


# --------------------------------------------------------------------------- timing


class Timer:
    """Wall time on CPU, CUDA events on GPU (no synchronisation inside the timed region)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            return event
        return time.perf_counter()

    def seconds(self, start: Any, end: Any) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        return end - start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_workload(session: Session, ids: torch.Tensor, gen_len: int) -> dict[str, Any]:
    """One timed generation: prefill (first token) then ``gen_len - 1`` decode steps."""
    timer = Timer(session.device)
    out = torch.empty(session.batch_size, gen_len, dtype=torch.long, device=session.device)
    synchronize(session.device)
    t0 = timer.mark()
    session.prefill(ids)
    t1 = timer.mark()
    out[:, 0].copy_(session.tokens)
    for i in range(1, gen_len):
        session.step()
        out[:, i].copy_(session.tokens)
    t2 = timer.mark()
    prefill_s = timer.seconds(t0, t1)
    decode_s = timer.seconds(t1, t2)
    return {"tokens": out, "prefill_s": prefill_s, "decode_s": decode_s}


def time_prefill(session: Session, ids: torch.Tensor, *, iters: int) -> float:
    """Seconds per prefill of ``ids`` (mean over ``iters`` back-to-back runs)."""
    timer = Timer(session.device)
    if session.device.type == "cuda":
        session.prefill(ids)  # warm (graphs captured, clocks up)
    synchronize(session.device)
    start = timer.mark()
    for _ in range(iters):
        session.prefill(ids)
    return timer.seconds(start, timer.mark()) / iters


def time_decode(session: Session, context: int, *, iters: int) -> float:
    """Seconds per decode step when ``context`` cache positions are filled (after the step)."""
    timer = Timer(session.device)
    if session.device.type == "cuda":
        session.set_position(context - 1)
        session.step()  # warm (graphs captured, clocks up)
    synchronize(session.device)
    start = timer.mark()
    for _ in range(iters):
        session.set_position(context - 1)
        session.step()
    return timer.seconds(start, timer.mark()) / iters


def random_prompts(
    vocab_size: int, batch_size: int, prompt_len: int, device: torch.device, seed: int = 0
) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch_size, prompt_len), generator=gen).to(device)


def check_workload(*, batch_size: int, prompt_len: int, gen_len: int, repeats: int) -> None:
    for name, value in (
        ("batch_size", batch_size),
        ("prompt_len", prompt_len),
        ("gen_len", gen_len),
        ("repeats", repeats),
    ):
        if not isinstance(value, int) or value <= 0:
            raise EngineError(f"{name} must be a positive integer, got {value!r}")


def measure_weights(
    weights: EngineWeights,
    *,
    batch_size: int,
    prompt_len: int,
    gen_len: int,
    repeats: int,
    graphs: bool | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Throughput of ``weights`` at the workload: a warm-up, then medians over ``repeats`` runs."""
    check_workload(batch_size=batch_size, prompt_len=prompt_len, gen_len=gen_len, repeats=repeats)
    device = weights.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    session = Session(weights, batch_size=batch_size, max_len=prompt_len + gen_len, graphs=graphs)
    ids = random_prompts(weights.config.vocab_size, batch_size, prompt_len, device, seed)
    started = time.perf_counter()
    session.prepare(prompt_len, decode_contexts(prompt_len, gen_len))
    run_workload(session, ids, min(gen_len, 4))  # warm-up
    warmup_s = time.perf_counter() - started
    runs = [run_workload(session, ids, gen_len) for _ in range(repeats)]
    prefill_s = statistics.median(r["prefill_s"] for r in runs)
    decode_s = statistics.median(r["decode_s"] for r in runs)
    totals = sorted(r["prefill_s"] + r["decode_s"] for r in runs)
    total_s = statistics.median(totals)
    contexts = decode_contexts(prompt_len, gen_len)
    mean_context = sum(contexts) / len(contexts) if contexts else prompt_len
    kv_per_token = sum(t.shape[1] * t.shape[3] * t.element_size() * 2 for t in session.k_cache)
    result = {
        "throughput": batch_size * gen_len / total_s,
        "decode_throughput": batch_size * (gen_len - 1) / decode_s if gen_len > 1 and decode_s > 0 else None,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "total_s": total_s,
        "decode_step_s": decode_s / (gen_len - 1) if gen_len > 1 else None,
        "warmup_s": warmup_s,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "parameter_bytes": weights.parameter_bytes(),
        "kv_cache_bytes": batch_size * (prompt_len + gen_len) * kv_per_token,
        "decode_bytes_per_step": weights.bytes_read_per_decode_step(batch_size)
        + int(batch_size * mean_context * kv_per_token),
        "device": str(device),
        "device_name": device_name(device),
        "dtype": str(weights.dtype).removeprefix("torch."),
        "graphs": session.graphs,
        "batch_size": batch_size,
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "repeats": repeats,
        "tokens": runs[-1]["tokens"].cpu(),
    }
    del session
    return result


def measure_throughput(
    model: Any,
    *,
    batch_size: int,
    prompt_len: int,
    gen_len: int,
    device: str | torch.device = "auto",
    repeats: int,
    dtype: str | torch.dtype | None = None,
    graphs: bool | None = None,
) -> dict[str, Any]:
    """Measured speed of ``model`` (a :class:`DeciLMForCausalLM`) at a workload on ``device``.

    Copies the weights into the engine's fused layout (``dtype``: default bfloat16 on CUDA,
    float32 on CPU), runs a warm-up and ``repeats`` timed generations of ``gen_len`` tokens after
    ``batch_size`` random prompts of ``prompt_len`` tokens, and returns medians: ``throughput``
    (``batch x gen_len / total_s``, generated tokens/s), ``decode_throughput``, ``prefill_s``,
    ``decode_s``, ``total_s``, ``peak_memory_bytes`` (CUDA; None on CPU), ``device_name``, and
    the generated ``tokens`` of the last run. The caller's model is not modified.
    """
    check_workload(batch_size=batch_size, prompt_len=prompt_len, gen_len=gen_len, repeats=repeats)
    dev = resolve_device(device)
    weights = EngineWeights.from_model(model, device=dev, dtype=resolve_dtype(dtype, dev))
    result = measure_weights(
        weights, batch_size=batch_size, prompt_len=prompt_len, gen_len=gen_len, repeats=repeats, graphs=graphs
    )
    result.pop("tokens")
    log.info(
        "engine: %s at batch %d: %.1f tokens/s (prefill %.3f s, decode %.3f s)",
        result["device_name"],
        batch_size,
        result["throughput"],
        result["prefill_s"],
        result["decode_s"],
    )
    return result


def copy_bandwidth(device: torch.device, *, megabytes: int = 1024, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting the bytes read and written."""
    n = megabytes * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    timer = Timer(device)
    start = timer.mark()
    for _ in range(iters):
        dst.copy_(src)
    seconds = timer.seconds(start, timer.mark())
    return 2 * n * iters / seconds
