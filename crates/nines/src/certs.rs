//! `nines certs create`: a cluster CA and the certificates of its nodes,
//! its admin and its clients, generated offline (rcgen), in the layout the
//! node's `[tls]` section and the CLI's `--cacert/--cert/--key` expect:
//!
//! ```text
//! ca.pem  ca-key.pem                       the cluster CA
//! node-REGION-ID.pem  node-REGION-ID-key.pem   one per node (its host names and IPs)
//! admin.pem  admin-key.pem                 the admin role
//! client.pem  client-key.pem               the client role
//! ```
//!
//! An existing CA is reused (so more nodes can be added later) and an
//! existing file is never overwritten: creating into a directory that
//! already holds everything changes nothing (a certificate is kept even if
//! its host names differ: remove its pair to issue it again). Private keys
//! are written readable by their owner only.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

use crate::tls::{Role, TlsConfig};

/// A node to issue a certificate for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCert {
    pub region: String,
    pub id: u64,
    /// The DNS names and IP addresses it is reached at.
    pub hosts: Vec<String>,
}

impl std::str::FromStr for NodeCert {
    type Err = String;

    /// `REGION/ID` or `REGION/ID=HOST,HOST,...` (default hosts: localhost
    /// and 127.0.0.1).
    fn from_str(s: &str) -> Result<Self, String> {
        let (who, hosts) = s.split_once('=').unwrap_or((s, "localhost,127.0.0.1"));
        let (region, id) = who.split_once('/').ok_or_else(|| format!("{s:?}: expected REGION/ID[=HOST,...]"))?;
        let id: u64 = id.parse().map_err(|_| format!("{s:?}: node id {id:?} is not a number"))?;
        if region.is_empty() || id == 0 {
            return Err(format!("{s:?}: a node needs a region and an id above 0"));
        }
        let hosts: Vec<String> = hosts.split(',').filter(|h| !h.is_empty()).map(str::to_string).collect();
        if hosts.is_empty() {
            return Err(format!("{s:?}: no host names after '='"));
        }
        Ok(NodeCert { region: region.to_string(), id, hosts })
    }
}

/// The files of one node's identity in `dir`.
pub fn node_files(dir: &Path, region: &str, id: u64) -> TlsConfig {
    TlsConfig {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("node-{region}-{id}.pem")),
        key: dir.join(format!("node-{region}-{id}-key.pem")),
    }
}

/// The files of the admin's or a client's identity in `dir`.
pub fn role_files(dir: &Path, role: &Role) -> TlsConfig {
    let name = role.unit();
    TlsConfig {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}-key.pem")),
    }
}

/// What [`create`] did.
#[derive(Debug, Default)]
pub struct Created {
    pub written: Vec<PathBuf>,
    pub kept: Vec<PathBuf>,
}

