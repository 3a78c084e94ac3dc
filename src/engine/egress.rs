//! Which addresses `http` and `grpc` steps may connect to (`--egress-allow`).
//!
//! An allowlist entry is one of:
//!
//! - `public`: any globally routable unicast address;
//! - a CIDR (`10.1.0.0/16`, `::1/128`) or a single address (`10.1.2.3`);
//! - a host name (`api.example.com`), or `*.example.com` for its subdomains
//!   (not the name itself): a request to such a name may connect to whatever
//!   it resolves to, private addresses included, because the operator named
//!   it;
//!
//! each optionally followed by `:port` (`api.example.com:443`,
//! `10.0.0.0/8:8080`, `[::1]:9000`, `[fd00::/8]:443`, `public:443`) to allow
//! that port only. The default is `public` alone.
//!
//! A connection is allowed if one entry allows the (name, address, port) it
//! goes to. Names are resolved here, every address is checked, and steps
//! connect only to checked addresses, so a name that resolves to a public
//! address when checked and to 127.0.0.1 when connecting (DNS rebinding)
//! cannot get through. IPv4-mapped IPv6 addresses (`::ffff:127.0.0.1`) are
//! checked as the IPv4 address they reach, and so are entries written that
//! way.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

/// What a refused step's message tells the operator to use.
pub const FLAG: &str = "--egress-allow (PIPELINED_EGRESS_ALLOW)";

/// The allowlist in effect. Cheap to clone.
#[derive(Debug, Clone)]
pub struct EgressPolicy {
    entries: Arc<[Entry]>,
}

impl Default for EgressPolicy {
    /// `public` alone.
    fn default() -> Self {
        Self {
            entries: Arc::new([Entry {
                rule: Rule::Public,
                port: None,
            }]),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Entry {
    rule: Rule,
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq)]
enum Rule {
    Public,
    Net(IpNet),
    /// An exact host name, lowercase, without a trailing dot.
    Host(String),
    /// `*.example.com`, kept as `.example.com`.
    Subdomains(String),
}

/// Why an address is not public.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    Public,
    Loopback,
    /// RFC 1918, fc00::/7.
    Private,
    /// 169.254.0.0/16 (with the cloud metadata address), fe80::/10.
    LinkLocal,
    /// 100.64.0.0/10, carrier-grade NAT.
    SharedNat,
    Unspecified,
    Multicast,
    Broadcast,
    Documentation,
    /// Any other range that is not globally routable.
    Reserved,
}

impl fmt::Display for AddressClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Public => "public",
            Self::Loopback => "loopback",
            Self::Private => "private",
            Self::LinkLocal => "link-local",
            Self::SharedNat => "shared (CGNAT)",
            Self::Unspecified => "unspecified",
            Self::Multicast => "multicast",
            Self::Broadcast => "broadcast",
            Self::Documentation => "documentation",
            Self::Reserved => "reserved",
        })
    }
}

