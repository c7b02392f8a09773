//! The client's view of the cluster: every region, its endpoints, its role
//! and epoch, learned from any one endpoint (a region's status names every
//! region and its nodes) and merged as regions answer.
//!
//! Merging keeps the highest epoch seen: a region cut off from the others
//! may still call itself primary at an older epoch, and the client must not
//! follow it back.

use nines_proto::v1 as pb;

/// One region's answer to a refresh.
pub(crate) struct Report {
    /// The endpoints it was asked through.
    pub(crate) asked: Vec<String>,
    /// The one that answered, as the application (or a region) spelled it.
    pub(crate) answered: String,
    pub(crate) status: pb::RegionStatusResponse,
}

/// A region's part in cross-region replication, as it reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Role {
    /// Takes writes (active-passive).
    Primary,
    /// Follows the primary; refuses writes.
    Secondary,
    /// A primary stopped for a switchover.
    Fenced,
    /// Takes writes alongside the others (active-active).
    Active,
    /// Not known yet (never answered).
    Unknown,
}

impl Role {
    fn parse(role: &str) -> Role {
        match role {
            "primary" => Role::Primary,
            "secondary" => Role::Secondary,
            "fenced" => Role::Fenced,
            "active" => Role::Active,
            _ => Role::Unknown,
        }
    }
}

/// One region as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RegionView {
    /// The region's name (empty for the endpoints given before any region
    /// answered).
    pub name: String,
    /// Its nodes' gRPC endpoints.
    pub endpoints: Vec<String>,
    /// Its role, as it last reported it.
    pub role: Role,
    /// The epoch of the roles it reported.
    pub epoch: u64,
    /// It answered the last refresh.
    pub reachable: bool,
}

/// The whole cluster as the client last saw it.
///
/// ```no_run
/// # async fn demo(client: nines_client::Client) {
/// let topology = client.refresh_topology().await;
/// for region in &topology.regions {
///     println!("{} {:?} at epoch {}: {:?}", region.name, region.role, region.epoch, region.endpoints);
/// }
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Topology {
    /// Every region known, by name.
    pub regions: Vec<RegionView>,
    /// One primary region takes every write; otherwise every region does.
    pub active_passive: bool,
    /// The primary at the highest epoch seen (active-passive).
    pub primary: Option<String>,
    /// The epoch `primary` was named at.
    pub epoch: u64,
    /// Endpoints as the application spelled them (a DNS name, `localhost`)
    /// and the region each one reached, when its nodes advertise other
    /// addresses.
    aliases: Vec<(String, String)>,
}

impl Topology {
    /// The endpoints given, before any region answered.
    pub(crate) fn seeds(endpoints: Vec<String>) -> Self {
        let seeds = RegionView { name: String::new(), endpoints, role: Role::Unknown, epoch: 0, reachable: false };
        Topology { regions: vec![seeds], active_passive: false, primary: None, epoch: 0, aliases: Vec::new() }
    }

    /// The region named `name`.
    pub fn region(&self, name: &str) -> Option<&RegionView> {
        self.regions.iter().find(|r| r.name == name)
    }

    /// Where calls to region `name` may go: its nodes, then the endpoints
    /// the application gave that reached it (which may be the only ones it
    /// can reach, behind a load balancer or DNS name).
    pub(crate) fn candidates(&self, name: &str) -> Vec<String> {
        let mut out: Vec<String> = self.region(name).map(|r| r.endpoints.clone()).unwrap_or_default();
        for (alias, region) in &self.aliases {
            if region == name && !out.contains(alias) {
                out.push(alias.clone());
            }
        }
        out
    }

    /// The region holding `endpoint`.
    pub(crate) fn region_of(&self, endpoint: &str) -> Option<&RegionView> {
        let listed = self.regions.iter().find(|r| r.endpoints.iter().any(|e| e == endpoint));
        listed.or_else(|| {
            let (_, name) = self.aliases.iter().find(|(e, _)| e == endpoint)?;
            self.region(name)
        })
    }

    /// Where writes go: the primary (active-passive) or the home region.
    pub(crate) fn write_region<'a>(&'a self, home: &'a str) -> &'a str {
        match &self.primary {
            Some(p) if self.active_passive => p,
            _ => home,
        }
    }

