//! The compose cluster of `deploy/docker-compose.yml`, driven through the
//! `docker` command line: the harness's `--docker` mode.
//!
//! Faults here are real: `docker pause` freezes a node's processes (its
//! cgroup, not a signal the node could see), `docker kill` kills them, and
//! `docker network disconnect` takes a node off the `wan` network, so its
//! traffic to the other region, the authority and the controller stops at
//! the network, the client traffic of that region's side included.
//!
//! Invariants:
//! - Only containers of this run's compose project are touched, by their ids.
//! - Dropping a [`Compose`] saves every node's log, then removes the project
//!   (containers, networks, volumes).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// The compose file the `--docker` mode runs.
pub fn default_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/docker-compose.yml")
}

/// The network every node, the authority and the controller share; a
/// region's nodes also have a network of their own.
const WAN: &str = "wan";

/// The compose services of the data nodes, in harness node-id order (ids
/// 1-6), then the authority's (7-9); node `n` publishes gRPC on host port
/// 7000 + n and admin on 8000 + n.
pub const NODE_SERVICES: [(&str, &str); 9] = [
    ("us-east", "us-east-1"),
    ("us-east", "us-east-2"),
    ("us-east", "us-east-3"),
    ("eu-west", "eu-west-1"),
    ("eu-west", "eu-west-2"),
    ("eu-west", "eu-west-3"),
    ("authority", "authority-1"),
    ("authority", "authority-2"),
    ("authority", "authority-3"),
];

/// Host gRPC and admin ports of node `n` (from 1).
pub fn host_ports(n: u64) -> (u16, u16) {
    (7000 + n as u16, 8000 + n as u16)
}

/// One compose project of this run.
pub struct Compose {
    /// `docker compose` or `docker-compose`.
    cmd: Vec<String>,
    file: PathBuf,
    pub project: String,
    image: String,
    /// Where node logs are saved when the project goes.
    logs: Vec<(String, PathBuf)>,
}

/// Runs `docker args...`; its stdout, or an error naming the command and
/// what docker said.
pub fn docker(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("docker").args(args).output().context("running docker (is it installed?)")?;
    if !out.status.success() {
        bail!("`docker {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Why docker cannot be used here, if it cannot: not installed, or the
/// engine does not answer (not running, no permission).
pub fn unavailable() -> Option<String> {
    match Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]).output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!("`docker info` failed: {}", String::from_utf8_lossy(&o.stderr).trim())),
        Err(e) => Some(format!("docker is not installed: {e}")),
    }
}

/// `docker compose` (v2) or `docker-compose` (v1), whichever works.
fn compose_command() -> Option<Vec<String>> {
    let works = |c: &mut Command| c.output().map(|o| o.status.success()).unwrap_or(false);
    if works(Command::new("docker").args(["compose", "version"])) {
        return Some(vec!["docker".into(), "compose".into()]);
    }
    works(Command::new("docker-compose").arg("version")).then(|| vec!["docker-compose".into()])
}

impl Compose {
    /// Checks that docker, compose, the image and the host ports are there,
    /// then starts the project (`up -d`). `logs` names where each service's
    /// log goes when the project is removed.
    pub fn up(file: PathBuf, image: &str, logs: Vec<(String, PathBuf)>) -> anyhow::Result<Compose> {
        if let Some(why) = unavailable() {
            bail!("--docker needs a docker engine: {why}");
        }
        let cmd = compose_command().context("--docker needs `docker compose` or `docker-compose`; neither works")?;
        if !file.exists() {
            bail!("the compose file {} does not exist", file.display());
        }
        docker(&["image", "inspect", "--format", "{{.Id}}", image]).with_context(|| {
            format!("the image {image} is not there: build it with `bash deploy/build-image.sh` (or pass --image)")
        })?;
        for n in 1..=NODE_SERVICES.len() as u64 {
            let (grpc, admin) = host_ports(n);
            for port in [grpc, admin] {
                if std::net::TcpListener::bind(("0.0.0.0", port)).is_err() {
                    bail!(
                        "host port {port} is taken, and the compose cluster publishes ports 7001-7009 and 8001-8009: \
                         stop what holds it first (another nines cluster? `nines status --endpoints \
                         http://127.0.0.1:{port}` shows it)"
                    );
                }
            }
        }
        let project = format!("ninesjepsen{}", std::process::id());
        // Dropped on failure too: a half-started project is removed.
        let compose = Compose { cmd, file, project, image: image.into(), logs };
        compose.run(&["up", "-d"])?;
        Ok(compose)
    }

    /// Runs a compose subcommand of this project.
    fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(&self.cmd[0])
            .args(&self.cmd[1..])
            .args(["-f", &self.file.to_string_lossy(), "-p", &self.project])
            .args(args)
            .env("NINES_IMAGE", &self.image)
            .output()
            .with_context(|| format!("running {}", self.cmd.join(" ")))?;
        if !out.status.success() {
            bail!(
                "`{} {}` failed: {}",
                self.cmd.join(" "),
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The id of a service's container.
    /// Copies the certificates the `certs` service made (from a node's
    /// read-only mount of the volume) into `to`, waiting for the first node
    /// to exist: it starts only after `certs` completed.
    pub fn copy_certs(&self, to: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(to)?;
        let from = format!("{}:/certs/.", self.container(NODE_SERVICES[0].1)?);
        docker(&["cp", &from, &to.to_string_lossy()])?;
        Ok(())
    }

    pub fn container(&self, service: &str) -> anyhow::Result<String> {
        let id = self.run(&["ps", "-q", service])?;
        if id.is_empty() {
            bail!("compose project {} has no container for {service}", self.project);
        }
        Ok(id)
    }

    /// Takes a container off the shared network.
    pub fn disconnect(&self, container: &str) -> anyhow::Result<()> {
        docker(&["network", "disconnect", &self.network(WAN), container]).map(drop)
    }

    /// Puts a container back on the shared network under its service name,
    /// the name its peers know it by.
    pub fn reconnect(&self, container: &str, service: &str) -> anyhow::Result<()> {
        docker(&["network", "connect", "--alias", service, &self.network(WAN), container]).map(drop)
    }

    fn network(&self, name: &str) -> String {
        format!("{}_{name}", self.project)
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        for (service, path) in &self.logs {
            if let Ok(id) = self.container(service) {
                let out = Command::new("docker").args(["logs", "--timestamps", &id]).output();
                if let Ok(out) = out {
                    let _ = std::fs::write(path, [out.stdout, out.stderr].concat());
                }
            }
        }
        if let Err(e) = self.run(&["down", "-v", "--remove-orphans", "-t", "5"]) {
            eprintln!("removing compose project {}: {e:#}", self.project);
        }
    }
}
