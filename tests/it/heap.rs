//! Memory a burst used is given back. After a connection storm, glibc keeps what the storm freed
//! for reuse; every `server.heap_trim_interval_seconds` the replica asks it to give that back, so
//! RSS falls back instead of staying at the storm's peak. The heap metrics tell the two apart.

use futures_util::future::join_all;

use crate::common::*;

const MIB: f64 = 1048576.0;

/// Connects `n` clients, 100 at a time.
async fn storm(gw: &Gateway, n: usize) -> Vec<Client> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n / 100 {
        clients.extend(join_all((0..100).map(|_| Client::connect(gw))).await);
    }
    clients
}

#[tokio::test]
async fn memory_a_connection_storm_used_is_given_back_once_it_is_over() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("heap-trim");
        let gw = Gateway::start_with(
            &redis,
            &prefix,
            &[("WSBRIDGE__SERVER__HEAP_TRIM_INTERVAL_SECONDS", "1")],
        )
        .await;
        let rss = || gw.metric("process_resident_memory_bytes");
        let before = rss().await;

        let clients = storm(&gw, 4000).await;
        let peak = rss().await;
        assert!(
            peak - before > 8.0 * MIB,
            "4,000 connections should take more than 8 MiB: RSS {:.1} -> {:.1} MiB",
            before / MIB,
            peak / MIB
        );
        drop(clients);
        eventually("every connection of the storm to be gone", || async {
            gw.metric("wsbridge_connections").await == 0.0
        })
        .await;

        // At least half of what the storm took comes back, by a trim (without it, glibc keeps
        // the freed memory and RSS stays near the peak).
        eventually("RSS to fall back by half of the storm's growth", || async {
            rss().await < before + (peak - before) / 2.0
        })
        .await;
        assert!(gw.metric("wsbridge_heap_trims_total").await >= 1.0);
        let in_use = gw.metric("wsbridge_heap_in_use_bytes").await;
        assert!(
            in_use < before,
            "the heap in use ({:.1} MiB) is back under the RSS before the storm ({:.1} MiB)",
            in_use / MIB,
            before / MIB
        );
    })
    .await;
}
