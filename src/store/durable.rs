//! The durable store: every change is on disk (fsync) before the call that made it returns.
//!
//! Built on [redb](https://docs.rs/redb), an embedded, crash-safe (copy-on-write B-trees with
//! checksummed commits), pure-Rust key-value store: a torn last write recovers to the last
//! complete commit, and no file format of our own is involved. One file, `roomsched.redb`, in
//! the data directory; one table per kind of record, keyed by the record's id, so the file
//! holds the live state (plus the retention window of destroyed rooms), not the history.
//!
//! **Group commit.** `append` only queues a change; one writer thread takes every change
//! queued so far, writes them all in one redb transaction and commits it with one fsync, then
//! answers each change's [`Commit`]. Under load many changes share a flush.
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
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

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
    Append(Change, tokio::sync::oneshot::Sender<Result<(), StoreError>>),
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

    fn append(&self, change: Change) -> Commit {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.pending.fetch_add(1, Ordering::SeqCst);
        if let Err(e) = self.send(Command::Append(change, tx)) {
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
    unfolded: Vec<Record>,
    /// Above every key in the journal.
    next_batch: u64,
}

/// Reads the journal: the records not folded into the tables yet, oldest first, and the key
/// for the next batch.
fn read_journal(db: &Database, path: &Path) -> Result<(Vec<Record>, u64), StoreError> {
    let fail = |e: &dyn std::fmt::Display| store_error(path, "cannot read the journal of", e);
    let read = db.begin_read().map_err(|e| fail(&e))?;
    let journal = read.open_table(JOURNAL).map_err(|e| fail(&e))?;
    let mut records = Vec::new();
    let mut next_batch = 0;
    for item in journal.iter().map_err(|e| fail(&e))? {
        let (key, value) = item.map_err(|e| fail(&e))?;
        next_batch = key.value() + 1;
        records.extend(decode::<Vec<Record>>(value.value(), path)?);
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
    unfolded: Vec<Record>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Command>) {
        let mut batch: Vec<(Change, tokio::sync::oneshot::Sender<Result<(), StoreError>>)> =
            Vec::new();
        while let Ok(first) = rx.recv() {
            let mut next = Some(first);
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
        batch: &mut Vec<(Change, tokio::sync::oneshot::Sender<Result<(), StoreError>>)>,
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
                    journal_batch(db, self.next_batch, batch.iter().map(|(c, _)| c))
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
                self.unfolded.extend(change);
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
        let records = std::mem::take(&mut self.unfolded);
        let folded = guarded(&self.path, || {
            fold(db, &records).map_err(|e| store_error(&self.path, "cannot checkpoint", e))
        });
        match folded {
            Ok(()) => tracing::debug!(
                records = records.len(),
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
        let mut journal = latest_per_key(self.unfolded.iter());
        journal.sort_by(|a, b| Key::of(a).cmp(&Key::of(b)));
        let mut merged = Merged {
            journal: journal.into_iter().peekable(),
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
    journal: std::iter::Peekable<std::vec::IntoIter<&'a Record>>,
    chunk: Vec<Record>,
    out: &'a mpsc::SyncSender<Loaded>,
}

impl Merged<'_> {
    fn table_record(&mut self, record: Record) -> Result<(), StoreError> {
        while let Some(newer) = self.journal.next_if(|j| Key::of(j) < Key::of(&record)) {
            self.journal_record(newer)?;
        }
        match self.journal.next_if(|j| Key::of(j) == Key::of(&record)) {
            Some(newer) => self.journal_record(newer),
            None => self.emit(record),
        }
    }

    fn journal_record(&mut self, record: &Record) -> Result<(), StoreError> {
        match record {
            Record::RoomForgotten { .. } => Ok(()),
            record => self.emit(record.clone()),
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

/// The last version of each key among `records` (in order), so a batch or a checkpoint
/// writes every key once (a busy process is re-recorded by every room placed on it).
fn latest_per_key<'a>(records: impl Iterator<Item = &'a Record>) -> Vec<&'a Record> {
    let records: Vec<&Record> = records.collect();
    let mut last: HashMap<Key<'_>, usize, foldhash::fast::RandomState> = HashMap::default();
    for (i, record) in records.iter().enumerate() {
        last.insert(Key::of(record), i);
    }
    records
        .iter()
        .enumerate()
        .filter(|(i, r)| last.get(&Key::of(r)) == Some(i))
        .map(|(_, r)| *r)
        .collect()
}

/// Appends a batch of changes to the journal as one entry and commits it (one fsync).
fn journal_batch<'a>(
    db: &Database,
    seq: u64,
    changes: impl Iterator<Item = &'a Change>,
) -> Result<(), redb::Error> {
    let records = latest_per_key(changes.flatten());
    if records.is_empty() {
        return Ok(()); // only barriers: the batches before this one are committed already
    }
    let mut buf = Vec::with_capacity(256 * records.len());
    let txn = db.begin_write()?;
    txn.open_table(JOURNAL)?
        .insert(seq, encode(&records, &mut buf))?;
    txn.commit()?;
    Ok(())
}

/// Folds `records` (everything journaled, oldest first) into the tables and empties the
/// journal, in one transaction: the last version of each key, applied in key order (so each
/// B-tree page is rewritten once).
fn fold(db: &Database, records: &[Record]) -> Result<(), redb::Error> {
    let mut latest = latest_per_key(records.iter());
    latest.sort_by(|a, b| Key::of(a).cmp(&Key::of(b)));
    let txn = db.begin_write()?;
    apply(&txn, &latest)?;
    txn.delete_table(JOURNAL)?;
    txn.open_table(JOURNAL)?;
    txn.commit()?;
    Ok(())
}

/// Writes records into their tables.
fn apply(txn: &redb::WriteTransaction, records: &[&Record]) -> Result<(), redb::Error> {
    let mut deployments = txn.open_table(DEPLOYMENTS)?;
    let mut policies = txn.open_table(POLICIES)?;
    let mut processes = txn.open_table(PROCESSES)?;
    let mut rooms = txn.open_table(ROOMS)?;
    let mut rooms_created = txn.open_table(ROOMS_CREATED)?;
    let mut buf = Vec::with_capacity(512);
    for record in records {
        buf.clear();
        match record {
            Record::Deployment(d) => {
                deployments.insert((d.app_id.as_str(), d.deployment_id), encode(d, &mut buf))?;
            }
            Record::RegionPolicy {
                app_id,
                region,
                policy,
            } => {
                policies.insert((app_id.as_str(), region.as_str()), encode(policy, &mut buf))?;
            }
            Record::Process(p) => {
                processes.insert(p.process.process_id.as_u128(), encode(p, &mut buf))?;
            }
            Record::Room(r) => {
                rooms.insert(r.seq, encode(r, &mut buf))?;
            }
            Record::RoomForgotten { seq, .. } => {
                rooms.remove(*seq)?;
            }
            Record::RoomsCreated {
                app_id,
                region,
                second,
                count,
            } => {
                rooms_created.insert((app_id.as_str(), region.as_str(), *second), *count)?;
            }
        }
    }
    Ok(())
}

/// What a record is about: records with the same key overwrite each other. Ordered by table,
/// then key.
#[derive(PartialEq, Eq, Hash, PartialOrd, Ord)]
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

fn encode<'b, T: serde::Serialize>(value: &T, buf: &'b mut Vec<u8>) -> &'b [u8] {
    // Serializing our own plain data types into a Vec cannot fail.
    postcard::to_io(value, &mut *buf).expect("records serialize");
    buf
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
