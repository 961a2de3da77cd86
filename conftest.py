"""Fixtures shared by tests/ and components/: real SeaweedFS S3 and MLflow servers, tiny random
parents, the real SmolLM2 parent, the whole pipeline's local run, KFP's local runner.

Session-scoped fixtures keep the suite fast on 2 cores: each server starts once, the real
SmolLM2-135M parent is converted once and the pipeline runs once under kfp.local, however many
test folders use them. Helpers the tests import (servers, corpus, pipeline_local) live in tests/.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "tests"))

from servers import S3Server, apply_env, restore_env, start_seaweedfs  # noqa: E402
from threads import suite_threads  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Torch threads for this process and every `puzzle` process a test starts (through OMP_NUM_THREADS).
_THREADS, _WHY = suite_threads()
os.environ["OMP_NUM_THREADS"] = str(_THREADS)
torch.set_num_threads(_THREADS)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    terminalreporter.write_line(f"torch threads: {_THREADS} ({_WHY}; PUZZLE_TEST_THREADS sets it)")


@pytest.fixture(scope="session")
def puzzle_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private cache for downloaded S3 artifacts and staging directories."""
    path = tmp_path_factory.mktemp("puzzle-cache")
    previous = apply_env({"PUZZLE_CACHE_DIR": str(path)})
    yield path
    restore_env(previous)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory, puzzle_cache: Path) -> Iterator[S3Server]:
    """A real SeaweedFS S3 server on loopback; the AWS_* variables point at it for the session."""
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    previous = apply_env(server.env())
    from puzzle.io import storage

    storage._client_for.cache_clear()
    yield server
    restore_env(previous)
    storage._client_for.cache_clear()
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket; returns its name."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    return name


TINY_DIMS = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def make_tiny_parent(family: str, directory: Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny random parent of ``family`` (built from transformers' own config classes)."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    }
    config_cls, model_cls = classes[family]
    dims = {**TINY_DIMS, **overrides}
    if family == "qwen3":
        dims.setdefault("head_dim", 32)
    config = config_cls(
        **dims, bos_token_id=1, eos_token_id=2, tie_word_embeddings=family in ("qwen2", "qwen3")
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        # Random norms and biases, so that a conversion that drops them cannot pass by accident.
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn_like(param))
    model.save_pretrained(directory)
    save_tiny_tokenizer(directory, dims["vocab_size"])
    return directory


def save_tiny_tokenizer(directory: Path, vocab_size: int) -> None:
    """A real (byte-level BPE) tokenizer whose ids fit a tiny vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(3)}
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    for ch in sorted(alphabet):
        if len(vocab) >= vocab_size:
            break
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<1>", eos_token="<2>", unk_token="<0>")
    fast.save_pretrained(directory)


@pytest.fixture(scope="session")
def tiny_parent_factory(tmp_path_factory: pytest.TempPathFactory):
    """``factory(family="llama", **config_overrides) -> Path`` of a saved tiny random parent."""
    made: dict[tuple, Path] = {}

    def factory(family: str = "llama", seed: int = 0, **overrides) -> Path:
        key = (family, seed, json.dumps(overrides, sort_keys=True))
        if key not in made:
            made[key] = make_tiny_parent(
                family, tmp_path_factory.mktemp(f"parent-{family}"), seed, **overrides
            )
        return made[key]

    return factory


@pytest.fixture(scope="session")
def tiny_parent(tiny_parent_factory, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama parent, converted (a local ``parent`` artifact)."""
    from puzzle.parent import convert

    out = tmp_path_factory.mktemp("tiny-parent") / "parent"
    convert(str(tiny_parent_factory("llama")), str(out))
    return out


@pytest.fixture(scope="session")
def smollm2_parent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real SmolLM2-135M-Instruct parent, converted once per session (about 30 s)."""
    from puzzle.parent import convert

    out = tmp_path_factory.mktemp("smollm2") / "parent"
    convert("smollm2", str(out))
    return out


@pytest.fixture(scope="session")
def smollm2_tokens(smollm2_parent: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Standard-library text in SmolLM2's tokens, 64-token sequences: calibration 16, bld 64,
    score 16, eval 8 (a few seconds; made once per session)."""
    from puzzle.config import DataConfig
    from puzzle.data import prepare

    out = tmp_path_factory.mktemp("smollm2-tokens") / "tokens"
    splits = {"calibration": 16, "bld": 64, "score": 16, "eval": 8}
    prepare(str(smollm2_parent), str(out), DataConfig(seq_len=64, splits=splits))
    return out


@pytest.fixture(scope="session")
def mlflow_server(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory):
    """A real MLflow server (SQLite backend, artifacts in a SeaweedFS bucket, webhooks enabled
    for loopback delivery); started once per session (~10-20 s). See tests/mlflow_server.py."""
    from mlflow_server import start_mlflow

    bucket = f"mlflow-{uuid.uuid4().hex[:8]}"
    s3_server.client().create_bucket(Bucket=bucket)
    server = start_mlflow(tmp_path_factory.mktemp("mlflow"), s3_server, bucket)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def local_pipeline_run(s3_server: S3Server, mlflow_server, tiny_parent_factory, tmp_path_factory):
    """The whole Kubeflow pipeline run once under kfp.local on a tiny parent (parent and export on
    the SeaweedFS server, tracking and registry on the MLflow server); see tests/pipeline_local.py.
    The component tests (components/*/test_component_local.py) inspect their own task's outputs."""
    from pipeline_local import session_run

    return session_run(tmp_path_factory, s3_server, mlflow_server, tiny_parent_factory)


@pytest.fixture(scope="session")
def tracking_server(mlflow_server) -> str:
    """URL of the session's MLflow server (the one the pipeline's local run tracks to as well)."""
    return mlflow_server.url


@pytest.fixture
def kfp_local(tmp_path: Path) -> Iterator[Path]:
    """KFP's local runner in this environment (``puzzle`` installed, no per-task venv)."""
    import warnings

    from kfp import local

    root = tmp_path / "pipeline-root"
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root),
        workspace_root=str(tmp_path / "workspace"),
        raise_on_error=True,
    )
    with warnings.catch_warnings():
        # Our images are not named "python...": the runner warns about it, and here it is fine.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
        yield root
