"""Every way in at once, against one real ``worldhost serve``: a WebSocket client, a
bot with nothing but a TCP socket, a shell's ``curl`` (actions, and the event
stream) and a page in a real browser (Playwright + Debian's chromium) using a
native ``EventSource``. They drive the same world and see the same signals in
the same order; then the browser's session moves to the TCP socket without a gap."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from serverproc import ServerProcess, free_port
from test_browser import browser  # noqa: F401 - the module's browser fixture
from websockets.sync.client import connect

# In the page: open a session over HTTP, trade the credential for the stream's
# cookie, and follow the stream with a native EventSource (which sends the cookie,
# and Last-Event-ID when it reconnects). A stream closed with 1000 was taken over
# by another connection: an EventSource must then stop, or it would take it back.
PAGE_SCRIPT = """async () => {
  const post = async (path, body, auth) => (await fetch(path, {method: "POST",
      body: body && JSON.stringify(body),
      headers: {"Content-Type": "application/json", ...(auth && {Authorization: auth})}}));
  const opened = await (await post("/v1/actions",
      {action: "session.open", params: {name: "eve"}})).json();
  const auth = `Bearer ${opened.data.session_id}.${opened.data.resume_token}`;
  const cookie = await post("/v1/cookie", null, auth);
  if (cookie.status !== 200) throw new Error(`cookie: ${cookie.status}`);
  window.say = async (text) => (await post("/v1/actions",
      {action: "chat.say", params: {text}, id: text}, auth)).json();
  window.heard = [];
  window.lastId = 0;
  const es = window.es = new EventSource("/v1/events");
  es.addEventListener("chat.message", (e) => {
    window.heard.push([Number(e.lastEventId), JSON.parse(e.data)]);
    window.lastId = Number(e.lastEventId);
  });
  es.addEventListener("connection.closed", (e) => {
    if (JSON.parse(e.data).code === 1000) es.close();
  });
  await new Promise((resolve, reject) => {
    es.addEventListener("session.resumed", resolve, {once: true});
    es.onerror = () => reject(new Error("the stream failed"));
  });
  return {session_id: opened.data.session_id, resume_token: opened.data.resume_token};
}"""


@pytest.fixture
def server(tmp_path: Any) -> Iterator[ServerProcess]:
    tcp = free_port()
    config = tmp_path / "host.toml"
    config.write_text(f'[transports.tcp]\nenabled = true\nport = {tcp}\n'
                      f'[host.limits]\nrate_per_s = 0\n')
    proc = ServerProcess(tmp_path / "w.db", config=config, port=free_port()).start()
    proc.tcp = tcp  # type: ignore[attr-defined]
    try:
        yield proc
    finally:
        proc.stop()


class Bot:
    """A bot with nothing but a TCP socket: JSON lines each way."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.lines = self.sock.makefile("rb")
        self.heard: list[tuple[int, dict[str, Any]]] = []
        assert self.recv()["signal"] == "server.info"

    def recv(self) -> dict[str, Any]:
        message: dict[str, Any] = json.loads(self.lines.readline())
        if message.get("signal") == "chat.message":
            self.heard.append((message["seq"], message["data"]))
        return message

    def call(self, action: str, params: dict[str, Any], rid: str) -> dict[str, Any]:
        self.sock.sendall(json.dumps({"id": rid, "action": action, "params": params}).encode()
                          + b"\n")
        while (message := self.recv()).get("re") != rid:
            pass
        return message


class Socket:
    """A WebSocket client (the ``websockets`` library's blocking one)."""

    def __init__(self, url: str) -> None:
        self.ws = connect(url)
        self.heard: list[tuple[int, dict[str, Any]]] = []
        assert json.loads(self.ws.recv(timeout=10))["signal"] == "server.info"

    def call(self, action: str, params: dict[str, Any], rid: str) -> dict[str, Any]:
        self.ws.send(json.dumps({"id": rid, "action": action, "params": params}))
        while True:
            message: dict[str, Any] = json.loads(self.ws.recv(timeout=10))
            if message.get("signal") == "chat.message":
                self.heard.append((message["seq"], message["data"]))
            if message.get("re") == rid:
                return message

    def until(self, count: int) -> None:
        while len(self.heard) < count:
            message = json.loads(self.ws.recv(timeout=10))
            if message.get("signal") == "chat.message":
                self.heard.append((message["seq"], message["data"]))


