//! Who the agent is: from a header, a bearer key, or a request extension.
//!
//! # How it works
//!
//! The layer asks an [`Identify`] for the agent before it reads the body
//! or takes any budget, so an unknown caller costs nothing and learns
//! nothing but `401`. It sees only the request's head (method, URI,
//! headers, extensions). Three ready-made ones cover the usual setups:
//!
//! - [`AgentIdHeader`] (the default): the agent's UUID in a header,
//!   `x-agent-id` unless configured, for services behind an authenticating
//!   proxy that has already said who is calling.
//! - [`BearerKeys`]: `Authorization: Bearer <key>`, looked up in a map of
//!   keys to agents: the way an LLM gateway hands out API keys.
//! - [`AgentIdExtension`]: an [`AgentId`] an earlier layer (your own
//!   authentication) put in the request's extensions.
//!
//! Any `Fn(&request::Parts) -> Result<AgentId, Rejection>` closure works
//! too.

use std::collections::HashMap;
use std::sync::Arc;

use agent_budget::AgentId;
use http::header::{HeaderMap, HeaderName, AUTHORIZATION};
use http::request::Parts;

use crate::Rejection;

/// Tells which agent a request is for.
pub trait Identify: Clone + Send + Sync + 'static {
    /// The agent `request` is for, or the rejection to answer (`401`,
    /// typically) without forwarding or charging anything.
    fn identify(&self, request: &Parts) -> Result<AgentId, Rejection>;
}

impl<F> Identify for F
where
    F: Fn(&Parts) -> Result<AgentId, Rejection> + Clone + Send + Sync + 'static,
{
    fn identify(&self, request: &Parts) -> Result<AgentId, Rejection> {
        self(request)
    }
}

/// The agent's UUID in a request header (`x-agent-id` by default).
#[derive(Clone, Debug)]
pub struct AgentIdHeader {
    name: HeaderName,
}

impl AgentIdHeader {
    /// Reads the agent's UUID from the header `name`.
    pub fn new(name: HeaderName) -> Self {
        AgentIdHeader { name }
    }
}

impl Default for AgentIdHeader {
    fn default() -> Self {
        Self::new(HeaderName::from_static("x-agent-id"))
    }
}

impl Identify for AgentIdHeader {
    fn identify(&self, request: &Parts) -> Result<AgentId, Rejection> {
        let value = request.headers.get(&self.name).ok_or_else(|| {
            Rejection::unauthenticated(format!("missing the {} header", self.name))
        })?;
        value
            .to_str()
            .ok()
            .and_then(|s| AgentId::try_parse(s.trim()).ok())
            .ok_or_else(|| {
                Rejection::unauthenticated(format!("the {} header is not a UUID", self.name))
            })
    }
}

/// `Authorization: Bearer <key>`, looked up in a map of keys to agents.
///
/// The map is shared (an `Arc`), so clones of the layer cost nothing.
///
/// The map hashes with `ahash`, keyed at random like the standard library's
/// SipHash (a caller cannot choose keys that collide) at a fifth of its
/// cost for a key of a few dozen bytes.
#[derive(Clone, Debug, Default)]
pub struct BearerKeys {
    keys: Arc<HashMap<String, AgentId, ahash::RandomState>>,
}

impl BearerKeys {
    /// Identifies callers by the keys of `keys`.
    pub fn new(keys: HashMap<String, AgentId>) -> Self {
        BearerKeys {
            keys: Arc::new(keys.into_iter().collect()),
        }
    }

    /// The agent of `key`, if it is known.
    pub fn agent_of(&self, key: &str) -> Option<AgentId> {
        self.keys.get(key).copied()
    }
}

impl FromIterator<(String, AgentId)> for BearerKeys {
    fn from_iter<T: IntoIterator<Item = (String, AgentId)>>(iter: T) -> Self {
        Self::new(iter.into_iter().collect())
    }
}

/// The key of an `Authorization: Bearer <key>` header, if the headers have
/// one (the scheme is case-insensitive, as RFC 9110 says).
///
/// On the bytes, in one pass over the key: every request through
/// [`BearerKeys`] asks.
pub fn bearer_key(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.as_bytes().trim_ascii();
    let (scheme, rest) = value.split_at_checked(b"bearer".len())?;
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let key = rest.strip_prefix(b" ")?.trim_ascii();
    // What `HeaderValue::to_str` accepts: visible ASCII, spaces and tabs.
    // Folded without stopping early, so the loop is vectorized: a key is
    // almost always all visible, and read whole either way.
    let visible = |b: u8| b.wrapping_sub(b' ') <= b'~' - b' ' || b == b'\t';
    if key.is_empty() || !key.iter().fold(true, |all, &b| all & visible(b)) {
        return None;
    }
    std::str::from_utf8(key).ok()
}

