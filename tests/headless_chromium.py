"""A page in the system's headless Chromium, driven over the DevTools protocol (tests only).

Chromium speaks the Chrome DevTools protocol over a pair of pipes when started with
``--remote-debugging-pipe``: it reads commands on its fd 3 and writes replies and events on
its fd 4, each a JSON text ended by a NUL byte (the transport Puppeteer uses).  That needs no
port to find or race for and no package beyond the standard library, and nothing is
downloaded: the browser is Debian's ``chromium``.

:func:`render` opens one page and returns what a person would see go wrong in the browser
(every console message and uncaught exception, and Chromium's own log entries such as
"Failed to load resource") with the result of a JavaScript expression evaluated once the page
and its images have loaded.
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Flags for a hermetic, offline headless Chromium (a fresh profile is added per run).
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-pipe")


def find_chromium() -> str | None:
    """The system's Chromium executable, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def require_chromium() -> str:
    """The system's Chromium; without one, fail under ``CI=true`` and skip elsewhere.

    ``.ci/run`` installs Debian's chromium under CI=true (``.ci/chromium.sh``), so there a
    missing browser is a broken CI, not a reason to report the browser tests as skipped.
    """
    import pytest

    chromium = find_chromium()
    if chromium is None:
        why = "chromium is not installed (apt-get install chromium): the report cannot render"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {why}; .ci/run installs it with .ci/chromium.sh")
        pytest.skip(why)
    return chromium


@dataclass
class Rendered:
    """What one page load gave: problems the browser reported, and the probe's value."""

    problems: list[str] = field(default_factory=list)
    value: Any = None


class _Pipe:
    def __init__(self, proc: subprocess.Popen, to_browser: int, from_browser: int) -> None:
        self.proc, self.out, self.next_id = proc, to_browser, 0
        self.messages: queue.Queue[dict | None] = queue.Queue()
        threading.Thread(target=self._read, args=(from_browser,), daemon=True).start()

    def _read(self, fd: int) -> None:
        buf = b""
        with os.fdopen(fd, "rb", buffering=0) as f:
            while chunk := f.read(1 << 16):
                buf += chunk
                *done, buf = buf.split(b"\0")
                for text in done:
                    self.messages.put(json.loads(text))
        self.messages.put(None)  # the browser closed its end

    def send(self, method: str, session: str | None = None, **params: Any) -> int:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self.out, json.dumps(msg).encode() + b"\0")
        return self.next_id

    def wait(self, deadline: float, events: list[dict], *, reply: int | None = None,
             event: str | None = None) -> dict:
        """Collect events until the reply to ``reply`` or the event ``event`` arrives."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"chromium gave no {reply or event} in time")
            try:
                msg = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            if msg is None:
                raise RuntimeError(f"chromium exited (status {self.proc.poll()})")
            if reply is not None and msg.get("id") == reply:
                if "error" in msg:
                    raise RuntimeError(f"DevTools error: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                events.append(msg)
                if msg["method"] == event:
                    return msg


def _problems(events: list[dict]) -> list[str]:
    out = []
    for ev in events:
        p = ev.get("params", {})
        if ev["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert",
                                                                           "warning"):
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"])
            out.append(f"console.{p['type']}: {args}")
        elif ev["method"] == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            out.append(f"uncaught: {d.get('exception', {}).get('description', d.get('text'))}")
        elif ev["method"] == "Log.entryAdded" and p["entry"]["level"] in ("error", "warning"):
            e = p["entry"]
            out.append(f"{e['source']} {e['level']}: {e['text']} {e.get('url', '')}".strip())
    return out


def render(chromium: str, url: str, probe: str, profile: Path, *,
           timeout_s: float = 180.0) -> Rendered:
    """Load ``url`` in headless Chromium, evaluate ``probe`` after the load event.

    Parameters
    ----------
    chromium : str
        The executable.
    url : str
        The page (``file://`` URIs work).
    probe : str
        A JavaScript expression; its JSON-serialisable value is returned.
    profile : Path
        A fresh, empty folder for the browser's profile (``--user-data-dir``).
    timeout_s : float
        A hang guard for the whole visit (the machine may be loaded).
    """
    deadline = time.monotonic() + timeout_s
    to_r, to_w = os.pipe()  # commands: we write, chromium reads on its fd 3
    from_r, from_w = os.pipe()  # replies: chromium writes on its fd 4
    # the child's ends above fd 4 first, so that placing one cannot overwrite the other
    child_r, child_w = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_r, from_w))
    for fd in (to_r, from_w):
        os.close(fd)

    def _fds() -> None:  # in the child, between fork and exec (pass_fds keeps 3 and 4 open)
        os.dup2(child_r, 3)
        os.dup2(child_w, 4)

    try:
        proc = subprocess.Popen(
            [chromium, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=_fds, pass_fds=(3, 4))
    finally:
        os.close(child_r)
        os.close(child_w)
    pipe = _Pipe(proc, to_w, from_r)
    events: list[dict] = []
    try:
        target = pipe.wait(deadline, events,
                           reply=pipe.send("Target.createTarget", url="about:blank"))
        session = pipe.wait(deadline, events, reply=pipe.send(
            "Target.attachToTarget", targetId=target["targetId"], flatten=True))["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            pipe.wait(deadline, events, reply=pipe.send(f"{domain}.enable", session))
        events.clear()  # about:blank's own chatter is not the page's
        nav = pipe.wait(deadline, events, reply=pipe.send("Page.navigate", session, url=url))
        if nav.get("errorText"):  # no page at all (a missing file): nothing to probe
            raise RuntimeError(f"chromium could not open {url}: {nav['errorText']}")
        if not any(ev["method"] == "Page.loadEventFired" for ev in events):
            pipe.wait(deadline, events, event="Page.loadEventFired")
        got = pipe.wait(deadline, events, reply=pipe.send(
            "Runtime.evaluate", session, expression=probe, returnByValue=True,
            awaitPromise=True))
        if "exceptionDetails" in got:
            raise RuntimeError(f"the probe failed: {got['exceptionDetails']}")
        return Rendered(_problems(events), got["result"].get("value"))
    finally:
        try:
            pipe.send("Browser.close")
            proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        os.close(to_w)
