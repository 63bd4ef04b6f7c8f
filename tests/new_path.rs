//! The new path through the ReliableTransport, over loopback with simulated devices, a
//! simulated cloud (legacy) and a simulated backend (new): devices work on it, a backend
//! restart within `new_path.reconnect_grace` closes no device connection, and beyond it
//! `new_primary` devices go back to the cloud.

mod common;

use common::harness::*;
use cync_mitm::sim::cloud::CloudSimConfig;
use std::sync::atomic::Ordering;
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

/// Byte-exact up to the frames in flight when the devices stopped: one side's bytes start
/// with the other's, a few frames apart at most.
fn prefix(a: &[u8], b: &[u8]) -> bool {
    let (short, long) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    long.starts_with(short) && long.len() - short.len() <= 64
}

fn new_primary(
    legacy: std::net::SocketAddr,
    new: std::net::SocketAddr,
) -> cync_mitm::config::Config {
    let mut cfg = proxy_config(legacy);
    cfg.new_path.addresses = vec![new.to_string()];
    cfg.new_path.ca_file = Some(certs().ca_cert.clone());
    cfg.new_path.sni = Some("cm.gelighting.com".into());
    cfg.routing.mode = cync_mitm::route::Mode::NewPrimary;
    cfg.routing.canary_percent = 100.0;
    cfg
}

