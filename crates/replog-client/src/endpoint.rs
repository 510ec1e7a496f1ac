//! A replica server's address as clients take it.

use std::fmt;

use tonic::codegen::http::uri::Authority;

/// A replica server's gRPC address: `host:port`. Parsing accepts what
/// operators write: spaces around it, an `http://` before it, `/`s after
/// it; anything else (another scheme, a path, no port) is refused with the
/// reason.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint(String);

/// Why a string is not an [`Endpoint`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{given}' is not a replica's address host:port ({reason})")]
pub struct EndpointError {
    pub given: String,
    pub reason: &'static str,
}

impl Endpoint {
    pub fn parse(given: &str) -> Result<Endpoint, EndpointError> {
        let refuse = |reason| EndpointError {
            given: given.to_string(),
            reason,
        };
        let trimmed = given.trim();
        let address = trimmed
            .strip_prefix("http://")
            .unwrap_or(trimmed)
            .trim_end_matches('/');
        if address.is_empty() {
            return Err(refuse("empty"));
        }
        if address.contains("://") {
            return Err(refuse("replicas serve plain http://"));
        }
        if address.contains(['/', '?', '#', '@']) || address.contains(char::is_whitespace) {
            return Err(refuse("an address, not a URL with a path"));
        }
        let authority: Authority = address.parse().map_err(|_| refuse("not host:port"))?;
        if authority.host().is_empty() {
            return Err(refuse("no host"));
        }
        // After an IPv6 host's `]`, or after the last `:`.
        let after_host = address.rfind(']').map_or(address, |i| &address[i + 1..]);
        match after_host.rsplit_once(':').map(|(_, port)| port) {
            None | Some("") => return Err(refuse("no port")),
            Some(port) if port.parse::<u16>().is_err() => return Err(refuse("not a port number")),
            Some(_) => {}
        }
        Ok(Endpoint(address.to_string()))
    }

    /// `host:port`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The URI a channel connects to.
    pub fn uri(&self) -> String {
        format!("http://{}", self.0)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Endpoint {
    type Err = EndpointError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Endpoint::parse(s)
    }
}

impl AsRef<str> for Endpoint {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for Endpoint {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_as_operators_write_them() {
        for (given, want) in [
            ("127.0.0.1:7101", "127.0.0.1:7101"),
            (" 127.0.0.1:7101 ", "127.0.0.1:7101"),
            ("http://127.0.0.1:7101", "127.0.0.1:7101"),
            ("http://127.0.0.1:7101/", "127.0.0.1:7101"),
            ("replica-2.example:7101//", "replica-2.example:7101"),
            ("[::1]:7101", "[::1]:7101"),
        ] {
            assert_eq!(Endpoint::parse(given).unwrap().as_str(), want, "{given:?}");
        }
    }

    #[test]
    fn bad_endpoints_say_why() {
        for (given, reason) in [
            ("", "empty"),
            ("  ", "empty"),
            ("http://", "empty"),
            ("https://a:1", "replicas serve plain http://"),
            ("a:1/v3", "an address, not a URL with a path"),
            ("user@a:1", "an address, not a URL with a path"),
            ("a b:1", "an address, not a URL with a path"),
            ("a", "no port"),
            ("a:", "no port"),
            (":7101", "no host"),
            ("a:port", "not a port number"),
            ("a:99999", "not a port number"),
            ("a:b:c", "not host:port"),
            ("[::1]", "no port"),
        ] {
            let e = Endpoint::parse(given).unwrap_err();
            assert_eq!(e.reason, reason, "{given:?}");
            assert_eq!(e.given, given);
        }
        assert_eq!(
            Endpoint::parse("a").unwrap_err().to_string(),
            "'a' is not a replica's address host:port (no port)"
        );
    }
}
