// OAuth interop: the official TypeScript SDK's client authorization (`@modelcontextprotocol/sdk`
// client/auth.js, driven by StreamableHTTPClientTransport with an OAuthClientProvider) against
// mcp-guard as the authorization server, in front of a fake GitHub on 127.0.0.1.
//
// The SDK does discovery itself (401 -> protected-resource metadata -> authorization-server
// metadata), registers, builds the PKCE authorization URL and redeems the code; this script
// plays only the person in the browser (opens the URL, allows on the consent page, lets the
// fake GitHub sign in) and hands the code back, as an application would.
//
//   MCP_GUARD_BIN=target/debug/mcp-guard node tests/interop/oauth.mjs
//
// Needs the gateway and the demo server built (cargo build). Exit status 0 when every step
// passed. Prints `PASS|FAIL ts/oauth <case> [detail]` lines, like run.mjs.
import { createServer } from "node:http";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { freePort, startGateway as launch } from "./lib/gateway.mjs";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { UnauthorizedError } from "@modelcontextprotocol/sdk/client/auth.js";

const HERE = dirname(fileURLToPath(import.meta.url));
const ROOT = resolve(HERE, "..", "..");
const GUARD = resolve(ROOT, process.env.MCP_GUARD_BIN || "target/debug/mcp-guard");
const DEMO = join(dirname(GUARD), "mcp-demo-server");
const GH_CLIENT = "gh-interop-client";
const GH_SECRET = "gh-interop-secret";

const children = [];
let failed = 0;
function report(ok, name, detail = "") {
  if (!ok) failed++;
  console.log(`${ok ? "PASS" : "FAIL"} ts/oauth ${name}${detail ? " " + detail : ""}`);
}

/** A fake GitHub: authorize signs the user in at once; token and /user answer as GitHub does. */
function fakeGithub() {
  const codes = new Set();
  const server = createServer((req, res) => {
    const url = new URL(req.url, "http://x");
    let body = "";
    req.on("data", (d) => (body += d));
    req.on("end", () => {
      if (req.method === "GET" && url.pathname === "/login/oauth/authorize") {
        const code = `ghcode-${codes.size}`;
        codes.add(code);
        const back = new URL(url.searchParams.get("redirect_uri"));
        back.searchParams.set("code", code);
        back.searchParams.set("state", url.searchParams.get("state"));
        res.writeHead(302, { location: back.toString() }).end();
      } else if (req.method === "POST" && url.pathname === "/login/oauth/access_token") {
        const form = new URLSearchParams(body);
        const ok = codes.has(form.get("code")) && form.get("client_id") === GH_CLIENT && form.get("client_secret") === GH_SECRET;
        res.writeHead(200, { "content-type": "application/json" });
        res.end(JSON.stringify(ok ? { access_token: "gho_interop", token_type: "bearer" } : { error: "bad_verification_code" }));
      } else if (req.method === "GET" && url.pathname === "/user") {
        const ok = req.headers.authorization === "Bearer gho_interop";
        res.writeHead(ok ? 200 : 401, { "content-type": "application/json" });
        res.end(ok ? JSON.stringify({ id: 777, login: "interop" }) : "{}");
      } else {
        res.writeHead(404).end();
      }
    });
  });
  return new Promise((ok) => server.listen(0, "127.0.0.1", () => ok(server)));
}


/** Starts the gateway with `config`; resolves once it listens. */
async function startGateway(config, dir) {
  const child = await launch(GUARD, config, join(dir, "guard.toml"));
  children.push(child);
  return child;
}

/** The person in the browser: opens the authorization URL, allows, and follows redirects
 * until the browser lands on the client's redirect URI; returns that URL. */
async function browse(authorizationUrl, redirectUri) {
  const page = await fetch(authorizationUrl, { redirect: "manual" });
  const html = await page.text();
  if (page.status !== 200) throw new Error(`consent page: ${page.status} ${html}`);
  const ticket = /name="ticket" value="([^"]+)"/.exec(html)?.[1];
  if (!ticket) throw new Error("no consent form");
  const origin = new URL(authorizationUrl).origin;
  let r = await fetch(new URL("/oauth/authorize", origin), {
    method: "POST",
    redirect: "manual",
    headers: { origin, "content-type": "application/x-www-form-urlencoded" },
    body: new URLSearchParams({ ticket, decision: "allow" }),
  });
  // A browser keeps the gateway's sign-in cookie (set with the approval) and sends it back to
  // the gateway's callback: the sign-in is bound to the browser that approved it.
  const setCookies = r.headers.getSetCookie?.() ?? [r.headers.get("set-cookie")].filter(Boolean);
  const cookies = setCookies.map((c) => c.split(";")[0]);
  for (let hops = 0; hops < 5; hops++) {
    const location = r.headers.get("location");
    if (r.status !== 302 || !location) throw new Error(`expected a redirect, got ${r.status}: ${await r.text()}`);
    if (location.startsWith(redirectUri)) return new URL(location);
    const toGateway = new URL(location).origin === origin;
    r = await fetch(location, {
      redirect: "manual",
      headers: toGateway && cookies.length ? { cookie: cookies.join("; ") } : {},
    });
  }
  throw new Error("too many redirects");
}

