#!/usr/bin/env python3
"""Interop: secret redaction through mcp-guard, seen by the official Python SDK.

    advanced_redaction.py GATEWAY_BINARY

An MCPServer (the SDK's FastMCP, renamed in mcp 2; this script with --server, a stdio child of the gateway) has tools whose
results hold a fake AWS access key and a fake GitHub token, as text and as structured content;
the SDK's ClientSession calls them through the gateway with [redaction] on. Every check prints
one line; exit 1 when any fails.
"""

import asyncio
import os
import subprocess
import sys
import tempfile

import guardproc

# Fake credentials of the shapes the detectors know (AWS's documented example key id).
AWS = "AKIAIOSFODNN7EXAMPLE"
GITHUB = "ghp_" + "0123456789abcdefghijABCDEFGHIJ012345"


def run_server():
    from mcp.server.mcpserver import MCPServer

    app = MCPServer("redaction-interop")

    @app.tool()
    def read_env() -> str:
        """Returns a .env file's lines."""
        return f"AWS_ACCESS_KEY_ID={AWS}\nGITHUB_TOKEN={GITHUB}\nREGION=eu-west-1\n"

    from pydantic import BaseModel

    class Settings(BaseModel):
        tokens: list[list[str]]
        key_id: str
        region: str

    @app.tool()
    def read_settings() -> Settings:
        """Returns settings as structured content (secrets inside nested arrays)."""
        return Settings(tokens=[["ci", GITHUB]], key_id=AWS, region="eu-west-1")

    app.run()


failures = 0


def check(name, ok, detail=""):
    global failures
    if not ok:
        failures += 1
    print(f"{'PASS' if ok else 'FAIL'}: redaction: {name}{'' if ok or not detail else ' (' + detail + ')'}")


def start_gateway(binary, workdir):
    config = os.path.join(workdir, "guard.toml")
    with open(config, "w") as f:
        f.write(
            "[server]\nport = 0\nworkers = 1\n\n[admin]\nport = 0\n\n"
            "[upstream]\ntransport = \"stdio\"\n"
            f"command = {sys.executable!r}\nargs = [{os.path.abspath(__file__)!r}, \"--server\"]\n"
            "timeout_secs = 20\n\n"
            "[rate_limit]\nenabled = false\n\n"
            "[redaction]\nenabled = true\n"
        )
    proc, addr, logs = guardproc.launch(binary, config)
    return proc, f"http://{addr}/mcp", logs


async def client(url):
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async with streamable_http_client(url) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()

            result = await session.call_tool("read_env", {})
            text = "".join(getattr(c, "text", "") for c in result.content)
            dump = result.model_dump_json()
            check("the AWS key never reaches the SDK (text)", AWS not in dump, text)
            check("the GitHub token never reaches the SDK (text)", GITHUB not in dump, text)
            check("the AWS key's place holds its marker", "[REDACTED:aws_access_key]" in text, text)
            check("the GitHub token's place holds its marker", "[REDACTED:github_token]" in text, text)
            check("the rest of the text is untouched", "REGION=eu-west-1" in text, text)

            result = await session.call_tool("read_settings", {})
            dump = result.model_dump_json()
            check("no secret in structured content or its text form", AWS not in dump and GITHUB not in dump, dump)
            structured = result.structured_content or {}
            check(
                "structured content keeps its shape with markers",
                structured.get("region") == "eu-west-1"
                and structured.get("tokens") == [["ci", "[REDACTED:github_token]"]]
                and structured.get("key_id") == "[REDACTED:aws_access_key]",
                str(structured),
            )


def main():
    if "--server" in sys.argv:
        run_server()
        return
    if len(sys.argv) < 2:
        raise SystemExit("usage: advanced_redaction.py GATEWAY_BINARY")
    with tempfile.TemporaryDirectory() as workdir:
        proc, url, logs = start_gateway(sys.argv[1], workdir)
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
        joined = "\n".join(logs)
        check("the gateway's logs hold no secret", AWS not in joined and GITHUB not in joined)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
