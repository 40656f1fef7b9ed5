//! `mcp-guard pins`: the pin file, offline: list the pins, approve pending definitions (one
//! tool, by the digest the operator was shown, or all of a server), export the file, diff
//! pending against pinned, show a whole definition. A running gateway takes approvals in on
//! SIGHUP, or within a few seconds by itself (it watches the file). Names and texts from the
//! upstream are printed escaped: no control character reaches the terminal.

use crate::pinning::store::shown;
use crate::pinning::{PinFile, definition_diff, description_diff};
use clap::Subcommand;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// What `pins` does.
#[derive(Subcommand, Debug)]
pub enum PinsAction {
    /// Every server's tools: digest and state (approved, or pending with why).
    List,
    /// Accept the pending definition of TOOL on SERVER whose digest is DIGEST (as `pins diff`
    /// printed it), or every pending definition of SERVER with `--all`.
    Approve {
        /// The routed server name (`default` for `[upstream]`).
        server: String,
        /// The tool.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        tool: Option<String>,
        /// The pending digest you reviewed (`sha256:…`, from `pins diff`); when the pending
        /// definition is now another, nothing is approved.
        #[arg(long, required_unless_present = "all", conflicts_with = "all")]
        digest: Option<String>,
        /// Every approvable pending definition of the server (each printed with its digest).
        #[arg(long)]
        all: bool,
        /// With `--all`: approve only if exactly N definitions are pending (else nothing).
        #[arg(long, requires = "all", value_name = "N")]
        expect: Option<usize>,
    },
    /// Print the pin file as JSON.
    Export,
    /// The server's pending definitions against the pinned ones: digests, the whole changed
    /// text of the description and of the definition, and the command that approves it.
    Diff {
        /// The routed server name.
        server: String,
    },
    /// The whole pinned and pending definitions of TOOL on SERVER (JSON, escaped).
    Show {
        /// The routed server name.
        server: String,
        /// The tool.
        tool: String,
    },
}

/// The pin file named by `--store`, else by the configuration's `[pinning] store`.
pub fn store_path(config: Option<&Path>, store: Option<PathBuf>) -> Result<PathBuf, String> {
    if let Some(s) = store {
        return Ok(s);
    }
    let config =
        config.ok_or("name the pin file with --store, or a configuration with --config")?;
    let settings = crate::config::Settings::load(config).map_err(|e| e.to_string())?;
    settings
        .pinning
        .map(|p| p.store)
        .ok_or_else(|| format!("{}: [pinning] is not enabled", config.display()))
}

