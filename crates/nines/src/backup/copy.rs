//! The leader's side of a backup: confirm leadership (so the copy reflects
//! every write acknowledged before it began), open one storage read
//! transaction at an applied index at or after that point, and stream its
//! keys (values and tombstones) in chunks of frames. Applies go on meanwhile; the transaction
//! keeps its state.

use nines_proto::v1::backup_message::Part;
use nines_proto::v1::{BackupChunk, BackupEnd, BackupHeader, BackupMessage};
use tokio::sync::mpsc;

use super::CHUNK_BYTES;
use crate::error::Error;
use crate::hlc::Hlc;
use crate::node::Node;
use crate::storage::snapshot::{self, Item};

/// Chunks read ahead of the receiver: the reader waits beyond this, so a
/// slow object store holds at most this many chunks in memory.
const CHUNKS_AHEAD: usize = 2;

/// Starts a copy of the region's key space on this node, which must lead.
/// The receiver yields the header, the chunks and the end, or an error
/// that ends the copy.
pub async fn start(node: &Node) -> Result<mpsc::Receiver<Result<BackupMessage, Error>>, Error> {
    node.check_leader()?;
    node.ensure_linearizable().await?;
    let view = node.reader().consistent_view().map_err(|e| Error::Internal(format!("opening a backup view: {e}")))?;
    let applied = view.applied.unwrap_or_default();
    let header = BackupHeader {
        region: node.region().to_string(),
        epoch: view.region.epoch,
        applied_index: applied.index,
        applied_term: applied.leader_id.term,
        node_id: node.id(),
    };
    let (tx, rx) = mpsc::channel(CHUNKS_AHEAD);
    let msg = |part| Ok(BackupMessage { part: Some(part) });
    // Cannot fail: the channel is new and has room.
    let _ = tx.try_send(msg(Part::Header(header)));
    tokio::task::spawn_blocking(move || {
        let (mut frames, mut chunk_records) = (Vec::with_capacity(CHUNK_BYTES), 0u64);
        let (mut keys, mut tombstones, mut bytes) = (0u64, 0u64, 0u64);
        let (mut hlc_min, mut hlc_max) = (None::<Hlc>, Hlc::default());
        let mut failed = None;
        let mut receiver_gone = false;
        let read = view.each_stored(|key, value| {
            let hlc = value.version.hlc;
            match value.value {
                Some(_) => keys += 1,
                None => tombstones += 1,
            }
            if let Err(e) = snapshot::push_frame(&mut frames, &Item::Data { key, value }) {
                failed = Some(Error::Internal(format!("encoding a backup frame: {e}")));
                return false;
            }
            hlc_min = Some(hlc_min.map_or(hlc, |m| m.min(hlc)));
            hlc_max = hlc_max.max(hlc);
            chunk_records += 1;
            if frames.len() >= CHUNK_BYTES {
                bytes += frames.len() as u64;
                let records = std::mem::take(&mut chunk_records);
                let chunk = BackupChunk { frames: std::mem::take(&mut frames), records };
                receiver_gone = tx.blocking_send(msg(Part::Chunk(chunk))).is_err();
            }
            !receiver_gone
        });
        if receiver_gone {
            return;
        }
        if let Err(e) = read {
            failed = Some(Error::Internal(format!("reading the state for a backup: {e}")));
        }
        if let Some(e) = failed {
            let _ = tx.blocking_send(Err(e));
            return;
        }
        if !frames.is_empty() {
            bytes += frames.len() as u64;
            let _ = tx.blocking_send(msg(Part::Chunk(BackupChunk { frames, records: chunk_records })));
        }
        let hlc_min = hlc_min.unwrap_or_default();
        let end = BackupEnd {
            keys,
            tombstones,
            bytes,
            hlc_min_ms: hlc_min.physical_ms,
            hlc_min_logical: hlc_min.logical,
            hlc_max_ms: hlc_max.physical_ms,
            hlc_max_logical: hlc_max.logical,
        };
        let _ = tx.blocking_send(msg(Part::End(end)));
    });
    Ok(rx)
}
