"""The pages in a real browser (Playwright + Debian's chromium) against a real
``worldhost serve``: the inspector live, /play across a refresh, a kill -9 and two tabs,
and a foreign page refused."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from serverproc import ServerProcess, free_port

from host.client import CallError, connect

CHROMIUM = os.environ.get("WORLDHOST_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
SHOTS = os.environ.get("WORLDHOST_SCREENSHOTS")  # a folder: save a screenshot per page


def _missing(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}: CI must run the browser tests (.ci/run installs chromium)")
    pytest.skip(f"{reason} (install: apt-get install -y chromium; pip install playwright)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed")
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        _missing(f"no browser at {CHROMIUM}")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One host for the module (starting one costs seconds); each test plays under its
    own names, in its own browser context."""
    folder = tmp_path_factory.mktemp("browser")
    config = folder / "host.toml"
    config.write_text('[host]\nadmin_token = "adm"\n')
    proc = ServerProcess(folder / "w.db", config=config, port=free_port()).start()
    try:
        yield proc
    finally:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.kill9()


def base(server: ServerProcess) -> str:
    return f"http://127.0.0.1:{server.port}"


def page_of(context: Any) -> Any:
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.errors = errors
    return page


def shot(page: Any, name: str) -> None:
    if SHOTS:
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"))


def run(fn: Any, *args: Any) -> Any:
    return trio.run(fn, *args)


async def seed(url: str) -> None:
    """A small world, running at 10 ticks a second."""
    async with connect(url, name="seed") as c:
        for i, (x, y) in enumerate([(0, 0), (100, 0), (100, 100), (0, 100)]):
            await c.call("map.add_node", id=f"n{i}", x=x, y=y,
                         building={"type": "depot"} if i == 0 else None)
        for i in range(4):
            a, b = f"n{i}", f"n{(i + 1) % 4}"
            await c.call("map.add_edge", id=f"{a}>{b}", **{"from": a, "to": b}, length=100)
            await c.call("map.add_edge", id=f"{b}>{a}", **{"from": b, "to": a}, length=100)
        await c.call("simulation.add_agent", id="t1", kind="truck", node="n0", speed=20)
        await c.call("simulation.add_package", id="p1", origin="n2", destination="n0")
        with contextlib.suppress(CallError):  # already running
            await c.call("simulation.start", tick_hz=10)


async def chat_texts(url: str) -> list[str]:
    async with connect(url, name="reader") as c:
        history = await c.call("chat.history", limit=1000)
        return [m["text"] for m in history["messages"]]


def wait_js(page: Any, expression: str, timeout: float = 10) -> None:
    """Poll a JavaScript expression until it is true (page.wait_for_function evaluates
    strings, which the pages' Content-Security-Policy refuses)."""
    deadline = time.monotonic() + timeout
    while not _evaluate_across_navigation(page, expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"still false after {timeout} s: {expression}")
        time.sleep(0.05)


def _evaluate_across_navigation(page: Any, expression: str) -> Any:
    """The expression's value; false while the page is navigating (a page that reloads
    itself, as the inspector does to open an admin session, destroys the context an
    evaluation started in)."""
    from playwright.sync_api import Error

    try:
        return page.evaluate(expression)
    except Error as exc:
        if "context was destroyed" in str(exc) or "navigat" in str(exc):
            return False
        raise


def session_id(page: Any) -> str:
    return page.evaluate("globalThis.worldhost.sessionId")


def join(page: Any, url: str, name: str) -> None:
    page.goto(url + "/play")
    page.wait_for_selector("#setup:not([hidden])", timeout=10_000)
    page.fill("#name", name)
    page.click("#join")
    page.wait_for_selector("#game:not([hidden])", timeout=15_000)


