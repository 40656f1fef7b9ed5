// Interop matrix driver: official MCP SDK clients -> mcp-guard -> server-everything.
//
// Run through run.sh (which installs the pinned dependencies first). Environment:
//   MCP_GUARD_BIN   the gateway binary (default: target/debug/mcp-guard from the repo root)
//   INTEROP_ONLY    optional filter, e.g. "ts/streamable-http:stdio" or "py" (substring of
//                   "client:upstream"), to run part of the matrix
//   INTEROP_CASES   optional comma-separated case names (passed to the clients)
//
// For every built (client transport x upstream transport) pair it starts what the pair needs on
// 127.0.0.1, runs one client process, and prints `PASS|FAIL client upstream case [detail]` per
// case; a case a client ran in its transport's own form (legacy SSE: no session header, no
// DELETE) carries `[adapted: how]`. Pairs whose transport is not built yet are printed once as
// `SKIP ... not built`. A FAIL listed in KNOWN_FAILURES is printed as `FAIL ... [known: reason]`
// and does not fail the run; a listed case that passes does (so the list is kept honest). Exit
// status: 0 when every failure is known, 1 otherwise.
import { spawn } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { createWriteStream, existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));
const ROOT = resolve(HERE, "..", "..");
const WORK = join(HERE, ".work");
const EXPECT = JSON.parse(readFileSync(join(HERE, "expect.json"), "utf8"));
const require = createRequire(import.meta.url);
const EVERYTHING_DIR = dirname(require.resolve("@modelcontextprotocol/server-everything/package.json"));
const GUARD = resolve(ROOT, process.env.MCP_GUARD_BIN || "target/debug/mcp-guard");
const CLIENT_TIMEOUT_MS = 90_000;
const START_TIMEOUT_MS = 20_000;

// ---------------------------------------------------------------------------------------------
// The matrix. A new transport is a new row: mark it built and give it what it needs.
// ---------------------------------------------------------------------------------------------

/** Client side: which SDK, over which client transport. */
const CLIENTS = [
  // `transport` picks the gateway endpoint (run.mjs) and the SDK transport (the client scripts,
  // through INTEROP_TRANSPORT): "streamable-http" is POST/GET/DELETE on the route's path (/mcp),
  // "sse" the legacy HTTP+SSE stream at server.sse_path (default /sse), whose `endpoint` event
  // names the /messages URL the SDK posts to.
  { id: "ts/streamable-http", built: true, transport: "streamable-http", cmd: () => [process.execPath, [join(HERE, "clients", "ts.mjs")]] },
  { id: "py/streamable-http", built: true, transport: "streamable-http", cmd: () => [pythonBin(), [join(HERE, "clients", "py_client.py")]] },
  { id: "ts/sse", built: true, transport: "sse", cmd: () => [process.execPath, [join(HERE, "clients", "ts.mjs")]] },
  { id: "py/sse", built: true, transport: "sse", cmd: () => [pythonBin(), [join(HERE, "clients", "py_client.py")]] },
];

/** Upstream side: how server-everything is run and how the gateway reaches it. */
const UPSTREAMS = [
  {
    id: "stdio",
    built: true,
    // The gateway starts server-everything itself (one shared process).
    upstreamToml: async () => [
      `transport = "stdio"`,
      `command = ${tomlStr(process.execPath)}`,
      `args = [${tomlStr(join(EVERYTHING_DIR, "dist", "index.js"))}, "stdio"]`,
    ],
  },
  {
    id: "http",
    built: true,
    upstreamToml: async () => {
      const url = await startEverythingHttp();
      return [`transport = "http"`, `url = ${tomlStr(url)}`];
    },
  },
  {
    id: "sse",
    built: true,
    // A legacy HTTP+SSE server: the gateway opens its stream at `url` and posts where the
    // stream's `endpoint` event says.
    upstreamToml: async () => {
      const url = await startEverythingSse();
      return [`transport = "sse"`, `url = ${tomlStr(url)}`];
    },
  },
];

// ---------------------------------------------------------------------------------------------

const children = new Set();
let stopping = false;

function pythonBin() {
  return join(HERE, ".venv", "bin", "python");
}

function tomlStr(s) {
  return JSON.stringify(s); // a JSON string is a valid TOML basic string
}

