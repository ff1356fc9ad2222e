//! The durable store: every change is on disk (fsync) before the call that made it returns.
//!
//! Built on [redb](https://docs.rs/redb), an embedded, crash-safe (copy-on-write B-trees with
//! checksummed commits), pure-Rust key-value store: a torn last write recovers to the last
//! complete commit, and no file format of our own is involved. One file, `roomsched.redb`, in
//! the data directory; one table per kind of record, keyed by the record's id, so the file
//! holds the live state (plus the retention window of destroyed rooms), not the history.
//!
//! **Group commit.** `append` encodes a change on the caller's thread and queues it; one
//! writer thread takes every change queued so far, writes them all as one journal entry in one
//! redb transaction and commits it with one fsync, then answers each change's [`Commit`].
//! Under load many changes share a flush; while every worker of the runtime is busy making
//! more, the writer lets a batch grow for up to 2 ms first (see [`worker_parked`]).
//!
//! **Failure.** When a commit fails (disk full, I/O error) every change of that batch, and
//! every change queued after it, is refused until [`Store::reopen`]: the scheduler then rolls
//! its memory back to what the file holds, so memory never runs ahead of disk.
//!
//! **Compaction.** redb reuses the pages that deleted and overwritten records free. When the
//! file is nonetheless much larger than what it stores, the writer compacts it between
//! batches.

use super::{Change, Commit, ProcessRecord, Record, RoomRecord, Store, StoreError};
use crate::core::types::{Deployment, RegionPolicy};
use redb::{Database, ReadOnlyDatabase, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The store's file inside the data directory.
pub const FILE_NAME: &str = "roomsched.redb";

/// The layout of the tables below. Bumped on any incompatible change; a store written by a
/// newer build is refused, never rewritten.
pub const FORMAT_VERSION: u64 = 1;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const DEPLOYMENTS: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("deployments");
const POLICIES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("region_policies");
const PROCESSES: TableDefinition<u128, &[u8]> = TableDefinition::new("processes");
/// Keyed by `RoomRecord::seq`: new rooms go to the end of the table.
const ROOMS: TableDefinition<u64, &[u8]> = TableDefinition::new("rooms");
/// Group commits not yet folded into the tables above: batch number → the batch's records.
const JOURNAL: TableDefinition<u64, &[u8]> = TableDefinition::new("journal");
/// (app, region, unix second) → rooms created in that second, for usage reports.
const ROOMS_CREATED: TableDefinition<(&str, &str, i64), u64> =
    TableDefinition::new("rooms_created");

/// Records handed to `load`'s visitor per message from the writer thread.
const LOAD_CHUNK: usize = 4096;

/// The journal is folded into the tables once it holds this many records.
const CHECKPOINT_RECORDS: usize = 4096;

/// Compaction is considered every this many commits, and done only when the file is larger
/// than `COMPACT_RATIO` times what it stores and larger than `COMPACT_MIN_BYTES`.
const COMPACT_CHECK_EVERY: u64 = 4096;
const COMPACT_RATIO: u64 = 4;
const COMPACT_MIN_BYTES: u64 = 64 << 20;

/// How long a batch may wait for more changes while every worker of the runtime that makes
/// them is busy (see [`Producers`]), and the batch sizes between which it waits: a smaller
/// batch means few calls in flight, which waiting would only slow down.
const LINGER_MAX: Duration = Duration::from_millis(2);
const LINGER_MIN_CHANGES: usize = 32;
const LINGER_MAX_CHANGES: usize = 1024;
/// How often a waiting writer looks at the workers again when nothing told it that one of
/// them ran out of work (the runtime was built without [`worker_parked`]).
const LINGER_POLL: Duration = Duration::from_micros(100);

/// The tokio runtime whose tasks append changes, when the store was opened inside a
/// multi-threaded one. While all its workers are busy, more changes are on their way and the
/// writer lets the batch grow (for at most `LINGER_MAX`): under load, one commit and one fsync
/// then carry several times more changes. Once one worker runs out of work, waiting would
/// only add latency, and the batch is committed: with few calls in flight nothing waits.
struct Producers(Option<tokio::runtime::RuntimeMetrics>);

impl Producers {
    fn current() -> Producers {
        Producers(
            tokio::runtime::Handle::try_current()
                .ok()
                .filter(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
                .map(|h| h.metrics()),
        )
    }

    fn all_busy(&self) -> bool {
        self.0.as_ref().is_some_and(|m| {
            // An odd count means the worker is parked: it has nothing to do.
            (0..m.num_workers()).all(|w| m.worker_park_unpark_count(w) % 2 == 0)
        })
    }
}

/// Tells writers waiting for more changes that a worker of the runtime ran out of work, so
/// they commit at once instead of at their next look. Pass it to the runtime's
/// [`on_thread_park`](tokio::runtime::Builder::on_thread_park), as `roomsched serve` does;
/// without it a waiting writer looks every `LINGER_POLL`.
pub fn worker_parked() {
    PARKS.count.fetch_add(1, Ordering::SeqCst);
    if PARKS.waiting.load(Ordering::SeqCst) > 0 {
        let _guard = PARKS.lock.lock().unwrap_or_else(|e| e.into_inner());
        PARKS.wake.notify_all();
    }
}

static PARKS: Parks = Parks {
    count: AtomicU64::new(0),
    waiting: AtomicUsize::new(0),
    lock: Mutex::new(()),
    wake: Condvar::new(),
};

/// Worker parks counted by [`worker_parked`], and the writers waiting for the next one.
struct Parks {
    count: AtomicU64,
    waiting: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

impl Parks {
    /// Waits at most `timeout` for a park after the count `seen`.
    fn wait_after(&self, seen: u64, timeout: Duration) {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.count.load(Ordering::SeqCst) == seen {
            let _ = self.wake.wait_timeout(guard, timeout);
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Persists changes in a redb file with group commit.
pub struct DurableStore {
    path: PathBuf,
    commands: mpsc::Sender<Command>,
    /// Changes appended and not answered yet.
    pending: Arc<AtomicUsize>,
    /// Set (before the refused changes are answered) when a commit failed; cleared when the
    /// store is reopened.
    failed: Arc<AtomicBool>,
    on_flush: FlushHook,
}

impl std::fmt::Debug for DurableStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableStore")
            .field("path", &self.path)
            .finish()
    }
}

/// Told how long each successful flush (one commit, one fsync) took.
type FlushHook = Arc<std::sync::OnceLock<Box<dyn Fn(std::time::Duration) + Send + Sync>>>;

enum Command {
    Append(
        Encoded,
        tokio::sync::oneshot::Sender<Result<(), StoreError>>,
    ),
    Load(mpsc::SyncSender<Loaded>),
    Reopen(mpsc::Sender<Result<(), StoreError>>),
    /// Answers once everything queued before it is done.
    Sync(mpsc::Sender<()>),
}

/// What `load` receives from the writer thread: chunks, then exactly one `Done` or `Failed`
/// (a closed channel without either means the writer died mid-way).
enum Loaded {
    Chunk(Vec<Record>),
    Done,
    Failed(StoreError),
}

impl DurableStore {
    /// Opens the store in `dir` (created if missing). Refuses, without touching it, a file
    /// that is not a roomsched store or was written by a newer format.
    pub fn open(dir: impl AsRef<Path>) -> Result<DurableStore, StoreError> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError(format!(
                "cannot create the data directory {}: {e}",
                dir.display()
            ))
        })?;
        let path = dir.join(FILE_NAME);
        let opened = open_db(&path)?;
        let (commands, rx) = mpsc::channel();
        let pending = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicBool::new(false));
        let on_flush = FlushHook::default();
        let writer = Writer {
            on_flush: Arc::clone(&on_flush),
            pending: Arc::clone(&pending),
            failed_flag: Arc::clone(&failed),
            path: path.clone(),
            db: Some(opened.db),
            snapshot: None,
            failed: None,
            commits: 0,
            next_batch: opened.next_batch,
            unfolded: opened.unfolded,
            entry: Vec::new(),
            producers: Producers::current(),
        };
        std::thread::Builder::new()
            .name("roomsched-store".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError(format!("cannot start the store's writer thread: {e}")))?;
        Ok(DurableStore {
            path,
            commands,
            pending,
            failed,
            on_flush,
        })
    }

    /// Calls `hook` with the duration of every successful flush, from the writer thread (so
    /// it must be quick). Only the first hook set is kept.
    pub fn on_flush(&self, hook: impl Fn(std::time::Duration) + Send + Sync + 'static) {
        let _ = self.on_flush.set(Box::new(hook));
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the store's file in bytes, once everything queued so far is written.
    pub fn file_size(&self) -> Result<u64, StoreError> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Sync(tx))?;
        let _ = rx.recv();
        std::fs::metadata(&self.path)
            .map(|m| m.len())
            .map_err(|e| StoreError(format!("{}: {e}", self.path.display())))
    }

    fn send(&self, command: Command) -> Result<(), StoreError> {
        self.commands
            .send(command)
            .map_err(|_| StoreError("the store's writer thread has stopped".into()))
    }
}

