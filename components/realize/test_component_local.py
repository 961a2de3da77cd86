"""The realize component runs under KFP's local runner."""

from pathlib import Path

from kfp import dsl

from components.realize.component import realize


def test_realize_runs_locally(kfp_local: Path, tiny_library: Path, tiny_solutions: Path, tiny_child: Path) -> None:
    from puzzle.child import load_child

    @dsl.pipeline
    def realize_only(library_uri: str, solutions_uri: str, parent_uri: str) -> dsl.Model:
        library = dsl.importer(artifact_uri=library_uri, artifact_class=dsl.Model)
        solutions = dsl.importer(artifact_uri=solutions_uri, artifact_class=dsl.Artifact)
        parent = dsl.importer(artifact_uri=parent_uri, artifact_class=dsl.Model)
        return realize(library=library.output, solutions=solutions.output, parent=parent.output).outputs["child"]

    run = realize_only(library_uri=str(tiny_library), solutions_uri=str(tiny_solutions), parent_uri=str(tiny_child))

    model = load_child(run.output.path)
    assert model.config.blocks[1].attention.no_op and model.config.blocks[1].ffn.no_op
