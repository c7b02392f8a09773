//! Transport security: mutual TLS on the gRPC port and who may call what.
//!
//! - A node with a `[tls]` section serves gRPC only over TLS and accepts
//!   only peers whose certificate chains to the cluster CA (`ca`); it
//!   presents `cert`. A handshake that fails (no certificate, another CA,
//!   plaintext) is refused and logged with the peer's address.
//! - Every certificate `nines certs create` issues names its role in the
//!   subject's organizational unit: `node` (with common name
//!   `node/REGION/ID`), `admin` or `client`. [`Gate`] checks the role
//!   against the method: data and read-only status for every role;
//!   membership, region promote/fence/configure, snapshots and backups for
//!   `admin` (and nodes of this region, which forward them to their
//!   leader); Raft only for nodes of this region; cross-region shipments
//!   only for nodes, and only as their own region (or this region's,
//!   forwarding: [`check_shipment_origin`]); writes of keys under `nines/`
//!   (the authority's leases and epochs) only for admins and nodes
//!   ([`check_key_write`]). A refusal is `PERMISSION_DENIED` naming the
//!   role the call needs.
//! - The process's own identity for the connections it makes (a node to its
//!   peers, the CLI to the cluster) is set once ([`set_client_identity`]);
//!   [`endpoint`] applies it to every `https://` URL.
//! - Without `[tls]` a node runs plaintext only when its configuration says
//!   `insecure = true`, and says so loudly at start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tonic::Status;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// The files of a node's (or a client's) TLS identity, PEM encoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The cluster CA: peers and clients must present a certificate it signed.
    pub ca: PathBuf,
    /// This node's certificate (`nines certs create` names it
    /// `node-REGION-ID.pem`).
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS handshakes under way at once on one node; connections beyond wait
/// in the kernel's accept queue.
pub const HANDSHAKES_IN_FLIGHT_MAX: usize = 256;

/// What a certificate entitles its holder to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// A node of `region` with id `id`.
    Node { region: String, id: u64 },
    /// Membership, region and backup operations, and everything a client may do.
    Admin,
    /// Reads, writes and status.
    Client,
}

impl Role {
    /// The organizational unit that carries the role in a certificate.
    pub fn unit(&self) -> &'static str {
        match self {
            Role::Node { .. } => "node",
            Role::Admin => "admin",
            Role::Client => "client",
        }
    }

    /// The certificate's common name for this role.
    pub fn common_name(&self) -> String {
        match self {
            Role::Node { region, id } => format!("node/{region}/{id}"),
            Role::Admin => "admin".into(),
            Role::Client => "client".into(),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.common_name())
    }
}

/// The role a DER certificate names, or why it names none.
pub fn role_of(der: &[u8]) -> Result<Role, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("unreadable certificate: {e}"))?;
    let subject = cert.subject();
    let unit = subject
        .iter_organizational_unit()
        .find_map(|a| a.as_str().ok())
        .ok_or("the certificate names no role (organizational unit)")?;
    let name = subject.iter_common_name().find_map(|a| a.as_str().ok()).unwrap_or_default();
    match unit {
        "admin" => Ok(Role::Admin),
        "client" => Ok(Role::Client),
        "node" => {
            let mut parts = name.split('/');
            match (parts.next(), parts.next(), parts.next().map(str::parse::<u64>), parts.next()) {
                (Some("node"), Some(region), Some(Ok(id)), None) if !region.is_empty() && id != 0 => {
                    Ok(Role::Node { region: region.to_string(), id })
                }
                _ => Err(format!("node certificate's common name {name:?} is not node/REGION/ID")),
            }
        }
        other => Err(format!("unknown role {other:?} in the certificate")),
    }
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("reading the {what} {}: {e}", path.display()))
}