impl Store for DurableStore {
    fn wants_records(&self) -> bool {
        true
    }

    /// Encodes `change` here, on the caller's thread: the writer gets one buffer, and the
    /// records are freed by the thread that allocated them.
    fn append(&self, change: Change) -> Commit {
        let encoded = Encoded::of(&change);
        drop(change);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.pending.fetch_add(1, Ordering::SeqCst);
        if let Err(e) = self.send(Command::Append(encoded, tx)) {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            return Commit::Done(Err(e));
        }
        Commit::Pending(rx)
    }

    fn all_committed(&self) -> bool {
        self.pending.load(Ordering::SeqCst) == 0 && !self.failed.load(Ordering::SeqCst)
    }

    /// An empty change: it is answered with the batch it falls in, after every batch before.
    fn barrier(&self) -> Commit {
        self.append(Vec::new())
    }

    fn load(&self, visit: &mut dyn FnMut(Record)) -> Result<(), StoreError> {
        let (tx, rx) = mpsc::sync_channel(4);
        self.send(Command::Load(tx))?;
        for message in rx {
            match message {
                Loaded::Chunk(records) => records.into_iter().for_each(&mut *visit),
                Loaded::Done => return Ok(()),
                Loaded::Failed(e) => return Err(e),
            }
        }
        Err(StoreError(format!(
            "reading {} stopped before the end",
            self.path.display()
        )))
    }

    fn reopen(&self) -> Result<(), StoreError> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Reopen(tx))?;
        rx.recv()
            .unwrap_or_else(|_| Err(StoreError("the store's writer thread has stopped".into())))
    }
}

fn store_error(path: &Path, what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError(format!("{what} {}: {e}", path.display()))
}

