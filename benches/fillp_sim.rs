//! Goodput of the FillP core in the deterministic simulator.
//!
//! A 100 Mbit/s bottleneck (drop-tail queue of one BDP, at least 64 KiB), RTT
//! 10/50/200 ms, Bernoulli loss 0/1/5/20 % in both directions. The server
//! sends bulk data for 10 simulated seconds from the start of the handshake;
//! the table gives the client's read bytes as a fraction of
//! `link rate x (1 - loss)`. Written to benches/results/fillp_sim.md.
//! Not a timed test: the numbers depend only on the seed, not on the machine.

use std::fmt::Write as _;
use std::time::Duration;

use dmm::fillp::connection::Config;
use dmm::fillp::endpoint::EndpointConfig;
use dmm::fillp::sim::{LinkConfig, Loss, Pair};
use dmm::fillp::wire::RateMode;

const LINK: u64 = 12_500_000; // 100 Mbit/s in bytes/s
const SECS: u64 = 10;
const SEEDS: [u64; 3] = [42, 43, 44];

struct Run {
    fraction: f64,
    /// Same, over the second half only (after handshake and startup).
    steady: f64,
    retrans: u64,
    queue_drops: u64,
}

fn run(mode: RateMode, rtt_ms: u64, loss: f64, seed: u64) -> Run {
    run_traced(mode, rtt_ms, loss, seed, None)
}

/// [`run`], printing every `trace` of simulated time the goodput of that
/// interval, the queue drops so far and the sender's controller state.
fn run_traced(mode: RateMode, rtt_ms: u64, loss: f64, seed: u64, trace: Option<Duration>) -> Run {
    let one_way = Duration::from_millis(rtt_ms / 2);
    let bdp = (LINK as f64 * rtt_ms as f64 / 1000.0) as usize;
    let link = LinkConfig {
        delay: one_way,
        jitter: Duration::ZERO,
        loss: if loss > 0.0 {
            Loss::Bernoulli(loss)
        } else {
            Loss::None
        },
        reorder: 0.0,
        reorder_delay: Duration::ZERO,
        duplicate: 0.0,
        rate: Some(LINK),
        queue: bdp.max(64 * 1024),
    };
    let conn = Config {
        mode,
        fixed_rate: LINK,
        ..Config::default()
    };
    let cfg = EndpointConfig {
        connection: conn,
        cookie_secret: [9; 32],
        ..EndpointConfig::default()
    };
    let mut p = Pair::new(seed, cfg.clone(), cfg, link, link);
    let (ch, sh) = p.connect(1_000_000).expect("handshake");
    let chunk = vec![0u8; 65536];
    let mut got: u64 = 0;
    let mut buf = vec![0u8; 65536];
    let end = Duration::from_secs(SECS);
    let half = end / 2;
    let mut got_half: Option<u64> = None;
    let (mut next_trace, mut got_trace) = (trace, 0u64);
    let _ = p.run_until(50_000_000, end, |p| {
        if got_half.is_none() && p.elapsed() >= half {
            got_half = Some(got);
        }
        if let (Some(at), Some(every)) = (next_trace, trace) {
            if p.elapsed() >= at {
                let mbps = (got - got_trace) as f64 * 8.0 / every.as_secs_f64() / 1e6;
                let st = p.server.connection(sh).map(|c| (c.stats(), c.controller_debug()));
                if let Some((st, cc)) = st {
                    println!(
                        "{:>6.2} s {mbps:>6.1} Mbit/s drops {} retx {} srtt {:?} pace {:.1} Mbit/s {cc}",
                        at.as_secs_f64(),
                        p.s2c.stats.queue_drops,
                        st.retransmissions,
                        st.rtt,
                        st.send_rate as f64 * 8.0 / 1e6,
                    );
                }
                got_trace = got;
                next_trace = Some(at + every);
            }
        }
        if let Some(s) = p.server.connection_mut(sh) {
            while s.write(&chunk).is_ok_and(|n| n > 0) {}
        }
        if let Some(c) = p.client.connection_mut(ch) {
            while let Ok(n) = c.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got += n as u64;
            }
        }
        p.elapsed() >= end
    });
    let secs = p.elapsed().as_secs_f64();
    let ideal = LINK as f64 * secs * (1.0 - loss);
    let retrans = p
        .server
        .connection(sh)
        .map(|c| c.stats().retransmissions)
        .unwrap_or(0);
    let steady_ideal = LINK as f64 * (secs - half.as_secs_f64()) * (1.0 - loss);
    Run {
        fraction: got as f64 / ideal,
        steady: (got - got_half.unwrap_or(0)) as f64 / steady_ideal,
        retrans,
        queue_drops: p.s2c.stats.queue_drops,
    }
}