/// Binds `addr` again (the previous listener on it was just closed).
async fn rebind(addr: std::net::SocketAddr) -> tokio::net::TcpListener {
    for _ in 0..50 {
        if let Ok(l) = tokio::net::TcpListener::bind(addr).await {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cannot bind {addr} again");
}

async fn backend_on(
    addr: std::net::SocketAddr,
    cfg: CloudSimConfig,
) -> std::sync::Arc<cync_mitm::sim::cloud::CloudSim> {
    start_cloud_on(rebind(addr).await, cfg, CloudTls::Legacy).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_work_on_the_new_path_and_survive_a_backend_restart_within_the_grace() {
    let (legacy, legacy_addr) = start_cloud(CloudSimConfig::default()).await;
    let commands = CloudSimConfig {
        command_interval: Some(Duration::from_millis(200)),
        ..CloudSimConfig::default()
    };
    let (backend, new_addr) = start_cloud(commands.clone()).await;
    let p = start_proxy(new_primary(legacy_addr, new_addr)).await;
    let mut fc = fleet_config(p.addr, 5);
    fc.heartbeat = Duration::from_millis(300);
    let fleet = start_fleet(fc);
    assert!(wait_until(T, || fleet.stats().online.load(Ordering::Relaxed) == 5).await);
    assert!(
        wait_until(T, || backend.stats().command_acks.load(Ordering::Relaxed)
            >= 10)
        .await
    );
    assert_eq!(
        legacy.stats().handshakes.load(Ordering::Relaxed),
        0,
        "all on the new path"
    );
    // Frames, bytes and sessions are counted under transport="new".
    use cync_mitm::codec::PacketType;
    use cync_mitm::metrics::Flow;
    use cync_mitm::route::Path;
    assert_eq!(
        p.metrics
            .frames_on(Path::New, Flow::DeviceToCloud, PacketType::HANDSHAKE),
        5
    );
    assert_eq!(
        p.metrics
            .frames_on(Path::Legacy, Flow::DeviceToCloud, PacketType::HANDSHAKE),
        0
    );
    assert_eq!(
        p.metrics.sessions_active.with_label_values(&["new"]).get(),
        5
    );
    assert_eq!(
        p.metrics
            .sessions_active
            .with_label_values(&["legacy"])
            .get(),
        0
    );
    let answered = fleet.stats().answered.load(Ordering::Relaxed);
    assert!(answered > 0);

    // Restart the backend: down for about a second, well within the 10 s grace.
    backend.stop().await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let again = backend_on(new_addr, commands).await;
    // Every device is back on the new backend (its handshake replayed) without reconnecting.
    assert!(
        wait_until(T, || again.stats().handshakes.load(Ordering::Relaxed) == 5).await,
        "handshakes replayed: {}",
        again.stats().handshakes.load(Ordering::Relaxed)
    );
    assert!(
        wait_until(T, || again.stats().command_acks.load(Ordering::Relaxed)
            >= 10)
        .await
    );
    let s = fleet.stats();
    assert_eq!(
        s.disconnects.load(Ordering::Relaxed),
        0,
        "a device noticed the restart"
    );
    assert_eq!(s.connects.load(Ordering::Relaxed), 5);
    // Requests sent while the backend was away were answered after it came back.
    let r = fleet.report();
    assert!(
        r.requests - r.answered <= 5,
        "unanswered requests after the restart: {r:?}"
    );
    assert!(fleet.stats().answered.load(Ordering::Relaxed) > answered);
    // No command is counted as acked that no device executed (the restarted backend's
    // counters start over: its commands are new, whatever their bytes).
    let acks = backend.stats().command_acks.load(Ordering::Relaxed)
        + again.stats().command_acks.load(Ordering::Relaxed);
    let executed = fleet.stats().commands.load(Ordering::Relaxed);
    assert!(
        acks <= executed,
        "{acks} acks for {executed} executed commands"
    );
    assert_eq!(
        p.metrics
            .transport
            .idempotent_drop
            .with_label_values(&["new"])
            .get(),
        0,
        "nothing was repeated"
    );
    assert_eq!(p.metrics.closed_count("new_path_down"), 0);
    fleet.stop().await;
    assert!(
        wait_until(T, || p
            .metrics
            .closed
            .with_label_values(&["new", "device_closed"])
            .get()
            == 5)
        .await
    );
    assert_eq!(
        p.metrics
            .closed
            .with_label_values(&["legacy", "device_closed"])
            .get(),
        0
    );
    again.stop().await;
    legacy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_grace_new_primary_devices_go_back_to_the_cloud() {
    let (legacy, legacy_addr) = start_cloud(CloudSimConfig::default()).await;
    let (backend, new_addr) = start_cloud(CloudSimConfig::default()).await;
    let mut cfg = new_primary(legacy_addr, new_addr);
    cfg.new_path.reconnect_grace = Duration::from_millis(500);
    let p = start_proxy(cfg).await;
    let fleet = start_fleet(fleet_config(p.addr, 4));
    assert!(wait_until(T, || fleet.stats().online.load(Ordering::Relaxed) == 4).await);
    assert_eq!(legacy.stats().handshakes.load(Ordering::Relaxed), 0);
    backend.stop().await;
    // Closed after the grace, they reconnect, the new path is down, they land on the cloud.
    assert!(wait_until(T, || p.metrics.closed_count("new_path_down") == 4).await);
    assert!(wait_until(T, || legacy.stats().handshakes.load(Ordering::Relaxed) == 4).await);
    assert!(wait_until(T, || fleet.stats().online.load(Ordering::Relaxed) == 4).await);
    assert!(p.metrics.new_path_fallbacks.get() >= 4);
    fleet.stop().await;
    legacy.stop().await;
}

/// Devices that ignore 1 % of the commands they receive, and clouds that send 2 % of their
/// commands twice, in one run: on the new path retries get (nearly) every command acked and a
/// repeated command is executed once; on the legacy path the loss and the repeats show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_and_dedup_make_the_new_path_more_reliable_than_the_legacy_one() {
    let chaos = CloudSimConfig {
        command_interval: Some(Duration::from_millis(40)),
        duplicate_commands: 0.02,
        ..CloudSimConfig::default()
    };
    let (legacy, legacy_addr) = start_cloud(chaos.clone()).await;
    let (backend, new_addr) = start_cloud(chaos).await;
    let mut cfg = new_primary(legacy_addr, new_addr);
    cfg.new_path.ack_timeout = Duration::from_millis(200);
    // Fleet B (seed 2) stays on the cloud; fleet A (seed 42) takes the new path.
    let b_ids: Vec<String> = (0..10)
        .map(|i| cync_mitm::sim::device_identity(2, i).0.to_string())
        .collect();
    cfg.routing.exclude = b_ids;
    let p = start_proxy(cfg).await;
    let mut fa = fleet_config(p.addr, 10);
    fa.ignore_commands = 0.01;
    let mut fb = fleet_config(p.addr, 10);
    fb.seed = 2;
    fb.ignore_commands = 0.01;
    let a = start_fleet(fa);
    let b = start_fleet(fb);
    assert!(
        wait_until(T, || a.stats().online.load(Ordering::Relaxed) == 10
            && b.stats().online.load(Ordering::Relaxed) == 10)
        .await
    );
    assert_eq!(legacy.stats().handshakes.load(Ordering::Relaxed), 10);
    assert_eq!(backend.stats().handshakes.load(Ordering::Relaxed), 10);
    tokio::time::sleep(Duration::from_secs(4)).await;
    legacy.set_commands(false);
    backend.set_commands(false);
    // Let the retries finish (200 ms, then 250, 500, 1000 ms at most).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sent_new = backend.stats().commands_sent.load(Ordering::Relaxed) as f64;
    let acked_new = backend.stats().command_acks.load(Ordering::Relaxed) as f64;
    let sent_old = legacy.stats().commands_sent.load(Ordering::Relaxed) as f64;
    let acked_old = legacy.stats().command_acks.load(Ordering::Relaxed) as f64;
    let (new_ok, old_ok) = (acked_new / sent_new, acked_old / sent_old);
    eprintln!(
        "command success: new path {new_ok:.5} ({acked_new}/{sent_new}), legacy {old_ok:.5} ({acked_old}/{sent_old}); ignored: new {} legacy {}",
        a.stats().ignored.load(Ordering::Relaxed),
        b.stats().ignored.load(Ordering::Relaxed)
    );
    assert!(sent_new > 500.0 && sent_old > 500.0);
    assert!(
        a.stats().ignored.load(Ordering::Relaxed) > 0,
        "the chaos did not happen"
    );
    assert!(new_ok >= 0.999, "new path {new_ok}");
    assert!(old_ok < 0.999, "the legacy path shows the loss: {old_ok}");
    // Repeats: executed once on the new path, twice on the legacy one.
    assert!(backend.stats().duplicates_sent.load(Ordering::Relaxed) > 0);
    assert_eq!(
        a.stats().commands.load(Ordering::Relaxed),
        acked_new as u64,
        "a repeated command reached a new-path device twice"
    );
    assert!(
        b.stats().commands.load(Ordering::Relaxed) > acked_old as u64,
        "legacy devices executed the repeats too"
    );
    // The transport metrics say the same.
    let t = &p.metrics.transport;
    let after_retry = t
        .ack_received
        .with_label_values(&["new", "after_retry"])
        .get();
    let first_try = t
        .ack_received
        .with_label_values(&["new", "first_try"])
        .get();
    assert_eq!(after_retry + first_try, acked_new as u64);
    assert!(after_retry > 0);
    assert!(
        t.retransmit
            .with_label_values(&["new", "ack_timeout"])
            .get()
            >= after_retry
    );
    assert_eq!(t.ack_timeout.with_label_values(&["new"]).get(), 0);
    assert_eq!(
        t.idempotent_drop.with_label_values(&["new"]).get(),
        backend.stats().duplicates_sent.load(Ordering::Relaxed)
    );
    assert!(
        t.latency
            .with_label_values(&["new", "command"])
            .get_sample_count()
            > 0
    );
    // The legacy path, observed with the same definitions, shows its loss in the same
    // families.
    let legacy_acked = t
        .ack_received
        .with_label_values(&["legacy", "first_try"])
        .get();
    assert_eq!(
        t.ack_received
            .with_label_values(&["legacy", "after_retry"])
            .get(),
        0,
        "nothing is retried on the legacy path"
    );
    assert!(
        legacy_acked >= acked_old as u64,
        "{legacy_acked} < {acked_old}"
    );
    assert!(
        t.latency
            .with_label_values(&["legacy", "command"])
            .get_sample_count()
            > 0
    );
    a.stop().await;
    b.stop().await;
    assert!(wait_until(T, || p.proxy.sessions() == 0).await);
    // The ignored commands were never acked: failures once the sessions ended.
    let legacy_failed = t.ack_timeout.with_label_values(&["legacy"]).get();
    assert!(
        legacy_failed >= b.stats().ignored.load(Ordering::Relaxed),
        "{legacy_failed} legacy failures for {} ignored commands",
        b.stats().ignored.load(Ordering::Relaxed)
    );
    assert_eq!(
        t.recv_queue.with_label_values(&["new"]).get(),
        0,
        "queue gauges return to 0"
    );
    assert_eq!(t.send_queue.with_label_values(&["new"]).get(), 0);
    legacy.stop().await;
    backend.stop().await;
}

/// With every new-path address failing, the circuit opens after `circuit_failures` and
/// new_primary devices go straight to the cloud instead of trying the dead backend each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_circuit_sends_new_connections_straight_to_the_cloud() {
    let (legacy, legacy_addr) = start_cloud(CloudSimConfig::default()).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let p = start_proxy(new_primary(legacy_addr, dead_addr)).await;
    let mut fc = fleet_config(p.addr, 10);
    fc.ramp = Duration::from_secs(2);
    let fleet = start_fleet(fc);
    assert!(wait_until(T, || fleet.stats().online.load(Ordering::Relaxed) == 10).await);
    assert_eq!(p.metrics.new_path_fallbacks.get(), 10);
    let tried = p.metrics.upstream_connect_count("connect_error");
    assert!(
        (3..=5).contains(&tried),
        "{tried} connects to the dead backend: the circuit did not open after 3"
    );
    fleet.stop().await;
    legacy.stop().await;
}

/// A backend that comes back as a listener that accepts TLS and closes at once: the proxy
/// retries with backoff (not in a loop), and the grace still ends the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_accepts_and_closes_is_retried_with_backoff_until_the_grace() {
    let (legacy, legacy_addr) = start_cloud(CloudSimConfig::default()).await;
    let (backend, new_addr) = start_cloud(CloudSimConfig::default()).await;
    let mut cfg = new_primary(legacy_addr, new_addr);
    cfg.new_path.reconnect_grace = Duration::from_secs(2);
    let p = start_proxy(cfg).await;
    let fleet = start_fleet(fleet_config(p.addr, 1));
    assert!(wait_until(T, || fleet.stats().online.load(Ordering::Relaxed) == 1).await);
    backend.stop().await;
    // The same port now accepts TLS and closes at once.
    let l = rebind(new_addr).await;
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let acc = cync_mitm::tls::DeviceAcceptor::new(&Default::default(), certs()).unwrap();
    let counter = accepted.clone();
    let flapper = tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            counter.fetch_add(1, Ordering::Relaxed);
            let a = acc.clone();
            tokio::spawn(async move {
                let _ = a.accept(tcp).await; // then dropped: closed
            });
        }
    });
    let t0 = std::time::Instant::now();
    assert!(
        wait_until(T, || p.metrics.closed_count("new_path_down") == 1).await,
        "the grace did not end the session"
    );
    let took = t0.elapsed();
    let n = accepted.load(Ordering::Relaxed);
    eprintln!("closed after {took:?}, {n} reconnects");
    assert!(took < Duration::from_secs(4), "{took:?}");
    assert!(n <= 12, "{n} reconnects in a 2 s grace: a loop");
    // The device reconnects: the circuit (or the fallback) takes it to the cloud.
    assert!(wait_until(T, || legacy.stats().handshakes.load(Ordering::Relaxed) >= 1).await);
    flapper.abort();
    fleet.stop().await;
    legacy.stop().await;
}

