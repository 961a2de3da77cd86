"""The Puzzle pipeline: one containerized component per phase, artifacts in the pipeline root (S3).

convert -> data -> library -> BLD (fan-out over shards, merge) -> scores (fan-out, merge) and
costs -> search -> realize -> GKD -> evaluate -> export (to the serving prefix) -> [gate] register
(alias ``candidate``) -> [targets met] promote (alias ``champion``); beside them the baselines
(uniform width, layer dropping, ...) at the same constraints and GKD budget, evaluated with the
child in one report; an exit handler records the outcome in MLflow whatever happened.

Parameters mirror the ``puzzle run`` configuration (:mod:`pipelines.parameters` maps a config to
arguments); cluster placement (GPU resources, tolerations, node selectors, /dev/shm, secrets,
retries) is set here, on each task. ``python -m pipelines.puzzle_pipeline`` (or
``puzzle pipeline compile``) writes ``pipelines/puzzle_pipeline.yaml``, which is committed; a
test fails when recompiling changes it.
"""

from pathlib import Path

from kfp import compiler, dsl, kubernetes

from components.baselines.component import compare_baselines
from components.bld.component import train_blocks
from components.bld_merge.component import merge_library
from components.convert.component import convert
from components.costs.component import measure_costs
from components.data.component import prepare_data
from components.distill.component import distill
from components.evaluate.component import evaluate
from components.export.component import export
from components.library.component import build_library
from components.promote.component import promote
from components.realize.component import realize
from components.record_outcome.component import record_outcome
from components.register.component import register
from components.score.component import score_blocks
from components.score_merge.component import merge_scores
from components.search.component import search
from components.shard_plan.component import shard_plan

PIPELINE_NAME = "puzzle"
PIPELINE_FILE = Path(__file__).with_name("puzzle_pipeline.yaml")

# At most this many BLD / scoring shards run at once (each holds one GPU). The number of shards
# is a run parameter; keep it in the tens: every shard is a pod, and very wide fan-outs stall
# Argo and overflow etcd's object size limit.
BLD_PARALLELISM = 8
SCORING_PARALLELISM = 8

GPU_RESOURCE = "nvidia.com/gpu"
GPU_TAINT = "nvidia.com/gpu"  # the taint GPU node pools usually carry
SHM_SIZE = "16Gi"  # /dev/shm for NCCL and DataLoader workers (the container default is 64 MiB)
GPU_CPU, GPU_MEMORY = "8", "64Gi"
CPU_CPU, CPU_MEMORY = "2", "16Gi"
# A GPU step that fails (preempted node, XID error, OOM) is retried 3 times: after 1, 2, 4 min.
RETRIES, BACKOFF, BACKOFF_FACTOR, BACKOFF_MAX = 3, "60s", 2.0, "1h"

S3_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
MLFLOW_KEYS = {
    "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN": "MLFLOW_TRACKING_TOKEN",
}
ENV_KEYS = {
    "AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION": "AWS_DEFAULT_REGION",
    "MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL": "MLFLOW_S3_ENDPOINT_URL",
}


def _environment(task: dsl.PipelineTask, s3_secret, mlflow_secret, env_config_map) -> dsl.PipelineTask:
    """S3 and MLflow settings and credentials, from Kubernetes objects named by run parameters.

    All optional: on a cluster with workload identity (IRSA, GKE) there is no S3 key pair, and a
    tracking server without authentication needs no MLflow secret.
    """
    kubernetes.use_secret_as_env(task, secret_name=s3_secret, secret_key_to_env=S3_KEYS, optional=True)
    kubernetes.use_secret_as_env(
        task, secret_name=mlflow_secret, secret_key_to_env=MLFLOW_KEYS, optional=True
    )
    kubernetes.use_config_map_as_env(
        task, config_map_name=env_config_map, config_map_key_to_env=ENV_KEYS, optional=True
    )
    return task


def _cpu_step(task: dsl.PipelineTask, env: tuple, *, cache: bool = True) -> dsl.PipelineTask:
    task.set_cpu_request(CPU_CPU).set_memory_request(CPU_MEMORY).set_caching_options(enable_caching=cache)
    return _environment(task, *env)


