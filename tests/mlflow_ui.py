"""Drive the MLflow UI in headless Chromium over the DevTools protocol, as a user would.

Only what the trigger test needs: open a model version's page and add a tag with the page's own
form (the elements are found by MLflow's ``data-testid`` attributes, MLflow 3.17). Chromium
comes from Debian's ``chromium`` package (``make test`` installs it where apt-get is usable);
without it the UI test is skipped and the README describes the same steps.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from typing import Any

from servers import free_port


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class HeadlessChromium:
    def __init__(self, binary: str, *, timeout: float = 30.0) -> None:
        import websocket

        self.timeout = timeout
        self._profile = tempfile.mkdtemp(prefix="chromium-")
        port = free_port()
        self.proc = subprocess.Popen(
            [
                binary,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                f"--remote-debugging-port={port}",
                f"--user-data-dir={self._profile}",
                "--window-size=1400,1000",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + timeout
        while True:
            try:
                targets = json.loads(
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=2).read()
                )
                page = next(t for t in targets if t["type"] == "page")
                break
            except (OSError, StopIteration, ValueError):
                if time.time() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise RuntimeError("headless Chromium did not start") from None
                time.sleep(0.2)
        self.ws = websocket.create_connection(
            page["webSocketDebuggerUrl"], timeout=timeout, suppress_origin=True
        )
        self._ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(
                f"{expression}: {result['exceptionDetails'].get('exception', {}).get('description')}"
            )
        return result["result"].get("value")

    def page_text(self, chars: int = 600) -> str:
        return str(self.js("document.body ? document.body.innerText : ''"))[:chars]

    def wait_for(self, selector: str) -> None:
        deadline = time.time() + self.timeout
        while not self.js(f"!!document.querySelector({json.dumps(selector)})"):
            if time.time() > deadline:
                raise TimeoutError(
                    f"{selector} did not appear in the MLflow UI; the page shows: {self.page_text()!r}"
                )
            time.sleep(0.2)

    def click(self, selector: str) -> None:
        self.wait_for(selector)
        self.js(f"document.querySelector({json.dumps(selector)}).click()")

    def type_into(self, selector: str, text: str) -> None:
        """Focus an input and type (React's controlled inputs ignore a value set from script)."""
        self.wait_for(selector)
        self.js(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", text=text)

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self._profile, ignore_errors=True)


def add_model_version_tag_in_ui(mlflow_url: str, name: str, version: str, key: str, value: str) -> None:
    """Open Models > NAME > Version N, expand Tags, fill Name and Value, press Add."""
    binary = chromium_binary()
    if binary is None:
        raise RuntimeError("no chromium binary")
    # Generous: on a loaded 2-core machine the UI's JavaScript alone can take tens of seconds.
    browser = HeadlessChromium(binary, timeout=90)
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=f"{mlflow_url}/#/models/{name}/versions/{version}")
        section = json.dumps('[data-testid="tags-section"]')
        # Done when the saved tag shows in the table (typed input values are not part of innerText).
        # On a loaded machine React may not have wired the form when the first keys arrive: then the
        # page is loaded again and the tag added again (adding the same tag twice is harmless).
        for attempt in range(3):
            if attempt:
                browser.call("Page.navigate", url=f"{mlflow_url}/#/models/{name}/versions/{version}")
                browser.call("Page.reload", ignoreCache=True)
            browser.click('[data-testid="tags-section"] [role="button"]')
            browser.type_into('[data-testid="tags-form-input-name"]', key)
            browser.type_into('[data-testid="tags-form-input-value"]', value)
            browser.click('[data-testid="add-tag-button"]')
            deadline = time.time() + browser.timeout
            while time.time() < deadline:
                if browser.js(f"document.querySelector({section}).innerText.includes({json.dumps(key)})"):
                    return
                time.sleep(0.2)
        raise TimeoutError(
            f"the tag {key} never showed in the MLflow UI; the page shows: {browser.page_text()!r}"
        )
    finally:
        browser.close()