/// Runs `f`, turning a panic inside it (redb panics on some damaged files) into an error.
fn guarded<T>(path: &Path, f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown failure");
        Err(StoreError(format!(
            "the store {} is damaged ({what}); move it away (or restore a backup) to start",
            path.display()
        )))
    })
}

fn open_error(path: &Path, e: redb::DatabaseError) -> StoreError {
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => StoreError(format!(
            "the store {} is in use by another roomsched (or another program)",
            path.display()
        )),
        e => StoreError(format!(
            "cannot open the store {}: {e} — the file was left as it is; move it away to \
             start with an empty store",
            path.display()
        )),
    }
}

/// The format version a store was written with (`None` for a new, empty file).
fn format_version(db: &impl ReadableDatabase, path: &Path) -> Result<Option<u64>, StoreError> {
    let read = db
        .begin_read()
        .map_err(|e| store_error(path, "cannot read", e))?;
    match read.open_table(META) {
        Ok(t) => Ok(t
            .get("format_version")
            .map_err(|e| store_error(path, "cannot read", e))?
            .map(|v| v.value())),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(store_error(path, "cannot read", e)),
    }
}

fn check_version(version: Option<u64>, path: &Path) -> Result<(), StoreError> {
    match version {
        Some(v) if v > FORMAT_VERSION => Err(StoreError(format!(
            "the store {} has format version {v}, written by a newer roomsched; this build \
             reads version {FORMAT_VERSION} and older. The file was left as it is",
            path.display()
        ))),
        _ => Ok(()),
    }
}

/// Opens (or creates) the file and checks its format version. An existing file is first
/// opened read-only, so a store this build must refuse is never written to (opening a redb
/// file for writing rewrites its header); one that needs crash recovery is repaired by the
/// writable open.
fn open_db(path: &Path) -> Result<Opened, StoreError> {
    guarded(path, || {
        if path.exists() {
            match ReadOnlyDatabase::open(path) {
                Ok(db) => {
                    let version = format_version(&db, path);
                    drop(db);
                    check_version(version?, path)?;
                }
                Err(redb::DatabaseError::RepairAborted) => {} // needs recovery: below
                Err(e) => return Err(open_error(path, e)),
            }
        }
        let db = if path.exists() {
            Database::open(path)
        } else {
            Database::create(path)
        }
        .map_err(|e| open_error(path, e))?;
        let version = format_version(&db, path)?;
        check_version(version, path)?;
        let db = init(db, version, path)?;
        // Batches journaled before a crash (or a failure) are folded at the next checkpoint,
        // not now: opening must not need to write (the disk may be full).
        let (unfolded, next_batch) = read_journal(&db, path)?;
        Ok(Opened {
            db,
            unfolded,
            next_batch,
        })
    })
}

/// A private copy of the store's last commit, for reads when the file itself cannot be opened
/// for writing (and so cannot be recovered in place): copied to the temp directory, opened
/// (which recovers the copy) and unlinked, so it goes away when it is closed.
fn open_snapshot(path: &Path) -> Result<Opened, StoreError> {
    let copy = std::env::temp_dir().join(format!(
        "roomsched-snapshot-{}-{}.redb",
        std::process::id(),
        uuid::Uuid::new_v4()
    ));
    std::fs::copy(path, &copy).map_err(|e| store_error(path, "cannot copy", e))?;
    let opened = open_db(&copy);
    let _ = std::fs::remove_file(&copy);
    opened
}

/// An open store file and what its journal holds.
struct Opened {
    db: Database,
    /// The journal's records, oldest first.
    unfolded: Encoded,
    /// Above every key in the journal.
    next_batch: u64,
}

/// Reads the journal: the records not folded into the tables yet, oldest first, and the key
/// for the next batch.
fn read_journal(db: &Database, path: &Path) -> Result<(Encoded, u64), StoreError> {
    let fail = |e: &dyn std::fmt::Display| store_error(path, "cannot read the journal of", e);
    let read = db.begin_read().map_err(|e| fail(&e))?;
    let journal = read.open_table(JOURNAL).map_err(|e| fail(&e))?;
    let mut records = Encoded::default();
    let mut next_batch = 0;
    for item in journal.iter().map_err(|e| fail(&e))? {
        let (key, value) = item.map_err(|e| fail(&e))?;
        next_batch = key.value() + 1;
        decode::<Vec<Record>>(value.value(), path)?
            .iter()
            .for_each(|r| records.push(r));
    }
    Ok((records, next_batch))
}

/// Writes the format version and creates every table in a new store.
fn init(db: Database, version: Option<u64>, path: &Path) -> Result<Database, StoreError> {
    match version {
        Some(_) => Ok(db),
        None => {
            let write = || -> Result<(), redb::Error> {
                let txn = db.begin_write()?;
                {
                    txn.open_table(META)?
                        .insert("format_version", FORMAT_VERSION)?;
                    // Create every table, so readers never meet a missing one.
                    txn.open_table(DEPLOYMENTS)?;
                    txn.open_table(POLICIES)?;
                    txn.open_table(PROCESSES)?;
                    txn.open_table(ROOMS)?;
                    txn.open_table(ROOMS_CREATED)?;
                    txn.open_table(JOURNAL)?;
                }
                txn.commit()?;
                Ok(())
            };
            write().map_err(|e| store_error(path, "cannot initialise", e))?;
            Ok(db)
        }
    }
}