fn main() {
    // `cargo bench` passes flags such as --bench; nothing to parse.
    // FILLP_SIM_TRACE=mode,rtt_ms,loss[,seed]: one run, traced every 100 ms.
    if let Ok(t) = std::env::var("FILLP_SIM_TRACE") {
        let f: Vec<&str> = t.split(',').collect();
        let mode = match f.first() {
            Some(&"fillp") => RateMode::Fillp,
            Some(&"fixed") => RateMode::Fixed,
            _ => RateMode::Bbr,
        };
        let num = |i: usize, d: f64| f.get(i).and_then(|v| v.parse().ok()).unwrap_or(d);
        let r = run_traced(
            mode,
            num(1, 200.0) as u64,
            num(2, 0.0),
            num(3, 42.0) as u64,
            Some(Duration::from_millis(100)),
        );
        println!(
            "goodput fraction {:.3}, second half {:.3}, retransmissions {}, queue drops {}",
            r.fraction, r.steady, r.retrans, r.queue_drops
        );
        return;
    }
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# FillP core goodput in the simulator\n\n100 Mbit/s bottleneck, queue = max(BDP, 64 KiB), Bernoulli loss both ways, \
         {SECS} s simulated from the first INIT (handshake and startup included).\n\
         Cell: client goodput / (link x (1 - loss)), mean of seeds 42-44; in brackets mean retransmissions and bottleneck queue drops.\n"
    );
    let _ = writeln!(
        md,
        "| mode | RTT ms | loss 0% | loss 1% | loss 5% | loss 20% |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    let mut steady = Vec::new();
    for mode in [RateMode::Bbr, RateMode::Fillp, RateMode::Fixed] {
        for rtt in [10, 50, 200] {
            let mut row = format!("| {mode:?} | {rtt} |");
            let mut steady_row = row.clone();
            for loss in [0.0, 0.01, 0.05, 0.20] {
                // Mean over a few seeds: one unlucky handshake should not decide a cell.
                let runs: Vec<Run> = SEEDS.iter().map(|&s| run(mode, rtt, loss, s)).collect();
                let n = runs.len() as u64;
                let f = runs.iter().map(|r| r.fraction).sum::<f64>() / n as f64;
                let rt = runs.iter().map(|r| r.retrans).sum::<u64>() / n;
                let qd = runs.iter().map(|r| r.queue_drops).sum::<u64>() / n;
                let st = runs.iter().map(|r| r.steady).sum::<f64>() / n as f64;
                let _ = write!(row, " {f:.3} ({rt} / {qd}) |");
                let _ = write!(steady_row, " {st:.3} |");
            }
            println!("{row}");
            let _ = writeln!(md, "{row}");
            steady.push(steady_row);
        }
    }
    let _ = writeln!(
        md,
        "\nSecond half only (5-10 s: after handshake and startup), same runs:\n\n\
         | mode | RTT ms | loss 0% | loss 1% | loss 5% | loss 20% |\n|---|---|---|---|---|---|"
    );
    println!("steady state (5-10 s):");
    for r in &steady {
        println!("{r}");
        let _ = writeln!(md, "{r}");
    }
    let _ = writeln!(
        md,
        "\nNotes: the first table includes the handshake and startup, which at 200 ms RTT \
         keep `bbr` below 0.9: the handshake takes 2 RTTs and the \
         first data arrives 2.5 RTTs (0.5 s, 5% of the run) after the first INIT, so \
         even `fixed` at the link rate reaches only 0.93. `bbr` then starts from \
         `initial_rate` (10 Mbit/s) and, as BBR by design, about doubles its delivery \
         rate per round (the samples of one round measure the pacing of the round \
         before): traced (`FILLP_SIM_TRACE=bbr,200,0`), the link is full 5 rounds \
         (1.0 s) after the first data, which costs about 0.06 of the run, and the \
         startup overshoot (~1400 drops into a one-BDP queue) is repaired within \
         0.3 s at a net cost of under 0.01. An ideal doubling from 10 Mbit/s needs \
         3.3 rounds and still leaves the link unused for about 0.5 s x link, so 0.9 over \
         10 s at 200 ms is out of reach for a startup that starts at 10 Mbit/s; in \
         steady state (second table) `bbr` is at 0.95-1.0. Startup keeps its pacing \
         and in-flight cap from falling below what it had reached (the first round's \
         samples read low, as in Linux BBR), and is not capped by a BDP from a guessed \
         RTT before the first sample: +0.02-0.035 at 200 ms. Growing the startup \
         estimate by the delivered bytes per RTT as well (slow-start style) was tried: \
         +0.01 at 0% loss but 3x the drops and -0.1 at 20% loss, so not kept. \
         Second-half values can exceed 1 when data held back by a hole is read late. \
         `fillp` mode paces at 1.25 x the best reported receive rate and does not compensate \
         for loss, so at 20% loss it grows only by chance (1.25 x 0.8 = 1). `fixed` is \
         set to the link rate: an upper bound for what loss recovery allows."
    );
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/results/fillp_sim.md");
    if let Err(e) = std::fs::write(path, &md) {
        eprintln!("could not write {path}: {e}");
    }
}
