"""Export a child as a Hugging Face checkpoint in the Nemotron-NAS (DeciLM) layout.

The checkpoint holds sharded safetensors with Llama weight names, the tokenizer, the generation
config, ``config.json`` with ``block_configs`` and an ``auto_map`` pointing at our modeling code
(copied next to the weights, so ``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`` works on the transformers we pin), and an export report saying, layer
by layer, what each block is and which serving engines can load the child (and why not).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from puzzle import modeling, serving
from puzzle.config import ExportConfig
from puzzle.io import artifacts
from puzzle.modeling import BlockConfig, DeciLMConfig
from puzzle.modeling.checkpoints import (
    CHILD_KIND,
    EXPORT_KIND,
    PARENT_INFO,
    PARENT_KIND,
    count_parameters,
    load_model,
    load_tokenizer,
)
from puzzle.modeling.devices import parse_dtype

log = logging.getLogger(__name__)

REPORT_MD = "EXPORT_REPORT.md"
REPORT_JSON = "export_report.json"
MODELING_FILES = ("block_config.py", "configuration_decilm.py", "modeling_decilm.py")

# Display names of the engines the report judges (the rules: puzzle.serving).
ENGINES = tuple(e.name for e in serving.ENGINES)


@dataclass
class EngineVerdict:
    engine: str
    servable: bool
    reasons: list[str] = field(default_factory=list)

    def line(self) -> str:
        if self.servable:
            return f"{self.engine}: yes"
        return f"{self.engine}: no, " + "; ".join(self.reasons)


def engine_verdicts(config: DeciLMConfig) -> list[EngineVerdict]:
    """Which known readers of the Nemotron-NAS layout can serve this child, and why not
    (:mod:`puzzle.serving`'s rules, the ones ``export.serve_with`` restricts the library by)."""
    verdicts = []
    for engine in serving.ENGINES:
        reasons = serving.reasons(engine.key, config)
        verdicts.append(EngineVerdict(engine.name, not reasons, reasons))
    return verdicts


def layer_table(model: Any) -> list[dict[str, Any]]:
    """One row per layer: attention, FFN and parameter count."""
    rows = []
    for i, layer in enumerate(model.model.layers):
        block: BlockConfig = layer.block
        attn = block.attention
        ffn = block.ffn
        rows.append(
            {
                "layer": i,
                "attention": "no-op"
                if attn.no_op
                else "linear"
                if attn.linear
                else f"GQA, {attn.num_kv_heads} KV heads",
                "ffn": "no-op"
                if ffn.no_op
                else "linear"
                if ffn.linear
                else f"SwiGLU, width {ffn.intermediate_size}",
                "block": block.name,
                "parameters": sum(p.numel() for p in layer.parameters()),
            }
        )
    return rows


def write_engine_config(path: Path, config: DeciLMConfig) -> None:
    """Make ``config.json`` read the same in every engine that knows the layout."""
    data = json.loads(path.read_text())
    data["architectures"] = ["DeciLMForCausalLM"]
    data["model_type"] = "nemotron-nas"
    data["num_key_value_heads"] = None
    data["intermediate_size"] = None
    # Legacy RoPE fields for engines that predate transformers 5's `rope_parameters`.
    rope = dict(config.rope_parameters)
    data["rope_theta"] = rope.get("rope_theta", 10000.0)
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    data["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None
    # vLLM's DeciLM reads `qkv_bias` for q/k/v and `attention_bias` for o_proj.
    data["attention_bias"] = bool(config.o_proj_bias)
    data.setdefault("auto_map", {})
    data["auto_map"].update(
        {
            "AutoConfig": "configuration_decilm.DeciLMConfig",
            "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM",
        }
    )
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def render_report(
    rows: list[dict[str, Any]], verdicts: list[EngineVerdict], total_params: int, meta: dict[str, Any]
) -> str:
    lines = [
        "# Export report",
        "",
        f"- source child: `{meta['child']}`",
        f"- parent: `{meta.get('parent', '?')}` ({meta.get('family', '?')})",
        f"- dtype: {meta['dtype']}",
        f"- parameters: {total_params:,}",
        f"- layers: {len(rows)}",
        "",
        "## Serving engines",
        "",
    ]
    lines += [f"- {v.line()}" for v in verdicts]
    lines += [
        "- transformers: yes, `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` "
        "(modeling code shipped in the checkpoint)",
        "",
        "## Layers",
        "",
        "| layer | attention | FFN | parameters |",
        "|---:|---|---|---:|",
    ]
    lines += [f"| {r['layer']} | {r['attention']} | {r['ffn']} | {r['parameters']:,} |" for r in rows]
    return "\n".join(lines) + "\n"


def export(child: str, out: str, export: ExportConfig) -> artifacts.Manifest:
    """Phase ``export``: the child at ``child`` as a servable Hugging Face checkpoint at ``out``."""
    artifacts.require_manifest(child, (CHILD_KIND, PARENT_KIND))
    dtype, max_shard_size = export.dtype, export.max_shard_size
    torch_dtype = parse_dtype(dtype)
    built: list[int] = []

    def build(staging: Path, inputs: dict[str, Path]) -> dict[str, Any]:
        local = inputs["child"]
        model = load_model(str(local), dtype=torch_dtype)
        tokenizer = load_tokenizer(local)
        model.save_pretrained(staging, safe_serialization=True, max_shard_size=max_shard_size)
        for name in MODELING_FILES:  # save_pretrained copies them; make sure all three are there
            src = Path(modeling.__file__).parent / name
            if not (staging / name).exists():
                shutil.copyfile(src, staging / name)
        write_engine_config(staging / "config.json", model.config)
        tokenizer.save_pretrained(staging)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(staging)
        parent_info = json.loads((local / PARENT_INFO).read_text()) if (local / PARENT_INFO).exists() else {}
        rows = layer_table(model)
        verdicts = engine_verdicts(model.config)
        for engine, verdict in zip(serving.ENGINES, verdicts):
            if engine.key in export.serve_with and not verdict.servable:
                log.warning(
                    "export.serve_with names %s, but %s cannot load this child: %s",
                    engine.key,
                    engine.name,
                    "; ".join(verdict.reasons),
                )
        total = count_parameters(model)
        meta = {
            "child": child,
            "parent": parent_info.get("reference"),
            "family": parent_info.get("family"),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        }
        (staging / REPORT_MD).write_text(render_report(rows, verdicts, total, meta))
        (staging / REPORT_JSON).write_text(
            json.dumps(
                {
                    **meta,
                    "parameters": total,
                    "layers": rows,
                    "engines": [
                        {"engine": v.engine, "servable": v.servable, "reasons": v.reasons} for v in verdicts
                    ],
                },
                indent=2,
            )
            + "\n"
        )
        if (local / PARENT_INFO).exists():
            shutil.copyfile(local / PARENT_INFO, staging / PARENT_INFO)
        built.append(total)
        return {
            "parameters": total,
            "dtype": meta["dtype"],
            "engines": {v.engine: v.servable for v in verdicts},
        }

    manifest = artifacts.run_phase(
        EXPORT_KIND,
        out,
        {"child": child},
        {"dtype": dtype, "max_shard_size": max_shard_size},
        build,
        input_kinds={"child": (CHILD_KIND, PARENT_KIND)},
    )
    if built:  # only once the export is published (uploaded, for s3://)
        log.info("exported %s (%s parameters) to %s", child, f"{built[0]:,}", out)
    return manifest


def export_dir(uri: str) -> Path:
    """A verified local copy of an export artifact."""
    return artifacts.materialize(uri, EXPORT_KIND)


def verify(
    export_uri: str, reference_child: str, *, prompt: str = "The capital of Germany is", new_tokens: int = 20
) -> dict[str, Any]:
    """Reload the export with plain transformers (``trust_remote_code=True``) and compare it
    with ``reference_child`` (our loader): max |logit difference| and greedy generations."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = export_dir(export_uri)
    exported = AutoModelForCausalLM.from_pretrained(local, trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(local, trust_remote_code=True)
    reference = load_model(reference_child, dtype=torch.float32)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (exported(ids).logits - reference(ids).logits).abs().max().item()
        gen_a = exported.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        gen_b = reference.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    return {
        "max_abs_logit_diff": diff,
        "greedy_identical": bool(torch.equal(gen_a, gen_b)),
        "completion": tokenizer.decode(gen_a[0, ids.shape[1] :], skip_special_tokens=True),
        "prompt": prompt,
    }
