//! The running upstreams: runtime state built from a configuration snapshot and attached to
//! it, so a request sees the upstreams of the configuration it started with. On reload the
//! control thread reconciles, server by server (by route name): an upstream whose settings did
//! not change is carried over as it runs (a stdio child and its sessions live on), a changed or
//! new one is started before the swap (one that cannot start refuses the reload), and one no
//! longer used is retired after the swap, once its in-flight requests are done or the shutdown
//! grace has passed.

use super::UpstreamRef;
use super::balance::HttpServer;
use super::pool::StdioPool;
use super::stdio::Link;
use super::stdio::StdioHub;
use crate::config::{Settings, Transport};
use crate::observe::metrics::Metrics;
use std::sync::Arc;

/// One running upstream.
pub enum Upstream {
    /// A Streamable HTTP server (per-worker pools; nothing runs for it here): its replicas
    /// and what the health checks and workers know about them.
    Http(Arc<HttpServer>),
    /// A supervised stdio child (or legacy SSE connection), with the settings it was started
    /// from.
    Stdio(Link, Arc<StdioHub>),
    /// A stdio child (or legacy SSE connection) per session.
    StdioPool(Arc<StdioPool>),
}

impl Upstream {
    fn start(transport: &Transport, metrics: &Arc<Metrics>) -> Result<Self, String> {
        Ok(match transport {
            Transport::Http(h) => Upstream::Http(Arc::new(HttpServer::new(h, None))),
            Transport::Stdio(_) | Transport::Sse(_) => {
                let link = link_of(transport).unwrap_or_else(|| unreachable!());
                match link.per_session() {
                    Some(limits) => {
                        Upstream::StdioPool(StdioPool::new(link, limits, metrics.clone()))
                    }
                    None => {
                        let hub = StdioHub::start(link.clone(), metrics.clone())?;
                        Upstream::Stdio(link, hub)
                    }
                }
            }
        })
    }

    /// The same upstream if `wanted` describes it, else `None`.
    fn carry_over(&self, wanted: &Transport) -> Option<Self> {
        match (self, wanted) {
            (Upstream::Stdio(running, hub), w) if link_of(w).as_ref() == Some(running) => {
                Some(Upstream::Stdio(running.clone(), hub.clone()))
            }
            (Upstream::StdioPool(pool), w) if link_of(w).as_ref() == Some(pool.settings()) => {
                Some(Upstream::StdioPool(pool.clone()))
            }
            // An HTTP upstream holds nothing that runs: what carries over is what is known of
            // each replica whose URL is unchanged (health, identity, requests in flight).
            (Upstream::Http(old), Transport::Http(w)) => {
                Some(Upstream::Http(Arc::new(HttpServer::new(w, Some(old)))))
            }
            _ => None,
        }
    }

    /// Borrowed for a request.
    pub fn as_ref(&self) -> UpstreamRef<'_> {
        match self {
            Upstream::Http(h) => UpstreamRef::Http(h),
            Upstream::Stdio(_, hub) => UpstreamRef::Stdio(hub),
            Upstream::StdioPool(pool) => UpstreamRef::StdioPool(pool),
        }
    }

    /// Serving now (stdio: its child runs; HTTP: its last check was answered, or for
    /// replicas, one of them serves).
    pub fn is_ready(&self) -> bool {
        match self {
            Upstream::Http(h) => h.is_ready(),
            Upstream::Stdio(_, hub) => hub.is_alive(),
            // Children start on demand; the command was checked when the pool was made.
            Upstream::StdioPool(_) => true,
        }
    }

    /// Has answered at least once since it was started.
    pub fn has_answered(&self) -> bool {
        match self {
            Upstream::Http(h) => h.has_answered(),
            Upstream::Stdio(_, hub) => hub.has_answered(),
            Upstream::StdioPool(pool) => pool.has_answered(),
        }
    }
}

/// What a hub would run for `transport`; `None` for an HTTP upstream (no hub).
fn link_of(transport: &Transport) -> Option<Link> {
    match transport {
        Transport::Stdio(s) => Some(Link::Process(s.clone())),
        Transport::Sse(s) => Some(Link::Sse(s.clone())),
        Transport::Http(_) => None,
    }
}

