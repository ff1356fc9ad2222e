//! The invariants under concurrency: many tasks on a multi-threaded runtime hammer the
//! scheduler while the invariants are checked after every step.

mod support;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use roomsched::backend::{Simulated, SimulatedConfig};
use roomsched::{Error, ProcessStatus, Scheduler};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;

const REGIONS: [&str; 3] = ["Frankfurt", "Tokyo", "London"];

/// 1,000 concurrent CreateRoom calls over 3 regions in empty regions: exactly
/// ⌈N_region / rpp⌉ processes per region, distinct ids, each room in its own region.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_concurrent_creates_over_three_regions() -> TestResult {
    let s = Scheduler::builder()
        .regions(REGIONS)
        .backend(Simulated::new(SimulatedConfig {
            start_delay: Duration::from_millis(50),
            ..Default::default()
        }))
        .build()?;
    let rpp = 7;
    s.create_deployment(APP, deployment(rpp)).await?;
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let s = s.clone();
            let region = REGIONS[i % 3];
            tokio::spawn(async move { (region, s.create_room(room_in(region)).await) })
        })
        .collect();
    let mut ids = HashSet::new();
    let mut per_region: HashMap<&str, usize> = HashMap::new();
    let mut placed = vec![];
    for t in tasks {
        let (region, r) = t.await?;
        let r = r?;
        assert!(
            ids.insert(r.room_id.clone()),
            "duplicate room id {}",
            r.room_id
        );
        *per_region.entry(region).or_default() += 1;
        placed.push((region, r.process_id));
    }
    let procs = processes(&s).await;
    for region in REGIONS {
        let n = per_region[region];
        let expected = n.div_ceil(rpp as usize);
        assert_eq!(
            procs.iter().filter(|p| p.region == region).count(),
            expected,
            "{region}: {n} rooms"
        );
    }
    let region_of: HashMap<_, _> = procs
        .iter()
        .map(|p| (p.process_id, p.region.clone()))
        .collect();
    for (region, pid) in placed {
        assert_eq!(region_of[&pid], region);
    }
    check_invariants(&s).await;
    Ok(())
}

/// Many tasks doing random creates, destroys, drains and stops at once; after every step the
/// invariants hold, and in the end every room stayed in its region. Operations run under a
/// shared guard and checks under an exclusive one, so each check sees a state between
/// operations (reading a process and then its rooms is two calls) while the operations
/// themselves race each other freely.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_concurrent_operations_keep_invariants() -> TestResult {
    let s = Scheduler::builder()
        .regions(REGIONS)
        .backend(Simulated::new(SimulatedConfig {
            start_delay: Duration::from_millis(1),
            ..Default::default()
        }))
        .max_processes(6)
        .build()?;
    s.create_deployment(APP, deployment(3)).await?;
    let created: Arc<Mutex<Vec<(String, &'static str)>>> = Arc::default();
    let drained: Arc<Mutex<HashMap<roomsched::ProcessId, u32>>> = Arc::default();
    let gate: Arc<tokio::sync::RwLock<()>> = Arc::default();
    let tasks: Vec<_> = (0..16u64)
        .map(|task| {
            let s = s.clone();
            let created = Arc::clone(&created);
            let drained = Arc::clone(&drained);
            let gate = Arc::clone(&gate);
            tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(task);
                let mut mine: Vec<String> = vec![];
                for _ in 0..60 {
                    let op_guard = gate.read().await;
                    let region = REGIONS[rng.random_range(0..3)];
                    match rng.random_range(0..100) {
                        0..=49 => match s.create_room(room_in(region)).await {
                            Ok(r) => {
                                mine.push(r.room_id.clone());
                                created.lock().unwrap().push((r.room_id, region));
                            }
                            Err(Error::ResourceExhausted { .. }) => {}
                            Err(e) => panic!("create: {e}"),
                        },
                        50..=79 if !mine.is_empty() => {
                            let id = mine.swap_remove(rng.random_range(0..mine.len()));
                            // NOT_FOUND when a stop by another task destroyed it first.
                            match s.destroy_room(APP, &id).await {
                                Ok(()) | Err(Error::NotFound(_)) => {}
                                Err(e) => panic!("destroy: {e}"),
                            }
                        }
                        80..=89 => {
                            let procs = processes(&s).await;
                            if !procs.is_empty() {
                                let p = &procs[rng.random_range(0..procs.len())];
                                let after =
                                    s.drain_process(APP, p.process_id).await.expect("drain");
                                assert_ne!(after.status, ProcessStatus::Running);
                                drained
                                    .lock()
                                    .unwrap()
                                    .entry(p.process_id)
                                    .or_insert(after.rooms_allocated);
                            }
                        }
                        _ => {
                            let procs = processes(&s).await;
                            if !procs.is_empty() {
                                let p = &procs[rng.random_range(0..procs.len())];
                                let stopped =
                                    s.stop_process(APP, p.process_id).await.expect("stop");
                                assert_eq!(stopped.rooms_allocated, 0);
                                assert!(stopped.status >= ProcessStatus::Stopping);
                            }
                        }
                    }
                    drop(op_guard);
                    let _check_guard = gate.write().await;
                    check_invariants(&s).await;
                    // A drained process never gains a room.
                    for p in processes(&s).await {
                        if let Some(seen) = drained.lock().unwrap().get_mut(&p.process_id) {
                            assert!(
                                p.rooms_allocated <= *seen,
                                "drained process {} gained a room",
                                p.process_id
                            );
                            *seen = p.rooms_allocated;
                        }
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await?;
    }
    s.settle().await;
    check_invariants(&s).await;
    let procs = processes(&s).await;
    let region_of: HashMap<_, _> = procs
        .iter()
        .map(|p| (p.process_id, p.region.clone()))
        .collect();
    let created = created.lock().unwrap().clone();
    let mut seen = HashSet::new();
    for (id, region) in &created {
        assert!(seen.insert(id.clone()), "room id {id} handed out twice");
        let room = s.get_room(APP, id).await?;
        for a in &room.allocations {
            assert_eq!(
                &region_of[&a.process_id], region,
                "room {id} left its region"
            );
        }
    }
    for p in procs {
        if p.status.is_terminated() || p.status == ProcessStatus::Stopping {
            assert_eq!(p.rooms_allocated, 0);
        }
    }
    Ok(())
}