struct Writer {
    /// `DurableStore::pending`: lowered once a change is answered.
    pending: Arc<AtomicUsize>,
    /// `DurableStore::failed`.
    failed_flag: Arc<AtomicBool>,
    on_flush: FlushHook,
    path: PathBuf,
    /// `None` after a failure closed it, until `Reopen`.
    db: Option<Database>,
    /// Set when a commit failed: everything is refused until `Reopen`.
    failed: Option<StoreError>,
    /// After a failure, when the file could not be reopened for writing: a private copy of
    /// its last commit that loads read, while changes stay refused.
    snapshot: Option<Database>,
    commits: u64,
    /// The journal key of the next batch.
    next_batch: u64,
    /// What the journal holds (records not folded into the tables yet), oldest first: the
    /// checkpoint folds them from here and loading merges them over the tables, rather than
    /// reading the journal back.
    unfolded: Encoded,
    /// The journal entry being built, kept between batches for its allocation.
    entry: Vec<u8>,
    producers: Producers,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Command>) {
        let mut batch: Vec<(
            Encoded,
            tokio::sync::oneshot::Sender<Result<(), StoreError>>,
        )> = Vec::new();
        while let Ok(first) = rx.recv() {
            let since = Instant::now();
            let mut parks_before = None;
            let mut next = Some(first);
            loop {
                while let Some(command) = next.take() {
                    match command {
                        Command::Append(change, done) => batch.push((change, done)),
                        other => {
                            self.flush(&mut batch);
                            self.handle(other);
                        }
                    }
                    next = rx.try_recv().ok();
                }
                // Linger while every worker is busy and none has run out of work since.
                let parks = *parks_before.get_or_insert_with(|| PARKS.count.load(Ordering::SeqCst));
                let waited = since.elapsed();
                if batch.len() < LINGER_MIN_CHANGES
                    || batch.len() >= LINGER_MAX_CHANGES
                    || waited >= LINGER_MAX
                    || !self.producers.all_busy()
                    || PARKS.count.load(Ordering::SeqCst) != parks
                {
                    break;
                }
                // Parks are reported (the count moved before): the report wakes the writer.
                let told = parks > 0;
                let timeout = LINGER_MAX - waited;
                PARKS.wait_after(
                    parks,
                    if told {
                        timeout
                    } else {
                        LINGER_POLL.min(timeout)
                    },
                );
                next = rx.try_recv().ok();
            }
            self.flush(&mut batch);
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Append(..) => unreachable!("appends are batched"),
            Command::Load(out) => {
                let path = self.path.clone();
                match guarded(&path, || self.load(&out)) {
                    Ok(()) => {
                        let _ = out.send(Loaded::Done);
                    }
                    Err(e) => {
                        self.fail(&e);
                        let _ = out.send(Loaded::Failed(e));
                    }
                }
            }
            Command::Reopen(done) => {
                // Close first: redb holds a lock on the file.
                self.db = None;
                self.snapshot = None;
                let result = match open_db(&self.path) {
                    Ok(opened) => {
                        self.db = Some(opened.db);
                        self.unfolded = opened.unfolded;
                        self.next_batch = opened.next_batch;
                        self.failed = None;
                        self.failed_flag.store(false, Ordering::SeqCst);
                        Ok(())
                    }
                    // The file cannot be opened for writing (say, its filesystem was remounted
                    // read-only): serve loads from a copy of its last commit; changes stay
                    // refused, and the next failure tries the file again.
                    Err(e) => match open_snapshot(&self.path) {
                        Ok(opened) => {
                            tracing::warn!(err = %e, "store not writable: serving reads from a copy of its last commit, refusing changes");
                            self.snapshot = Some(opened.db);
                            self.unfolded = opened.unfolded;
                            // Memory is reloaded from the copy: nothing refused is in it.
                            self.failed_flag.store(false, Ordering::SeqCst);
                            Ok(())
                        }
                        Err(copy) => Err(StoreError(format!("{e} (a read-only copy: {copy})"))),
                    },
                };
                let _ = done.send(result);
            }
            Command::Sync(done) => {
                let _ = done.send(());
            }
        }
    }

    /// Writes and commits a batch, then answers every change in it.
    fn flush(
        &mut self,
        batch: &mut Vec<(
            Encoded,
            tokio::sync::oneshot::Sender<Result<(), StoreError>>,
        )>,
    ) {
        if batch.is_empty() {
            return;
        }
        let started = Instant::now();
        let result = match (&self.failed, &self.db) {
            (Some(e), _) => Err(e.clone()),
            (None, None) => Err(StoreError("the store is closed".into())),
            (None, Some(db)) => {
                let written = guarded(&self.path, || {
                    journal_batch(
                        db,
                        self.next_batch,
                        batch.iter().map(|(c, _)| c),
                        &mut self.entry,
                    )
                    .map_err(|e| store_error(&self.path, "cannot write to", e))
                });
                match written {
                    Ok(()) => {
                        self.next_batch += 1;
                        Ok(())
                    }
                    Err(e) => {
                        self.fail(&e);
                        Err(e)
                    }
                }
            }
        };
        tracing::trace!(
            changes = batch.len(),
            empty = batch.iter().filter(|(c, _)| c.is_empty()).count(),
            records = batch.iter().map(|(c, _)| c.len()).sum::<usize>(),
            took_us = started.elapsed().as_micros() as u64,
            "store flush"
        );
        // A refused change is in memory until it is rolled back (a refused barrier is not).
        if result.is_err() && batch.iter().any(|(change, _)| !change.is_empty()) {
            self.failed_flag.store(true, Ordering::SeqCst);
        }
        let answered = batch.len();
        for (change, done) in batch.drain(..) {
            let _ = done.send(result.clone());
            if result.is_ok() {
                self.unfolded.append(&change);
            }
        }
        self.pending.fetch_sub(answered, Ordering::SeqCst);
        if result.is_ok() {
            if let Some(hook) = self.on_flush.get() {
                hook(started.elapsed());
            }
            self.commits += 1;
            if self.unfolded.len() >= CHECKPOINT_RECORDS {
                self.checkpoint();
            }
            if self.commits % COMPACT_CHECK_EVERY == 0 {
                self.maybe_compact();
            }
        }
    }

    /// Folds the journal into the tables (between batches: the waiters of every journaled
    /// batch have their answer already).
    fn checkpoint(&mut self) {
        let Some(db) = &self.db else { return };
        if self.unfolded.is_empty() {
            return;
        }
        let started = Instant::now();
        let folded = guarded(&self.path, || {
            fold(db, &self.unfolded).map_err(|e| store_error(&self.path, "cannot checkpoint", e))
        });
        let records = self.unfolded.len();
        // Keeps the allocation: the next checkpoint's records fill it again.
        self.unfolded.clear();
        match folded {
            Ok(()) => tracing::debug!(
                records,
                took_ms = started.elapsed().as_millis() as u64,
                "store checkpoint"
            ),
            Err(e) => self.fail(&e),
        }
    }

    /// Refuses everything until `Reopen`: the file may be poisoned after an I/O error.
    fn fail(&mut self, e: &StoreError) {
        tracing::error!(err = %e, "store failed; refusing changes until memory is rolled back to the last commit");
        self.failed_flag.store(true, Ordering::SeqCst);
        self.failed = Some(e.clone());
        self.db = None;
        self.snapshot = None;
    }

    fn maybe_compact(&mut self) {
        let Some(db) = self.db.as_mut() else { return };
        let Ok(file_size) = std::fs::metadata(&self.path).map(|m| m.len()) else {
            return;
        };
        let stored = db
            .begin_write()
            .and_then(|t| {
                let s = t.stats().map_err(redb::TransactionError::from);
                t.abort().ok();
                s
            })
            .map(|s| s.stored_bytes() + s.metadata_bytes());
        let Ok(stored) = stored else { return };
        if file_size < COMPACT_MIN_BYTES || file_size < COMPACT_RATIO * stored.max(1) {
            return;
        }
        let started = Instant::now();
        match db.compact() {
            Ok(_) => {
                let after = std::fs::metadata(&self.path).map_or(0, |m| m.len());
                tracing::info!(
                    before_bytes = file_size,
                    after_bytes = after,
                    took_ms = started.elapsed().as_millis() as u64,
                    "store compacted"
                );
            }
            Err(e) => tracing::warn!(err = %e, "store compaction failed"),
        }
    }

    /// Streams every record to `out`, parents before children: deployments, policies,
    /// processes, rooms, usage counters.
    fn load(&mut self, out: &mpsc::SyncSender<Loaded>) -> Result<(), StoreError> {
        let db = match (&self.failed, &self.db, &self.snapshot) {
            (None, Some(db), _) => db,
            (_, _, Some(snapshot)) => snapshot,
            (Some(e), _, None) => return Err(e.clone()),
            (None, None, None) => return Err(StoreError("the store is closed".into())),
        };
        let err = |e: &dyn std::fmt::Display| store_error(&self.path, "cannot read", e);
        let read = db.begin_read().map_err(|e| err(&e))?;
        let journal = latest_per_key(&self.unfolded).map_err(|e| err(&e))?;
        let mut merged = Merged {
            path: &self.path,
            journal: journal.into_values().peekable(),
            chunk: Vec::with_capacity(LOAD_CHUNK),
            out,
        };
        macro_rules! each {
            ($table:expr, |$k:ident, $v:ident| $body:expr) => {{
                let table = read.open_table($table).map_err(|e| err(&e))?;
                for item in table.iter().map_err(|e| err(&e))? {
                    let (key, value) = item.map_err(|e| err(&e))?;
                    let ($k, $v) = (key.value(), value.value());
                    merged.table_record($body)?;
                }
            }};
        }
        each!(DEPLOYMENTS, |_k, v| Record::Deployment(
            decode::<Deployment>(v, &self.path)?
        ));
        each!(POLICIES, |k, v| Record::RegionPolicy {
            app_id: k.0.to_string(),
            region: k.1.to_string(),
            policy: decode::<RegionPolicy>(v, &self.path)?,
        });
        each!(PROCESSES, |_k, v| Record::Process(decode::<ProcessRecord>(
            v, &self.path
        )?));
        each!(ROOMS, |_k, v| Record::Room(decode::<RoomRecord>(
            v, &self.path
        )?));
        each!(ROOMS_CREATED, |k, v| Record::RoomsCreated {
            app_id: k.0.to_string(),
            region: k.1.to_string(),
            second: k.2,
            count: v,
        });
        merged.finish()
    }
}

