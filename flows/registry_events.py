"""Registry events to Prefect: MLflow's webhooks post here; a signed post becomes a Prefect event, which the
deployment triggers in prefect.yaml turn into flow runs (evaluate a new version, promote an approved one).
Prefect's own inbound webhooks are Prefect Cloud only; this small receiver is the open-source stand-in.

    export SFTOPS_WEBHOOK_SECRET=...                  # the same secret on both sides (MLflow signs, this checks)
    PREFECT_API_URL=http://127.0.0.1:4200/api python flows/registry_events.py serve --port 8808
    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 python flows/registry_events.py register --url http://127.0.0.1:8808/

What it accepts (MLflow 3's webhook delivery, mlflow/webhooks/delivery.py): a POST with headers
X-MLflow-Delivery-Id, X-MLflow-Timestamp (unix seconds) and X-MLflow-Signature = "v1," + base64 of
HMAC-SHA256(secret, "<delivery id>.<timestamp>.<body>"). Refused, logged and answered without any event: no
signature (401), a wrong one (403), a timestamp more than --max-age seconds (300) from this machine's clock
(403), a delivery id already accepted (409: a replay). What it emits, with resource id
`mlflow.model-version.<name>.<version>` and the model URI in the payload:

    model_version.created                          -> sftops.model-version.created
    model_version_tag.set  review=approved          -> sftops.model-version.approved
    model_version_tag.set  review=rejected          -> sftops.model-version.rejected
    any other tag                                   -> nothing (answered 200)

A 200 means Prefect has the event (it is sent before the answer); when Prefect cannot be reached the answer is
503, which MLflow retries.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import sys
import threading
import time
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from uuid import UUID

from sftops.tracking.review_state import REVIEW, VERDICTS  # the version's review tag and the values that decide

SECRET_ENV = "SFTOPS_WEBHOOK_SECRET"
SIGNATURE, TIMESTAMP, DELIVERY = "X-MLflow-Signature", "X-MLflow-Timestamp", "X-MLflow-Delivery-Id"
EVENTS = ("model_version.created", "model_version_tag.set")  # what the webhook subscribes to
MAX_BODY = 1 << 20  # a registry event is a few hundred bytes

log = logging.getLogger("sftops.registry_events")


def signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The signature MLflow sends for this body (mlflow/webhooks/delivery.py _generate_hmac_signature)."""
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest()).decode()


def refusal(headers: dict[str, str], body: bytes, secret: str, now: float, max_age: float) -> tuple[int, str] | None:
    """Why a post is refused (HTTP status, reason), or None for a post MLflow signed with `secret` within
    max_age seconds of `now`. Replays are caught apart (Deliveries): they carry a valid signature."""
    sent, stamp, delivery = headers.get(SIGNATURE), headers.get(TIMESTAMP), headers.get(DELIVERY)
    if not (sent and stamp and delivery):
        return 401, f"unsigned: a post needs {SIGNATURE}, {TIMESTAMP} and {DELIVERY}"
    if not hmac.compare_digest(sent.encode(), signature(secret, delivery, stamp, body).encode()):
        return 403, "wrong signature (another secret, or the body or headers were changed)"
    try:
        age = now - int(stamp)
    except ValueError:
        return 403, f"{TIMESTAMP} {stamp!r} is not unix seconds"
    if abs(age) > max_age:
        return 403, f"stale: signed {age:.0f} s from now, more than {max_age:.0f} s (a replay, or clocks apart)"
    return None


class Deliveries:
    """The delivery ids accepted within the last max_age seconds: a valid post sent again is a replay (an older
    one is refused as stale anyway)."""

    def __init__(self, max_age: float) -> None:
        self.max_age, self._seen, self._lock = max_age, OrderedDict[str, float](), threading.Lock()

    def first(self, delivery_id: str, now: float) -> bool:
        with self._lock:
            while self._seen and next(iter(self._seen.values())) < now - 2 * self.max_age:
                self._seen.popitem(last=False)
            if delivery_id in self._seen:
                return False
            self._seen[delivery_id] = now
            return True

    def forget(self, delivery_id: str) -> None:  # not sent on: MLflow's retry must be let through
        with self._lock:
            self._seen.pop(delivery_id, None)


def prefect_event(delivery: dict[str, Any]) -> dict[str, Any] | None:
    """The Prefect event for an MLflow webhook delivery (name, resource, payload), or None for one that starts
    nothing."""
    kind, data = f"{delivery.get('entity')}.{delivery.get('action')}", delivery.get("data") or {}
    name, version = data.get("name"), str(data.get("version", ""))
    if not name or not version:
        return None
    if kind == "model_version.created":
        event, extra = "sftops.model-version.created", {"source": data.get("source"), "run_id": data.get("run_id")}
    elif kind == "model_version_tag.set" and data.get("key") == REVIEW and data.get("value") in VERDICTS:
        event, extra = f"sftops.model-version.{data['value']}", {}
    else:
        return None
    resource = {
        "prefect.resource.id": f"mlflow.model-version.{name}.{version}",
        "prefect.resource.name": f"{name} v{version}",
        "mlflow.registered-model": name,
        "mlflow.model-version": version,
    }
    payload = {"model_uri": f"models:/{name}/{version}", "mlflow_event": kind, "mlflow_sent": delivery.get("timestamp")}
    return {"event": event, "resource": resource, "payload": {**payload, **extra}}