/// Shadow at 100 %: the cloud gets every device byte exactly and the devices receive exactly
/// what the cloud sent; the backend gets every device frame, and its own commands never reach
/// a device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mirrors_every_device_frame_and_nothing_reaches_the_device() {
    let (legacy, legacy_addr) = start_cloud(CloudSimConfig {
        record: true,
        ..CloudSimConfig::default()
    })
    .await;
    let (backend, new_addr) = start_cloud(CloudSimConfig {
        record: true,
        // A backend that pushes commands of its own.
        command_interval: Some(Duration::from_millis(50)),
        ..CloudSimConfig::default()
    })
    .await;
    let mut cfg = new_primary(legacy_addr, new_addr);
    cfg.routing.mode = cync_mitm::route::Mode::Shadow;
    let p = start_proxy(cfg).await;
    let mut fc = fleet_config(p.addr, 5);
    fc.record = true;
    fc.heartbeat = Duration::from_millis(100);
    let fleet = start_fleet(fc);
    assert!(wait_until(T, || fleet.stats().online.load(Ordering::Relaxed) == 5).await);
    assert!(
        wait_until(T, || backend.stats().handshakes.load(Ordering::Relaxed)
            == 5)
        .await
    );
    assert!(wait_until(T, || p.metrics.transport.mirrors.get() == 5).await);
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The backend tried to command the devices: kept from them.
    assert!(backend.stats().commands_sent.load(Ordering::Relaxed) > 0);
    assert_eq!(backend.stats().command_acks.load(Ordering::Relaxed), 0);
    assert_eq!(fleet.stats().commands.load(Ordering::Relaxed), 0);
    assert!(
        p.metrics
            .transport
            .shadow_suppressed
            .with_label_values(&["pipe"])
            .get()
            > 0
    );
    // Quiet (the connections stay up), then compare bytes exactly.
    fleet.set_heartbeats(false);
    let quiet = || {
        legacy.stats().frames_in.load(Ordering::Relaxed)
            + backend.stats().frames_in.load(Ordering::Relaxed)
    };
    let mut seen = quiet();
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = quiet();
        if now == seen {
            break;
        }
        seen = now;
    }
    fleet.stop().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let transcripts = fleet.stats().transcripts.lock().unwrap().clone();
    for id in fleet.ids() {
        let dev = &transcripts[&id];
        assert_eq!(dev.len(), 1, "{id}: one connection");
        let cloud = legacy.stats().transcripts_of(id);
        assert_eq!(
            dev[0].sent, cloud[0].received,
            "{id}: the cloud got every byte"
        );
        assert_eq!(
            dev[0].received, cloud[0].sent,
            "{id}: the device got the cloud's bytes only"
        );
        let mirrored = backend.stats().transcripts_of(id);
        assert_eq!(mirrored.len(), 1, "{id}");
        assert_eq!(
            mirrored[0].received, dev[0].sent,
            "{id}: the backend got every frame"
        );
    }
    assert!(wait_until(T, || p.metrics.transport.mirrors.get() == 0).await);
    legacy.stop().await;
    backend.stop().await;
}