/// Streams records to the loader in chunks: the tables' records (in key order, table after
/// table) with the journal's latest versions (also in key order) merged over them.
struct Merged<'a> {
    path: &'a Path,
    journal: std::iter::Peekable<std::collections::btree_map::IntoValues<Key<'a>, Parsed<'a>>>,
    chunk: Vec<Record>,
    out: &'a mpsc::SyncSender<Loaded>,
}

impl Merged<'_> {
    fn table_record(&mut self, record: Record) -> Result<(), StoreError> {
        while let Some(newer) = self.journal.next_if(|j| j.key < Key::of(&record)) {
            self.journal_record(newer)?;
        }
        match self.journal.next_if(|j| j.key == Key::of(&record)) {
            Some(newer) => self.journal_record(newer),
            None => self.emit(record),
        }
    }

    fn journal_record(&mut self, record: Parsed<'_>) -> Result<(), StoreError> {
        match record.stored {
            Stored::Removed => Ok(()),
            _ => self.emit(decode(record.bytes, self.path)?),
        }
    }

    fn emit(&mut self, record: Record) -> Result<(), StoreError> {
        self.chunk.push(record);
        if self.chunk.len() == LOAD_CHUNK {
            self.send()?;
        }
        Ok(())
    }

    fn send(&mut self) -> Result<(), StoreError> {
        self.out
            .send(Loaded::Chunk(std::mem::take(&mut self.chunk)))
            .map_err(|_| StoreError("the loader went away".into()))
    }

    /// The journal's records past the tables' last key, and the last chunk.
    fn finish(mut self) -> Result<(), StoreError> {
        while let Some(newer) = self.journal.next() {
            self.journal_record(newer)?;
        }
        if self.chunk.is_empty() {
            Ok(())
        } else {
            self.send()
        }
    }
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8], path: &Path) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| store_error(path, "a record cannot be decoded in", e))
}

