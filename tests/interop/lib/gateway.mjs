// Starting mcp-guard from an interop script: a free loopback port (for configs that must name
// their own public URL) and the gateway on a written config, resolved once it listens.
import { spawn } from "node:child_process";
import { createServer } from "node:http";
import { writeFileSync } from "node:fs";

/** A loopback port free at the time of asking. */
export function freePort() {
  return new Promise((ok) => {
    const s = createServer();
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => ok(port));
    });
  });
}

/** Writes `config` to `path` and starts `guard` on it; resolves with the child once the
 * data-plane listener is up. The caller stops the child. */
export function startGateway(guard, config, path) {
  writeFileSync(path, config);
  const child = spawn(guard, ["--config", path], { stdio: ["ignore", "ignore", "pipe"], env: { ...process.env, RUST_LOG: "info" } });
  return new Promise((ok, fail) => {
    let log = "";
    const timer = setTimeout(() => fail(new Error(`gateway did not start:\n${log}`)), 20_000);
    child.stderr.on("data", (d) => {
      log += d;
      if (/listening on http:\/\//.test(log) && !/admin listening/.test(log.split("\n").pop())) {
        clearTimeout(timer);
        ok(child);
      }
    });
    child.on("exit", (code) => fail(new Error(`gateway exited ${code}:\n${log}`)));
  });
}