/// Partial frames around the first flight (a frame split between the identifying read and the
/// next one, in both directions) reach the other side once and whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_split_across_the_first_reads_is_sent_once() {
    use cync_mitm::codec::{DeviceId, Frame, PacketType};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (legacy, legacy_addr) = start_cloud(CloudSimConfig::default()).await;
    let (backend, new_addr) = start_cloud(CloudSimConfig {
        record: true,
        ..CloudSimConfig::default()
    })
    .await;
    let p = start_proxy(new_primary(legacy_addr, new_addr)).await;
    let client =
        cync_mitm::tls::LegacyClient::new(cync_mitm::tls::ClientProfile::DeviceFp2).unwrap();
    let tcp = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let mut s = client.connect(tcp).await.unwrap();
    let id = DeviceId(0x0a0b_0c0d);
    let hello = Frame::handshake(id, b"0123456789abcdef", 60)
        .encode()
        .unwrap();
    let ping = Frame::ping().encode().unwrap();
    // The handshake and the first 2 bytes of a ping in one write; the rest later.
    let mut first = hello.clone();
    first.extend_from_slice(&ping[..2]);
    s.write_all(&first).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.write_all(&ping[2..]).await.unwrap();
    // The device gets its 0x28 and its 0xd8, once each.
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await
        {
            got.extend_from_slice(&buf[..n]);
        }
        if got.iter().filter(|&&b| b == PacketType::PONG.0).count() >= 1 && got.len() >= 12 {
            break;
        }
    }
    let mut framer = cync_mitm::codec::Framer::default();
    framer.push(&got);
    let mut types = Vec::new();
    while let Some(cync_mitm::codec::FramerEvent::Frame(raw)) = framer.next_event() {
        types.push(raw.ptype());
    }
    assert_eq!(
        types,
        vec![PacketType::HANDSHAKE_ACK, PacketType::PONG],
        "{got:02x?}"
    );
    drop(s);
    assert!(wait_until(T, || p.proxy.sessions() == 0).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = backend.stats().transcripts_of(id);
    let mut want = hello;
    want.extend_from_slice(&ping);
    assert_eq!(t[0].received, want, "the backend got each byte once");
    legacy.stop().await;
    backend.stop().await;
}