    /// The view after a refresh in which `reports` answered, each with the
    /// endpoints it was asked through and the one that answered (regions
    /// that did not answer keep what was known of them). A region that does
    /// not list its own nodes keeps the endpoints that reached it.
    pub(crate) fn merge(&self, reports: &[Report]) -> Topology {
        if reports.is_empty() {
            return self.clone();
        }
        let mut regions: Vec<RegionView> = self.regions.iter().filter(|r| !r.name.is_empty()).cloned().collect();
        for r in &mut regions {
            r.reachable = false;
        }
        let upsert = |regions: &mut Vec<RegionView>, name: &str| -> usize {
            match regions.iter().position(|r| r.name == name) {
                Some(i) => i,
                None => {
                    regions.push(RegionView {
                        name: name.to_string(),
                        endpoints: Vec::new(),
                        role: Role::Unknown,
                        epoch: 0,
                        reachable: false,
                    });
                    regions.len() - 1
                }
            }
        };
        let mut out = Topology {
            regions: Vec::new(),
            active_passive: false,
            primary: None,
            epoch: 0,
            aliases: self.aliases.clone(),
        };
        for Report { asked, answered, status: report } in reports {
            for info in &report.regions {
                let i = upsert(&mut regions, &info.name);
                if !info.endpoints.is_empty() {
                    regions[i].endpoints = info.endpoints.clone();
                }
            }
            let i = upsert(&mut regions, &report.region);
            if regions[i].endpoints.is_empty() {
                regions[i].endpoints = asked.clone();
            }
            if !regions[i].endpoints.contains(answered) {
                out.aliases.retain(|(a, _)| a != answered);
                out.aliases.push((answered.clone(), report.region.clone()));
            }
            regions[i].role = Role::parse(&report.role);
            regions[i].epoch = report.epoch;
            regions[i].reachable = true;
            out.active_passive |= report.mode == "active-passive";
            if report.epoch >= out.epoch && !report.primary.is_empty() {
                out.epoch = report.epoch;
                out.primary = Some(report.primary.clone());
            }
        }
        // A refresh that reached only stale regions does not undo a newer
        // promotion seen before.
        if self.epoch > out.epoch {
            out.epoch = self.epoch;
            out.primary = self.primary.clone();
        }
        out.active_passive |= self.active_passive;
        regions.sort_by(|a, b| a.name.cmp(&b.name));
        out.regions = regions;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(region: &str, role: &str, primary: &str, epoch: u64) -> pb::RegionStatusResponse {
        pb::RegionStatusResponse {
            region: region.into(),
            mode: "active-passive".into(),
            primary: primary.into(),
            epoch,
            role: role.into(),
            regions: vec![
                pb::RegionInfo { name: "us-east".into(), endpoints: vec!["http://e1".into(), "http://e2".into()] },
                pb::RegionInfo { name: "eu-west".into(), endpoints: vec!["http://w1".into()] },
            ],
            ..Default::default()
        }
    }

    fn asked(status: pb::RegionStatusResponse) -> Report {
        Report { asked: vec!["http://asked".into()], answered: "http://asked".into(), status }
    }

    #[test]
    fn a_region_that_lists_no_nodes_keeps_the_endpoints_that_reached_it() {
        let mut r = report("solo", "active", "", 0);
        r.regions.clear();
        let t = Topology::seeds(vec!["http://asked".into()]).merge(&[asked(r)]);
        assert_eq!(t.region_of("http://asked").map(|r| r.name.as_str()), Some("solo"));
    }

    #[test]
    fn an_endpoint_spelled_otherwise_than_advertised_still_names_its_region() {
        let seeds = Topology::seeds(vec!["http://localhost:7001".into()]);
        let seed = "http://localhost:7001".to_string();
        let t = seeds.merge(&[Report {
            asked: vec![seed.clone(), "http://other:7004".into()],
            answered: seed,
            status: report("us-east", "primary", "us-east", 1),
        }]);
        assert_eq!(t.region_of("http://other:7004"), None, "only the endpoint that answered is known");
        assert_eq!(t.region_of("http://localhost:7001").map(|r| r.name.as_str()), Some("us-east"));
        assert_eq!(t.region_of("http://e1").map(|r| r.name.as_str()), Some("us-east"));
        assert_eq!(t.candidates("us-east"), ["http://e1", "http://e2", "http://localhost:7001"]);
    }

    #[test]
    fn one_region_names_them_all_and_the_highest_epoch_wins() {
        let seeds = Topology::seeds(vec!["http://e1".into()]);
        let t = seeds.merge(&[asked(report("us-east", "primary", "us-east", 1))]);
        assert_eq!(t.regions.len(), 2);
        assert_eq!(t.region_of("http://w1").map(|r| r.name.as_str()), Some("eu-west"));
        assert_eq!(t.write_region("eu-west"), "us-east");
        assert!(t.region("us-east").is_some_and(|r| r.reachable && r.role == Role::Primary));
        assert!(t.region("eu-west").is_some_and(|r| !r.reachable && r.role == Role::Unknown));
        // eu-west promoted; us-east still thinks it is primary at epoch 1.
        let t2 = t.merge(&[
            asked(report("us-east", "primary", "us-east", 1)),
            asked(report("eu-west", "primary", "eu-west", 2)),
        ]);
        assert_eq!((t2.primary.as_deref(), t2.epoch), (Some("eu-west"), 2));
        // Later only the stale region answers: the promotion is kept.
        let t3 = t2.merge(&[asked(report("us-east", "primary", "us-east", 1))]);
        assert_eq!((t3.primary.as_deref(), t3.epoch), (Some("eu-west"), 2));
        assert!(t3.region("eu-west").is_some_and(|r| !r.reachable));
        // Nobody answers: nothing changes.
        assert_eq!(t3.merge(&[]), t3);
    }

    #[test]
    fn active_active_writes_stay_home() {
        let mut r = report("us-east", "active", "", 0);
        r.mode = "active-active".into();
        let t = Topology::seeds(vec!["http://e1".into()]).merge(&[asked(r)]);
        assert_eq!(t.write_region("eu-west"), "eu-west");
    }
}
