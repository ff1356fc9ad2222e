//! CreateRoom+DestroyRoom pairs in the library, for counting instructions with callgrind
//! (exact counts, unlike times on a shared machine): `scripts/pair_instructions.sh` runs this
//! twice, with 0 and with N pairs after the same set-up, and divides the difference by N.
//!
//! The set-up of `benches/placement.rs` (`benches/common/pairs.rs`): one region, `PROCESSES`
//! running processes of 4 slots each holding 2 rooms; then enough pairs that the retention
//! window of destroyed rooms (100,000) is full and forgetting, as in a long-running scheduler.
//!
//! Run: `cargo run --release --example pair_cost -- [PROCESSES] [PAIRS]`

#[path = "../benches/common/mod.rs"]
mod common;
#[path = "../benches/common/pairs.rs"]
mod pairs;

use pairs::{populated, room, APP};
use roomsched::Scheduler;
use std::time::Instant;

/// The allocator the `roomsched` binary uses.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

async fn pairs(s: &Scheduler, n: u64) {
    for _ in 0..n {
        let r = s.create_room(room()).await.expect("create");
        s.destroy_room(APP, &r.room_id).await.expect("destroy");
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let processes: usize = args
        .next()
        .map_or(10_000, |a| a.parse().expect("PROCESSES"));
    let measured: u64 = args.next().map_or(1_000_000, |a| a.parse().expect("PAIRS"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let s = populated(processes).await;
        pairs(&s, 110_000).await;
        let started = Instant::now();
        pairs(&s, measured).await;
        if measured > 0 {
            let ns = started.elapsed().as_nanos() / u128::from(measured);
            println!("{measured} pairs at {processes} processes: {ns} ns per pair");
        }
    });
}
