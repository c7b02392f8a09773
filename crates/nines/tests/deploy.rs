//! The deployment files: Kubernetes manifests parse and say what they must;
//! the example configuration and the compose configuration are valid; and,
//! where docker works, the compose cluster survives losing a leader.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::serial;
use nines::config::NodeConfig;
use nines::rpc::{Client, ClientConfig, Consistency};
use serde_norway::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn manifests() -> Vec<Value> {
    let mut docs = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(deploy().join("k8s")).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(!files.is_empty());
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let v = <Value as serde::Deserialize>::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            assert!(v["kind"].as_str().is_some(), "{}: a document without kind", f.display());
            docs.push(v);
        }
    }
    docs
}

#[test]
fn kubernetes_manifests_spread_each_region_over_zones_with_probes_and_a_budget() {
    let docs = manifests();
    let of = |kind: &str| docs.iter().filter(move |d| d["kind"] == kind).collect::<Vec<_>>();
    let sets = of("StatefulSet");
    assert_eq!(sets.len(), 3, "one StatefulSet per region, and the authority's");
    for s in &sets {
        let name = s["metadata"]["name"].as_str().unwrap();
        let spec = &s["spec"]["template"]["spec"];
        let spread = spec["topologySpreadConstraints"].as_sequence().expect("zone spread");
        assert!(spread.iter().any(|c| c["topologyKey"] == "topology.kubernetes.io/zone"), "{name}");
        let c = &spec["containers"][0];
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/health/live", "{name}");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/health/ready", "{name}");
        let service = s["spec"]["serviceName"].as_str().unwrap();
        let headless = of("Service").into_iter().find(|v| v["metadata"]["name"] == service).expect("its Service");
        assert_eq!(headless["spec"]["clusterIP"], "None", "{service} is headless");
        let pdb = of("PodDisruptionBudget").into_iter().find(|v| v["metadata"]["name"] == name).expect("its PDB");
        assert_eq!(pdb["spec"]["maxUnavailable"], 1, "{name}");
    }
    let map = |name: &str, file: &str| {
        let m = of("ConfigMap").into_iter().find(|m| m["metadata"]["name"] == name).expect("the ConfigMap");
        let text = m["data"][file].as_str().unwrap_or_else(|| panic!("{name} holds {file}"));
        NodeConfig::from_toml(text, Path::new(file)).unwrap_or_else(|e| panic!("{name}'s {file}: {e}"))
    };
    let c = map("nines-cluster", "cluster.toml");
    assert_eq!(c.cluster.regions.len(), 2);
    // The primary's lease lives in the authority's three pods.
    let pods: Vec<String> = (0..3).map(|i| format!("https://nines-authority-{i}.nines-authority:7001")).collect();
    assert_eq!(c.cluster.authority, pods);
    // Every pod runs with `--tls-dir /certs` (the nines-certs Secret).
    let tls = |region: &str| Some(nines::certs::node_files(Path::new("/certs"), region, 1));
    let us = NodeConfig { id: 1, region: "us-east".into(), az: "us-east-a".into(), tls: tls("us-east"), ..c };
    us.validate().unwrap_or_else(|e| panic!("us-east: {e}"));
    let a = map("nines-authority", "authority.toml");
    let a = NodeConfig { id: 1, region: "authority".into(), az: "authority-a".into(), tls: tls("authority"), ..a };
    a.validate().unwrap_or_else(|e| panic!("authority: {e}"));
    assert!(sets.iter().any(|s| s["metadata"]["name"] == "nines-authority"));
}

/// Bytes in a Kubernetes memory quantity such as `512Mi` or `1Gi`.
fn quantity_bytes(q: &str) -> u64 {
    let (n, unit) = q.split_at(q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len()));
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("quantity {q:?}"));
    n * match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        other => panic!("quantity {q:?}: unit {other:?} not handled here"),
    }
}

/// The Kubernetes field names the manifests may use at each level; a
/// misspelled field (which the API server would drop or refuse) fails here.
fn assert_known_fields(what: &str, v: &Value, known: &[&str]) {
    for k in v.as_mapping().unwrap_or_else(|| panic!("{what} is not a mapping")).keys() {
        let k = k.as_str().unwrap();
        assert!(known.contains(&k), "{what}: unknown field {k:?}");
    }
}