def test_inspector_shows_the_world_live_and_an_admin_kicks(browser: Any, server: ServerProcess) -> None:
    run(seed, server.url)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = page_of(context)
    page.goto(base(server) + "/inspector")
    wait_js(page, "document.querySelector('#state').textContent === 'open'",
           timeout=10)
    wait_js(page, "globalThis.worldhost.state === 'open' && "
                  "document.querySelector('#tick').textContent.includes('running')", timeout=10)
    first = page.evaluate("globalThis.worldhost.lastSeq")
    tick = int(page.inner_text("#tick").split()[1])
    wait_js(page, f"parseInt(document.querySelector('#tick').textContent.split(' ')[1]) "
           f">= {tick + 5}", timeout=5)
    assert page.evaluate("globalThis.worldhost.lastSeq") > first
    # the truck moves on the canvas, the slices are a tree, the log shows the ticks
    assert "simulation" in page.inner_text("#tree") and "map" in page.inner_text("#tree")
    assert "simulation.ticked" in page.inner_text("#log")
    painted = page.evaluate("""() => { const c = document.querySelector('#map');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i + 3]) n++; return n; }""")
    assert painted > 1000
    # any action from the form; a validation error is shown as the host names it
    page.fill("#action", "map.add_node")
    page.fill("#params", '{"id": "n9", "x": "far"}')
    page.click("#action-form button")
    page.wait_for_selector("#reply.error", timeout=10_000)
    assert "validation_error" in page.inner_text("#reply")
    assert "params.x" in page.inner_text("#reply")
    shot(page, "inspector")
    # a player joins; the inspector is no admin's yet, then is one, and kicks the player
    player = page_of(browser.new_context())
    join(player, base(server), "dee")
    assert page.locator("#sessions button").count() == 0
    page.fill("#admin-token", "adm")
    page.click("#admin-button")
    wait_js(page, "globalThis.worldhost && globalThis.worldhost.role === 'admin'")
    page.locator("#sessions tr", has_text="dee").locator("button").click()
    player.wait_for_selector("#setup:not([hidden])", timeout=10_000)
    assert "kicked" in player.inner_text("#setup-note")
    page.reload()  # the admin token stays in the tab
    wait_js(page, "globalThis.worldhost && globalThis.worldhost.role === 'admin'")
    shot(page, "inspector-admin")
    assert page.errors == [] and player.errors == []
    context.close()


def test_play_refresh_goes_straight_back_in_and_foreign_pages_are_refused(
        browser: Any, server: ServerProcess) -> None:
    context = browser.new_context()
    page = page_of(context)
    join(page, base(server), "ada")
    sid = session_id(page)
    page.fill("#chat-text", "hello from ada")
    page.press("#chat-text", "Enter")
    page.wait_for_selector("#messages >> text=hello from ada", timeout=10_000)
    wait_js(page, "/[1-9] trucks/.test(document.querySelector('#counts').textContent)",
            timeout=10)
    shot(page, "play")
    page.reload()
    page.wait_for_selector("#game:not([hidden])", timeout=10_000)
    assert page.is_hidden("#setup")
    assert session_id(page) == sid
    assert page.evaluate("globalThis.worldhost.resumes") == 1
    page.wait_for_selector("#messages >> text=hello from ada", timeout=10_000)
    assert page.inner_text("#me-name") == "ada"
    assert page.errors == []
    # a page from a foreign origin is refused; the host's own page may connect
    probe = """<!doctype html><script>
      window.result = new Promise((resolve) => {
        const ws = new WebSocket("ws://127.0.0.1:%d/ws");
        ws.onmessage = (e) => resolve("message: " + e.data.slice(0, 30));
        ws.onclose = (e) => resolve("closed " + e.code);
      });
    </script>""" % server.port
    page.route("http://foreign.example/", lambda route: route.fulfill(
        status=200, content_type="text/html", body=probe))
    page.goto("http://foreign.example/")
    assert page.evaluate("window.result") == "closed 1006"
    # the same page served from the host itself may connect
    page.goto(base(server) + "/")
    result = page.evaluate("""new Promise((resolve) => {
        const ws = new WebSocket(`ws://${location.host}/ws`);
        ws.onmessage = (e) => { resolve(JSON.parse(e.data).signal); ws.close(); };
        ws.onclose = (e) => resolve("closed " + e.code);
      })""")
    assert result == "server.info"
    context.close()


