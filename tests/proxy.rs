//! The proxy end to end over loopback: simulated devices → proxy → simulated cloud, real TLS.

mod common;

use common::harness::*;
use cync_mitm::codec::{DeviceId, Frame, Framer, FramerEvent, PacketType};
use cync_mitm::metrics::{DecodeProblem, Flow};
use cync_mitm::sim::cloud::CloudSimConfig;
use cync_mitm::tls::{ClientProfile, LegacyClient};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(15);

type Tls = tokio_openssl::SslStream<TcpStream>;

async fn tls_client(addr: std::net::SocketAddr, profile: ClientProfile) -> Tls {
    let tcp = TcpStream::connect(addr).await.unwrap();
    LegacyClient::new(profile)
        .unwrap()
        .connect(tcp)
        .await
        .unwrap()
}

/// Reads frames until one of type `t` arrives (or the stream ends / times out).
async fn read_until(s: &mut Tls, t: PacketType) -> Option<Frame> {
    let mut framer = Framer::default();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let n = tokio::time::timeout_at(deadline, s.read(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        framer.push(&buf[..n]);
        while let Some(ev) = framer.next_event() {
            if let FramerEvent::Frame(raw) = ev
                && raw.ptype() == t
            {
                return raw.decode().ok();
            }
        }
    }
}

/// Whether the peer closed the stream within `limit`.
async fn closed_within(s: &mut Tls, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

fn handshake(id: u32) -> Vec<u8> {
    Frame::handshake(DeviceId(id), b"0123456789abcdef", 60)
        .encode()
        .unwrap()
}

/// Connects a device `id` with auth `code` and reads until its 0x28: whether it came.
async fn device_with(addr: std::net::SocketAddr, id: DeviceId, code: &[u8]) -> (Tls, bool) {
    let mut s = tls_client(addr, ClientProfile::DeviceFp2).await;
    s.write_all(&Frame::handshake(id, code, 60).encode().unwrap())
        .await
        .unwrap();
    let answered = read_until(&mut s, PacketType::HANDSHAKE_ACK)
        .await
        .is_some();
    (s, answered)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transcripts_are_byte_exact_on_both_sides() {
    let (cloud, cloud_addr) = start_cloud(CloudSimConfig {
        command_interval: Some(Duration::from_millis(50)),
        record: true,
        ..CloudSimConfig::default()
    })
    .await;
    let p = start_proxy(proxy_config(cloud_addr)).await;
    let mut fc = fleet_config(p.addr, 5);
    fc.record = true;
    fc.heartbeat = Duration::from_millis(100);
    let fleet = start_fleet(fc);
    assert!(
        wait_until(T, || fleet.stats().commands.load(Ordering::Relaxed) >= 40).await,
        "{:?}",
        fleet.report()
    );
    // Reach a quiet moment: no commands, no heartbeats in flight, then stop the devices cleanly.
    cloud.set_commands(false);
    tokio::time::sleep(Duration::from_millis(300)).await;
    fleet.stop().await;
    assert!(wait_until(T, || p.proxy.registry().is_empty()).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut compared = 0;
    for id in fleet.ids() {
        let dev = fleet
            .stats()
            .transcripts
            .lock()
            .unwrap()
            .get(&id)
            .cloned()
            .unwrap_or_default();
        let cl = cloud.stats().transcripts_of(id);
        assert_eq!(dev.len(), 1, "device {id} reconnected");
        assert_eq!(cl.len(), 1, "cloud saw {} connections of {id}", cl.len());
        assert!(dev[0].sent.len() > 200);
        assert_eq!(
            dev[0].sent, cl[0].received,
            "device→cloud bytes of {id} differ"
        );
        // The last heartbeat may be answered after the device stopped reading: compare what the
        // device received with the same-length prefix of what the cloud sent, and bound the rest.
        let got = &dev[0].received;
        assert!(got.len() <= cl[0].sent.len());
        assert_eq!(
            got[..],
            cl[0].sent[..got.len()],
            "cloud→device bytes of {id} differ"
        );
        assert!(
            cl[0].sent.len() - got.len() <= 5,
            "more than one pong lost for {id}"
        );
        compared += 1;
    }
    assert_eq!(compared, 5);
    let m = &p.metrics;
    assert!(m.frames(Flow::CloudToDevice, PacketType::PIPE) >= 40);
    assert!(m.frames(Flow::DeviceToCloud, PacketType::PIPE_ACK) >= 40);
    assert_eq!(
        m.decode_errors(Flow::DeviceToCloud, DecodeProblem::Frame),
        0
    );
    assert_eq!(
        m.decode_errors(Flow::CloudToDevice, DecodeProblem::Checksum),
        0
    );
    let r = fleet.report();
    assert_eq!(r.requests, r.answered, "{r:?}");
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_unknown_types_and_garbage_are_forwarded_and_counted() {
    let (cloud, cloud_addr) = start_cloud(CloudSimConfig {
        record: true,
        ..Default::default()
    })
    .await;
    let p = start_proxy(proxy_config(cloud_addr)).await;
    let mut s = tls_client(p.addr, ClientProfile::DeviceFp2).await;
    let mut sent = handshake(0x0bad_f00d);
    s.write_all(&sent).await.unwrap();
    assert!(
        read_until(&mut s, PacketType::HANDSHAKE_ACK)
            .await
            .is_some()
    );
    let h = cync_mitm::hexutil::parse_hex;
    let mut junk = Vec::new();
    junk.extend(h("33 00 00 00 02 aa bb").unwrap()); // unknown type
    junk.extend(h("73 00 00 00 1f 45 88 0f 3a 00 10 00 00 7e 10 01 00 00 f8 8e 0c 00 10 01 00 00 00 50 00 f7 11 02 01 01 07 7e").unwrap()); // N1
    junk.extend(
        h("73 00 00 00 13 2d e4 b5 d2 00 02 00 7e 21 00 00 00 f9 d0 01 00 00 55 7e").unwrap(),
    ); // bad checksum
    junk.extend(h("48 00 00 00 02 01 01").unwrap()); // wrong fixed size
    junk.extend(h("73 7f ff ff ff").unwrap()); // absurd length
    junk.extend((0..200u32).map(|i| (i * 37 % 251) as u8)); // garbage
    junk.extend(h("d3 00 00 00 00").unwrap());
    // Send in odd-sized pieces.
    for piece in junk.chunks(7) {
        s.write_all(piece).await.unwrap();
    }
    sent.extend(&junk);
    let id = DeviceId(0x0bad_f00d);
    assert!(
        wait_until(T, || cloud
            .stats()
            .transcripts_of(id)
            .first()
            .is_some_and(|t| t.received.len() >= sent.len()))
        .await,
        "cloud did not receive everything"
    );
    assert_eq!(cloud.stats().transcripts_of(id)[0].received, sent);
    let m = &p.metrics;
    let f = Flow::DeviceToCloud;
    assert!(m.decode_errors(f, DecodeProblem::UnknownType) >= 1);
    assert_eq!(m.decode_errors(f, DecodeProblem::Inner), 1);
    assert_eq!(m.decode_errors(f, DecodeProblem::Checksum), 1);
    assert_eq!(m.decode_errors(f, DecodeProblem::Frame), 1);
    assert!(m.decode_errors(f, DecodeProblem::TooLarge) >= 1);
    // The connection is still up and relaying.
    let ping = Frame::ping().encode().unwrap();
    s.write_all(&ping).await.unwrap();
    assert!(read_until(&mut s, PacketType::PONG).await.is_some());
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phone_app_login_passes_through() {
    let (cloud, cloud_addr) = start_cloud(CloudSimConfig::default()).await;
    let p = start_proxy(proxy_config(cloud_addr)).await;
    let mut s = tls_client(p.addr, ClientProfile::Modern).await;
    s.write_all(
        &Frame::login(123456, b"123456789abcdef", 30)
            .encode()
            .unwrap(),
    )
    .await
    .unwrap();
    let reply = read_until(&mut s, PacketType::LOGIN_RESULT)
        .await
        .expect("0x18");
    assert_eq!(reply.encode().unwrap(), vec![0x18, 0, 0, 0, 2, 0, 0]);
    assert_eq!(cloud.stats().logins.load(Ordering::Relaxed), 1);
    assert_eq!(p.metrics.active("app").get(), 1);
    assert!(p.proxy.registry().is_empty(), "apps are not devices");
    drop(s);
    assert!(wait_until(T, || p.metrics.active("app").get() == 0).await);
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_down_closes_devices_after_the_delay_and_recovers() {
    // A port with nothing behind it.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cloud_addr = l.local_addr().unwrap();
    drop(l);
    let p = start_proxy(proxy_config(cloud_addr)).await;

    // A device is held for the delay, then closed.
    let mut s = tls_client(p.addr, ClientProfile::DeviceFp2).await;
    s.write_all(&handshake(7)).await.unwrap();
    let t0 = std::time::Instant::now();
    assert!(closed_within(&mut s, Duration::from_secs(5)).await);
    assert!(
        t0.elapsed() >= Duration::from_millis(250),
        "closed after {:?}",
        t0.elapsed()
    );
    assert_eq!(p.metrics.closed_count("cloud_down"), 1);

    let fleet = start_fleet(fleet_config(p.addr, 3));
    assert!(wait_until(T, || p.metrics.closed_count("cloud_down") >= 4).await);
    assert_eq!(fleet.stats().online.load(Ordering::Relaxed), 0);

    // The cloud comes back on the same address: devices reconnect and work.
    let listener = tokio::net::TcpListener::bind(cloud_addr).await.unwrap();
    let cloud = start_cloud_on(listener, CloudSimConfig::default(), CloudTls::Legacy).await;
    assert!(
        wait_until(T, || fleet.stats().online.load(Ordering::Relaxed) == 3).await,
        "{:?}",
        fleet.report()
    );
    // Requests sent while the cloud was down stay unanswered; each device's full connect
    // sequence (0x23, 0x43, two 0x83 firmware, 0xc3, telemetry 0x43, status 0x83) is answered now.
    assert!(
        wait_until(T, || fleet.report().answered >= 3 * 7).await,
        "{:?}",
        fleet.report()
    );
    assert_eq!(cloud.stats().handshakes.load(Ordering::Relaxed), 3);
    fleet.stop().await;
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_offering_only_aes256_sha256_without_sni_connects() {
    let (cloud, cloud_addr) = start_cloud(CloudSimConfig::default()).await;
    let p = start_proxy(proxy_config(cloud_addr)).await;
    for (profile, want) in [
        (ClientProfile::Aes256Sha256Only, "AES256-SHA256"),
        (ClientProfile::DeviceFp2, "AES256-SHA256"),
    ] {
        let mut s = tls_client(p.addr, profile).await;
        let c = s.ssl().current_cipher().unwrap().name().to_owned();
        assert_eq!(c, want);
        assert_eq!(s.ssl().version_str(), "TLSv1.2");
        s.write_all(&handshake(0x1234)).await.unwrap();
        assert!(
            read_until(&mut s, PacketType::HANDSHAKE_ACK)
                .await
                .is_some()
        );
    }
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_garbage_handshakes_time_out_without_hurting_others() {
    let (cloud, cloud_addr) = start_cloud(CloudSimConfig::default()).await;
    let mut cfg = proxy_config(cloud_addr);
    cfg.timeouts.handshake = Duration::from_millis(400);
    let p = start_proxy(cfg).await;
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(TcpStream::connect(p.addr).await.unwrap());
    }
    let mut garbage = Vec::new();
    for i in 0..5u8 {
        let mut g = TcpStream::connect(p.addr).await.unwrap();
        g.write_all(&[0x16, 0x03, 0x01, 0x00, 0x10 + i, 0xde, 0xad])
            .await
            .unwrap();
        garbage.push(g);
    }
    let fleet = start_fleet(fleet_config(p.addr, 3));
    assert!(wait_until(T, || fleet.stats().online.load(Ordering::Relaxed) == 3).await);
    assert!(
        wait_until(T, || p
            .metrics
            .handshake_failures
            .with_label_values(&["timeout"])
            .get()
            >= 20)
        .await
    );
    // Every silent connection was closed by the proxy.
    for mut s in silent {
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await;
        assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "still open");
    }
    let failures = || -> u64 {
        p.metrics
            .render()
            .lines()
            .filter(|l| l.starts_with("cync_mitm_handshake_failures_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    assert!(
        wait_until(T, || failures() >= 25).await,
        "handshake failures {}",
        failures()
    );
    let r = fleet.report();
    assert_eq!(r.requests, r.answered);
    fleet.stop().await;
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_devices_at_once() {
    let (cloud, cloud_addr) = start_cloud(CloudSimConfig::default()).await;
    let p = start_proxy(proxy_config(cloud_addr)).await;
    let fleet = start_fleet(fleet_config(p.addr, 200));
    assert!(
        wait_until(Duration::from_secs(60), || fleet
            .stats()
            .online
            .load(Ordering::Relaxed)
            == 200)
        .await,
        "{:?}",
        fleet.report()
    );
    assert!(
        wait_until(T, || {
            let r = fleet.report();
            r.requests > 0 && r.answered == r.requests
        })
        .await,
        "{:?}",
        fleet.report()
    );
    assert_eq!(p.proxy.registry().len(), 200);
    assert_eq!(fleet.report().connect_failures, 0);
    assert_eq!(p.metrics.active("device").get(), 200);
    fleet.stop().await;
    assert!(wait_until(T, || p.metrics.active("device").get() == 0).await);
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_connecting_again_replaces_its_old_connection() {
    let (cloud, cloud_addr) = start_cloud(CloudSimConfig::default()).await;
    let p = start_proxy(proxy_config(cloud_addr)).await;
    let mut a = tls_client(p.addr, ClientProfile::DeviceFp2).await;
    a.write_all(&handshake(99)).await.unwrap();
    assert!(
        read_until(&mut a, PacketType::HANDSHAKE_ACK)
            .await
            .is_some()
    );
    let mut b = tls_client(p.addr, ClientProfile::DeviceFp2).await;
    b.write_all(&handshake(99)).await.unwrap();
    assert!(
        read_until(&mut b, PacketType::HANDSHAKE_ACK)
            .await
            .is_some()
    );
    assert!(
        closed_within(&mut a, Duration::from_secs(3)).await,
        "old connection still open"
    );
    assert_eq!(p.metrics.closed_count("replaced"), 1);
    assert!(wait_until(T, || p.metrics.closed_count("replaced") == 1).await);
    b.write_all(&Frame::ping().encode().unwrap()).await.unwrap();
    assert!(read_until(&mut b, PacketType::PONG).await.is_some());
    assert_eq!(p.proxy.registry().len(), 1);
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_the_limit_is_enforced() {
    let (cloud, cloud_addr) = start_cloud(CloudSimConfig::default()).await;
    let mut cfg = proxy_config(cloud_addr);
    cfg.timeouts.idle = Duration::from_millis(400);
    cfg.limits.max_connections = 2;
    let p = start_proxy(cfg).await;
    let mut a = tls_client(p.addr, ClientProfile::DeviceFp2).await;
    a.write_all(&handshake(1)).await.unwrap();
    assert!(
        read_until(&mut a, PacketType::HANDSHAKE_ACK)
            .await
            .is_some()
    );
    let mut b = tls_client(p.addr, ClientProfile::DeviceFp2).await;
    b.write_all(&handshake(2)).await.unwrap();
    assert!(
        read_until(&mut b, PacketType::HANDSHAKE_ACK)
            .await
            .is_some()
    );
    // A third connection is over the limit: closed at once.
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    let mut x = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(2), c.read(&mut x)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))));
    assert_eq!(p.metrics.rejected.with_label_values(&["limit"]).get(), 1);
    // Both go idle and are closed.
    assert!(closed_within(&mut a, Duration::from_secs(3)).await);
    assert!(closed_within(&mut b, Duration::from_secs(3)).await);
    assert!(wait_until(T, || p.metrics.closed_count("idle") == 2).await);
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modern_upstream_and_certificate_pinning() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cloud_addr = l.local_addr().unwrap();
    let cloud = start_cloud_on(l, CloudSimConfig::default(), CloudTls::Modern).await;
    let leaf =
        openssl::x509::X509::stack_from_pem(&std::fs::read(&certs().rsa_cert).unwrap()).unwrap();
    let good = cync_mitm::tls::cert_sha256_hex(&leaf[0].to_der().unwrap());

    let mut cfg = proxy_config(cloud_addr);
    cfg.upstream.pin_sha256 = vec!["00".repeat(32)];
    let bad = start_proxy(cfg.clone()).await;
    let mut s = tls_client(bad.addr, ClientProfile::DeviceFp2).await;
    s.write_all(&handshake(5)).await.unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(5)).await);
    assert_eq!(bad.metrics.upstream_connect_count("pin_mismatch"), 1);

    cfg.upstream.pin_sha256 = vec![good];
    let ok = start_proxy(cfg).await;
    let mut s = tls_client(ok.addr, ClientProfile::DeviceFp2).await;
    s.write_all(&handshake(5)).await.unwrap();
    assert!(
        read_until(&mut s, PacketType::HANDSHAKE_ACK)
            .await
            .is_some()
    );
    assert_eq!(ok.metrics.upstream_connect_count("ok"), 1);
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_still_delivers_the_answers_in_flight() {
    let (cloud, cloud_addr) = start_cloud(CloudSimConfig::default()).await;
    let p = start_proxy(proxy_config(cloud_addr)).await;
    let mut s = tls_client(p.addr, ClientProfile::DeviceFp2).await;
    let mut out = handshake(0x4a1f);
    for _ in 0..3 {
        out.extend(Frame::ping().encode().unwrap());
    }
    s.write_all(&out).await.unwrap();
    s.shutdown().await.unwrap(); // close_notify + FIN: we send nothing more, but keep reading.
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("no EOF after half-close"),
        }
    }
    let mut framer = Framer::default();
    let types: Vec<PacketType> = framer
        .feed(&got)
        .into_iter()
        .filter_map(|e| match e {
            FramerEvent::Frame(r) => Some(r.ptype()),
            FramerEvent::Error(_) => None,
        })
        .collect();
    assert_eq!(
        types,
        vec![
            PacketType::HANDSHAKE_ACK,
            PacketType::PONG,
            PacketType::PONG,
            PacketType::PONG
        ]
    );
    assert!(wait_until(T, || p.metrics.closed_count("device_closed") == 1).await);
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_listener_and_plaintext_upstream() {
    use cync_mitm::proxy::ListenerKind;
    use cync_mitm::sim::cloud::{CloudSim, ServerTls};
    use cync_mitm::sim::devices::{ClientTls, Fleet};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cloud_addr = l.local_addr().unwrap();
    let cloud = CloudSim::new(
        CloudSimConfig {
            command_interval: Some(Duration::from_millis(50)),
            ..Default::default()
        },
        ServerTls::Plain,
    );
    let c = cloud.clone();
    tokio::spawn(async move { c.run(l).await });
    let mut cfg = proxy_config(cloud_addr);
    cfg.upstream.tls = false;
    let metrics = std::sync::Arc::new(cync_mitm::metrics::Metrics::new(false));
    let live = cync_mitm::reload::LiveConfig::fixed(cfg, metrics.clone()).unwrap();
    let proxy = cync_mitm::proxy::Proxy::new(live, certs(), metrics.clone(), Vec::new()).unwrap();
    let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = plain.local_addr().unwrap();
    let pr = proxy.clone();
    tokio::spawn(async move { pr.serve(plain, ListenerKind::Plain).await });
    let fleet = Fleet::start(fleet_config(addr, 3), ClientTls::Plain);
    assert!(
        wait_until(T, || fleet.stats().commands.load(Ordering::Relaxed) >= 6).await,
        "{:?}",
        fleet.report()
    );
    assert_eq!(metrics.accepted.with_label_values(&["plain"]).get(), 3);
    assert!(metrics.frames(Flow::CloudToDevice, PacketType::PIPE) >= 6);
    fleet.stop().await;
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_verification_with_a_ca_file_and_sni() {
    let (cloud, cloud_addr) = start_cloud(CloudSimConfig::default()).await;
    let mut cfg = proxy_config(cloud_addr);
    cfg.upstream.verify = true;
    cfg.upstream.ca_file = Some(certs().ca_cert.clone());
    cfg.upstream.sni = Some("cm.gelighting.com".into());
    let ok = start_proxy(cfg.clone()).await;
    let mut s = tls_client(ok.addr, ClientProfile::DeviceFp2).await;
    s.write_all(&handshake(11)).await.unwrap();
    assert!(
        read_until(&mut s, PacketType::HANDSHAKE_ACK)
            .await
            .is_some()
    );

    cfg.upstream.sni = Some("not-the-cloud.example".into());
    let bad = start_proxy(cfg).await;
    let mut s = tls_client(bad.addr, ClientProfile::DeviceFp2).await;
    s.write_all(&handshake(12)).await.unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(5)).await);
    assert_eq!(bad.metrics.upstream_connect_count("tls_error"), 1);
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fingerprint_1_clients_get_ecdhe_ecdsa_with_the_p256_leaf() {
    use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode, SslVersion};
    let (cloud, cloud_addr) = start_cloud(CloudSimConfig::default()).await;
    let p = start_proxy(proxy_config(cloud_addr)).await;
    // Fingerprint 1: TLS 1.2, ECDHE-ECDSA CBC/CCM suites first, secp256r1 only, no SNI.
    let mut b = SslConnector::builder(SslMethod::tls_client()).unwrap();
    b.set_verify(SslVerifyMode::NONE);
    b.set_security_level(0);
    b.set_max_proto_version(Some(SslVersion::TLS1_2)).unwrap();
    b.set_cipher_list("ECDHE-ECDSA-AES256-CCM:ECDHE-ECDSA-AES256-SHA384:ECDHE-ECDSA-AES256-SHA:AES256-CCM:AES256-SHA256").unwrap();
    b.set_groups_list("P-256").unwrap();
    let c = b.build();
    let ssl = c
        .configure()
        .unwrap()
        .use_server_name_indication(false)
        .verify_hostname(false)
        .into_ssl("x")
        .unwrap();
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    let mut s = tokio_openssl::SslStream::new(ssl, tcp).unwrap();
    std::pin::Pin::new(&mut s).connect().await.unwrap();
    let cipher = s.ssl().current_cipher().unwrap().name().to_owned();
    assert!(cipher.starts_with("ECDHE-ECDSA-"), "{cipher}");
    let key = s.ssl().peer_certificate().unwrap().public_key().unwrap();
    assert!(key.ec_key().is_ok(), "the ECDSA leaf was served");
    s.write_all(&handshake(0xf1)).await.unwrap();
    assert!(
        read_until(&mut s, PacketType::HANDSHAKE_ACK)
            .await
            .is_some()
    );
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_auth_impostor_cannot_take_over_a_device_and_a_right_auth_reconnect_can() {
    let id = DeviceId(0x0102_0304);
    let code = b"0123456789abcdef".to_vec();
    let (cloud, cloud_addr) = start_cloud(CloudSimConfig {
        auth_codes: Some(std::sync::Arc::new(
            [(id, code.clone())].into_iter().collect(),
        )),
        ..Default::default()
    })
    .await;
    let mut cfg = proxy_config(cloud_addr);
    cfg.upstream.cloud_down_close_delay = Duration::from_millis(200);
    let p = start_proxy(cfg).await;
    let (mut real, answered) = device_with(p.addr, id, &code).await;
    assert!(answered);
    let live = p.proxy.registry().get(id).unwrap().conn;

    // The impostor: same id, wrong code. The cloud refuses it; the real device stays.
    let (mut imp, answered) = device_with(p.addr, id, b"ffffffffffffffff").await;
    assert!(!answered);
    assert!(closed_within(&mut imp, Duration::from_secs(3)).await);
    assert_eq!(cloud.stats().rejected.load(Ordering::Relaxed), 1);
    assert_eq!(p.proxy.registry().get(id).unwrap().conn, live);
    assert_eq!(p.metrics.closed_count("replaced"), 0);
    real.write_all(&Frame::ping().encode().unwrap())
        .await
        .unwrap();
    assert!(
        read_until(&mut real, PacketType::PONG).await.is_some(),
        "the real device lost its session"
    );

    // The real device reconnecting (right code) replaces its old connection at once.
    let (_again, answered) = device_with(p.addr, id, &code).await;
    assert!(answered);
    assert!(closed_within(&mut real, Duration::from_secs(3)).await);
    assert!(wait_until(T, || p.metrics.closed_count("replaced") == 1).await);
    assert_ne!(p.proxy.registry().get(id).unwrap().conn, live);
    // The impostor's refusal was not charged to the upstream.
    let h = p.proxy.health().report();
    assert!(
        h.iter()
            .all(|r| r.consecutive_failures == 0 && r.up && r.last_error.is_none()),
        "{h:?}"
    );
    assert_eq!(p.metrics.closed_count("handshake_rejected"), 1);
    cloud.stop().await;
}

/// A new connection with a different auth code that the upstream accepts (0x28: the device
/// got a new code) replaces the live one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_code_the_upstream_accepts_replaces_the_live_connection() {
    let id = DeviceId(0x0102_0305);
    // A cloud that accepts every code.
    let (cloud, cloud_addr) = start_cloud(CloudSimConfig::default()).await;
    let p = start_proxy(proxy_config(cloud_addr)).await;
    let (mut old, answered) = device_with(p.addr, id, b"0123456789abcdef").await;
    assert!(answered);
    let live = p.proxy.registry().get(id).unwrap().conn;
    let (mut new, answered) = device_with(p.addr, id, b"fedcba9876543210").await;
    assert!(answered);
    assert!(closed_within(&mut old, Duration::from_secs(3)).await);
    assert!(wait_until(T, || p.metrics.closed_count("replaced") == 1).await);
    assert_ne!(p.proxy.registry().get(id).unwrap().conn, live);
    assert_eq!(p.metrics.closed_count("handshake_rejected"), 0);
    // The new connection works.
    new.write_all(&Frame::ping().encode().unwrap())
        .await
        .unwrap();
    assert!(read_until(&mut new, PacketType::PONG).await.is_some());
    cloud.stop().await;
}

/// A LAN client sending handshakes the cloud refuses (a made-up device, a wrong code) cannot
/// make the proxy unready: the upstream answers everyone else, so the refusal is the client's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_handshakes_do_not_mark_a_working_upstream_down() {
    let id = DeviceId(0x0102_0306);
    let (cloud, cloud_addr) = start_cloud(CloudSimConfig {
        auth_codes: Some(std::sync::Arc::new(
            [(id, b"0123456789abcdef".to_vec())].into_iter().collect(),
        )),
        ..Default::default()
    })
    .await;
    let mut cfg = proxy_config(cloud_addr);
    cfg.upstream.cloud_down_close_delay = Duration::from_millis(100);
    let p = start_proxy(cfg).await;
    let (mut real, answered) = device_with(p.addr, id, b"0123456789abcdef").await;
    assert!(answered);
    assert!(p.proxy.upstream_ready());
    for n in 0..5u32 {
        let (mut bogus, answered) =
            device_with(p.addr, DeviceId(0x0bad_0000 + n), b"ffffffffffffffff").await;
        assert!(!answered);
        assert!(closed_within(&mut bogus, Duration::from_secs(3)).await);
    }
    assert!(wait_until(T, || p.metrics.closed_count("handshake_rejected") == 5).await);
    assert!(p.proxy.upstream_ready(), "{:?}", p.proxy.health().report());
    let h = p.proxy.health().report();
    assert!(
        h.iter().all(|r| r.up && r.consecutive_failures == 0),
        "{h:?}"
    );
    assert_eq!(p.metrics.closed_count("cloud_down"), 0);
    // The real device never noticed.
    real.write_all(&Frame::ping().encode().unwrap())
        .await
        .unwrap();
    assert!(read_until(&mut real, PacketType::PONG).await.is_some());
    cloud.stop().await;
}

/// A plaintext server behind `upstream.tls = true`: the health record says it does not speak
/// TLS, once, without repeating the address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_upstream_is_named_as_such() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut b = [0u8; 512];
                let _ = s.read(&mut b).await;
                let _ = s
                    .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                    .await;
            });
        }
    });
    let mut cfg = proxy_config(addr);
    cfg.upstream.cloud_down_close_delay = Duration::from_millis(100);
    let p = start_proxy(cfg).await;
    let mut s = tls_client(p.addr, ClientProfile::DeviceFp2).await;
    s.write_all(&handshake(9)).await.unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(5)).await);
    let r = p.proxy.health().report();
    let e = r[0].last_error.clone().unwrap_or_default();
    assert!(e.contains("does not speak TLS"), "{e}");
    assert!(
        !e.contains(&addr.to_string()),
        "the address is the key, not the text: {e}"
    );
    assert_eq!(p.metrics.closed_count("cloud_down"), 1);
}

/// Transparent mode, a client that connects to the listener directly (no REDIRECT, so no
/// original destination): counted as `no_original_dst`, held, closed as `cloud_down`, and its
/// registry entry is gone (no task panics on the way).
#[tokio::test]
async fn transparent_mode_without_an_original_destination_is_counted_and_closed() {
    let (cloud, addr) = start_cloud(CloudSimConfig::default()).await;
    let mut cfg = proxy_config(addr);
    cfg.upstream.mode = cync_mitm::config::UpstreamMode::Transparent;
    let p = start_proxy(cfg).await;
    let mut s = tls_client(p.addr, ClientProfile::DeviceFp2).await;
    s.write_all(&handshake(77)).await.unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(5)).await);
    assert!(wait_until(T, || p.metrics.closed_count("cloud_down") == 1).await);
    assert_eq!(p.metrics.upstream_connect_count("no_original_dst"), 1);
    assert!(wait_until(T, || p.proxy.registry().is_empty()).await);
    assert_eq!(cloud.stats().connections.load(Ordering::Relaxed), 0);
    cloud.stop().await;
}
