//! `mcp-guard pins`: the pin file, offline: list the pins, approve pending definitions (one
//! tool or all of a server), export the file, diff pending against pinned. A running gateway
//! takes approvals in on SIGHUP, or within a few seconds by itself (it watches the file).

use crate::pinning::{PinFile, description_diff};
use clap::Subcommand;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// What `pins` does.
#[derive(Subcommand, Debug)]
pub enum PinsAction {
    /// Every server's tools: digest and state (approved, or pending with why).
    List,
    /// Accept the pending definition of TOOL on SERVER (or of every tool with `--all`).
    Approve {
        /// The routed server name (`default` for `[upstream]`).
        server: String,
        /// The tool.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        tool: Option<String>,
        /// Every pending definition of the server.
        #[arg(long)]
        all: bool,
    },
    /// Print the pin file as JSON.
    Export,
    /// The server's pending definitions against the pinned ones, with the description diff.
    Diff {
        /// The routed server name.
        server: String,
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
                let _ = writeln!(out, "{server}{sealed}");
                for (tool, pin) in &pins.tools {
                    let digest = pin.digest.as_deref().unwrap_or("-");
                    let state = match &pin.pending {
                        None => "approved".to_string(),
                        Some(p) => format!("pending ({}) {}", p.reason, p.digest),
                    };
                    let _ = writeln!(out, "  {tool}  {digest}  {state}");
                }
            }
        }
        PinsAction::Approve { server, tool, all } => {
            let tool = if all { None } else { tool };
            let n = file.approve(&server, tool.as_deref())?;
            file.save(path)?;
            let _ = writeln!(
                out,
                "approved {n} definition{} on '{server}'; a running gateway takes it in on SIGHUP or within seconds",
                if n == 1 { "" } else { "s" }
            );
        }
        PinsAction::Export => {
            out = serde_json::to_string_pretty(&file).map_err(|e| e.to_string())?;
            out.push('\n');
        }
        PinsAction::Diff { server } => {
            let pins = file
                .servers
                .get(&server)
                .ok_or_else(|| format!("no pins for server '{server}'"))?;
            let mut any = false;
            for (tool, pin) in &pins.tools {
                let Some(p) = &pin.pending else { continue };
                any = true;
                let _ = writeln!(
                    out,
                    "{tool}: {} ({}, seen {})\n  pinned:  {}\n  pending: {}\n  description: {}",
                    p.reason,
                    if p.approvable() {
                        "approvable"
                    } else {
                        "cannot be approved"
                    },
                    p.seen,
                    pin.digest.as_deref().unwrap_or("-"),
                    p.digest,
                    description_diff(pin.description.as_deref(), p.description.as_deref())
                );
            }
            if !any {
                let _ = writeln!(out, "no pending changes on '{server}'");
            }
        }
    }
    Ok(out)
}