def test_kill_9_the_page_comes_back_and_a_burst_is_applied_once(
        browser: Any, server: ServerProcess) -> None:
    context = browser.new_context()
    page = page_of(context)
    join(page, base(server), "bo")
    sid = session_id(page)
    for _ in range(10):
        page.click("#wave")
    server.kill9()  # some of the waves answered, some applied unanswered, some not read
    wait_js(page, "['offline', 'connecting'].includes(globalThis.worldhost.state)",
           timeout=10)
    for _ in range(10):
        page.click("#wave")  # clicked while the host is down
    server.start()
    wait_js(page, "globalThis.worldhost.state === 'open' && "
           "globalThis.worldhost.unanswered === 0", timeout=20)
    assert session_id(page) == sid
    texts = Counter(run(chat_texts, server.url))
    assert {f"wave {i} from bo": 1 for i in range(1, 21)} == \
        {t: n for t, n in texts.items() if t.startswith("wave")}
    assert page.inner_text("#play-error") == ""
    assert page.errors == []
    context.close()


def test_two_tabs_of_one_player_both_keep_working(browser: Any, server: ServerProcess) -> None:
    context = browser.new_context()
    one = page_of(context)
    join(one, base(server), "cy")
    two = page_of(context)
    two.goto(base(server) + "/play")  # the same player (localStorage), its own session
    two.wait_for_selector("#game:not([hidden])", timeout=10_000)
    assert session_id(one) != session_id(two)
    for i, page in enumerate([one, two, one]):
        page.fill("#chat-text", f"tab message {i}")
        page.press("#chat-text", "Enter")
    one.reload()  # resumes tab one's session; tab two's token is untouched
    one.wait_for_selector("#game:not([hidden])", timeout=10_000)
    two.reload()
    two.wait_for_selector("#game:not([hidden])", timeout=10_000)
    for i, page in enumerate([two, one]):
        page.fill("#chat-text", f"after reload {i}")
        page.press("#chat-text", "Enter")
    for page in (one, two):
        for text in ["tab message 0", "tab message 1", "tab message 2", "after reload 0",
                     "after reload 1"]:
            page.wait_for_selector(f"#messages >> text={text}", timeout=10_000)
        assert page.evaluate("globalThis.worldhost.resumes") == 1
        assert page.inner_text("#play-error") == ""
        assert page.errors == []
    # a duplicated tab starts with a copy of its tab's sessionStorage: it resumes that
    # session (rotating the token); the first tab, displaced, resumes it back with the
    # token both held (the reuse grace: the duplicate has not presented its new one),
    # and the duplicate, displaced in its turn with a superseded token, opens a new one
    key = f"worldhost:session:ws://127.0.0.1:{server.port}/ws"
    copied = one.evaluate(f"sessionStorage.getItem({key!r})")
    copied_id = json.loads(copied)["session_id"]
    three = page_of(context)
    three.add_init_script(f"sessionStorage.setItem({key!r}, {copied!r})")
    three.goto(base(server) + "/play")
    three.wait_for_selector("#game:not([hidden])", timeout=10_000)
    wait_js(three, f"globalThis.worldhost.state === 'open' && "
                   f"globalThis.worldhost.sessionId !== {copied_id!r}")
    wait_js(one, f"globalThis.worldhost.state === 'open' && "
                 f"globalThis.worldhost.sessionId === {copied_id!r}")
    for i, page in enumerate([one, two, three]):
        page.fill("#chat-text", f"three tabs {i}")
        page.press("#chat-text", "Enter")
    for page in (one, two, three):
        for i in range(3):
            page.wait_for_selector(f"#messages >> text=three tabs {i}", timeout=10_000)
        assert page.errors == []
    context.close()