#[test]
fn kubernetes_pods_meet_the_restricted_profile_with_limits_labels_and_a_network_policy() {
    let docs = manifests();
    let cache = {
        let m = docs.iter().find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "nines-cluster").unwrap();
        NodeConfig::from_toml(m["data"]["cluster.toml"].as_str().unwrap(), Path::new("cluster.toml"))
            .unwrap()
            .storage
            .cache_size
    };
    let mut pods = 0;
    for d in &docs {
        let kind = d["kind"].as_str().unwrap();
        let name = d["metadata"]["name"].as_str().unwrap();
        let labels = &d["metadata"]["labels"];
        for l in ["app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/part-of"] {
            assert!(labels[l].as_str().is_some(), "{kind} {name}: recommended label {l}");
        }
        if !["StatefulSet", "Deployment", "Job"].contains(&kind) {
            continue;
        }
        pods += 1;
        let template = &d["spec"]["template"];
        assert_eq!(template["metadata"]["labels"]["app.kubernetes.io/part-of"], "nines", "{name}: pods are nines'");
        let spec = &template["spec"];
        assert_known_fields(
            &format!("{name} pod spec"),
            spec,
            &[
                "terminationGracePeriodSeconds",
                "automountServiceAccountToken",
                "securityContext",
                "topologySpreadConstraints",
                "containers",
                "volumes",
                "restartPolicy",
            ],
        );
        let pod = &spec["securityContext"];
        assert_known_fields(
            &format!("{name} pod securityContext"),
            pod,
            &["runAsNonRoot", "runAsUser", "runAsGroup", "fsGroup", "seccompProfile"],
        );
        assert_eq!(pod["runAsNonRoot"], true, "{name}");
        assert_ne!(pod["runAsUser"], 0, "{name}");
        assert_eq!(pod["seccompProfile"]["type"], "RuntimeDefault", "{name}");
        // The cluster's certificates, from the nines-certs Secret, readable by
        // the pod's group only.
        let certs = spec["volumes"].as_sequence().unwrap().iter().find(|v| v["name"] == "certs");
        let certs = certs.unwrap_or_else(|| panic!("{name}: a certs volume"));
        assert_eq!(certs["secret"]["secretName"], "nines-certs", "{name}");
        assert_eq!(pod["fsGroup"], 65532, "{name}: the Secret's files belong to the pod's group");
        for c in spec["containers"].as_sequence().unwrap() {
            let args: Vec<&str> = c["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
            let tls_flag = if kind == "StatefulSet" { "--tls-dir" } else { "--cacert" };
            assert!(args.contains(&tls_flag), "{name}: runs TLS ({tls_flag}): {args:?}");
            assert!(args.iter().all(|a| !a.contains("http://")), "{name}: only https endpoints: {args:?}");
            let mounts = c["volumeMounts"].as_sequence().unwrap();
            assert!(mounts.iter().any(|m| m["name"] == "certs" && m["readOnly"] == true), "{name}: mounts its certs");
            assert_known_fields(
                &format!("{name} container"),
                c,
                &[
                    "name",
                    "image",
                    "args",
                    "env",
                    "ports",
                    "securityContext",
                    "resources",
                    "livenessProbe",
                    "readinessProbe",
                    "volumeMounts",
                ],
            );
            let sc = &c["securityContext"];
            assert_known_fields(
                &format!("{name} container securityContext"),
                sc,
                &["allowPrivilegeEscalation", "readOnlyRootFilesystem", "runAsNonRoot", "capabilities"],
            );
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
            assert_eq!(sc["capabilities"]["drop"][0], "ALL", "{name}");
            let r = &c["resources"];
            assert!(r["requests"]["memory"].as_str().is_some() && r["requests"]["cpu"].as_str().is_some(), "{name}");
            let limit =
                quantity_bytes(r["limits"]["memory"].as_str().unwrap_or_else(|| panic!("{name}: memory limit")));
            if kind == "StatefulSet" {
                // The cache plus the node's bounded queues and runtime.
                assert!(limit >= cache + (512 << 20), "{name}: memory limit {limit} under cache {cache} + 512 MiB");
                let env = c["env"].as_sequence().unwrap();
                let field = |n: &str| {
                    env.iter().find(|e| e["name"] == n).unwrap_or_else(|| panic!("{name}: env {n}"))["valueFrom"]
                        ["fieldRef"]["fieldPath"]
                        .clone()
                };
                assert_eq!(field("NINES_AZ"), "metadata.labels['topology.kubernetes.io/zone']", "{name}");
                assert_eq!(field("NINES_AZ_FALLBACK"), "spec.nodeName", "{name}");
                let spread = &spec["topologySpreadConstraints"][0];
                assert_eq!(spread["whenUnsatisfiable"], "ScheduleAnyway", "{name} must schedule on kind/minikube");
                let writable: Vec<_> = c["volumeMounts"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .filter(|m| m["readOnly"] != true)
                    .map(|m| m["mountPath"].as_str().unwrap())
                    .collect();
                assert_eq!(writable, ["/data", "/tmp"], "{name}: the writable places under a read-only root");
                let selector = &d["spec"]["selector"]["matchLabels"];
                let policy = docs
                    .iter()
                    .find(|p| p["kind"] == "NetworkPolicy" && p["spec"]["podSelector"]["matchLabels"] == *selector)
                    .unwrap_or_else(|| panic!("{name}: a NetworkPolicy for its pods"));
                let grpc = policy["spec"]["ingress"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .find(|i| i["ports"][0]["port"] == 7001)
                    .unwrap_or_else(|| panic!("{name}: a rule for the gRPC port"));
                let from = grpc["from"].as_sequence().unwrap();
                assert!(!from.is_empty() && from.iter().all(|f| !f["podSelector"]["matchLabels"].is_null()), "{name}");
                // The peer port (Raft, shipments) admits nines nodes only.
                let peer = policy["spec"]["ingress"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .find(|i| i["ports"][0]["port"] == 9001)
                    .unwrap_or_else(|| panic!("{name}: a rule for the peer port"));
                let from = peer["from"].as_sequence().unwrap();
                assert_eq!(from.len(), 1, "{name}: one selector on the peer port");
                let nodes = &from[0]["podSelector"];
                assert_eq!(nodes["matchLabels"]["app.kubernetes.io/name"], "nines", "{name}");
                assert_eq!(nodes["matchExpressions"][0]["key"], "nines.io/region", "{name}: nodes only");
                assert_eq!(nodes["matchExpressions"][0]["operator"], "Exists", "{name}");
                let ports: Vec<_> =
                    c["ports"].as_sequence().unwrap().iter().map(|p| p["containerPort"].clone()).collect();
                assert!(ports.contains(&9001.into()) && ports.contains(&7001.into()), "{name}: {ports:?}");
                let advertised = |n: &str| env.iter().find(|e| e["name"] == n).map(|e| e["value"].clone());
                assert!(
                    advertised("NINES_PEER_ADVERTISE").and_then(|v| v.as_str().map(|v| v.ends_with(":9001")))
                        == Some(true),
                    "{name}: advertises its peer port"
                );
            }
        }
    }
    assert_eq!(pods, 7, "three StatefulSets, their three bootstrap Jobs and the controller");
}

#[test]
fn the_compose_cluster_configuration_is_valid_for_every_node() {
    let text = std::fs::read_to_string(deploy().join("compose/cluster.toml")).unwrap();
    let base = NodeConfig::from_toml(&text, Path::new("cluster.toml")).expect("parses");
    // Each node runs with `--tls-dir /certs`.
    let tls = |region: &str, id| Some(nines::certs::node_files(Path::new("/certs"), region, id));
    for (region, id) in [("us-east", 1), ("eu-west", 3)] {
        let c =
            NodeConfig { id, region: region.into(), az: format!("{region}-a"), tls: tls(region, id), ..base.clone() };
        c.validate().unwrap_or_else(|e| panic!("{region}: {e}"));
    }
    assert_eq!(base.cluster.authority.len(), 3, "the primary's lease lives in a three-node authority");
    let text = std::fs::read_to_string(deploy().join("compose/authority.toml")).unwrap();
    let authority = NodeConfig::from_toml(&text, Path::new("authority.toml")).expect("parses");
    let c = NodeConfig {
        id: 1,
        region: "authority".into(),
        az: "authority-a".into(),
        tls: tls("authority", 1),
        ..authority
    };
    c.validate().unwrap_or_else(|e| panic!("authority: {e}"));
}

fn docker_available() -> Result<(), String> {
    match Command::new("docker").arg("info").output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).lines().next().unwrap_or("docker info failed").to_string()),
        Err(e) => Err(format!("docker is not installed: {e}")),
    }
}

