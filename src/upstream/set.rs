//! The running upstreams: runtime state built from a configuration snapshot and attached to
//! it, so a request sees the upstreams of the configuration it started with. On reload the
//! control thread reconciles: an upstream whose settings did not change is carried over as it
//! runs (a stdio child and its sessions live on), a changed or new one is started before the
//! swap (one that cannot start refuses the reload), and one no longer used is retired after
//! the swap, once its in-flight requests are done or the shutdown grace has passed.

use super::UpstreamRef;
use super::stdio::StdioHub;
use crate::config::{HttpUpstream, Settings, StdioSettings, Transport};
use crate::observe::metrics::Metrics;
use std::sync::Arc;

/// One running upstream.
pub enum Upstream {
    /// A Streamable HTTP server (per-worker pools; nothing runs for it here).
    Http(Arc<HttpUpstream>),
    /// A supervised stdio child, with the settings it was started from.
    Stdio(StdioSettings, Arc<StdioHub>),
}

impl Upstream {
    fn start(transport: &Transport, metrics: &Arc<Metrics>) -> Result<Self, String> {
        Ok(match transport {
            Transport::Http(h) => Upstream::Http(Arc::new(h.clone())),
            Transport::Stdio(s) => {
                Upstream::Stdio(s.clone(), StdioHub::start(s.clone(), metrics.clone())?)
            }
        })
    }

    /// Borrowed for a request.
    pub fn as_ref(&self) -> UpstreamRef<'_> {
        match self {
            Upstream::Http(h) => UpstreamRef::Http(h),
            Upstream::Stdio(_, hub) => UpstreamRef::Stdio(hub),
        }
    }
}

/// Every upstream of one configuration snapshot.
pub struct UpstreamSet {
    default: Upstream,
}

impl std::fmt::Debug for UpstreamSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.default {
            Upstream::Http(h) => format!("http {}", h.url),
            Upstream::Stdio(s, _) => format!("stdio `{}`", s.command),
        };
        f.debug_struct("UpstreamSet")
            .field("default", &kind)
            .finish()
    }
}

impl UpstreamSet {
    /// Starts every upstream `settings` names (a stdio child is spawned here, on the caller's
    /// thread: one that cannot start at all is an error).
    pub fn start(settings: &Settings, metrics: &Arc<Metrics>) -> Result<Self, String> {
        Ok(Self {
            default: Upstream::start(&settings.upstream.transport, metrics)?,
        })
    }

    /// The set for `next`: upstreams whose settings are unchanged are carried over running,
    /// the others started. Also returns the hubs `next` no longer uses, for the caller to
    /// retire once `next` is in place. Nothing is retired when starting fails.
    pub fn reconcile(
        &self,
        next: &Settings,
        metrics: &Arc<Metrics>,
    ) -> Result<(Self, Vec<Arc<StdioHub>>), String> {
        let mut retired = Vec::new();
        let default = match (&self.default, &next.upstream.transport) {
            (Upstream::Stdio(running, hub), Transport::Stdio(wanted)) if running == wanted => {
                Upstream::Stdio(running.clone(), hub.clone())
            }
            (current, wanted) => {
                let started = Upstream::start(wanted, metrics)?;
                if let Upstream::Stdio(_, hub) = current {
                    retired.push(hub.clone());
                }
                started
            }
        };
        Ok((Self { default }, retired))
    }

    /// The upstream of `server.mcp_path`.
    pub fn default_upstream(&self) -> UpstreamRef<'_> {
        self.default.as_ref()
    }

    /// Every stdio hub of the set.
    pub fn hubs(&self) -> impl Iterator<Item = &Arc<StdioHub>> {
        match &self.default {
            Upstream::Stdio(_, hub) => Some(hub),
            Upstream::Http(_) => None,
        }
        .into_iter()
    }

    /// Stdio children all running (`None` when the set has no stdio upstream).
    pub fn stdio_alive(&self) -> Option<bool> {
        let mut hubs = self.hubs().peekable();
        hubs.peek()?;
        Some(hubs.all(|h| h.is_alive()))
    }

    /// Stdio children have all answered at least once (`None` without stdio upstreams).
    pub fn stdio_answered(&self) -> Option<bool> {
        let mut hubs = self.hubs().peekable();
        hubs.peek()?;
        Some(hubs.all(|h| h.has_answered()))
    }
}
