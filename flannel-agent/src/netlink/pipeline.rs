//! Many independent requests in flight at once on one rtnetlink socket.
//!
//! A reconcile that programs thousands of peers writes three objects per peer. Awaited
//! one at a time, every write pays a full round trip through the connection task and
//! the kernel (about 0.4 ms in a debug build), which made 10,000 peers take 12 s. The
//! writes of one phase (all neighbours, all FDB entries, all routes) do not depend on
//! each other, so they are sent as a window of [`WINDOW`] outstanding requests: the
//! kernel handles each in order as it arrives and the answers are matched to requests
//! by sequence number, so every object still gets its own result.

use std::future::Future;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::StreamExt;

use super::NetlinkError;

/// Requests kept in flight. The answers of a full window must fit in the socket's receive
/// buffer (an acknowledgement takes about 1 KiB of it; see [`RECV_BUFFER`]), otherwise the
/// kernel drops them and the requests would never be answered.
pub const WINDOW: usize = 256;

/// The receive buffer the agent asks for on its rtnetlink socket: room for the answers of
/// several full windows, and for large dumps (10,000 routes) while the task is busy.
pub(super) const RECV_BUFFER: usize = 8 << 20;

/// How long one request may go unanswered before it is reported as failed (the kernel
/// answers in microseconds; a lost answer must not hang the reconcile).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `op` on every item with at most [`WINDOW`] in flight; returns the items whose
/// request failed, each with its error, in no particular order. A failure never stops
/// the other items.
///
/// Callers hand in an owned list and futures that own what they use (a [`Netlink`]
/// clone is cheap): futures borrowing from the caller trip the compiler's `Send` check
/// of the backends' `async_trait` methods.
///
/// [`Netlink`]: super::Netlink
pub async fn pipelined<T, F, Fut>(items: Vec<T>, op: F) -> Vec<(T, NetlinkError)>
where
    T: Copy,
    F: Fn(T) -> Fut,
    Fut: Future<Output = Result<(), NetlinkError>>,
{
    let mut pending = items.into_iter();
    let mut running = FuturesUnordered::new();
    let mut failed = Vec::new();
    loop {
        while running.len() < WINDOW {
            let Some(item) = pending.next() else { break };
            let request = tokio::time::timeout(REQUEST_TIMEOUT, op(item));
            running.push(async move { (item, request.await) });
        }
        match running.next().await {
            None => return failed,
            Some((_, Ok(Ok(())))) => {}
            Some((item, Ok(Err(e)))) => failed.push((item, e)),
            Some((item, Err(_))) => failed.push((item, NetlinkError::Timeout(REQUEST_TIMEOUT))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn every_item_runs_failures_are_reported_per_item_and_the_window_holds() {
        let (running, peak) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let failed = pipelined((0..1000u32).collect(), |i| {
            let (running, peak) = (&running, &peak);
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::task::yield_now().await;
                running.fetch_sub(1, Ordering::SeqCst);
                if i % 7 == 0 {
                    Err(NetlinkError::Timeout(Duration::from_secs(i.into())))
                } else {
                    Ok(())
                }
            }
        })
        .await;
        let mut items: Vec<u32> = failed.iter().map(|(i, _)| *i).collect();
        items.sort_unstable();
        assert_eq!(items, (0..1000).filter(|i| i % 7 == 0).collect::<Vec<_>>());
        // Each error belongs to its own item.
        for (i, e) in &failed {
            assert!(matches!(e, NetlinkError::Timeout(d) if d.as_secs() == u64::from(*i)));
        }
        let peak = peak.load(Ordering::SeqCst);
        assert!(peak > 1 && peak <= WINDOW, "peak in flight {peak}");
    }
}
