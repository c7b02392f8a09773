//! The admin token, for setups without client certificates: a shared secret
//! that stands for the admin role (as etcd's auth token does).
//!
//! - A node with `admin_token_file` treats a call carrying
//!   `authorization: Bearer TOKEN` as the admin's. On a node without TLS,
//!   admin operations (membership, region promote/fence/configure,
//!   snapshots, backups) and writes of keys under `nines/` then need it;
//!   the rest stays open, as `insecure` says. With TLS, it lifts a client
//!   certificate to admin.
//! - A process that has the token ([`set_outgoing`]: the CLI given
//!   `--admin-token-file`, a node given `admin_token_file`) sends it with
//!   every call it makes ([`request`]); a node forwarding a call to its
//!   leader passes the caller's token on, or vouches for the call with its
//!   own ([`vouch`]): it admitted the call itself.
//! - One token for the whole cluster: every node and client of it sends
//!   the same. Without TLS the token guards the client port's admin
//!   operations and nines' own keys; the peer port stays open to whoever
//!   reaches it (firewall it).

use std::path::Path;
use std::sync::{Arc, OnceLock};

use subtle::ConstantTimeEq;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};

/// The metadata key that carries the token.
pub const HEADER: &str = "authorization";

/// Shortest token a node or the CLI accepts: long enough that guessing it
/// over the network is hopeless (`head -c 32 /dev/urandom | base64` makes 44).
pub const TOKEN_BYTES_MIN: usize = 16;

/// An admin token, read from its file.
#[derive(Clone)]
pub struct AdminToken(Arc<str>);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(…)")
    }
}

impl AdminToken {
    /// Reads the token in `path` (surrounding whitespace is not part of it).
    pub fn read(path: &Path) -> Result<AdminToken, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        AdminToken::new(text.trim()).map_err(|why| format!("{}: {why}", path.display()))
    }

    /// `token`, if it is one: at least [`TOKEN_BYTES_MIN`] visible ASCII
    /// characters.
    pub fn new(token: &str) -> Result<AdminToken, String> {
        if token.len() < TOKEN_BYTES_MIN {
            return Err(format!(
                "the admin token is {} bytes; it needs at least TOKEN_BYTES_MIN = {TOKEN_BYTES_MIN} \
                 (`head -c 32 /dev/urandom | base64` makes one)",
                token.len()
            ));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the admin token may hold only visible ASCII characters (no spaces)".into());
        }
        Ok(AdminToken(token.into()))
    }

    /// Whether `headers` carry this token (compared in constant time).
    pub fn presented(&self, headers: &::http::HeaderMap) -> bool {
        headers
            .get(HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| bool::from(t.as_bytes().ct_eq(self.0.as_bytes())))
    }

    fn value(&self) -> AsciiMetadataValue {
        // A token holds visible ASCII only (`new`), so this always parses.
        format!("Bearer {}", self.0).parse().expect("a token is visible ASCII")
    }
}

static OUTGOING: OnceLock<AdminToken> = OnceLock::new();

/// Sets the token this process sends with every call; the first call wins.
pub fn set_outgoing(token: AdminToken) {
    let _ = OUTGOING.set(token);
}

/// `msg` as a request, carrying this process's token if it has one.
pub fn request<M>(msg: M) -> tonic::Request<M> {
    let mut req = tonic::Request::new(msg);
    if let Some(token) = OUTGOING.get() {
        req.metadata_mut().insert(HEADER, token.value());
    }
    req
}

/// Adds this process's token to `to` unless it carries one already: a node
/// forwarding a call it admitted vouches for it.
pub fn vouch(to: &mut MetadataMap) {
    if let (None, Some(token)) = (to.get(HEADER), OUTGOING.get()) {
        to.insert(HEADER, token.value());
    }
}

/// Copies the token a request came with (if any) into `to`, for a call
/// forwarded on its behalf.
pub fn pass_on(from: &MetadataMap, to: &mut MetadataMap) {
    if let Some(v) = from.get(HEADER) {
        to.insert(HEADER, v.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_token_is_presented() {
        let token = AdminToken::new("0123456789abcdef-secret").unwrap();
        let headers = |v: &str| {
            let mut h = ::http::HeaderMap::new();
            h.insert(HEADER, v.parse().unwrap());
            h
        };
        assert!(token.presented(&headers("Bearer 0123456789abcdef-secret")));
        for wrong in ["Bearer 0123456789abcdef-secreT", "Bearer 0123456789abcdef", "0123456789abcdef-secret", "Bearer "]
        {
            assert!(!token.presented(&headers(wrong)), "{wrong}");
        }
        assert!(!token.presented(&::http::HeaderMap::new()));
        assert!(AdminToken::new("short").unwrap_err().contains("TOKEN_BYTES_MIN"));
        assert!(AdminToken::new("has a space in it, long enough").unwrap_err().contains("visible ASCII"));
        assert_eq!(format!("{token:?}"), "AdminToken(…)", "never printed");
    }
}
