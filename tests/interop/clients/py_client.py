"""The official Python SDK client (`mcp` on PyPI) through mcp-guard.

Run by run.mjs with the same environment as clients/ts.mjs (INTEROP_URL, INTEROP_TRANSPORT,
INTEROP_KEY, INTEROP_LIMITED_KEY, INTEROP_DOCS_DIR, INTEROP_CASES). Prints one JSON line per case
on stdout: {"case": NAME, "ok": BOOL, "detail": TEXT}, plus "adapted": HOW when the case checks
the legacy transport's own form of what it is about. The expectations live in expect.json.

The client is `mcp.ClientSession` over `mcp.client.streamable_http.streamable_http_client`
(INTEROP_TRANSPORT=streamable-http, the default) or `mcp.client.sse.sse_client` (=sse, the
2024-11-05 HTTP+SSE transport; INTEROP_URL is then the gateway's /sse stream), with the API key in
an `Authorization: Bearer` header on the httpx2 client, as the SDK documents.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from contextlib import AsyncExitStack, nullcontext
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx2
import mcp_types as types
from mcp import Client, ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError

HERE = Path(__file__).resolve().parent
EXPECT = json.loads((HERE.parent / "expect.json").read_text(encoding="utf-8"))
URL = os.environ["INTEROP_URL"]
KEY = os.environ["INTEROP_KEY"]
LIMITED_KEY = os.environ["INTEROP_LIMITED_KEY"]
DOCS_DIR = Path(os.environ["INTEROP_DOCS_DIR"])
CASE_TIMEOUT_S = 20
LEGACY = (os.environ.get("INTEROP_TRANSPORT") or "streamable-http") == "sse"


class Fail(Exception):
    pass


def check(cond: Any, msg: str) -> None:
    if not cond:
        raise Fail(msg)


def describe(e: BaseException) -> str:
    if isinstance(e, MCPError):
        data = f" data={json.dumps(e.error.data)}" if e.error.data is not None else ""
        return f"MCPError {e.code}: {e.message}{data}"
    return f"{type(e).__name__}: {e}"


def first_fail(e: BaseException) -> Fail | None:
    """The first Fail inside (possibly nested) exception groups."""
    if isinstance(e, Fail):
        return e
    if isinstance(e, BaseExceptionGroup):
        for sub in e.exceptions:
            if (f := first_fail(sub)) is not None:
                return f
    return None


def text_of(result: types.CallToolResult) -> str:
    return "".join(c.text for c in result.content if isinstance(c, types.TextContent))


class Conn:
    """One ClientSession through the gateway, recording the notifications it receives."""

    def __init__(self) -> None:
        # Every HTTP exchange: {http, rpc, status, type, retry_after} (rpc: the method posted).
        self.exchanges: list[dict[str, Any]] = []
        self.session_id: str | None = None  # Mcp-Session-Id the SDK sends (legacy: endpoint's sessionId)
        self.endpoint: str | None = None  # legacy: the messages URL the SDK posts to
        self.protocol_version: str | None = None  # Mcp-Protocol-Version the SDK sends
        self.http: Any = None
        self.notifications: list[Any] = []
        self.logs: list[types.LoggingMessageNotificationParams] = []
        self.log_event = anyio.Event()
        self.want_log: str | None = None
        self.session: ClientSession | None = None
        self.init: types.InitializeResult | None = None

    async def message_handler(self, message: Any) -> None:
        self.notifications.append(message)

    async def logging_callback(self, params: types.LoggingMessageNotificationParams) -> None:
        self.logs.append(params)
        if self.want_log is not None and self.want_log in str(params.data):
            self.log_event.set()


def recording_client(conn: Conn, headers: dict[str, str] | None = None, **kwargs: Any) -> httpx2.AsyncClient:
    """The SDK's own httpx2 client, with hooks that record each exchange on `conn`."""
    http = create_mcp_http_client(headers=headers, **kwargs)

    async def record(response: Any) -> None:
        rpc = None
        if response.request.method == "POST":
            try:
                rpc = json.loads(response.request.content or b"null").get("method")
            except (ValueError, AttributeError):
                pass
        conn.exchanges.append(
            {
                "http": response.request.method,
                "rpc": rpc,
                "status": response.status_code,
                "type": response.headers.get("content-type"),
                "retry_after": response.headers.get("retry-after"),
            }
        )

    async def record_request(request: Any) -> None:
        conn.session_id = request.headers.get("mcp-session-id", conn.session_id)
        conn.protocol_version = request.headers.get("mcp-protocol-version", conn.protocol_version)
        if request.method == "POST" and conn.endpoint is None:
            conn.endpoint = str(request.url)

    http.event_hooks["response"].append(record)
    http.event_hooks["request"].append(record_request)
    return http


