//! Linearizable reads share leadership confirmations: every read waiting
//! when a confirmation round starts is served by that round, so a leader
//! under many concurrent reads runs one quorum round at a time instead of
//! one per read (etcd's read loop does the same).
//!
//! What it promises:
//! - A read is answered by a round that started after the read arrived. A
//!   round already under way when it arrived confirmed leadership and read
//!   the commit index before the read existed, so it cannot serve it: the
//!   read waits for the next one.
//! - Only one round runs at a time; whichever waiting read finds none under
//!   way runs the next, for every read waiting.
//! - A read gets `Ok` only if some round that started after it arrived
//!   confirmed; otherwise the error of the latest round, once one that
//!   started after it has finished.
//! - A round whose runner gave up (its future was dropped: the client went
//!   away) ends at once without an outcome: the reads it would have served
//!   run or wait for another, and none waits on it forever.
//!
//! Caveats:
//! - A read may wait for two rounds (the one under way when it arrived,
//!   then its own), each bounded by the caller's timeout.
//! - One failed round fails every read waiting on it (they all needed it).

use std::future::Future;
use std::sync::Mutex;

use tokio::sync::watch;

use crate::error::Error;

/// The confirmation rounds of one node.
pub struct ReadRounds {
    /// `std::sync::Mutex`: never held across an `.await`.
    state: Mutex<Rounds>,
    /// The number of the latest round finished: what waiting reads watch.
    finished: watch::Sender<u64>,
}

struct Rounds {
    /// The latest round started; rounds count from 1.
    started: u64,
    running: bool,
    /// The latest round finished, the latest that confirmed, and the
    /// outcome of the latest finished.
    finished: u64,
    confirmed: u64,
    last: Result<(), Error>,
}

impl Default for ReadRounds {
    fn default() -> Self {
        ReadRounds {
            state: Mutex::new(Rounds { started: 0, running: false, finished: 0, confirmed: 0, last: Ok(()) }),
            finished: watch::channel(0).0,
        }
    }
}

impl ReadRounds {
    fn lock(&self) -> std::sync::MutexGuard<'_, Rounds> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Returns once a round that started after this call confirmed, or with
    /// the error of the rounds that followed it. `round` runs one round; it
    /// is called only when no other round is under way.
    pub async fn confirm<F, Fut>(&self, round: F) -> Result<(), Error>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(), Error>>,
    {
        let mut finished = self.finished.subscribe();
        let needed = self.lock().started + 1;
        loop {
            let run = {
                let mut rounds = self.lock();
                if rounds.confirmed >= needed {
                    return Ok(());
                }
                if rounds.finished >= needed {
                    // Every round since `needed` began failed.
                    return rounds.last.clone();
                }
                if rounds.running {
                    None
                } else {
                    rounds.running = true;
                    rounds.started += 1;
                    Some(rounds.started)
                }
            };
            match run {
                Some(number) => {
                    let mut running = Running { rounds: self, number, outcome: None };
                    running.outcome = Some(round().await);
                }
                // The sender lives as long as `self`: this never fails
                // while a read waits.
                None => {
                    let _ = finished.changed().await;
                }
            }
        }
    }
}

/// A round under way: dropping it records its outcome, if it got one (an
/// abandoned round has none and counts as never finished), and wakes the
/// waiting reads.
struct Running<'a> {
    rounds: &'a ReadRounds,
    number: u64,
    outcome: Option<Result<(), Error>>,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        {
            let mut rounds = self.rounds.lock();
            rounds.running = false;
            if let Some(outcome) = self.outcome.take() {
                rounds.finished = self.number;
                if outcome.is_ok() {
                    rounds.confirmed = self.number;
                }
                rounds.last = outcome;
            }
        }
        // Wakes the waiting reads even when the number did not move.
        self.rounds.finished.send_replace(self.number);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    /// A round that takes `ms`, counts itself, and fails when `fail` is set.
    async fn round(calls: &AtomicU64, ms: u64, fail: bool) -> Result<(), Error> {
        calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        if fail { Err(Error::Unavailable { reason: "no quorum".into(), retry_safe: true }) } else { Ok(()) }
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_reads_share_rounds_and_a_round_under_way_serves_no_later_read() {
        let rounds = Arc::new(ReadRounds::default());
        let calls = Arc::new(AtomicU64::new(0));
        // 100 reads at once: the first runs a round, the other 99 arrived
        // during it and share the next one.
        let reads: Vec<_> = (0..100)
            .map(|_| {
                let (rounds, calls) = (rounds.clone(), calls.clone());
                tokio::spawn(async move { rounds.confirm(|| round(&calls, 20, false)).await })
            })
            .collect();
        for r in reads {
            r.await.unwrap().unwrap();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2, "100 concurrent reads take two rounds");
        // A read arriving while a round is under way waits for a new round.
        let first = {
            let (rounds, calls) = (rounds.clone(), calls.clone());
            tokio::spawn(async move { rounds.confirm(|| round(&calls, 50, false)).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        let started = rounds.lock().started;
        let late = rounds.confirm(|| round(&calls, 5, false)).await;
        assert!(late.is_ok());
        assert!(rounds.lock().confirmed > started, "the late read was served by a round started after it");
        first.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_round_fails_its_reads_and_an_abandoned_one_blocks_nobody() {
        let rounds = ReadRounds::default();
        let calls = AtomicU64::new(0);
        let e = rounds.confirm(|| round(&calls, 1, true)).await.unwrap_err();
        assert!(e.to_string().contains("no quorum"), "{e}");
        // The next read runs its own round, which confirms.
        rounds.confirm(|| round(&calls, 1, false)).await.unwrap();
        // A runner that gives up mid-round: the round finishes as failed and
        // a later read runs a new one instead of waiting forever.
        let abandoned =
            tokio::time::timeout(Duration::from_millis(10), rounds.confirm(|| round(&calls, 10_000, false)));
        assert!(abandoned.await.is_err(), "the slow round is still under way when abandoned");
        assert!(!rounds.lock().running);
        let after = tokio::time::timeout(Duration::from_secs(5), rounds.confirm(|| round(&calls, 1, false))).await;
        assert!(after.expect("a read after an abandoned round is not stuck").is_ok());
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_waiting_on_an_abandoned_round_runs_the_next_one() {
        let rounds = Arc::new(ReadRounds::default());
        let calls = Arc::new(AtomicU64::new(0));
        let runner = {
            let (rounds, calls) = (rounds.clone(), calls.clone());
            tokio::spawn(async move { rounds.confirm(|| round(&calls, 10_000, false)).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        let waiter = {
            let (rounds, calls) = (rounds.clone(), calls.clone());
            tokio::spawn(async move { rounds.confirm(|| round(&calls, 5, false)).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        runner.abort();
        let served = tokio::time::timeout(Duration::from_secs(1), waiter).await;
        assert!(served.expect("the waiter is not stuck").unwrap().is_ok(), "an abandoned round fails nobody");
        assert_eq!(calls.load(Ordering::SeqCst), 2, "the waiter ran a round of its own");
    }
}