/// Records encoded back to back, each as a postcard [`Record`], with where each one ends: a
/// change as the writer receives it, and the journal's unfolded records.
#[derive(Default)]
struct Encoded {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl Encoded {
    fn of(change: &[Record]) -> Encoded {
        let mut encoded = Encoded {
            bytes: Vec::with_capacity(256 * change.len()),
            ends: Vec::with_capacity(change.len()),
        };
        change.iter().for_each(|r| encoded.push(r));
        encoded
    }

    fn push(&mut self, record: &Record) {
        // Serializing our own plain data types into a Vec cannot fail.
        postcard::to_io(record, &mut self.bytes).expect("records serialize");
        self.ends.push(self.bytes.len());
    }

    fn append(&mut self, other: &Encoded) {
        let base = self.bytes.len();
        self.bytes.extend_from_slice(&other.bytes);
        self.ends.extend(other.ends.iter().map(|end| base + end));
    }

    fn len(&self) -> usize {
        self.ends.len()
    }

    fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
    }

    fn records(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(&self.ends)
            .map(|(start, &end)| &self.bytes[start..end])
    }
}

/// An encoded record's key and what its table stores, read without decoding the rest.
struct Parsed<'a> {
    key: Key<'a>,
    stored: Stored<'a>,
    /// The whole record.
    bytes: &'a [u8],
}

enum Stored<'a> {
    /// The encoded value of the record's table.
    Value(&'a [u8]),
    Count(u64),
    /// The key's removal.
    Removed,
}

/// The leading fields of each [`Record`] variant, in the same order: enough to know a
/// record's key without decoding (or allocating) the rest. postcard writes an enum as its
/// variant's index followed by its fields, so the fields left unread are the table's value.
#[derive(serde::Deserialize)]
enum View<'a> {
    Deployment(#[serde(borrow)] DeploymentKey<'a>),
    Process(ProcessKey),
    Room(RoomKey),
    RegionPolicy {
        app_id: &'a str,
        region: &'a str,
    },
    RoomForgotten {
        _app_id: &'a str,
        _room_id: &'a str,
        seq: u64,
    },
    RoomsCreated {
        app_id: &'a str,
        region: &'a str,
        second: i64,
        count: u64,
    },
}

#[derive(serde::Deserialize)]
struct DeploymentKey<'a> {
    app_id: &'a str,
    deployment_id: u32,
}

#[derive(serde::Deserialize)]
struct ProcessKey {
    process: ProcessIdKey,
}

#[derive(serde::Deserialize)]
struct ProcessIdKey {
    process_id: uuid::Uuid,
}

#[derive(serde::Deserialize)]
struct RoomKey {
    seq: u64,
}

fn parse(bytes: &[u8]) -> Result<Parsed<'_>, postcard::Error> {
    let (view, rest) = postcard::take_from_bytes::<View<'_>>(bytes)?;
    // A newtype variant's value is the record without its variant index (one byte: there
    // are fewer than 128 variants).
    let inner = &bytes[1..];
    let (key, stored) = match view {
        View::Deployment(d) => (
            Key::Deployment(d.app_id, d.deployment_id),
            Stored::Value(inner),
        ),
        View::Process(p) => (
            Key::Process(p.process.process_id.as_u128()),
            Stored::Value(inner),
        ),
        View::Room(r) => (Key::Room(r.seq), Stored::Value(inner)),
        View::RegionPolicy { app_id, region } => (Key::Policy(app_id, region), Stored::Value(rest)),
        View::RoomForgotten { seq, .. } => (Key::Room(seq), Stored::Removed),
        View::RoomsCreated {
            app_id,
            region,
            second,
            count,
        } => (
            Key::RoomsCreated(app_id, region, second),
            Stored::Count(count),
        ),
    };
    Ok(Parsed { key, stored, bytes })
}