def transport_for(conn: Conn, key: str) -> Any:
    """The SDK transport (an async context manager yielding the read and write streams)."""
    if LEGACY:
        # sse_client builds its own httpx2 client (one for the GET stream and the POSTs) from
        # `headers`, through the factory: ours is the SDK's default plus the recording hooks.
        def factory(headers: Any = None, timeout: Any = None, auth: Any = None) -> httpx2.AsyncClient:
            conn.http = recording_client(conn, headers=headers, timeout=timeout, auth=auth)
            return conn.http

        def on_session_created(session_id: str) -> None:
            conn.session_id = session_id

        return sse_client(
            URL,
            headers={"Authorization": f"Bearer {key}"},
            httpx_client_factory=factory,
            on_session_created=on_session_created,
        )
    return streamable_http_client(URL, http_client=conn.http)


async def connect(stack: AsyncExitStack, key: str, name: str = "interop-py") -> Conn:
    conn = Conn()
    if not LEGACY:
        conn.http = await stack.enter_async_context(
            recording_client(conn, headers={"Authorization": f"Bearer {key}"})
        )
    read, write = await stack.enter_async_context(transport_for(conn, key))
    conn.session = await stack.enter_async_context(
        ClientSession(
            read,
            write,
            message_handler=conn.message_handler,
            logging_callback=conn.logging_callback,
            client_info=types.Implementation(name=name, version="1.0.0"),
        )
    )
    conn.init = await conn.session.initialize()
    return conn


async def expect_error(coro: Any, what: str) -> str:
    try:
        result = await coro
    except MCPError as e:
        return describe(e)
    raise Fail(f"{what}: expected an error, got a result {str(result)[:200]}")


