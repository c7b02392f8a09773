//! The client's view of the cluster: every region, its endpoints, its role
//! and epoch, learned from any one endpoint (a region's status names every
//! region and its nodes) and merged as regions answer.
//!
//! Merging keeps the highest epoch seen: a region cut off from the others
//! may still call itself primary at an older epoch, and the client must not
//! follow it back.

use nines_proto::v1 as pb;

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
}

impl Topology {
    /// The endpoints given, before any region answered.
    pub(crate) fn seeds(endpoints: Vec<String>) -> Self {
        let seeds = RegionView { name: String::new(), endpoints, role: Role::Unknown, epoch: 0, reachable: false };
        Topology { regions: vec![seeds], active_passive: false, primary: None, epoch: 0 }
    }

    /// The region named `name`.
    pub fn region(&self, name: &str) -> Option<&RegionView> {
        self.regions.iter().find(|r| r.name == name)
    }

    /// The region holding `endpoint`.
    pub(crate) fn region_of(&self, endpoint: &str) -> Option<&RegionView> {
        self.regions.iter().find(|r| r.endpoints.iter().any(|e| e == endpoint))
    }

    /// Where writes go: the primary (active-passive) or the home region.
    pub(crate) fn write_region<'a>(&'a self, home: &'a str) -> &'a str {
        match &self.primary {
            Some(p) if self.active_passive => p,
            _ => home,
        }
    }

    /// The view after a refresh in which `reports` answered, each with the
    /// endpoints it was asked through (regions that did not answer keep
    /// what was known of them). A region that does not list its own nodes
    /// keeps the endpoints that reached it.
    pub(crate) fn merge(&self, reports: &[(Vec<String>, pb::RegionStatusResponse)]) -> Topology {
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
        let mut out = Topology { regions: Vec::new(), active_passive: false, primary: None, epoch: 0 };
        for (asked, report) in reports {
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

    fn asked(r: pb::RegionStatusResponse) -> (Vec<String>, pb::RegionStatusResponse) {
        (vec!["http://asked".into()], r)
    }

    #[test]
    fn a_region_that_lists_no_nodes_keeps_the_endpoints_that_reached_it() {
        let mut r = report("solo", "active", "", 0);
        r.regions.clear();
        let t = Topology::seeds(vec!["http://asked".into()]).merge(&[asked(r)]);
        assert_eq!(t.region_of("http://asked").map(|r| r.name.as_str()), Some("solo"));
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
