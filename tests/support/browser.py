"""Headless Chromium driven over the DevTools protocol, for tests of the page at `/`.

Debian's `chromium` (installed by `make tools`) starts with `--remote-debugging-port=0`; the port it
picked is read from the DevToolsActivePort file in its profile directory, and the first page target
is driven over its websocket. Commands are sent one at a time and their answer is matched by id;
events in between are dropped (the tests poll the DOM instead of waiting for events, which is
simpler and does not depend on event ordering).
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

INSTALL = "make tools (or: apt-get install -y chromium)"
START_TIMEOUT_S = 60
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class Page:
    """One browser tab: send a DevTools command, evaluate JavaScript, wait for a condition."""

    def __init__(self, socket: ClientConnection):
        self._socket = socket
        self._ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Run one DevTools command and return its result; AssertionError with the protocol's error."""
        command_id = next(self._ids)
        self._socket.send(json.dumps({"id": command_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._socket.recv(timeout=START_TIMEOUT_S))
            if message.get("id") == command_id:
                assert "error" not in message, f"{method} failed: {message['error']}"
                return message["result"]

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-serialisable values only)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout: float = 60) -> Any:
        """Poll `expression` until it is truthy; AssertionError naming `what` after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.1)
        return value

    def set_files(self, selector: str, *paths: Path) -> None:
        """Choose files in an <input type=file>, as a user picking them would (fires `change`)."""
        root = self.call("DOM.getDocument")["root"]["nodeId"]
        node = self.call("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        assert node, f"no element matches {selector}"
        self.call("DOM.setFileInputFiles", nodeId=node, files=[str(p) for p in paths])

    def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page, beyond the viewport too."""
        size = self.call("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = self.call("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


def chromium_binary() -> str:
    """Debian's chromium, or a test failure saying how to install it (never a silent skip)."""
    binary = shutil.which("chromium")
    if binary is None:
        pytest.fail(f"the browser test needs Debian's chromium: {INSTALL}")
    return binary


@contextmanager
def chromium_page(profile: Path, width: int = 1280, height: int = 1000) -> Iterator[Page]:
    """A headless Chromium with a fresh profile in `profile` and one page of `width` x `height`."""
    profile.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [
            chromium_binary(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-extensions",
            "--disable-background-networking",
            "--no-first-run",
            "--no-default-browser-check",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port = _devtools_port(profile, process)
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        with connect(url, max_size=MAX_MESSAGE_BYTES, open_timeout=START_TIMEOUT_S) as socket:
            page = Page(socket)
            page.call(
                "Emulation.setDeviceMetricsOverride",
                width=width,
                height=height,
                deviceScaleFactor=1,
                mobile=False,
            )
            yield page
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _devtools_port(profile: Path, process: subprocess.Popen) -> int:
    active = profile / "DevToolsActivePort"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"chromium exited with {process.returncode} before opening its DevTools port")
        if active.exists() and (lines := active.read_text().split()):
            return int(lines[0])
        time.sleep(0.1)
    raise RuntimeError(f"chromium did not open a DevTools port within {START_TIMEOUT_S} s")
