"""BLD and GKD token budgets are checked with the configuration, before any model loads: at least
one batch (GKD: or 0, no GKD) and at most `max_epochs` passes over their split."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from puzzle.config import ConfigError, RunConfig, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]
# The defaults: data.seq_len 128, bld split 32 and batch 8 (1,024 tokens), gkd split 64 and batch 4 (512).
BLD_BATCH, GKD_BATCH = 8 * 128, 4 * 128


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any model or tokenizer load fails the test: the checks must not need one."""
    import transformers

    from puzzle.modeling import checkpoints

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded during the configuration check")

    monkeypatch.setattr(checkpoints, "load_model", refuse)
    monkeypatch.setattr(checkpoints, "load_tokenizer", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"bld": {"token_budget": BLD_BATCH - 1}},
            r"bld\.token_budget \(1023\) is below one batch \(bld\.batch_size=8 x data\.seq_len=128 = 1024 "
            r"tokens\), so not one step would train: raise bld\.token_budget to at least 1024 or lower "
            r"bld\.batch_size \(0 means no BLD\)$",
        ),
        (  # 0 is the no-BLD ablation, which has no pairs to train
            {"bld": {"token_budget": 0}},
            r"bld\.coupled is 'chosen' but bld\.token_budget is 0 \(no BLD\).*set bld\.coupled: none",
        ),
        (
            {"gkd": {"token_budget": GKD_BATCH - 1}},
            r"gkd\.token_budget \(511\) is below one batch .* lower gkd\.batch_size \(0 means no GKD\)",
        ),
        (
            {"bld": {"token_budget": 4 * 32 * 128 + 1}},  # 17 steps of 8: 4.25 passes over 32 sequences
            r"bld\.token_budget \(16385\) needs 129 sequences of data\.seq_len=128 in 17 steps of "
            r"bld\.batch_size=8: 4\.2 passes over data\.splits\.bld \(32\), more than bld\.max_epochs=4: "
            r"raise data\.splits\.bld to at least 34, lower bld\.token_budget to at most 16384, or raise "
            r"bld\.max_epochs",
        ),
        (
            {"gkd": {"token_budget": 65 * GKD_BATCH}},  # 65 steps of 4: 4.06 passes over 64 sequences
            r"gkd\.token_budget \(33280\) .*more than gkd\.max_epochs=4: raise data\.splits\.gkd to at "
            r"least 65, lower gkd\.token_budget to at most 32768, or raise gkd\.max_epochs",
        ),
        (
            {"gkd": {"token_budget": 10 * GKD_BATCH, "max_epochs": 0}},
            r"gkd\.max_epochs must be > 0",
        ),
        ({"bld": {"max_epochs": -1}}, r"bld\.max_epochs must be > 0"),
        (
            {"bld": {"val_sequences": 3}},
            r"bld\.val_sequences is 3, more than the 2 sequences of data\.splits\.score .* "
            r"raise data\.splits\.score",
        ),
        (  # one batch (8 sequences) is already 8 passes over 1: no budget fits, so no "lower" fix
            {"data": {"splits": {"calibration": 1, "bld": 1, "score": 2, "gkd": 1, "eval": 1}}},
            r"bld\.token_budget \(4096\) .*32\.0 passes over data\.splits\.bld \(1\).* raise "
            r"data\.splits\.bld to at least 8, or raise bld\.max_epochs",
        ),
    ],
)
def test_a_bad_budget_is_refused_naming_the_field_and_the_fix(
    settings: dict, message: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(settings)
    # The same through a config file, as every command and the pipeline load it.
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(settings))
    with pytest.raises(ConfigError, match=message):
        load_config(str(path), [f"output={tmp_path / 'run'}"], check_access=False)


def test_budgets_at_the_limits_pass() -> None:
    parse_config({"bld": {"token_budget": BLD_BATCH}, "gkd": {"token_budget": GKD_BATCH}})  # one batch
    parse_config({"bld": {"token_budget": 4 * 32 * 128}, "gkd": {"token_budget": 4 * 64 * 128}})  # 4 passes
    parse_config({"gkd": {"token_budget": 65 * GKD_BATCH - 1}})  # GKD rounds its steps down: 64 steps
    parse_config({"gkd": {"token_budget": 0}})  # no GKD
    # Each fix the messages name works.
    parse_config({"bld": {"token_budget": 4 * 32 * 128 + 1, "max_epochs": 5}})
    parse_config(
        {"gkd": {"token_budget": 65 * GKD_BATCH}, "data": {"splits": {**RunConfig().data.splits, "gkd": 65}}}
    )
    parse_config({"bld": {"token_budget": BLD_BATCH - 1, "batch_size": 7}})


def test_the_example_config_stays_within_its_budgets(tmp_path: Path) -> None:
    example = load_config(str(ROOT / "configs" / "example.yaml"), [f"output={tmp_path}"], check_access=False)
    for name in ("bld", "gkd"):
        section = getattr(example, name)
        batch_tokens = section.batch_size * example.data.seq_len
        steps = (
            -(-section.token_budget // batch_tokens)
            if name == "bld"
            else section.token_budget // batch_tokens
        )
        assert steps >= 1
        assert steps * section.batch_size <= section.max_epochs * example.data.splits[name]


def test_no_bld_needs_no_coupled_pairs() -> None:
    """`bld.token_budget: 0` is the no-BLD ablation: accepted with `bld.coupled: none`, refused with
    `chosen` (the chosen pairs cannot be trained without a budget), naming the field and the fix."""
    assert parse_config({"bld": {"token_budget": 0, "coupled": "none"}}).bld.token_budget == 0
    with pytest.raises(ConfigError, match=r"bld\.coupled .*token_budget is 0.*set bld\.coupled: none"):
        parse_config({"bld": {"token_budget": 0, "coupled": "chosen"}})
