// The official TypeScript SDK client (@modelcontextprotocol/sdk) through mcp-guard.
//
// Usage: node clients/ts.mjs   (everything comes from the environment, set by run.mjs)
//   INTEROP_URL          the gateway's MCP endpoint (http://127.0.0.1:PORT/mcp)
//   INTEROP_KEY          API key whose policy hides and denies some tools (see run.mjs)
//   INTEROP_LIMITED_KEY  API key with a tiny rate limit
//   INTEROP_DOCS_DIR     server-everything's docs directory (the static resources' content)
//   INTEROP_CASES        optional comma-separated case names to run
//
// Prints one JSON line per case on stdout: {"case": NAME, "ok": BOOL, "detail": TEXT}.
// Diagnostics go to stderr. The expectations live in expect.json, shared with the Python client.
import { readFileSync } from "node:fs";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import {
  StreamableHTTPClientTransport,
  StreamableHTTPError,
} from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { LoggingMessageNotificationSchema, McpError } from "@modelcontextprotocol/sdk/types.js";

const here = dirname(fileURLToPath(import.meta.url));
const EXPECT = JSON.parse(readFileSync(join(here, "..", "expect.json"), "utf8"));
const URL_ = new URL(process.env.INTEROP_URL);
const KEY = process.env.INTEROP_KEY;
const LIMITED_KEY = process.env.INTEROP_LIMITED_KEY;
const DOCS_DIR = process.env.INTEROP_DOCS_DIR;
const CASE_TIMEOUT_MS = 20_000;

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
      : `${e?.constructor?.name ?? "Error"}: ${e?.message ?? e}`;

/** A client connected through the gateway; records every message it sends and receives. */
async function connect(key, name = "interop-ts", sessionId = undefined) {
  // Every HTTP exchange: {http, rpc, status, type, retryAfter} (rpc: the JSON-RPC method posted).
  const exchanges = [];
  const transport = new StreamableHTTPClientTransport(URL_, {
    requestInit: { headers: { Authorization: `Bearer ${key}` } },
    sessionId, // set: the SDK resumes that session instead of initializing
    fetch: async (url, init) => {
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
        status: res.status,
        type: res.headers.get("content-type"),
        retryAfter: res.headers.get("retry-after"),
      });
      return res;
    },
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

const cases = {
  async initialize() {
    main = await connect(KEY);
    const info = main.client.getServerVersion();
    check(info?.name === EXPECT.server_name, `serverInfo.name = ${info?.name}`);
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
    const r = await main.client.callTool(
      { name: "trigger-long-running-operation", arguments: { duration: EXPECT.progress_duration, steps } },
      undefined,
      { onprogress: (p) => seen.push(p.progress), timeout: 15_000 },
    );
    check(textOf(r).includes(`Steps: ${steps}.`), `result ${JSON.stringify(textOf(r))}`);
    const post = main.exchanges.slice(before).find((x) => x.rpc === "tools/call");
    const want = Array.from({ length: steps }, (_, i) => i + 1).join(",");
    check(
      seen.join(",") === want,
      `the SDK's progress callback saw [${seen}], want [${want}] (progress arriving after the result is dropped); POST answered ${post?.type}`,
    );
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
      await a.transport.terminateSession().catch(() => {});
      await b.transport.terminateSession().catch(() => {});
      await a.client.close();
      await b.client.close();
    }
  },

  async "session-delete"() {
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

async function main_() {
  const only = (process.env.INTEROP_CASES ?? "").split(",").filter(Boolean);
  for (const name of [...EXPECT.cases, ...EXPECT.extra_cases.ts]) {
    if (only.length && name !== "initialize" && !only.includes(name)) continue; // the others need it
    const fn = cases[name] ?? (async () => { throw new Fail("no such case in clients/ts.mjs"); });
    let ok = false;
    let detail;
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
    console.log(JSON.stringify({ case: name, ok, detail: `${detail ?? ""} (${ms} ms)` }));
    if (name === "initialize" && !ok) break; // nothing else can run without a session
  }
  if (main) {
    await main.transport.terminateSession().catch(() => {});
    await main.client.close();
  }
}

await main_();
process.exit(0);
