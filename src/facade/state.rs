//! What the authorization-server facade remembers between requests, shared by every worker
//! behind one short `Mutex` (these endpoints are rare): registered clients, authorizations
//! waiting for the identity provider, one-time codes, and refresh tokens with their families.
//! Every table is bounded and every entry expires; none of it survives a restart (clients
//! register again, users sign in again). Each table also caps what one owner (an address, a
//! client, a user) may hold, and a full table evicts from whoever holds the most: one caller
//! flooding a table pushes out its own entries, never everyone else's.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Registered clients kept at most. Beyond it an unused client goes (one holding no pending
/// authorization, code or refresh token), from the address that registered the most; when
/// every client is in use, registration is refused.
pub const MAX_CLIENTS: usize = 1000;
/// Registrations one address may make in a burst …
pub const REGISTER_BURST: f64 = 10.0;
/// … and then one per this long.
pub const REGISTER_EVERY: Duration = Duration::from_secs(6);
/// Addresses whose registration budget is remembered; beyond it the table starts afresh.
const MAX_ADDRESSES: usize = 4096;
/// Authorizations waiting for the identity provider, at most …
pub const MAX_PENDING: usize = 1000;
/// … at most this many started from one address (an IPv6 /64) …
pub const PENDING_PER_ADDRESS: usize = 16;
/// … or for one client …
pub const PENDING_PER_CLIENT: usize = 16;
/// … each for this long (a person signing in at the IdP).
pub const PENDING_TTL: Duration = Duration::from_secs(600);
/// One-time codes outstanding, at most …
pub const MAX_CODES: usize = 1000;
/// … at most this many for one user …
pub const CODES_PER_USER: usize = 8;
/// … or one client …
pub const CODES_PER_CLIENT: usize = 8;
/// … each valid this long.
pub const CODE_TTL: Duration = Duration::from_secs(60);
/// Refresh tokens remembered (current and rotated-out), at most; beyond it the user holding
/// the most loses their oldest family.
pub const MAX_REFRESH: usize = 20_000;
/// Families (sign-ins with live refresh tokens) one user may hold; a new sign-in beyond it
/// ends that user's oldest family.
pub const FAMILIES_PER_USER: usize = 32;
/// Rotated-out tokens remembered per family (to recognise their reuse); older ones are
/// forgotten (then presenting one is refused as unknown, without revoking).
pub const ROTATED_PER_FAMILY: usize = 8;
/// A refresh token's life.
pub const REFRESH_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// An issued access token's life.
pub const ACCESS_TTL_SECS: u64 = 3600;

/// A client registered through RFC 7591. Public (no secret): PKCE binds its codes.
#[derive(Debug, Clone)]
pub struct Client {
    /// Its redirect URIs, compared byte for byte.
    pub redirect_uris: Vec<String>,
    /// What it calls itself (on the consent page and in the audit of its registration).
    pub name: Option<String>,
    /// The address (IPv6: its /64) it registered from.
    pub from: IpAddr,
}

/// An authorization sent to the identity provider, waiting for its callback.
#[derive(Debug, Clone)]
pub struct Pending {
    /// The client that asked.
    pub client_id: String,
    /// Where the client's code goes.
    pub redirect_uri: String,
    /// Whether the client named `redirect_uri` (then `/token` must repeat it).
    pub redirect_explicit: bool,
    /// The client's `state`, returned to it untouched.
    pub client_state: String,
    /// The client's S256 challenge.
    pub challenge: String,
    /// Scopes granted (already checked against what the facade offers).
    pub scopes: Vec<String>,
    /// The resource the tokens will be bound to.
    pub resource: String,
    /// The PKCE verifier the facade itself uses with the identity provider.
    pub idp_verifier: String,
    /// The person approved this client on the consent page (before that, the key it is
    /// stored under is the consent page's ticket, not a state sent to the IdP).
    pub consented: bool,
    /// After consent: the value of the cookie set in the browser that approved; the callback
    /// must come from that browser.
    pub browser: String,
    /// The address (IPv6: its /64) that asked.
    pub from: IpAddr,
    made: Instant,
}

/// A one-time code: what the client gets back, exchanged once at `/token`.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The client it was issued to.
    pub client_id: String,
    /// The redirect URI it was delivered to.
    pub redirect_uri: String,
    /// Whether the authorization request named it.
    pub redirect_explicit: bool,
    /// The S256 challenge the verifier must meet.
    pub challenge: String,
    /// Who signed in (the IdP's user id).
    pub user: String,
    /// Scopes granted.
    pub scopes: Vec<String>,
    /// The resource tokens are bound to.
    pub resource: String,
    made: Instant,
}

