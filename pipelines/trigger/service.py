"""The trigger service's logic: verify a delivery, decide, submit, tag back; and reconcile.

Verification order (each step answers before the next runs, nothing is parsed unverified):

1. body size (413) and presence of the delivery headers (400; no signature: 401);
2. timestamp within the window (401: stale or from the future);
3. the HMAC signature, in constant time (401);
4. delivery id not seen before (a replay is answered 200 ``duplicate`` and not acted on);
5. the JSON body and the event type (400: malformed JSON, unsupported event).

Then only ``model_version_tag.set`` with the configured request tag key, or
``model_version_alias.created`` with the configured alias, starts anything; the tags the
service writes back (``puzzle.kfp_run_id``, ``puzzle.state``, ...) arrive as events too and are
ignored, so the service never triggers itself. A request runs once per (version, profile): it
is submitted when no run of that profile was ever submitted for the version (the state store
remembers every submission, whatever the version's tags say since), or when its last run
``failed`` and the request tag is set again. A rejected request (unknown or invalid profile)
never overwrites the state tags of a run in flight on the version; it writes ``puzzle.error``
only.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipelines.trigger import signature
from pipelines.trigger.backends import Backend, RunRequest
from pipelines.trigger.profiles import ProfileError, run_config
from pipelines.trigger.settings import (
    TAG_BACKEND,
    TAG_ERROR,
    TAG_PROFILE,
    TAG_RUN_ID,
    TAG_STATE,
    TriggerSettings,
)
from pipelines.trigger.store import TriggerStore

log = logging.getLogger("pipelines.trigger")

SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_HEADER = "X-MLflow-Delivery-Id"
TAG_SET = "model_version_tag.set"
ALIAS_CREATED = "model_version_alias.created"
SUPPORTED_EVENTS = (TAG_SET, ALIAS_CREATED)
# States after which a request is settled (a ``failed`` one runs again when asked again).
SETTLED = ("submitted", "running", "succeeded", "rejected")
# States a run goes through (``rejected`` describes a request that never became a run).
RUN_STATES = ("submitted", "running", "succeeded", "failed")


@dataclass(frozen=True)
class Response:
    status: int
    body: dict[str, Any]


@dataclass
class Stats:
    counts: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self.counts)


class TriggerService:
    def __init__(self, settings: TriggerSettings, backend: Backend, store: TriggerStore, client: Any) -> None:
        self.settings = settings
        self.backend = backend
        self.store = store
        self.client = client
        self.stats = Stats()
        self._decide = threading.Lock()

    # ------------------------------------------------------------------ deliveries

    def _reject(self, status: int, reason: str, delivery_id: str | None = None) -> Response:
        self.stats.add(f"rejected_{status}")
        log.warning(
            "delivery rejected", extra={"status": status, "reason": reason, "delivery_id": delivery_id}
        )
        return Response(status, {"status": "rejected", "reason": reason})

    def reject(self, status: int, reason: str) -> Response:
        """A request refused by the HTTP layer (deadline, malformed request): counted and logged
        like a rejected delivery."""
        return self._reject(status, reason)

    def check_size(self, content_length: str | None) -> Response | None:
        """Answer before reading the body: no length (411), too large (413)."""
        if content_length is None:
            return self._reject(411, "Content-Length required")
        try:
            length = int(content_length)
        except ValueError:
            return self._reject(400, "malformed Content-Length")
        if length < 0:
            return self._reject(400, "malformed Content-Length")
        if length > self.settings.max_body_bytes:
            return self._reject(
                413, f"body of {length} bytes exceeds the limit of {self.settings.max_body_bytes}"
            )
        return None

    def handle_delivery(
        self, headers: Mapping[str, str], body: bytes, *, now: float | None = None
    ) -> Response:
        """Verify and act on one webhook delivery (headers are matched case-insensitively)."""
        self.stats.add("received")
        lower = {k.lower(): v for k, v in headers.items()}
        if len(body) > self.settings.max_body_bytes:
            return self._reject(413, f"body exceeds the limit of {self.settings.max_body_bytes} bytes")
        sig = lower.get(SIGNATURE_HEADER.lower())
        timestamp = lower.get(TIMESTAMP_HEADER.lower())
        delivery_id = lower.get(DELIVERY_HEADER.lower())
        if not sig:
            return self._reject(401, f"missing {SIGNATURE_HEADER}", delivery_id)
        if not timestamp or not delivery_id:
            return self._reject(400, f"missing {TIMESTAMP_HEADER} or {DELIVERY_HEADER}", delivery_id)
        if len(delivery_id) > 200:
            return self._reject(400, "delivery id too long")
        try:
            sent = int(timestamp)
        except ValueError:
            return self._reject(400, f"malformed {TIMESTAMP_HEADER}", delivery_id)
        now = time.time() if now is None else now
        if abs(now - sent) > self.settings.window_s:
            return self._reject(
                401, f"timestamp outside the {self.settings.window_s:.0f} s window", delivery_id
            )
        if not signature.verify(self.settings.secret, delivery_id, timestamp, body, sig):
            return self._reject(401, "invalid signature", delivery_id)
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return self._reject(400, "malformed JSON", delivery_id)
        except RecursionError:
            return self._reject(400, "malformed JSON (nested too deeply)", delivery_id)
        if not isinstance(payload, dict) or not isinstance(payload.get("data"), dict):
            return self._reject(400, "payload must be an object with a 'data' object", delivery_id)
        event = f"{payload.get('entity')}.{payload.get('action')}"
        if event not in SUPPORTED_EVENTS:
            return self._reject(
                400,
                f"unsupported event {event!r}; subscribe the webhook to {', '.join(SUPPORTED_EVENTS)}",
                delivery_id,
            )
        data = payload["data"]
        if not isinstance(data.get("name"), str) or not isinstance(data.get("version"), str | int):
            return self._reject(400, "event data needs the model 'name' and 'version'", delivery_id)
        if not self.store.remember_delivery(delivery_id, event):
            self.stats.add("duplicate")
            log.info("delivery replayed; ignored", extra={"delivery_id": delivery_id, "event": event})
            return Response(200, {"status": "duplicate"})
        try:
            outcome = self.handle_event(event, data, source=f"webhook:{delivery_id}")
        except Exception:
            # Let MLflow's retry of this delivery be processed (the reconcile pass would catch it too).
            self.store.forget_delivery(delivery_id)
            self.stats.add("errors")
            log.exception("delivery failed", extra={"delivery_id": delivery_id, "event": event})
            return Response(500, {"status": "error"})
        self.stats.add(outcome["status"])
        return Response(200, outcome)

    def handle_event(self, event: str, data: Mapping[str, Any], *, source: str) -> dict[str, Any]:
        name, version = str(data["name"]), str(data["version"])
        if event == TAG_SET:
            if data.get("key") != self.settings.request_tag:
                return {
                    "status": "ignored",
                    "reason": f"tag {data.get('key')!r} is not {self.settings.request_tag!r}",
                }
            profile = str(data.get("value") or "").strip()
        else:
            if data.get("alias") != self.settings.request_alias:
                return {
                    "status": "ignored",
                    "reason": f"alias {data.get('alias')!r} is not {self.settings.request_alias!r}",
                }
            profile = self.settings.alias_profile
        return self.request(name, version, profile, source=source, retry_failed=True)

    # ------------------------------------------------------------------ requests

    def _tag(self, name: str, version: str, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(name, version, key, value)

    def request(
        self, name: str, version: str, profile: str, *, source: str, retry_failed: bool
    ) -> dict[str, Any]:
        """Submit a run of ``profile`` for ``name``/``version`` unless one is already settled."""
        from mlflow.exceptions import MlflowException

        with self._decide:
            try:
                tags = dict(self.client.get_model_version(name, version).tags)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                return {"status": "ignored", "reason": f"model version {name}/{version} does not exist"}
            state = tags.get(TAG_STATE)
            tagged_run = tags.get(TAG_RUN_ID)
            if tagged_run and state in RUN_STATES and self.store.run_state(tagged_run) != state:
                self.store.record_state(tagged_run, state)
            if tags.get(TAG_PROFILE) == profile and state is not None:
                if state in SETTLED or not retry_failed:
                    return {"status": "already_requested", "run_id": tags.get(TAG_RUN_ID), "state": state}
            previous = self.store.latest_submission(name, version, profile)
            if previous is not None and previous.run_id and TAG_RUN_ID not in tags:
                # Submitted before a crash, but never tagged: repair the tags, do not submit again.
                self._tag(
                    name,
                    version,
                    {
                        TAG_PROFILE: profile,
                        TAG_STATE: "submitted",
                        TAG_BACKEND: previous.backend,
                        TAG_RUN_ID: previous.run_id,
                    },
                )
                return {"status": "repaired", "run_id": previous.run_id}
            if previous is not None and previous.run_id:
                # Once per (version, profile): the store remembers the run even when a request for
                # another profile has taken over the version's tags since.
                known = self.store.run_state(previous.run_id) or "submitted"
                if not (known == "failed" and retry_failed):
                    return {"status": "already_requested", "run_id": previous.run_id, "state": known}
            in_flight = state in ("submitted", "running") and tags.get(TAG_PROFILE) != profile
            child_model = self.settings.child_model.format(model=name)
            try:
                config = run_config(
                    profile,
                    f"models:/{name}/{version}",
                    profiles_dir=self.settings.profiles_dir,
                    overrides=(*self.settings.overrides, f"registry.model_name={json.dumps(child_model)}"),
                )
            except ProfileError as exc:
                if in_flight:
                    # The version's state tags describe the run in flight: they stay as they are.
                    self._tag(name, version, {TAG_ERROR: f"request {profile!r} rejected: {exc}"[:500]})
                else:
                    self._tag(
                        name,
                        version,
                        {TAG_PROFILE: profile, TAG_STATE: "rejected", TAG_ERROR: str(exc)[:500]},
                    )
                log.warning(
                    "request rejected",
                    extra={
                        "model": name,
                        "version": version,
                        "profile": profile,
                        "reason": str(exc),
                        "run_in_flight": tags.get(TAG_RUN_ID) if in_flight else None,
                    },
                )
                return {"status": "rejected", "reason": str(exc)}
            submission = self.store.begin_submission(name, version, profile, self.backend.name, source)
            try:
                run_id = self.backend.submit(RunRequest(name, version, profile, config, child_model))
            except Exception:
                self.store.abandon_submission(submission)
                raise
            self.store.complete_submission(submission, run_id)
            # The run id goes last: a version whose run id is this run's has all of its tags.
            self._tag(
                name,
                version,
                {
                    TAG_PROFILE: profile,
                    TAG_STATE: "submitted",
                    TAG_BACKEND: self.backend.name,
                    TAG_RUN_ID: run_id,
                },
            )
            if tags.get(TAG_ERROR):
                self.client.delete_model_version_tag(name, version, TAG_ERROR)
        self.stats.add("submitted_runs")
        log.info(
            "run submitted",
            extra={
                "model": name,
                "version": version,
                "profile": profile,
                "run_id": run_id,
                "backend": self.backend.name,
                "source": source,
            },
        )
        return {"status": "submitted", "run_id": run_id}

    def reconcile(self) -> list[dict[str, Any]]:
        """Submit every request tag that has no run yet (MLflow delivers webhooks only once)."""
        key = self.settings.request_tag
        versions = self.client.search_model_versions(f"tags.`{key}` LIKE '%'")
        outcomes = []
        for mv in versions:
            profile = (mv.tags.get(key) or "").strip()
            if not profile:
                continue
            if mv.tags.get(TAG_PROFILE) == profile and TAG_STATE in mv.tags:
                continue
            try:
                outcome = self.request(
                    mv.name, str(mv.version), profile, source="reconcile", retry_failed=False
                )
            except Exception:
                log.exception("reconcile: request failed", extra={"model": mv.name, "version": mv.version})
                continue
            outcomes.append({"model": mv.name, "version": str(mv.version), **outcome})
        self.store.prune_deliveries(max(3600.0, 2 * self.settings.window_s))
        if outcomes:
            log.info("reconcile pass", extra={"outcomes": outcomes})
        return outcomes

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "backend": self.backend.name,
            "request_tag": self.settings.request_tag,
            "request_alias": self.settings.request_alias,
            "deliveries_remembered": self.store.delivery_count(),
            "counts": self.stats.snapshot(),
        }
