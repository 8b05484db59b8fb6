//! A store write whose undo record outgrows what SQLite keeps of it in memory.
//!
//! Its own test binary: `store::configure_sqlite` only takes effect before SQLite's
//! first connection in the process, as it does in `main`.
//!
//! Every write of a writer batch runs in a savepoint; SQLite keeps its undo pages in
//! memory up to the statement-journal spill threshold (16 MB here, see
//! `store::configure_sqlite`), then copies them to a temp file. SQLite's copy wrote each
//! in-memory chunk (as large as the threshold) in one call, and its unix VFS writes at
//! most 128 KB per call: the rest failed as "database or disk is full" on a disk with
//! space to spare. One scheduler turn that started a dozen jobs carrying 1 MB of data
//! (each transition rewrites its row) failed that way, and being a state transition it
//! was retried forever: the store stopped taking writes and those jobs stayed
//! "queued" (seen as `quotas::queued_job_data_stays_in_the_store` timing out in CI).
//! Fixed in `vendor/libsqlite3-sys` (see vendor/PATCHES.md).

use fazt::store::{Store, Transition};

#[test]
fn a_write_whose_undo_record_spills_to_disk_commits() {
    fazt::store::configure_sqlite();
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path()).expect("open store");
    let config = fazt::worker::JobConfig::default();
    let data = "d".repeat(1000 * 1000);
    let mut ids = Vec::new();
    for i in 0..24 {
        let id = format!("job{i:04}");
        store
            .insert_job(
                id.clone(),
                "a",
                "workers/w.js",
                &config,
                Some(data.clone()),
                None,
            )
            .expect("insert a job");
        ids.push(id);
    }
    // One batch of 24 transitions: each rewrites a 1 MB row, ~40 MB of undo pages.
    let batch = ids
        .iter()
        .map(|id| Transition::Started {
            id: id.clone(),
            attempt: 1,
            restarts: 0,
            at: 1,
        })
        .collect();
    store.job_transitions(batch);
    // The flush is a waited write behind the batch: it fails if the batch failed.
    store.flush().expect("the batch commits");
    for id in &ids {
        let row = store.get_job(id).expect("read").expect("row");
        assert_eq!(row.status.as_str(), "running", "{id}");
    }
    assert_eq!(store.status().failed_batches, 0);
}