/// A backend that restarts every second (all its connections closed at once) under devices
/// on the new path: no device connection closes, and no command is counted acked that no
/// device executed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_restarting_every_second_closes_no_device() {
    let (legacy, legacy_addr) = start_cloud(CloudSimConfig::default()).await;
    let (backend, new_addr) = start_cloud(CloudSimConfig {
        command_interval: Some(Duration::from_millis(100)),
        restart_every: Some(Duration::from_secs(1)),
        ..CloudSimConfig::default()
    })
    .await;
    let p = start_proxy(new_primary(legacy_addr, new_addr)).await;
    let mut fc = fleet_config(p.addr, 5);
    fc.heartbeat = Duration::from_millis(200);
    let fleet = start_fleet(fc);
    assert!(wait_until(T, || fleet.stats().online.load(Ordering::Relaxed) == 5).await);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let s = backend.stats();
    let connections = s.connections.load(Ordering::Relaxed);
    assert!(
        connections >= 15,
        "{connections} connections: the backend did not restart"
    );
    assert_eq!(fleet.stats().disconnects.load(Ordering::Relaxed), 0);
    assert_eq!(
        legacy.stats().handshakes.load(Ordering::Relaxed),
        0,
        "nobody fell back"
    );
    let sent = s.commands_sent.load(Ordering::Relaxed);
    let acked = s.command_acks.load(Ordering::Relaxed);
    let executed = fleet.stats().commands.load(Ordering::Relaxed);
    eprintln!(
        "restarting backend: {acked}/{sent} commands acked, {executed} executed, {connections} connections"
    );
    assert!(acked <= executed);
    assert!(acked as f64 >= sent as f64 * 0.8, "{acked}/{sent}");
    fleet.stop().await;
    backend.stop().await;
    legacy.stop().await;
}