/** An OAuthClientProvider that keeps everything in memory and "opens" URLs with `browse`. */
class Provider {
  constructor(redirectUri) {
    this.redirectUri = redirectUri;
    this.landed = null;
    this.saved = {};
  }
  get redirectUrl() { return this.redirectUri; }
  get clientMetadata() {
    return { client_name: "mcp-guard interop", redirect_uris: [this.redirectUri], grant_types: ["authorization_code", "refresh_token"], response_types: ["code"], token_endpoint_auth_method: "none" };
  }
  state() { return "interop-state-" + Math.random().toString(36).slice(2); }
  clientInformation() { return this.saved.client; }
  saveClientInformation(c) { this.saved.client = c; }
  tokens() { return this.saved.tokens; }
  saveTokens(t) { this.saved.tokens = t; }
  saveCodeVerifier(v) { this.saved.verifier = v; }
  codeVerifier() { return this.saved.verifier; }
  async redirectToAuthorization(url) {
    this.authorizationUrl = url;
    this.landed = await browse(url.toString(), this.redirectUri);
  }
}

async function main() {
  const dir = mkdtempSync(join(tmpdir(), "mcp-guard-oauth-"));
  try {
    const gh = await fakeGithub();
    children.push({ kill: () => gh.close() });
    const ghBase = `http://127.0.0.1:${gh.address().port}`;
    const port = await freePort();
    const base = `http://127.0.0.1:${port}`;
    await startGateway(
      [
        `[server]`, `port = ${port}`, `workers = 2`, `public_url = "${base}"`,
        `[upstream]`, `transport = "stdio"`, `command = ${JSON.stringify(DEMO)}`,
        `[auth.oauth]`, `provider = "github"`, `client_id = "${GH_CLIENT}"`, `client_secret = "${GH_SECRET}"`,
        `authorization_url = "${ghBase}/login/oauth/authorize"`,
        `token_url = "${ghBase}/login/oauth/access_token"`,
        `userinfo_url = "${ghBase}/user"`,
        `[auth.oauth.scope_tool_mapping]`, `"mcp:echo" = ["echo"]`, `"mcp:all" = ["*"]`,
        ``,
      ].join("\n"),
      dir,
    );
    const provider = new Provider("http://127.0.0.1:1/oauth/callback");
    const serverUrl = new URL(`${base}/mcp`);
    // 1. The first connection meets the 401; the SDK discovers, registers and sends the
    // person to authorize; the connection fails with UnauthorizedError until the code is in.
    let transport = new StreamableHTTPClientTransport(serverUrl, { authProvider: provider });
    let client = new Client({ name: "mcp-guard-oauth-interop", version: "1" });
    try {
      await client.connect(transport);
      report(false, "unauthorized-first", "connected without a token");
    } catch (e) {
      report(e instanceof UnauthorizedError && provider.landed !== null, "unauthorized-first", String(e?.message ?? e));
    }
    const auth = provider.authorizationUrl;
    report(
      !!auth && auth.searchParams.get("code_challenge_method") === "S256" && auth.searchParams.get("resource") === serverUrl.toString(),
      "authorization-request",
      auth ? `resource=${auth.searchParams.get("resource")} scope=${auth.searchParams.get("scope")}` : "none",
    );
    report(!!provider.saved.client?.client_id, "registered", provider.saved.client?.client_id ? "" : "no client id");
    const code = provider.landed?.searchParams.get("code");
    report(!!code && provider.landed.searchParams.get("iss") === base, "code-delivered", provider.landed ? "" : "never landed");
    // 2. The application hands the code to the SDK, which redeems it (PKCE, resource).
    await transport.finishAuth(code);
    report(!!provider.saved.tokens?.access_token && !!provider.saved.tokens?.refresh_token, "tokens");
    // 3. A new connection with the token: MCP works, within the scopes granted.
    transport = new StreamableHTTPClientTransport(serverUrl, { authProvider: provider });
    client = new Client({ name: "mcp-guard-oauth-interop", version: "1" });
    await client.connect(transport);
    const echoed = await client.callTool({ name: "echo", arguments: { text: "through the facade" } });
    report(echoed?.content?.[0]?.text === "through the facade", "call", JSON.stringify(echoed?.content ?? null));
    const tools = await client.listTools();
    report(tools.tools.length > 0, "list-tools", `${tools.tools.length} tools`);
    await client.close();
  } catch (e) {
    report(false, "run", String(e?.stack ?? e));
  } finally {
    for (const c of children) {
      try { c.kill(); } catch {}
    }
    rmSync(dir, { recursive: true, force: true });
  }
  console.log(failed ? `${failed} failed` : "all passed");
  process.exit(failed ? 1 : 0);
}

main();
