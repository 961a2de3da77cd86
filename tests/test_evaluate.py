"""Evaluation: quality figures against the parent, measured speed, and the report."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from corpus import STDLIB_TEXT  # noqa: E402

from puzzle.child.evaluate import (
    EvaluateError,
    TargetMissedError,
    compare,
    evaluate_children,
    quality_metrics,
    read_metrics,
)
from puzzle.child.report import _pareto_front
from puzzle.config import (
    ConfigError,
    CostsConfig,
    DataConfig,
    EvaluateConfig,
    LibraryConfig,
    SearchConfig,
    parse_config,
)
from puzzle.io import artifacts
from puzzle.modeling import BlockConfig
from puzzle.modeling.checkpoints import load_model, load_tokenizer, read_parent_info, save_model

ROOT = Path(__file__).resolve().parents[1]
EVALUATE = EvaluateConfig(batch_size=4, repeats=1, bootstrap=200)
COSTS = CostsConfig(batch_sizes=[1, 2], prompt_len=8, gen_len=8)
SEARCH = SearchConfig(constraints=["params<=0.9x", "throughput>=0.01x@bs2"])


@pytest.fixture(scope="module")
def tiny_eval(tiny_parent_factory, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tokens, and a realized child with 1 KV head, a no-op attention and a half-width FFN."""
    from pipeline_local import pretrain_tiny_parent

    from puzzle.data import prepare
    from puzzle.library.variants import assemble_child, build_library
    from puzzle.parent import convert

    root = tmp_path_factory.mktemp("eval-tiny")
    # A parent that predicts some tokens right, so that accuracy kept is defined.
    trained = pretrain_tiny_parent(tiny_parent_factory("llama"), root / "trained", steps=30)
    tiny_parent = root / "parent"
    convert(str(trained), str(tiny_parent))
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
            ood_sequences=6,
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


def _evaluate(tiny_eval, out: Path, search: SearchConfig = SEARCH) -> artifacts.Manifest:
    return evaluate_children(
        {"puzzle": tiny_eval["small"], "uniform_width": tiny_eval["parent"]},
        tiny_eval["parent"],
        tiny_eval["tokens"],
        str(out),
        EVALUATE,
        COSTS,
        search,
        details={"uniform_width": {"role": "baseline"}},
        device="cpu",
    )


