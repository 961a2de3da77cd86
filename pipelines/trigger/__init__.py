"""The trigger service: runs Puzzle when a user tags a parent model version in the MLflow UI.

MLflow (>= 3.3) delivers ``model_version_tag.set`` / ``model_version_alias.created`` webhooks to
``POST /webhook``; the service verifies them (HMAC signature, timestamp window, replayed
delivery ids remembered in SQLite), turns ``puzzle.request=<profile>`` into a run configuration
with the tagged version as parent, submits it (Kubeflow Pipelines, or a local process for
development) and writes the run id and state back as version tags. A reconcile loop submits
requests whose webhook was lost. ``puzzle trigger serve|register-webhook|reconcile`` is the CLI.

Modules: :mod:`.signature` (HMAC), :mod:`.settings`, :mod:`.store` (SQLite), :mod:`.profiles`,
:mod:`.backends` (KFP, local), :mod:`.service` (verification and decisions), :mod:`.server`
(HTTP, reconcile loop), :mod:`.webhooks` (registration in MLflow), :mod:`.local_job`, :mod:`.logs`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipelines.trigger.backends import Backend
    from pipelines.trigger.service import TriggerService
    from pipelines.trigger.settings import TriggerSettings


def build_backend(settings: TriggerSettings) -> Backend:
    from pipelines.trigger.backends import KfpBackend, LocalBackend

    if settings.backend == "kfp":
        assert settings.kfp_host and settings.pipeline_package  # checked by TriggerSettings
        return KfpBackend(
            settings.kfp_host,
            settings.pipeline_package,
            namespace=settings.kfp_namespace,
            experiment=settings.kfp_experiment,
            serving_uri=settings.serving_uri,
            gpu_product=settings.gpu_product,
        )
    return LocalBackend(Path(settings.work_dir), settings.tracking_uri)


def build_service(settings: TriggerSettings, backend: Backend | None = None) -> TriggerService:
    """The service with its SQLite store, MLflow client and backend (built from the settings)."""
    from pipelines.trigger.service import TriggerService
    from pipelines.trigger.store import TriggerStore
    from puzzle.mlflow.tracking import client_for

    return TriggerService(
        settings,
        backend or build_backend(settings),
        TriggerStore(settings.state_db),
        client_for(settings.tracking_uri),
    )