class Cases:
    def __init__(self, tg: anyio.abc.TaskGroup) -> None:
        self.tg = tg
        self.main: Conn | None = None
        self.done = anyio.Event()
        self.adapted: str | None = None  # how the running case departs from its usual form

    def adapt(self, how: str) -> None:
        """Marks the running case as checking the legacy transport's own form of what it is
        about; the runner prints `[adapted: how]`, on a FAIL as well as a PASS."""
        self.adapted = how

    async def _hold_main(self, *, task_status: anyio.abc.TaskStatus[Conn]) -> None:
        # The shared session lives in its own task, so the per-case timeouts (cancel scopes)
        # never enclose the transport's task groups.
        async with AsyncExitStack() as stack:
            conn = await connect(stack, KEY)
            task_status.started(conn)
            await self.done.wait()

    @property
    def s(self) -> ClientSession:
        assert self.main is not None and self.main.session is not None
        return self.main.session

    async def initialize(self) -> str:
        self.main = await self.tg.start(self._hold_main)
        init = self.main.init
        assert init is not None
        check(init.server_info.name == EXPECT["server_name"], f"serverInfo.name = {init.server_info.name}")
        check(init.protocol_version in EXPECT["protocol_versions"], f"protocol version {init.protocol_version}")
        if LEGACY:
            # No Mcp-Session-Id on this transport: the session is the endpoint event's sessionId
            # (the SDK's on_session_created callback), the URL it then posts to.
            self.adapt("legacy SSE has no Mcp-Session-Id: the session id is the endpoint event's sessionId")
            sid = self.main.session_id
            path = httpx2.URL(self.main.endpoint or "").path
            check(sid and path == "/messages", f"endpoint {self.main.endpoint}, sessionId {sid}")
            return (
                f"server {init.server_info.name} {init.server_info.version}, protocol {init.protocol_version}, "
                f"endpoint {path}?sessionId=<{len(sid or '')} chars>"
            )
        return f"server {init.server_info.name} {init.server_info.version}, protocol {init.protocol_version}"

    async def tools_list_filtered(self) -> str:
        tools = (await self.s.list_tools()).tools
        names = sorted(t.name for t in tools)
        want = sorted(EXPECT["visible_tools"])
        check(names == want, f"got {names}, want {want}")
        return f"{len(names)} tools visible (hidden: {', '.join(EXPECT['hidden_tools'])})"

    async def tools_call_allowed(self) -> str:
        msg = EXPECT["echo_message"]
        r = await self.s.call_tool("echo", {"message": msg})
        check(not r.is_error, f"is_error: {r}")
        check(text_of(r) == f"Echo: {msg}", f"echo returned {text_of(r)!r}")
        return json.dumps(text_of(r), ensure_ascii=False)

    async def tools_call_denied(self) -> str:
        out = []
        for name in EXPECT["denied_tool_calls"]:
            err = await expect_error(self.s.call_tool(name, {}), f"tools/call {name}")
            check(name in err, f"{name}: the error does not name the tool: {err}")
            out.append(f"{name} -> {err}")
        return "; ".join(out)

    async def resources(self) -> str:
        listed = (await self.s.list_resources()).resources
        uris = [str(r.uri) for r in listed]
        check(EXPECT["resource_uri"] in uris, f"{EXPECT['resource_uri']} not listed")
        r = await self.s.read_resource(EXPECT["resource_uri"])
        want = (DOCS_DIR / EXPECT["resource_file"]).read_text(encoding="utf-8")
        got = getattr(r.contents[0], "text", None) if r.contents else None
        check(got == want, "read text differs from the file")
        d = await self.s.read_resource(EXPECT["dynamic_resource_uri"])
        dt = getattr(d.contents[0], "text", "") if d.contents else ""
        check(dt.startswith(EXPECT["dynamic_resource_prefix"]), f"dynamic resource: {dt!r}")
        return (
            f"{len(uris)} listed, read {EXPECT['resource_file']} ({len(want)} chars) "
            f"and {EXPECT['dynamic_resource_uri']}"
        )

    async def prompts(self) -> str:
        names = [p.name for p in (await self.s.list_prompts()).prompts]
        for n in EXPECT["listed_prompts"]:
            check(n in names, f"{n} not listed: {names}")
        r = await self.s.get_prompt("args-prompt", {"city": "Paris"})
        content = r.messages[0].content if r.messages else None
        text = getattr(content, "text", None)
        check(text == EXPECT["args_prompt_text"], f"args-prompt gave {text!r}")
        return f"{names}; args-prompt -> {text!r}"

    async def resource_prompt_denied(self) -> str:
        a = await expect_error(
            self.s.read_resource(EXPECT["denied_resource_uri"]), f"resources/read {EXPECT['denied_resource_uri']}"
        )
        b = await expect_error(self.s.get_prompt(EXPECT["denied_prompt"], {}), f"prompts/get {EXPECT['denied_prompt']}")
        return f"resource -> {a}; prompt -> {b}"

    async def notification(self) -> str:
        # resources/subscribe makes server-everything send a logging notification tied to no
        # request; it travels on the session's standalone (GET) stream.
        assert self.main is not None
        want = EXPECT["subscribe_log_prefix"] + EXPECT["resource_uri"]
        self.main.want_log = want
        await self.s.set_logging_level("debug")
        await self.s.subscribe_resource(EXPECT["resource_uri"])
        with anyio.move_on_after(5):
            await self.main.log_event.wait()
        got = [p for p in self.main.logs if want in str(p.data)]
        check(got, f"no notifications/message containing {want!r} within 5 s (got {[p.data for p in self.main.logs]})")
        await self.s.unsubscribe_resource(EXPECT["resource_uri"])
        return f"notifications/message level={got[0].level}: {json.dumps(got[0].data)}"

    async def progress_in_order(self) -> str:
        # The SDK forgets a request's progress callback when its result arrives, so progress must
        # arrive before the result. Guaranteed only when the server answers the POST with an SSE
        # stream carrying the progress, then the result (the spec: request-related messages
        # SHOULD go on that stream, not on the standalone GET stream, which races the answer).
        assert self.main is not None
        steps = EXPECT["progress_steps"][0]
        seen: list[int] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            seen.append(int(progress))

        before = len(self.main.exchanges)
        r = await self.s.call_tool(
            "trigger-long-running-operation",
            {"duration": EXPECT["progress_duration"], "steps": steps},
            progress_callback=on_progress,
        )
        check(f"Steps: {steps}." in text_of(r), f"result {text_of(r)!r}")
        # Callbacks run as tasks of their own; those for progress that came before the result
        # are already scheduled: let them run.
        await anyio.sleep(0.1)
        post = next((x for x in self.main.exchanges[before:] if x["rpc"] == "tools/call"), {})
        want = list(range(1, steps + 1))
        if LEGACY:
            self.adapt(
                "legacy SSE answers on its one stream, not on the POST: checks progress precedes the result there"
            )
        check(
            seen == want,
            f"the SDK's progress callback saw {seen}, want {want} (progress arriving after the result "
            f"is dropped); POST answered {post.get('status') if LEGACY else post.get('type')}",
        )
        if LEGACY:
            # One stream carries every answer: the order the callback saw is the order the gateway
            # wrote (progress, then the result). The POST only acknowledges.
            check(post.get("status") == 202, f"tools/call POST answered HTTP {post.get('status')}, want 202")
            return f"POST answered 202; progress {seen} before the result on the stream"
        check(
            (post.get("type") or "").startswith("text/event-stream"),
            f"tools/call answered with {post.get('type')}: its progress went on the standalone GET stream, "
            f"unordered with the result (all {steps} arrived in time this run)",
        )
        return f"POST answered {post['type']}; progress {seen} before the result"

    async def progress_two_clients(self) -> str:
        # Two fresh sessions issue the same request sequence, so the SDK gives both calls the
        # same progressToken (it uses the request id). Different step counts tell them apart.
        steps_a, steps_b = EXPECT["progress_steps"]
        async with AsyncExitStack() as stack:
            a = await connect(stack, KEY, "interop-py-a")
            b = await connect(stack, KEY, "interop-py-b")
            seen: dict[str, list[tuple[float, float | None]]] = {"A": [], "B": []}
            results: dict[str, types.CallToolResult] = {}

            async def run(label: str, c: Conn, steps: int) -> None:
                # A callback makes the SDK send a progressToken; what arrives is read from
                # message_handler below (it also sees progress that comes after the result).
                async def on_progress(progress: float, total: float | None, message: str | None) -> None:
                    seen[label].append((progress, total))

                assert c.session is not None
                results[label] = await c.session.call_tool(
                    "trigger-long-running-operation",
                    {"duration": EXPECT["progress_duration"], "steps": steps},
                    progress_callback=on_progress,
                )

            async with anyio.create_task_group() as tg:
                tg.start_soon(run, "A", a, steps_a)
                tg.start_soon(run, "B", b, steps_b)

            def wire(c: Conn) -> list[types.ProgressNotificationParams]:
                return [n.params for n in c.notifications if isinstance(n, types.ProgressNotification)]

            # Isolation only: whether progress arrives before the result is progress-in-order's
            # business, so late notifications count here (message_handler sees them all; wait
            # for them, bounded).
            with anyio.move_on_after(2):
                while len(wire(a)) < steps_a or len(wire(b)) < steps_b:
                    await anyio.sleep(0.02)
            await anyio.sleep(0.1)  # and anything foreign that would arrive just behind them

            tokens = {p.progress_token for p in wire(a) + wire(b)}
            check(len(tokens) == 1, f"progress tokens differ: {tokens}")
            out = [f"token {json.dumps(next(iter(tokens)))} on both"]
            for label, c, steps in (("A", a, steps_a), ("B", b, steps_b)):
                w = wire(c)
                check(
                    all(p.total == steps for p in w),
                    f"{label}: foreign progress {[(p.progress, p.total) for p in w]}",
                )
                prog = [int(p.progress) for p in w]
                check(prog == list(range(1, steps + 1)), f"{label}: progress {prog}, want 1..{steps}")
                check(f"Steps: {steps}." in text_of(results[label]), f"{label}: result {text_of(results[label])!r}")
                out.append(f"{label} got {steps}/{steps}")
            return ", ".join(out)

    async def session_delete(self) -> str:
        if LEGACY:
            return await self._legacy_session_end()
        # 1. Leaving streamable_http_client's context sends DELETE with the session id (the SDK
        #    only logs a failure, so the status is read from the httpx2 response hook).
        async with AsyncExitStack() as stack:
            c = await connect(stack, KEY, "interop-py-delete")
            assert c.session is not None
            await c.session.call_tool("echo", {"message": "before delete"})
        deletes = [x["status"] for x in c.exchanges if x["http"] == "DELETE"]
        check(deletes and deletes[-1] in (200, 204), f"SDK's DELETE answered {deletes}")
        # 2. A session ended under a live SDK session (DELETE sent beside it): the next request
        #    must get 404, which the SDK reports as "Session terminated".
        async with AsyncExitStack() as stack:
            c = await connect(stack, KEY, "interop-py-delete-2")
            assert c.session is not None and c.http is not None
            await c.session.call_tool("echo", {"message": "before delete"})
            headers = {"mcp-session-id": c.session_id or "", "mcp-protocol-version": c.protocol_version or ""}
            r = await c.http.delete(URL, headers=headers)
            check(r.status_code in (200, 204), f"DELETE beside the SDK answered {r.status_code}")
            error: MCPError | None = None
            try:
                await c.session.list_tools()
            except MCPError as e:
                error = e
            status = c.exchanges[-1]["status"]
        check(error is not None, "request on the deleted session succeeded")
        assert error is not None
        check(status == 404, f"request on the deleted session: HTTP {status}, SDK raised {describe(error)}")
        return f"SDK DELETE {deletes[-1]}; then HTTP 404, SDK raised {describe(error)}"

    async def _legacy_session_end(self) -> str:
        # Legacy SSE has no DELETE and no session id to resume with: the session ends when its
        # stream closes (leaving sse_client's context closes it), and its messages URL must then
        # be unknown (404).
        self.adapt(
            "legacy SSE has no DELETE and no session resumption: the session ends with its stream, and its "
            "messages URL then gets 404 (a plain POST: the SDK cannot reuse a session)"
        )
        async with AsyncExitStack() as stack:
            c = await connect(stack, KEY, "interop-py-delete")
            assert c.session is not None
            await c.session.call_tool("echo", {"message": "before the stream closes"})
        check(c.endpoint, "the SDK posted nowhere")
        assert c.endpoint is not None
        # The gateway learns of the close when the socket reads EOF, a moment later: retry
        # briefly. A POST that still lands is a harmless ping answered on a closed stream.
        t0 = time.monotonic()
        async with create_mcp_http_client(headers={"Authorization": f"Bearer {KEY}"}) as http:
            while True:
                r = await http.post(c.endpoint, json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
                if r.status_code == 404 or time.monotonic() - t0 > 2:
                    break
                await anyio.sleep(0.05)
        ms = int((time.monotonic() - t0) * 1000)
        check(
            r.status_code == 404,
            f"POST to the closed session's /messages answered HTTP {r.status_code}: {r.text[:200]}",
        )
        return (
            f"stream closed by the SDK; POST to its /messages?sessionId= then: HTTP 404 after {ms} ms: "
            f"{r.text[:120]}"
        )

    async def connect_auto(self) -> str:
        # mcp.Client's default mode ("auto") first probes the 2026-era `server/discover`; a
        # gateway that does not speak it must answer so that the SDK falls back to initialize.
        conn = Conn()
        if LEGACY:
            # The probe is posted (202) and refused on the stream; no HTTP status to report.
            self.adapt("legacy SSE: the probe is posted (202) and its error arrives on the stream")
            transport = transport_for(conn, KEY)
            http = nullcontext()  # sse_client owns its httpx2 client
        else:
            conn.http = http = recording_client(conn, headers={"Authorization": f"Bearer {KEY}"})
            transport = transport_for(conn, KEY)
        async with http, Client(transport) as client:
            version = client.session._negotiated_version  # noqa: SLF001 - no public accessor
            check(version in EXPECT["protocol_versions"], f"negotiated {version}")
            r = await client.call_tool("echo", {"message": "auto"})
            check(text_of(r) == "Echo: auto", f"echo returned {text_of(r)!r}")
        probe = next((x for x in conn.exchanges if x["rpc"] == "server/discover"), None)
        check(probe is not None, f"no server/discover probe was posted: {conn.exchanges}")
        assert probe is not None
        return f"probe answered HTTP {probe['status']}, fell back to initialize: protocol {version}"

    async def rate_limit_429(self) -> str:
        # The Python SDK surfaces a non-2xx answer whose body is a JSON-RPC error as that error
        # (it does not expose the HTTP status): the gateway's rate-limit error must arrive intact.
        if LEGACY:
            return await self._legacy_429()
        async with AsyncExitStack() as stack:
            c = await connect(stack, LIMITED_KEY, "interop-py-limited")
            assert c.session is not None
            for i in range(1, EXPECT["hammer_calls"] + 1):
                try:
                    await c.session.call_tool("echo", {"message": f"hammer {i}"})
                except MCPError as e:
                    data = e.error.data if isinstance(e.error.data, dict) else {}
                    check(
                        "retryAfterSeconds" in data,
                        f"call {i}: expected the gateway's rate-limit error, got {describe(e)}",
                    )
                    last = c.exchanges[-1] if c.exchanges else {}
                    status, retry_after = last.get("status"), last.get("retry_after")
                    check(status == 429 and retry_after, f"call {i}: HTTP {status}, Retry-After {retry_after}")
                    return f"call {i}: HTTP 429, Retry-After {retry_after}; {describe(e)}"
            raise Fail(f"{EXPECT['hammer_calls']} calls, no rate-limit error")


    async def _legacy_429(self) -> str:
        # sse_client's post_writer raises httpx2.HTTPStatusError for a refused POST and only logs
        # it ("Error in post_writer"); the caller's request is never answered, and the writer is
        # gone, so the transport sends nothing more. The SDK saw the 429 where it can: in that
        # exception; the call itself fails only by its read timeout.
        self.adapt(
            "legacy SSE, Python SDK: sse_client raises HTTPStatusError 429 in its writer and only logs it; "
            "the call fails by timeout and the transport sends nothing after it"
        )
        raised: list[BaseException] = []

        class Catch(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if record.exc_info and record.exc_info[1] is not None:
                    raised.append(record.exc_info[1])

        def status_errors(e: BaseException) -> list[httpx2.HTTPStatusError]:
            if isinstance(e, httpx2.HTTPStatusError):
                return [e]
            if isinstance(e, BaseExceptionGroup):
                return [x for sub in e.exceptions for x in status_errors(sub)]
            return []

        sse_log = logging.getLogger("mcp.client.sse")
        handler = Catch()
        sse_log.addHandler(handler)
        try:
            async with AsyncExitStack() as stack:
                c = await connect(stack, LIMITED_KEY, "interop-py-limited")
                assert c.session is not None
                for i in range(1, EXPECT["hammer_calls"] + 1):
                    try:
                        # Each answered call takes milliseconds; the bound only ends the one
                        # the SDK cannot answer.
                        await c.session.call_tool("echo", {"message": f"hammer {i}"}, read_timeout_seconds=2)
                    except MCPError as e:
                        posts = [x for x in c.exchanges if x["http"] == "POST"]
                        last = posts[-1] if posts else {}
                        status, retry_after = last.get("status"), last.get("retry_after")
                        check(
                            status == 429 and retry_after,
                            f"call {i}: HTTP {status}, Retry-After {retry_after}; SDK raised {describe(e)}",
                        )
                        seen = [x for r in raised for x in status_errors(r)]
                        check(
                            any(x.response.status_code == 429 for x in seen),
                            f"call {i}: HTTP 429 on the wire, but the SDK's writer raised no HTTPStatusError 429 "
                            f"(logged: {[describe(r) for r in raised]}); the call raised {describe(e)}",
                        )
                        return (
                            f"call {i}: HTTP 429, Retry-After {retry_after}; the SDK's writer raised "
                            f"HTTPStatusError {seen[0].response.status_code}; the call raised {describe(e)}"
                        )
                raise Fail(f"{EXPECT['hammer_calls']} calls, no rate-limit error")
        finally:
            sse_log.removeHandler(handler)


async def main() -> None:
    only = [c for c in os.environ.get("INTEROP_CASES", "").split(",") if c]
    async with anyio.create_task_group() as tg:
        cases = Cases(tg)
        for name in EXPECT["cases"] + EXPECT["extra_cases"]["py"]:
            if only and name != "initialize" and name not in only:
                continue  # initialize always runs: the other cases use its session
            fn = getattr(cases, name.replace("-", "_"))
            cases.adapted = None
            t0 = time.monotonic()
            ok = False
            detail = ""
            try:
                with anyio.fail_after(CASE_TIMEOUT_S):
                    detail = await fn()
                ok = True
            except Fail as e:
                detail = str(e)
            except BaseExceptionGroup as eg:  # a Fail raised inside an SDK task group
                fail = first_fail(eg)
                detail = str(fail) if fail else describe(eg)
                if not fail:
                    traceback.print_exc(file=sys.stderr)
            except TimeoutError:
                detail = f"timed out after {CASE_TIMEOUT_S} s"
            except BaseException as e:  # noqa: BLE001 - report whatever the SDK raised
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    raise
                detail = describe(e)
                traceback.print_exc(file=sys.stderr)
            ms = int((time.monotonic() - t0) * 1000)
            result = {"case": name, "ok": ok, "detail": f"{detail} ({ms} ms)"}
            if cases.adapted:
                result["adapted"] = cases.adapted
            print(json.dumps(result, ensure_ascii=False), flush=True)
            if name == "initialize" and not ok:
                break
        cases.done.set()


if __name__ == "__main__":
    anyio.run(main)