function keyHash(key) {
  return createHash("sha256").update(key).digest("base64");
}

/** Spawns a process in its own process group (so its children go with it), logging to a file. */
function start(name, cmd, args, opts = {}) {
  const log = createWriteStream(join(WORK, `${name}.log`));
  const child = spawn(cmd, args, {
    cwd: opts.cwd ?? WORK,
    env: { ...process.env, ...(opts.env ?? {}) },
    stdio: ["ignore", "pipe", "pipe"],
    detached: true,
  });
  children.add(child);
  child.on("exit", () => children.delete(child));
  child.stdout.pipe(log, { end: false });
  child.stderr.pipe(log, { end: false });
  return child;
}

/** Resolves with the first match of `re` in the child's output, or rejects on exit/timeout. */
function waitFor(child, re, what) {
  return new Promise((resolve_, reject) => {
    let buf = "";
    const timer = setTimeout(() => reject(new Error(`${what}: no "${re}" within ${START_TIMEOUT_MS} ms`)), START_TIMEOUT_MS);
    const onData = (d) => {
      buf += d.toString();
      const m = buf.match(re);
      if (m) {
        clearTimeout(timer);
        child.stdout.off("data", onData);
        child.stderr.off("data", onData);
        resolve_(m);
      }
    };
    child.stdout.on("data", onData);
    child.stderr.on("data", onData);
    child.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`${what} exited (${code}) before it was ready; see ${WORK}`));
    });
  });
}

function killTree(child, signal) {
  try {
    process.kill(-child.pid, signal);
  } catch {
    /* already gone */
  }
}

async function stopAll() {
  if (stopping) return;
  stopping = true;
  const list = [...children];
  for (const c of list) killTree(c, "SIGTERM");
  const deadline = Date.now() + 3000;
  while (list.some((c) => c.exitCode === null && c.signalCode === null) && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 50));
  }
  for (const c of list) if (c.exitCode === null && c.signalCode === null) killTree(c, "SIGKILL");
}

for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"]) {
  process.on(sig, async () => {
    await stopAll();
    process.exit(130);
  });
}
process.on("exit", () => {
  for (const c of children) killTree(c, "SIGKILL");
});

let everythingHttpUrl;
async function startEverythingHttp() {
  if (everythingHttpUrl) return everythingHttpUrl;
  const child = start("everything-http", process.execPath, [join(HERE, "lib", "everything.mjs"), "streamableHttp"], {
    env: { PORT: "0" },
  });
  const m = await waitFor(child, /EVERYTHING_LISTENING (http:\/\/127\.0\.0\.1:\d+\/mcp)/, "server-everything (streamableHttp)");
  everythingHttpUrl = m[1];
  return everythingHttpUrl;
}

let everythingSseUrl;
async function startEverythingSse() {
  if (everythingSseUrl) return everythingSseUrl;
  const child = start("everything-sse", process.execPath, [join(HERE, "lib", "everything.mjs"), "sse"], {
    env: { PORT: "0" },
  });
  const m = await waitFor(child, /EVERYTHING_LISTENING (http:\/\/127\.0\.0\.1:\d+\/sse)/, "server-everything (sse)");
  everythingSseUrl = m[1];
  return everythingSseUrl;
}

/** Keys: one policy-bearing key and one rate-limited key per client, so buckets never mix. */
function makeKeys(clientId) {
  const tag = clientId.replace(/[^a-z0-9]+/g, "-");
  return {
    main: { id: `${tag}-main`, key: `mcpg-interop-${randomBytes(16).toString("hex")}` },
    limited: { id: `${tag}-limited`, key: `mcpg-interop-${randomBytes(16).toString("hex")}` },
  };
}

