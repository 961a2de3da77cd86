"""gkd.backend nemo on one GPU: a tiny heterogeneous child (every sub-block kind Megatron-core's
heterogeneous spec has) distilled with NeMo's distillation on Megatron-core, against the torch
backend on the same problem.

    python benchmarks/bench_nemo.py [--steps 48] [--out benchmarks/results/nemo.json]

Needs a CUDA GPU and the ``puzzle-nemo`` packages (images/nemo-requirements.txt; on the GPU machine
of this workplace, carried as wheels: docs/nemo.md). It checks, in this order:

1. **Round trip before training**: the child's logits from our model and from the Megatron model its
   weights were mapped into (float32, TF32 off; the largest difference and the top-1 agreement),
   then the weights mapped back (bit for bit) and our model's logits from them (exactly equal).
2. **torch backend**: :func:`puzzle.child.gkd.train` (``compile: off``, then ``auto``), ``--steps``
   steps.
3. **nemo backend**: :func:`puzzle.child.gkd_nemo.train`, the same steps, data order, schedule and
   loss weights; then the same call again on its checkpoint folder, which must resume from the last
   checkpoint and end at the same loss.
4. Both distilled children, written back as our model, evaluated the same way: KL(parent || child)
   on held-out sequences, before and after.

Data: the Python standard library's sources as bytes (vocabulary 512), sequences of 256. Weights:
seeded random (the same for both backends; :func:`puzzle.child.parallel.materialize`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from puzzle.child import gkd, gkd_nemo  # noqa: E402
from puzzle.child.gkd import ModelSpec, kl_parent_child  # noqa: E402
from puzzle.config import GKDConfig  # noqa: E402
from puzzle.modeling import DeciLMConfig  # noqa: E402
from puzzle.modeling.block_config import AttentionConfig, BlockConfig, FFNConfig  # noqa: E402
from puzzle.modeling.checkpoints import model_from_state  # noqa: E402

HERE = Path(__file__).resolve()
VOCAB, HIDDEN, HEADS, LAYERS, SEQ, BATCH = 512, 256, 8, 8, 256, 8


def block(attn: str | int, ffn: str | int) -> BlockConfig:
    kw_a: dict[str, Any] = {"num_kv_heads": attn} if isinstance(attn, int) else {attn: True}
    kw_f: dict[str, Any] = {"intermediate_size": ffn} if isinstance(ffn, int) else {ffn: True}
    a, f = AttentionConfig(**kw_a), FFNConfig(**kw_f)
    return BlockConfig(attention=a, ffn=f)


PARENT_BLOCKS = [block(4, 1024)] * LAYERS
# GQA with 4, 2 and 1 KV heads, linear and no-op attention; SwiGLU of 1024, 512 and 384 (not a
# multiple of 256), linear and no-op FFN.
CHILD_BLOCKS = [
    block(4, 1024),
    block(2, 512),
    block(1, 384),
    block("linear", 1024),
    block("no_op", 512),
    block(4, "linear"),
    block(2, "no_op"),
    block(4, 1024),
]


def model_config(blocks: list[Any]) -> DeciLMConfig:
    return DeciLMConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        rms_norm_eps=1e-5,
        max_position_embeddings=SEQ,
        block_configs=blocks,
    )


def stdlib_tokens(n: int) -> torch.Tensor:
    """``n`` sequences of ``SEQ`` byte tokens from the standard library's sources."""
    data = bytearray()
    for path in sorted(Path(os.__file__).parent.glob("*.py")):
        data += path.read_bytes()
        if len(data) >= n * SEQ:
            break
    ids = torch.tensor(list(data[: n * SEQ]), dtype=torch.int32)
    return ids.reshape(n, SEQ)


def ours_on(cfg: DeciLMConfig, state: dict[str, torch.Tensor], device: torch.device, what: str) -> Any:
    """Our model holding (copies of) ``state`` on ``device``, in eval mode."""
    model = model_from_state(
        cfg, {k: v.clone().to(device) for k, v in state.items()}, device=device, what=what
    )
    return model.eval()


def round_trip(child: ModelSpec, device: torch.device, ids: torch.Tensor) -> dict[str, Any]:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = child.config
    ours_state = gkd_nemo.load_ours(child)
    ours = ours_on(cfg, ours_state, device, "ours")
    gkd_nemo.init_megatron(0)
    mg = gkd_nemo.build_gpt(cfg, dtype=torch.float32)
    gkd_nemo.megatron_state(mg, cfg, {k: v.to(device) for k, v in ours_state.items()})
    mg.eval()
    x = ids.long().to(device)
    pos = torch.arange(x.shape[1], device=device).unsqueeze(0).expand(x.shape[0], -1)
    with torch.no_grad():
        a = ours(input_ids=x).logits.float()
        b = mg(input_ids=x, position_ids=pos, attention_mask=None).float()
    back = gkd_nemo.our_state(mg, cfg)
    weights_identical = set(back) == set(ours_state) and all(
        torch.equal(back[k], ours_state[k]) for k in back
    )
    again = ours_on(cfg, back, device, "round trip")
    with torch.no_grad():
        c = again(input_ids=x).logits.float()
    result = {
        "max_abs_logit_diff_ours_vs_megatron": float((a - b).abs().max()),
        "max_abs_logit": float(a.abs().max()),
        "top1_agreement_ours_vs_megatron": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
        "weights_identical_after_round_trip": bool(weights_identical),
        "logits_identical_after_round_trip": bool(torch.equal(a, c)),
    }
    del ours, mg, again
    torch.cuda.empty_cache()
    torch.backends.cuda.matmul.allow_tf32 = True
    return result


