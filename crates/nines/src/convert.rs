//! Every conversion between the wire (`nines_proto`) and the node's own
//! types, in one place. Conversions from the wire check what they convert
//! (see [`crate::validate`]) and name the field they refuse.

use nines_proto::v1 as pb;

use crate::config::Mode;
use crate::error::Error;
use crate::faults::{FaultSet, LinkRule};
use crate::hlc::Hlc;
use crate::limits::{EPOCH_MAX, LABEL_BYTES_MAX, SHIP_BATCH_ENTRIES_MAX};
use crate::storage::state_machine::{ChangeRecord, DivergentRecord};
use crate::types::{
    NodeId, NodeInfo, PeerLag, Refusal, RemoteEntry, ReplicationSetup, ShipAnswer, Shipment, StoredValue, SyncEntry,
    Version,
};
use crate::validate;

pub fn version_to_proto(v: &Version) -> pb::Version {
    pb::Version {
        hlc_physical_ms: v.hlc.physical_ms,
        hlc_logical: v.hlc.logical,
        origin_region: v.origin.clone(),
        index: v.index,
    }
}

/// A stored value as a client sees it; a tombstone is no value.
pub fn key_value(key: Vec<u8>, stored: StoredValue) -> Option<pb::KeyValue> {
    let version = Some(version_to_proto(&stored.version));
    stored.value.map(|value| pb::KeyValue { key, value, version })
}

pub fn info_to_proto(id: NodeId, n: &NodeInfo) -> pb::NodeInfo {
    pb::NodeInfo {
        id,
        grpc_addr: n.grpc_addr.clone(),
        admin_addr: n.admin_addr.clone(),
        region: n.region.clone(),
        az: n.az.clone(),
        peer_addr: n.peer_addr.clone(),
    }
}

/// Checks a node description from a request and converts it.
pub fn info_from_proto(n: &pb::NodeInfo) -> Result<(NodeId, NodeInfo), Error> {
    if n.id == 0 {
        return Err(Error::invalid("node id must not be 0"));
    }
    for (field, url, example) in [("grpc_addr", &n.grpc_addr, 7001), ("peer_addr", &n.peer_addr, 9001)] {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(Error::invalid(format!(
                "node {} {field} {url:?} must be a URL such as http://127.0.0.1:{example}",
                n.id
            )));
        }
    }
    for (field, label) in [("region", &n.region), ("az", &n.az)] {
        if label.len() > LABEL_BYTES_MAX {
            return Err(Error::invalid(format!(
                "node {} {field} is {} bytes; limit LABEL_BYTES_MAX is {LABEL_BYTES_MAX}",
                n.id,
                label.len()
            )));
        }
    }
    let info = NodeInfo {
        grpc_addr: n.grpc_addr.clone(),
        admin_addr: n.admin_addr.clone(),
        region: n.region.clone(),
        az: n.az.clone(),
        peer_addr: n.peer_addr.clone(),
    };
    Ok((n.id, info))
}

pub fn peer_lag_to_proto(l: PeerLag) -> pb::PeerLag {
    pb::PeerLag { region: l.region, acked_index: l.acked_index, lag_entries: l.lag_entries, lag_ms: l.lag_ms }
}

pub fn divergent_to_proto(d: DivergentRecord) -> pb::DivergentRecord {
    pb::DivergentRecord {
        kv: Some(pb::KeyValueRecord {
            key: d.key,
            tombstone: d.value.is_none(),
            value: d.value.unwrap_or_default(),
            hlc_physical_ms: d.version.hlc.physical_ms,
            hlc_logical: d.version.hlc.logical,
            origin_region: d.version.origin,
            index: d.version.index,
        }),
        demoted_at_epoch: d.demoted_at_epoch,
    }
}

