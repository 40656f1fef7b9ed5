"""Interop: human approval through MCP elicitation (`[approval]`) with the official Python SDK.

    advanced_approval.py GATEWAY_BINARY

Starts mcp-guard (two workers) in front of an MCPServer (the SDK's FastMCP) run by this same
script as the gateway's stdio child (`--serve LOG`), with `[approval] tools = ["delete_*"]`.
The SDK's `ClientSession(..., elicitation_callback=...)` connects through the gateway and:
approves one `delete_file` call (its result arrives), declines another (a JSON-RPC error, and
the upstream never ran it), and calls a tool not listed (no elicitation at all). Prints one
line per check; exits 1 on any failed check.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import guardproc

if len(sys.argv) >= 3 and sys.argv[1] == "--serve":
    # The upstream: records each call it really runs, so the client side can tell what the
    # gateway let through.
    from mcp.server.mcpserver import MCPServer

    LOG = sys.argv[2]
    server = MCPServer("approval-upstream")

    @server.tool()
    def delete_file(path: str) -> str:
        """Deletes nothing; records that it ran."""
        with open(LOG, "a", encoding="utf-8") as f:
            f.write(path + "\n")
        return f"deleted {path}"

    @server.tool()
    def list_files() -> str:
        """Needs no approval."""
        return "a.txt b.txt"

    server.run("stdio")
    sys.exit(0)

import anyio
import mcp_types as types
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError

KEY = "mcpg-interop-approval-" + os.urandom(8).hex()
failures = 0


def check(name: str, ok: bool, detail: str = "") -> None:
    global failures
    print(f"{'PASS' if ok else 'FAIL'} approval: {name}{f' ({detail})' if detail and not ok else ''}")
    if not ok:
        failures += 1


def toml_str(s: str) -> str:
    return json.dumps(s)


def start_gateway(guard: str, work: Path, log: Path) -> tuple[subprocess.Popen, str]:
    key_hash = base64.b64encode(hashlib.sha256(KEY.encode()).digest()).decode()
    cfg = work / "guard.toml"
    cfg.write_text(
        "\n".join(
            [
                "[server]",
                'host = "127.0.0.1"',
                "port = 0",
                "workers = 2",
                "shutdown_grace_secs = 1",
                "[admin]",
                'host = "127.0.0.1"',
                "port = 0",
                "[upstream]",
                'transport = "stdio"',
                f"command = {toml_str(sys.executable)}",
                f"args = [{toml_str(str(Path(__file__).resolve()))}, \"--serve\", {toml_str(str(log))}]",
                "timeout_secs = 30",
                "[[auth.api_keys]]",
                'id = "approver"',
                f"key_hash = {toml_str(key_hash)}",
                "[approval]",
                'tools = ["delete_*"]',
                "timeout_secs = 30",
                "",
            ]
        )
    )
    child, addr, _ = guardproc.launch(guard, str(cfg))
    return child, f"http://{addr}/mcp"


async def client(url: str, log: Path) -> None:
    asked: list[str] = []

    async def on_elicit(context, params):
        message = getattr(params, "message", "")
        asked.append(message)
        if "decline-me" in message:
            return types.ElicitResult(action="decline")
        return types.ElicitResult(action="accept", content={"approve": True})

    http = create_mcp_http_client(headers={"Authorization": f"Bearer {KEY}"})
    async with http, streamable_http_client(url, http_client=http) as (read, write):
        async with ClientSession(read, write, elicitation_callback=on_elicit) as session:
            with anyio.fail_after(30):
                await session.initialize()
                result = await session.call_tool("delete_file", {"path": "/srv/approve-me"})
                text = "".join(c.text for c in result.content if isinstance(c, types.TextContent))
                check("an approved call's result arrives", text == "deleted /srv/approve-me", text)
                check(
                    "the person was shown the tool and its arguments",
                    len(asked) == 1 and "delete_file" in asked[0] and "/srv/approve-me" in asked[0],
                    repr(asked),
                )
                try:
                    r = await session.call_tool("delete_file", {"path": "/srv/decline-me"})
                    check("a declined call is refused", False, f"got a result: {r}")
                except MCPError as e:
                    data = e.error.data or {}
                    check(
                        "a declined call is refused with a JSON-RPC error",
                        e.code == -32003 and data.get("reason") == "approval_declined",
                        f"{e.code} {e.message} {data}",
                    )
                before = len(asked)
                r = await session.call_tool("list_files", {})
                text = "".join(c.text for c in r.content if isinstance(c, types.TextContent))
                check("a tool not listed runs without asking", text == "a.txt b.txt" and len(asked) == before, text)
    ran = log.read_text(encoding="utf-8").split() if log.exists() else []
    check("the upstream ran the approved call", "/srv/approve-me" in ran, repr(ran))
    check("the upstream never saw the declined call", "/srv/decline-me" not in ran, repr(ran))


def main() -> int:
    if len(sys.argv) < 2:
        print("usage: advanced_approval.py GATEWAY_BINARY", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        log = work / "upstream-ran.log"
        gateway, url = start_gateway(sys.argv[1], work, log)
        try:
            anyio.run(client, url, log)
        except Exception as e:  # a transport failure is a failed check, not a traceback only
            check("the session ran to the end", False, f"{type(e).__name__}: {e}")
        finally:
            gateway.terminate()
            try:
                gateway.wait(5)
            except subprocess.TimeoutExpired:
                gateway.kill()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