/// Every upstream of one configuration snapshot, in the order of its routes.
pub struct UpstreamSet {
    upstreams: Vec<(Arc<str>, Upstream)>,
}

impl std::fmt::Debug for UpstreamSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.upstreams.iter().map(|(n, _)| &**n).collect();
        f.debug_struct("UpstreamSet")
            .field("routes", &names)
            .finish()
    }
}

impl UpstreamSet {
    /// Starts every upstream `settings` routes to (stdio children are spawned here, on the
    /// caller's thread: one that cannot start at all is an error naming its route).
    pub fn start(settings: &Settings, metrics: &Arc<Metrics>) -> Result<Self, String> {
        let mut upstreams = Vec::with_capacity(settings.routes.len());
        for r in &settings.routes {
            let up = Upstream::start(&r.upstream.transport, metrics)
                .map_err(|e| format!("{}: {e}", r.key))?;
            upstreams.push((r.name.clone(), up));
        }
        Ok(Self { upstreams })
    }

    /// The set for `next`: upstreams whose settings are unchanged are carried over running,
    /// the others started. Also returns the stdio hubs `next` no longer uses, for the caller
    /// to retire once `next` is in place. Nothing is retired when starting fails (the hubs
    /// started for `next` so far are stopped again).
    pub fn reconcile(
        &self,
        next: &Settings,
        metrics: &Arc<Metrics>,
    ) -> Result<(Self, Vec<Arc<StdioHub>>), String> {
        let mut upstreams = Vec::with_capacity(next.routes.len());
        let mut started: Vec<Arc<StdioHub>> = Vec::new();
        for r in &next.routes {
            let carried = self
                .get(&r.name)
                .and_then(|u| u.carry_over(&r.upstream.transport));
            let up = match carried {
                Some(u) => u,
                None => match Upstream::start(&r.upstream.transport, metrics) {
                    Ok(u) => {
                        if let Upstream::Stdio(_, hub) = &u {
                            started.push(hub.clone());
                        }
                        u
                    }
                    Err(e) => {
                        for hub in started {
                            hub.shutdown();
                        }
                        return Err(format!("{}: {e}", r.key));
                    }
                },
            };
            upstreams.push((r.name.clone(), up));
        }
        let next_set = Self { upstreams };
        let mut retired: Vec<Arc<StdioHub>> = self
            .hubs()
            .filter(|old| !next_set.hubs().any(|kept| Arc::ptr_eq(old, kept)))
            .cloned()
            .collect();
        // A pool no longer used hands over its children: they end with it.
        for old in self.pools() {
            if !next_set.pools().any(|kept| Arc::ptr_eq(old, kept)) {
                retired.extend(old.drain());
            }
        }
        Ok((next_set, retired))
    }

    /// The upstream of route number `index` (the index into `Settings::routes`).
    pub fn at(&self, index: usize) -> Option<UpstreamRef<'_>> {
        self.upstreams.get(index).map(|(_, u)| u.as_ref())
    }

    fn get(&self, name: &str) -> Option<&Upstream> {
        self.upstreams
            .iter()
            .find(|(n, _)| &**n == name)
            .map(|(_, u)| u)
    }

    /// Every upstream with its route name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Upstream)> {
        self.upstreams.iter().map(|(n, u)| (&**n, u))
    }

    /// Every stdio hub of the set.
    pub fn hubs(&self) -> impl Iterator<Item = &Arc<StdioHub>> {
        self.upstreams.iter().filter_map(|(_, u)| match u {
            Upstream::Stdio(_, hub) => Some(hub),
            Upstream::Http(..) | Upstream::StdioPool(_) => None,
        })
    }

    /// Every per-session pool of the set.
    pub fn pools(&self) -> impl Iterator<Item = &Arc<StdioPool>> {
        self.upstreams.iter().filter_map(|(_, u)| match u {
            Upstream::StdioPool(pool) => Some(pool),
            _ => None,
        })
    }

    /// Every upstream serving now.
    pub fn all_ready(&self) -> bool {
        self.upstreams.iter().all(|(_, u)| u.is_ready())
    }

    /// Every upstream has answered at least once.
    pub fn all_answered(&self) -> bool {
        self.upstreams.iter().all(|(_, u)| u.has_answered())
    }
}