async function startGateway(upstream, keys) {
  const name = `gateway-${upstream.id}`;
  const toml = [
    `# Written by tests/interop/run.mjs`,
    `[server]`,
    `host = "127.0.0.1"`,
    `port = 0`,
    `workers = 2`,
    `shutdown_grace_secs = 1`,
    ``,
    `[admin]`,
    `host = "127.0.0.1"`,
    `port = 0`,
    ``,
    `[upstream]`,
    ...(await upstream.upstreamToml()),
    `timeout_secs = 30`,
    ``,
    `[rate_limit]`,
    `enabled = true`,
    `requests_per_second = 1000`,
    `burst_size = 10`,
    ``,
    `[audit]`,
    `enabled = true`,
    `file = ${tomlStr(join(WORK, `${name}-audit.jsonl`))}`,
    ``,
  ];
  for (const k of keys) {
    toml.push(
      `[[auth.api_keys]]`,
      `id = ${tomlStr(k.main.id)}`,
      `key_hash = ${tomlStr(keyHash(k.main.key))}`,
      `allowed_tools = ${JSON.stringify(EXPECT.allowed_tools)}`,
      `denied_tools = ${JSON.stringify(EXPECT.denied_tools)}`,
      `denied_resources = ${JSON.stringify([EXPECT.denied_resource_uri])}`,
      `denied_prompts = ${JSON.stringify([EXPECT.denied_prompt])}`,
      ``,
      `[[auth.api_keys]]`,
      `id = ${tomlStr(k.limited.id)}`,
      `key_hash = ${tomlStr(keyHash(k.limited.key))}`,
      `rate_limit = 1`,
      ``,
    );
  }
  const cfg = join(WORK, `${name}.toml`);
  writeFileSync(cfg, toml.join("\n"));
  const child = start(name, GUARD, ["--config", cfg]);
  const m = await waitFor(child, /mcp-guard \S+ listening on http:\/\/(\S+)/, `mcp-guard (${upstream.id} upstream)`);
  return { child, base: `http://${m[1]}` };
}

function runClient(client, upstream, base, keys) {
  // sse_path is left at its default, /sse; /mcp is the default route's path.
  const url = client.transport === "sse" ? `${base}/sse` : `${base}/mcp`;
  return new Promise((resolve_) => {
    const [cmd, args] = client.cmd();
    const name = `client-${client.id.replace("/", "-")}-${upstream.id}`;
    const child = start(name, cmd, args, {
      cwd: HERE,
      env: {
        INTEROP_URL: url,
        INTEROP_TRANSPORT: client.transport,
        INTEROP_KEY: keys.main.key,
        INTEROP_LIMITED_KEY: keys.limited.key,
        INTEROP_DOCS_DIR: join(EVERYTHING_DIR, "dist", "docs"),
        INTEROP_CASES: process.env.INTEROP_CASES ?? "",
      },
    });
    const results = new Map();
    let buf = "";
    child.stdout.on("data", (d) => {
      buf += d.toString();
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, i).trim();
        buf = buf.slice(i + 1);
        if (!line.startsWith("{")) continue;
        try {
          const r = JSON.parse(line);
          results.set(r.case, r);
          report(client.id, upstream.id, r.case, r.ok, r.detail, r.adapted);
        } catch {
          /* not a result line */
        }
      }
    });
    const timer = setTimeout(() => killTree(child, "SIGKILL"), CLIENT_TIMEOUT_MS);
    child.on("close", (code, signal) => {
      clearTimeout(timer);
      resolve_({ results, code, signal, log: join(WORK, `${name}.log`) });
    });
  });
}

// ---------------------------------------------------------------------------------------------

const known = loadKnownFailures();
const tally = { pass: 0, fail: 0, knownFail: 0, unexpectedPass: 0, notBuilt: 0, adapted: 0 };
const knownSeen = new Set();

