//! Mutual TLS and authorization on real processes: `nines up --tls` serves
//! only clients whose certificate the cluster CA signed, each method only to
//! the role it needs, and Raft only to nodes of the region.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{Up, output_within, serial};
use nines::tls::TlsConfig;
use nines_proto::v1::raft_client::RaftClient;
use nines_proto::v1::replication_client::ReplicationClient;
use nines_proto::v1::{RaftMessage, ShipRequest};
use tonic::transport::{Channel, Endpoint};

fn nines(args: &[String]) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_nines"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run nines");
    output_within(child, Duration::from_secs(30))
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// `--endpoints E --cacert CA --cert CERT --key KEY` of `id`, then `args`.
fn with_identity(endpoints: &str, id: &TlsConfig, args: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec!["--endpoints".into(), endpoints.into()];
    for (flag, path) in [("--cacert", &id.ca), ("--cert", &id.cert), ("--key", &id.key)] {
        v.push(flag.into());
        v.push(path.to_string_lossy().into_owned());
    }
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

/// `nines certs create --dir DIR --node NODE`.
fn certs_create(dir: &Path, node: &str) -> Output {
    nines(&["certs", "create", "--dir", &dir.to_string_lossy(), "--node", node].map(String::from))
}

/// An identity: trusting the cluster's `ca`, presenting `dir/NAME.pem`.
fn identity(ca: &Path, dir: &Path, name: &str) -> TlsConfig {
    TlsConfig { ca: ca.to_path_buf(), cert: dir.join(format!("{name}.pem")), key: dir.join(format!("{name}-key.pem")) }
}

/// A channel to `url` as `id`, connected now.
async fn channel(url: &str, id: &TlsConfig) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(url.to_string()).unwrap().tls_config(id.client().unwrap()).unwrap().connect().await
}

/// A Raft AppendEntries to `url` as `id`.
async fn raft_append(url: &str, id: &TlsConfig) -> Result<(), tonic::Status> {
    let channel = channel(url, id).await.map_err(|e| tonic::Status::unavailable(format!("connect: {e:?}")))?;
    RaftClient::new(channel).append_entries(RaftMessage { payload: vec![0xff; 8] }).await.map(|_| ())
}

