//! The embedded store opened per operation (CLI, CNI) against kept open (the agent, the Docker
//! plugin), in one run: puts and gets alternate between the two modes, round by round.
//!
//!     cargo bench -p ferrynet-store --bench held [-- ROUNDS OPS]
//!
//! Prints per-operation medians and the held / per-operation ratios (docs/BENCHMARKS.md), then
//! the cost of the hand-off: a per-operation put (a CNI call) on a file another handle keeps
//! open (an agent), right after the holder's write and 400 ms after it, against the same put
//! on a file nobody holds.

use std::time::{Duration, Instant};

use ferrynet_store::{EmbeddedStore, Store};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Mean put and get time over `ops` operations of each.
async fn round(store: &EmbeddedStore, ops: usize, tag: &str) -> (Duration, Duration) {
    let t = Instant::now();
    for i in 0..ops {
        store
            .put(&format!("/bench/{tag}/{i}"), b"0123456789abcdef".to_vec())
            .await
            .expect("put");
    }
    let put = t.elapsed() / ops as u32;
    let t = Instant::now();
    for i in 0..ops {
        store
            .get(&format!("/bench/{tag}/{i}"))
            .await
            .expect("get")
            .expect("present");
    }
    (put, t.elapsed() / ops as u32)
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rounds = args.first().copied().unwrap_or(7);
    let ops = args.get(1).copied().unwrap_or(200);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let per_call = EmbeddedStore::open(dir.path().join("a.redb")).expect("open");
        let held = EmbeddedStore::open(dir.path().join("b.redb")).expect("open");
        held.keep_open().expect("keep open");
        let (mut pc_put, mut pc_get, mut h_put, mut h_get) = (vec![], vec![], vec![], vec![]);
        for r in 0..rounds {
            // Alternate which goes first, so neither always runs on a warmer machine.
            let order = if r % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for is_held in order {
                let (store, tag) = if is_held {
                    (&held, "h")
                } else {
                    (&per_call, "p")
                };
                let (p, g) = round(store, ops, &format!("{tag}{r}")).await;
                if is_held {
                    h_put.push(p);
                    h_get.push(g);
                } else {
                    pc_put.push(p);
                    pc_get.push(g);
                }
            }
        }
        let (pp, pg, hp, hg) = (median(pc_put), median(pc_get), median(h_put), median(h_get));
        println!("| mode | put, median of {rounds} rounds' means (us) | get (us) |");
        println!("|---|---|---|");
        println!(
            "| per operation (CLI, CNI) | {} | {} |",
            pp.as_micros(),
            pg.as_micros()
        );
        println!(
            "| kept open (agent, plugin) | {} | {} |",
            hp.as_micros(),
            hg.as_micros()
        );
        println!(
            "\nkept open / per operation: put {:.3}, get {:.3} ({ops} ops per round)",
            hp.as_secs_f64() / pp.as_secs_f64(),
            hg.as_secs_f64() / pg.as_secs_f64()
        );

        // The hand-off: `caller` opens per operation, `holder` keeps the same file open. The
        // holder writes either just before the caller (it holds the file: a hand-off) or
        // 400 ms before (it has closed the file on its own after 250 ms idle).
        let caller = EmbeddedStore::open(held.path()).expect("open");
        let mut times: [Vec<Duration>; 3] = [vec![], vec![], vec![]];
        for i in 0..rounds * 4 {
            for case in [i % 3, (i + 1) % 3, (i + 2) % 3] {
                let (store, other, gap) = match case {
                    0 => (&per_call, &per_call, 0),
                    1 => (&caller, &held, 0),
                    _ => (&caller, &held, 400),
                };
                tokio::time::sleep(Duration::from_millis(250)).await;
                other.put("/bench/tick", b"x".to_vec()).await.expect("put");
                tokio::time::sleep(Duration::from_millis(gap)).await;
                let t = Instant::now();
                store
                    .put(&format!("/bench/handoff/{i}/{case}"), b"x".to_vec())
                    .await
                    .expect("put");
                times[case].push(t.elapsed());
            }
        }
        let [alone, busy, idle] = times.map(median);
        println!("\n| a per-operation put (a CNI call) | median (us) | / alone |");
        println!("|---|---|---|");
        for (what, d) in [
            ("on a file nobody holds", alone),
            ("right after the holder wrote (a hand-off)", busy),
            ("400 ms after the holder wrote (closed when idle)", idle),
        ] {
            println!(
                "| {what} | {} | {:.3} |",
                d.as_micros(),
                d.as_secs_f64() / alone.as_secs_f64()
            );
        }
        println!("\n({} puts each)", rounds * 4);
    });
}