async def _send(found: dict[str, Any], event_id: UUID) -> None:
    """Send one event and wait for the server to confirm it (checkpoint_every=1: a ping after each event)."""
    from prefect.events import Event
    from prefect.events.clients import get_events_client

    async with get_events_client(reconnection_attempts=2, checkpoint_every=1) as client:
        await client.emit(Event(id=event_id, **found))


def emit(found: dict[str, Any], delivery_id: str) -> None:
    """The event into Prefect, its id the MLflow delivery's (a UUID): one delivery is one event."""
    try:
        event_id = UUID(delivery_id)
    except ValueError:
        event_id = UUID(hashlib.sha256(delivery_id.encode()).hexdigest()[:32])
    asyncio.run(_send(found, event_id))


class Receiver(BaseHTTPRequestHandler):
    secret: str = ""
    max_age: float = 300.0
    deliveries: Deliveries

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._answer(200 if self.path.rstrip("/") == "/health" else 404, {"ok": self.path.rstrip("/") == "/health"})

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            return self._refuse(413, f"body of {length} bytes, more than {MAX_BODY}")
        body = self.rfile.read(length)
        headers = {k: self.headers[k] for k in (SIGNATURE, TIMESTAMP, DELIVERY) if self.headers.get(k)}
        now = time.time()
        refused = refusal(headers, body, self.secret, now, self.max_age)
        if refused:
            return self._refuse(*refused)
        delivery_id = headers[DELIVERY]
        if not self.deliveries.first(delivery_id, now):
            return self._refuse(409, f"delivery {delivery_id} was accepted already (a replay)")
        try:
            found = prefect_event(json.loads(body))
        except (ValueError, AttributeError):
            return self._refuse(400, "the body is not an MLflow webhook delivery (JSON object)")
        if found is None:
            log.info("delivery %s: nothing to start (%s)", delivery_id, body[:200].decode(errors="replace"))
            return self._answer(200, {"event": None})
        try:
            emit(found, delivery_id)
        except Exception as exc:  # noqa: BLE001 - Prefect unreachable: MLflow retries a 503
            self.deliveries.forget(delivery_id)
            log.error("delivery %s: Prefect did not take %s: %s", delivery_id, found["event"], exc)
            return self._answer(503, {"error": f"Prefect unreachable: {type(exc).__name__}"})
        log.info("delivery %s: %s %s", delivery_id, found["event"], found["payload"]["model_uri"])
        self._answer(200, {"event": found["event"], "delivery": delivery_id})

    def _refuse(self, status: int, reason: str) -> None:
        log.warning("refused a post from %s: %s %s", self.client_address[0], status, reason)
        self._answer(status, {"error": reason})

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        log.debug("%s " + format, self.client_address[0], *args)


def serve(host: str, port: int, secret: str, max_age: float) -> None:
    handler = type("SignedReceiver", (Receiver,), {"secret": secret, "max_age": max_age})
    handler.deliveries = Deliveries(max_age)
    server = ThreadingHTTPServer((host, port), handler)
    api = os.environ["PREFECT_API_URL"]
    log.info("receiving MLflow webhooks at http://%s:%d/, sending events to %s", host, port, api)
    server.serve_forever()


def register(url: str, name: str, secret: str) -> str:
    """Create (or update, by name) the registry webhook that posts to `url`; returns its id."""
    from mlflow import MlflowClient

    client = MlflowClient()
    found = [w for w in client.list_webhooks(max_results=1000) if w.name == name]
    description = "sftops: registry events to Prefect (flows/registry_events.py)"
    if found:
        hook = client.update_webhook(
            found[0].webhook_id, url=url, events=list(EVENTS), secret=secret, status="ACTIVE", description=description
        )
    else:
        hook = client.create_webhook(name=name, url=url, events=list(EVENTS), secret=secret, description=description)
    return hook.webhook_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    receive = commands.add_parser("serve", help="receive MLflow webhooks and emit Prefect events")
    receive.add_argument("--host", default="127.0.0.1")
    receive.add_argument("--port", type=int, default=8808)
    receive.add_argument("--max-age", type=float, default=300.0, help="seconds a signed post stays valid")
    hook = commands.add_parser("register", help="create or update the MLflow webhook that posts here")
    hook.add_argument("--url", required=True, help="where MLflow reaches this receiver, e.g. http://host:8808/")
    hook.add_argument("--name", default="sftops-registry-events")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    secret = os.environ.get(SECRET_ENV, "")
    if len(secret) < 16:
        print(f"registry_events: set {SECRET_ENV} to a secret of 16 characters or more (both sides)", file=sys.stderr)
        return 2
    if args.command == "register":
        print(f"webhook {register(args.url, args.name, secret)} posts {', '.join(EVENTS)} to {args.url}")
        return 0
    if not os.environ.get("PREFECT_API_URL"):
        print("registry_events: set PREFECT_API_URL to the Prefect server's API (events go there)", file=sys.stderr)
        return 2
    serve(args.host, args.port, secret, args.max_age)
    return 0


if __name__ == "__main__":
    sys.exit(main())