/// A Raft vote request to `url` as `id`, for `candidate` at a high term
/// (refused before it reaches Raft, or it would start an election).
async fn raft_vote(url: &str, id: &TlsConfig, candidate: u64) -> Result<(), tonic::Status> {
    let channel = channel(url, id).await.map_err(|e| tonic::Status::unavailable(format!("connect: {e:?}")))?;
    let req = openraft::raft::VoteRequest::<u64> { vote: openraft::Vote::new(1_000, candidate), last_log_id: None };
    let payload = postcard::to_allocvec(&req).unwrap();
    RaftClient::new(channel).vote(RaftMessage { payload }).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_admits_only_its_certificates_and_each_role_only_its_methods() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    let ports = common::PortBases::free(3);
    let up = Up::start_on(dir.path(), ports, &["--tls"]);
    assert!(up.printed.contains("https://127.0.0.1:"), "the nodes serve https: {}", up.printed);
    let certs = dir.path().join("certs");
    let ca = certs.join("ca.pem");
    let base = ports.grpc;
    let endpoints = (0..3).map(|i| format!("https://127.0.0.1:{}", base + i)).collect::<Vec<_>>().join(",");
    let role = |name: &str, args: &[&str]| with_identity(&endpoints, &identity(&ca, &certs, name), args);

    // A client certificate reads and writes.
    let put = nines(&role("client", &["put", "k", "v1"]));
    assert!(put.status.success(), "put with the client certificate: {}", text(&put));
    let get = nines(&role("client", &["get", "k"]));
    assert!(get.status.success() && text(&get).contains("v1"), "{}", text(&get));

    // No certificate, or plaintext: refused, nothing written.
    let bare = nines(&["--endpoints".into(), endpoints.clone(), "put".into(), "k".into(), "v2".into()]);
    assert_eq!(bare.status.code(), Some(2), "https without certificates: {}", text(&bare));
    assert!(text(&bare).contains("TLS"), "{}", text(&bare));
    let plain = nines(&[
        "--endpoints".into(),
        format!("http://127.0.0.1:{base}"),
        "--command-timeout".into(),
        "2s".into(),
        "put".into(),
        "k".into(),
        "v3".into(),
    ]);
    assert!(!plain.status.success(), "a plaintext client was served: {}", text(&plain));

    // The client role may not change membership; the admin role may.
    let remove = nines(&role("client", &["member", "remove", "3"]));
    assert!(!remove.status.success(), "member remove as client: {}", text(&remove));
    assert!(text(&remove).contains("PermissionDenied") && text(&remove).contains("admin role"), "{}", text(&remove));
    let status = nines(&role("client", &["status"]));
    assert!(status.status.success(), "status as client: {}", text(&status));
    let remove = nines(&role("admin", &["member", "remove", "3"]));
    assert!(remove.status.success(), "member remove as admin: {}", text(&remove));
    let list = nines(&role("admin", &["member", "list"]));
    assert!(!text(&list).contains(&format!("https://127.0.0.1:{}", base + 2)), "node 3 is gone: {}", text(&list));
    let get = nines(&role("client", &["get", "k"]));
    assert!(text(&get).contains("v1"), "the plaintext and bare puts wrote nothing: {}", text(&get));

    // Ports by trust: Raft and shipments only on the peer port, the client
    // services only on the client port, whoever asks.
    let us_east_2 = identity(&ca, &certs, "node-us-east-2");
    let e = raft_append(&format!("https://127.0.0.1:{base}"), &us_east_2).await.expect_err("Raft on the client port");
    assert_eq!(e.code(), tonic::Code::Unimplemented, "{e:?}");
    let on_peer_port = format!("https://127.0.0.1:{}", ports.peer);
    let put = nines(&with_identity(&on_peer_port, &identity(&ca, &certs, "admin"), &["put", "k", "v5"]));
    assert!(!put.status.success() && text(&put).contains("Unimplemented"), "a put on the peer port: {}", text(&put));

    // A node certificate of this region speaks only in its own name, and
    // one whose id is no member (removed, or never added) may not stand
    // for election.
    let e = raft_vote(&on_peer_port, &us_east_2, 1).await.expect_err("a vote in another node's name");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("node 2 of region us-east sends Raft traffic in the name of node 1"), "{e:?}");
    let stranger = certs_create(&certs, "us-east/9");
    assert!(stranger.status.success(), "{}", text(&stranger));
    let e = raft_vote(&on_peer_port, &identity(&ca, &certs, "node-us-east-9"), 9).await.expect_err("a non-member");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("node 9 is not a member of region us-east"), "{e:?}");

    // A node of another region (same CA) may not send Raft traffic here.
    let more = certs_create(&certs, "eu-west/9");
    assert!(more.status.success() && text(&more).contains("kept"), "{}", text(&more));
    let url = on_peer_port;
    let eu_west_9 = identity(&ca, &certs, "node-eu-west-9");
    let e = raft_append(&url, &eu_west_9).await.expect_err("Raft from another region's node");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("region us-east"), "{e:?}");
    // Nor may a client certificate.
    let e = raft_append(&url, &identity(&ca, &certs, "client")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // A node may ship only as its own region.
    let channel = channel(&url, &eu_west_9).await.expect("a node of the cluster's CA connects");
    let forged = ShipRequest { origin_region: "us-west".into(), ..Default::default() };
    let e = ReplicationClient::new(channel).ship(forged).await.expect_err("a shipment under another region's name");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("region us-west"), "{e:?}");
    // And a client may not write nines' own keys (the authority's leases).
    let lease = nines(&role("client", &["put", "nines/primary", "mine"]));
    assert!(!lease.status.success() && text(&lease).contains("nines/"), "{}", text(&lease));
    let lease = nines(&role("admin", &["put", "nines/test", "admin may"]));
    assert!(lease.status.success(), "{}", text(&lease));

    // A node certificate from another CA cannot even connect, and the node
    // logs the refusal with the peer's address.
    let other = dir.path().join("other-ca");
    let made = certs_create(&other, "us-east/2");
    assert!(made.status.success(), "{}", text(&made));
    let e = raft_append(&url, &identity(&ca, &other, "node-us-east-2"))
        .await
        .expect_err("Raft with a foreign CA's certificate");
    assert_ne!(e.code(), tonic::Code::Ok);
    let log = std::fs::read_to_string(dir.path().join("node-1/node.log")).unwrap();
    assert!(
        log.lines().any(|l| l.contains("refused a TLS connection") && l.contains("peer=127.0.0.1:")),
        "node 1 logged no refusal with the peer's address"
    );
    assert!(log.contains("permission denied") && log.contains("/nines.v1.Raft/AppendEntries"), "no denial logged");

    // The region kept serving throughout.
    let put = nines(&role("client", &["put", "k", "v4"]));
    assert!(put.status.success(), "{}", text(&put));
    up.stop();

    // Restarting the cluster without --tls is refused by name (its members'
    // addresses are https), before anything starts.
    let d = dir.path().to_string_lossy().into_owned();
    let mut args: Vec<String> = ["up", "--regions", "1", "--data-dir", &d].map(String::from).into();
    args.extend(common::PortBases::free(3).flags());
    let again = nines(&args);
    assert!(!again.status.success() && text(&again).contains("started with --tls"), "{}", text(&again));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_token_guards_admin_operations_where_clients_have_no_certificates() {
    // Shows: on a plaintext cluster started with --admin-token-file, data
    // calls stay open, admin calls and writes of nines' own keys need the
    // token (a wrong or missing one is PERMISSION_DENIED naming it), and a
    // follower forwards a tokened call to its leader with the token.
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("admin.token");
    std::fs::write(&token, "c2VjcmV0LXRva2VuLWZvci10aGUtdGVzdA==\n").unwrap();
    let wrong = dir.path().join("wrong.token");
    std::fs::write(&wrong, "c2VjcmV0LXRva2VuLWZvci10aGUtdGVzdA=X").unwrap();
    let ports = common::PortBases::free(3);
    let token_flag = token.to_string_lossy().into_owned();
    let up = Up::start_on(dir.path(), ports, &["--admin-token-file", &token_flag]);
    let node = |i: u16| format!("http://127.0.0.1:{}", ports.grpc + i);
    let all = (0..3).map(node).collect::<Vec<_>>().join(",");
    let run = |endpoints: &str, token: Option<&Path>, args: &[&str]| {
        let mut v: Vec<String> = vec!["--endpoints".into(), endpoints.into()];
        if let Some(t) = token {
            v.extend(["--admin-token-file".into(), t.to_string_lossy().into_owned()]);
        }
        v.extend(args.iter().map(|s| s.to_string()));
        nines(&v)
    };

    let put = run(&all, None, &["put", "k", "v"]);
    assert!(put.status.success(), "a put needs no token: {}", text(&put));
    // nines' own keys (leases, epochs) need it.
    let lease = run(&all, None, &["put", "nines/primary", "mine"]);
    assert!(!lease.status.success() && text(&lease).contains("nines/"), "{}", text(&lease));
    // The nodes' own client (the authority's leases, the controller) sends
    // the token; the key-value commands, on the client library, do not.
    nines::token::set_outgoing(nines::token::AdminToken::read(&token).unwrap());
    let with_token = nines::rpc::Client::new(vec![node(0)], nines::rpc::ClientConfig::default()).unwrap();
    with_token.put("nines/test", "admin may").await.expect("a nines/ key written with the token");
    for (what, t) in [("no token", None), ("a wrong token", Some(wrong.as_path()))] {
        let remove = run(&all, t, &["member", "remove", "3"]);
        assert!(!remove.status.success(), "member remove with {what}: {}", text(&remove));
        assert!(
            text(&remove).contains("PermissionDenied") && text(&remove).contains("admin token"),
            "{}",
            text(&remove)
        );
    }

    // Sent to a follower, which forwards it to the leader with the token.
    let list = run(&all, None, &["-w", "json", "member", "list"]);
    let members: serde_json::Value = serde_json::from_slice(&list.stdout).expect("member list as JSON");
    let leader = members["leader_id"].as_u64().expect("a leader");
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let removed = (1..=3).find(|id| *id != leader && *id != follower).unwrap();
    let remove = run(&node(follower as u16 - 1), Some(&token), &["member", "remove", &removed.to_string()]);
    assert!(remove.status.success(), "member remove with the token, via a follower: {}", text(&remove));
    let list = run(&all, None, &["member", "list"]);
    assert!(!text(&list).contains(&node(removed as u16 - 1)), "node {removed} is gone: {}", text(&list));
    up.stop();
}