/// `docker compose` (v2) or `docker-compose` (v1), whichever works.
fn compose() -> Option<Vec<&'static str>> {
    let v2 = Command::new("docker").args(["compose", "version"]).output();
    if v2.map(|o| o.status.success()).unwrap_or(false) {
        return Some(vec!["docker", "compose"]);
    }
    let v1 = Command::new("docker-compose").arg("version").output();
    v1.map(|o| o.status.success()).unwrap_or(false).then(|| vec!["docker-compose"])
}

struct Project {
    cmd: Vec<&'static str>,
    name: String,
}

impl Project {
    fn run(&self, args: &[&str]) -> std::process::Output {
        let file = deploy().join("docker-compose.yml");
        Command::new(self.cmd[0])
            .args(&self.cmd[1..])
            .args(["-f", file.to_str().unwrap(), "-p", &self.name])
            .args(args)
            .output()
            .expect("run compose")
    }

    fn container(&self, service: &str) -> String {
        let out = self.run(&["ps", "-q", service]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        // Everything goes: containers, networks, volumes.
        let _ = self.run(&["down", "-v", "--remove-orphans", "-t", "5"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_cluster_comes_up_healthy_and_survives_killing_a_region_leader() {
    // Shows: the offline image builds, `docker compose up` brings two regions
    // up healthy, a client on the host writes and reads, `docker kill` of a
    // region's leader is survived, and `down` removes everything.
    if let Err(why) = docker_available() {
        assert!(std::env::var("CI").is_err() || why.contains("not installed"), "CI has docker but: {why}");
        eprintln!("skipped: docker is unavailable ({why})");
        return;
    }
    let Some(cmd) = compose() else {
        eprintln!("skipped: neither `docker compose` nor `docker-compose` is installed");
        assert!(std::env::var("CI").is_err(), "CI has docker but no compose");
        return;
    };
    let _serial = serial().await;
    let build = Command::new("bash")
        .arg(deploy().join("build-image.sh"))
        .args([env!("CARGO_BIN_EXE_nines"), "nines:local"])
        .output()
        .expect("build image");
    assert!(build.status.success(), "image build: {}", String::from_utf8_lossy(&build.stderr));
    let project = Project { cmd, name: format!("ninestest{}", std::process::id()) };
    let up = project.run(&["up", "-d"]);
    assert!(up.status.success(), "compose up: {}", String::from_utf8_lossy(&up.stderr));

    let nodes: Vec<String> =
        ["us-east", "eu-west", "authority"].iter().flat_map(|r| (1..=3).map(move |i| format!("{r}-{i}"))).collect();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let mut healthy = 0;
        for n in &nodes {
            let id = project.container(n);
            let out = Command::new("docker").args(["inspect", "-f", "{{.State.Health.Status}}", &id]).output().unwrap();
            healthy += usize::from(String::from_utf8_lossy(&out.stdout).trim() == "healthy");
        }
        if healthy == nodes.len() {
            break;
        }
        assert!(Instant::now() < deadline, "only {healthy} of {} containers healthy", nodes.len());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // The cluster runs mutual TLS: the host client uses the certificates the
    // `certs` service made (copied out of the volume), as admin.
    let certs = tempfile::tempdir().unwrap();
    let copied = Command::new("docker")
        .args(["cp", &format!("{}:/certs/.", project.container("us-east-1")), &certs.path().to_string_lossy()])
        .output()
        .unwrap();
    assert!(copied.status.success(), "docker cp: {}", String::from_utf8_lossy(&copied.stderr));
    let admin = nines::certs::role_files(certs.path(), &nines::tls::Role::Admin);
    nines::tls::set_client_identity(admin.client().expect("the admin certificate loads"));
    let https = |ports: std::ops::RangeInclusive<u16>| -> Vec<String> {
        ports.map(|p| format!("https://127.0.0.1:{p}")).collect()
    };
    let plain = Client::local_default().unwrap();
    let refused = plain.put("plain", "text").await;
    assert!(refused.is_err(), "a plaintext client was served: {refused:?}");

    // Every node runs unprivileged, and publishes its ports on loopback only.
    for n in &nodes {
        let id = project.container(n);
        let user = Command::new("docker").args(["inspect", "-f", "{{.Config.User}}", &id]).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&user.stdout).trim(), "65532:65532", "{n} runs as nines");
        let ports = Command::new("docker").args(["port", &id]).output().unwrap();
        let ports = String::from_utf8_lossy(&ports.stdout);
        assert!(ports.lines().count() == 2, "{n} publishes gRPC and admin, not the peer port: {ports}");
        assert!(ports.lines().all(|l| l.contains("-> 127.0.0.1:")), "{n} publishes on loopback only: {ports}");
    }

    let client = Client::new(https(7001..=7003), ClientConfig::default()).unwrap();
    for i in 0..20 {
        client.put(format!("k{i}"), format!("v{i}")).await.expect("put from the host");
    }
    let leader = client.members().await.unwrap().leader_id.expect("a leader");
    let killed =
        Command::new("docker").args(["kill", &project.container(&format!("us-east-{leader}"))]).output().unwrap();
    assert!(killed.status.success());
    for i in 20..40 {
        client.put(format!("k{i}"), format!("v{i}")).await.expect("put after the kill");
    }
    for i in 0..40 {
        let r = client.get(format!("k{i}"), Consistency::Linearizable).await.expect("get");
        assert_eq!(r.kv.map(|kv| kv.value), Some(format!("v{i}").into_bytes()), "k{i}");
    }
    let eu = Client::new(https(7004..=7006), ClientConfig::default()).unwrap();
    common::wait_for("writes to reach eu-west", Duration::from_secs(30), || async {
        let r = eu.get("k39", Consistency::Local).await.ok()?;
        r.kv.map(|_| ())
    })
    .await;

    let name = project.name.clone();
    drop(project);
    for what in [["ps", "-a"], ["volume", "ls"], ["network", "ls"]] {
        let out = Command::new("docker")
            .args(what)
            .args(["--filter", &format!("label=com.docker.compose.project={name}"), "-q"])
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty(), "compose down left {what:?} behind");
    }
}
