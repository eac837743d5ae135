//! Where the bridge may connect. Hosts come from API callers (a mailbox's
//! IMAP and SMTP servers), the operator (webhook URLs, OAuth endpoints) and
//! DNS: each is resolved and every address checked before a connection is
//! made, so a caller cannot make the daemon reach the cloud's metadata
//! service or, with `[network] allow_private = false`, the operator's own
//! network (SSRF).
//!
//! Always refused: link-local (169.254.0.0/16, fe80::/10, where cloud
//! metadata services answer), AWS's fd00:ec2::254, unspecified, multicast and
//! broadcast addresses. Refused unless `allow_private`: loopback, RFC 1918,
//! shared address space (100.64.0.0/10) and unique-local (fc00::/7)
//! addresses. IPv4-mapped IPv6 addresses are judged as the IPv4 they carry.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

/// The IPv4 address an IPv6 one carries and reaches: IPv4-mapped
/// (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`), NAT64 (`64:ff9b::/96`,
/// `64:ff9b:1::/48`) and 6to4 (`2002:AABB:CCDD::/48`).
fn embedded_ipv4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = ip.segments();
    let low = Ipv4Addr::new(
        (s[6] >> 8) as u8,
        (s[6] & 0xff) as u8,
        (s[7] >> 8) as u8,
        (s[7] & 0xff) as u8,
    );
    if s[..6] == [0, 0, 0, 0, 0, 0] && !ip.is_loopback() && !ip.is_unspecified() {
        return Some(low);
    }
    if s[0] == 0x64 && s[1] == 0xff9b && (s[2..6] == [0, 0, 0, 0] || s[2] == 1) {
        return Some(low);
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            (s[1] & 0xff) as u8,
            (s[2] >> 8) as u8,
            (s[2] & 0xff) as u8,
        ));
    }
    None
}

/// The policy: built once from `[network]` and shared.
#[derive(Clone, Copy, Debug)]
pub struct Egress {
    pub allow_private: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EgressError {
    /// The name did not resolve, or resolved to nothing usable. Said the
    /// same way as a refused, reset or timed-out connection: an answer must
    /// not tell a caller which internal hosts and ports exist.
    #[error("could not connect to {0}")]
    Unreachable(String),
    /// Every address the name has is one the bridge does not connect to.
    #[error("{0} is not an address the bridge connects to ({1})")]
    Forbidden(String, &'static str),
}

impl Egress {
    /// Why the bridge does not connect to `ip`, or None when it may.
    pub fn refusal(&self, ip: IpAddr) -> Option<&'static str> {
        let ip = match ip {
            IpAddr::V6(v6) => match embedded_ipv4(v6) {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            },
            v4 => v4,
        };
        match ip {
            IpAddr::V4(v4) => self.refusal_v4(v4),
            IpAddr::V6(v6) => self.refusal_v6(v6),
        }
    }

    fn refusal_v4(&self, ip: Ipv4Addr) -> Option<&'static str> {
        // Alibaba Cloud's metadata service sits in the shared address space.
        if ip.is_link_local() || ip == Ipv4Addr::new(100, 100, 100, 200) {
            return Some("link-local, where cloud metadata services answer");
        }
        if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
            return Some("not a host address");
        }
        let [a, b, ..] = ip.octets();
        let shared = a == 100 && (64..128).contains(&b);
        if !self.allow_private && (ip.is_loopback() || ip.is_private() || shared) {
            return Some("a private or loopback address, and [network] allow_private is false");
        }
        None
    }

    fn refusal_v6(&self, ip: Ipv6Addr) -> Option<&'static str> {
        let first = ip.segments()[0];
        let aws_metadata = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
        if (first & 0xffc0) == 0xfe80 || ip == aws_metadata {
            return Some("link-local, where cloud metadata services answer");
        }
        if ip.is_unspecified() || ip.is_multicast() {
            return Some("not a host address");
        }
        let unique_local = (first & 0xfe00) == 0xfc00;
        if !self.allow_private && (ip.is_loopback() || unique_local) {
            return Some("a private or loopback address, and [network] allow_private is false");
        }
        None
    }

    /// The addresses of `host` the bridge may connect to on `port`, in the
    /// resolver's order. An IP literal is judged as it is.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, EgressError> {
        let shown = format!("{host}:{port}");
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let found: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((bare, port))
                .await
                .map_err(|_| EgressError::Unreachable(shown.clone()))?
                .collect(),
        };
        self.allowed(&shown, found)
    }

    /// `found` without what the policy refuses; an error if nothing is left.
    fn allowed(&self, shown: &str, found: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, EgressError> {
        let mut last_refusal = None;
        let allowed: Vec<SocketAddr> = found
            .into_iter()
            .filter(|address| match self.refusal(address.ip()) {
                Some(why) => {
                    last_refusal = Some(why);
                    false
                }
                None => true,
            })
            .collect();
        match (allowed.is_empty(), last_refusal) {
            (false, _) => Ok(allowed),
            (true, Some(why)) => Err(EgressError::Forbidden(shown.to_string(), why)),
            (true, None) => Err(EgressError::Unreachable(shown.to_string())),
        }
    }

    /// Checks an URL's host when it is an IP literal: reqwest connects to
    /// those without asking its resolver.
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), EgressError> {
        let host = url.host_str().unwrap_or_default();
        let Ok(ip) = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        else {
            return Ok(());
        };
        match self.refusal(ip) {
            Some(why) => Err(EgressError::Forbidden(ip.to_string(), why)),
            None => Ok(()),
        }
    }

    /// A resolver for reqwest clients (webhooks, OAuth): every name they
    /// look up goes through the policy.
    pub fn resolver(self) -> Arc<EgressResolver> {
        Arc::new(EgressResolver { egress: self })
    }
}

