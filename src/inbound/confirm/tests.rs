use proptest::prelude::*;

use super::*;

fn settings(appendfsync: &str, save: &str) -> Settings {
    Settings {
        appendfsync: Some(appendfsync.into()),
        save: Some(save.into()),
    }
}

#[test]
fn parses_a_primary_with_replicas() {
    let info =
        "# Server\r\nrun_id:abc123\r\n# Replication\r\nrole:master\r\nconnected_slaves:2\r\n\
                slave0:ip=127.0.0.1,port=7001,state=online,offset=420,lag=0\r\n\
                slave1:ip=127.0.0.1,port=7002,state=wait_bgsave,offset=0,lag=0\r\n\
                master_failover_state:no-failover\r\nmaster_replid:ffee\r\n\
                master_replid2:0000\r\nmaster_repl_offset:512\r\nrepl_backlog_active:1\r\n";
    let parsed = Info::parse(info);
    assert_eq!(
        (
            parsed.run_id.as_str(),
            parsed.replid.as_str(),
            parsed.offset
        ),
        ("abc123", "ffee", 512)
    );
    assert_eq!(parsed.replica_offsets, [420]);
    assert!(parsed.is_master && parsed.replicated);
    assert!(!Info::parse("role:slave\r\n").is_master);
}

#[test]
fn parses_persistence() {
    let info = "rdb_changes_since_last_save:3\r\nrdb_bgsave_in_progress:1\r\n\
                rdb_last_save_time:1796549261\r\nrdb_last_bgsave_status:ok\r\nrdb_saves:2\r\n\
                aof_enabled:1\r\naof_last_write_status:err\r\naof_pending_bio_fsync:1\r\n\
                aof_delayed_fsync:7\r\nconnected_slaves:0\r\nrepl_backlog_active:0\r\n";
    let parsed = Info::parse(info);
    assert_eq!(
        (parsed.last_save, parsed.saving, parsed.saves),
        (1_796_549_261, true, 2)
    );
    assert!(parsed.aof_enabled && !parsed.aof_write_ok && parsed.aof_fsync_running);
    assert_eq!(parsed.aof_delayed_fsyncs, 7);
    assert!(!parsed.replicated);
}

#[test]
fn the_rule_follows_replicas_then_persistence() {
    let aof = Info {
        aof_enabled: true,
        ..Info::default()
    };
    let everysec = settings("everysec", "3600 1");
    assert_eq!(rule(&aof, None), Rule::NotChecked);
    assert_eq!(rule(&aof, Some(&everysec)), Rule::FsyncWindow);
    assert_eq!(rule(&aof, Some(&settings("always", ""))), Rule::FsyncAlways);
    assert_eq!(rule(&aof, Some(&settings("no", ""))), Rule::FsyncNo);
    assert_eq!(rule(&aof, Some(&Settings::default())), Rule::FsyncWindow);
    let replicated = Info {
        replicated: true,
        ..aof.clone()
    };
    assert_eq!(rule(&replicated, Some(&everysec)), Rule::Replicas);

    let rdb = Info::default();
    assert_eq!(rule(&rdb, Some(&everysec)), Rule::Snapshots);
    assert_eq!(rule(&rdb, Some(&Settings::default())), Rule::Snapshots);
    assert_eq!(
        rule(&rdb, Some(&settings("everysec", ""))),
        Rule::NothingPersisted
    );
    // Saved by hand (SAVE) though no save points: a restart loads that snapshot.
    let saved = Info { saves: 1, ..rdb };
    assert_eq!(
        rule(&saved, Some(&settings("everysec", ""))),
        Rule::Snapshots
    );
}

#[test]
fn everysec_confirms_a_round_two_seconds_old_unless_an_fsync_lagged_since() {
    let everysec = settings("everysec", "");
    let start = Instant::now();
    let info = |delayed: u64| Info {
        aof_enabled: true,
        aof_write_ok: true,
        aof_delayed_fsyncs: delayed,
        ..Info::default()
    };
    let mut c = Confirmer::default();
    let second = |n: u64| start + Duration::from_secs(n);
    assert_eq!(c.observe(0, second(0), &info(0), Some(&everysec)).1, None);
    assert_eq!(c.observe(1, second(1), &info(0), Some(&everysec)).1, None);
    // A write held back by a slow fsync between rounds 1 and 2.
    assert_eq!(c.observe(2, second(2), &info(1), Some(&everysec)).1, None);
    // Rounds 0 and 1 are old enough but an fsync lagged since; round 2 is not old enough.
    assert_eq!(c.observe(3, second(3), &info(1), Some(&everysec)).1, None);
    assert_eq!(
        c.observe(4, second(4), &info(1), Some(&everysec)).1,
        Some(2)
    );
    // An fsync running, or a failed write, confirms nothing.
    let running = Info {
        aof_fsync_running: true,
        ..info(1)
    };
    assert_eq!(c.observe(5, second(9), &running, Some(&everysec)).1, None);
    let failed = Info {
        aof_write_ok: false,
        ..info(1)
    };
    assert_eq!(c.observe(6, second(9), &failed, Some(&everysec)).1, None);
    assert_eq!(
        c.observe(7, second(9), &info(1), Some(&everysec)).1,
        Some(4)
    );
}

#[test]
fn marks_thinned_past_the_limit_still_confirm_every_round() {
    let snapshots = settings("everysec", "3600 1");
    let at = Instant::now();
    let mut c = Confirmer::default();
    for round in 0..1000 {
        let info = Info {
            last_save: 1,
            ..Info::default()
        };
        assert_eq!(c.observe(round, at, &info, Some(&snapshots)).1, None);
        assert!(c.marks.len() <= MAX_MARKS);
    }
    let saved = Info {
        last_save: 2,
        ..Info::default()
    };
    assert_eq!(c.observe(1000, at, &saved, Some(&snapshots)).1, Some(999));
}