/// `ip`, with an IPv4-mapped IPv6 address as the IPv4 address it reaches.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The kind of address `ip` is.
pub fn classify(ip: IpAddr) -> AddressClass {
    match canonical(ip) {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddressClass {
    use AddressClass::*;
    let [a, b, c, _] = ip.octets();
    match (a, b, c) {
        _ if ip.is_unspecified() => Unspecified,
        _ if ip.is_broadcast() => Broadcast,
        (0, ..) => Reserved,
        (10, ..) => Private,
        (100, 64..=127, _) => SharedNat,
        (127, ..) => Loopback,
        (169, 254, _) => LinkLocal,
        (172, 16..=31, _) => Private,
        (192, 0, 0) => Reserved,
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => Documentation,
        (192, 88, 99) => Reserved,
        (192, 168, _) => Private,
        (198, 18..=19, _) => Reserved,
        (224..=239, ..) => Multicast,
        (240..=255, ..) => Reserved,
        _ => Public,
    }
}

fn classify_v6(ip: Ipv6Addr) -> AddressClass {
    use AddressClass::*;
    let s = ip.segments();
    if ip.is_unspecified() {
        return Unspecified;
    }
    if ip.is_loopback() {
        return Loopback;
    }
    match s[0] {
        0xff00..=0xffff => return Multicast,
        0xfc00..=0xfdff => return Private,
        0xfe80..=0xfebf => return LinkLocal,
        _ => {}
    }
    // NAT64 (64:ff9b::/96) reaches the IPv4 address in its last 32 bits.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let [a, b] = s[6].to_be_bytes();
        let [c, d] = s[7].to_be_bytes();
        return classify_v4(Ipv4Addr::new(a, b, c, d));
    }
    // Global unicast is 2000::/3; within it, these are not globally routable.
    if !(0x2000..=0x3fff).contains(&s[0]) {
        return Reserved;
    }
    if s[0] == 0x2001 && s[1] == 0x0db8 || s[0] == 0x3fff && s[1] < 0x1000 {
        return Documentation;
    }
    // 2001::/23 (IETF protocol assignments, Teredo) and 2002::/16 (6to4).
    if s[0] == 0x2001 && s[1] < 0x0200 || s[0] == 0x2002 {
        return Reserved;
    }
    Public
}

/// Why a connection is refused or could not be checked.
#[derive(Debug, Clone, PartialEq)]
pub enum EgressError {
    /// Refused by the allowlist: the message names the target and the flag.
    Denied(String),
    /// The name could not be resolved.
    Lookup(String),
}

/// How long resolving a name may take.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

impl EgressPolicy {
    /// The policy of these `--egress-allow` entries; an error names the
    /// first bad entry and says why.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, String> {
        let entries = entries
            .iter()
            .map(|text| {
                let text = text.as_ref().trim();
                parse_entry(text)
                    .map_err(|why| format!("invalid --egress-allow entry '{text}': {why}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            entries: entries.into(),
        })
    }

    /// Whether a connection to `ip`:`port`, reached through the name
    /// `host` (if any), is allowed.
    pub fn allows(&self, host: Option<&str>, ip: IpAddr, port: u16) -> bool {
        self.name_allowed(host, port) || self.address_allowed(ip, port)
    }

    /// Whether a host entry allows `host`:`port` whatever it resolves to.
    fn name_allowed(&self, host: Option<&str>, port: u16) -> bool {
        let Some(host) = host else { return false };
        let host = normal_name(host);
        self.entries.iter().any(|entry| {
            entry.port.is_none_or(|p| p == port)
                && match &entry.rule {
                    Rule::Host(name) => *name == host,
                    Rule::Subdomains(suffix) => host.ends_with(suffix.as_str()),
                    _ => false,
                }
        })
    }

    fn address_allowed(&self, ip: IpAddr, port: u16) -> bool {
        let ip = canonical(ip);
        self.entries.iter().any(|entry| {
            entry.port.is_none_or(|p| p == port)
                && match &entry.rule {
                    Rule::Public => classify(ip) == AddressClass::Public,
                    Rule::Net(net) => net.contains(&ip),
                    _ => false,
                }
        })
    }

    /// The addresses a step may connect to for `host`:`port` (a name or an
    /// IP literal, IPv6 with or without brackets): every address the name
    /// resolves to that is allowed. None allowed is [`EgressError::Denied`].
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, EgressError> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            let addr = SocketAddr::new(ip, port);
            return if self.address_allowed(ip, port) {
                Ok(vec![addr])
            } else {
                Err(EgressError::Denied(format!(
                    "egress to {addr} is not allowed: {} address; allow it with {FLAG}, e.g. {}",
                    classify(ip),
                    suggestion(ip),
                )))
            };
        }
        let lookup = tokio::net::lookup_host((bare, port));
        let found: Vec<SocketAddr> = match tokio::time::timeout(LOOKUP_TIMEOUT, lookup).await {
            Ok(Ok(addrs)) => addrs.collect(),
            Ok(Err(e)) => return Err(EgressError::Lookup(format!("cannot resolve {bare}: {e}"))),
            Err(_) => {
                return Err(EgressError::Lookup(format!(
                    "cannot resolve {bare}: no answer within {}s",
                    LOOKUP_TIMEOUT.as_secs()
                )));
            }
        };
        if found.is_empty() {
            return Err(EgressError::Lookup(format!("{bare} has no address")));
        }
        if self.name_allowed(Some(bare), port) {
            return Ok(found);
        }
        let (allowed, refused): (Vec<SocketAddr>, Vec<SocketAddr>) = found
            .into_iter()
            .partition(|addr| self.address_allowed(addr.ip(), port));
        if !allowed.is_empty() {
            return Ok(allowed);
        }
        let listed = refused
            .iter()
            .map(|addr| format!("{} ({})", addr.ip(), classify(addr.ip())))
            .collect::<Vec<_>>()
            .join(", ");
        Err(EgressError::Denied(format!(
            "egress to {bare}:{port} is not allowed: it resolves to {listed}; allow it with {FLAG}, \
             e.g. {}:{port} or {}",
            normal_name(bare),
            suggestion(refused[0].ip()),
        )))
    }
}