/// The faults a `SetFaults` request asks for.
pub fn faults_from_proto(r: pb::SetFaultsRequest) -> FaultSet {
    let links = r
        .links
        .iter()
        .map(|l| {
            let rule = if l.drop {
                LinkRule::Drop
            } else {
                LinkRule::Delay(std::time::Duration::from_millis(u64::from(l.delay_ms)))
            };
            (l.to_node, rule)
        })
        .collect();
    FaultSet {
        blocked_regions: r.blocked_regions,
        send_blocked_regions: r.send_blocked_regions,
        clock_offset_ms: r.clock_offset_ms,
        links,
        ship_jitter: std::time::Duration::from_millis(u64::from(r.ship_jitter_ms)),
        log_sync_delay: std::time::Duration::from_millis(u64::from(r.log_sync_delay_ms)),
    }
}

pub fn setup_to_proto(s: &ReplicationSetup) -> pb::ReplicationSetup {
    pb::ReplicationSetup {
        region: s.region.clone(),
        peers: s.peers.clone(),
        mode: s.mode.as_str().into(),
        initial_primary: s.initial_primary.clone(),
    }
}

/// Checks a replication setup from a request and converts it.
pub fn setup_from_proto(s: &pb::ReplicationSetup) -> Result<ReplicationSetup, Error> {
    let mode = match s.mode.as_str() {
        "active-active" => Mode::ActiveActive,
        "active-passive" => Mode::ActivePassive,
        other => return Err(Error::invalid(format!("mode {other:?} is neither active-active nor active-passive"))),
    };
    for label in std::iter::once(&s.region).chain(&s.peers).chain(std::iter::once(&s.initial_primary)) {
        if label.len() > LABEL_BYTES_MAX {
            return Err(Error::invalid(format!("region name {label:?} is over LABEL_BYTES_MAX {LABEL_BYTES_MAX}")));
        }
    }
    if s.region.is_empty() || s.peers.iter().any(|p| p.is_empty() || *p == s.region) {
        return Err(Error::invalid("region must be named, and peers must be other, named regions"));
    }
    let mut peers = s.peers.clone();
    peers.sort();
    peers.dedup();
    if mode == Mode::ActivePassive && s.initial_primary != s.region && !peers.contains(&s.initial_primary) {
        return Err(Error::invalid(format!(
            "initial_primary {:?} must be the region or one of its peers in active-passive mode",
            s.initial_primary
        )));
    }
    Ok(ReplicationSetup { region: s.region.clone(), peers, mode, initial_primary: s.initial_primary.clone() })
}

/// One changefeed record, at its index, as it travels to a peer region.
pub fn change_to_remote(index: u64, rec: ChangeRecord) -> RemoteEntry {
    RemoteEntry { origin_index: index, key: rec.key, value: rec.value, hlc: rec.hlc }
}

pub fn shipment_to_proto(s: Shipment) -> pb::ShipRequest {
    let full_sync = s.full_sync.is_some();
    let entries = match s.full_sync {
        // A page's entries are numbered from 1: they have no changefeed index.
        Some(page) => page
            .into_iter()
            .zip(1..)
            .map(|(e, n)| pb::ChangeEntry {
                origin_index: n,
                key: e.key,
                tombstone: e.value.is_none(),
                value: e.value.unwrap_or_default(),
                hlc_physical_ms: e.hlc.physical_ms,
                hlc_logical: e.hlc.logical,
                version_origin: e.origin,
            })
            .collect(),
        None => s
            .entries
            .into_iter()
            .map(|e| pb::ChangeEntry {
                origin_index: e.origin_index,
                key: e.key,
                tombstone: e.value.is_none(),
                value: e.value.unwrap_or_default(),
                hlc_physical_ms: e.hlc.physical_ms,
                hlc_logical: e.hlc.logical,
                version_origin: String::new(),
            })
            .collect(),
    };
    pb::ShipRequest {
        origin_region: s.origin,
        epoch: s.epoch,
        primary: s.primary,
        entries,
        receiver_applied_through: s.receiver_applied_through,
        complete_through: s.complete_through,
        full_sync,
        after: s.after,
    }
}