/// A refresh token's record. A rotated-out one is kept (not current) until its family ends, so
/// that presenting it again is recognised as theft rather than as an unknown token.
#[derive(Debug, Clone)]
pub struct Refresh {
    /// The chain of refresh tokens from one sign-in.
    pub family: u64,
    /// Still the family's live token.
    pub current: bool,
    /// The client it was issued to.
    pub client_id: String,
    /// Who.
    pub user: String,
    /// Scopes granted.
    pub scopes: Vec<String>,
    /// The resource tokens are bound to.
    pub resource: String,
    made: Instant,
}

/// The facade's tables.
#[derive(Debug, Default)]
pub struct Tables {
    /// Clients, with when they registered.
    clients: HashMap<String, (Client, Instant)>,
    budgets: HashMap<IpAddr, (f64, Instant)>,
    pending: HashMap<String, Pending>,
    codes: HashMap<String, Grant>,
    /// Codes already exchanged, to the family they started (a replay revokes it), until they
    /// would have expired anyway.
    spent: HashMap<String, (u64, Instant)>,
    refresh: HashMap<String, Refresh>,
    /// Families revoked, until every access token of theirs has expired.
    revoked: HashMap<u64, Instant>,
}

/// Why a registration was refused by the tables (the request itself was fine).
#[derive(Debug, PartialEq, Eq)]
pub enum Busy {
    /// This address registered too often; try again after this long.
    RateLimited(Duration),
    /// Every registered client is in use: none can make room.
    Full,
}

/// Why a code or refresh token was refused at `/token` (all `invalid_grant` on the wire).
#[derive(Debug, PartialEq, Eq)]
pub enum GrantError {
    /// Unknown, expired, or already used.
    Invalid(&'static str),
    /// Presented by a client other than its own.
    WrongClient,
}

/// The address an owner is counted by: IPv4 as is, IPv6 by its /64 (one host commonly holds
/// a whole /64, so counting single IPv6 addresses would cap nothing).
pub fn address_owner(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut seg = v6.segments();
                seg[4..].fill(0);
                IpAddr::V6(seg.into())
            }
        },
    }
}

fn evict_oldest_where<V>(
    map: &mut HashMap<String, V>,
    which: impl Fn(&V) -> bool,
    made: impl Fn(&V) -> Instant,
) {
    if let Some(oldest) = map
        .iter()
        .filter(|(_, v)| which(v))
        .min_by_key(|(_, v)| made(v))
        .map(|(k, _)| k.clone())
    {
        map.remove(&oldest);
    }
}

/// The owner holding the most entries, counting `newcomer` as holding one more (the entry
/// about to be added); a tie goes against the newcomer.
fn largest_owner<'v, V: 'v, K: Eq + Hash>(
    values: impl Iterator<Item = &'v V>,
    owner_of: impl Fn(&V) -> K,
    newcomer: Option<&K>,
) -> Option<K> {
    let mut counts: HashMap<K, usize> = HashMap::new();
    for v in values {
        *counts.entry(owner_of(v)).or_default() += 1;
    }
    counts
        .into_iter()
        .map(|(k, n)| {
            let new = newcomer == Some(&k);
            (n + usize::from(new), new, k)
        })
        .max_by_key(|(n, new, _)| (*n, *new))
        .map(|(_, _, k)| k)
}

/// Makes room in `map` for one more entry owned by `owner` (by `owner_of`):
/// - beyond `owner`'s `share`, one of its own entries goes: the oldest of whoever (by `by`)
///   holds the most of them, so that someone adding to a shared owner (a client anyone may
///   name) pushes out their own first;
/// - beyond `cap`, the oldest entry of whoever (by `by`) holds the most.
#[allow(clippy::too_many_arguments)]
fn make_room<V, K: Eq + Hash, B: Eq + Hash>(
    map: &mut HashMap<String, V>,
    cap: usize,
    share: usize,
    owner: &K,
    owner_of: impl Fn(&V) -> K,
    newcomer: &B,
    by: impl Fn(&V) -> B,
    made: impl Fn(&V) -> Instant,
) {
    let own = map.values().filter(|v| owner_of(v) == *owner).count();
    for _ in share.saturating_sub(1)..own {
        let mine = |v: &V| owner_of(v) == *owner;
        let top = largest_owner(map.values().filter(|v| mine(v)), &by, Some(newcomer));
        evict_oldest_where(map, |v| mine(v) && top.as_ref() == Some(&by(v)), &made);
    }
    while map.len() >= cap {
        let Some(top) = largest_owner(map.values(), &by, Some(newcomer)) else {
            break;
        };
        evict_oldest_where(map, |v| by(v) == top, &made);
    }
}

