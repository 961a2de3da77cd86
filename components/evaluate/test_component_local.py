"""The evaluate component runs under KFP's local runner; its figures feed the pipeline's gate."""

from pathlib import Path

from kfp import dsl

from components.evaluate.component import evaluate


def test_evaluate_runs_locally(kfp_local: Path, tiny_realized: Path, tiny_child: Path, tiny_tokens: Path) -> None:
    @dsl.pipeline
    def evaluate_only(child_uri: str, parent_uri: str, tokens_uri: str) -> float:
        child = dsl.importer(artifact_uri=child_uri, artifact_class=dsl.Model)
        parent = dsl.importer(artifact_uri=parent_uri, artifact_class=dsl.Model)
        tokens = dsl.importer(artifact_uri=tokens_uri, artifact_class=dsl.Dataset)
        task = evaluate(
            child=child.output, parent=parent.output, tokens=tokens.output,
            workload_prompt_len=8, workload_gen_len=4, repeats=1, device="cpu",
        )
        return task.outputs["speedup"]

    run = evaluate_only(child_uri=str(tiny_realized), parent_uri=str(tiny_child), tokens_uri=str(tiny_tokens))

    assert run.output > 0