impl TlsConfig {
    /// The identity for the connections this process makes.
    pub fn client(&self) -> anyhow::Result<ClientTlsConfig> {
        let ca = read(&self.ca, "CA certificate (--cacert)")?;
        let cert = read(&self.cert, "certificate (--cert)")?;
        let key = read(&self.key, "private key (--key)")?;
        Ok(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).identity(Identity::from_pem(cert, key)))
    }

    /// The server side: present `cert`, require a client certificate
    /// signed by `ca`.
    pub fn server(&self) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let pem_err = |path: &Path, what: &str| {
            let path = path.display().to_string();
            let what = what.to_string();
            move |e: rustls::pki_types::pem::Error| anyhow::anyhow!("{what} {path}: {e}")
        };
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(&read(&self.ca, "CA certificate")?) {
            roots.add(ca.map_err(pem_err(&self.ca, "CA certificate"))?)?;
        }
        anyhow::ensure!(!roots.is_empty(), "the CA certificate file {} holds no certificate", self.ca.display());
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(&self.cert, "certificate")?)
            .collect::<Result<_, _>>()
            .map_err(pem_err(&self.cert, "certificate"))?;
        anyhow::ensure!(!chain.is_empty(), "the certificate file {} holds no certificate", self.cert.display());
        let key = PrivateKeyDer::from_pem_slice(&read(&self.key, "private key")?)
            .map_err(pem_err(&self.key, "private key"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| anyhow::anyhow!("the CA certificate {}: {e}", self.ca.display()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| anyhow::anyhow!("certificate {} and key {}: {e}", self.cert.display(), self.key.display()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

static CLIENT_TLS: OnceLock<ClientTlsConfig> = OnceLock::new();

/// Sets this process's identity for the connections it makes to
/// `https://` URLs; the first call wins.
pub fn set_client_identity(tls: ClientTlsConfig) {
    let _ = CLIENT_TLS.set(tls);
}

/// This process's identity for `https://` URLs, if one was set (for the
/// client library's [`nines_client::ClientBuilder::tls`]).
pub fn client_identity() -> Option<ClientTlsConfig> {
    CLIENT_TLS.get().cloned()
}

/// An endpoint for `url`: over TLS with this process's identity when the
/// URL is `https://`.
pub fn endpoint(url: &str) -> Result<Endpoint, String> {
    let e = Endpoint::from_shared(url.to_string()).map_err(|e| e.to_string())?;
    if !url.starts_with("https://") {
        return Ok(e);
    }
    let tls = CLIENT_TLS.get().ok_or_else(|| {
        format!("{url} needs TLS: give --cacert, --cert and --key (or NINES_CACERT, NINES_CERT, NINES_KEY)")
    })?;
    e.tls_config(tls.clone()).map_err(|e| e.to_string())
}

/// Accepts TCP connections on `listener` and completes their TLS
/// handshakes concurrently (at most [`HANDSHAKES_IN_FLIGHT_MAX`], each within
/// [`HANDSHAKE_TIMEOUT`]); the established streams come out of the receiver.
/// A refused handshake is logged with the peer's address.
pub fn accept(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
) -> tokio::sync::mpsc::Receiver<std::io::Result<tokio_rustls::server::TlsStream<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let permits = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_IN_FLIGHT_MAX));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else { return };
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!("accepting a gRPC connection: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => {
                        metrics::counter!("nines_tls_handshakes_refused_total").increment(1);
                        tracing::warn!(%peer, "refused a TLS connection: {e}");
                    }
                    Err(_) => {
                        metrics::counter!("nines_tls_handshakes_refused_total").increment(1);
                        tracing::warn!(%peer, "refused a TLS connection: no handshake within {HANDSHAKE_TIMEOUT:?}");
                    }
                }
            });
        }
    });
    rx
}

/// Who may call a gRPC method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// Any certificate of the cluster.
    Anyone,
    /// An admin, or a node of this region (which forwards admin calls to
    /// its leader).
    Admin,
    /// A node of any region.
    Node,
    /// A node of this node's region.
    RegionNode,
}