impl Tables {
    /// A new family number: random, so the `fam` claim of a token says nothing about how
    /// many sign-ins there were (never 0, which stands for "no family").
    fn family(&mut self) -> u64 {
        loop {
            let f = u64::from_le_bytes(crate::mcp::session::random_bytes::<8>());
            if f != 0 && !self.revoked.contains_key(&f) {
                return f;
            }
        }
    }

    /// Spends one of `addr`'s registrations, or says how long until it has one.
    pub fn take_registration(&mut self, addr: IpAddr, now: Instant) -> Result<(), Busy> {
        if self.budgets.len() >= MAX_ADDRESSES && !self.budgets.contains_key(&addr) {
            // Forgetting every budget favours no one in particular; each address starts with a
            // burst again, and the client cap still bounds what they can add.
            self.budgets.clear();
        }
        let addr = address_owner(addr);
        let (tokens, at) = self.budgets.entry(addr).or_insert((REGISTER_BURST, now));
        let refill =
            now.saturating_duration_since(*at).as_secs_f64() / REGISTER_EVERY.as_secs_f64();
        *tokens = (*tokens + refill).min(REGISTER_BURST);
        *at = now;
        if *tokens < 1.0 {
            let wait = REGISTER_EVERY.mul_f64(1.0 - *tokens);
            return Err(Busy::RateLimited(wait));
        }
        *tokens -= 1.0;
        Ok(())
    }

    /// Registers a client under `id`. Beyond the cap an unused client is forgotten (from the
    /// address that registered the most, its oldest); a client holding a pending
    /// authorization, a code or a refresh token never is: then the registration is refused.
    pub fn register(&mut self, id: String, mut client: Client, now: Instant) -> Result<(), Busy> {
        client.from = address_owner(client.from);
        if self.clients.len() >= MAX_CLIENTS {
            self.expire(now);
            // Holding a grant (a code or refresh token): never evicted. A sign-in in progress
            // is cheap for anyone to start, so it only puts a client after the idle ones.
            let granted: HashSet<&str> = self
                .codes
                .values()
                .map(|g| g.client_id.as_str())
                .chain(self.refresh.values().map(|r| r.client_id.as_str()))
                .collect();
            let signing_in: HashSet<&str> = self
                .pending
                .values()
                .map(|p| p.client_id.as_str())
                .collect();
            let idle = |id: &str| !granted.contains(id) && !signing_in.contains(id);
            let unused: Vec<(&String, &(Client, Instant))> =
                if self.clients.keys().any(|id| idle(id)) {
                    self.clients.iter().filter(|(id, _)| idle(id)).collect()
                } else {
                    self.clients
                        .iter()
                        .filter(|(id, _)| !granted.contains(id.as_str()))
                        .collect()
                };
            let top = largest_owner(
                unused.iter().map(|(_, c)| *c),
                |c| c.0.from,
                Some(&client.from),
            );
            let victim = top.and_then(|top| {
                unused
                    .iter()
                    .filter(|(_, c)| c.0.from == top)
                    .min_by_key(|(_, c)| c.1)
                    .map(|(id, _)| (*id).clone())
            });
            match victim {
                Some(v) => {
                    self.clients.remove(&v);
                }
                None => return Err(Busy::Full),
            }
        }
        self.clients.insert(id, (client, now));
        Ok(())
    }

    /// Drops what has expired from every table.
    fn expire(&mut self, now: Instant) {
        self.pending
            .retain(|_, v| now.saturating_duration_since(v.made) < PENDING_TTL);
        self.codes
            .retain(|_, v| now.saturating_duration_since(v.made) < CODE_TTL);
        self.refresh
            .retain(|_, v| now.saturating_duration_since(v.made) < REFRESH_TTL);
    }

    /// A registered client.
    pub fn client(&self, id: &str) -> Option<&Client> {
        self.clients.get(id).map(|c| &c.0)
    }

    /// How many clients are registered.
    pub fn clients(&self) -> usize {
        self.clients.len()
    }