/// The backend simulator's answer chaos does what it says: dropped answers go missing,
/// altered ones are counted, delayed ones arrive late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_simulator_drops_alters_and_delays_answers() {
    let (cloud, addr) = start_cloud(CloudSimConfig {
        drop_answers: 0.1,
        // Sync acks and time answers come once per connection: alter every one.
        drift: 1.0,
        answer_delay: Duration::from_millis(50),
        ..CloudSimConfig::default()
    })
    .await;
    let mut fc = fleet_config(addr, 3);
    fc.heartbeat = Duration::from_millis(50);
    let fleet = start_fleet(fc);
    assert!(wait_until(T, || fleet.stats().online.load(Ordering::Relaxed) == 3).await);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = fleet.report();
    let dropped = cloud.stats().answers_dropped.load(Ordering::Relaxed);
    assert!(dropped > 0);
    assert!(
        r.requests - r.answered >= dropped / 2,
        "{r:?}, {dropped} dropped"
    );
    assert!(cloud.stats().answers_altered.load(Ordering::Relaxed) > 0);
    assert!(r.latency.p50_ms >= 45.0, "answers were not delayed: {r:?}");
    fleet.stop().await;
    cloud.stop().await;
}

/// A mirrored backend that stops reading: the primary path keeps its rate and stays
/// byte-exact (compared with a healthy mirror in the same run), and the mirror's memory is
/// its bounded queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_mirror_backend_does_not_slow_the_primary_path() {
    let mut rates = Vec::new();
    for stall in [false, true] {
        let (legacy, legacy_addr) = start_cloud(CloudSimConfig {
            record: true,
            ..CloudSimConfig::default()
        })
        .await;
        let (backend, new_addr) = start_cloud(CloudSimConfig {
            stop_reading_after: stall.then_some(Duration::from_millis(100)),
            ..CloudSimConfig::default()
        })
        .await;
        let mut cfg = new_primary(legacy_addr, new_addr);
        cfg.routing.mode = cync_mitm::route::Mode::Shadow;
        let p = start_proxy(cfg).await;
        let mut fc = fleet_config(p.addr, 5);
        fc.record = true;
        fc.heartbeat = Duration::from_millis(10);
        let fleet = start_fleet(fc);
        assert!(wait_until(T, || fleet.stats().online.load(Ordering::Relaxed) == 5).await);
        let a0 = fleet.stats().answered.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let answered = fleet.stats().answered.load(Ordering::Relaxed) - a0;
        rates.push(answered as f64);
        if stall {
            assert!(backend.stats().stalled.load(Ordering::Relaxed) >= 5);
        }
        fleet.stop().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let transcripts = fleet.stats().transcripts.lock().unwrap().clone();
        // Byte-exact up to the frames in flight when the devices stopped (pings every
        // 10 ms): one side's bytes start with the other's, a few frames apart at most.
        for id in fleet.ids() {
            let dev = &transcripts[&id];
            let cloud = legacy.stats().transcripts_of(id);
            assert!(
                prefix(&dev[0].sent, &cloud[0].received),
                "{id}: device to cloud bytes differ (stalled mirror: {stall})"
            );
            assert!(
                prefix(&dev[0].received, &cloud[0].sent),
                "{id}: cloud to device bytes differ (stalled mirror: {stall})"
            );
        }
        legacy.stop().await;
        backend.stop().await;
    }
    let ratio = rates[1] / rates[0];
    eprintln!(
        "primary answers in 2 s: healthy mirror {}, stalled mirror {} (ratio {ratio:.3})",
        rates[0], rates[1]
    );
    assert!(
        ratio >= 0.9,
        "a stalled mirror slowed the primary path: {ratio}"
    );
}