/// An entry that would allow `ip`:`port`.
fn suggestion(ip: IpAddr) -> String {
    match canonical(ip) {
        IpAddr::V4(v4) => format!("{v4}/32"),
        IpAddr::V6(v6) => format!("{v6}/128"),
    }
}

fn normal_name(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

fn parse_entry(text: &str) -> Result<Entry, String> {
    if text.is_empty() {
        return Err("empty entry".to_string());
    }
    // `[v6 or v6/len]:port`, or `[...]` alone.
    let (body, port) = if let Some(rest) = text.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or("'[' without a closing ']'")?;
        let port = match after {
            "" => None,
            after => Some(parse_port(
                after
                    .strip_prefix(':')
                    .ok_or("expected ':port' after ']'")?,
            )?),
        };
        (inside, port)
    } else if text.matches(':').count() == 1 {
        // `host:port`, `1.2.3.4:port`, `10.0.0.0/8:port`, `public:port`.
        let (body, port) = text.split_once(':').expect("one colon");
        (body, Some(parse_port(port)?))
    } else {
        // No colon, or a bare IPv6 address or CIDR.
        (text, None)
    };
    let rule = if body.eq_ignore_ascii_case("public") {
        Rule::Public
    } else if body.contains('/') {
        let net: IpNet = body
            .parse()
            .map_err(|_| format!("'{body}' is not a CIDR such as 10.0.0.0/8 or fd00::/8"))?;
        Rule::Net(canonical_net(net.trunc()))
    } else if let Ok(ip) = body.parse::<IpAddr>() {
        let ip = canonical(ip);
        let len = if ip.is_ipv4() { 32 } else { 128 };
        Rule::Net(IpNet::new(ip, len).expect("a full-length prefix"))
    } else if let Some(domain) = body.strip_prefix("*.") {
        check_name(domain)?;
        Rule::Subdomains(format!(".{}", normal_name(domain)))
    } else {
        check_name(body)?;
        Rule::Host(normal_name(body))
    };
    Ok(Entry { rule, port })
}

/// A network written as IPv4-mapped IPv6 (`::ffff:10.0.0.0/104`) as the
/// IPv4 network it stands for.
fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && let Some(v4) = v6.network().to_ipv4_mapped()
    {
        return IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).expect("a valid prefix");
    }
    net
}

fn parse_port(text: &str) -> Result<u16, String> {
    text.parse::<u16>()
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| format!("'{text}' is not a port from 1 to 65535"))
}