    /// Remembers an authorization under `key`: the consent page's ticket, then the facade's
    /// own `state` towards the IdP. Its clock starts at the consent page and is not restarted.
    pub fn add_pending(&mut self, state: String, mut p: Pending, now: Instant) {
        if !p.consented {
            p.made = now;
        }
        self.pending
            .retain(|_, v| now.saturating_duration_since(v.made) < PENDING_TTL);
        let client = p.client_id.clone();
        make_room(
            &mut self.pending,
            usize::MAX,
            PENDING_PER_CLIENT,
            &client,
            |v| v.client_id.clone(),
            &p.from,
            |v| v.from,
            |v| v.made,
        );
        make_room(
            &mut self.pending,
            MAX_PENDING,
            PENDING_PER_ADDRESS,
            &p.from,
            |v| v.from,
            &p.from,
            |v| v.from,
            |v| v.made,
        );
        self.pending.insert(state, p);
    }

    /// Takes the authorization `state` names: once only, and only while fresh.
    pub fn take_pending(&mut self, state: &str, now: Instant) -> Option<Pending> {
        self.pending
            .remove(state)
            .filter(|p| now.saturating_duration_since(p.made) < PENDING_TTL)
    }

    /// Issues a one-time code for a finished sign-in.
    pub fn add_code(&mut self, code: String, mut g: Grant, now: Instant) {
        self.codes
            .retain(|_, v| now.saturating_duration_since(v.made) < CODE_TTL);
        let (client, user) = (g.client_id.clone(), g.user.clone());
        make_room(
            &mut self.codes,
            usize::MAX,
            CODES_PER_CLIENT,
            &client,
            |v| v.client_id.clone(),
            &user,
            |v| v.user.clone(),
            |v| v.made,
        );
        // A user's share: the client holding the most of that user's codes loses its oldest
        // (one client signing a user in again and again does not push out the user's others).
        make_room(
            &mut self.codes,
            usize::MAX,
            CODES_PER_USER,
            &user,
            |v| v.user.clone(),
            &client,
            |v| v.client_id.clone(),
            |v| v.made,
        );
        make_room(
            &mut self.codes,
            MAX_CODES,
            usize::MAX,
            &user,
            |v| v.user.clone(),
            &user,
            |v| v.user.clone(),
            |v| v.made,
        );
        g.made = now;
        self.codes.insert(code, g);
    }