/// What a method at `path` (`/package.Service/Method`) needs.
fn need(path: &str) -> Need {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (service, method) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    match (service, method) {
        ("nines.v1.Raft", _) => Need::RegionNode,
        ("nines.v1.Replication", _) => Need::Node,
        ("nines.v1.Admin", "ClusterView" | "ClusterEvents" | "Members" | "Status") => Need::Anyone,
        ("nines.v1.RegionAdmin", "RegionStatus" | "Divergent") => Need::Anyone,
        ("nines.v1.Admin" | "nines.v1.RegionAdmin", _) => Need::Admin,
        ("nines.v1.Kv", _) => Need::Anyone,
        (s, _) if s.starts_with("grpc.health.") || s.starts_with("grpc.reflection.") => Need::Anyone,
        // Anything else (a method added later and not listed here) is
        // refused to all but admins until it is.
        _ => Need::Admin,
    }
}

/// Decides whether `role` may call a method needing `need` on a node of
/// `region`; the refusal names what is missing.
fn permit(need: Need, role: &Role, region: &str) -> Result<(), String> {
    match (need, role) {
        (Need::Anyone, _) | (Need::Admin, Role::Admin) | (Need::Node, Role::Node { .. }) => Ok(()),
        (Need::RegionNode | Need::Admin, Role::Node { region: r, .. }) if r == region => Ok(()),
        (Need::RegionNode, Role::Node { region: r, .. }) => {
            Err(format!("Raft traffic needs a node of region {region}; {role} is a node of region {r}"))
        }
        (Need::Admin, Role::Node { region: r, .. }) => Err(format!(
            "this operation needs the admin role (or a node of region {region}); {role} is a node of region {r}"
        )),
        (Need::Admin, _) => Err(format!("this operation needs the admin role; the certificate is {role}")),
        (Need::Node | Need::RegionNode, _) => {
            Err(format!("this service is for nines nodes only; the certificate is {role}"))
        }
    }
}

/// The guard that authorizes every gRPC call by the role in the
/// caller's certificate (see the module docs) and hands the role to the
/// services in the request's extensions (a [`Role`]), for the checks that
/// depend on the request's content ([`check_key_write`], shipments). The
/// admin token ([`crate::token`]), when the node has one, stands for the
/// admin role. On a node without TLS and without a token it passes
/// everything and adds no role; with a token, a caller without it is a
/// client of the client services and refused the admin ones.
#[derive(Clone)]
pub struct Gate {
    region: Arc<str>,
    tls: bool,
    admin_token: Option<crate::token::AdminToken>,
}

impl Gate {
    pub fn new(region: &str, tls: bool, admin_token: Option<crate::token::AdminToken>) -> Self {
        Gate { region: region.into(), tls, admin_token }
    }

    /// The caller's role if it may make the call (none on a node without
    /// TLS, unless it shows the admin token), or the refusal.
    pub fn check<B>(&self, req: &::http::Request<B>) -> Result<Option<Role>, Status> {
        let token = self.admin_token.as_ref().is_some_and(|t| t.presented(req.headers()));
        if !self.tls {
            let path = req.uri().path();
            // With a token, a caller without it is a client: no admin
            // operations, no writes of nines' own keys. The peer services
            // stay open (without TLS nothing tells a node from anyone).
            return match (token, &self.admin_token, need(path)) {
                (true, _, _) => Ok(Some(Role::Admin)),
                (false, Some(_), Need::Admin) => {
                    metrics::counter!("nines_permission_denied_total").increment(1);
                    tracing::warn!(method = path, "permission denied: no admin token");
                    Err(Status::permission_denied(format!(
                        "{path}: this operation needs the admin token (--admin-token-file, sent as \
                         `authorization: Bearer TOKEN`)"
                    )))
                }
                (false, Some(_), Need::Anyone) => Ok(Some(Role::Client)),
                _ => Ok(None),
            };
        }
        let Some(info) = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>() else {
            // TLS is on, so every connection came through `accept`: a call
            // without its TLS details is refused, never waved through.
            return Err(Status::permission_denied("no TLS connection details: refused"));
        };
        let peer = info.get_ref().remote_addr().map_or_else(|| "unknown".to_string(), |a: SocketAddr| a.to_string());
        let path = req.uri().path();
        let refuse = |why: String| {
            metrics::counter!("nines_permission_denied_total").increment(1);
            tracing::warn!(%peer, method = path, "permission denied: {why}");
            Status::permission_denied(format!("{path}: {why}"))
        };
        let certs = info.peer_certs().ok_or_else(|| refuse("no client certificate".into()))?;
        let leaf = certs.first().ok_or_else(|| refuse("no client certificate".into()))?;
        let role = match role_of(leaf).map_err(refuse)? {
            // The token lifts a client to admin (never a node: a node's
            // role is its identity).
            Role::Client if token => Role::Admin,
            role => role,
        };
        permit(need(path), &role, &self.region).map_err(refuse)?;
        Ok(Some(role))
    }
}