function loadKnownFailures() {
  const file = join(HERE, "KNOWN_FAILURES");
  const map = new Map();
  if (!existsSync(file)) return map;
  for (const raw of readFileSync(file, "utf8").split("\n")) {
    const line = raw.replace(/#.*/, "").trim();
    if (!line) continue;
    const [client, upstream, kase, ...why] = line.split(/\s+/);
    map.set(`${client} ${upstream} ${kase}`, why.join(" ") || "see KNOWN_FAILURES");
  }
  return map;
}

/** `adapted`: set by a client when the case checks a transport's own form of what it is about
 * (legacy SSE has no Mcp-Session-Id, no DELETE, no per-POST stream); printed before the detail
 * so that a PASS never reads as the Streamable HTTP check it is not. */
function report(client, upstream, kase, ok, detail, adapted) {
  const key = `${client} ${upstream} ${kase}`;
  const k = known.get(key);
  if (k !== undefined) knownSeen.add(key);
  let line;
  if (ok && k === undefined) {
    tally.pass++;
    line = `PASS ${key}`;
  } else if (ok) {
    tally.pass++;
    tally.unexpectedPass++;
    line = `PASS ${key} [listed in KNOWN_FAILURES but passes: remove it]`;
  } else if (k !== undefined) {
    tally.fail++;
    tally.knownFail++;
    line = `FAIL ${key} [known: ${k}]`;
  } else {
    tally.fail++;
    line = `FAIL ${key}`;
  }
  if (adapted) {
    tally.adapted++;
    line += ` [adapted: ${adapted}]`;
  }
  console.log(detail ? `${line} ${detail}` : line);
}

/** The cases a client must report: the common ones and its SDK's extras, or those named in
 * INTEROP_CASES (plus initialize, whose session the others use). */
function casesFor(client) {
  const all = [...EXPECT.cases, ...(EXPECT.extra_cases[client.id.split("/")[0]] ?? [])];
  const only = (process.env.INTEROP_CASES ?? "").split(",").filter(Boolean);
  return only.length ? all.filter((k) => k === "initialize" || only.includes(k)) : all;
}

async function main() {
  rmSync(WORK, { recursive: true, force: true });
  mkdirSync(WORK, { recursive: true });
  if (!existsSync(GUARD)) {
    console.error(`interop: no gateway binary at ${GUARD} (build it: cargo build --bin mcp-guard, or set MCP_GUARD_BIN)`);
    process.exit(2);
  }
  const filter = process.env.INTEROP_ONLY;
  const t0 = Date.now();
  for (const upstream of UPSTREAMS) {
    const pairs = CLIENTS.filter((c) => !filter || `${c.id}:${upstream.id}`.includes(filter));
    if (pairs.length === 0) continue;
    const runnable = [];
    for (const c of pairs) {
      if (!c.built || !upstream.built) {
        tally.notBuilt++;
        console.log(`SKIP ${c.id} ${upstream.id} * not built: ${!c.built ? c.why : upstream.why}`);
      } else {
        runnable.push(c);
      }
    }
    if (runnable.length === 0) continue;
    const keys = new Map(runnable.map((c) => [c.id, makeKeys(c.id)]));
    let gw;
    try {
      gw = await startGateway(upstream, [...keys.values()]);
    } catch (e) {
      for (const c of runnable) for (const kase of casesFor(c)) report(c.id, upstream.id, kase, false, `setup: ${e.message}`);
      continue;
    }
    for (const c of runnable) {
      const t = Date.now();
      const { results, code, signal, log } = await runClient(c, upstream, gw.base, keys.get(c.id));
      for (const kase of casesFor(c)) {
        if (!results.has(kase)) {
          report(c.id, upstream.id, kase, false, `not run (client exited ${signal ?? code}; see ${log})`);
        }
      }
      console.log(`     ${c.id} ${upstream.id}: ${((Date.now() - t) / 1000).toFixed(1)} s`);
    }
    killTree(gw.child, "SIGTERM");
  }
  await stopAll();
  for (const key of known.keys()) {
    if (!knownSeen.has(key) && !filter && !process.env.INTEROP_CASES) {
      console.log(`note: KNOWN_FAILURES names "${key}", which did not run`);
    }
  }
  const secs = ((Date.now() - t0) / 1000).toFixed(1);
  const extra = [
    tally.knownFail ? `${tally.knownFail} known failures` : null,
    tally.notBuilt ? `${tally.notBuilt} pairs not built` : null,
    tally.adapted ? `${tally.adapted} adapted to their transport` : null,
    tally.unexpectedPass ? `${tally.unexpectedPass} known failures now pass` : null,
  ].filter(Boolean);
  console.log(`${tally.pass} passed, ${tally.fail} failed${extra.length ? ` (${extra.join(", ")})` : ""} in ${secs} s`);
  const bad = tally.fail - tally.knownFail + tally.unexpectedPass;
  if (bad > 0) console.log(`interop: logs, configs and audit trails are in ${WORK}`);
  process.exit(bad > 0 ? 1 : 0);
}

main().catch(async (e) => {
  console.error(e);
  await stopAll();
  process.exit(1);
});
