"""GKD throughput (tokens/s), model-FLOPs utilisation, peak memory and scaling: one GPU before and
after the fused loss, FSDP2 on 2 and 4 GPUs for a Llama-3.1-8B-shaped parent, a kill + resume on
another number of GPUs. Each command stops starting runs at ``--budget-s`` (default 570 s):

    python benchmarks/bench_gkd.py single            # 1 GPU a run: SmolLM2-135M and Llama-3.2-1B shapes,
                                                     # the old step ("before") and the new ("after")
    python benchmarks/bench_gkd.py single --lanes 2 --essential   # the two shapes side by side on 2 GPUs
    python benchmarks/bench_gkd.py scale             # 4 GPUs: 8B parent, ~6B child: DDP (out of memory
                                                     # on 80 GB), FSDP on 2 and 4, kill on 4 -> resume on 2
                                                     # 2 GPUs: DDP and FSDP on 2, kill on 2 -> resume on 1
                                                     # (SmolLM2 shape: the 8B pair needs 2+ GPUs)
    python benchmarks/bench_gkd.py single --smoke    # the same on this machine's CPU: tiny shape, gloo
    python benchmarks/bench_gkd.py scale --smoke
    python benchmarks/bench_gkd.py scale --dry-run --gpus 4   # print the runs' commands only

Both merge their runs into ``benchmarks/results/gkd_scale.json`` (``--smoke``:
``gkd_scale_smoke.json``): ``{"runs": [{"shape", "parallel" (ddp | fsdp), "gpus", "tokens_per_s",
"mfu", "peak_mem_gib", "outcome" (ok | oom | error | skipped), "card", ...}]}``, one-GPU runs
counting as ``ddp`` on 1 GPU; extra keys say which variant, batch, steps and what was compared.

What runs: random weights of the real shapes (speed does not depend on the values), drawn on the
GPU, the same for every number of GPUs (:func:`puzzle.child.parallel.materialize`); every "after"
and every multi-GPU run is :func:`puzzle.child.gkd.train` itself (parent forward on the fly, child
forward and backward, the fused cosine + KL loss, AdamW, clipping; DDP or FSDP2 under ``torchrun``).
"before" is the step as it was before the fused loss (float32 parent and child under bf16 autocast,
every token's float32 logits for the KL, float32 copies of every hidden state for the cosine,
unfused AdamW), kept here verbatim. The child has 1 KV head and a half-width FFN in every other
layer (SmolLM2, 1B) or 2 KV heads and a half-width FFN in 3 of 4 layers (8B: 5.8B parameters).

tokens/s is the steady state: the first ``--warmup`` steps (compilation, allocator warm-up) are left
out, using each step's own wall time. MFU counts model FLOPs per trained token as PaLM does: child
6 N_c + 12 L_c d T (forward and backward; activation recomputation not counted), parent 2 N_p +
4 L_p d T (forward only), N = matmul parameters (LM head included), L = attention layers, d =
attention width, T = sequence length; divided by the GPUs' dense bf16 peak (989 TFLOP/s per
H100/H200 SXM). Scaling efficiency from 2 to 4 GPUs is (tokens/s on 4 / 4) / (tokens/s on 2 / 2) at
the same per-GPU batch.

The older two-step form still works: ``prepare --dir D`` writes artifacts, ``train --dir D`` runs
:func:`puzzle.child.gkd.distill` on them (1 GPU or under torchrun).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import shapes  # noqa: E402

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results"
DEADLINE_S = 570.0
"""Each command stops starting runs after this many seconds (10 minutes of wall time, less a margin)."""

# --shape -> the table's shape.
SHAPES = {"smollm2": "smollm2-135m", "llama-1b": "llama-3.2-1b", "llama-8b": "llama-3.1-8b", "tiny": "tiny"}
# As this benchmark has always built them: transformers' default rms_norm_eps, plain RoPE (no llama3
# scaling for llama-1b) and tied embeddings (tiny's too). The 8B shape is the real configuration.
AS_BEFORE = dict(rms_norm_eps=shapes.TRANSFORMERS_RMS_NORM_EPS, tie_word_embeddings=True)
SEQ_LEN = {"smollm2": 1024, "llama-1b": 1024, "llama-8b": 4096, "tiny": 64}


# --------------------------------------------------------------------------- shapes


def parent_config(shape: str, seq_len: int) -> Any:
    from puzzle.parent import decilm_config

    name = SHAPES[shape]
    if shape == "llama-8b":
        return decilm_config(shapes.llama_config(name))
    overrides = dict(AS_BEFORE, rope_parameters=shapes.plain_rope(name))
    return decilm_config(shapes.llama_config(name, max_position_embeddings=max(2048, seq_len), **overrides))


def child_blocks(config: Any, shape: str = "smollm2") -> list[Any]:
    from puzzle.modeling import BlockConfig

    narrow = config.blocks[0].ffn.intermediate_size // 2
    if shape == "llama-8b":  # ~5.8B of the 8.0B parent's parameters
        return [
            block if i % 4 == 0 else BlockConfig.from_name(f"attn_kv2+ffn_{narrow}")
            for i, block in enumerate(config.blocks)
        ]
    return [
        BlockConfig.from_name(f"attn_kv1+ffn_{narrow}") if i % 2 else block
        for i, block in enumerate(config.blocks)
    ]


def configs(shape: str, seq_len: int) -> tuple[Any, Any]:
    """(child config, parent config) of ``shape``."""
    from puzzle.modeling.checkpoints import child_config_like

    parent = parent_config(shape, seq_len)
    return child_config_like(parent, child_blocks(parent, shape)), parent


def matmul_params(model) -> tuple[int, int, int]:
    """(matmul parameters incl. LM head, attention layers, attention width)."""
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attn = [b for b in model.config.blocks if b.attention.is_gqa]
    width = model.config.num_attention_heads * model.config.head_dim
    return n, len(attn), width


def flops_per_token(child_config: Any, parent_config: Any, seq_len: int) -> float:
    from puzzle.modeling import DeciLMForCausalLM

    with torch.device("meta"):
        nc, lc, dc = matmul_params(DeciLMForCausalLM(child_config))
        np_, lp, dp = matmul_params(DeciLMForCausalLM(parent_config))
    return float(6 * nc + 12 * lc * dc * seq_len + 2 * np_ + 4 * lp * dp * seq_len)


def card() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def steady_tokens_per_s(history: list[dict[str, Any]], tokens_per_step: int, warmup: int) -> float | None:
    timed = [r["seconds"] for r in history[warmup:]] or [r["seconds"] for r in history[-1:]]
    total = sum(timed)
    return tokens_per_step * len(timed) / total if total > 0 else None


# --------------------------------------------------------------------------- one run (a worker)


def legacy_step_run(
    args: argparse.Namespace, child_config: Any, parent_config: Any, device: torch.device
) -> dict:
    """The GKD step as it was before the fused loss, on one device (``--variant before``)."""
    from contextlib import nullcontext

    from puzzle.child import parallel
    from puzzle.child.gkd import batch_indices
    from puzzle.child.gkd_loss import gkd_loss
    from puzzle.config import GKDConfig

    settings = GKDConfig(token_budget=1, batch_size=args.batch_per_gpu)
    child = parallel.meta_model(child_config, dtype=torch.float32, trainable=True)
    parent = parallel.meta_model(parent_config, dtype=torch.float32, trainable=False)
    parallel.materialize(child, device, None, seed=1)
    parallel.materialize(parent, device, None, seed=0)
    child.train()
    parent.eval()
    optimizer = torch.optim.AdamW(child.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    ids = _tokens(args, child_config.vocab_size, args.batch_per_gpu)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    history = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for step in range(args.steps):
        batch = ids[batch_indices(step, ids.shape[0], args.batch_per_gpu, 0)].long().to(device)
        with autocast:
            with torch.no_grad():
                p_out = parent(input_ids=batch, output_hidden_states=True, use_cache=False)
            c_out = child(input_ids=batch, output_hidden_states=True, use_cache=False)
            loss, _ = gkd_loss(c_out, p_out, batch, settings)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(child.parameters(), 1.0)
        optimizer.step()
        value = float(loss.detach())
        now = time.perf_counter()
        history.append({"step": step + 1, "loss": value, "seconds": now - t})
        t = now
    peak = torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else None
    return {"history": history, "peak_memory_gib": peak, "parallel": "single"}


def _tokens(args: argparse.Namespace, vocab: int, global_batch: int) -> torch.Tensor:
    n = max(global_batch * 4, 8)
    gen = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (n, args.seq_len), dtype=torch.int32, generator=gen)


def worker(args: argparse.Namespace) -> None:
    """One measurement (under torchrun for several processes); rank 0 writes ``--result``."""
    from puzzle.child.gkd import ModelSpec, init_distributed, train
    from puzzle.config import GKDConfig
    from puzzle.modeling.devices import resolve_device

    info = init_distributed()
    device = resolve_device("auto")
    child_config, parent_config = configs(args.shape, args.seq_len)
    batch = args.batch_per_gpu * info.world_size
    base = {
        "shape": SHAPES[args.shape],
        "parallel": "ddp" if args.parallel in ("auto", "ddp", "single") else args.parallel,
        "gpus": info.world_size,
        "variant": args.variant,
        "card": card(),
        "global_batch": batch,
        "micro_batch": args.micro or args.batch_per_gpu,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "compile": args.compile,
        "loss_chunk": args.loss_chunk,
        "grad_checkpointing": args.grad_ckpt,
    }
    settings = GKDConfig(
        token_budget=args.steps * batch * args.seq_len,
        batch_size=batch,
        lr=1e-4,
        warmup_fraction=0.0,
        checkpoint_every=args.checkpoint_every or 10**9,
        grad_checkpointing=args.grad_ckpt,
        parallel="fsdp" if args.parallel == "fsdp" else "ddp",
        micro_batch_size=args.micro or None,
        loss_chunk=args.loss_chunk,
        compile=args.compile,
    )
    from puzzle.child import parallel

    # what the memory arithmetic expects of this run (also recorded when it runs out of memory)
    estimate = parallel.estimate_memory(
        "fsdp" if args.parallel == "fsdp" and info.world_size > 1 else "ddp",
        info.world_size,
        parallel.ModelStats.of(child_config),
        parallel.ModelStats.of(parent_config),
        micro_tokens=(args.micro or args.batch_per_gpu) * args.seq_len,
        grad_checkpointing=args.grad_ckpt,
        loss_chunk=0 if args.variant == "before" else args.loss_chunk,
        cuda=device.type == "cuda",
    )
    base["memory_estimate_gib"] = round(estimate.total / parallel.GIB, 2)
    result: dict[str, Any] = dict(base)
    try:
        if args.variant == "before":
            summary = legacy_step_run(args, child_config, parent_config, device)
        else:
            _, summary = train(
                ModelSpec(child_config, None, seed=1),
                ModelSpec(parent_config, None, seed=0),
                _tokens(args, child_config.vocab_size, batch),
                settings,
                device=device,
                work_dir=Path(args.ckpt_dir) if args.ckpt_dir else None,
                dist_info=info,
                request=f"bench-{args.shape}-{batch}x{args.seq_len}",
                return_model=False,
            )
        tps = steady_tokens_per_s(summary["history"], batch * args.seq_len, args.warmup)
        fpt = flops_per_token(child_config, parent_config, args.seq_len)
        result.update(
            outcome="ok",
            tokens_per_s=tps,
            tokens_per_s_per_gpu=tps / info.world_size if tps else None,
            mfu=shapes.mfu(fpt, tps, info.world_size) if tps and device.type == "cuda" else None,
            model_tflops_per_token=fpt / 1e12,
            peak_mem_gib=summary.get("peak_memory_gib"),
            memory_estimate_gib=summary.get("memory_estimate_gib", base["memory_estimate_gib"]),
            mode=summary.get("parallel"),
            resumed_from_step=summary.get("resumed_from_step", 0),
            losses=[round(r["loss"], 5) for r in summary["history"]],
        )
    except Exception as exc:  # noqa: BLE001 - an OOM inside NCCL is a DistBackendError
        if not isinstance(exc, torch.OutOfMemoryError) and "out of memory" not in str(exc).lower():
            raise
        peak = torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else None
        result.update(outcome="oom", tokens_per_s=None, mfu=None, peak_mem_gib=peak, error=str(exc)[:300])
        _write(result, Path(f"{args.result}.rank{info.rank}"))
        logging.getLogger(__name__).error("rank %d: out of memory: %s", info.rank, str(exc)[:200])
        sys.stdout.flush()
        os._exit(3)  # torchrun stops the other ranks (they would wait in a collective)
    if info.is_main:
        _write(result, Path(args.result))


def _write(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")


# --------------------------------------------------------------------------- orchestration


class Session:
    """Runs workers one after another within the deadline and merges their results into ``out``."""

    def __init__(
        self, out: Path, smoke: bool, budget_s: float, dry_run: bool = False, logs: Path | None = None
    ) -> None:
        self.out, self.smoke, self.budget_s, self.dry_run, self.logs = out, smoke, budget_s, dry_run, logs
        self.t0 = time.monotonic()
        self.runs: list[dict[str, Any]] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-gkd-"))
        self.lock = threading.Lock()  # lanes (single --lanes) record from several threads

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def command(self, gpus: int, options: list[str], result: Path) -> list[str]:
        script = [str(HERE), "worker", *options, "--result", str(result)]
        if gpus <= 1:
            return [sys.executable, *script]
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={gpus}",
            *script,
        ]

    def run(
        self,
        label: str,
        gpus: int,
        options: list[str],
        *,
        need_s: float = 60.0,
        kill_at_step: int = 0,
        env: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """One worker; with ``kill_at_step``, SIGKILL its process group as soon as the checkpoint of that
        step is complete (``--ckpt-dir``/gkd-checkpoint/latest.json); ``env`` is added to its environment
        (a lane's ``CUDA_VISIBLE_DEVICES``)."""
        result_path = self.tmp / f"{label}.json"
        base = _labels(options, gpus, label)
        if self.left() < need_s:
            run = {**base, "outcome": "skipped", "note": f"{self.left():.0f} s left of the 10-minute budget"}
            print(f"[{label}] skipped: not enough time left", flush=True)
            self.record(run)
            return run
        command = self.command(gpus, options, result_path)
        print(f"[{label}] {' '.join(command)}", flush=True)
        if self.dry_run:
            return {**base, "outcome": "dry-run"}
        env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        if self.smoke:
            env["OMP_NUM_THREADS"] = "1"
        else:  # less fragmentation when FSDP gathers and frees layer after layer
            env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        log_path = self.tmp / f"{label}.log"
        t0 = time.monotonic()
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen(
                command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
            )
            killed_at = None
            timeout = max(10.0, self.left())
            while proc.poll() is None:
                if time.monotonic() - t0 > timeout:
                    _kill_tree(proc.pid)
                    break
                if kill_at_step:
                    state = _checkpoint_state(options)
                    if state is not None and state.get("step", 0) >= kill_at_step:
                        _kill_tree(proc.pid)
                        killed_at = state["step"]
                        break
                time.sleep(0.2)
            proc.wait()
        seconds = time.monotonic() - t0
        tail = log_path.read_text(errors="replace")[-1500:]
        if self.logs is not None:  # every run's whole log, kept
            self.logs.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log_path, self.logs / log_path.name)
        if killed_at is not None:
            run = {**base, "outcome": "killed", "killed_after_step": killed_at, "wall_s": round(seconds, 1)}
        elif result_path.is_file():
            run = {**json.loads(result_path.read_text()), "wall_s": round(seconds, 1)}
        else:
            ranks = sorted(self.tmp.glob(f"{label}.json.rank*"))
            oom = [json.loads(p.read_text()) for p in ranks]
            if oom:
                run = {**oom[0], "wall_s": round(seconds, 1)}
                peaks = [r.get("peak_mem_gib") for r in oom if r.get("peak_mem_gib") is not None]
                run["peak_mem_gib"] = max(peaks) if peaks else None
            else:
                run = {**base, "outcome": "error", "exit_code": proc.returncode, "log_tail": tail}
        print(f"[{label}] {run['outcome']} in {seconds:.0f} s: {_brief(run)}", flush=True)
        if run["outcome"] == "error":
            print(tail, flush=True)
        return run

    def record(self, run: dict[str, Any]) -> None:
        if self.dry_run:
            return
        with self.lock:
            self.runs.append(run)
            merge(self.out, [run])

    def finish(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        print(f"wrote {len(self.runs)} runs to {self.out} in {time.monotonic() - self.t0:.0f} s", flush=True)


def _labels(options: list[str], gpus: int, label: str) -> dict[str, Any]:
    opts = _parse(options)
    parallel = opts.get("--parallel", "ddp")
    return {
        "shape": SHAPES.get(opts.get("--shape", ""), opts.get("--shape")),
        "parallel": "ddp" if parallel in ("auto", "single") else parallel,
        "gpus": gpus,
        "variant": opts.get("--variant", label),
        "card": _gpu_name() if torch.cuda.is_available() else "cpu",
        "tokens_per_s": None,
        "mfu": None,
        "peak_mem_gib": None,
    }


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once, as a node failure would (torchrun starts its
    workers in sessions of their own, so killing its process group would leave them running)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _parse(options: list[str]) -> dict[str, str]:
    """``--key value`` pairs of a worker's options (a flag without a value maps to "")."""
    out: dict[str, str] = {}
    for i, item in enumerate(options):
        if item.startswith("--"):
            value = options[i + 1] if i + 1 < len(options) and not options[i + 1].startswith("--") else ""
            out[item] = value
    return out


def _gpu_name() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "cuda"


def _checkpoint_state(options: list[str]) -> dict[str, Any] | None:
    opts = _parse(options)
    if "--ckpt-dir" not in opts:
        return None
    path = Path(opts["--ckpt-dir"]) / "gkd-checkpoint" / "latest.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _brief(run: dict[str, Any]) -> str:
    keys = ("tokens_per_s", "mfu", "peak_mem_gib", "resumed_from_step", "killed_after_step")
    parts = []
    for k in keys:
        v = run.get(k)
        if v is not None:
            parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return ", ".join(parts)


def merge(out: Path, runs: list[dict[str, Any]]) -> None:
    """Replace the runs of ``out`` with the same (shape, parallel, gpus, variant) and add the others."""
    data = json.loads(out.read_text()) if out.is_file() else {"runs": []}

    def key(r: dict[str, Any]) -> tuple:
        return (r.get("shape"), r.get("parallel"), r.get("gpus"), r.get("variant"))

    new = {key(r) for r in runs}
    data["runs"] = [r for r in data.get("runs", []) if key(r) not in new] + runs
    data["schema"] = (
        "runs: [{shape, parallel (ddp | fsdp; one GPU counts as ddp), gpus, tokens_per_s, mfu, peak_mem_gib, "
        "outcome (ok | oom | error | skipped), card, ...}]; written by benchmarks/bench_gkd.py"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1, default=str) + "\n")


