"""Synthetic score and cost tables in the real formats (scores.csv, costs.json), for search tests.

The shapes follow a tiny GQA parent: attention ``attn_kv4`` (parent), ``attn_kv2``, ``attn_kv1``,
``attn_noop``; FFN ``ffn_256`` (parent), ``ffn_128``, ``ffn_64``, ``ffn_noop``. Scores are
decoupled (every attention variant with the parent FFN, every FFN variant with the parent
attention), random but worse for cheaper variants; costs grow with the variant's size and the
batch size, as measured ones do.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

ATTENTION = {"attn_kv4": 1.0, "attn_kv2": 0.75, "attn_kv1": 0.6, "attn_noop": 0.0}
FFN = {"ffn_256": 1.0, "ffn_128": 0.55, "ffn_64": 0.3, "ffn_noop": 0.0}
PARENT = "attn_kv4+ffn_256"


def write_costs(
    path: Path,
    num_layers: int,
    *,
    batch_sizes: tuple[int, ...] = (1, 8),
    gen_len: int = 16,
    device_name: str = "synthetic-gpu",
) -> Path:
    """A ``costs.json`` in :mod:`puzzle.search.costs`' format (no measurement: made-up, size-shaped costs)."""
    subblocks = {}
    sizes = {**{k: v * 4.0 for k, v in ATTENTION.items()}, **{k: v * 6.0 for k, v in FFN.items()}}
    for name, size in {"embeddings_lm_head": 3.0, **sizes}.items():
        kind = (
            "fixed" if name == "embeddings_lm_head" else ("attention" if name.startswith("attn") else "ffn")
        )
        kv = 64 * int(name[len("attn_kv") :]) if name.startswith("attn_kv") else 0
        batches = {}
        for b in batch_sizes:
            prefill = size * (0.2 + 0.05 * b)
            decode = size * (0.05 + 0.002 * b) + kv * 1e-5 * b
            memory_bytes = size * 1e6 + kv * b * 64
            batches[str(b)] = {
                "prefill_ms": prefill,
                "decode_ms": decode,
                "runtime_ms": prefill + (gen_len - 1) * decode,
                "memory_bytes": memory_bytes,
                "memory_mib": memory_bytes / 2**20,
            }
        subblocks[name] = {
            "kind": kind,
            "params": int(size * 1e5),
            "weight_bytes": int(size * 2e5),
            "kv_bytes_per_token": kv,
            "batches": batches,
        }
    data = {
        "format": "puzzle-costs",
        "format_version": 1,
        "hardware": {
            "device_type": "cuda",
            "device_name": device_name,
            "driver": "1.0",
            "torch": "2.x",
            "dtype": "bfloat16",
            "backend": "torch",
        },
        "workload": {
            "batch_sizes": list(batch_sizes),
            "prompt_len": 8,
            "gen_len": gen_len,
            "decode_steps": gen_len - 1,
        },
        "model": {"parent_blocks": [PARENT] * num_layers, "num_layers": num_layers},
        "subblocks": subblocks,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def write_scores(path: Path, num_layers: int, *, seed: int = 0) -> Path:
    """A decoupled ``scores.csv``: parent row (all zeros) plus one row per non-parent sub-block."""
    rng = np.random.default_rng(seed)
    pa, pf = PARENT.split("+")
    rows = []
    for layer in range(num_layers):
        sensitivity = rng.lognormal(0.0, 1.0)
        rows.append(
            {
                "layer": layer,
                "block": PARENT,
                "attention": pa,
                "ffn": pf,
                "kl_div": 0.0,
                "lm_loss": 2.0,
                "top1": 1.0,
            }
        )
        for name, frac in ATTENTION.items():
            if name != pa:
                kl = sensitivity * (1 - frac) ** 1.5 + rng.exponential(0.05)
                rows.append(
                    {
                        "layer": layer,
                        "block": f"{name}+{pf}",
                        "attention": name,
                        "ffn": pf,
                        "kl_div": kl,
                        "lm_loss": 2.0 + kl,
                        "top1": 1.0 - kl / 10,
                    }
                )
        for name, frac in FFN.items():
            if name != pf:
                kl = sensitivity * (1 - frac) ** 1.5 + rng.exponential(0.05)
                rows.append(
                    {
                        "layer": layer,
                        "block": f"{pa}+{name}",
                        "attention": pa,
                        "ffn": name,
                        "kl_div": kl,
                        "lm_loss": 2.0 + kl,
                        "top1": 1.0 - kl / 10,
                    }
                )
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(
            fh, fieldnames=["layer", "block", "attention", "ffn", "kl_div", "lm_loss", "top1"]
        )
        writer.writeheader()
        writer.writerows(rows)
    return path