class Curl:
    """A shell script's view: actions with ``curl --json``, the stream with ``curl -N``."""

    def __init__(self, base: str) -> None:
        self.curl = shutil.which("curl")
        assert self.curl is not None, "curl is needed for this test"
        self.base = base
        opened = self.post({"action": "session.open", "params": {"name": "cathy"}})
        self.bearer = f"{opened['data']['session_id']}.{opened['data']['resume_token']}"
        self.stream = subprocess.Popen(
            [self.curl, "-sN", "-H", f"Authorization: Bearer {self.bearer}",
             f"{base}/v1/events"], stdout=subprocess.PIPE, text=True)
        self.heard: list[tuple[int, dict[str, Any]]] = []
        self.resumed = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        assert self.resumed.wait(10), "the stream did not start"

    def post(self, envelope: dict[str, Any], bearer: str | None = None) -> dict[str, Any]:
        auth = ["-H", f"Authorization: Bearer {bearer}"] if bearer else []
        done = subprocess.run([self.curl, "-sS", "-H", "Content-Type: application/json",  # type: ignore[list-item]
                               "-d", json.dumps(envelope), *auth, f"{self.base}/v1/actions"],
                              capture_output=True, check=True, timeout=10)
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    def call(self, action: str, params: dict[str, Any], rid: str) -> dict[str, Any]:
        return self.post({"action": action, "params": params, "id": rid}, self.bearer)

    def _read(self) -> None:
        assert self.stream.stdout is not None
        event: dict[str, str] = {}
        for line in self.stream.stdout:
            line = line.rstrip("\n")
            if line:
                key, _, value = line.partition(": ")
                event[key] = value
                continue
            if event.get("event") == "session.resumed":
                self.resumed.set()
            elif event.get("event") == "chat.message":
                self.heard.append((int(event["id"]), json.loads(event["data"])))
            event = {}

    def close(self) -> None:
        self.stream.kill()
        self.stream.wait()


def _said(heard: list[tuple[int, dict[str, Any]]]) -> list[tuple[str, str]]:
    seqs = [seq for seq, _ in heard]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
    return [(data["from"], data["text"]) for _, data in heard]


def test_websocket_tcp_curl_and_a_browser_eventsource_see_one_world(
        server: ServerProcess, browser: Any) -> None:  # noqa: F811
    base = f"http://127.0.0.1:{server.port}"
    ada = Socket(server.url)
    assert ada.call("session.open", {"name": "ada"}, "open")["signal"] == "session.opened"
    bot = Bot(server.tcp)  # type: ignore[attr-defined]
    assert bot.call("session.open", {"name": "bot"}, "open")["signal"] == "session.opened"
    cathy = Curl(base)
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(base + "/")
        eve = page.evaluate(PAGE_SCRIPT)
        expected = []
        for round_ in range(3):  # one after another: the order every client must see
            for who, client in (("ada", ada), ("bot", bot), ("cathy", cathy)):
                text = f"{who} {round_}"
                assert client.call("chat.say", {"text": text}, text)["signal"] == "chat.said"
                expected.append((who, text))
            text = f"eve {round_}"
            assert page.evaluate("(text) => window.say(text)", text)["signal"] == "chat.said"
            expected.append(("eve", text))
        ada.until(len(expected))
        bot.call("host.ping", {}, "drain")  # its signals came before the pong
        page.wait_for_function(f"window.heard.length >= {len(expected)}", timeout=10_000)
        in_page = [(seq, data) for seq, data in page.evaluate("window.heard")]
        for _ in range(100):
            if len(cathy.heard) >= len(expected):
                break
            time.sleep(0.1)
        for heard in (ada.heard, bot.heard, cathy.heard, in_page):
            assert _said(heard) == expected

        # eve's session moves from the browser's stream to a TCP socket, without a gap
        last = page.evaluate("window.lastId")
        page.evaluate("window.es.close()")
        moved = Bot(server.tcp)  # type: ignore[attr-defined]
        resumed = moved.call("session.resume", {**eve, "last_seq": last}, "resume")
        assert resumed["signal"] == "session.resumed" and resumed["data"]["complete"] is True
        assert resumed["seq"] == last + 1 + resumed["data"]["replayed"]
        assert moved.call("chat.say", {"text": "eve, by socket"}, "s")["signal"] == "chat.said"
        ada.until(len(expected) + 1)
        assert _said(ada.heard)[-1] == ("eve", "eve, by socket")
    finally:
        context.close()
        cathy.close()
        ada.ws.close()