/// Keys nines keeps for itself (the authority's primary lease and epochs,
/// the controller's lease): only admins and nodes may write them.
pub const SYSTEM_KEY_PREFIX: &[u8] = b"nines/";

/// Refuses a write of a system key by a caller whose role (from the
/// [`Gate`]) is a client. Checked where the call arrives, before it is
/// forwarded (a forwarded call carries the forwarding node's role, or
/// without TLS its admin token).
pub fn check_key_write<T>(req: &tonic::Request<T>, key: &[u8]) -> Result<(), Status> {
    match req.extensions().get::<Role>() {
        Some(Role::Client) if key.starts_with(SYSTEM_KEY_PREFIX) => {
            metrics::counter!("nines_permission_denied_total").increment(1);
            Err(Status::permission_denied(format!(
                "keys under {:?} are nines' own (leases, epochs): writing them needs the admin role (an admin \
                 certificate or the admin token); the caller is a client",
                String::from_utf8_lossy(SYSTEM_KEY_PREFIX)
            )))
        }
        _ => Ok(()),
    }
}

/// Refuses a shipment that claims to come from `origin` when the caller's
/// certificate is a node of neither `origin` nor this region (a node of this
/// region forwards shipments to its leader).
pub fn check_shipment_origin<T>(req: &tonic::Request<T>, origin: &str, region: &str) -> Result<(), Status> {
    match req.extensions().get::<Role>() {
        Some(Role::Node { region: r, .. }) if r != origin && r != region => {
            metrics::counter!("nines_permission_denied_total").increment(1);
            Err(Status::permission_denied(format!(
                "a shipment from region {origin} must come from one of its nodes; the certificate is node/{r}/…"
            )))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(region: &str, id: u64) -> Role {
        Role::Node { region: region.into(), id }
    }

    #[test]
    fn each_method_needs_its_role() {
        let r = "us-east";
        for (path, role, ok) in [
            ("/nines.v1.Kv/Put", Role::Client, true),
            ("/nines.v1.Admin/Status", Role::Client, true),
            ("/nines.v1.Admin/ClusterView", Role::Client, true),
            ("/nines.v1.Admin/Remove", Role::Client, false),
            ("/nines.v1.Admin/Remove", Role::Admin, true),
            ("/nines.v1.Admin/Remove", node("us-east", 1), true),
            ("/nines.v1.Admin/Remove", node("eu-west", 1), false),
            ("/nines.v1.Admin/SomethingNew", Role::Client, false),
            ("/nines.v1.Admin/Backup", Role::Client, false),
            ("/nines.v1.RegionAdmin/Promote", Role::Client, false),
            ("/nines.v1.RegionAdmin/Fence", Role::Admin, true),
            ("/nines.v1.RegionAdmin/RegionStatus", Role::Client, true),
            ("/nines.v1.Raft/AppendEntries", Role::Admin, false),
            ("/nines.v1.Raft/AppendEntries", node("eu-west", 1), false),
            ("/nines.v1.Raft/AppendEntries", node("us-east", 2), true),
            ("/nines.v1.Replication/Ship", Role::Client, false),
            ("/nines.v1.Replication/Ship", node("eu-west", 2), true),
            ("/grpc.health.v1.Health/Check", Role::Client, true),
        ] {
            let got = permit(need(path), &role, r);
            assert_eq!(got.is_ok(), ok, "{path} by {role}: {got:?}");
        }
        let e = permit(need("/nines.v1.Admin/Remove"), &Role::Client, r).unwrap_err();
        assert!(e.contains("admin role") && e.contains("client"), "{e}");
    }
}
