// OAuth interop against a third-party authorization server: `oauth2-mock-server` (npm, runs
// offline on 127.0.0.1) issues RS256 JWT access tokens; mcp-guard is only the resource server
// (`authorization_servers` names the mock), finds the mock's keys through its OpenID discovery
// document, and checks every token's issuer, signature and audience (this endpoint's resource
// URI). The official TypeScript SDK's client authorization drives the whole flow the MCP spec
// describes: 401 -> protected-resource metadata -> the mock's metadata -> authorize with PKCE
// (S256) and `resource` -> token -> call. Then what must be refused is: a token minted for
// another resource, a token from another issuer, and the same through introspection.
//
//   MCP_GUARD_BIN=target/debug/mcp-guard node tests/interop/oauth_third_party.mjs
//
// A client-credentials token without a subject is refused (the gateway needs a user id), so the
// mock's tokens get one. Exit status 0 when every step passed; prints `PASS|FAIL ts/oauth-as <case> [detail]` lines.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { freePort, startGateway as launch } from "./lib/gateway.mjs";
import { OAuth2Server } from "oauth2-mock-server";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { UnauthorizedError } from "@modelcontextprotocol/sdk/client/auth.js";

const HERE = dirname(fileURLToPath(import.meta.url));
const ROOT = resolve(HERE, "..", "..");
const GUARD = resolve(ROOT, process.env.MCP_GUARD_BIN || "target/debug/mcp-guard");
const DEMO = join(dirname(GUARD), "mcp-demo-server");
const CLIENT_ID = "interop-client";

const children = [];
let failed = 0;
function report(ok, name, detail = "") {
  if (!ok) failed++;
  console.log(`${ok ? "PASS" : "FAIL"} ts/oauth-as ${name}${detail ? " " + detail : ""}`);
}


/** Starts the gateway with `config`; resolves once it listens. */
async function startGateway(config, dir, name) {
  const child = await launch(GUARD, config, join(dir, `${name}.toml`));
  children.push(child);
  return child;
}

function gatewayConfig(port, issuer, extra = "") {
  return [
    `[server]`, `port = ${port}`, `workers = 2`, `public_url = "http://127.0.0.1:${port}"`,
    `[admin]`, `enabled = false`,
    `[upstream]`, `transport = "stdio"`, `command = ${JSON.stringify(DEMO)}`,
    `[auth.oauth]`, `provider = "custom"`, `client_id = "mcp-guard"`,
    `authorization_servers = ["${issuer}"]`, extra, ``,
  ].join("\n");
}

/** An OAuthClientProvider for a client registered out of band (the mock has no registration
 * endpoint); "opening" the authorization URL is following the mock's immediate redirect. */
class Provider {
  constructor(redirectUri) {
    this.redirectUri = redirectUri;
    this.saved = { client: { client_id: CLIENT_ID } };
  }
  get redirectUrl() { return this.redirectUri; }
  get clientMetadata() {
    return { client_name: "mcp-guard interop", redirect_uris: [this.redirectUri], grant_types: ["authorization_code"], response_types: ["code"], token_endpoint_auth_method: "none" };
  }
  clientInformation() { return this.saved.client; }
  saveClientInformation(c) { this.saved.client = c; }
  tokens() { return this.saved.tokens; }
  saveTokens(t) { this.saved.tokens = t; }
  saveCodeVerifier(v) { this.saved.verifier = v; }
  codeVerifier() { return this.saved.verifier; }
  async redirectToAuthorization(url) {
    this.authorizationUrl = url;
    const r = await fetch(url, { redirect: "manual" });
    this.landed = new URL(r.headers.get("location"));
  }
}

async function mcpStatus(url, token) {
  const r = await fetch(url, {
    method: "POST",
    headers: {
      "content-type": "application/json",
      accept: "application/json, text/event-stream",
      ...(token ? { authorization: `Bearer ${token}` } : {}),
    },
    body: JSON.stringify({ jsonrpc: "2.0", id: 1, method: "initialize", params: { protocolVersion: "2025-11-25", capabilities: {}, clientInfo: { name: "x", version: "1" } } }),
  });
  await r.text();
  return r;
}