impl Identify for BearerKeys {
    fn identify(&self, request: &Parts) -> Result<AgentId, Rejection> {
        let key = bearer_key(&request.headers).ok_or_else(|| {
            Rejection::unauthenticated(
                "You didn't provide an API key: send it as `Authorization: Bearer <key>`.",
            )
        })?;
        self.agent_of(key)
            .ok_or_else(|| Rejection::unauthenticated("Incorrect API key provided."))
    }
}

/// An [`AgentId`] that an earlier layer stored in the request's extensions.
#[derive(Clone, Copy, Debug, Default)]
pub struct AgentIdExtension;

impl Identify for AgentIdExtension {
    fn identify(&self, request: &Parts) -> Result<AgentId, Rejection> {
        request
            .extensions
            .get::<AgentId>()
            .copied()
            .ok_or_else(|| Rejection::unauthenticated("the request names no agent"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderValue, Request, StatusCode};

    fn parts(header: Option<(&str, &str)>) -> Parts {
        let mut builder = Request::builder();
        if let Some((name, value)) = header {
            builder = builder.header(name, value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn a_header_names_the_agent_by_uuid() {
        let id = AgentId::from_u128(7);
        let ident = AgentIdHeader::default();
        assert_eq!(
            ident.identify(&parts(Some(("x-agent-id", &id.to_string())))),
            Ok(id)
        );
        for bad in [
            None,
            Some(("x-agent-id", "not-a-uuid")),
            Some(("x-agent-id", "")),
        ] {
            let r = ident.identify(&parts(bad)).unwrap_err();
            assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        }
    }

    #[test]
    fn bearer_keys_map_keys_to_agents() {
        let id = AgentId::from_u128(9);
        let keys: BearerKeys = [("sk-1".to_owned(), id)].into_iter().collect();
        for ok in ["Bearer sk-1", "bearer  sk-1 ", "BEARER sk-1"] {
            assert_eq!(
                keys.identify(&parts(Some(("authorization", ok)))),
                Ok(id),
                "{ok}"
            );
        }
        for bad in [
            None,
            Some(("authorization", "Bearer sk-2")),
            Some(("authorization", "Basic sk-1")),
            Some(("authorization", "Bearer")),
            Some(("authorization", "Bearer ")),
            Some(("authorization", "sk-1")),
        ] {
            let r = keys.identify(&parts(bad)).unwrap_err();
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{bad:?}");
        }
    }

    /// The header as first read: `to_str`, `trim`, `split_once`.
    fn bearer_key_by_str(headers: &HeaderMap) -> Option<&str> {
        let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
        let (scheme, key) = value.trim().split_once(' ')?;
        let key = key.trim();
        (scheme.eq_ignore_ascii_case("bearer") && !key.is_empty()).then_some(key)
    }

    #[test]
    fn the_key_is_read_from_the_bytes_as_from_the_text() {
        let pieces: [&[u8]; 12] = [
            b"Bearer",
            b"bearer",
            b"BEARER",
            b"Bear",
            b" ",
            b"  ",
            b"\t",
            b"sk-1",
            b"a b",
            b"\xc3\xa9",
            b"\x7f",
            b"Basic",
        ];
        let mut checked = 0;
        for a in pieces {
            for b in pieces {
                for c in pieces {
                    let value = [a, b, c].concat();
                    let Ok(value) = HeaderValue::from_bytes(&value) else {
                        continue;
                    };
                    let mut headers = HeaderMap::new();
                    headers.insert(AUTHORIZATION, value);
                    assert_eq!(
                        bearer_key(&headers),
                        bearer_key_by_str(&headers),
                        "{:?}",
                        headers[AUTHORIZATION]
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked > 1_000, "{checked}");
    }

    #[test]
    fn an_extension_names_the_agent() {
        let id = AgentId::from_u128(3);
        let mut p = parts(None);
        assert!(AgentIdExtension.identify(&p).is_err());
        p.extensions.insert(id);
        assert_eq!(AgentIdExtension.identify(&p), Ok(id));
    }
}
