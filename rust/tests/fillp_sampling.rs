//! Delivery-rate sampling on a sub-millisecond path, over the simulator.
//!
//! On loopback a 64 KiB datagram is acknowledged ~30 us after it leaves, so
//! below ~17 Gbit/s each one leaves into an empty pipe. Such a flow must
//! still measure the path: an estimate that once read low (a packet train
//! timed while a thread was descheduled) has to climb back within
//! milliseconds. Before delivery samples were allowed to span one min RTT,
//! it had no samples at all, and loopback bench rounds ran at 2 Gbit/s for
//! up to half a second.

use std::time::Duration;

use dmm::fillp::connection::Config;
use dmm::fillp::endpoint::{ConnectionHandle, EndpointConfig};
use dmm::fillp::sim::{LinkConfig, Pair, Side};

const DATAGRAM: u16 = 65_507;

fn cfg() -> EndpointConfig {
    EndpointConfig {
        connection: Config {
            mtu: DATAGRAM,
            recv_window: 16 << 20,
            send_buffer: 16 << 20,
            ..Config::default()
        },
        cookie_secret: [9; 32],
        ..EndpointConfig::default()
    }
}

/// Bytes the server has read by `until` (simulated time since the start).
fn run_to(
    pair: &mut Pair,
    client: &mut Side,
    server: &mut Side,
    sh: &mut Option<ConnectionHandle>,
    ch: ConnectionHandle,
    until: Duration,
) -> usize {
    let _ = pair.run_until(10_000_000, Duration::from_secs(10), |p| {
        if sh.is_none() {
            *sh = p.server.accept();
        }
        client.pump(&mut p.client, ch);
        if let Some(h) = *sh {
            server.pump(&mut p.server, h);
        }
        p.elapsed() >= until || server.eof
    });
    server.incoming.len()
}

#[test]
fn a_low_estimate_on_a_fast_short_path_climbs_back() {
    // 15 us each way; 2 Gbit/s for the first 40 ms, so the estimate
    // settles there, then 40 Gbit/s.
    let slow = 250_000_000;
    let fast = 5_000_000_000;
    let link = LinkConfig {
        rate: Some(slow),
        queue: 32 << 20,
        ..LinkConfig::ideal(Duration::from_micros(15))
    };
    let mut pair = Pair::new(
        3,
        cfg(),
        cfg(),
        link,
        LinkConfig::ideal(Duration::from_micros(15)),
    );
    let mut client = Side::sending(vec![0x5a; 160 << 20]);
    let mut server = Side::default();
    let ch = pair
        .client
        .connect(pair.now, pair.server_addr)
        .expect("connect");
    let mut sh = None;
    let ms = Duration::from_millis;
    run_to(&mut pair, &mut client, &mut server, &mut sh, ch, ms(40));
    pair.c2s.set_rate(Some(fast));
    let at_switch = run_to(&mut pair, &mut client, &mut server, &mut sh, ch, ms(50));
    let later = run_to(&mut pair, &mut client, &mut server, &mut sh, ch, ms(70));
    // Over 50-70 ms, 10 to 30 ms after the path opened up.
    let rate = (later - at_switch) as f64 / 0.020;
    assert!(
        rate > 0.5 * fast as f64,
        "{:.2} Gbit/s 10-30 ms after the path opened to 40 Gbit/s",
        rate * 8.0 / 1e9
    );
}
