#!/usr/bin/env python3
"""Interop: the tools/list filter (one strict scan, kept tools copied as the upstream's bytes)
seen by the official Python SDK.

    advanced_filterperf.py GATEWAY_BINARY

An MCPServer (the SDK's FastMCP; this script with --server, a stdio child of the gateway) lists
100 tools, some with non-ASCII descriptions, quotes and newlines, and nested schemas holding a
`name` property; a tool's result is a 4 KiB text full of escapes. The SDK's ClientSession lists
and calls them through the gateway as a caller allowed only `read_*` (deny `read_secret*`).
Every check prints one line; exit 1 when any fails.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from contextlib import AsyncExitStack
from pathlib import Path

import guardproc

KEY = "interop-filterperf-key-0123456789"
TOOLS = 100


def description(i: int) -> str:
    return f'Tool n\u00b0{i}: reads "things" \u2014 line one\nline two \\ end'


def file_text() -> str:
    lines = []
    while sum(len(x) + 1 for x in lines) < 4096:
        n = len(lines)
        lines.append(f'{n:04}: let v = cfg.get("key_{n}").unwrap_or("\u00e9\\t");')
    return "\n".join(lines)


def run_server() -> None:
    from mcp.server.mcpserver import MCPServer

    app = MCPServer("filterperf-interop")

    def make(i: int, name: str) -> None:
        def tool(path: str, name: str = "x") -> str:
            return file_text() if i == 0 else f"{name} {path}"

        app.add_tool(tool, name=name, description=description(i))

    for i in range(TOOLS):
        kind = "read" if i % 3 == 0 else "write"
        make(i, f"{kind}_{i}")
    make(TOOLS, "read_secret_key")
    app.run()


def key_hash(key: str) -> str:
    return base64.b64encode(hashlib.sha256(key.encode()).digest()).decode()


def start_gateway(binary: str, workdir: str) -> tuple[subprocess.Popen[str], str]:
    config = os.path.join(workdir, "guard.toml")
    with open(config, "w") as f:
        f.write(
            "[server]\nhost = \"127.0.0.1\"\nport = 0\nworkers = 1\n\n[admin]\nport = 0\n\n"
            "[upstream]\ntransport = \"stdio\"\n"
            f"command = {json.dumps(sys.executable)}\n"
            f"args = [{json.dumps(str(Path(__file__).resolve()))}, \"--server\"]\n"
            "timeout_secs = 20\n\n[rate_limit]\nenabled = false\n\n"
            "[[auth.api_keys]]\nid = \"reader\"\n"
            f"key_hash = \"{key_hash(KEY)}\"\n"
            "allowed_tools = [\"read_*\"]\ndenied_tools = [\"read_secret*\"]\n"
        )
    proc, addr, _ = guardproc.launch(binary, config)
    return proc, f"http://{addr}/mcp"


failures = 0


def check(name: str, ok: bool, detail: str = "") -> None:
    global failures
    if not ok:
        failures += 1
    print(f"{'PASS' if ok else 'FAIL'}: filterperf: {name}{'' if ok or not detail else ' (' + detail + ')'}", flush=True)


async def client(url: str) -> None:
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(create_mcp_http_client(headers={"Authorization": f"Bearer {KEY}"}))
        read, write = await stack.enter_async_context(streamable_http_client(url, http_client=http))
        session = await stack.enter_async_context(ClientSession(read, write))
        await session.initialize()

        listed = await session.list_tools()
        names = [t.name for t in listed.tools]
        expected = [f"read_{i}" for i in range(0, TOOLS, 3)]
        check("the list holds exactly the permitted tools, in order", names == expected, str(names[:5]))
        check("a denied tool matching the allow glob is gone", "read_secret_key" not in names)
        by_name = {t.name: t for t in listed.tools}
        t3 = by_name.get("read_3")
        check(
            "a kept tool's description survives byte for byte (non-ASCII, quotes, newline, backslash)",
            t3 is not None and t3.description == description(3),
            repr(t3.description if t3 else None),
        )
        schema = (t3.input_schema if t3 else {}) or {}
        check(
            "a nested schema property called `name` is kept inside its tool",
            "name" in (schema.get("properties") or {}),
            json.dumps(schema),
        )

        result = await session.call_tool("read_0", {"path": "/srv/a"})
        text = "".join(getattr(c, "text", "") for c in result.content)
        check("a 4 KiB result full of escapes reaches the restricted caller intact", text == file_text(), text[:80])

        from mcp.shared.exceptions import MCPError

        try:
            refused = await session.call_tool("write_1", {"path": "/srv/a"})
            check("a tool the list hides is refused when called", bool(refused.is_error), str(refused))
        except MCPError as e:
            check("a tool the list hides is refused when called", True, str(e))


def main() -> None:
    if "--server" in sys.argv:
        run_server()
        return
    if len(sys.argv) < 2:
        raise SystemExit("usage: advanced_filterperf.py GATEWAY_BINARY")
    with tempfile.TemporaryDirectory() as workdir:
        proc, url = start_gateway(sys.argv[1], workdir)
        try:
            asyncio.run(asyncio.wait_for(client(url), 60))
        except Exception as e:  # a failed exchange is a failed check, with its reason
            check("the SDK session completes", False, repr(e))
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