def _gpu_step(task: dsl.PipelineTask, env: tuple, *, gpus=1, node_selector=None) -> dsl.PipelineTask:
    """One pod with ``gpus`` GPUs, scheduled on GPU nodes, retried with backoff, /dev/shm in memory.

    ``node_selector`` (a run parameter: ``{"nvidia.com/gpu.product": ...}``) pins steps whose
    figures are only valid on the target GPU: the cost table and the measured speedup.
    """
    task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(gpus)
    task.set_cpu_request(GPU_CPU).set_memory_request(GPU_MEMORY)
    task.set_retry(
        num_retries=RETRIES,
        backoff_duration=BACKOFF,
        backoff_factor=BACKOFF_FACTOR,
        backoff_max_duration=BACKOFF_MAX,
    )
    task.set_caching_options(enable_caching=True)
    kubernetes.add_toleration(task, key=GPU_TAINT, operator="Exists", effect="NoSchedule")
    kubernetes.empty_dir_mount(
        task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=SHM_SIZE
    )
    if node_selector is not None:
        kubernetes.add_node_selector_json(task, node_selector_json=node_selector)
    return _environment(task, *env)


@dsl.pipeline(
    name=PIPELINE_NAME,
    description=(
        "Puzzle (distillation-based NAS): compress a parent LLM into a faster child for a target GPU and "
        "workload, export it as a Hugging Face checkpoint and register it in MLflow when it meets the gates."
    ),
)
def puzzle_pipeline(
    parent: str = "smollm2",
    data_source: str = "stdlib",
    data_seq_len: int = 128,
    data_splits_calibration: int = 16,
    data_splits_bld: int = 32,
    data_splits_score: int = 4,
    data_splits_gkd: int = 64,
    data_splits_eval: int = 16,
    data_seed: int = 0,
    search_space_kv_heads: list = [],  # noqa: B006 - KFP reads defaults from the signature
    search_space_attention_linear: bool = False,
    search_space_attention_noop: bool = True,
    search_space_ffn_fractions: list = [1.0, 0.5],  # noqa: B006
    search_space_ffn_linear: bool = False,
    search_space_ffn_noop: bool = True,
    bld_token_budget: int = 4096,
    bld_batch_size: int = 8,
    bld_lr: float = 0.001,
    bld_warmup_fraction: float = 0.05,
    bld_seed: int = 0,
    bld_device: str = "auto",
    bld_shards: int = 1,
    scoring_metrics: list = ["kl_div", "lm_loss", "cosine", "top1_agreement"],  # noqa: B006
    scoring_split: str = "score",
    scoring_batch_size: int = 8,
    scoring_device: str = "auto",
    scoring_shards: int = 1,
    costs_batch_sizes: list = [1],  # noqa: B006
    costs_prompt_len: int = 64,
    costs_gen_len: int = 32,
    costs_device: str = "auto",
    costs_dtype: str = "auto",
    costs_repeats: int = 3,
    search_objective: str = "kl_div",
    search_constraints: list = ["throughput>=1.5x"],  # noqa: B006
    search_num_solutions: int = 1,
    search_alpha: float = 0.8,
    search_time_limit_s: float = 60.0,
    gkd_token_budget: int = 4096,
    gkd_batch_size: int = 4,
    gkd_lr: float = 0.0001,
    gkd_warmup_fraction: float = 0.05,
    gkd_weight_cosine: float = 1.0,
    gkd_weight_kl: float = 1.0,
    gkd_weight_lm: float = 0.0,
    gkd_checkpoint_every: int = 4,
    gkd_grad_checkpointing: bool = False,
    gkd_seed: int = 0,
    gkd_device: str = "auto",
    evaluate_split: str = "eval",
    evaluate_batch_size: int = 8,
    evaluate_workload_batch_size: int = 1,
    evaluate_workload_prompt_len: int = 64,
    evaluate_workload_gen_len: int = 32,
    evaluate_device: str = "auto",
    evaluate_repeats: int = 3,
    evaluate_lm_eval_tasks: list = [],  # noqa: B006
    export_dtype: str = "auto",
    tracking_uri: str = "",
    tracking_experiment: str = "puzzle",
    registry_model_name: str = "",
    registry_gates_min_accuracy_kept: float = 0.9,
    registry_gates_min_speedup: float = 1.3,
    baselines_methods: list = ["uniform_width", "layer_dropping"],  # noqa: B006
    baselines_gkd: bool = True,
    serving_uri: str = "",
    gkd_gpus: int = 1,
    gpu_node_selector: dict = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},  # noqa: B006
    s3_secret: str = "puzzle-s3",
    mlflow_secret: str = "puzzle-mlflow",
    env_config_map: str = "puzzle-env",
    profile: str = "",
):
    env = (s3_secret, mlflow_secret, env_config_map)
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
    tracked = dict(tracking_uri=tracking_uri, experiment=tracking_experiment, kfp_run_id=run_id)

    outcome = _cpu_step(
        record_outcome(kfp_run_id=run_id, tracking_uri=tracking_uri, experiment=tracking_experiment),
        env,
        cache=False,
    )
    with dsl.ExitHandler(outcome, name="puzzle-run"):
        child = _cpu_step(convert(parent=parent), env).set_display_name("convert parent")
        tokens = _cpu_step(
            prepare_data(
                child=child.outputs["child"],
                source=data_source,
                seq_len=data_seq_len,
                splits={
                    "calibration": data_splits_calibration,
                    "bld": data_splits_bld,
                    "score": data_splits_score,
                    "gkd": data_splits_gkd,
                    "eval": data_splits_eval,
                },
                seed=data_seed,
            ),
            env,
        ).set_display_name("tokenize data")
        library = _gpu_step(
            build_library(
                child=child.outputs["child"],
                tokens=tokens.outputs["tokens"],
                kv_heads=search_space_kv_heads,
                attention_linear=search_space_attention_linear,
                attention_noop=search_space_attention_noop,
                ffn_fractions=search_space_ffn_fractions,
                ffn_linear=search_space_ffn_linear,
                ffn_noop=search_space_ffn_noop,
                batch_size=bld_batch_size,
                seed=bld_seed,
                device=bld_device,
                **tracked,
            ),
            env,
        ).set_display_name("build block library")

        bld_plan = _cpu_step(shard_plan(shards=bld_shards), env).set_display_name("plan BLD shards")
        with dsl.ParallelFor(bld_plan.output, parallelism=BLD_PARALLELISM, name="bld-shards") as bld_index:
            bld_shard = _gpu_step(
                train_blocks(
                    library=library.outputs["library"],
                    child=child.outputs["child"],
                    tokens=tokens.outputs["tokens"],
                    shard_index=bld_index,
                    num_shards=bld_shards,
                    token_budget=bld_token_budget,
                    batch_size=bld_batch_size,
                    lr=bld_lr,
                    warmup_fraction=bld_warmup_fraction,
                    seed=bld_seed,
                    device=bld_device,
                ),
                env,
            ).set_display_name("BLD shard")
        trained = _cpu_step(
            merge_library(
                base=library.outputs["library"], shards=dsl.Collected(bld_shard.outputs["trained"]), **tracked
            ),
            env,
        ).set_display_name("merge BLD shards")

        costs = _gpu_step(
            measure_costs(
                library=trained.outputs["library"],
                child=child.outputs["child"],
                batch_sizes=costs_batch_sizes,
                prompt_len=costs_prompt_len,
                gen_len=costs_gen_len,
                dtype=costs_dtype,
                repeats=costs_repeats,
                device=costs_device,
                **tracked,
            ),
            env,
            node_selector=gpu_node_selector,
        ).set_display_name("measure costs on the target GPU")

        score_plan = _cpu_step(shard_plan(shards=scoring_shards), env).set_display_name("plan scoring shards")
        with dsl.ParallelFor(
            score_plan.output, parallelism=SCORING_PARALLELISM, name="scoring-shards"
        ) as score_index:
            score_shard = _gpu_step(
                score_blocks(
                    library=trained.outputs["library"],
                    child=child.outputs["child"],
                    tokens=tokens.outputs["tokens"],
                    shard_index=score_index,
                    num_shards=scoring_shards,
                    metrics=scoring_metrics,
                    split=scoring_split,
                    batch_size=scoring_batch_size,
                    device=scoring_device,
                ),
                env,
            ).set_display_name("score shard")
        scores = _cpu_step(
            merge_scores(shards=dsl.Collected(score_shard.outputs["scores"]), **tracked), env
        ).set_display_name("merge scores")

        solutions = _cpu_step(
            search(
                scores=scores.outputs["scores"],
                costs=costs.outputs["costs"],
                constraints=search_constraints,
                objective=search_objective,
                num_solutions=search_num_solutions,
                alpha=search_alpha,
                time_limit_s=search_time_limit_s,
                **tracked,
            ),
            env,
        ).set_display_name("MIP search")
        realized = _cpu_step(
            realize(
                library=trained.outputs["library"],
                solutions=solutions.outputs["solutions"],
                parent=child.outputs["child"],
                solution_index=0,
                **tracked,
            ),
            env,
        ).set_display_name("realize child")
        distilled = _gpu_step(
            distill(
                child=realized.outputs["child"],
                parent=child.outputs["child"],
                tokens=tokens.outputs["tokens"],
                token_budget=gkd_token_budget,
                batch_size=gkd_batch_size,
                lr=gkd_lr,
                warmup_fraction=gkd_warmup_fraction,
                weight_cosine=gkd_weight_cosine,
                weight_kl=gkd_weight_kl,
                weight_lm=gkd_weight_lm,
                checkpoint_every=gkd_checkpoint_every,
                grad_checkpointing=gkd_grad_checkpointing,
                seed=gkd_seed,
                device=gkd_device,
                gpus=gkd_gpus,
                **tracked,
            ),
            env,
            gpus=gkd_gpus,
        ).set_display_name("global distillation (GKD)")
        evaluation = _gpu_step(
            evaluate(
                child=distilled.outputs["distilled"],
                parent=child.outputs["child"],
                tokens=tokens.outputs["tokens"],
                split=evaluate_split,
                batch_size=evaluate_batch_size,
                workload_batch_size=evaluate_workload_batch_size,
                workload_prompt_len=evaluate_workload_prompt_len,
                workload_gen_len=evaluate_workload_gen_len,
                repeats=evaluate_repeats,
                lm_eval_tasks=evaluate_lm_eval_tasks,
                device=evaluate_device,
                **tracked,
            ),
            env,
            node_selector=gpu_node_selector,
        ).set_display_name("evaluate against the parent")
        _gpu_step(
            compare_baselines(
                child=distilled.outputs["distilled"],
                parent=child.outputs["child"],
                library=trained.outputs["library"],
                scores=scores.outputs["scores"],
                costs=costs.outputs["costs"],
                tokens=tokens.outputs["tokens"],
                methods=baselines_methods,
                constraints=search_constraints,
                gkd=baselines_gkd,
                objective=search_objective,
                gkd_token_budget=gkd_token_budget,
                gkd_batch_size=gkd_batch_size,
                gkd_lr=gkd_lr,
                gkd_warmup_fraction=gkd_warmup_fraction,
                gkd_weight_cosine=gkd_weight_cosine,
                gkd_weight_kl=gkd_weight_kl,
                gkd_weight_lm=gkd_weight_lm,
                gkd_checkpoint_every=gkd_checkpoint_every,
                gkd_grad_checkpointing=gkd_grad_checkpointing,
                gkd_seed=gkd_seed,
                gkd_device=gkd_device,
                evaluate_split=evaluate_split,
                evaluate_batch_size=evaluate_batch_size,
                workload_batch_size=evaluate_workload_batch_size,
                workload_prompt_len=evaluate_workload_prompt_len,
                workload_gen_len=evaluate_workload_gen_len,
                evaluate_repeats=evaluate_repeats,
                evaluate_device=evaluate_device,
                lm_eval_tasks=evaluate_lm_eval_tasks,
                **tracked,
            ),
            env,
            node_selector=gpu_node_selector,
        ).set_display_name("compare with baselines")
        exported = _cpu_step(
            export(
                child=distilled.outputs["distilled"], serving_uri=serving_uri, dtype=export_dtype, **tracked
            ),
            env,
        ).set_display_name("export checkpoint")

        with dsl.If(registry_model_name != "", name="registry-configured"):
            registered = _cpu_step(
                register(
                    checkpoint=exported.outputs["checkpoint"],
                    evaluation=evaluation.outputs["evaluation"],
                    model_name=registry_model_name,
                    parent_uri=parent,
                    constraints=search_constraints,
                    profile=profile,
                    tracking_uri=tracking_uri,
                    experiment=tracking_experiment,
                    kfp_run_id=run_id,
                ),
                env,
                cache=False,
            ).set_display_name("register candidate")
            # The gate: champion only when the evaluation meets both targets.
            with dsl.If(
                evaluation.outputs["accuracy_kept"] >= registry_gates_min_accuracy_kept,
                name="accuracy-kept-gate",
            ):
                with dsl.If(evaluation.outputs["speedup"] >= registry_gates_min_speedup, name="speedup-gate"):
                    _cpu_step(
                        promote(
                            model_name=registry_model_name,
                            version=registered.outputs["version"],
                            min_accuracy_kept=registry_gates_min_accuracy_kept,
                            min_speedup=registry_gates_min_speedup,
                            tracking_uri=tracking_uri,
                        ),
                        env,
                        cache=False,
                    ).set_display_name("promote to champion")


def compile_pipeline(path: str | Path = PIPELINE_FILE) -> Path:
    """Write the compiled pipeline (IR YAML) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(puzzle_pipeline, package_path=str(path))
    return path


if __name__ == "__main__":
    print(compile_pipeline())
