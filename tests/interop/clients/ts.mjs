// The official TypeScript SDK client (@modelcontextprotocol/sdk) through mcp-guard.
//
// Usage: node clients/ts.mjs   (everything comes from the environment, set by run.mjs)
//   INTEROP_URL          the gateway's MCP endpoint (http://127.0.0.1:PORT/mcp), or its legacy
//                        SSE stream (http://127.0.0.1:PORT/sse) when INTEROP_TRANSPORT=sse
//   INTEROP_TRANSPORT    "streamable-http" (default: StreamableHTTPClientTransport) or "sse"
//                        (SSEClientTransport, the 2024-11-05 HTTP+SSE transport)
//   INTEROP_KEY          API key whose policy hides and denies some tools (see run.mjs)
//   INTEROP_LIMITED_KEY  API key with a tiny rate limit
//   INTEROP_DOCS_DIR     server-everything's docs directory (the static resources' content)
//   INTEROP_CASES        optional comma-separated case names to run
//
// Prints one JSON line per case on stdout: {"case": NAME, "ok": BOOL, "detail": TEXT}, plus
// "adapted": HOW when the case checks the legacy transport's own form of what it is about.
// Diagnostics go to stderr. The expectations live in expect.json, shared with the Python client.
import { readFileSync } from "node:fs";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import {
  StreamableHTTPClientTransport,
  StreamableHTTPError,
} from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { SSEClientTransport, SseError } from "@modelcontextprotocol/sdk/client/sse.js";
import { LoggingMessageNotificationSchema, McpError } from "@modelcontextprotocol/sdk/types.js";

const here = dirname(fileURLToPath(import.meta.url));
const EXPECT = JSON.parse(readFileSync(join(here, "..", "expect.json"), "utf8"));
const URL_ = new URL(process.env.INTEROP_URL);
const KEY = process.env.INTEROP_KEY;
const LIMITED_KEY = process.env.INTEROP_LIMITED_KEY;
const DOCS_DIR = process.env.INTEROP_DOCS_DIR;
const CASE_TIMEOUT_MS = 20_000;
const LEGACY = (process.env.INTEROP_TRANSPORT || "streamable-http") === "sse";

