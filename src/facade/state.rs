//! What the authorization-server facade remembers between requests, shared by every worker
//! behind one short `Mutex` (these endpoints are rare): registered clients, authorizations
//! waiting for the identity provider, one-time codes, and refresh tokens with their families.
//! Every table is bounded and every entry expires; none of it survives a restart (clients
//! register again, users sign in again).

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Registered clients kept at most; the oldest registration goes first beyond it.
pub const MAX_CLIENTS: usize = 1000;
/// Registrations one address may make in a burst …
pub const REGISTER_BURST: f64 = 10.0;
/// … and then one per this long.
pub const REGISTER_EVERY: Duration = Duration::from_secs(6);
/// Addresses whose registration budget is remembered; beyond it the table starts afresh.
const MAX_ADDRESSES: usize = 4096;
/// Authorizations waiting for the identity provider, at most …
pub const MAX_PENDING: usize = 1000;
/// … each for this long (a person signing in at the IdP).
pub const PENDING_TTL: Duration = Duration::from_secs(600);
/// One-time codes outstanding, at most …
pub const MAX_CODES: usize = 1000;
/// … each valid this long.
pub const CODE_TTL: Duration = Duration::from_secs(60);
/// Refresh tokens remembered (current and rotated-out), at most.
pub const MAX_REFRESH: usize = 20_000;
/// A refresh token's life.
pub const REFRESH_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// An issued access token's life.
pub const ACCESS_TTL_SECS: u64 = 3600;

/// A client registered through RFC 7591. Public (no secret): PKCE binds its codes.
#[derive(Debug, Clone)]
pub struct Client {
    /// Its redirect URIs, compared byte for byte.
    pub redirect_uris: Vec<String>,
    /// What it calls itself (shown nowhere but the audit of its registration).
    pub name: Option<String>,
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
    clients: HashMap<String, Client>,
    client_order: VecDeque<String>,
    budgets: HashMap<IpAddr, (f64, Instant)>,
    pending: HashMap<String, Pending>,
    codes: HashMap<String, Grant>,
    /// Codes already exchanged, to the family they started (a replay revokes it), until they
    /// would have expired anyway.
    spent: HashMap<String, (u64, Instant)>,
    refresh: HashMap<String, Refresh>,
    /// Families revoked, until every access token of theirs has expired.
    revoked: HashMap<u64, Instant>,
    next_family: u64,
}

/// Why a registration was refused by the tables (the request itself was fine).
#[derive(Debug, PartialEq, Eq)]
pub enum Busy {
    /// This address registered too often; try again after this long.
    RateLimited(Duration),
}

/// Why a code or refresh token was refused at `/token` (all `invalid_grant` on the wire).
#[derive(Debug, PartialEq, Eq)]
pub enum GrantError {
    /// Unknown, expired, or already used.
    Invalid(&'static str),
    /// Presented by a client other than its own.
    WrongClient,
}

fn evict_oldest<V>(map: &mut HashMap<String, V>, made: impl Fn(&V) -> Instant) {
    if let Some(oldest) = map
        .iter()
        .min_by_key(|(_, v)| made(v))
        .map(|(k, _)| k.clone())
    {
        map.remove(&oldest);
    }
}

impl Tables {
    /// A new family number.
    fn family(&mut self) -> u64 {
        self.next_family += 1;
        self.next_family
    }