/// Checks a shipment's shape (entry count, strictly increasing origin
/// indexes, key and value limits) and converts it.
pub fn shipment_from_proto(req: &pb::ShipRequest) -> Result<Shipment, Error> {
    if req.entries.len() > SHIP_BATCH_ENTRIES_MAX {
        return Err(Error::invalid(format!(
            "{} entries; limit SHIP_BATCH_ENTRIES_MAX is {SHIP_BATCH_ENTRIES_MAX}",
            req.entries.len()
        )));
    }
    if req.epoch > EPOCH_MAX {
        return Err(Error::invalid(format!("epoch {} is above EPOCH_MAX {EPOCH_MAX}", req.epoch)));
    }
    if req.full_sync && req.after != 0 {
        return Err(Error::invalid(format!("a full sync page continues from after = 0, not {}", req.after)));
    }
    let mut last = req.after;
    let mut entries = Vec::with_capacity(req.entries.len());
    for e in &req.entries {
        if e.origin_index <= last {
            return Err(Error::invalid(format!(
                "origin_index {} is not above {last} (the previous entry's, or the batch's `after`)",
                e.origin_index
            )));
        }
        last = e.origin_index;
        validate::key(&e.key)?;
        validate::value(&e.value)?;
        entries.push(RemoteEntry {
            origin_index: e.origin_index,
            key: e.key.clone(),
            value: (!e.tombstone).then(|| e.value.clone()),
            hlc: Hlc { physical_ms: e.hlc_physical_ms, logical: e.hlc_logical },
        });
    }
    let (entries, full_sync) = if req.full_sync {
        let page = req
            .entries
            .iter()
            .zip(entries)
            .map(|(e, r)| {
                let origin =
                    if e.version_origin.is_empty() { req.origin_region.clone() } else { e.version_origin.clone() };
                if origin.len() > LABEL_BYTES_MAX {
                    return Err(Error::invalid(format!("version_origin is over LABEL_BYTES_MAX {LABEL_BYTES_MAX}")));
                }
                Ok(SyncEntry { key: r.key, value: r.value, hlc: r.hlc, origin })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        (Vec::new(), Some(page))
    } else {
        (entries, None)
    };
    Ok(Shipment {
        origin: req.origin_region.clone(),
        epoch: req.epoch,
        primary: req.primary.clone(),
        entries,
        receiver_applied_through: req.receiver_applied_through,
        complete_through: req.complete_through,
        full_sync,
        after: req.after,
    })
}

pub fn answer_to_proto(a: ShipAnswer) -> pb::ShipResponse {
    let refused = match a.refused {
        Refusal::None => pb::ShipRefusal::None,
        Refusal::StaleEpoch => pb::ShipRefusal::StaleEpoch,
        Refusal::ClockAhead => pb::ShipRefusal::ClockAhead,
        Refusal::OutOfOrder => pb::ShipRefusal::OutOfOrder,
    };
    pb::ShipResponse {
        applied_through: a.applied_through,
        epoch: a.epoch,
        primary: a.primary,
        refused: refused as i32,
        reason: a.reason,
        receiver_index: a.receiver_index,
        in_order: a.in_order,
    }
}

/// A peer's answer; a refusal code this build does not know reads as none
/// (the answer's positions still hold).
pub fn answer_from_proto(r: pb::ShipResponse) -> ShipAnswer {
    let refused = match pb::ShipRefusal::try_from(r.refused).unwrap_or(pb::ShipRefusal::None) {
        pb::ShipRefusal::None => Refusal::None,
        pb::ShipRefusal::StaleEpoch => Refusal::StaleEpoch,
        pb::ShipRefusal::ClockAhead => Refusal::ClockAhead,
        pb::ShipRefusal::OutOfOrder => Refusal::OutOfOrder,
    };
    ShipAnswer {
        applied_through: r.applied_through,
        epoch: r.epoch,
        primary: r.primary,
        refused,
        reason: r.reason,
        receiver_index: r.receiver_index,
        in_order: r.in_order,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shipment_survives_the_round_trip_through_the_wire() {
        let s = Shipment {
            origin: "us-east".into(),
            epoch: 3,
            primary: "us-east".into(),
            entries: vec![
                RemoteEntry {
                    origin_index: 5,
                    key: b"k".to_vec(),
                    value: Some(b"v".to_vec()),
                    hlc: Hlc { physical_ms: 9, logical: 1 },
                },
                RemoteEntry {
                    origin_index: 7,
                    key: b"d".to_vec(),
                    value: None,
                    hlc: Hlc { physical_ms: 10, logical: 0 },
                },
            ],
            receiver_applied_through: 4,
            complete_through: 7,
            full_sync: None,
            after: 3,
        };
        assert_eq!(shipment_from_proto(&shipment_to_proto(s.clone())).unwrap(), s);
        // A full sync page: each key with its own version's origin.
        let page = vec![
            SyncEntry {
                key: b"a".to_vec(),
                value: Some(b"1".to_vec()),
                hlc: Hlc { physical_ms: 3, logical: 0 },
                origin: "eu-west".into(),
            },
            SyncEntry {
                key: b"b".to_vec(),
                value: None,
                hlc: Hlc { physical_ms: 4, logical: 2 },
                origin: "us-east".into(),
            },
        ];
        let sync = Shipment { entries: Vec::new(), full_sync: Some(page), after: 0, ..s };
        assert_eq!(shipment_from_proto(&shipment_to_proto(sync.clone())).unwrap(), sync);
        for refused in [Refusal::None, Refusal::StaleEpoch, Refusal::ClockAhead, Refusal::OutOfOrder] {
            let a = ShipAnswer {
                applied_through: 1,
                epoch: 2,
                primary: "p".into(),
                refused,
                reason: "r".into(),
                receiver_index: 3,
                in_order: true,
            };
            assert_eq!(answer_from_proto(answer_to_proto(a.clone())), a);
        }
    }

    #[test]
    fn a_shipment_out_of_order_is_refused_naming_the_index() {
        let mut req = shipment_to_proto(Shipment::default());
        req.entries = vec![
            pb::ChangeEntry { origin_index: 5, key: b"a".to_vec(), ..Default::default() },
            pb::ChangeEntry { origin_index: 5, key: b"b".to_vec(), ..Default::default() },
        ];
        let e = shipment_from_proto(&req).unwrap_err().to_string();
        assert!(e.contains("origin_index 5"), "{e}");
        // Entries at or below the index the batch continues from.
        req.entries.truncate(1);
        req.after = 5;
        let e = shipment_from_proto(&req).unwrap_err().to_string();
        assert!(e.contains("origin_index 5 is not above 5"), "{e}");
        req.entries.clear();
        req.full_sync = true;
        let e = shipment_from_proto(&req).unwrap_err().to_string();
        assert!(e.contains("after = 0, not 5"), "{e}");
    }

    mod hostile {
        use proptest::prelude::*;

        use super::super::*;

        fn change() -> impl Strategy<Value = pb::ChangeEntry> {
            (
                any::<u64>(),
                proptest::collection::vec(any::<u8>(), 0..16),
                any::<bool>(),
                any::<u64>(),
                any::<u32>(),
                ".{0,8}",
            )
                .prop_map(
                    |(origin_index, key, tombstone, hlc_physical_ms, hlc_logical, version_origin)| pb::ChangeEntry {
                        origin_index,
                        key,
                        value: b"v".to_vec(),
                        tombstone,
                        hlc_physical_ms,
                        hlc_logical,
                        version_origin,
                    },
                )
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

            /// Any shipment a peer could send converts or is refused; none
            /// panics, and an accepted one keeps its epoch within EPOCH_MAX.
            #[test]
            fn shipments_of_any_fields_convert_or_are_refused(
                origin in ".{0,12}",
                epoch in prop_oneof![any::<u64>(), Just(u64::MAX), Just(EPOCH_MAX), Just(EPOCH_MAX + 1)],
                primary in ".{0,12}",
                entries in proptest::collection::vec(change(), 0..8),
                positions in (any::<u64>(), any::<u64>(), any::<u64>(), any::<bool>()),
            ) {
                let (receiver_applied_through, complete_through, after, full_sync) = positions;
                let req = pb::ShipRequest {
                    origin_region: origin,
                    epoch,
                    primary,
                    entries,
                    receiver_applied_through,
                    complete_through,
                    full_sync,
                    after,
                };
                if let Ok(s) = shipment_from_proto(&req) {
                    prop_assert!(s.epoch <= EPOCH_MAX, "epoch {} accepted", s.epoch);
                }
            }

            /// A member description of any fields converts or is refused; an
            /// accepted one has an id, URLs for both gRPC ports, and labels
            /// within LABEL_BYTES_MAX.
            #[test]
            fn members_of_any_fields_convert_or_are_refused(
                id in prop_oneof![Just(0u64), any::<u64>()],
                grpc_addr in prop_oneof![".{0,20}", Just("http://h:1".to_string())],
                peer_addr in prop_oneof![".{0,20}", Just("https://h:2".to_string())],
                region in ".{0,80}",
                az in ".{0,80}",
            ) {
                let n = pb::NodeInfo { id, grpc_addr, admin_addr: String::new(), region, az, peer_addr };
                if let Ok((id, info)) = info_from_proto(&n) {
                    prop_assert!(id != 0);
                    prop_assert!(info.grpc_addr.starts_with("http") && info.peer_addr.starts_with("http"));
                    prop_assert!(info.region.len() <= LABEL_BYTES_MAX && info.az.len() <= LABEL_BYTES_MAX);
                }
            }

            /// A replication setup of any fields converts or is refused; an
            /// accepted one names its region and lists other regions once.
            #[test]
            fn setups_of_any_fields_convert_or_are_refused(
                region in "[ab]{0,2}",
                peers in proptest::collection::vec("[ab]{0,2}", 0..4),
                mode in prop_oneof![Just("active-active".to_string()), Just("active-passive".to_string()), ".{0,8}"],
                initial_primary in "[ab]{0,2}",
            ) {
                let setup = pb::ReplicationSetup { region, peers, mode, initial_primary };
                if let Ok(s) = setup_from_proto(&setup) {
                    prop_assert!(!s.region.is_empty() && !s.peers.contains(&s.region));
                    prop_assert!(s.peers.windows(2).all(|w| w[0] < w[1]), "sorted, no duplicates: {:?}", s.peers);
                }
            }

            /// A shipment's answer and a fault request of any field values
            /// convert without panicking (an unknown refusal reads as none).
            #[test]
            fn answers_and_fault_requests_of_any_fields_convert(
                refused in any::<i32>(),
                numbers in (any::<u64>(), any::<u64>(), any::<u64>(), any::<bool>()),
                clock_offset_ms in any::<i64>(),
                delay_ms in any::<u32>(),
                ship_jitter_ms in any::<u32>(),
            ) {
                let (applied_through, epoch, receiver_index, in_order) = numbers;
                let r = pb::ShipResponse {
                    applied_through, epoch, primary: "p".into(), refused, reason: String::new(), receiver_index, in_order,
                };
                let a = answer_from_proto(r);
                if pb::ShipRefusal::try_from(refused).is_err() {
                    prop_assert!(matches!(a.refused, Refusal::None));
                }
                let link = pb::LinkFault { to_node: 2, drop: false, delay_ms };
                let f = faults_from_proto(pb::SetFaultsRequest {
                    clock_offset_ms, links: vec![link], ship_jitter_ms, ..Default::default()
                });
                prop_assert_eq!(f.clock_offset_ms, clock_offset_ms);
            }
        }
    }
}
