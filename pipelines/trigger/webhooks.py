"""Register the trigger service's webhook in MLflow, idempotently (update by name, else create)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pipelines.trigger.service import SUPPORTED_EVENTS

log = logging.getLogger(__name__)

DEFAULT_NAME = "puzzle-trigger"


@dataclass(frozen=True)
class WebhookRegistration:
    webhook_id: str
    name: str
    url: str
    created: bool


def _all_webhooks(client: Any) -> list[Any]:
    hooks: list[Any] = []
    token = None
    while True:
        page = client.list_webhooks(max_results=100, page_token=token)
        hooks.extend(page)
        token = page.token
        if not token:
            return hooks


def register_webhook(client: Any, url: str, secret: str, *, name: str = DEFAULT_NAME) -> WebhookRegistration:
    """Point the webhook ``name`` at ``url`` with ``secret`` and our events; create it if missing.

    Running it again with the same arguments changes nothing but the secret (MLflow never
    returns secrets, so it is always set), and leaves exactly one webhook of that name.
    """
    events = list(SUPPORTED_EVENTS)
    same = [h for h in _all_webhooks(client) if h.name == name]
    description = (
        "Puzzle trigger service: runs Puzzle when a model version is tagged puzzle.request=<profile>"
    )
    if same:
        keep, *extra = sorted(same, key=lambda h: h.creation_timestamp)
        for hook in extra:  # left over from an earlier, non-idempotent registration
            client.delete_webhook(hook.webhook_id)
        hook = client.update_webhook(
            keep.webhook_id, url=url, events=events, secret=secret, status="ACTIVE", description=description
        )
        log.info("webhook updated", extra={"webhook_id": hook.webhook_id, "url": url})
        return WebhookRegistration(hook.webhook_id, name, url, created=False)
    hook = client.create_webhook(name=name, url=url, events=events, secret=secret, description=description)
    log.info("webhook created", extra={"webhook_id": hook.webhook_id, "url": url})
    return WebhookRegistration(hook.webhook_id, name, url, created=True)