/// The last version of each key among `records` (in order), in key order, so a checkpoint
/// writes every key once (a busy region re-records its usage counter with every room created)
/// and each B-tree page once. A B-tree of small nodes, not one large buffer: a large
/// allocation made afresh at every checkpoint costs page faults.
fn latest_per_key(records: &Encoded) -> Result<BTreeMap<Key<'_>, Parsed<'_>>, postcard::Error> {
    let mut latest = BTreeMap::new();
    for bytes in records.records() {
        let record = parse(bytes)?;
        latest.insert(record.key, record);
    }
    Ok(latest)
}

/// Appends a batch of changes to the journal as one entry (a postcard `Vec<Record>`, built in
/// `entry`) and commits it (one fsync).
fn journal_batch<'a>(
    db: &Database,
    seq: u64,
    changes: impl Iterator<Item = &'a Encoded> + Clone,
    entry: &mut Vec<u8>,
) -> Result<(), redb::Error> {
    let count: usize = changes.clone().map(Encoded::len).sum();
    if count == 0 {
        return Ok(()); // only barriers: the batches before this one are committed already
    }
    entry.clear();
    // A sequence's length, then its elements.
    postcard::to_io(&count, &mut *entry).expect("a length serializes");
    changes.for_each(|c| entry.extend_from_slice(&c.bytes));
    let txn = db.begin_write()?;
    txn.open_table(JOURNAL)?.insert(seq, entry.as_slice())?;
    txn.commit()?;
    Ok(())
}

/// Folds `records` (everything journaled, oldest first) into the tables and empties the
/// journal, in one transaction: the last version of each key, applied in key order (so each
/// B-tree page is rewritten once).
fn fold(db: &Database, records: &Encoded) -> Result<(), redb::Error> {
    let latest = latest_per_key(records)
        .map_err(|e| redb::Error::Corrupted(format!("a journaled record: {e}")))?;
    let txn = db.begin_write()?;
    apply(&txn, latest.values())?;
    txn.delete_table(JOURNAL)?;
    txn.open_table(JOURNAL)?;
    txn.commit()?;
    Ok(())
}

/// Writes records into their tables.
fn apply<'a>(
    txn: &redb::WriteTransaction,
    records: impl Iterator<Item = &'a Parsed<'a>>,
) -> Result<(), redb::Error> {
    let mut deployments = txn.open_table(DEPLOYMENTS)?;
    let mut policies = txn.open_table(POLICIES)?;
    let mut processes = txn.open_table(PROCESSES)?;
    let mut rooms = txn.open_table(ROOMS)?;
    let mut rooms_created = txn.open_table(ROOMS_CREATED)?;
    for record in records {
        match (&record.key, &record.stored) {
            (Key::Deployment(app_id, id), Stored::Value(v)) => {
                deployments.insert((*app_id, *id), *v)?;
            }
            (Key::Policy(app_id, region), Stored::Value(v)) => {
                policies.insert((*app_id, *region), *v)?;
            }
            (Key::Process(id), Stored::Value(v)) => {
                processes.insert(*id, *v)?;
            }
            (Key::Room(seq), Stored::Value(v)) => {
                rooms.insert(*seq, *v)?;
            }
            (Key::Room(seq), Stored::Removed) => {
                rooms.remove(*seq)?;
            }
            (Key::RoomsCreated(app_id, region, second), Stored::Count(count)) => {
                rooms_created.insert((*app_id, *region, *second), *count)?;
            }
            _ => unreachable!("parse pairs each key with its kind of value"),
        }
    }
    Ok(())
}

/// What a record is about: records with the same key overwrite each other. Ordered by table,
/// then key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Key<'a> {
    Deployment(&'a str, u32),
    Policy(&'a str, &'a str),
    Process(u128),
    /// A room's record and its removal share the key.
    Room(u64),
    RoomsCreated(&'a str, &'a str, i64),
}