    /// Exchanges a code: once, fresh, and by its own client. A code presented a second time
    /// revokes the family its first exchange started (RFC 6749 §4.1.2: the tokens it gave
    /// may be in the wrong hands). Returns the grant and the new family.
    pub fn take_code(
        &mut self,
        code: &str,
        client_id: &str,
        now: Instant,
    ) -> Result<(Grant, u64), GrantError> {
        self.spent
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < CODE_TTL);
        if let Some((family, _)) = self.spent.get(code).copied() {
            self.revoke(family, now);
            return Err(GrantError::Invalid("code_reused"));
        }
        let grant = self
            .codes
            .remove(code)
            .filter(|g| now.saturating_duration_since(g.made) < CODE_TTL)
            .ok_or(GrantError::Invalid("code_unknown"))?;
        let family = self.family();
        while self.spent.len() >= MAX_CODES {
            evict_oldest_where(&mut self.spent, |_| true, |v| v.1);
        }
        self.spent.insert(code.to_string(), (family, now));
        if grant.client_id != client_id {
            // Spent all the same: a code that leaked to another client is burnt.
            self.revoke(family, now);
            return Err(GrantError::WrongClient);
        }
        Ok((grant, family))
    }

    /// Records a new refresh token of `family`. A new family beyond the user's share ends
    /// that user's oldest; a full table ends the oldest family of the user holding the most.
    pub fn add_refresh(&mut self, token: String, mut r: Refresh, now: Instant) {
        if self.refresh.len() >= MAX_REFRESH {
            self.refresh
                .retain(|_, v| now.saturating_duration_since(v.made) < REFRESH_TTL);
        }
        if !self.refresh.values().any(|v| v.family == r.family) {
            // The user's families: (family, client, started).
            let mut families: Vec<(u64, String, Instant)> = Vec::new();
            for v in self.refresh.values().filter(|v| v.user == r.user) {
                match families.iter_mut().find(|f| f.0 == v.family) {
                    Some(f) => f.2 = f.2.min(v.made),
                    None => families.push((v.family, v.client_id.clone(), v.made)),
                }
            }
            // Beyond the share, the client holding the most of the user's families loses its
            // oldest: one client signing the user in over and over ends its own families.
            while families.len() + 1 > FAMILIES_PER_USER {
                let Some(top) = largest_owner(families.iter(), |f| f.1.clone(), Some(&r.client_id))
                else {
                    break;
                };
                let Some(at) = families
                    .iter()
                    .enumerate()
                    .filter(|(_, f)| f.1 == top)
                    .min_by_key(|(_, f)| f.2)
                    .map(|(i, _)| i)
                else {
                    break;
                };
                let (family, _, _) = families.swap_remove(at);
                self.refresh.retain(|_, v| v.family != family);
            }
        }
        while self.refresh.len() >= MAX_REFRESH {
            let Some(top) = largest_owner(self.refresh.values(), |v| v.user.clone(), Some(&r.user))
            else {
                break;
            };
            let oldest = self
                .refresh
                .values()
                .filter(|v| v.user == top)
                .min_by_key(|v| v.made)
                .map(|v| v.family);
            if let Some(family) = oldest {
                self.refresh.retain(|_, v| v.family != family);
            }
        }
        r.made = now;
        r.current = true;
        self.refresh.insert(token, r);
    }

    /// Checks a refresh token without using it: unknown, expired, or presented by another
    /// client (then it has leaked: its family is revoked) is refused; so is a rotated-out
    /// one presented again, which revokes its whole family. The caller checks the request
    /// itself and only then calls [`Tables::rotate_refresh`]: a refused request uses nothing.
    pub fn check_refresh(
        &mut self,
        token: &str,
        client_id: &str,
        now: Instant,
    ) -> Result<Refresh, GrantError> {
        let r = self
            .refresh
            .get(token)
            .ok_or(GrantError::Invalid("refresh_unknown"))?;
        if now.saturating_duration_since(r.made) >= REFRESH_TTL {
            self.refresh.remove(token);
            return Err(GrantError::Invalid("refresh_expired"));
        }
        let family = r.family;
        if r.client_id != client_id {
            self.revoke(family, now);
            return Err(GrantError::WrongClient);
        }
        if !r.current {
            self.revoke(family, now);
            return Err(GrantError::Invalid("refresh_reused"));
        }
        Ok(r.clone())
    }

    /// Rotates a refresh token the request was accepted for: it stops being current and the
    /// caller issues the next. Checked again (another request may have rotated it meanwhile).
    pub fn rotate_refresh(
        &mut self,
        token: &str,
        client_id: &str,
        now: Instant,
    ) -> Result<Refresh, GrantError> {
        let r = self.check_refresh(token, client_id, now)?;
        if let Some(rec) = self.refresh.get_mut(token) {
            rec.current = false;
        }
        // Only the newest rotated-out tokens of a family are kept to recognise reuse.
        let mut rotated: Vec<(String, Instant)> = self
            .refresh
            .iter()
            .filter(|(_, v)| v.family == r.family && !v.current)
            .map(|(k, v)| (k.clone(), v.made))
            .collect();
        if rotated.len() > ROTATED_PER_FAMILY {
            rotated.sort_by_key(|x| x.1);
            for (k, _) in rotated.iter().take(rotated.len() - ROTATED_PER_FAMILY) {
                self.refresh.remove(k);
            }
        }
        Ok(r)
    }

    /// Ends a family: its refresh tokens are forgotten and its access tokens refused.
    pub fn revoke(&mut self, family: u64, now: Instant) {
        self.refresh.retain(|_, r| r.family != family);
        let keep = Duration::from_secs(ACCESS_TTL_SECS + 120);
        self.revoked
            .retain(|_, at| now.saturating_duration_since(*at) < keep);
        self.revoked.insert(family, now);
    }

    /// Whether `family` was revoked.
    pub fn is_revoked(&self, family: u64) -> bool {
        self.revoked.contains_key(&family)
    }

    /// Families revoked now (for tests and metrics).
    pub fn revoked_families(&self) -> HashSet<u64> {
        self.revoked.keys().copied().collect()
    }
}

impl Pending {
    /// A pending authorization (its clock starts when it is added).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client_id: String,
        redirect_uri: String,
        redirect_explicit: bool,
        client_state: String,
        challenge: String,
        scopes: Vec<String>,
        resource: String,
        idp_verifier: String,
        from: IpAddr,
    ) -> Pending {
        Pending {
            client_id,
            redirect_uri,
            redirect_explicit,
            client_state,
            challenge,
            scopes,
            resource,
            idp_verifier,
            consented: false,
            browser: String::new(),
            from: address_owner(from),
            made: Instant::now(),
        }
    }
}