def held_out_kl(parent: ModelSpec, child_model: Any, ids: torch.Tensor, device: torch.device) -> float:
    p = ours_on(parent.config, gkd_nemo.load_ours(parent), device, "parent")
    child_model = ours_on(child_model.config, child_model.state_dict(), device, "child")
    with torch.no_grad():
        x = ids.long().to(device)
        value = float(kl_parent_child(p(input_ids=x).logits, child_model(input_ids=x).logits))
    del p, child_model
    torch.cuda.empty_cache()
    return value


def run(
    backend: str,
    settings: GKDConfig,
    child: ModelSpec,
    parent: ModelSpec,
    ids: torch.Tensor,
    device: torch.device,
    work_dir: Path | None = None,
) -> tuple[Any, dict[str, Any]]:
    train = gkd_nemo.train if backend == "nemo" else gkd.train
    t0 = time.perf_counter()
    model, summary = train(child, parent, ids, settings, device=device, work_dir=work_dir, request="bench")
    summary["wall_seconds"] = time.perf_counter() - t0
    return model, summary


def brief(summary: dict[str, Any]) -> dict[str, Any]:
    hist = summary["history"]
    keep = (
        "steps",
        "resumed_from_step",
        "tokens",
        "tokens_per_s",
        "train_seconds",
        "wall_seconds",
        "peak_memory_gib",
        "first_loss",
        "final_loss",
        "compile",
        "backend",
        "packages",
    )
    out = {k: summary.get(k) for k in keep if k in summary}
    out["loss_at"] = {
        str(r["step"]): round(r["loss"], 5) for r in hist if r["step"] in (1, len(hist) // 2, len(hist))
    }
    out["history"] = [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in hist]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--out", default=str(HERE.parent / "results" / "nemo.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_nemo needs a CUDA GPU (Megatron-core)")
    device = torch.device("cuda:0")
    torch.cuda.set_device(device)
    parent = ModelSpec(model_config(PARENT_BLOCKS), None, seed=1)
    child = ModelSpec(model_config(CHILD_BLOCKS), None, seed=2)
    ids = stdlib_tokens(BATCH * 8 + 8)
    train_ids, held_out = ids[:-8], ids[-8:]
    settings = GKDConfig(
        token_budget=args.steps * BATCH * SEQ,
        batch_size=BATCH,
        max_epochs=64,
        lr=args.lr,
        warmup_fraction=0.05,
        checkpoint_every=16,
    )
    result: dict[str, Any] = {
        "card": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "packages": gkd_nemo.versions(),
        "shape": {
            "vocab": VOCAB,
            "hidden": HIDDEN,
            "heads": HEADS,
            "layers": LAYERS,
            "seq_len": SEQ,
            "batch": BATCH,
            "steps": args.steps,
            "lr": args.lr,
        },
        "child_blocks": [b.name for b in CHILD_BLOCKS],
    }
    result["round_trip"] = round_trip(child, device, held_out[:4])
    print("round trip:", json.dumps(result["round_trip"]), flush=True)

    before = model_from_state(
        child.config, gkd_nemo.load_ours(child), device=torch.device("cpu"), what="child"
    )
    result["held_out_kl_before"] = held_out_kl(parent, before, held_out, device)
    runs: dict[str, Any] = {}
    for name, backend, cfg in (
        ("torch_compile_off", "torch", replace(settings, compile="off")),
        ("torch_compile_auto", "torch", settings),
    ):
        model, summary = run(backend, cfg, child, parent, train_ids, device)
        runs[name] = brief(summary) | {"held_out_kl_after": held_out_kl(parent, model, held_out, device)}
        print(
            name,
            json.dumps({k: runs[name][k] for k in ("loss_at", "tokens_per_s", "held_out_kl_after")}),
            flush=True,
        )
    with tempfile.TemporaryDirectory() as tmp:
        nemo_settings = replace(settings, backend="nemo")
        model, summary = run("nemo", nemo_settings, child, parent, train_ids, device, Path(tmp))
        runs["nemo"] = brief(summary) | {"held_out_kl_after": held_out_kl(parent, model, held_out, device)}
        print(
            "nemo",
            json.dumps({k: runs["nemo"][k] for k in ("loss_at", "tokens_per_s", "held_out_kl_after")}),
            flush=True,
        )
        # The same call on the same checkpoint folder resumes from the last checkpoint.
        _, again = run("nemo", nemo_settings, child, parent, train_ids, device, Path(tmp))
        runs["nemo_resumed"] = {
            "resumed_from_step": again["resumed_from_step"],
            "final_loss": again["final_loss"],
            "final_loss_first_run": summary["final_loss"],
        }
        print("nemo resumed", json.dumps(runs["nemo_resumed"]), flush=True)
    result["runs"] = runs
    hist = runs["nemo"]["history"]
    result["checks"] = {
        "round_trip_weights_and_logits_identical": result["round_trip"]["weights_identical_after_round_trip"]
        and result["round_trip"]["logits_identical_after_round_trip"],
        "megatron_logits_match_ours": result["round_trip"]["max_abs_logit_diff_ours_vs_megatron"] < 1e-3,
        "nemo_loss_falls": bool(hist and hist[-1]["loss"] < 0.7 * hist[0]["loss"]),
        "nemo_child_improves_on_held_out": runs["nemo"]["held_out_kl_after"] < result["held_out_kl_before"],
        "nemo_resumes": runs["nemo_resumed"]["resumed_from_step"] > 0,
    }
    print("checks:", json.dumps(result["checks"]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    if not all(result["checks"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
