"""GKD at scale, on CPU: the fused loss equals the reference, FSDP2 on 2 processes (gloo) trains the
same loss curve as DDP, its sharded checkpoint resumes on 1 process, and the memory estimate sends
an 8B parent to FSDP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_gkd import perturbed_child

from puzzle.child import parallel
from puzzle.child.gkd import HISTORY, STOP_EXIT_CODE, distill
from puzzle.child.gkd_loss import cosine_distance_sum, fused_cosine, fused_head_loss, kl_parent_child
from puzzle.config import DataConfig, GKDConfig
from puzzle.modeling.checkpoints import load_model


@pytest.mark.parametrize(("weight_kl", "weight_lm"), [(1.0, 0.0), (0.7, 0.3), (0.0, 1.0)])
def test_the_fused_head_loss_is_the_reference_kl_and_lm_in_value_and_gradient(
    weight_kl: float, weight_lm: float
) -> None:
    torch.manual_seed(0)
    batch, seq, hidden, vocab = 2, 7, 16, 50
    h_child = torch.randn(batch, seq, hidden, dtype=torch.float64, requires_grad=True)
    w_child = torch.randn(vocab, hidden, dtype=torch.float64, requires_grad=True)
    h_parent, w_parent = torch.randn(batch, seq, hidden), torch.randn(vocab, hidden)
    ids = torch.randint(0, vocab, (batch, seq))

    child_logits = h_child @ w_child.T
    kl = kl_parent_child(h_parent.double() @ w_parent.double().T, child_logits)
    lm = F.cross_entropy(child_logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))
    reference = weight_kl * kl + weight_lm * lm
    want = torch.autograd.grad(reference, [h_child, w_child])

    # 14 tokens in chunks of 3: the last chunk is short
    loss, fused_kl, fused_lm = fused_head_loss(
        h_child,
        w_child,
        h_parent.double(),
        w_parent.double(),
        ids,
        weight_kl=weight_kl,
        weight_lm=weight_lm,
        chunk=3,
    )
    got = torch.autograd.grad(2.0 * loss, [h_child, w_child])
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-6)
    assert float(fused_kl) == pytest.approx(float(kl), rel=1e-6)
    if weight_lm:
        assert float(fused_lm) == pytest.approx(float(lm), rel=1e-6)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, 2.0 * w, rtol=1e-5, atol=1e-6)  # float32 inside the chunks


def test_the_fused_cosine_terms_are_the_reference_sum_in_value_and_gradient() -> None:
    torch.manual_seed(0)
    child = [torch.randn(2, 5, 8, requires_grad=True) for _ in range(4)]
    parent = [torch.randn(2, 5, 8) for _ in range(4)]
    reference = cosine_distance_sum(tuple(child), tuple(parent))
    fused = fused_cosine(child, parent)
    assert float(fused.detach()) == pytest.approx(float(reference.detach()), rel=1e-6)
    want = torch.autograd.grad(3.0 * reference, child[1:])
    got = torch.autograd.grad(3.0 * fused, child[1:])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_the_memory_estimate_sends_an_8b_parent_and_6b_child_to_fsdp_and_a_small_model_to_ddp(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from transformers import LlamaConfig

    from puzzle.modeling import BlockConfig
    from puzzle.modeling.checkpoints import child_config_like
    from puzzle.parent import decilm_config

    llama_8b = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    )
    parent_config = decilm_config(llama_8b)
    narrow = BlockConfig.from_name("attn_kv2+ffn_7168")
    child_config = child_config_like(
        parent_config, [b if i % 4 == 0 else narrow for i, b in enumerate(parent_config.blocks)]
    )
    parent, child = parallel.ModelStats.of(parent_config), parallel.ModelStats.of(child_config)
    assert 8.0e9 < parent.params < 8.1e9 and 5.7e9 < child.params < 5.9e9

    monkeypatch.setattr(parallel, "device_memory", lambda device, local: 80 * parallel.GIB)
    four = parallel.DistInfo(rank=0, world_size=4, local_world_size=4)
    options = dict(micro_tokens=4096, grad_checkpointing=True, loss_chunk=1024)
    mode, estimates = parallel.choose_mode("auto", four, torch.device("cpu"), child, parent, **options)
    assert mode == "fsdp"
    assert estimates["ddp"].total > 100 * parallel.GIB  # 16 bytes x 5.8B + the parent: never fits 80 GB
    fsdp_on_4 = parallel.estimate_memory("fsdp", 4, child, parent, cuda=True, **options)
    assert fsdp_on_4.total < 40 * parallel.GIB
    tiny = parallel.ModelStats(
        params=10**8, largest_layer=10**7, root=10**7, layers=8, hidden=512, vocab=32000, largest_ffn=2048
    )
    assert parallel.choose_mode("auto", four, torch.device("cpu"), tiny, tiny, **options)[0] == "ddp"
    one = parallel.DistInfo()
    assert parallel.choose_mode("fsdp", one, torch.device("cpu"), tiny, tiny, **options)[0] == "single"


# --------------------------------------------------------------------------- two processes

TWO_PROCESS_SCRIPT = """
import os, sys, torch
torch.set_num_threads(1)
from puzzle.child.gkd import STOP_ENV, distill
from puzzle.config import DataConfig, GKDConfig
child, parent, tokens, root = sys.argv[1:5]
base = dict(token_budget=6 * 4 * 32, batch_size=4, lr=2e-3, checkpoint_every=3)
# DDP with the reference loss; FSDP with the fused loss, activation checkpointing, micro-batches of 1.
distill(child, parent, tokens, root + "/ddp", GKDConfig(**base, parallel="ddp", loss_chunk=0), device="cpu")
fsdp = GKDConfig(**base, parallel="fsdp", grad_checkpointing=True, micro_batch_size=1, loss_chunk=16)
distill(child, parent, tokens, root + "/fsdp", fsdp, device="cpu")
os.environ[STOP_ENV] = "3"  # exit right after the checkpoint of step 3, as a killed run would
distill(child, parent, tokens, root + "/killed", fsdp, device="cpu")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def tiny_gkd(tiny_parent: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A noisy copy of the tiny parent (something for GKD to recover), the parent, 48 GKD sequences."""
    from corpus import STDLIB_TEXT

    from puzzle.data import prepare

    root = tmp_path_factory.mktemp("gkd-parallel")
    text = root / "text.txt"
    text.write_text(STDLIB_TEXT * 4)
    tokens = root / "tokens"
    splits = {"calibration": 4, "bld": 4, "score": 4, "gkd": 48, "eval": 16}
    prepare(str(tiny_parent), str(tokens), DataConfig(source=str(text), seq_len=32, splits=splits))
    return {
        "parent": str(tiny_parent),
        "tokens": str(tokens),
        "child": perturbed_child(tiny_parent, root / "noisy"),
    }


def test_fsdp_on_two_processes_trains_the_curve_of_ddp_and_its_sharded_checkpoint_resumes_on_one(
    tiny_gkd: dict[str, str], tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "TQDM_DISABLE": "1",
        "OMP_NUM_THREADS": "1",
    }
    args = [
        sys.executable,
        "-c",
        TWO_PROCESS_SCRIPT,
        tiny_gkd["child"],
        tiny_gkd["parent"],
        tiny_gkd["tokens"],
    ]
    procs = [
        subprocess.Popen(
            [*args, str(tmp_path)],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [STOP_EXIT_CODE] * 2, outputs[0][-3000:]

    ddp = json.loads((tmp_path / "ddp" / HISTORY).read_text())
    fsdp = json.loads((tmp_path / "fsdp" / HISTORY).read_text())
    assert len(ddp) == len(fsdp) == 6
    for name in ("loss", "cosine", "kl", "grad_norm"):
        assert [r[name] for r in fsdp] == pytest.approx([r[name] for r in ddp], rel=1e-3, abs=1e-5), name
    assert fsdp[-1]["loss"] < 0.8 * max(r["loss"] for r in fsdp)  # it trains
    ddp_weights = load_model(str(tmp_path / "ddp")).state_dict()
    fsdp_weights = load_model(str(tmp_path / "fsdp")).state_dict()
    assert max(float((ddp_weights[k] - fsdp_weights[k]).abs().max()) for k in ddp_weights) < 1e-4

    # The killed FSDP run left a sharded checkpoint of step 3 (one file per process); one process
    # (no process group, unsharded) resumes it and ends where the uninterrupted run did.
    checkpoint = tmp_path / "killed.partial" / ".work" / "gkd-checkpoint"
    state = json.loads((checkpoint / "latest.json").read_text())
    assert state["step"] == 3 and state["world_size"] == 2 and state["mode"] == "fsdp"
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(state["files"])
    resumed = distill(
        tiny_gkd["child"],
        tiny_gkd["parent"],
        tiny_gkd["tokens"],
        str(tmp_path / "killed"),
        GKDConfig(token_budget=6 * 4 * 32, batch_size=4, lr=2e-3, checkpoint_every=3),
        device="cpu",
    )
    assert resumed.summary["resumed_from_step"] == 3 and resumed.summary["parallel"] == "single"
    history = json.loads((tmp_path / "killed" / HISTORY).read_text())
    assert [r["step"] for r in history] == list(range(1, 7))
    assert [r["loss"] for r in history] == pytest.approx([r["loss"] for r in fsdp], rel=1e-3, abs=1e-5)
    resumed_weights = load_model(str(tmp_path / "killed")).state_dict()
    assert max(float((resumed_weights[k] - fsdp_weights[k]).abs().max()) for k in fsdp_weights) < 1e-4


def test_a_model_built_on_the_meta_device_reads_its_checkpoint_and_keeps_tied_embeddings(
    tiny_parent_factory, tmp_path: Path
) -> None:
    from puzzle.child.gkd import ModelSpec
    from puzzle.parent import convert

    parent = tmp_path / "qwen2"
    convert(str(tiny_parent_factory("qwen2")), str(parent))  # qwen2's embeddings are tied
    spec = ModelSpec.from_dir(parent)
    assert spec.config.tie_word_embeddings
    model = parallel.meta_model(spec.config, dtype=torch.float32, trainable=True)
    parallel.materialize(model, torch.device("cpu"), spec.weights)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    want = load_model(str(parent)).state_dict()
    got = model.state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    ids = torch.randint(0, spec.config.vocab_size, (2, 9))
    torch.testing.assert_close(model(input_ids=ids).logits, load_model(str(parent))(input_ids=ids).logits)
