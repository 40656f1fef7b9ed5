#!/usr/bin/env bash
# Interop suite entry point: the official MCP SDK clients (TypeScript and Python) connect through
# mcp-guard to the reference server @modelcontextprotocol/server-everything.
#
#   tests/interop/run.sh [GATEWAY_BINARY]     (default: $MCP_GUARD_BIN, else target/debug/mcp-guard)
#
# Builds nothing: build the gateway first (cargo build --bin mcp-guard). Installs the pinned
# dependencies when missing or stale: npm ci (package-lock.json) into tests/interop/node_modules,
# pip install -r requirements.txt into tests/interop/.venv. Needs node >= 18, npm, python3 with venv.
# Filters: INTEROP_ONLY=py (or ts/streamable-http:http ...), INTEROP_CASES=initialize,notification.
# INTEROP_INSTALL_ONLY=1: install the dependencies and stop (tests/otel.rs decodes with the
# venv's opentelemetry-proto; .ci/run installs it before the Rust tests).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bin="${1:-${MCP_GUARD_BIN:-target/debug/mcp-guard}}"
case "$bin" in /*) ;; *) bin="$root/$bin" ;; esac
if [ -z "${INTEROP_INSTALL_ONLY:-}" ] && [ ! -x "$bin" ]; then
  echo "interop: no gateway binary at $bin (cargo build --bin mcp-guard)" >&2
  exit 2
fi
for tool in node npm python3; do
  command -v "$tool" >/dev/null 2>&1 || { echo "interop: $tool not found" >&2; exit 2; }
done
cd "$here"

# Dependencies: reinstalled only when the pinned lists change (a copy of each is kept beside
# what it installed).
if ! cmp -s package-lock.json node_modules/.interop-lock 2>/dev/null; then
  echo "interop: npm ci"
  timeout 300 npm ci --no-audit --no-fund --loglevel=error
  cp package-lock.json node_modules/.interop-lock
fi
if ! cmp -s requirements.txt .venv/.interop-requirements 2>/dev/null; then
  echo "interop: pip install -r requirements.txt"
  rm -rf .venv
  python3 -m venv .venv
  timeout 300 .venv/bin/pip install --quiet --disable-pip-version-check --no-input -r requirements.txt
  cp requirements.txt .venv/.interop-requirements
fi
[ -n "${INTEROP_INSTALL_ONLY:-}" ] && exit 0

# run.mjs stops what it started (gateways, servers, clients: each in its own process group) on
# exit and on signals; this trap forwards ours to it.
node_pid=
trap '[ -n "$node_pid" ] && kill -TERM "$node_pid" 2>/dev/null; wait' INT TERM
MCP_GUARD_BIN="$bin" timeout 170 node run.mjs &
node_pid=$!
wait "$node_pid"

# OAuth: the TypeScript SDK's client authorization against mcp-guard as the authorization
# server, in front of a fake GitHub (needs the demo server beside the gateway binary).
echo "interop: OAuth discovery and the authorization-server facade"
MCP_GUARD_BIN="$bin" timeout 60 node oauth.mjs &
node_pid=$!
wait "$node_pid"

# OAuth against a third-party authorization server (oauth2-mock-server, offline on loopback):
# mcp-guard as the resource server only, the SDK's flow end to end, tokens for another resource
# or from another issuer refused, and introspection.
echo "interop: OAuth against a third-party authorization server"
MCP_GUARD_BIN="$bin" timeout 60 node oauth_third_party.mjs &
node_pid=$!
wait "$node_pid"

# Human approval through elicitation: the Python SDK's elicitation callback approves one call and
# declines another through the gateway, in front of an MCPServer (FastMCP) as its stdio child.
echo "interop: approval through elicitation (Python SDK)"
timeout 90 .venv/bin/python advanced_approval.py "$bin"
# Tool-definition pinning: the Python SDK lists tools through the gateway while a FastMCP
# (MCPServer) upstream rewrites one; the next list no longer shows it until it is approved.
echo "interop: tool-definition pinning (Python SDK)"
timeout 120 .venv/bin/python advanced_pinning.py "$bin"
# Secret redaction (issue 13): an MCPServer tool returns a fake AWS key and GitHub token; the
# Python SDK's result through the gateway holds the markers, never the secrets.
echo "interop: secret redaction"
timeout 120 .venv/bin/python advanced_redaction.py "$bin"
# Argument constraints, shadow policies and head decisions: the Python SDK's ClientSession
# through the gateway to an SDK MCPServer as its stdio child.
echo "interop: argument constraints, shadow policies, decisions on the head"
timeout 90 .venv/bin/python advanced_rules.py "$bin"
# The tools/list filter on one strict scan (issue 12): the Python SDK lists 100 tools through the
# gateway as a restricted caller and sees exactly the permitted ones, byte for byte.
echo "interop: the tools/list filter (Python SDK)"
timeout 90 .venv/bin/python advanced_filterperf.py "$bin"