class Fail extends Error {}
function check(cond, msg) {
  if (!cond) throw new Fail(msg);
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const textOf = (result) =>
  (result.content ?? []).filter((c) => c.type === "text").map((c) => c.text).join("");
const describeError = (e) =>
  e instanceof McpError
    ? `McpError ${e.code}: ${e.message}`
    : e instanceof StreamableHTTPError
      ? `StreamableHTTPError ${e.code}: ${e.message}`
      : e instanceof SseError
        ? `SseError ${e.code}: ${e.message}`
        : `${e?.constructor?.name ?? "Error"}: ${e?.message ?? e}`;

/** A client connected through the gateway; records every message it sends and receives. */
async function connect(key, name = "interop-ts", sessionId = undefined) {
  // Every HTTP exchange: {http, rpc, url, status, type, retryAfter, protocolVersion} (rpc: the
  // JSON-RPC method posted; protocolVersion: the mcp-protocol-version header the SDK sent).
  const exchanges = [];
  const recordingFetch = async (url, init) => {
    const res = await fetch(url, init);
    let rpc;
    try {
      rpc = JSON.parse(init?.body ?? "null")?.method;
    } catch {
      /* not JSON */
    }
    exchanges.push({
      http: init?.method ?? "GET",
      rpc,
      url: String(url),
      status: res.status,
      type: res.headers.get("content-type"),
      retryAfter: res.headers.get("retry-after"),
      protocolVersion: new Headers(init?.headers).get("mcp-protocol-version"),
    });
    return res;
  };
  const auth = { headers: { Authorization: `Bearer ${key}` } };
  // SSEClientTransport puts requestInit's headers on the stream's GET (its EventSource fetch
  // builds them from requestInit) and on every POST; `fetch` serves both, so both are recorded.
  // eventSourceInit is not needed: its own fetch, if given, would bypass the recording one.
  const transport = LEGACY
    ? new SSEClientTransport(URL_, { requestInit: auth, fetch: recordingFetch })
    : new StreamableHTTPClientTransport(URL_, {
        requestInit: auth,
        sessionId, // set: the SDK resumes that session instead of initializing
        fetch: recordingFetch,
      });
  const client = new Client({ name, version: "1.0.0" }, { capabilities: {} });
  const sent = [];
  const received = [];
  const origSend = transport.send.bind(transport);
  transport.send = (msg, opts) => {
    sent.push(msg);
    return origSend(msg, opts);
  };
  await client.connect(transport);
  // Protocol.connect installed its own onmessage; wrap it to record what arrives.
  const origOnMessage = transport.onmessage;
  transport.onmessage = (msg, extra) => {
    received.push(msg);
    origOnMessage?.(msg, extra);
  };
  return { client, transport, sent, received, exchanges };
}

/** The legacy session's messages URL: where the SDK posts (the gateway's `endpoint` event). */
function endpointOf(c) {
  const url = c.exchanges.find((x) => x.http === "POST")?.url;
  return url ? new URL(url) : undefined;
}

/** Ends a session: DELETE for Streamable HTTP; a legacy session ends with its stream, which
 * closing the client closes. */
async function endSession(c) {
  if (!LEGACY) await c.transport.terminateSession().catch(() => {});
  await c.client.close();
}

/** Expects `fn` to be refused by the gateway; returns the error's description. */
async function expectError(fn, what) {
  let result;
  try {
    result = await fn();
  } catch (e) {
    if (e instanceof Fail) throw e;
    return describeError(e);
  }
  throw new Fail(`${what}: expected an error, got a result ${JSON.stringify(result).slice(0, 200)}`);
}

let main; // the session most cases share
let adapted; // how the running case departs from its Streamable HTTP form (see adapt)

/** Marks the running case as checking the legacy transport's own form of what it is about; the
 * runner prints `[adapted: how]`, on a FAIL as well as a PASS. */
function adapt(how) {
  adapted = how;
}

const cases = {
  async initialize() {
    main = await connect(KEY);
    const info = main.client.getServerVersion();
    check(info?.name === EXPECT.server_name, `serverInfo.name = ${info?.name}`);
    if (LEGACY) {
      // No Mcp-Session-Id on this transport: the session is the endpoint event's sessionId, and
      // the negotiated version is what the SDK sends on its POSTs after initialize.
      adapt("legacy SSE has no Mcp-Session-Id: the session id is the endpoint event's sessionId");
      const ep = endpointOf(main);
      const sid = ep?.searchParams.get("sessionId");
      check(ep?.pathname === "/messages" && sid, `the SDK posts to ${ep} (want /messages?sessionId=...)`);
      const pv = main.exchanges.findLast((x) => x.protocolVersion)?.protocolVersion;
      check(EXPECT.protocol_versions.includes(pv), `protocol version ${pv}`);
      return `server ${info.name} ${info.version}, protocol ${pv}, endpoint ${ep.pathname}?sessionId=<${sid.length} chars>`;
    }
    check(main.transport.sessionId, "no Mcp-Session-Id from the gateway");
    const pv = main.transport.protocolVersion;
    check(EXPECT.protocol_versions.includes(pv), `protocol version ${pv}`);
    return `server ${info.name} ${info.version}, protocol ${pv}`;
  },

  async "tools-list-filtered"() {
    const { tools } = await main.client.listTools();
    const names = tools.map((t) => t.name).sort();
    const want = [...EXPECT.visible_tools].sort();
    check(
      JSON.stringify(names) === JSON.stringify(want),
      `got [${names}], want [${want}]`,
    );
    return `${names.length} tools visible (hidden: ${EXPECT.hidden_tools.join(", ")})`;
  },

  async "tools-call-allowed"() {
    const msg = EXPECT.echo_message;
    const r = await main.client.callTool({ name: "echo", arguments: { message: msg } });
    check(!r.isError, `isError: ${JSON.stringify(r)}`);
    check(textOf(r) === `Echo: ${msg}`, `echo returned ${JSON.stringify(textOf(r))}`);
    return JSON.stringify(textOf(r));
  },

  async "tools-call-denied"() {
    const out = [];
    for (const name of EXPECT.denied_tool_calls) {
      const err = await expectError(
        () => main.client.callTool({ name, arguments: {} }),
        `tools/call ${name}`,
      );
      check(err.includes(name), `${name}: the error does not name the tool: ${err}`);
      out.push(`${name} -> ${err}`);
    }
    return out.join("; ");
  },

  async resources() {
    const { resources } = await main.client.listResources();
    const uris = resources.map((r) => r.uri);
    check(uris.includes(EXPECT.resource_uri), `${EXPECT.resource_uri} not listed`);
    const r = await main.client.readResource({ uri: EXPECT.resource_uri });
    const want = readFileSync(join(DOCS_DIR, EXPECT.resource_file), "utf8");
    check(r.contents?.[0]?.text === want, "read text differs from the file");
    const d = await main.client.readResource({ uri: EXPECT.dynamic_resource_uri });
    check(
      d.contents?.[0]?.text?.startsWith(EXPECT.dynamic_resource_prefix),
      `dynamic resource: ${JSON.stringify(d.contents?.[0]?.text)}`,
    );
    return `${uris.length} listed, read ${EXPECT.resource_file} (${want.length} chars) and ${EXPECT.dynamic_resource_uri}`;
  },

  async prompts() {
    const { prompts } = await main.client.listPrompts();
    const names = prompts.map((p) => p.name);
    for (const n of EXPECT.listed_prompts) check(names.includes(n), `${n} not listed: [${names}]`);
    const r = await main.client.getPrompt({ name: "args-prompt", arguments: { city: "Paris" } });
    const text = r.messages?.[0]?.content?.text;
    check(text === EXPECT.args_prompt_text, `args-prompt gave ${JSON.stringify(text)}`);
    return `[${names}]; args-prompt -> ${JSON.stringify(text)}`;
  },

  async "resource-prompt-denied"() {
    const a = await expectError(
      () => main.client.readResource({ uri: EXPECT.denied_resource_uri }),
      `resources/read ${EXPECT.denied_resource_uri}`,
    );
    const b = await expectError(
      () => main.client.getPrompt({ name: EXPECT.denied_prompt, arguments: {} }),
      `prompts/get ${EXPECT.denied_prompt}`,
    );
    return `resource -> ${a}; prompt -> ${b}`;
  },

  async notification() {
    // server-everything answers resources/subscribe with a logging notification
    // ("Received Subscribe Resource request for URI: ..."), tied to no request: it travels on the
    // session's standalone stream (GET), which the SDK opened after initialize.
    const want = `${EXPECT.subscribe_log_prefix}${EXPECT.resource_uri}`;
    const got = [];
    let resolve;
    const arrived = new Promise((r) => (resolve = r));
    main.client.setNotificationHandler(LoggingMessageNotificationSchema, (n) => {
      got.push(n.params);
      if (String(n.params.data).includes(want)) resolve(n.params);
    });
    await main.client.setLoggingLevel("debug");
    await main.client.subscribeResource({ uri: EXPECT.resource_uri });
    const timer = sleep(5000).then(() => null);
    const n = await Promise.race([arrived, timer]);
    check(n, `no notifications/message containing ${JSON.stringify(want)} within 5 s (got ${JSON.stringify(got)})`);
    await main.client.unsubscribeResource({ uri: EXPECT.resource_uri });
    return `notifications/message level=${n.level}: ${JSON.stringify(n.data)}`;
  },

  async "progress-in-order"() {
    // The SDK forgets a request's progress handler when its result arrives, so progress must
    // arrive before the result. Guaranteed only when the server answers the POST with an SSE
    // stream carrying the progress, then the result (the spec: request-related messages SHOULD
    // go on that stream, not the standalone GET stream, which races the POST's answer).
    const steps = EXPECT.progress_steps[0];
    const seen = [];
    const before = main.exchanges.length;
    const receivedBefore = main.received.length;
    const r = await main.client.callTool(
      { name: "trigger-long-running-operation", arguments: { duration: EXPECT.progress_duration, steps } },
      undefined,
      { onprogress: (p) => seen.push(p.progress), timeout: 15_000 },
    );
    check(textOf(r).includes(`Steps: ${steps}.`), `result ${JSON.stringify(textOf(r))}`);
    const post = main.exchanges.slice(before).find((x) => x.rpc === "tools/call");
    const want = Array.from({ length: steps }, (_, i) => i + 1).join(",");
    // What the transport delivered for this call, in order: the progress and the result.
    const call = main.sent.findLast((m) => m.method === "tools/call");
    const delivered = () =>
      main.received
        .slice(receivedBefore)
        .filter((m) => m.method === "notifications/progress" || (m.id === call?.id && !m.method))
        .map((m) => (m.method ? `progress ${m.params.progress}` : "result"))
        .join(", ");
    const inOrder = [...want.split(",").map((n) => `progress ${n}`), "result"].join(", ");
    if (LEGACY) {
      // One stream carries every answer, so the order the transport delivered is the order the
      // gateway wrote; the POST only acknowledges. The order is checked where the transport
      // hands messages to the SDK, not at the callback: the SDK handles a notification in a
      // microtask but a response at once, and the EventSource dispatches every event of one
      // network read in one go, so a progress read together with its result reaches no callback
      // (an SDK race: straight to server-everything over SSE it loses the last step every time).
      adapt(
        "legacy SSE answers on its one stream, not on the POST: checks the transport delivered every progress before the result (the TS SDK's callback drops a progress read in the same chunk as the result, with or without the gateway)",
      );
      check(post?.status === 202, `tools/call POST answered HTTP ${post?.status}, want 202`);
      check(delivered() === inOrder, `the transport delivered: ${delivered()}; want ${inOrder}`);
      const lost = seen.join(",") === want ? "" : ` (${steps - seen.length} dropped by that SDK race)`;
      return `POST answered 202; delivered ${delivered()}; the SDK's progress callback saw [${seen}]${lost}`;
    }
    if (seen.join(",") !== want) {
      await sleep(300); // late progress, to tell one written after the result from one lost
      throw new Fail(
        `the SDK's progress callback saw [${seen}], want [${want}] (progress arriving after the result is dropped); POST answered ${post?.type}; delivered: ${delivered()}`,
      );
    }
    check(
      post?.type?.startsWith("text/event-stream"),
      `tools/call answered with ${post?.type}: its progress went on the standalone GET stream, unordered with the result (all ${steps} arrived in time this run)`,
    );
    return `POST answered ${post.type}; progress [${seen}] before the result`;
  },

  async "progress-two-clients"() {
    // Two fresh sessions issue the same request sequence, so the SDK gives both calls the same
    // progressToken (it uses the request id). Different step counts tell their progress apart.
    const a = await connect(KEY, "interop-ts-a");
    const b = await connect(KEY, "interop-ts-b");
    try {
      const run = async (c, steps) => {
        const seen = [];
        const r = await c.client.callTool(
          { name: "trigger-long-running-operation", arguments: { duration: EXPECT.progress_duration, steps } },
          undefined,
          { onprogress: (p) => seen.push(p), timeout: 15_000 },
        );
        return { r, seen };
      };
      const [ra, rb] = await Promise.all([run(a, EXPECT.progress_steps[0]), run(b, EXPECT.progress_steps[1])]);
      const token = (c) =>
        c.sent.find((m) => m.method === "tools/call")?.params?._meta?.progressToken;
      const ta = token(a);
      const tb = token(b);
      check(ta !== undefined && ta === tb, `progress tokens differ: ${ta} vs ${tb}`);
      // Isolation only: whether progress arrives before the result is progress-in-order's
      // business, so late notifications count here (wait for them, bounded).
      const wire = (c) => c.received.filter((m) => m.method === "notifications/progress");
      const deadline = Date.now() + 2000;
      while (
        (wire(a).length < EXPECT.progress_steps[0] || wire(b).length < EXPECT.progress_steps[1]) &&
        Date.now() < deadline
      ) {
        await sleep(20);
      }
      await sleep(100); // anything foreign arriving just behind
      const verify = (label, c, res, steps) => {
        const w = wire(c);
        check(
          w.every((m) => m.params.progressToken === ta && m.params.total === steps),
          `${label}: foreign progress ${JSON.stringify(w.map((m) => m.params))}`,
        );
        const prog = w.map((m) => m.params.progress).join(",");
        const want = Array.from({ length: steps }, (_, i) => i + 1).join(",");
        check(prog === want, `${label}: progress ${prog}, want ${want}`);
        check(
          textOf(res.r).includes(`Steps: ${steps}.`),
          `${label}: result ${JSON.stringify(textOf(res.r))}`,
        );
        return `${label} got ${steps}/${steps}`;
      };
      return [
        `token ${JSON.stringify(ta)} on both`,
        verify("A", a, ra, EXPECT.progress_steps[0]),
        verify("B", b, rb, EXPECT.progress_steps[1]),
      ].join(", ");
    } finally {
      await endSession(a);
      await endSession(b);
    }
  },

  async "session-delete"() {
    if (LEGACY) return legacySessionEnd();
    // DELETE ends the session (the SDK's terminateSession throws on any status but 2xx and
    // 405); the same session id presented again is unknown: 404, which the SDK surfaces.
    const c = await connect(KEY, "interop-ts-delete");
    const sid = c.transport.sessionId;
    await c.client.callTool({ name: "echo", arguments: { message: "before delete" } });
    await c.transport.terminateSession();
    const del = c.exchanges.at(-1)?.status;
    check(del === 200 || del === 204, `DELETE answered ${del}`);
    await c.client.close();
    const again = await connect(KEY, "interop-ts-delete-again", sid);
    try {
      const err = await expectError(() => again.client.listTools(), "tools/list on a deleted session");
      const st = again.exchanges.at(-1)?.status;
      check(st === 404, `request on the deleted session answered HTTP ${st}: ${err}`);
      return `DELETE ${del}; then HTTP 404: ${err.slice(0, 160)}`;
    } finally {
      await again.client.close();
    }
  },

  async "rate-limit-429"() {
    const c = await connect(LIMITED_KEY, "interop-ts-limited");
    try {
      for (let i = 1; i <= EXPECT.hammer_calls; i++) {
        try {
          await c.client.callTool({ name: "echo", arguments: { message: `hammer ${i}` } });
        } catch (e) {
          if (LEGACY) return legacy429(c, i, e);
          check(
            e instanceof StreamableHTTPError && e.code === 429,
            `call ${i}: expected StreamableHTTPError 429, got ${describeError(e)}`,
          );
          const last = c.exchanges.at(-1);
          check(
            last?.status === 429 && last.retryAfter,
            `call ${i}: HTTP ${last?.status}, Retry-After ${last?.retryAfter}`,
          );
          return `call ${i}: HTTP 429, Retry-After ${last.retryAfter}; ${describeError(e).slice(0, 240)}`;
        }
      }
      throw new Fail(`${EXPECT.hammer_calls} calls, no 429`);
    } finally {
      await c.client.close();
    }
  },
};

/** session-delete on legacy SSE: there is no DELETE and no session id to resume with; the
 * session ends when its stream closes, after which its messages URL must be unknown (404). */
async function legacySessionEnd() {
  adapt(
    "legacy SSE has no DELETE and no session resumption: the session ends with its stream, and its messages URL then gets 404 (a plain POST: the SDK cannot reuse a session)",
  );
  const c = await connect(KEY, "interop-ts-delete");
  await c.client.callTool({ name: "echo", arguments: { message: "before the stream closes" } });
  const ep = endpointOf(c);
  check(ep, "the SDK posted nowhere");
  await c.client.close(); // closes the EventSource: the gateway sees the stream's socket end
  // The gateway learns of the close when the socket reads EOF, a moment later: retry briefly.
  // A POST that still lands is a harmless ping whose answer goes to a closed stream.
  const t0 = Date.now();
  let status;
  let body;
  for (let tries = 1; ; tries++) {
    const res = await fetch(ep, {
      method: "POST",
      headers: { Authorization: `Bearer ${KEY}`, "content-type": "application/json" },
      body: JSON.stringify({ jsonrpc: "2.0", id: 1, method: "ping" }),
    });
    status = res.status;
    body = await res.text();
    if (status === 404 || Date.now() - t0 > 2000) break;
    await sleep(50);
  }
  check(status === 404, `POST to the closed session's ${ep.pathname} answered HTTP ${status}: ${body.slice(0, 200)}`);
  return `stream closed by the SDK; POST to its /messages?sessionId= then: HTTP 404 after ${Date.now() - t0} ms: ${body.slice(0, 120)}`;
}

/** rate-limit-429 on legacy SSE: the POST is answered 429 and SSEClientTransport.send throws
 * (a plain Error naming the status), which the SDK's request rejects with. */
function legacy429(c, i, e) {
  adapt("legacy SSE: the 429 is the POST's status, and the SDK's send throws a plain Error (StreamableHTTPError is the other transport's)");
  check(
    !(e instanceof McpError) && /HTTP 429/.test(e?.message ?? ""),
    `call ${i}: expected the SDK's "Error POSTing to endpoint (HTTP 429)", got ${describeError(e)}`,
  );
  const last = c.exchanges.findLast((x) => x.http === "POST");
  check(last?.status === 429 && last.retryAfter, `call ${i}: HTTP ${last?.status}, Retry-After ${last?.retryAfter}`);
  return `call ${i}: HTTP 429, Retry-After ${last.retryAfter}; ${describeError(e).slice(0, 240)}`;
}

async function main_() {
  const only = (process.env.INTEROP_CASES ?? "").split(",").filter(Boolean);
  for (const name of [...EXPECT.cases, ...EXPECT.extra_cases.ts]) {
    if (only.length && name !== "initialize" && !only.includes(name)) continue; // the others need it
    const fn = cases[name] ?? (async () => { throw new Fail("no such case in clients/ts.mjs"); });
    let ok = false;
    let detail;
    adapted = undefined;
    const t0 = Date.now();
    try {
      let timer;
      const timeout = new Promise((_, rej) => {
        timer = setTimeout(() => rej(new Fail(`timed out after ${CASE_TIMEOUT_MS / 1000} s`)), CASE_TIMEOUT_MS);
      });
      try {
        detail = await Promise.race([fn(), timeout]);
      } finally {
        clearTimeout(timer);
      }
      ok = true;
    } catch (e) {
      detail = e instanceof Fail ? e.message : describeError(e);
      if (!(e instanceof Fail)) console.error(e);
    }
    const ms = Date.now() - t0;
    console.log(JSON.stringify({ case: name, ok, detail: `${detail ?? ""} (${ms} ms)`, ...(adapted ? { adapted } : {}) }));
    if (name === "initialize" && !ok) break; // nothing else can run without a session
  }
  if (main) await endSession(main);
}

await main_();
process.exit(0);
