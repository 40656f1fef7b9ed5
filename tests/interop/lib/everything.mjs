// Starts @modelcontextprotocol/server-everything over HTTP, bound to 127.0.0.1:
//   node lib/everything.mjs streamableHttp   # Streamable HTTP at /mcp
//   node lib/everything.mjs sse              # legacy HTTP+SSE: GET /sse, POST /message
//
// The package's HTTP entries call `app.listen(process.env.PORT || 3001)`, which binds every
// interface and has no host option. This wrapper pins the host to loopback (patching
// http.Server#listen before the entry is imported), takes PORT=0 for a free port, and prints
// `EVERYTHING_LISTENING http://127.0.0.1:PORT/<path>` once bound so the runner can read the port.
import http from "node:http";
import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";

const ENTRIES = { streamableHttp: "/mcp", sse: "/sse" };
const transport = process.argv[2];
if (!(transport in ENTRIES)) {
  process.stderr.write(`usage: everything.mjs ${Object.keys(ENTRIES).join("|")}\n`);
  process.exit(2);
}

const origListen = http.Server.prototype.listen;
http.Server.prototype.listen = function (...args) {
  // Express calls listen(port, callback); insert the host.
  if (args.length >= 1 && typeof args[1] !== "string") {
    args.splice(1, 0, "127.0.0.1");
  }
  this.once("listening", () => {
    const a = this.address();
    process.stderr.write(`EVERYTHING_LISTENING http://127.0.0.1:${a.port}${ENTRIES[transport]}\n`);
  });
  return origListen.apply(this, args);
};

const require = createRequire(import.meta.url);
const pkg = require.resolve("@modelcontextprotocol/server-everything/package.json");
const entry = new URL(`dist/transports/${transport}.js`, pathToFileURL(pkg));
process.env.PORT = process.env.PORT || "0";
await import(entry.href);