fn check_name(name: &str) -> Result<(), String> {
    let name = name.trim_end_matches('.');
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if valid {
        Ok(())
    } else {
        Err(format!(
            "'{name}' is not a host name, an address, a CIDR or 'public'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn ipv4_classes() {
        use AddressClass::*;
        for (text, class) in [
            ("8.8.8.8", Public),
            ("1.1.1.1", Public),
            ("127.0.0.1", Loopback),
            ("127.255.0.9", Loopback),
            ("10.1.2.3", Private),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("172.32.0.1", Public),
            ("192.168.1.1", Private),
            ("169.254.169.254", LinkLocal),
            ("100.64.0.1", SharedNat),
            ("100.127.255.255", SharedNat),
            ("100.128.0.1", Public),
            ("0.0.0.0", Unspecified),
            ("0.1.2.3", Reserved),
            ("224.0.0.1", Multicast),
            ("255.255.255.255", Broadcast),
            ("240.0.0.1", Reserved),
            ("192.0.2.1", Documentation),
            ("198.18.0.1", Reserved),
            ("192.0.0.8", Reserved),
        ] {
            assert_eq!(classify(ip(text)), class, "{text}");
        }
    }

    #[test]
    fn ipv6_classes_and_mapped_addresses() {
        use AddressClass::*;
        for (text, class) in [
            ("2606:4700:4700::1111", Public),
            ("::1", Loopback),
            ("::", Unspecified),
            ("fc00::1", Private),
            ("fd12:3456::1", Private),
            ("fe80::1", LinkLocal),
            ("ff02::1", Multicast),
            ("2001:db8::1", Documentation),
            ("::ffff:127.0.0.1", Loopback),
            ("::ffff:169.254.169.254", LinkLocal),
            ("::ffff:10.0.0.1", Private),
            ("::ffff:8.8.8.8", Public),
            ("64:ff9b::7f00:1", Loopback),
            ("64:ff9b::808:808", Public),
            ("::127.0.0.1", Reserved),
            ("2002:7f00:1::1", Reserved),
            ("2001::1", Reserved),
            ("100::1", Reserved),
        ] {
            assert_eq!(classify(ip(text)), class, "{text}");
        }
    }

    #[test]
    fn the_default_allows_public_addresses_only() {
        let policy = EgressPolicy::default();
        assert!(policy.allows(None, ip("8.8.8.8"), 443));
        for text in [
            "127.0.0.1",
            "::1",
            "169.254.169.254",
            "10.0.0.1",
            "::ffff:127.0.0.1",
            "::ffff:a9fe:a9fe",
            "fd00::1",
            "100.64.0.1",
        ] {
            assert!(!policy.allows(None, ip(text), 80), "{text}");
        }
    }

    #[test]
    fn cidrs_addresses_and_ports() {
        let policy = EgressPolicy::parse(&[
            "10.1.0.0/16",
            "127.0.0.1/32",
            "::1/128",
            "192.168.1.5:8080",
            "[fd00::/8]:443",
            "::ffff:172.16.0.0/108",
        ])
        .unwrap();
        assert!(policy.allows(None, ip("10.1.200.3"), 80));
        assert!(!policy.allows(None, ip("10.2.0.1"), 80));
        assert!(policy.allows(None, ip("127.0.0.1"), 1));
        assert!(
            policy.allows(None, ip("::ffff:127.0.0.1"), 1),
            "a mapped address is its IPv4 address"
        );
        assert!(!policy.allows(None, ip("127.0.0.2"), 1));
        assert!(policy.allows(None, ip("::1"), 9));
        assert!(policy.allows(None, ip("192.168.1.5"), 8080));
        assert!(!policy.allows(None, ip("192.168.1.5"), 80));
        assert!(policy.allows(None, ip("fd12::1"), 443));
        assert!(!policy.allows(None, ip("fd12::1"), 80));
        assert!(
            policy.allows(None, ip("172.16.9.9"), 80),
            "a mapped CIDR is IPv4"
        );
        assert!(
            !policy.allows(None, ip("8.8.8.8"), 443),
            "without 'public' a public address is refused"
        );
    }

    #[test]
    fn host_names_and_subdomains() {
        let policy = EgressPolicy::parse(&["api.example.com", "*.internal.test:8443"]).unwrap();
        let private = ip("10.0.0.1");
        assert!(policy.allows(Some("api.example.com"), private, 80));
        assert!(policy.allows(Some("API.Example.com."), private, 443));
        assert!(!policy.allows(Some("other.example.com"), private, 80));
        assert!(!policy.allows(Some("evil-api.example.com"), private, 80));
        assert!(policy.allows(Some("a.b.internal.test"), private, 8443));
        assert!(!policy.allows(Some("a.internal.test"), private, 80));
        assert!(
            !policy.allows(Some("internal.test"), private, 8443),
            "*.x covers subdomains only"
        );
        assert!(!policy.allows(None, private, 80));
    }

    #[test]
    fn bad_entries_are_named() {
        for (entry, why) in [
            ("10.0.0.0/33", "not a CIDR"),
            ("host:0", "not a port"),
            ("host:http", "not a port"),
            ("", "empty"),
            ("bad host", "not a host name"),
            ("[::1", "closing"),
            ("*.", "not a host name"),
            ("-x.com", "not a host name"),
        ] {
            let error = EgressPolicy::parse(&[entry]).unwrap_err();
            assert!(error.contains(why), "{entry}: {error}");
            assert!(error.contains("--egress-allow"), "{error}");
        }
        assert!(EgressPolicy::parse(&["public", "public:443", "[::1]:80", "::1"]).is_ok());
    }

    #[tokio::test]
    async fn resolve_checks_every_address_of_a_name() {
        let policy = EgressPolicy::default();
        let Err(EgressError::Denied(message)) = policy.resolve("localhost", 8080).await else {
            panic!("localhost is loopback")
        };
        assert!(message.contains("localhost:8080"), "{message}");
        assert!(message.contains("loopback"), "{message}");
        assert!(message.contains("--egress-allow"), "{message}");
        let Err(EgressError::Denied(message)) = policy.resolve("[::1]", 80).await else {
            panic!("::1 is loopback")
        };
        assert!(message.contains("[::1]:80"), "{message}");
        let loopback = EgressPolicy::parse(&["127.0.0.0/8"]).unwrap();
        let addrs = loopback.resolve("127.0.0.1", 80).await.unwrap();
        assert_eq!(addrs, vec![SocketAddr::from(([127, 0, 0, 1], 80))]);
        let named = EgressPolicy::parse(&["localhost:80"]).unwrap();
        assert!(!named.resolve("localhost", 80).await.unwrap().is_empty());
        assert!(matches!(
            named.resolve("localhost", 81).await,
            Err(EgressError::Denied(_))
        ));
    }
}
