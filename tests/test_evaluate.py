"""Evaluation: quality figures against the parent, measured speed, and the report."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from corpus import STDLIB_TEXT  # noqa: E402

from puzzle.child.evaluate import EvaluateError, evaluate_children, quality_metrics, read_metrics
from puzzle.child.report import _pareto_front
from puzzle.config import ConfigError, DataConfig, EvaluateConfig, LibraryConfig, WorkloadConfig
from puzzle.io import artifacts
from puzzle.modeling import BlockConfig
from puzzle.modeling.checkpoints import load_model, load_tokenizer, read_parent_info, save_model

ROOT = Path(__file__).resolve().parents[1]
EVALUATE = EvaluateConfig(
    batch_size=4, workload=WorkloadConfig(batch_size=2, prompt_len=8, gen_len=8), repeats=1
)


@pytest.fixture(scope="module")
def tiny_eval(tiny_parent: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tokens, and a realized child with 1 KV head, a no-op attention and a half-width FFN."""
    from puzzle.data import prepare
    from puzzle.library.variants import assemble_child, build_library

    root = tmp_path_factory.mktemp("eval-tiny")
    text = root / "text.txt"
    text.write_text(STDLIB_TEXT * 3)
    tokens = root / "tokens"
    prepare(
        str(tiny_parent),
        str(tokens),
        DataConfig(
            source=str(text),
            seq_len=32,
            splits={"calibration": 8, "bld": 2, "score": 2, "gkd": 2, "eval": 12},
        ),
    )
    library = root / "library"
    space = LibraryConfig(
        kv_heads=[1],
        attention_linear=False,
        ffn_fractions=[0.5],
        ffn_linear=False,
        ffn_multiple=64,
    )
    build_library(str(tiny_parent), str(tokens), str(library), space)
    blocks = [
        BlockConfig.from_name(n) for n in ("attn_kv1+ffn_128", "attn_noop+ffn_256", "attn_kv2+ffn_noop")
    ]

    def body(staging: Path, local: dict[str, Path]) -> dict:
        child = assemble_child(str(tiny_parent), str(library), blocks)
        save_model(child, load_tokenizer(tiny_parent), staging, read_parent_info(tiny_parent))
        return {}

    small = root / "small"
    artifacts.run_phase("child", str(small), {"library": str(library)}, {}, body)
    return {"parent": str(tiny_parent), "tokens": str(tokens), "small": str(small)}