/// Runs `action` on the pin file at `path`; the text for stdout.
pub fn run(path: &Path, action: PinsAction) -> Result<String, String> {
    let mut file = PinFile::load(path)?;
    let mut out = String::new();
    match action {
        PinsAction::List => {
            if file.servers.is_empty() {
                out.push_str("no pins yet\n");
            }
            for (server, pins) in &file.servers {
                let sealed = if pins.sealed {
                    ""
                } else {
                    " (first use: open)"
                };
                let _ = writeln!(out, "{}{sealed}", shown(server));
                for (tool, pin) in &pins.tools {
                    let digest = pin.digest.as_deref().unwrap_or("-");
                    let state = match &pin.pending {
                        None => "approved".to_string(),
                        Some(p) => format!("pending ({}) {}", shown(&p.reason), p.digest),
                    };
                    let _ = writeln!(out, "  {}  {digest}  {state}", shown(tool));
                }
            }
        }
        PinsAction::Approve {
            server,
            tool,
            digest,
            all,
            expect,
        } => {
            let tool = if all { None } else { tool };
            if let (Some(n), Some(pins)) = (expect, file.servers.get(&server)) {
                let pending = pins
                    .tools
                    .values()
                    .filter(|t| t.pending.as_ref().is_some_and(|p| p.approvable()))
                    .count();
                if pending != n {
                    return Err(format!(
                        "{pending} approvable definitions are pending on '{}', not {n}; nothing approved (run `pins diff` again)",
                        shown(&server)
                    ));
                }
            }
            let accepted = file.approve(&server, tool.as_deref(), digest.as_deref())?;
            file.save(path)?;
            for (name, d) in &accepted {
                let _ = writeln!(out, "approved {}  {d}", shown(name));
            }
            let n = accepted.len();
            let _ = writeln!(
                out,
                "approved {n} definition{} on '{}'; a running gateway takes it in on SIGHUP or within seconds",
                if n == 1 { "" } else { "s" },
                shown(&server)
            );
        }
        PinsAction::Export => {
            out =
                escape_json_text(&serde_json::to_string_pretty(&file).map_err(|e| e.to_string())?);
            out.push('\n');
        }
        PinsAction::Diff { server } => {
            let pins = file
                .servers
                .get(&server)
                .ok_or_else(|| format!("no pins for server '{}'", shown(&server)))?;
            let mut any = false;
            for (tool, pin) in &pins.tools {
                let Some(p) = &pin.pending else { continue };
                any = true;
                let _ = writeln!(
                    out,
                    "{}: {} ({}, seen {})\n  pinned:  {}\n  pending: {}\n  description: {}",
                    shown(tool),
                    shown(&p.reason),
                    if p.approvable() {
                        "approvable"
                    } else {
                        "cannot be approved"
                    },
                    shown(&p.seen),
                    pin.digest.as_deref().unwrap_or("-"),
                    p.digest,
                    description_diff(
                        pin.description.as_deref(),
                        p.description.as_deref(),
                        usize::MAX
                    )
                );
                let whole = match (&p.definition, p.reason.as_str()) {
                    (None, "too_large") => format!(
                        "(not kept: over {} KiB; it cannot be approved)",
                        crate::pinning::store::MAX_DEFINITION / 1024
                    ),
                    _ => definition_diff(
                        pin.definition.as_deref(),
                        p.definition.as_deref(),
                        usize::MAX,
                    ),
                };
                let _ = writeln!(out, "  definition: {whole}");
                if p.approvable() {
                    let _ = writeln!(
                        out,
                        "  approve with: mcp-guard pins approve {} {} --digest {}",
                        shown(&server),
                        shown(tool),
                        p.digest
                    );
                }
            }
            if !any {
                let _ = writeln!(out, "no pending changes on '{}'", shown(&server));
            }
        }
        PinsAction::Show { server, tool } => {
            let pin = file
                .servers
                .get(&server)
                .and_then(|s| s.tools.get(&tool))
                .ok_or_else(|| {
                    format!(
                        "no tool '{}' pinned on server '{}'",
                        shown(&tool),
                        shown(&server)
                    )
                })?;
            let _ = writeln!(
                out,
                "pinned {}:\n{}",
                pin.digest.as_deref().unwrap_or("-"),
                pretty(pin.definition.as_deref())
            );
            match &pin.pending {
                None => out.push_str("no pending definition\n"),
                Some(p) => {
                    let _ = writeln!(
                        out,
                        "pending {} ({}):\n{}",
                        p.digest,
                        shown(&p.reason),
                        pretty(p.definition.as_deref())
                    );
                }
            }
        }
    }
    Ok(out)
}

/// A canonical definition as indented JSON, every character a terminal could hide or act on
/// written as a JSON escape (so the text stays valid JSON).
fn pretty(definition: Option<&str>) -> String {
    let Some(text) = definition else {
        return "(not kept)".into();
    };
    let text = serde_json::from_str::<serde_json::Value>(text)
        .and_then(|v| serde_json::to_string_pretty(&v))
        .unwrap_or_else(|_| text.to_string());
    escape_json_text(&text)
}

/// JSON text with every character a terminal could hide or act on (serde_json leaves DEL, C1
/// controls, U+2028 and invisible characters raw) written as a JSON escape; still valid JSON.
fn escape_json_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c != '\n' && (c.is_control() || crate::pinning::canon::is_invisible(c)) {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                let _ = write!(out, "\\u{u:04x}");
            }
        } else {
            out.push(c);
        }
    }
    out
}
