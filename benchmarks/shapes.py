"""The model shapes the benchmarks use, and the helpers their scripts share.

:data:`SHAPES` holds the real models' Llama configurations (the benchmarks run random weights of
these shapes: speed does not depend on the values). A script that has always built a shape a
little differently (transformers' default ``rms_norm_eps``, plain RoPE without the llama3
scaling, its own ``max_position_embeddings``) says so in the overrides it passes to
:func:`llama_config`, so that it measures exactly what it measured before.

The scripts run as ``python benchmarks/bench_*.py``, which puts this folder on ``sys.path``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

# Dense bf16 peak of one H100/H200 SXM, in FLOP/s: the denominator of every MFU figure.
PEAK_BF16 = 989e12


def _rope(theta: float, llama3_factor: float | None = None) -> dict[str, Any]:
    """RoPE parameters: plain, or with Llama 3's frequency scaling by ``llama3_factor``."""
    if llama3_factor is None:
        return {"rope_type": "default", "rope_theta": theta}
    return {
        "rope_type": "llama3",
        "rope_theta": theta,
        "factor": llama3_factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "tie_word_embeddings",
)
# One row a model, as its config.json has it (and rms_norm_eps 1e-5 in all); "tiny", no real model, is
# the CPU smoke tests' shape. Columns: (vocab, hidden, FFN, layers, heads, KV heads, max positions,
# tied embeddings), RoPE.
_ROWS: dict[str, tuple[tuple[int | bool, ...], dict[str, Any]]] = {
    "smollm2-135m": ((49152, 576, 1536, 30, 9, 3, 8192, True), _rope(100000.0)),
    "llama-3.2-1b": ((128256, 2048, 8192, 16, 32, 8, 131072, True), _rope(500000.0, llama3_factor=32.0)),
    "llama-3.1-8b": ((128256, 4096, 14336, 32, 32, 8, 131072, False), _rope(500000.0, llama3_factor=8.0)),
    "tiny": ((256, 64, 256, 4, 4, 2, 512, False), _rope(10000.0)),
}
# transformers LlamaConfig keyword arguments of each shape.
SHAPES: dict[str, dict[str, Any]] = {
    name: {**dict(zip(_FIELDS, dims, strict=True)), "rms_norm_eps": 1e-5, "rope_parameters": rope}
    for name, (dims, rope) in _ROWS.items()
}

# transformers' LlamaConfig default, which the GPU forward, GKD and BLD benchmarks have always used.
TRANSFORMERS_RMS_NORM_EPS = 1e-6


def plain_rope(shape: str) -> dict[str, Any]:
    """``shape``'s RoPE base without any scaling (``rope_type`` default)."""
    return _rope(SHAPES[shape]["rope_parameters"]["rope_theta"])


def llama_config(shape: str, **overrides: Any):
    """A transformers ``LlamaConfig`` of ``shape``, with ``overrides`` replacing its fields."""
    from transformers import LlamaConfig

    return LlamaConfig(**{**copy.deepcopy(SHAPES[shape]), **overrides})


def random_parent(shape: str, **overrides: Any):
    """A random float32 Llama of ``shape`` (seed 0) as a DeciLM model, with the BOS/EOS ids (1, 2)
    of :func:`save_tokenizer`'s vocabulary."""
    from transformers import LlamaForCausalLM

    from puzzle.parent import to_decilm

    torch.manual_seed(0)
    return to_decilm(LlamaForCausalLM(llama_config(shape, bos_token_id=1, eos_token_id=2, **overrides)))


def save_tokenizer(directory: Path, vocab_size: int) -> None:
    """A byte-level tokenizer; the benchmarks' tokens are random ids, so its merges do not matter."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(3)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        if len(vocab) >= vocab_size:
            break
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<1>", eos_token="<2>", unk_token="<0>"
    ).save_pretrained(directory)


def save_random_model(
    out: Path | str,
    kind: str,
    parameters: Mapping[str, Any],
    model: Callable[[], Any],
    *,
    shape: str,
    vocab_size: int,
) -> str:
    """A ``kind`` artifact at ``out`` holding ``model()`` (called only when the artifact is not up to
    date) and a byte-level tokenizer; its metadata names it ``random <shape>``."""
    from puzzle.io import artifacts
    from puzzle.modeling.checkpoints import save_model

    def body(staging: Path, _local: dict) -> dict:
        save_model(model(), None, staging, {"reference": f"random {shape}", "family": "llama"})
        save_tokenizer(staging, vocab_size)
        return {}

    artifacts.run_phase(kind, str(out), {}, parameters, body)
    return str(out)


def save_random_tokens(
    out: Path | str,
    *,
    vocab_size: int,
    seq_len: int,
    splits: Mapping[str, int],
    parameters: Mapping[str, Any] | None = None,
    seed: int | None = 0,
) -> str:
    """A tokens artifact of random ids (same layout as :func:`puzzle.data.prepare`), drawn from a
    generator seeded with ``seed``, or from torch's global one when ``seed`` is None."""
    from safetensors.torch import save_file

    from puzzle.io import artifacts

    def body(staging: Path, _local: dict) -> dict:
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        table = {}
        for name, count in splits.items():
            ids = torch.randint(3, vocab_size, (count, seq_len), dtype=torch.int32, generator=gen)
            save_file({"input_ids": ids}, str(staging / f"{name}.safetensors"))
            table[name] = {"file": f"{name}.safetensors", "sequences": count, "tokens": count * seq_len}
        info: dict[str, Any] = {"seq_len": seq_len, "splits": table}
        if seed is not None:
            info["seed"] = seed
        (staging / "splits.json").write_text(json.dumps(info))
        return {}

    params = {"seq_len": seq_len, "splits": dict(splits)} if parameters is None else parameters
    artifacts.run_phase("tokens", str(out), {}, params, body)
    return str(out)


def mfu(flops_per_token: float, tokens_per_s: float, gpus: int = 1) -> float:
    """Model-FLOPs utilisation: achieved model FLOP/s over ``gpus`` cards' dense bf16 peak."""
    return flops_per_token * tokens_per_s / (PEAK_BF16 * gpus)


def print_json(results: Any, path: Path | str | None, **dumps: Any) -> None:
    """Print ``results`` as indented JSON and, with ``path``, also write it there."""
    text = json.dumps(results, indent=2, **dumps)
    print(text, flush=True)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