/// A backend that missed an ack sends the command again after the device acked it: the
/// device does not execute it twice, and the backend gets the device's ack again from the
/// proxy's memory of acked commands. On the legacy path the repeats are executed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_repeated_after_its_ack_is_answered_from_memory_not_executed_twice() {
    let repeats = CloudSimConfig {
        command_interval: Some(Duration::from_millis(50)),
        repeat_after_ack: 0.1,
        ..CloudSimConfig::default()
    };
    let (legacy, legacy_addr) = start_cloud(repeats.clone()).await;
    let (backend, new_addr) = start_cloud(repeats).await;
    let mut cfg = new_primary(legacy_addr, new_addr);
    let b_ids: Vec<String> = (0..5)
        .map(|i| cync_mitm::sim::device_identity(2, i).0.to_string())
        .collect();
    cfg.routing.exclude = b_ids;
    let p = start_proxy(cfg).await;
    let a = start_fleet(fleet_config(p.addr, 5));
    let mut fb = fleet_config(p.addr, 5);
    fb.seed = 2;
    let b = start_fleet(fb);
    assert!(
        wait_until(T, || a.stats().online.load(Ordering::Relaxed) == 5
            && b.stats().online.load(Ordering::Relaxed) == 5)
        .await
    );
    // The devices learn their paths from /routing, as `sim devices --admin` does.
    let (_, routing) = admin_call(&p, hyper::Method::GET, "/routing").await;
    let paths: Vec<(cync_mitm::codec::DeviceId, String)> = routing["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                cync_mitm::codec::DeviceId(
                    u32::from_str_radix(d["device_id"].as_str().unwrap(), 16).unwrap(),
                ),
                d["path"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for f in [&a, &b] {
        f.set_paths(paths.iter().map(|(d, p)| (*d, p.as_str())));
    }
    assert!(
        wait_until(T, || backend.stats().repeats_sent.load(Ordering::Relaxed)
            >= 20)
        .await
    );
    legacy.set_commands(false);
    backend.set_commands(false);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = backend.stats();
    let repeated = s.repeats_sent.load(Ordering::Relaxed);
    assert_eq!(
        s.repeat_acks.load(Ordering::Relaxed),
        repeated,
        "every repeat got the device's ack back, from the proxy"
    );
    assert_eq!(
        a.stats().commands.load(Ordering::Relaxed),
        s.command_acks.load(Ordering::Relaxed),
        "new-path devices executed each command once"
    );
    assert_eq!(
        p.metrics
            .transport
            .idempotent_drop
            .with_label_values(&["new"])
            .get(),
        repeated
    );
    // Legacy devices executed the repeats as well.
    let l = legacy.stats();
    assert!(l.repeats_sent.load(Ordering::Relaxed) > 0);
    assert_eq!(
        b.stats().commands.load(Ordering::Relaxed),
        l.command_acks.load(Ordering::Relaxed) + l.repeats_sent.load(Ordering::Relaxed)
    );
    // The devices saw it too: repeats reached the legacy ones only.
    let (ra, rb) = (a.report(), b.report());
    assert_eq!(ra.repeats, 0, "{ra:?}");
    assert_eq!(rb.repeats, l.repeats_sent.load(Ordering::Relaxed), "{rb:?}");
    assert_eq!(ra.by_path["new"].devices, 5, "{ra:?}");
    assert_eq!(ra.by_path["new"].repeats, 0);
    assert!(ra.by_path["new"].commands > 0);
    assert_eq!(rb.by_path["legacy"].devices, 5, "{rb:?}");
    assert!(
        !rb.by_path.contains_key("new"),
        "only the fleet's own devices: {rb:?}"
    );
    assert!(rb.by_path["legacy"].repeats > 0);
    assert!(rb.by_path["legacy"].request_success.unwrap() > 0.9);
    a.stop().await;
    b.stop().await;
    legacy.stop().await;
    backend.stop().await;
}