def _options(**kw: Any) -> list[str]:
    out: list[str] = []
    for k, v in kw.items():
        if v is None or v is False:
            continue
        out.append("--" + k.replace("_", "-"))
        if v is not True:
            out.append(str(v))
    return out


def loss_kernel(args: argparse.Namespace) -> None:
    """The loss alone (forward + backward), reference or fused, at a model's sizes: milliseconds and
    the peak memory above the inputs (CUDA: allocator peak; CPU: the process's peak RSS)."""
    import resource

    from puzzle.child.gkd_loss import cosine_distance_sum, fused_cosine, fused_head_loss, kl_parent_child

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n, d, v, layers = args.tokens, args.hidden, args.vocab, args.layers
    ids = torch.randint(0, v, (1, n), device=device)
    hc = [torch.randn(1, n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(layers + 1)]
    hp = [torch.randn(1, n, d, device=device, dtype=dtype) for _ in range(layers + 1)]
    wc = torch.randn(v, d, device=device, dtype=dtype, requires_grad=True)
    wp = torch.randn(v, d, device=device, dtype=dtype)

    def step() -> None:
        if args.variant == "reference":
            kl = kl_parent_child(hp[-1] @ wp.T, hc[-1] @ wc.T)
            loss = kl + cosine_distance_sum(tuple(hc), tuple(hp))
        else:
            head, _, _ = fused_head_loss(
                hc[-1], wc, hp[-1], wp, ids, weight_kl=1.0, weight_lm=0.0, chunk=args.chunk
            )
            loss = head + fused_cosine(hc, hp)
        loss.backward()
        for t in (*hc, wc):
            t.grad = None

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step()  # warm-up (its memory counts: the peak is the same every step)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    ms = (time.perf_counter() - t0) / args.repeats * 1e3
    print(
        json.dumps({"variant": args.variant, "ms": ms, "peak_above_inputs_gib": peak / 1024**3}), flush=True
    )


def loss_kernels(session: Session, shape: str, tokens: int, chunk: int) -> None:
    """Reference against fused loss at ``shape``'s sizes, each variant in a fresh process."""
    config = parent_config(shape, SEQ_LEN[shape])
    found = {}
    for variant in ("reference", "fused"):
        if session.left() < 30:
            break
        command = [
            sys.executable,
            str(HERE),
            "loss",
            "--variant",
            variant,
            "--tokens",
            str(tokens),
            "--hidden",
            str(config.hidden_size),
            "--vocab",
            str(config.vocab_size),
            "--layers",
            str(config.num_hidden_layers),
            "--chunk",
            str(chunk),
            "--repeats",
            "1" if session.smoke else "5",
        ]
        out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        found[variant] = json.loads(lines[-1]) if lines else {"error": out.stderr[-500:]}
        print(f"[loss {shape} {variant}] {found[variant]}", flush=True)
    data = json.loads(session.out.read_text()) if session.out.is_file() else {"runs": []}
    data.setdefault("loss_kernels", {})[f"{SHAPES[shape]} {tokens} tokens"] = {
        "card": _gpu_name() if torch.cuda.is_available() else "cpu",
        "loss_chunk": chunk,
        **found,
    }
    session.out.write_text(json.dumps(data, indent=1, default=str) + "\n")


def single(args: argparse.Namespace) -> None:
    """One GPU per run (CPU with --smoke): before and after for SmolLM2-135M and the Llama-3.2-1B shape.

    ``--lanes N`` runs the shapes' runs side by side, each lane a GPU of its own
    (``CUDA_VISIBLE_DEVICES``): every run still trains on one GPU, N of them at a time (each run says
    so in ``concurrent_lanes``). ``--essential``: only before and after (then the loss alone).
    """
    session = Session(args.out, args.smoke, args.budget_s, args.dry_run, args.logs)
    if args.smoke:
        plans = [("tiny", 8, 12, 3)]
    else:
        plans = [("smollm2", 16, 25, 5), ("llama-1b", 8, 20, 5)]
    after = "off" if args.smoke else "all"
    essential: list[list[tuple[str, dict[str, Any], float]]] = []
    extras: list[list[tuple[str, dict[str, Any], float]]] = []
    for shape, batch, steps, warmup in plans:
        common = dict(shape=shape, seq_len=SEQ_LEN[shape], steps=steps, warmup=warmup, batch_per_gpu=batch)
        essential.append(
            [
                (f"{shape}-before", dict(common, variant="before", loss_chunk=0, compile="off"), 40),
                (f"{shape}-after", dict(common, variant="after", compile=after), 90),
            ]
        )
        extra = "loss" if args.smoke else "off"  # what is left time for: which part of "after" pays
        extras.append(
            [
                (
                    f"{shape}-after-compile-{extra}",
                    dict(common, variant=f"after-compile-{extra}", compile=extra),
                    60,
                ),
                (
                    f"{shape}-after-2x-batch",
                    dict(common, batch_per_gpu=2 * batch, variant="after-2x-batch", compile=after),
                    90,
                ),
            ]
        )
    if args.essential:
        extras = [[] for _ in plans]
    gpus = 1 if args.smoke else args.gpus or torch.cuda.device_count()
    lanes = max(1, min(args.lanes, len(plans), gpus if not args.smoke else len(plans)))
    if lanes == 1:  # every shape's before and after first, then the extras
        queues = [[run for runs in essential for run in runs] + [run for runs in extras for run in runs]]
    else:  # the shapes spread over the lanes, each lane its shapes' before and after, then extras
        queues = [
            [run for i in range(k, len(plans), lanes) for run in essential[i]]
            + [run for i in range(k, len(plans), lanes) for run in extras[i]]
            for k in range(lanes)
        ]

    def lane(k: int) -> None:
        env = {} if args.smoke or lanes == 1 else {"CUDA_VISIBLE_DEVICES": str(k)}
        for label, opts, need in queues[k]:
            run = session.run(label, 1, _options(parallel="ddp", **opts), need_s=need, env=env)
            if lanes > 1:
                run["concurrent_lanes"] = lanes
            session.record(run)

    threads = [threading.Thread(target=lane, args=(k,), daemon=True) for k in range(lanes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # the loss alone, at SmolLM2's sizes: what the fused loss saves in time and memory
    if not args.no_loss_kernels and not args.dry_run:
        loss_kernels(session, "smollm2", 1024 if args.smoke else 16384, 1024)
    session.finish()


def scale(args: argparse.Namespace) -> None:
    """2 or 4 GPUs (2 CPU processes with --smoke): the 8B shape under DDP and FSDP2, scaling, kill +
    resume on another number of GPUs.

    With 4 GPUs: DDP on 4 (out of memory), FSDP2 on 2 and 4, FSDP2 killed on 4 and resumed on 2 (the
    8B shape). With 2 GPUs: DDP on 2, FSDP2 on 2, and the kill on 2 resumed on 1 GPU with a shape
    that fits one (``--kill-shape``, default smollm2: the 8B pair needs FSDP on 2 or more GPUs).
    """
    session = Session(args.out, args.smoke, args.budget_s, args.dry_run, args.logs)
    if args.smoke:  # enough steps that the kill lands mid-run on a CPU
        shape, gpus, per_gpu, micro, steps, warmup, compile_mode = "tiny", 2, 4, 2, 60, 5, "off"
        fsdp_counts, kill_steps, checkpoint_every, kill_at = [1, 2], 60, 2, 2
    else:
        gpus = args.gpus or torch.cuda.device_count()
        if gpus < 2:
            sys.exit(f"scale needs at least 2 GPUs, found {gpus}")
        shape, per_gpu, micro, steps, warmup, compile_mode = "llama-8b", 4, 1, 6, 2, args.compile
        fsdp_counts, kill_steps, checkpoint_every, kill_at = sorted({2, min(gpus, 4)}), 6, 2, 2
    big = min(gpus, 4)
    resume_gpus = 2 if big >= 4 else 1
    kill_shape = args.kill_shape
    if kill_shape == "auto":
        kill_shape = "tiny" if args.smoke else ("llama-8b" if resume_gpus >= 2 else "smollm2")
    common = dict(
        shape=shape,
        seq_len=SEQ_LEN[shape],
        batch_per_gpu=per_gpu,
        micro=micro,
        warmup=warmup,
        compile=compile_mode,
        grad_ckpt=True,
    )
    ckpt_root = _checkpoint_root(args, kill_shape)
    # 1. DDP: every GPU a whole replica of the 16-byte-per-parameter child (+ the parent); it runs out
    # of memory in its first step, so nothing is compiled for it
    ddp_opts = dict(common, compile="off" if not args.smoke else compile_mode)
    session.record(
        session.run(
            f"ddp-{big}", big, _options(parallel="ddp", steps=steps, variant="ddp", **ddp_opts), need_s=60
        )
    )
    # 2./3. FSDP2 on 2 and 4 GPUs at the same per-GPU batch (weak scaling)
    fsdp = {}
    for n in fsdp_counts:
        fsdp[n] = session.run(
            f"fsdp-{n}", n, _options(parallel="fsdp", steps=steps, variant="fsdp", **common), need_s=90
        )
    small = fsdp_counts[0]
    if small in fsdp and big in fsdp and big > small:
        a, b = fsdp[small].get("tokens_per_s"), fsdp[big].get("tokens_per_s")
        if a and b:
            efficiency = (b / big) / (a / small)
            print(f"scaling {small} -> {big} GPUs: {b / a:.2f}x, efficiency {efficiency:.1%}", flush=True)
            fsdp[big][f"scaling_efficiency_vs_{small}_gpus"] = efficiency
    for run in fsdp.values():
        session.record(run)
    # 4. kill + resume: FSDP on `big` GPUs killed after a checkpoint, resumed on `resume_gpus` GPUs with
    # the same global batch (compared step by step with the uninterrupted run when it is the same)
    ckpt = ckpt_root / "kill-resume"
    shutil.rmtree(ckpt, ignore_errors=True)
    kill_common: dict[str, Any]
    if kill_shape == shape:
        kill_micro = micro
        kill_common = dict(common, compile="off" if not args.smoke else compile_mode)
    else:  # a shape that fits one GPU: 4 sequences per GPU, no micro-batches
        kill_micro = per_gpu
        kill_common = dict(
            shape=kill_shape,
            seq_len=SEQ_LEN[kill_shape],
            batch_per_gpu=per_gpu,
            micro=kill_micro,
            warmup=warmup,
            compile="off",
            grad_ckpt=True,
        )
    global_batch = per_gpu * big
    kill_opts = dict(kill_common, ckpt_dir=ckpt, checkpoint_every=checkpoint_every)
    killed = session.run(
        f"fsdp-{big}-killed",
        big,
        _options(parallel="fsdp", steps=kill_steps, variant="kill", **kill_opts),
        need_s=150 if kill_shape == "llama-8b" else 60,
        kill_at_step=kill_at,
    )
    resume_opts = dict(kill_opts, batch_per_gpu=global_batch // resume_gpus, micro=kill_micro)
    resumed = session.run(
        f"fsdp-{resume_gpus}-resumed",
        resume_gpus,
        _options(parallel="fsdp", steps=kill_steps, variant=f"resume-from-{big}-gpus", **resume_opts),
        need_s=120 if kill_shape == "llama-8b" else 45,
    )
    resumed["killed_run"] = {
        k: killed.get(k) for k in ("outcome", "killed_after_step", "gpus", "wall_s", "shape")
    }
    reference = fsdp.get(big, {}).get("losses") if kill_shape == shape and kill_steps == steps else None
    if reference and resumed.get("losses"):
        start = resumed.get("resumed_from_step", 0)
        pairs = list(zip(reference[start:], resumed["losses"][start:], strict=False))
        if pairs:
            resumed["loss_max_rel_diff_vs_uninterrupted"] = max(
                abs(a - b) / max(abs(a), 1e-9) for a, b in pairs
            )
    session.record(resumed)
    shutil.rmtree(ckpt, ignore_errors=True)
    session.finish()


def _checkpoint_root(args: argparse.Namespace, kill_shape: str) -> Path:
    """Where the kill + resume checkpoint goes: --ckpt-root, else /dev/shm when it has room (the 8B
    child's checkpoint is ~70 GB: weights and AdamW state in float32; the 1B one's ~15 GB), else the
    temporary folder."""
    if args.ckpt_root:
        return Path(args.ckpt_root)
    need = {"tiny": 2, "smollm2": 4, "llama-1b": 20}.get(kill_shape, 100) * 1024**3
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > need:
        return shm / "bench-gkd"
    return Path(tempfile.gettempdir()) / "bench-gkd"


# --------------------------------------------------------------------------- the older commands


def prepare(directory: Path, shape: str, seq_len: int, sequences: int) -> None:
    from puzzle.modeling import DeciLMForCausalLM
    from puzzle.modeling.checkpoints import CHILD_KIND, PARENT_KIND, child_config_like

    name = SHAPES[shape]
    parent = shapes.random_parent(
        name, rope_parameters=shapes.plain_rope(name), max_position_embeddings=max(2048, seq_len), **AS_BEFORE
    )
    vocab_size = parent.config.vocab_size

    def save(model, what: str, kind: str) -> None:
        params = {"shape": shape, "name": what}
        shapes.save_random_model(
            directory / what, kind, params, lambda: model, shape=shape, vocab_size=vocab_size
        )

    save(parent, "parent", PARENT_KIND)
    child = DeciLMForCausalLM(child_config_like(parent.config, child_blocks(parent.config)))
    save(child, "child", CHILD_KIND)
    shapes.save_random_tokens(  # from the global generator, after the two models
        directory / "tokens",
        vocab_size=vocab_size,
        seq_len=seq_len,
        splits={"gkd": sequences},
        parameters={"seq_len": seq_len, "n": sequences},
        seed=None,
    )


def train_artifacts(directory: Path, steps: int, batch_per_gpu: int, out: Path | None) -> None:
    from puzzle.child.gkd import distill, init_distributed
    from puzzle.config import GKDConfig
    from puzzle.modeling.checkpoints import load_model

    info = init_distributed()
    seq_len = json.loads((directory / "tokens" / "splits.json").read_text())["seq_len"]
    batch = batch_per_gpu * info.world_size
    target = directory / f"distilled-{info.world_size}gpu"
    manifest = distill(
        str(directory / "child"),
        str(directory / "parent"),
        str(directory / "tokens"),
        str(target),
        GKDConfig(
            token_budget=steps * batch * seq_len,
            batch_size=batch,
            lr=1e-4,
            warmup_fraction=0.0,
            checkpoint_every=10**9,
        ),
        device="auto",
    )
    if not info.is_main:
        return
    s = manifest.summary
    child, parent = load_model(str(target)), load_model(str(directory / "parent"))
    fpt = flops_per_token(child.config, parent.config, seq_len)
    tps = s["tokens_per_s"]
    result = {
        "device": card(),
        "gpus": info.world_size,
        "steps": s["steps"],
        "global_batch": batch,
        "seq_len": seq_len,
        "tokens_per_s": tps,
        "tokens_per_s_per_gpu": tps / info.world_size,
        "model_tflops_per_token": fpt / 1e12,
        "mfu": shapes.mfu(fpt, tps, info.world_size) if torch.cuda.is_available() else None,
        "parallel": s.get("parallel"),
        "peak_memory_gib": s.get("peak_memory_gib"),
        "final_loss": s["final_loss"],
    }
    shapes.print_json(result, out)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("puzzle.child").setLevel(logging.INFO)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("single", "scale"):
        s = sub.add_parser(name)
        s.add_argument("--smoke", action="store_true", help="on this machine's CPU, tiny shape, 2 processes")
        s.add_argument("--out", type=Path, default=None, help="results JSON (merged into)")
        s.add_argument("--budget-s", type=float, default=DEADLINE_S)
        s.add_argument("--dry-run", action="store_true", help="print the runs' commands, run nothing")
        s.add_argument("--logs", type=Path, default=None, help="keep every run's whole log in this folder")
        s.add_argument("--gpus", type=int, default=0, help="GPUs to plan for (default: all visible)")
        if name == "scale":
            s.add_argument("--compile", default="loss", choices=("auto", "off", "loss", "all"))
            s.add_argument("--ckpt-root", default=None, help="folder for the kill + resume checkpoint")
            s.add_argument(
                "--kill-shape",
                default="auto",
                choices=("auto", *sorted(SHAPES)),
                help="shape of the kill + resume (auto: llama-8b with 4 GPUs, smollm2 with 2)",
            )
        else:
            s.add_argument("--lanes", type=int, default=1, help="runs side by side, one GPU each")
            s.add_argument("--essential", action="store_true", help="only before and after per shape")
            s.add_argument("--no-loss-kernels", action="store_true", help="skip the loss-alone timing")
    w = sub.add_parser("worker")
    w.add_argument("--shape", choices=sorted(SHAPES), required=True)
    w.add_argument("--parallel", choices=("ddp", "fsdp", "auto", "single"), default="ddp")
    w.add_argument("--variant", default="after")
    w.add_argument("--seq-len", type=int, default=None)
    w.add_argument("--batch-per-gpu", type=int, default=8)
    w.add_argument("--micro", type=int, default=0)
    w.add_argument("--steps", type=int, default=20)
    w.add_argument("--warmup", type=int, default=3)
    w.add_argument("--loss-chunk", type=int, default=1024)
    w.add_argument("--compile", default="auto", choices=("auto", "off", "loss", "all"))
    w.add_argument("--grad-ckpt", action="store_true")
    w.add_argument("--ckpt-dir", default=None)
    w.add_argument("--checkpoint-every", type=int, default=0)
    w.add_argument("--result", required=True)
    k = sub.add_parser("loss")
    k.add_argument("--variant", choices=("reference", "fused"), required=True)
    k.add_argument("--tokens", type=int, default=2048)
    k.add_argument("--hidden", type=int, default=576)
    k.add_argument("--vocab", type=int, default=49152)
    k.add_argument("--layers", type=int, default=30)
    k.add_argument("--chunk", type=int, default=1024)
    k.add_argument("--repeats", type=int, default=3)
    p = sub.add_parser("prepare")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--shape", choices=("smollm2", "llama-1b", "tiny"), default="smollm2")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--sequences", type=int, default=2048)
    t = sub.add_parser("train")
    t.add_argument("--dir", type=Path, required=True)
    t.add_argument("--steps", type=int, default=30)
    t.add_argument("--batch-per-gpu", type=int, default=16)
    t.add_argument("--out", type=Path, default=None, help="also write the figures here (JSON)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    if args.cmd in ("single", "scale"):
        if args.out is None:
            args.out = RESULTS / ("gkd_scale_smoke.json" if args.smoke else "gkd_scale.json")
        if not args.smoke and not args.dry_run and not torch.cuda.is_available():
            sys.exit("no CUDA device: pass --smoke to run the CPU version")
        (single if args.cmd == "single" else scale)(args)
    elif args.cmd == "loss":
        loss_kernel(args)
    elif args.cmd == "worker":
        args.seq_len = args.seq_len or SEQ_LEN[args.shape]
        worker(args)
    elif args.cmd == "prepare":
        prepare(args.dir, args.shape, args.seq_len, args.sequences)
        print(f"prepared {args.shape} artifacts in {args.dir} ({time.perf_counter() - t0:.1f} s)")
    else:
        train_artifacts(args.dir, args.steps, args.batch_per_gpu, args.out)


if __name__ == "__main__":
    main()
