"""Argument constraints, shadow policies and head decisions through mcp-guard, with the official
Python SDK (`mcp` on PyPI) on both sides.

    advanced_rules.py GATEWAY_BINARY

The upstream is an SDK `MCPServer` with `read_file` and `delete_file`, run by the gateway as
its stdio child (this script with `--server LOG`); it appends every call it receives to LOG,
so a refused call can be shown never to have reached it. The client is `ClientSession` over
`streamable_http_client`, which sends `Mcp-Method` / `Mcp-Name` on its POSTs. Prints one line
per check; exits 1 if any failed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import guardproc

import anyio
import mcp_types as types
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError

KEY = "interop-rules-key-5d2e"
SHADOW_KEY = "interop-rules-shadow-key-81c3"


def serve(log: str) -> None:
    from mcp.server.mcpserver import MCPServer

    server = MCPServer("files")

    def record(line: str) -> None:
        with open(log, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    @server.tool()
    def read_file(path: str, limit: int = 10) -> str:
        """Reads a file (pretends to)."""
        record(f"read_file {path} {limit}")
        return f"contents of {path}"

    # A name that cannot travel as plain header text: the SDK sends it as `=?base64?…?=`.
    @server.prompt(name="résumé")
    def resume() -> str:
        """A prompt with a non-ASCII name."""
        record("prompt résumé")
        return "résumé prompt text"

    @server.tool()
    def delete_file(path: str) -> str:
        """Deletes a file (pretends to)."""
        record(f"delete_file {path}")
        return f"deleted {path}"

    server.run("stdio")


def key_hash(key: str) -> str:
    return base64.b64encode(hashlib.sha256(key.encode()).digest()).decode()


def config(log: str, audit: str) -> str:
    return f"""
[server]
host = "127.0.0.1"
port = 0
workers = 1
[admin]
port = 0
[upstream]
transport = "stdio"
command = {json.dumps(sys.executable)}
args = [{json.dumps(str(Path(__file__).resolve()))}, "--server", {json.dumps(log)}]
timeout_secs = 20
[rate_limit]
enabled = false
[audit]
file = {json.dumps(audit)}

[[auth.api_keys]]
id = "alice"
key_hash = "{key_hash(KEY)}"
denied_tools = ["delete_file"]

[[auth.api_keys]]
id = "trial"
key_hash = "{key_hash(SHADOW_KEY)}"
denied_tools = ["delete_file"]
policy_mode = "shadow"