def test_evaluate_writes_metrics_and_a_report_with_speedup_accuracy_kept_and_plots(
    tiny_eval, tmp_path: Path
) -> None:
    out = tmp_path / "evaluation"
    manifest = _evaluate(tiny_eval, out)
    metrics = read_metrics(str(out))
    parent, child = metrics["models"]["parent"], metrics["models"]["puzzle"]
    assert metrics["primary"] == "puzzle"
    assert (
        metrics["accuracy_kept"]
        == child["accuracy_kept"]
        == pytest.approx(child["accuracy"] / parent["accuracy"])
    )
    # The headline workload: the batch size the throughput bound is pinned to (@bs2).
    assert metrics["workload"] == {"batch_size": 2, "prompt_len": 8, "gen_len": 8}
    assert metrics["speedup"] == child["speedup"] == pytest.approx(child["throughput"] / parent["throughput"])
    assert child["throughput"] == child["speed"]["2"]["throughput"]
    assert child["parameters"] < parent["parameters"] and child["memory_bytes"] < parent["memory_bytes"]
    assert child["blocks"] == ["attn_kv1+ffn_128", "attn_noop+ffn_256", "attn_kv2+ffn_noop"]
    assert metrics["models"]["uniform_width"]["kl_div"] == pytest.approx(0.0, abs=1e-6)
    assert manifest.summary["puzzle.speedup"] == child["speedup"]

    report = (out / "report.md").read_text()
    assert f"keeps **{child['accuracy_kept']:.1%}** (95 % CI" in report
    assert f"**{child['speedup']:.2f}x**" in report and "| uniform_width | baseline |" in report
    assert "| 1 | kv2 / 256 | noop / 256 | kv2 / 256 |" in report  # layer 1 of parent, puzzle, uniform_width
    assert "## Constraints, measured" in report and "| `params<=0.9x` | 2 |" in report
    assert "## Speed at every searched workload" in report
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "<b>puzzle</b>" in html
    for png in ("pareto.png", "architecture.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Same request again: skipped.
    again = _evaluate(tiny_eval, out)
    assert again.created_at == manifest.created_at


def test_evaluate_covers_both_domains_at_the_serving_context_with_intervals(
    tiny_eval, tmp_path: Path
) -> None:
    out = tmp_path / "evaluation"
    _evaluate(tiny_eval, out)
    metrics = read_metrics(str(out))
    # Sequences of prompt + generated tokens (16), in the training domain and out of it.
    assert set(metrics["splits"]) == {"eval", "eval_ood"}
    assert {info["seq_len"] for info in metrics["splits"].values()} == {16}
    assert metrics["splits"]["eval"]["sequences"] >= 12 * 32 // 16 - 1
    child, same = metrics["models"]["puzzle"], metrics["models"]["uniform_width"]
    for split in ("eval", "eval_ood"):
        q = child["quality"][split]
        lo, hi = q["accuracy_kept_ci"]
        assert lo <= q["accuracy_kept"] <= hi
        kl_lo, kl_hi = q["kl_div_ci"]
        assert 0.0 < kl_lo <= q["kl_div"] <= kl_hi
        # The parent against itself: no interval width at all.
        assert same["quality"][split]["accuracy_kept_ci"] == [1.0, 1.0]
    assert child["quality"]["eval"]["kl_div"] == child["kl_div"]
    assert child["quality"]["eval_ood"]["kl_div"] != child["kl_div"]
    # Speed at every searched batch size.
    assert set(child["speed"]) == {"1", "2"} and metrics["batch_sizes"] == [1, 2]


def test_constraints_are_checked_on_measured_figures(tiny_eval, tmp_path: Path) -> None:
    out = tmp_path / "evaluation"
    _evaluate(tiny_eval, out, SearchConfig(constraints=["params<=0.1x", "throughput>=0.01x@bs1"]))
    metrics = read_metrics(str(out))
    checks = {c["constraint"]: c for c in metrics["constraints"]}
    params = checks["params<=0.1x"]
    child, parent = metrics["models"]["puzzle"], metrics["models"]["parent"]
    assert params["value"] == pytest.approx(child["parameters"] / parent["parameters"])
    assert not params["satisfied"]
    assert params["shortfall_pct"] == pytest.approx(100 * (params["value"] / 0.1 - 1))
    at_bs1 = checks["throughput>=0.01x@bs1"]
    assert at_bs1["batch_size"] == 1 and at_bs1["satisfied"]
    assert metrics["meets_targets"] is False
    assert "It misses params<=0.1x" in (out / "report.md").read_text()


def test_compare_lists_an_unreachable_baseline_and_fails_a_child_that_misses(
    tiny_eval, tmp_path: Path
) -> None:
    from puzzle.search.mip import SOLUTIONS_KIND, write_solutions

    unreachable = tmp_path / "uniform_width"

    def body(staging: Path, local: dict) -> dict:
        write_solutions(staging, {"solutions": [], "unreachable": "uniform_width: no single width meets it"})
        return {"reachable": False}

    artifacts.run_phase(SOLUTIONS_KIND, str(unreachable), {}, {"m": 1}, body)
    out = tmp_path / "evaluation"
    with pytest.raises(TargetMissedError, match=r"params<=0.1x: measured .* % short"):
        compare(
            tiny_eval["small"],
            {"uniform_width": str(unreachable), "same": tiny_eval["parent"]},
            tiny_eval["parent"],
            tiny_eval["tokens"],
            str(out),
            EVALUATE,
            COSTS,
            SearchConfig(constraints=["params<=0.1x"]),
            device="cpu",
        )
    metrics = read_metrics(str(out))  # the report is written before the run fails
    assert set(metrics["models"]) == {"parent", "puzzle", "same"}
    assert metrics["unreachable"] == {"uniform_width": "uniform_width: no single width meets it"}
    report = (out / "report.md").read_text()
    assert "**uniform_width** cannot reach the target, so it is not compared" in report


def test_bad_requests_fail_before_loading_models(tiny_eval, tmp_path: Path) -> None:
    def call(children: dict[str, str], evaluate: EvaluateConfig = EVALUATE) -> None:
        evaluate_children(
            children, tiny_eval["parent"], tiny_eval["tokens"], str(tmp_path / "e"), evaluate, COSTS, SEARCH
        )

    with pytest.raises(ConfigError, match="evaluate.seq_len"):
        EvaluateConfig(seq_len=1)
    with pytest.raises(EvaluateError, match=r"evaluate.batch_sizes \[4\] were never searched for"):
        call({"c": tiny_eval["small"]}, EvaluateConfig(batch_sizes=[4]))
    with pytest.raises(EvaluateError, match="'parent' is reserved"):
        call({"parent": tiny_eval["small"]})
    with pytest.raises(artifacts.ArtifactError, match="no parent/child/export artifact"):
        call({"c": str(tmp_path / "nothing")})
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"evaluate": {"batch_sizes": [8]}, "costs": {"batch_sizes": [1, 64]}}, "evaluate.batch_sizes"),
        (
            {
                "evaluate": {"batch_sizes": [1]},
                "costs": {"batch_sizes": [1, 64]},
                "search": {"constraints": ["throughput>=1.5x@bs64"]},
            },
            "evaluate.batch_sizes",
        ),
        ({"search": {"constraints": ["latency<=0.7x@bs8"]}}, "search.constraints"),
        ({"data": {"ood_source": None}}, "evaluate.ood"),
    ],
)
def test_config_refuses_an_evaluation_workload_that_was_not_searched(settings: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse_config(settings)


def test_a_two_workload_evaluation_is_accepted() -> None:
    config = parse_config(
        {
            "costs": {"batch_sizes": [1, 64]},
            "search": {"constraints": ["throughput>=1.5x@bs64", "latency<=0.7x@bs1"]},
        }
    )
    assert config.evaluate.workload_batch_sizes(config.costs) == [1, 64]


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