impl Grant {
    /// The code's grant, from the authorization it finishes and the user who signed in.
    pub fn from_pending(p: Pending, user: String) -> Grant {
        Grant {
            client_id: p.client_id,
            redirect_uri: p.redirect_uri,
            redirect_explicit: p.redirect_explicit,
            challenge: p.challenge,
            user,
            scopes: p.scopes,
            resource: p.resource,
            made: Instant::now(),
        }
    }
}

impl Refresh {
    /// A refresh token's record for `family`.
    pub fn new(
        family: u64,
        client_id: &str,
        user: &str,
        scopes: &[String],
        resource: &str,
    ) -> Refresh {
        Refresh {
            family,
            current: true,
            client_id: client_id.to_string(),
            user: user.to_string(),
            scopes: scopes.to_vec(),
            resource: resource.to_string(),
            made: Instant::now(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(client: &str) -> Grant {
        Grant {
            client_id: client.into(),
            redirect_uri: "https://c/cb".into(),
            redirect_explicit: true,
            challenge: "x".into(),
            user: "u".into(),
            scopes: vec![],
            resource: "https://g/mcp".into(),
            made: Instant::now(),
        }
    }

    #[test]
    fn a_code_is_single_use_and_its_replay_revokes_the_family() {
        let mut t = Tables::default();
        let now = Instant::now();
        t.add_code("c1".into(), grant("a"), now);
        let (_, family) = t.take_code("c1", "a", now).unwrap();
        t.add_refresh("r1".into(), Refresh::new(family, "a", "u", &[], "r"), now);
        assert_eq!(
            t.take_code("c1", "a", now).unwrap_err(),
            GrantError::Invalid("code_reused")
        );
        assert!(t.is_revoked(family));
        assert!(t.rotate_refresh("r1", "a", now).is_err());
    }

    #[test]
    fn a_code_expires_and_another_client_burns_it() {
        let mut t = Tables::default();
        let now = Instant::now();
        t.add_code("c1".into(), grant("a"), now);
        assert!(t.take_code("c1", "a", now + CODE_TTL).is_err());
        t.add_code("c2".into(), grant("a"), now);
        assert_eq!(
            t.take_code("c2", "b", now).unwrap_err(),
            GrantError::WrongClient
        );
        assert!(t.take_code("c2", "a", now).is_err());
    }

    #[test]
    fn a_rotated_refresh_token_presented_again_revokes_its_family() {
        let mut t = Tables::default();
        let now = Instant::now();
        t.add_refresh("r1".into(), Refresh::new(7, "a", "u", &[], "r"), now);
        t.rotate_refresh("r1", "a", now).unwrap();
        t.add_refresh("r2".into(), Refresh::new(7, "a", "u", &[], "r"), now);
        assert_eq!(
            t.rotate_refresh("r1", "a", now).unwrap_err(),
            GrantError::Invalid("refresh_reused")
        );
        assert!(t.is_revoked(7));
        assert!(t.rotate_refresh("r2", "a", now).is_err());
    }

    #[test]
    fn registrations_are_capped_and_rate_limited_per_address() {
        let mut t = Tables::default();
        let now = Instant::now();
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..REGISTER_BURST as usize {
            t.take_registration(a, now).unwrap();
        }
        assert!(matches!(
            t.take_registration(a, now),
            Err(Busy::RateLimited(_))
        ));
        t.take_registration(a, now + REGISTER_EVERY).unwrap();
        // An IPv6 host is one owner for its whole /64.
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        for _ in 0..REGISTER_BURST as usize {
            t.take_registration(v6, now).unwrap();
        }
        assert!(
            t.take_registration("2001:db8::ffff".parse().unwrap(), now)
                .is_err()
        );
    }

    fn client_from(addr: &str) -> Client {
        Client {
            redirect_uris: vec![],
            name: None,
            from: addr.parse().unwrap(),
        }
    }

    #[test]
    fn a_full_client_table_evicts_the_biggest_registrant_and_never_a_client_in_use() {
        let mut t = Tables::default();
        let now = Instant::now();
        // A legitimate client that signed in (holds a refresh token) and one that has not yet.
        t.register("used".into(), client_from("10.0.0.1"), now)
            .unwrap();
        t.add_refresh("r".into(), Refresh::new(1, "used", "u", &[], "r"), now);
        t.register("fresh".into(), client_from("10.0.0.2"), now)
            .unwrap();
        // A flood from many addresses, one of them busier than the rest.
        for i in 0..MAX_CLIENTS + 50 {
            let from = if i % 2 == 0 {
                "10.9.9.9".to_string()
            } else {
                format!("10.1.{}.{}", i / 250, i % 250)
            };
            t.register(
                format!("c{i}"),
                client_from(&from),
                now + Duration::from_millis(i as u64),
            )
            .unwrap();
        }
        assert_eq!(t.clients(), MAX_CLIENTS);
        assert!(t.client("used").is_some() && t.client("fresh").is_some());
        assert!(
            t.client("c0").is_none(),
            "the busiest address loses its oldest"
        );
        // A client with only a sign-in in progress goes after every idle one, before any
        // holding a grant.
        let mut t = Tables::default();
        t.register("granted".into(), client_from("10.0.0.1"), now)
            .unwrap();
        t.add_code("code".into(), grant("granted"), now);
        t.register("signing".into(), client_from("10.0.0.1"), now)
            .unwrap();
        t.add_pending("p".into(), pending("signing", "10.0.0.1"), now);
        for i in 0..MAX_CLIENTS - 2 {
            t.register(format!("idle{i}"), client_from("10.0.0.2"), now)
                .unwrap();
        }
        t.register("x".into(), client_from("10.0.0.3"), now)
            .unwrap();
        assert!(t.client("signing").is_some() && t.client("granted").is_some());
        for i in 0..MAX_CLIENTS {
            t.register(format!("y{i}"), client_from("10.0.0.3"), now)
                .unwrap();
        }
        assert!(t.client("signing").is_some() && t.client("granted").is_some());
        // Only clients signing in or holding grants: one signing in goes.
        let mut t = Tables::default();
        for i in 0..MAX_CLIENTS - 1 {
            t.register(format!("g{i}"), client_from("10.0.0.1"), now)
                .unwrap();
            let mut g = grant(&format!("g{i}"));
            g.user = format!("u{i}");
            t.add_code(format!("code{i}"), g, now);
        }
        t.register("signing".into(), client_from("10.0.0.2"), now)
            .unwrap();
        t.add_pending("p".into(), pending("signing", "10.0.0.2"), now);
        t.register("new".into(), client_from("10.0.0.3"), now)
            .unwrap();
        assert!(t.client("signing").is_none() && t.client("g0").is_some());
        // When every client holds a grant, a registration is refused instead.
        let mut t = Tables::default();
        for i in 0..MAX_CLIENTS {
            t.register(format!("c{i}"), client_from("10.0.0.1"), now)
                .unwrap();
            t.add_refresh(
                format!("r{i}"),
                Refresh::new(i as u64 + 1, &format!("c{i}"), &format!("u{i}"), &[], "r"),
                now,
            );
        }
        assert_eq!(
            t.register("late".into(), client_from("10.0.0.3"), now),
            Err(Busy::Full)
        );
    }

    fn pending(client: &str, from: &str) -> Pending {
        Pending::new(
            client.into(),
            "u".into(),
            true,
            "s".into(),
            "c".into(),
            vec![],
            "r".into(),
            "v".into(),
            from.parse().unwrap(),
        )
    }

    #[test]
    fn one_address_or_client_flooding_pending_authorizations_pushes_out_only_its_own() {
        let mut t = Tables::default();
        let now = Instant::now();
        t.add_pending("victim".into(), pending("v", "10.0.0.1"), now);
        for i in 0..MAX_PENDING + 100 {
            t.add_pending(format!("a{i}"), pending(&format!("x{i}"), "10.6.6.6"), now);
        }
        // Many clients from many addresses: the table fills, the busiest holder pays.
        for i in 0..MAX_PENDING + 100 {
            let from = format!("10.7.{}.{}", i / 8 / 250, (i / 8) % 250);
            t.add_pending(format!("b{i}"), pending("flood", &from), now);
        }
        assert!(t.take_pending("victim", now).is_some());
        assert!(t.pending.len() <= MAX_PENDING);
        assert!(
            t.pending
                .values()
                .filter(|p| p.from.to_string() == "10.6.6.6")
                .count()
                <= PENDING_PER_ADDRESS
        );
        assert!(
            t.pending
                .values()
                .filter(|p| p.client_id == "flood")
                .count()
                <= PENDING_PER_CLIENT
        );
    }

    #[test]
    fn flooding_someone_elses_client_from_one_address_pushes_out_only_that_addresss_entries() {
        let mut t = Tables::default();
        let now = Instant::now();
        t.add_pending("victim".into(), pending("shared", "10.0.0.1"), now);
        for i in 0..100 {
            let from = format!("10.5.0.{}", i % 2 + 1);
            t.add_pending(
                format!("a{i}"),
                pending("shared", &from),
                now + Duration::from_millis(i),
            );
        }
        assert!(t.take_pending("victim", now).is_some());
        let mut t = Tables::default();
        let mut code = grant("shared");
        code.user = "victim".into();
        t.add_code("victim".into(), code, now);
        for i in 0..100 {
            let mut g = grant("shared");
            g.user = format!("attacker{}", i % 2);
            t.add_code(format!("c{i}"), g, now + Duration::from_millis(i));
        }
        assert!(t.take_code("victim", "shared", now).is_ok());
    }

    #[test]
    fn one_user_signing_in_again_and_again_evicts_only_their_own_codes_and_families() {
        let mut t = Tables::default();
        let now = Instant::now();
        let mut victim_code = grant("v");
        victim_code.user = "victim".into();
        t.add_code("victim".into(), victim_code, now);
        t.add_refresh(
            "victim-r".into(),
            Refresh::new(1, "v", "victim", &[], "r"),
            now,
        );
        for i in 0..MAX_CODES + 50 {
            let mut g = grant(&format!("a{i}"));
            g.user = "attacker".into();
            t.add_code(format!("c{i}"), g, now);
        }
        for i in 0..FAMILIES_PER_USER + 50 {
            t.add_refresh(
                format!("r{i}"),
                Refresh::new(i as u64 + 10, "a", "attacker", &[], "r"),
                now + Duration::from_millis(i as u64),
            );
        }
        assert!(t.take_code("victim", "v", now).is_ok());
        assert!(t.codes.values().filter(|g| g.user == "attacker").count() <= CODES_PER_USER);
        assert!(t.check_refresh("victim-r", "v", now).is_ok());
        let families: HashSet<u64> = t
            .refresh
            .values()
            .filter(|r| r.user == "attacker")
            .map(|r| r.family)
            .collect();
        assert_eq!(families.len(), FAMILIES_PER_USER);
        assert!(
            t.check_refresh("r0", "a", now).is_err(),
            "the oldest family went"
        );
    }

    #[test]
    fn one_client_signing_a_user_in_again_and_again_pushes_out_its_own_codes_and_families() {
        let mut t = Tables::default();
        let now = Instant::now();
        let mut mine = grant("mine");
        mine.user = "alice".into();
        t.add_code("mine".into(), mine, now);
        t.add_refresh(
            "mine-r".into(),
            Refresh::new(1, "mine", "alice", &[], "r"),
            now,
        );
        for i in 0..100 {
            let mut g = grant("flood");
            g.user = "alice".into();
            let at = now + Duration::from_millis(i + 1);
            t.add_code(format!("c{i}"), g, at);
            t.add_refresh(
                format!("r{i}"),
                Refresh::new(i + 10, "flood", "alice", &[], "r"),
                at,
            );
        }
        assert!(t.take_code("mine", "mine", now).is_ok());
        assert!(t.check_refresh("mine-r", "mine", now).is_ok());
    }

    #[test]
    fn a_refused_check_uses_nothing_and_a_wrong_client_revokes_the_family() {
        let mut t = Tables::default();
        let now = Instant::now();
        t.add_refresh("r1".into(), Refresh::new(5, "a", "u", &[], "r"), now);
        t.check_refresh("r1", "a", now).unwrap();
        t.check_refresh("r1", "a", now).unwrap();
        t.rotate_refresh("r1", "a", now).unwrap();
        t.add_refresh("r2".into(), Refresh::new(5, "a", "u", &[], "r"), now);
        assert_eq!(
            t.check_refresh("r2", "b", now).unwrap_err(),
            GrantError::WrongClient
        );
        assert!(t.is_revoked(5));
        assert!(t.check_refresh("r2", "a", now).is_err());
    }

    #[test]
    fn pending_authorizations_expire_and_are_single_use() {
        let mut t = Tables::default();
        let now = Instant::now();
        let p = pending("a", "127.0.0.1");
        t.add_pending("st".into(), p.clone(), now);
        assert!(t.take_pending("st", now).is_some());
        assert!(t.take_pending("st", now).is_none());
        t.add_pending("st2".into(), p, now);
        assert!(t.take_pending("st2", now + PENDING_TTL).is_none());
    }
}