/// Creates (or completes) the certificates for `nodes`, the admin and the
/// client in `dir`.
pub fn create(dir: &Path, nodes: &[NodeCert]) -> anyhow::Result<Created> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut created = Created::default();
    let (ca_cert, ca_key) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    let issuer = match (ca_cert.exists(), ca_key.exists()) {
        (true, true) => {
            let key = KeyPair::from_pem(&std::fs::read_to_string(&ca_key)?)
                .with_context(|| format!("reading the CA key {}", ca_key.display()))?;
            created.kept.extend([ca_cert.clone(), ca_key.clone()]);
            Issuer::from_ca_cert_pem(&std::fs::read_to_string(&ca_cert)?, key)
                .with_context(|| format!("reading the CA certificate {}", ca_cert.display()))?
        }
        (false, false) => {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.distinguished_name.push(DnType::OrganizationName, "nines");
            params.distinguished_name.push(DnType::CommonName, "nines cluster CA");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let cert = params.self_signed(&key)?;
            write_new(&ca_key, &key.serialize_pem(), true, &mut created)?;
            write_new(&ca_cert, &cert.pem(), false, &mut created)?;
            Issuer::new(params, key)
        }
        (true, false) => {
            bail!("{} exists without its key {}: cannot issue certificates", ca_cert.display(), ca_key.display())
        }
        (false, true) => bail!("{} exists without its certificate {}", ca_key.display(), ca_cert.display()),
    };
    let mut leaves: Vec<(Role, Vec<String>, TlsConfig)> = nodes
        .iter()
        .map(|n| {
            let role = Role::Node { region: n.region.clone(), id: n.id };
            (role, n.hosts.clone(), node_files(dir, &n.region, n.id))
        })
        .collect();
    for role in [Role::Admin, Role::Client] {
        let files = role_files(dir, &role);
        leaves.push((role, Vec::new(), files));
    }
    for (role, hosts, files) in leaves {
        match (files.cert.exists(), files.key.exists()) {
            (true, true) => {
                created.kept.extend([files.cert, files.key]);
                continue;
            }
            (false, false) => {}
            (true, false) | (false, true) => bail!(
                "{} and {} must both exist or neither: remove the one that is there to issue the pair again",
                files.cert.display(),
                files.key.display()
            ),
        }
        let mut params = CertificateParams::new(hosts).with_context(|| format!("host names of {role}"))?;
        params.distinguished_name.push(DnType::OrganizationName, "nines");
        params.distinguished_name.push(DnType::OrganizationalUnitName, role.unit());
        params.distinguished_name.push(DnType::CommonName, role.common_name());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = match role {
            Role::Node { .. } => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
            Role::Admin | Role::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        write_new(&files.key, &key.serialize_pem(), true, &mut created)?;
        write_new(&files.cert, &cert.pem(), false, &mut created)?;
    }
    Ok(created)
}

/// Writes `text` to a file that must not exist yet (a key: owner-only).
fn write_new(path: &Path, text: &str, secret: bool, created: &mut Created) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    created.written.push(path.to_path_buf());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls;

    fn der(path: &Path) -> Vec<u8> {
        CertificateDer::from_pem_file(path).unwrap().to_vec()
    }

    #[test]
    fn certificates_carry_their_roles_and_a_second_run_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let nodes: Vec<NodeCert> =
            ["us-east/1", "eu-west/2=eu-west-2,10.0.0.2"].iter().map(|s| s.parse().unwrap()).collect();
        let first = create(dir.path(), &nodes).unwrap();
        assert_eq!(first.written.len(), 2 + 2 * 4, "CA, two nodes, admin and client, each with a key");
        assert_eq!(
            crate::tls::role_of(&der(&dir.path().join("node-eu-west-2.pem"))).unwrap(),
            Role::Node { region: "eu-west".into(), id: 2 }
        );
        assert_eq!(crate::tls::role_of(&der(&dir.path().join("admin.pem"))).unwrap(), Role::Admin);
        assert_eq!(crate::tls::role_of(&der(&dir.path().join("client.pem"))).unwrap(), Role::Client);
        assert!(crate::tls::role_of(&der(&dir.path().join("ca.pem"))).is_err(), "the CA is no role");
        let mode = std::fs::metadata(dir.path().join("client-key.pem")).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
        let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
        let more: Vec<NodeCert> = vec!["us-east/3".parse().unwrap()];
        let second = create(dir.path(), &[nodes, more].concat()).unwrap();
        assert_eq!(second.written.len(), 2, "only the new node's pair");
        assert_eq!(std::fs::read(dir.path().join("ca.pem")).unwrap(), ca, "the CA is kept");
        // Every server identity loads.
        node_files(dir.path(), "us-east", 3).server().unwrap();
    }

    #[test]
    fn bad_node_specs_are_refused_by_name() {
        for (bad, needle) in [
            ("us-east", "REGION/ID"),
            ("us-east/x", "not a number"),
            ("/1", "region"),
            ("r/0", "above 0"),
            ("r/1=", "no host"),
        ] {
            let e = bad.parse::<NodeCert>().unwrap_err();
            assert!(e.contains(needle), "{bad}: {e}");
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), "x").unwrap();
        let e = create(dir.path(), &[]).unwrap_err().to_string();
        assert!(e.contains("without its key"), "{e}");
    }
}