async function main() {
  const dir = mkdtempSync(join(tmpdir(), "mcp-guard-oauth-as-"));
  try {
    const as = new OAuth2Server();
    await as.issuer.keys.generate("RS256");
    await as.start(0, "127.0.0.1");
    children.push({ kill: () => as.stop() });
    const issuer = as.issuer.url;
    // The access token names the resource the client asked for (RFC 8707), as a real server
    // configured for resource indicators does; `aud_override` lets a test mint a wrong one.
    let audOverride = null;
    as.service.on("beforeTokenSigning", (token, req) => {
      const resource = audOverride ?? req.body?.resource;
      if (resource) token.payload.aud = resource;
      // A client-credentials token names no user; the gateway needs one (`user_id_claim`).
      token.payload.sub ??= "interop-service";
    });

    const port = await freePort();
    const base = `http://127.0.0.1:${port}`;
    await startGateway(gatewayConfig(port, issuer), dir, "jwt");
    const serverUrl = new URL(`${base}/mcp`);

    // Discovery as a client sees it.
    const first = await mcpStatus(serverUrl);
    const challenge = first.headers.get("www-authenticate") ?? "";
    report(first.status === 401 && challenge.includes(`resource_metadata="${base}/.well-known/oauth-protected-resource/mcp"`), "challenge", challenge);
    const prm = await (await fetch(`${base}/.well-known/oauth-protected-resource/mcp`)).json();
    report(prm.resource === serverUrl.toString() && prm.authorization_servers?.[0] === issuer, "resource-metadata", JSON.stringify(prm));

    // The SDK's flow against the third-party server.
    const provider = new Provider("http://127.0.0.1:1/callback");
    let transport = new StreamableHTTPClientTransport(serverUrl, { authProvider: provider });
    let client = new Client({ name: "mcp-guard-oauth-as-interop", version: "1" });
    try {
      await client.connect(transport);
      report(false, "unauthorized-first", "connected without a token");
    } catch (e) {
      report(e instanceof UnauthorizedError && !!provider.landed, "unauthorized-first", String(e?.message ?? e));
    }
    const auth = provider.authorizationUrl;
    report(
      !!auth && auth.origin === new URL(issuer).origin && auth.searchParams.get("code_challenge_method") === "S256" && auth.searchParams.get("resource") === serverUrl.toString(),
      "authorization-request",
      auth ? auth.toString() : "none",
    );
    await transport.finishAuth(provider.landed.searchParams.get("code"));
    report(!!provider.saved.tokens?.access_token, "token");
    transport = new StreamableHTTPClientTransport(serverUrl, { authProvider: provider });
    client = new Client({ name: "mcp-guard-oauth-as-interop", version: "1" });
    await client.connect(transport);
    const echoed = await client.callTool({ name: "echo", arguments: { text: "third party" } });
    report(echoed?.content?.[0]?.text === "third party", "call", JSON.stringify(echoed?.content ?? null));
    await client.close();

    // What must be refused: a token for another resource, one from another issuer.
    const mint = async (aud) => {
      audOverride = aud;
      const r = await fetch(`${issuer}/token`, {
        method: "POST",
        headers: { "content-type": "application/x-www-form-urlencoded" },
        body: new URLSearchParams({ grant_type: "client_credentials", client_id: CLIENT_ID, scope: "mcp" }),
      });
      audOverride = null;
      return (await r.json()).access_token;
    };
    const good = await mint(serverUrl.toString());
    report((await mcpStatus(serverUrl, good)).status === 200, "client-credentials-token");
    const elsewhere = await mint("https://other.example.com/mcp");
    const refused = await mcpStatus(serverUrl, elsewhere);
    report(refused.status === 401 && (refused.headers.get("www-authenticate") ?? "").includes('error="invalid_token"'), "other-resource-refused", String(refused.status));
    const other = new OAuth2Server();
    await other.issuer.keys.generate("RS256");
    await other.start(0, "127.0.0.1");
    children.push({ kill: () => other.stop() });
    other.service.on("beforeTokenSigning", (token) => { token.payload.aud = serverUrl.toString(); });
    const foreign = (await (await fetch(`${other.issuer.url}/token`, {
      method: "POST",
      headers: { "content-type": "application/x-www-form-urlencoded" },
      body: new URLSearchParams({ grant_type: "client_credentials", client_id: CLIENT_ID }),
    })).json()).access_token;
    report((await mcpStatus(serverUrl, foreign)).status === 401, "other-issuer-refused");

    // Introspection (RFC 7662) at the same server: active answers for this resource pass,
    // an answer for another resource or an inactive one does not.
    let introspected = { active: true, sub: "alice", aud: serverUrl.toString(), exp: Math.floor(Date.now() / 1000) + 300 };
    let sawClientAuth = false;
    as.service.on("beforeIntrospect", (response, req) => {
      sawClientAuth ||= (req.headers.authorization ?? "").startsWith("Basic ");
      response.body = introspected;
    });
    const port2 = await freePort();
    const base2 = `http://127.0.0.1:${port2}`;
    await startGateway(
      gatewayConfig(port2, issuer, `client_secret = "s3cret"\nintrospection_url = "${issuer}/introspect"`).replace(`http://127.0.0.1:${port}`, base2),
      dir,
      "introspect",
    );
    introspected = { ...introspected, aud: `${base2}/mcp` };
    report((await mcpStatus(`${base2}/mcp`, "opaque-token-1")).status === 200 && sawClientAuth, "introspection-active");
    introspected = { ...introspected, aud: "https://other.example.com/mcp" };
    report((await mcpStatus(`${base2}/mcp`, "opaque-token-2")).status === 401, "introspection-other-resource-refused");
    introspected = { active: false };
    report((await mcpStatus(`${base2}/mcp`, "opaque-token-3")).status === 401, "introspection-inactive-refused");
  } catch (e) {
    report(false, "flow", String(e?.stack ?? e));
  } finally {
    for (const c of children) {
      try { c.kill(); } catch {}
    }
    rmSync(dir, { recursive: true, force: true });
  }
  process.exit(failed ? 1 : 0);
}

main();