pub struct EgressResolver {
    egress: Egress,
}

impl reqwest::dns::Resolve for EgressResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let egress = self.egress;
        let host = name.as_str().to_string();
        Box::pin(async move {
            // Port 0: reqwest puts the URL's port in.
            let allowed = egress.resolve(&host, 0).await?;
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an IP address")
    }

    #[test]
    fn metadata_and_link_local_are_always_refused() {
        let open = Egress {
            allow_private: true,
        };
        for refused in [
            "169.254.169.254",
            "169.254.0.1",
            "fe80::1",
            "febf::1",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
            "100.100.100.200",
            "0.0.0.0",
            "::",
            "255.255.255.255",
            "224.0.0.1",
            "ff02::1",
        ] {
            assert!(open.refusal(ip(refused)).is_some(), "{refused}");
        }
        for allowed in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.1.1",
            "::1",
            "fd12::1",
            "8.8.8.8",
        ] {
            assert_eq!(open.refusal(ip(allowed)), None, "{allowed}");
        }
    }

    #[test]
    fn private_ranges_are_refused_when_not_allowed() {
        let closed = Egress {
            allow_private: false,
        };
        for refused in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.0.1",
            "100.64.0.1",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:5",
            "64:ff9b:1::a00:5",
            "2002:c0a8:101::1",
            "::10.0.0.1",
        ] {
            assert!(closed.refusal(ip(refused)).is_some(), "{refused}");
        }
        for allowed in ["8.8.8.8", "172.32.0.1", "100.128.0.1", "2a00:1450::1"] {
            assert_eq!(closed.refusal(ip(allowed)), None, "{allowed}");
        }
    }

    #[tokio::test]
    async fn a_name_or_literal_with_no_allowed_address_is_refused_without_connecting() {
        let closed = Egress {
            allow_private: false,
        };
        assert!(matches!(
            closed.resolve("localhost", 993).await,
            Err(EgressError::Forbidden(..))
        ));
        assert!(matches!(
            closed.resolve("[::1]", 993).await,
            Err(EgressError::Forbidden(..))
        ));
        let open = Egress {
            allow_private: true,
        };
        assert!(!open.resolve("localhost", 993).await.unwrap().is_empty());
        assert!(matches!(
            open.resolve("169.254.169.254", 80).await,
            Err(EgressError::Forbidden(..))
        ));
        assert_eq!(
            open.resolve("no-such-host.invalid", 993).await,
            Err(EgressError::Unreachable("no-such-host.invalid:993".into()))
        );
    }

    #[test]
    fn ip_literal_urls_are_checked() {
        let open = Egress {
            allow_private: true,
        };
        let url = |text: &str| reqwest::Url::parse(text).expect("an URL");
        assert!(
            open.check_url(&url("http://169.254.169.254/latest/meta-data"))
                .is_err()
        );
        assert!(open.check_url(&url("http://[fd00:ec2::254]/")).is_err());
        assert!(open.check_url(&url("http://127.0.0.1:8080/hook")).is_ok());
        assert!(open.check_url(&url("https://crm.example.com/hook")).is_ok());
    }
}