[[tool_rules]]
tool = "read_file"
[[tool_rules.args]]
pointer = "/path"
required = true
path_under = ["/srv/data"]
[[tool_rules.args]]
pointer = "/limit"
type = "integer"
max = 100
"""


def start_gateway(binary: str, cfg_path: str) -> tuple[subprocess.Popen[str], str]:
    proc, addr, _ = guardproc.launch(binary, cfg_path)
    return proc, addr


results: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    results.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail and not ok else ''}", flush=True)


def upstream_saw(log: str, needle: str) -> bool:
    try:
        return needle in Path(log).read_text(encoding="utf-8")
    except FileNotFoundError:
        return False


async def session(stack: AsyncExitStack, url: str, key: str) -> ClientSession:
    http = await stack.enter_async_context(create_mcp_http_client(headers={"Authorization": f"Bearer {key}"}))
    read, write = await stack.enter_async_context(streamable_http_client(url, http_client=http))
    s = await stack.enter_async_context(
        ClientSession(read, write, client_info=types.Implementation(name="interop-rules", version="1"))
    )
    await s.initialize()
    return s


async def refused(coro: Any) -> MCPError | None:
    try:
        await coro
    except MCPError as e:
        return e
    return None


def text_of(result: types.CallToolResult) -> str:
    return "".join(c.text for c in result.content if isinstance(c, types.TextContent))


async def run(url: str, log: str, audit: str) -> None:
    async with AsyncExitStack() as stack:
        s = await session(stack, url, KEY)
        r = await s.call_tool("read_file", {"path": "/srv/data/report.md", "limit": 5})
        check("allowed path reaches the server", "contents of /srv/data/report.md" in text_of(r), text_of(r))

        for path in [
            "/srv/data/../../etc/passwd",
            "/srv/data/%2e%2e/secret",
            "/srv/database/x",
            # Parent or network readings of other consumers (not plain): a leading //, a
            # Tomcat `;` parameter, a Windows trailing dot, a zero-width space between dots.
            "//srv/data/unc-marker",
            "/srv/data/..;/tomcat-marker",
            "/srv/data/.../windows-marker",
            "/srv/data/.\u200b./zw-marker",
        ]:
            e = await refused(s.call_tool("read_file", {"path": path}))
            data = (e.error.data or {}) if e else {}
            check(
                f"path {path!r} refused naming the argument",
                e is not None and e.code == -32003 and data.get("pointer") == "/path"
                and data.get("check") == "path_under",
                str(e),
            )
            check(f"path {path!r} never reached the server", not upstream_saw(log, path))

        e = await refused(s.call_tool("read_file", {"path": "/srv/data/a", "limit": 1000}))
        check("limit over max refused", e is not None and (e.error.data or {}).get("check") == "max", str(e))

        # A denied call: where the SDK names the tool in Mcp-Name (the revisions that define
        # the header), decided on the head (403, id null, which the SDK hands to this call);
        # otherwise on the body. Either way the same error code, and the server never sees it.
        e = await refused(s.call_tool("delete_file", {"path": "/srv/data/a"}))
        check("denied tool refused", e is not None and e.code == -32003, str(e))

        # The head decision as the SDK's transport meets it: a POST whose Mcp-Method / Mcp-Name
        # name the denied tool, sent through the SDK's own HTTP client (no session id: the
        # decision comes before the session is looked at).
        http = await stack.enter_async_context(create_mcp_http_client(headers={"Authorization": f"Bearer {KEY}"}))
        body = {"jsonrpc": "2.0", "id": 77, "method": "tools/call",
                "params": {"name": "delete_file", "arguments": {"path": "/srv/data/b"}}}
        resp = await http.post(
            url,
            json=body,
            headers={"Accept": "application/json, text/event-stream", "Mcp-Method": "tools/call",
                     "Mcp-Name": "delete_file", "MCP-Protocol-Version": "2025-11-25"},
        )
        answer = resp.json() if resp.headers.get("content-type", "").startswith("application/json") else {}
        check(
            "denied tool named on the head refused before its body (403, id null)",
            resp.status_code == 403 and answer.get("id") is None
            and (answer.get("error") or {}).get("data", {}).get("decidedOn") == "headers",
            f"{resp.status_code} {answer}",
        )
        check("denied call never reached the server", not upstream_saw(log, "delete_file"))
        r = await s.call_tool("read_file", {"path": "/srv/data/after.md"})
        check("session still serves after a head refusal", "after.md" in text_of(r), text_of(r))

        # A non-ASCII name: the SDK's Mcp-Name is the base64 sentinel, decoded and compared
        # with the body's name (it used to be refused as a mismatch).
        p = await s.get_prompt("résumé")
        shown = "".join(m.content.text for m in p.messages if isinstance(m.content, types.TextContent))
        check("a prompt named in base64 on the head is served", "résumé prompt text" in shown, shown)

        def b64(name: str) -> str:
            return "=?base64?" + base64.b64encode(name.encode()).decode() + "?="

        for name, want, label in [
            (b64("delete_file"), 403, "denied tool named in base64 refused on the head"),
            ("=?base64?ZGVsZXRlX2ZpbGU?=", 400, "malformed base64 Mcp-Name refused (400)"),
        ]:
            resp = await http.post(
                url,
                json=body,
                headers={"Accept": "application/json, text/event-stream", "Mcp-Method": "tools/call",
                         "Mcp-Name": name, "MCP-Protocol-Version": "2025-11-25"},
            )
            check(label, resp.status_code == want, f"{resp.status_code} {resp.text[:200]}")
        check("base64-named denied calls never reached the server", not upstream_saw(log, "delete_file"))

        trial = await session(stack, url, SHADOW_KEY)
        tools = await trial.list_tools()
        names = sorted(t.name for t in tools.tools)
        check("shadow identity sees the unfiltered list", names == ["delete_file", "read_file"], str(names))
        r = await trial.call_tool("delete_file", {"path": "/srv/data/shadow"})
        check("shadow identity's denied call goes through", "deleted /srv/data/shadow" in text_of(r), text_of(r))
        plain = await s.list_tools()
        check(
            "enforced identity's list is filtered",
            [t.name for t in plain.tools] == ["read_file"],
            str([t.name for t in plain.tools]),
        )

    deadline = time.time() + 5
    lines: list[dict[str, Any]] = []
    while time.time() < deadline:
        try:
            # Only lines already ended: the gateway may be writing the last one right now.
            text = Path(audit).read_bytes().decode("utf-8", errors="replace")
            lines = [json.loads(x) for x in text.split("\n")[:-1] if x]
        except FileNotFoundError:
            lines = []
        if any(x.get("decision") == "would_deny" for x in lines) and any(
            x.get("reason") == "argument_refused" for x in lines
        ):
            break
        time.sleep(0.1)
    check(
        "audit records would_deny for the shadow identity",
        any(x.get("decision") == "would_deny" and x.get("identity") == "trial" for x in lines),
    )
    check(
        "audit records argument_refused with the pointer",
        any(x.get("reason") == "argument_refused" and (x.get("details") or {}).get("pointer") == "/path" for x in lines),
    )


async def bounded(url: str, log: str, audit: str) -> None:
    with anyio.fail_after(60):
        await run(url, log, audit)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--server":
        serve(sys.argv[2])
        return 0
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        log, audit = os.path.join(tmp, "upstream.log"), os.path.join(tmp, "audit.jsonl")
        cfg = os.path.join(tmp, "guard.toml")
        Path(cfg).write_text(config(log, audit), encoding="utf-8")
        proc, addr = start_gateway(sys.argv[1], cfg)
        try:
            anyio.run(bounded, f"http://{addr}/mcp", log, audit)
        except Exception as e:  # noqa: BLE001 - any failure is a failed check, printed
            check("run", False, f"{type(e).__name__}: {e}")
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
    failed = [n for n, ok, _ in results if not ok]
    print(f"advanced_rules: {len(results) - len(failed)}/{len(results)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