def test_quality_figures_match_their_definitions(tiny_parent: Path, tiny_eval) -> None:
    parent = load_model(str(tiny_parent))
    small = load_model(tiny_eval["small"])
    ids = torch.randint(0, parent.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    q = quality_metrics({"same": load_model(str(tiny_parent)), "small": small}, parent, ids, batch_size=2)
    assert q["same"]["kl_div"] == pytest.approx(0.0, abs=1e-6)
    assert q["same"]["top1_agreement"] == 1.0 and q["same"]["top5_agreement"] == 1.0
    assert q["same"]["accuracy"] == q["parent"]["accuracy"]
    # By hand for the small child: mean over predicted tokens of KL(parent || child), CE, accuracy.
    with torch.no_grad():
        p_log = F.log_softmax(parent(input_ids=ids).logits[:, :-1], -1)
        c_log = F.log_softmax(small(input_ids=ids).logits[:, :-1], -1)
    targets = ids[:, 1:]
    kl = (p_log.exp() * (p_log - c_log)).sum(-1).mean()
    ce = F.nll_loss(c_log.reshape(-1, c_log.shape[-1]), targets.reshape(-1))
    assert q["small"]["kl_div"] == pytest.approx(float(kl), rel=1e-4)
    assert q["small"]["lm_loss"] == pytest.approx(float(ce), rel=1e-4)
    assert q["small"]["perplexity"] == pytest.approx(float(ce.exp()), rel=1e-4)
    assert q["small"]["accuracy"] == pytest.approx(float((c_log.argmax(-1) == targets).float().mean()))
    assert q["small"]["top1_agreement"] == pytest.approx(
        float((c_log.argmax(-1) == p_log.argmax(-1)).float().mean())
    )
    assert q["small"]["top1_agreement"] <= q["small"]["top5_agreement"] <= 1.0


def test_evaluate_writes_metrics_and_a_report_with_speedup_accuracy_kept_and_plots(
    tiny_eval, tmp_path: Path
) -> None:
    out = tmp_path / "evaluation"
    manifest = evaluate_children(
        {"puzzle": tiny_eval["small"], "uniform_width": tiny_eval["parent"]},
        tiny_eval["parent"],
        tiny_eval["tokens"],
        str(out),
        EVALUATE,
        details={"uniform_width": {"role": "baseline"}},
        device="cpu",
    )
    metrics = read_metrics(str(out))
    parent, child = metrics["models"]["parent"], metrics["models"]["puzzle"]
    assert metrics["primary"] == "puzzle"
    assert (
        metrics["accuracy_kept"]
        == child["accuracy_kept"]
        == pytest.approx(child["accuracy"] / parent["accuracy"])
    )
    assert metrics["speedup"] == child["speedup"] == pytest.approx(child["throughput"] / parent["throughput"])
    assert child["parameters"] < parent["parameters"] and child["memory_bytes"] < parent["memory_bytes"]
    assert child["blocks"] == ["attn_kv1+ffn_128", "attn_noop+ffn_256", "attn_kv2+ffn_noop"]
    assert metrics["models"]["uniform_width"]["kl_div"] == pytest.approx(0.0, abs=1e-6)
    assert manifest.summary["puzzle.speedup"] == child["speedup"]

    report = (out / "report.md").read_text()
    assert f"keeps **{child['accuracy_kept']:.1%}** of the parent's next-token accuracy" in report
    assert f"**{child['speedup']:.2f}x**" in report and "| uniform_width | baseline |" in report
    assert "| 1 | kv2 / 256 | noop / 256 | kv2 / 256 |" in report  # layer 1 of parent, puzzle, uniform_width
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "<b>puzzle</b>" in html
    for png in ("pareto.png", "architecture.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Same request again: skipped.
    again = evaluate_children(
        {"puzzle": tiny_eval["small"], "uniform_width": tiny_eval["parent"]},
        tiny_eval["parent"],
        tiny_eval["tokens"],
        str(out),
        EVALUATE,
        details={"uniform_width": {"role": "baseline"}},
        device="cpu",
    )
    assert again.created_at == manifest.created_at


def test_bad_requests_fail_before_loading_models(tiny_eval, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="workload.gen_len must be > 0"):
        evaluate_children(
            {"c": tiny_eval["small"]},
            tiny_eval["parent"],
            tiny_eval["tokens"],
            str(tmp_path / "e"),
            EvaluateConfig(workload=WorkloadConfig(batch_size=1, prompt_len=4, gen_len=0)),
        )
    with pytest.raises(EvaluateError, match="'parent' is reserved"):
        evaluate_children(
            {"parent": tiny_eval["small"]},
            tiny_eval["parent"],
            tiny_eval["tokens"],
            str(tmp_path / "e"),
            EvaluateConfig(),
        )
    with pytest.raises(artifacts.ArtifactError, match="no parent/child/export artifact"):
        evaluate_children(
            {"c": str(tmp_path / "nothing")},
            tiny_eval["parent"],
            tiny_eval["tokens"],
            str(tmp_path / "e"),
            EvaluateConfig(),
        )


def test_pareto_front_keeps_points_no_other_beats_on_both_axes() -> None:
    points = [(1.0, 1.0), (1.5, 0.97), (1.5, 0.9), (2.0, 0.8), (1.2, 0.7)]
    assert _pareto_front(points) == [(1.0, 1.0), (1.5, 0.97), (2.0, 0.8)]


def test_cli_evaluate_rejects_malformed_children(tiny_eval, capsys) -> None:
    from puzzle.cli import main

    assert (
        main(
            [
                "evaluate",
                "just-a-path",
                "--parent",
                tiny_eval["parent"],
                "--tokens",
                tiny_eval["tokens"],
                "--out",
                "x",
            ]
        )
        == 2
    )
    assert "must look like NAME=URI" in capsys.readouterr().err
