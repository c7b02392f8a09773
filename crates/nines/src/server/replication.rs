//! The `Replication` service: decodes a peer region's shipment, hands it to
//! [`crate::replication::receive`] on this region's leader (forwarding it
//! there from a follower) and encodes the answer. The protocol and its
//! guarantees are in [`crate::replication`].

use std::sync::Arc;

use nines_proto::v1::replication_server::Replication;
use nines_proto::v1::{ShipRequest, ShipResponse};
use tonic::{Request, Response, Status};

use super::forward::on_leader_peer;
use crate::convert;
use crate::node::Node;
use crate::replication::{Inboxes, ship_client};

pub struct ReplicationService {
    node: Arc<Node>,
    inboxes: Inboxes,
}

impl ReplicationService {
    pub fn new(node: Arc<Node>) -> Self {
        ReplicationService { node, inboxes: Inboxes::default() }
    }
}

#[tonic::async_trait]
impl Replication for ReplicationService {
    async fn ship(&self, req: Request<ShipRequest>) -> Result<Response<ShipResponse>, Status> {
        let (node, inboxes) = (&self.node, &self.inboxes);
        crate::tls::check_shipment_origin(&req, &req.get_ref().origin_region, node.region())?;
        let remote = |c, r| async move { ship_client(c).ship(r).await };
        on_leader_peer(node, req, remote, |r| async move {
            let shipment = convert::shipment_from_proto(&r)?;
            crate::replication::receive(node, inboxes, shipment).await.map(convert::answer_to_proto)
        })
        .await
    }
}