impl<'a> Key<'a> {
    fn of(record: &'a Record) -> Key<'a> {
        match record {
            Record::Deployment(d) => Key::Deployment(&d.app_id, d.deployment_id),
            Record::RegionPolicy { app_id, region, .. } => Key::Policy(app_id, region),
            Record::Process(p) => Key::Process(p.process.process_id.as_u128()),
            Record::Room(r) => Key::Room(r.seq),
            Record::RoomForgotten { seq, .. } => Key::Room(*seq),
            Record::RoomsCreated {
                app_id,
                region,
                second,
                ..
            } => Key::RoomsCreated(app_id, region, *second),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::types::{Room, RoomStatus};

    fn room(seq: u64, config: &str) -> Record {
        Record::Room(RoomRecord {
            seq,
            room: Room {
                app_id: "app".into(),
                room_id: format!("room-{seq}"),
                room_config: config.into(),
                status: RoomStatus::Destroyed,
                current_allocation: None,
                allocations: Vec::new(),
            },
            region: "Frankfurt".into(),
            attempts: 1,
            pinned: false,
        })
    }

    fn forgotten(seq: u64) -> Record {
        Record::RoomForgotten {
            app_id: "app".into(),
            room_id: format!("room-{seq}"),
            seq,
        }
    }

    /// `View` follows `Record`: every variant, encoded as the writer receives it, parses to
    /// the key `Key::of` gives it and to exactly what its table stores.
    #[test]
    fn parsing_an_encoded_record_finds_its_key_and_table_value() {
        use crate::core::types::{PlacementStrategy, ProcessStatus, TransportType};
        let at = chrono::DateTime::from_timestamp(1_700_000_000, 0).expect("a time");
        let deployment = Deployment {
            app_id: "app".into(),
            deployment_id: 7,
            rooms_per_process: 4,
            transport_type: TransportType::default(),
            container_port: 7777,
            additional_container_ports: Vec::new(),
            idle_timeout_enabled: true,
            env: Vec::new(),
            command: vec!["server".into()],
            placement_strategy: PlacementStrategy::default(),
            created_at: at,
        };
        let process = ProcessRecord {
            process: crate::core::types::Process {
                process_id: uuid::Uuid::from_u128(0xfeed),
                app_id: "app".into(),
                deployment_id: 7,
                region: "Frankfurt".into(),
                status: ProcessStatus::Running,
                rooms_per_process: 4,
                rooms_allocated: 1,
                exposed_port: None,
                additional_exposed_ports: Vec::new(),
                created_at: at,
                started_at: Some(at),
                stopping_at: None,
                terminated_at: None,
                summary_exit_reason: String::new(),
                log_path: None,
            },
            drain_requested: false,
            stop_reason: None,
            idle_since: Some(at),
        };
        let policy = RegionPolicy {
            min_processes: 1,
            buffer_rooms: 2,
            max_processes: 3,
        };
        let Record::Room(room_record) = room(9, "cfg") else {
            unreachable!()
        };
        fn bytes<T: serde::Serialize>(value: &T) -> Vec<u8> {
            postcard::to_stdvec(value).expect("serializes")
        }
        let cases: Vec<(Record, Option<Vec<u8>>, Option<u64>)> = vec![
            (
                Record::Deployment(deployment.clone()),
                Some(bytes(&deployment)),
                None,
            ),
            (
                Record::Process(process.clone()),
                Some(bytes(&process)),
                None,
            ),
            (
                Record::Room(room_record.clone()),
                Some(bytes(&room_record)),
                None,
            ),
            (
                Record::RegionPolicy {
                    app_id: "app".into(),
                    region: "Frankfurt".into(),
                    policy,
                },
                Some(bytes(&policy)),
                None,
            ),
            (forgotten(9), None, None),
            (
                Record::RoomsCreated {
                    app_id: "app".into(),
                    region: "Frankfurt".into(),
                    second: -5,
                    count: 300,
                },
                None,
                Some(300),
            ),
        ];
        for (record, value, count) in cases {
            let encoded = Encoded::of(std::slice::from_ref(&record));
            let bytes = encoded.records().next().expect("one record");
            let parsed = parse(bytes).expect("parses");
            assert!(parsed.key == Key::of(&record), "key of {record:?}");
            match (parsed.stored, value, count) {
                (Stored::Value(v), Some(expected), None) => {
                    assert_eq!(v, expected.as_slice(), "value of {record:?}")
                }
                (Stored::Count(n), None, Some(expected)) => assert_eq!(n, expected),
                (Stored::Removed, None, None) => {}
                _ => panic!("wrong kind of value for {record:?}"),
            }
            assert_eq!(
                decode::<Record>(bytes, Path::new("test")).expect("decodes"),
                record
            );
        }
    }

    fn open(dir: &Path) -> DurableStore {
        // A dropped store closes on its writer thread: wait for the file lock.
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match DurableStore::open(dir) {
                Ok(store) => return store,
                Err(e) if Instant::now() < deadline && e.0.contains("in use") => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// (seq, config) of every room, in load order.
    fn rooms(store: &DurableStore) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        store
            .load(&mut |r| {
                if let Record::Room(r) = r {
                    out.push((r.seq, r.room.room_config));
                }
            })
            .expect("load");
        out
    }

    /// Loading merges what the journal holds over the tables (updates, removals, new keys,
    /// in key order), the same before and after a reopen, and a checkpoint changes nothing
    /// that a load shows.
    #[tokio::test]
    async fn loading_merges_the_journal_over_the_tables() {
        let dir = std::env::temp_dir().join(format!(
            "roomsched-journal-merge-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4()
        ));
        let store = open(&dir);
        // Enough records to be folded into the tables by the checkpoint after this commit.
        let first: Vec<Record> = (0..CHECKPOINT_RECORDS as u64 + 10)
            .map(|seq| room(seq * 2, "v1"))
            .collect();
        store.append(first).wait().await.expect("commit");
        // Then, in the journal only: an update, a removal, keys before, between and after.
        let second = vec![
            room(4, "v2"),
            forgotten(6),
            room(3, "new"),
            room(1_000_000, "new"),
        ];
        store.append(second).wait().await.expect("commit");

        let mut expected: Vec<(u64, String)> = (0..CHECKPOINT_RECORDS as u64 + 10)
            .map(|seq| (seq * 2, "v1".to_string()))
            .filter(|(seq, _)| *seq != 6)
            .collect();
        expected.push((3, "new".into()));
        expected.push((1_000_000, "new".into()));
        expected
            .iter_mut()
            .find(|(seq, _)| *seq == 4)
            .expect("room 4")
            .1 = "v2".into();
        expected.sort();

        assert_eq!(rooms(&store), expected, "journal merged over the tables");
        drop(store);
        let store = open(&dir);
        assert_eq!(rooms(&store), expected, "after a reopen");
        // Fold the journal, then read the tables alone.
        let filler: Vec<Record> = (0..CHECKPOINT_RECORDS as u64)
            .map(|i| Record::RoomsCreated {
                app_id: "app".into(),
                region: "Frankfurt".into(),
                second: i as i64,
                count: 1,
            })
            .collect();
        store.append(filler).wait().await.expect("commit");
        assert_eq!(rooms(&store), expected, "after a checkpoint");
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
