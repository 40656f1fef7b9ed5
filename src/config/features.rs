//! What this build does not do yet, in one place: sections and values of unbuilt features
//! (refused at load, before any of their inner fields are asked for), and keys that are
//! accepted but have no effect where they stand (each one a warning from `validate` and at
//! start). The generated reference reads the same lists, so the docs say what the loader does.

use super::schema::{FileConfig, RateBackend, SessionMode, TransportKind};

/// When a path counts as asking for an unbuilt feature.
#[derive(Debug, Clone, Copy)]
pub enum Trigger {
    /// The key or section is present at all.
    Present,
    /// A non-empty array.
    NonEmpty,
    /// A string equal to this.
    Equals(&'static str),
    /// `true`.
    True,
}

/// One unbuilt feature.
#[derive(Debug, Clone, Copy)]
pub struct Unbuilt {
    /// Dotted path of the key or section.
    pub path: &'static str,
    /// What makes it count.
    pub trigger: Trigger,
    /// Why it is refused and what to do instead.
    pub message: &'static str,
}

/// Features a config may name that this build refuses to start with.
pub const UNBUILT: &[Unbuilt] = &[];

/// Keys with no effect anywhere in this build: a warning when the file sets one.
pub const NO_EFFECT: &[(&str, &str)] = &[];

/// The reference's note for an unbuilt key or section.
pub fn unbuilt_note(path: &str) -> Option<&'static str> {
    UNBUILT.iter().find(|u| u.path == path).map(|u| u.message)
}

/// The reference's note for a key without effect in this build.
pub fn no_effect_note(path: &str) -> Option<&'static str> {
    NO_EFFECT
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, why)| *why)
}

/// A value as far as the triggers need to see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen<'a> {
    /// A string.
    Str(&'a str),
    /// A boolean.
    Bool(bool),
    /// An array of this length.
    Array(usize),
    /// Anything else (a table, a number).
    Other,
}

/// The first unbuilt feature `lookup` (dotted path → value) shows, in list order.
pub fn first_unbuilt<'v>(lookup: &dyn Fn(&str) -> Option<Seen<'v>>) -> Option<&'static Unbuilt> {
    UNBUILT.iter().find(|u| {
        let Some(seen) = lookup(u.path) else {
            return false;
        };
        match u.trigger {
            Trigger::Present => true,
            Trigger::NonEmpty => !matches!(seen, Seen::Array(0)),
            Trigger::Equals(v) => seen == Seen::Str(v),
            Trigger::True => seen == Seen::Bool(true),
        }
    })
}

/// The same check on a parsed file (for files not read from text, and as a backstop).
pub fn first_unbuilt_in(file: &FileConfig) -> Option<&'static Unbuilt> {
    // Nothing is unbuilt today; the table stays for the next feature that is named in the
    // contract before it is built.
    let _ = file;
    first_unbuilt(&|_| None)
}

