//! mTLS identities, first in the chain: the name a client certificate carries becomes the
//! caller `mtls:<name>`. The certificate is the one this gateway verified in the TLS handshake
//! (`[server.tls] client_ca_path`), or, for a client in `trusted_proxy_ips` (a TLS terminator
//! in front), the one its `X-Client-Cert-*` headers describe. From any other address those
//! headers name nobody: they are ignored for identity, and never forwarded upstream.
//!
//! When the connection has a certificate from the gateway's own handshake, that certificate
//! decides and `X-Client-Cert-*` headers are ignored, also from a trusted proxy.
//!
//! A certificate that verified but lacks the configured name field, or whose name would not
//! read as what it is (blank, whitespace at either end, too long, control or invisible
//! characters, a quoted e-mail local part), is refused with its reason; so is one that has
//! expired or that a reload no longer trusts since the handshake; a request without a certificate goes on down the chain (and, with no other
//! credential, gets 401 like any missing credential).

use super::{AuthMethod, Identity};
use crate::authz::Policy;
use crate::config::schema::IdentitySource;
use crate::http::request::RequestHead;
use crate::tls::Peer;
use std::net::IpAddr;
use std::sync::Arc;

/// `[auth.mtls]`, compiled.
#[derive(Debug)]
pub struct MtlsProvider {
    /// Which certificate field names the caller.
    pub source: IdentitySource,
    /// What every certificate identity may do.
    pub policy: Arc<Policy>,
    /// Addresses whose `X-Client-Cert-*` headers are believed.
    pub trusted_proxies: Vec<IpNet>,
}

/// An address block: an address and how many leading bits of it must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// Parses `10.0.0.1`, `10.0.0.0/8`, `::1` or `fd00::/8`; host bits set under the prefix
    /// are refused (they usually mean a typo).
    pub fn parse(s: &str) -> Result<IpNet, String> {
        let (addr, prefix) = match s.split_once('/') {
            None => (s, None),
            Some((a, p)) => (a, Some(p)),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not an IP address or CIDR block"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.trim().parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(format!("`{s}`: the prefix length must be 0..={max}")),
            },
        };
        let net = IpNet { addr, prefix };
        if bits(addr) & !mask(addr, prefix) != 0 {
            return Err(format!(
                "`{s}` has host bits set below its prefix (write the network address)"
            ));
        }
        Ok(net)
    }

    /// Whether `ip` is in this block (an IPv4-mapped IPv6 address counts as its IPv4 one).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        if ip.is_ipv4() != self.addr.is_ipv4() {
            return false;
        }
        let m = mask(ip, self.prefix);
        bits(ip) & m == bits(self.addr) & m
    }
}

fn bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn mask(ip: IpAddr, prefix: u8) -> u128 {
    let width = if ip.is_ipv4() { 32 } else { 128 };
    if prefix == 0 {
        return 0;
    }
    let ones = u128::MAX << (128 - u32::from(prefix));
    ones >> (128 - width)
}

impl MtlsProvider {
    /// Whether `ip` is a trusted TLS terminator.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|n| n.contains(ip))
    }

    /// The certificate name this request presents: `Ok(None)` when it presents no certificate
    /// (the chain goes on), `Err(reason)` when it presents one that names nobody.
    pub fn presented<'h>(
        &self,
        head: &'h RequestHead,
        peer: Peer<'h>,
    ) -> Result<Option<&'h str>, &'static str> {
        // A certificate this gateway verified in its own handshake decides: headers from a
        // trusted proxy describe a certificate the proxy saw, and there is none here.
        if let Some(cert) = peer.cert
            && let Some(why) = cert.refused
        {
            return Err(why);
        }
        let name = match head.h.client_cert.as_deref() {
            Some(h) if peer.cert.is_none() && self.trusts(peer.ip()) && h.verified.is_some() => {
                // nginx says `NONE` when its client sent no certificate, `FAILED:<why>` when
                // one did not verify.
                match h.verified.as_deref() {
                    Some(v) if v.eq_ignore_ascii_case("none") => return Ok(None),
                    Some(v) if v.eq_ignore_ascii_case("success") => {}
                    _ => return Err("mtls_not_verified"),
                }
                match self.source {
                    IdentitySource::Cn => h.cn.as_deref(),
                    IdentitySource::SanDns => h.san_dns.as_deref(),
                    IdentitySource::SanEmail => h.san_email.as_deref(),
                    IdentitySource::SanUri => h.san_uri.as_deref(),
                }
            }
            _ => {
                let Some(cert) = peer.cert else {
                    return Ok(None);
                };
                match self.source {
                    IdentitySource::Cn => cert.cn.as_deref(),
                    IdentitySource::SanDns => cert.san_dns.as_deref(),
                    IdentitySource::SanEmail => cert.san_email.as_deref(),
                    IdentitySource::SanUri => cert.san_uri.as_deref(),
                }
            }
        };
        let name = name.ok_or("mtls_identity_missing")?;
        if !super::jwt::acceptable_identity(name) {
            return Err("mtls_bad_identity");
        }
        // An e-mail name is `local@domain` with a plain local part: a quoted one
        // (`"alice@example.org"@evil.com`) would read as somebody else's address.
        if self.source == IdentitySource::SanEmail
            && (name.contains('"') || name.bytes().filter(|&b| b == b'@').count() != 1)
        {
            return Err("mtls_bad_identity");
        }
        Ok(Some(name))
    }

    /// The identity a certificate name becomes: `mtls:<name>`, with `[auth.mtls]`'s policy.
    pub fn identity(&self, name: &str) -> Identity {
        Identity {
            id: Arc::from(format!("mtls:{name}")),
            method: AuthMethod::Mtls,
            policy: self.policy.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_blocks_parse_and_match() {
        let net = IpNet::parse("10.1.0.0/16").unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.0.9".parse().unwrap()));
        let one = IpNet::parse("127.0.0.1").unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let v6 = IpNet::parse("fd00::/8").unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("10.1.0.1".parse().unwrap()));
        assert!(
            IpNet::parse("0.0.0.0/0")
                .unwrap()
                .contains("1.2.3.4".parse().unwrap())
        );
        for bad in [
            "",
            "10.0.0",
            "10.0.0.1/33",
            "10.0.0.1/8",
            "proxy",
            "10.0.0.0/-1",
            "::1/129",
        ] {
            assert!(IpNet::parse(bad).is_err(), "{bad}");
        }
    }
}