/// One step of a single Redis without replicas that saves snapshots, seen by the keeper.
#[derive(Debug, Clone, Copy)]
enum SnapshotStep {
    /// An entry is appended and acked.
    Ack,
    /// The keeper's check: a round ends.
    Check,
    /// BGSAVE forks: the snapshot will hold everything written so far.
    Fork,
    /// The background save ends, successfully or not.
    SaveEnds(bool),
    /// SAVE (blocking), successful or not.
    Save(bool),
    /// Redis's clock moves to the next second.
    Tick,
}

fn snapshot_step() -> impl Strategy<Value = SnapshotStep> {
    prop_oneof![
        3 => Just(SnapshotStep::Ack),
        3 => Just(SnapshotStep::Check),
        1 => Just(SnapshotStep::Fork),
        1 => any::<bool>().prop_map(SnapshotStep::SaveEnds),
        1 => any::<bool>().prop_map(SnapshotStep::Save),
        2 => Just(SnapshotStep::Tick),
    ]
}

/// Every entry of a confirmed round is in the newest snapshot that succeeded (what a restart
/// loads).
fn snapshots_keep_every_confirmed_entry(steps: &[SnapshotStep]) -> Result<(), TestCaseError> {
    let settings = settings("everysec", "3600 1");
    let mut c = Confirmer::default();
    let (mut clock, mut last_save, mut saves) = (0i64, 0i64, 0u64);
    // Entries written (each with its round), the count a running BGSAVE holds, and the count
    // the newest successful snapshot holds.
    let mut rounds_of: Vec<u64> = Vec::new();
    let mut forked: Option<usize> = None;
    let mut saved = 0usize;
    let mut round = 0;
    let mut confirmed: Option<u64> = None;
    for step in steps {
        match *step {
            SnapshotStep::Ack => rounds_of.push(round),
            SnapshotStep::Tick => clock += 1,
            SnapshotStep::Fork if forked.is_none() => {
                saves += 1;
                forked = Some(rounds_of.len());
            }
            SnapshotStep::SaveEnds(ok) => {
                if let Some(held) = forked.take() {
                    if ok {
                        (saved, last_save) = (held, clock);
                    }
                }
            }
            SnapshotStep::Save(ok) if forked.is_none() => {
                saves += 1;
                if ok {
                    (saved, last_save) = (rounds_of.len(), clock);
                }
            }
            SnapshotStep::Fork | SnapshotStep::Save(_) => {}
            SnapshotStep::Check => {
                let info = Info {
                    last_save,
                    saving: forked.is_some(),
                    saves,
                    ..Info::default()
                };
                let (rule, now) = c.observe(round, Instant::now(), &info, Some(&settings));
                prop_assert_eq!(rule, Rule::Snapshots);
                if now.is_some() {
                    prop_assert!(now > confirmed, "confirmed rounds only grow");
                    confirmed = now;
                }
                round += 1;
            }
        }
        if let Some(confirmed) = confirmed {
            let kept = rounds_of.iter().filter(|r| **r <= confirmed).count();
            prop_assert!(
                kept <= saved,
                "{} entries confirmed, {} in the snapshot",
                kept,
                saved
            );
        }
    }
    Ok(())
}

/// One step of a primary with two replicas, seen by the keeper.
#[derive(Debug, Clone, Copy)]
enum ReplicaStep {
    Ack,
    Check,
    /// Replica 0 or 1 receives some of what it lacks.
    Replicate(usize, u64),
}

fn replica_step() -> impl Strategy<Value = ReplicaStep> {
    prop_oneof![
        3 => Just(ReplicaStep::Ack),
        3 => Just(ReplicaStep::Check),
        3 => (0usize..2, 1u64..4).prop_map(|(r, n)| ReplicaStep::Replicate(r, n)),
    ]
}

/// Every entry of a confirmed round is held by both replicas.
fn replicas_hold_every_confirmed_entry(steps: &[ReplicaStep]) -> Result<(), TestCaseError> {
    let settings = settings("always", "");
    let mut c = Confirmer::default();
    let mut offset = 0u64;
    let mut replicas = [0u64; 2];
    // Each entry's round and the primary's offset once it was written.
    let mut entries: Vec<(u64, u64)> = Vec::new();
    let (mut round, mut confirmed) = (0, None);
    for step in steps {
        match *step {
            ReplicaStep::Ack => {
                offset += 10;
                entries.push((round, offset));
            }
            ReplicaStep::Replicate(r, n) => replicas[r] = (replicas[r] + n * 7).min(offset),
            ReplicaStep::Check => {
                let info = Info {
                    offset,
                    replica_offsets: replicas.to_vec(),
                    replicated: true,
                    ..Info::default()
                };
                let (rule, now) = c.observe(round, Instant::now(), &info, Some(&settings));
                prop_assert_eq!(rule, Rule::Replicas);
                confirmed = now.or(confirmed);
                round += 1;
            }
        }
        let slowest = replicas[0].min(replicas[1]);
        for (r, at) in &entries {
            prop_assert!(
                confirmed.map_or(true, |c| *r > c) || *at <= slowest,
                "an entry at offset {} confirmed, replicas at {:?}",
                at,
                replicas
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn a_confirmed_entry_is_in_the_snapshot_a_restart_loads(
        steps in proptest::collection::vec(snapshot_step(), 0..40),
    ) {
        snapshots_keep_every_confirmed_entry(&steps)?;
    }

    #[test]
    fn a_confirmed_entry_is_held_by_every_replica(
        steps in proptest::collection::vec(replica_step(), 0..40),
    ) {
        replicas_hold_every_confirmed_entry(&steps)?;
    }
}