/// Every key the file sets that has no effect where it stands, with why, in file order.
pub fn ignored_keys(file: &FileConfig) -> Vec<String> {
    let mut warnings: Vec<String> = Vec::new();
    let warn = |warnings: &mut Vec<String>, key: &str, why: &str| {
        warnings.push(format!("{key} has no effect: {why}"))
    };
    let sets = |path: &str| file.sets(path);

    for (path, why) in NO_EFFECT {
        if sets(path) {
            warn(&mut warnings, path, why);
        }
    }
    if sets("server.public_url") && file.auth.oauth.is_none() {
        warn(
            &mut warnings,
            "server.public_url",
            "it is used in OAuth metadata, served only with [auth.oauth]",
        );
    }

    for (i, s) in file.upstream.servers.iter().enumerate() {
        let key = format!("upstream.servers[{i}]");
        let stdio_keys = [
            ("command", s.command.is_some()),
            ("args", !s.args.is_empty()),
            ("env", !s.env.is_empty()),
            ("cwd", s.cwd.is_some()),
        ];
        let http_keys = [
            ("url", s.url.is_some()),
            ("urls", !s.urls.is_empty()),
            ("headers", !s.headers.is_empty()),
        ];
        let (foreign, why): (&[(&str, bool)], &str) = match s.transport {
            TransportKind::Stdio => (&http_keys, "\"stdio\" and it configures an HTTP upstream"),
            TransportKind::Http => (&stdio_keys, "\"http\" and it configures a stdio upstream"),
            TransportKind::Sse => (&stdio_keys, "\"sse\" and it configures a stdio upstream"),
        };
        for (name, set) in foreign {
            if *set {
                warn(
                    &mut warnings,
                    &format!("{key}.{name}"),
                    &format!("{key}.transport is {why}"),
                );
            }
        }
    }
    if file.upstream.session_mode == SessionMode::Shared && sets("upstream.max_processes") {
        warn(
            &mut warnings,
            "upstream.max_processes",
            "upstream.session_mode is \"shared\" (one process)",
        );
    }
    for (i, s) in file.upstream.servers.iter().enumerate() {
        if s.session_mode == SessionMode::Shared && s.max_processes.is_some() {
            warn(
                &mut warnings,
                &format!("upstream.servers[{i}].max_processes"),
                "its session_mode is \"shared\" (one process)",
            );
        }
    }
    let has_default = file.upstream.servers.is_empty()
        || file.upstream.command.is_some()
        || file.upstream.url.is_some()
        || !file.upstream.urls.is_empty();
    if !has_default {
        for key in ["transport", "args", "env", "cwd", "headers", "load_balance"] {
            let path = format!("upstream.{key}");
            if sets(&path) {
                warn(
                    &mut warnings,
                    &path,
                    "[upstream] names no command, url or urls, so there is no default upstream at \
                     server.mcp_path, only the routed servers",
                );
            }
        }
    }
    let stdio_only = [
        "command",
        "args",
        "env",
        "cwd",
        "session_mode",
        "max_processes",
    ];
    let http_only = ["url", "urls", "headers", "load_balance"];
    let (foreign, transport) = match file.upstream.transport {
        TransportKind::Stdio => (&http_only[..], "stdio"),
        TransportKind::Http => (&stdio_only[..], "http"),
        // Its sessions map to connections as stdio's map to processes.
        TransportKind::Sse => (&stdio_only[..4], "sse"),
    };
    for key in foreign {
        let path = format!("upstream.{key}");
        if sets(&path) {
            let kind = if transport == "stdio" {
                "an HTTP"
            } else {
                "a stdio"
            };
            warn(
                &mut warnings,
                &path,
                &format!("upstream.transport is \"{transport}\" and it configures {kind} upstream"),
            );
        }
    }
    // Beside a single `url` there is nothing to choose among.
    if has_default
        && transport == "http"
        && file.upstream.urls.is_empty()
        && sets("upstream.load_balance")
    {
        warn(
            &mut warnings,
            "upstream.load_balance",
            "it chooses among upstream.urls, which is not set",
        );
    }

    if !file.rate_limit.enabled {
        for key in [
            "requests_per_second",
            "burst_size",
            "per_tool",
            "backend",
            "redis_url",
            "redis_ca_file",
            "redis_failure",
            "redis_replicas",
            "redis_lease_timeout_ms",
        ] {
            let path = format!("rate_limit.{key}");
            if sets(&path) {
                warn(&mut warnings, &path, "rate_limit.enabled is false");
            }
        }
        for (i, k) in file.auth.api_keys.iter().enumerate() {
            if k.rate_limit.is_some() {
                warn(
                    &mut warnings,
                    &format!("auth.api_keys[{i}].rate_limit"),
                    "rate_limit.enabled is false",
                );
            }
        }
    } else if file.rate_limit.backend == RateBackend::Memory {
        for key in [
            "redis_url",
            "redis_ca_file",
            "redis_failure",
            "redis_replicas",
            "redis_lease_timeout_ms",
        ] {
            let path = format!("rate_limit.{key}");
            if sets(&path) {
                warn(&mut warnings, &path, "rate_limit.backend is \"memory\"");
            }
        }
    }

    let audit_keys = ["stdout", "file", "include_arguments", "queue_capacity"];
    let export_keys = [
        "export_batch_size",
        "export_interval_secs",
        "export_headers",
        "format",
        "spool_dir",
        "spool_max_bytes",
    ];
    if !file.audit.enabled {
        for key in audit_keys.iter().chain(&["export_url"]).chain(&export_keys) {
            let path = format!("audit.{key}");
            if sets(&path) {
                warn(&mut warnings, &path, "audit.enabled is false");
            }
        }
    } else {
        if file.audit.export_url.is_none() {
            for key in export_keys {
                let path = format!("audit.{key}");
                if sets(&path) {
                    warn(&mut warnings, &path, "audit.export_url is not set");
                }
            }
        }
        if !file.audit.stdout
            && file.audit.file.is_none()
            && file.audit.export_url.is_none()
            && audit_keys.iter().any(|k| sets(&format!("audit.{k}")))
        {
            warnings.push(
                "[audit] has no destination, so no events are written: set audit.file, \
                 audit.stdout = true or audit.export_url"
                    .to_string(),
            );
        }
    }

    if !file.admin.enabled {
        for key in ["host", "port"] {
            let path = format!("admin.{key}");
            if sets(&path) {
                warn(&mut warnings, &path, "admin.enabled is false");
            }
        }
    }

    if let Some(m) = &file.auth.mtls
        && !m.enabled
    {
        for key in [
            "identity_source",
            "allowed_tools",
            "rate_limit",
            "trusted_proxy_ips",
        ] {
            let path = format!("auth.mtls.{key}");
            if sets(&path) {
                warn(&mut warnings, &path, "auth.mtls.enabled is false");
            }
        }
    }

    // `propagate_context` applies with tracing off too (the caller's trace headers are
    // forwarded, or not); the rest only shapes spans.
    if !file.tracing.enabled {
        for key in [
            "service_name",
            "otlp_endpoint",
            "sample_rate",
            "honour_parent_sampling",
        ] {
            let path = format!("tracing.{key}");
            if sets(&path) {
                warn(&mut warnings, &path, "tracing.enabled is false");
            }
        }
    }
    if let Some(j) = &file.auth.jwt {
        let (foreign, mode): (&[(&str, bool)], &str) = match j.mode {
            crate::config::schema::JwtMode::Simple => (
                &[
                    ("jwks_url", j.jwks_url.is_some()),
                    ("cache_duration_secs", j.cache_duration_secs.is_some()),
                ],
                "simple",
            ),
            crate::config::schema::JwtMode::Jwks => (&[("secret", j.secret.is_some())], "jwks"),
        };
        for (name, set) in foreign {
            if *set {
                warn(
                    &mut warnings,
                    &format!("auth.jwt.{name}"),
                    &format!("auth.jwt.mode is \"{mode}\""),
                );
            }
        }
        // Not wrong, but rarely meant: without them a token minted for any other service (or
        // by any other issuer sharing the keys) is accepted here.
        for (name, what) in [
            ("audience", j.audience.is_none()),
            ("issuer", j.issuer.is_none()),
        ] {
            if what {
                let (claim, whose) = if name == "audience" {
                    ("aud", "this gateway's")
                } else {
                    ("iss", "your identity provider's")
                };
                warnings.push(format!(
                    "auth.jwt.{name} is not set: tokens are accepted whatever their `{claim}` claim; set it to {whose}"
                ));
            }
        }
    }
    warnings
}
