//! `roomsched serve` as a child process, for the tests that run the real binary: its stderr is
//! read to the end (so the server never blocks on a full pipe) and kept, and the address it
//! listens on is taken from its "roomsched listening" log line.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Spawned {
    pub child: Child,
    /// `host:port` it listens on.
    pub addr: String,
    /// Every line it has written to stderr so far.
    pub stderr: Arc<Mutex<Vec<String>>>,
    /// Set once its stderr has reached the end of the pipe.
    pub stderr_done: Arc<AtomicBool>,
}

/// The address in a "roomsched listening" line: `addr=HOST:PORT` in a pretty line, the
/// `fields.addr` of a JSON one (`--log-format json`).
fn listen_addr(line: &str) -> String {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
        if let Some(addr) = v["fields"]["addr"].as_str() {
            return addr.to_string();
        }
    }
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .unwrap_or_else(|| panic!("no addr in {line:?}"))
        .to_string()
}

/// Runs `command` (a `roomsched serve`, possibly behind a shell) with stdin and stdout closed
/// and stderr captured; waits up to `deadline` for it to say where it listens (pretty or JSON
/// logs), and panics with its stderr if it does not.
pub fn spawn(mut command: Command, deadline: Duration) -> Spawned {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run roomsched serve");
    let pipe = child.stderr.take().expect("stderr");
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let stderr_done = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    {
        let (lines, done) = (Arc::clone(&stderr), Arc::clone(&stderr_done));
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
            done.store(true, Ordering::SeqCst);
        });
    }
    let deadline = Instant::now() + deadline;
    let addr = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("roomsched listening") => break listen_addr(&line),
            Ok(_) => {}
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                let drained = Instant::now() + Duration::from_secs(1);
                while !stderr_done.load(Ordering::SeqCst) && Instant::now() < drained {
                    std::thread::sleep(Duration::from_millis(5));
                }
                panic!(
                    "roomsched serve did not say where it listens ({e}); stderr:\n{}",
                    stderr.lock().unwrap().join("\n")
                );
            }
        }
    };
    Spawned {
        child,
        addr,
        stderr,
        stderr_done,
    }
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(test: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "roomsched-test-{test}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path).expect("create the test's temp dir");
        TempDir { path }
    }

    /// Writes a file in the directory and returns its path.
    pub fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path.join(name);
        std::fs::write(&path, text).expect("write a test file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