    /// Spends one of `addr`'s registrations, or says how long until it has one.
    pub fn take_registration(&mut self, addr: IpAddr, now: Instant) -> Result<(), Busy> {
        if self.budgets.len() >= MAX_ADDRESSES && !self.budgets.contains_key(&addr) {
            // Forgetting every budget favours no one in particular; each address starts with a
            // burst again, and the client cap still bounds what they can add.
            self.budgets.clear();
        }
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

    /// Registers a client under `id`; the oldest registration is forgotten beyond the cap.
    pub fn register(&mut self, id: String, client: Client) {
        while self.clients.len() >= MAX_CLIENTS {
            match self.client_order.pop_front() {
                Some(old) => {
                    self.clients.remove(&old);
                }
                None => break,
            }
        }
        self.client_order.push_back(id.clone());
        self.clients.insert(id, client);
    }

    /// A registered client.
    pub fn client(&self, id: &str) -> Option<&Client> {
        self.clients.get(id)
    }

    /// How many clients are registered.
    pub fn clients(&self) -> usize {
        self.clients.len()
    }

    /// Remembers an authorization under `key`: the consent page's ticket, then the facade's
    /// own `state` towards the IdP.
    pub fn add_pending(&mut self, state: String, mut p: Pending, now: Instant) {
        self.pending
            .retain(|_, v| now.saturating_duration_since(v.made) < PENDING_TTL);
        while self.pending.len() >= MAX_PENDING {
            evict_oldest(&mut self.pending, |v| v.made);
        }
        p.made = now;
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
        while self.codes.len() >= MAX_CODES {
            evict_oldest(&mut self.codes, |v| v.made);
        }
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
            evict_oldest(&mut self.spent, |v| v.1);
        }
        self.spent.insert(code.to_string(), (family, now));
        if grant.client_id != client_id {
            // Spent all the same: a code that leaked to another client is burnt.
            self.revoke(family, now);
            return Err(GrantError::WrongClient);
        }
        Ok((grant, family))
    }

    /// Records a new refresh token of `family`.
    pub fn add_refresh(&mut self, token: String, mut r: Refresh, now: Instant) {
        if self.refresh.len() >= MAX_REFRESH {
            self.refresh
                .retain(|_, v| now.saturating_duration_since(v.made) < REFRESH_TTL);
        }
        while self.refresh.len() >= MAX_REFRESH {
            evict_oldest(&mut self.refresh, |v| v.made);
        }
        r.made = now;
        r.current = true;
        self.refresh.insert(token, r);
    }

    /// Rotates a refresh token: the presented one stops being current and the caller issues
    /// the next. A rotated-out token presented again revokes its whole family.
    pub fn rotate_refresh(
        &mut self,
        token: &str,
        client_id: &str,
        now: Instant,
    ) -> Result<Refresh, GrantError> {
        let r = self
            .refresh
            .get_mut(token)
            .ok_or(GrantError::Invalid("refresh_unknown"))?;
        if now.saturating_duration_since(r.made) >= REFRESH_TTL {
            self.refresh.remove(token);
            return Err(GrantError::Invalid("refresh_expired"));
        }
        if r.client_id != client_id {
            return Err(GrantError::WrongClient);
        }
        if !r.current {
            let family = r.family;
            self.revoke(family, now);
            return Err(GrantError::Invalid("refresh_reused"));
        }
        r.current = false;
        Ok(r.clone())
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
        for i in 0..MAX_CLIENTS + 5 {
            t.register(
                format!("c{i}"),
                Client {
                    redirect_uris: vec![],
                    name: None,
                },
            );
        }
        assert_eq!(t.clients(), MAX_CLIENTS);
        assert!(t.client("c0").is_none() && t.client(&format!("c{}", MAX_CLIENTS + 4)).is_some());
    }

    #[test]
    fn pending_authorizations_expire_and_are_single_use() {
        let mut t = Tables::default();
        let now = Instant::now();
        let p = Pending::new(
            "a".into(),
            "u".into(),
            true,
            "s".into(),
            "c".into(),
            vec![],
            "r".into(),
            "v".into(),
        );
        t.add_pending("st".into(), p.clone(), now);
        assert!(t.take_pending("st", now).is_some());
        assert!(t.take_pending("st", now).is_none());
        t.add_pending("st2".into(), p, now);
        assert!(t.take_pending("st2", now + PENDING_TTL).is_none());
    }
}
