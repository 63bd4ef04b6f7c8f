//! One device (or app) connection, step by step: [`Session::handshake`] (the device's TLS),
//! [`Session::identify`] (its first frame), [`Session::route`] (the routing decision and the
//! device registry), [`Session::connect`] (the upstream of its path, with the `new_primary`
//! fallback), and [`Session::relay`] (the legacy byte relay, or the new path's
//! ReliableTransport, with taps, observer and mirror). [`Session::run`] chains them and
//! counts how the session ended, by transport.

use super::*;

/// One accepted connection.
pub(super) struct Session<'p> {
    pub(super) proxy: &'p Proxy,
    /// The same proxy, for tasks of the session's own (its mirror).
    pub(super) arc: Arc<Proxy>,
    pub(super) conn: Uuid,
    pub(super) peer: SocketAddr,
    pub(super) kind: ListenerKind,
}

/// How a session ended (label of `cync_mitm_connections_closed_total`).
#[derive(Debug)]
pub(super) enum Close {
    /// The legacy byte relay ended.
    Relay(relay::CloseReason),
    /// The new path's transport ended.
    Transport(crate::transport::driver::End),
    /// Closed from outside before relaying (shutdown, a newer connection, a drain).
    External(Cause),
    /// No upstream of this path could be reached, or none answered as Cync.
    Down(Path),
    /// The upstream refused this handshake while it answers others.
    HandshakeRejected,
    /// The proxy was out of descriptors or memory.
    LocalError,
}

impl Close {
    /// The metric label.
    pub(super) fn label(&self) -> &'static str {
        match self {
            Close::Relay(r) => r.label(),
            Close::Transport(e) => e.label(),
            Close::External(c) => c.label(),
            Close::Down(Path::Legacy) => "cloud_down",
            Close::Down(Path::New) => "new_path_down",
            Close::HandshakeRejected => "handshake_rejected",
            Close::LocalError => "local_error",
        }
    }
}

/// A connection whose peer is known and routed.
pub(super) struct Routed {
    loaded: Arc<Loaded>,
    decision: Decision,
    meta: Arc<ConnMeta>,
    control: Arc<SessionControl>,
    /// A second connection of a live device with another auth code: registered only once
    /// its upstream accepts the handshake.
    deferred: Option<(crate::codec::DeviceId, LiveSession)>,
    orig_dst: Option<SocketAddr>,
}

/// A routed connection whose upstream answered.
pub(super) struct Connected {
    /// The path it is relayed on (the decision's, or legacy after a fallback).
    path: Path,
    up: upstream::Upstream,
    /// The upstream's first answer, read while checking it speaks Cync.
    answer: Vec<u8>,
}

impl Session<'_> {
    /// The whole session, start to end.
    pub(super) async fn run(self, tcp: TcpStream) {
        let p = self.proxy;
        let loaded = p.live.current();
        let cfg = &loaded.config;
        let started = Instant::now();
        let _ = tcp.set_nodelay(true);
        let local = tcp.local_addr().unwrap_or(self.peer);
        let orig_dst = match cfg.upstream.mode {
            crate::config::UpstreamMode::Transparent => upstream::original_dst(&tcp),
            crate::config::UpstreamMode::Fixed => None,
        };
        let pending = p.metrics.active("pending");
        pending.inc();
        let pending_guard = GaugeGuard(pending);
        // 1. Device TLS.
        let Some(mut device) = self.handshake(tcp, &loaded).await else {
            return;
        };
        // 2. The first frame says who this is.
        let Some((initial, first)) = self.identify(&mut device, &loaded).await else {
            return;
        };
        let peer_kind = PeerKind::from_first_frame(first.as_ref());
        if let Some(id) = peer_kind.id_label() {
            tracing::Span::current().record("device", tracing::field::display(&id));
        }
        drop(pending_guard);
        let active = p.metrics.active(peer_kind.label());
        active.inc();
        let _active_guard = GaugeGuard(active);
        // 3. The routing decision, from the config in force now that the device is known.
        let meta = Arc::new(ConnMeta {
            id: self.conn,
            device_addr: self.peer,
            proxy_device_addr: local,
            peer: peer_kind,
            started: SystemTime::now(),
            upstream: OnceLock::new(),
            live: Default::default(),
        });
        let mut routed = self.route(first.as_ref(), meta.clone(), orig_dst);
        // 4. Upstream, 5. relay.
        let (path, close) = match self.connect(&mut routed, &mut device, &initial).await {
            Ok(c) => {
                let path = c.path;
                let gauge = p.metrics.sessions_active.with_label_values(&[path.label()]);
                gauge.inc();
                let _g = GaugeGuard(gauge);
                (path, self.relay(&routed, device, &initial, c).await)
            }
            Err((path, close)) => (path, close),
        };
        let reason = close.label();
        if let PeerKind::Device(id) = peer_kind {
            p.registry.unregister(id, self.conn);
        }
        if let Some(label) = peer_kind.id_label() {
            p.metrics.device_gone(&label);
        }
        let secs = started.elapsed().as_secs_f64();
        p.metrics.session_seconds.observe(secs);
        p.metrics.close(path, reason);
        for s in p.sinks.iter() {
            s.on_close(&meta, reason);
        }
        tracing::info!(
            reason,
            transport = path.label(),
            duration_s = format_args!("{secs:.1}"),
            "connection closed"
        );
    }

    /// The device's TLS handshake (plain listener: none). `None`: it failed (counted).
    async fn handshake(&self, tcp: TcpStream, loaded: &Loaded) -> Option<Box<dyn Io>> {
        let p = self.proxy;
        let cfg = &loaded.config;
        match self.kind {
            ListenerKind::Plain => Some(Box::new(tcp)),
            ListenerKind::Tls => {
                let acceptor = loaded.acceptor.as_ref().unwrap_or(&p.acceptor);
                let hs = tokio::time::timeout(cfg.timeouts.handshake, acceptor.accept(tcp));
                let r = tokio::select! {
                    _ = p.shutdown.cancelled() => return None,
                    r = hs => r,
                };
                match r {
                    Ok(Ok(s)) => Some(Box::new(s)),
                    Ok(Err(e)) => {
                        let reason = match &e {
                            TlsError::Handshake(r) => r.clone(),
                            other => other.to_string(),
                        };
                        p.metrics
                            .handshake_failures
                            .with_label_values(&[&handshake_label(&reason)])
                            .inc();
                        tracing::info!(error = %reason, "device TLS handshake failed");
                        None
                    }
                    Err(_) => {
                        p.metrics
                            .handshake_failures
                            .with_label_values(&["timeout"])
                            .inc();
                        tracing::info!(after = ?cfg.timeouts.handshake, "device TLS handshake timed out");
                        None
                    }
                }
            }
        }
    }

    /// Reads until the first whole frame: every byte read (to forward unchanged) and the frame
    /// decoded. `None`: no frame came (counted).
    async fn identify(
        &self,
        device: &mut Box<dyn Io>,
        loaded: &Loaded,
    ) -> Option<(Vec<u8>, Option<Frame>)> {
        let p = self.proxy;
        let cfg = &loaded.config;
        let mut initial = Vec::with_capacity(256);
        let first = tokio::select! {
            _ = p.shutdown.cancelled() => return None,
            r = tokio::time::timeout(
                cfg.timeouts.first_frame,
                read_first_frame(device, &mut initial, cfg.limits.max_frame),
            ) => r,
        };
        match first {
            Ok(Ok(f)) => Some((initial, f)),
            Ok(Err(e)) => {
                let label = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    "eof"
                } else {
                    "error"
                };
                p.metrics
                    .first_frame_failures
                    .with_label_values(&[label])
                    .inc();
                tracing::info!(error = %e, bytes = initial.len(), "no first frame");
                None
            }
            Err(_) => {
                p.metrics
                    .first_frame_failures
                    .with_label_values(&["timeout"])
                    .inc();
                tracing::info!(after = ?cfg.timeouts.first_frame, bytes = initial.len(), "no first frame in time");
                None
            }
        }
    }

    /// The routing decision under the configuration in force, and the device registry: one
    /// live connection per device, but a new one replaces the old only once it is proven (the
    /// same auth code as the live one, or, in [`Session::connect`], the upstream's 0x28), so a
    /// LAN client claiming another device's id with a wrong code cannot close the real
    /// device's session.
    fn route(
        &self,
        first: Option<&Frame>,
        meta: Arc<ConnMeta>,
        orig_dst: Option<SocketAddr>,
    ) -> Routed {
        let p = self.proxy;
        let loaded = p.live.current();
        let decision = loaded.policy.decide(meta.peer);
        p.metrics
            .routing_decisions
            .with_label_values(&[decision.path.label()])
            .inc();
        let control = SessionControl::new(&p.shutdown);
        // Set before the session is registered, so a reload's drainer that changes it later
        // is never overwritten by this (older) decision.
        control.set_mirror(decision.path == Path::Legacy && decision.mirror);
        let mut deferred = None;
        if let (PeerKind::Device(id), Some(Body::Handshake(h))) =
            (meta.peer, first.map(|f| &f.body))
        {
            let session = LiveSession {
                conn: self.conn,
                control: control.clone(),
                since: SystemTime::now(),
                decision,
                peer: self.peer,
                auth: openssl::sha::sha256(&h.auth_code),
                path: decision.path,
                meta: meta.clone(),
            };
            match p.registry.get(id) {
                Some(live) if live.auth != session.auth => deferred = Some((id, session)),
                _ => {
                    if p.registry.register(id, session).is_some() {
                        tracing::info!("device connected again; closing its older connection");
                    }
                }
            }
            // A reload between reading the configuration and registering was not seen by its
            // drainer: follow the mirror setting in force now (a path change is drained at the
            // next reload, or when the device reconnects).
            let now = p.live.current();
            if now.generation != loaded.generation {
                let d = now.policy.decide(meta.peer);
                control.set_mirror(
                    d.path == Path::Legacy && d.mirror && decision.path == Path::Legacy,
                );
            }
        }
        Routed {
            loaded,
            decision,
            meta,
            control,
            deferred,
            orig_dst,
        }
    }

    /// Connects the upstream of the decided path, hands over what the device sent while it
    /// was identified, and (for devices and apps) sees a Cync answer. `new_primary` falls back
    /// to legacy when the new path fails anywhere before that answer, or at once while its
    /// circuit is open. On failure the device is held for `upstream.cloud_down_close_delay`
    /// (so it does not reconnect in a loop) and the path and reason are returned.
    async fn connect(
        &self,
        routed: &mut Routed,
        device: &mut Box<dyn Io>,
        initial: &[u8],
    ) -> Result<Connected, (Path, Close)> {
        let p = self.proxy;
        let Routed {
            loaded,
            decision,
            meta,
            control,
            deferred,
            orig_dst,
        } = routed;
        let (decision, orig_dst) = (*decision, *orig_dst);
        let loaded: &Loaded = loaded;
        let cfg: &Config = &loaded.config;
        let hold = cfg.upstream.cloud_down_close_delay;
        let wait_answer = matches!(meta.peer, PeerKind::Device(_) | PeerKind::App(_));
        // 3. Upstream: connect, hand over the handshake, and see a Cync answer. new_primary
        // falls back to legacy when the new path fails anywhere before that answer.
        let mut path = decision.path;
        // The new path works on whole frames: a partial frame at the end of what was read
        // while identifying waits for the rest (the legacy relay sends every byte as read).
        let whole = whole_frames_len(initial, cfg.limits.max_frame);
        let first = if path == Path::New {
            &initial[..whole]
        } else {
            initial
        };
        // The circuit: when every new-path address keeps failing, new_primary connections do
        // not wait on it and go to the cloud at once (new_only has nowhere else to go).
        let circuit_open = path == Path::New
            && decision.fallback
            && p.health.circuit_open(
                Path::New,
                &cfg.new_path.addresses,
                cfg.new_path.circuit_failures,
                cfg.new_path.circuit_cooldown,
            );
        if circuit_open {
            tracing::info!(
                "the new path's circuit is open (every address keeps failing); relaying to the cloud"
            );
            p.metrics.new_path_fallbacks.inc();
            path = Path::Legacy;
        }
        let first = if path == Path::New { first } else { initial };
        let mut result = p
            .establish(loaded, path, orig_dst, first, wait_answer, control)
            .await;
        if path == Path::New && decision.fallback && !circuit_open {
            let fall_back = match &result {
                Establish::Unreachable(e) if e.is_local() => false,
                Establish::Unreachable(e) => {
                    tracing::warn!(error = %e, "new path unreachable; falling back to legacy");
                    true
                }
                // A handshake the backend refused (an impostor, a wrong code) is not a backend
                // fault: no fallback.
                Establish::Failed {
                    closed_early: true,
                    target,
                    ..
                } if deferred.is_some() || p.health.answered_recently(Path::New, target) => false,
                Establish::Failed {
                    target, check, why, ..
                } => {
                    tracing::warn!(upstream = %target, "{why}; falling back to legacy");
                    p.health.record(Path::New, target, check.clone());
                    true
                }
                Establish::Ok { .. } | Establish::Cancelled => false,
            };
            if fall_back {
                p.metrics.new_path_fallbacks.inc();
                path = Path::Legacy;
                result = p
                    .establish(loaded, path, orig_dst, initial, wait_answer, control)
                    .await;
            }
        }
        let (up, answer, ptype) = match result {
            Establish::Ok { up, answer, ptype } => (up, answer, ptype),
            Establish::Cancelled => return Err((path, Close::External(control.cause()))),
            Establish::Unreachable(e) if e.is_local() => {
                hold_then_close(device, hold, control).await;
                return Err((path, Close::LocalError));
            }
            Establish::Unreachable(e) => {
                tracing::warn!(error = %e, delay = ?hold,
                    "no upstream reachable; closing the device connection after the delay");
                hold_then_close(device, hold, control).await;
                return Err((path, Close::Down(path)));
            }
            Establish::Failed {
                closed_early: true,
                target,
                ..
            } if deferred.is_some() || p.health.answered_recently(path, &target) => {
                // The upstream closed this connection before answering its handshake, while it
                // answers others: it refused this one (an impostor, a stale auth code, a wrong
                // app password), which says nothing against the upstream. With another live
                // connection of the device, that one stays.
                if deferred.is_some() {
                    tracing::warn!(upstream = %target, delay = ?hold,
                        "the upstream refused this handshake (its auth code differs from the device's live connection, which stays); holding, then closing");
                } else {
                    tracing::warn!(upstream = %target, delay = ?hold,
                        "the upstream refused this handshake (it answers other connections: a wrong auth code or an unknown device); holding, then closing");
                }
                hold_then_close(device, hold, control).await;
                return Err((path, Close::HandshakeRejected));
            }
            Establish::Failed {
                target, check, why, ..
            } => {
                tracing::warn!(upstream = %target, path = path.label(), delay = ?hold,
                    "{why}; holding the device connection, then closing it");
                p.health.record(path, &target, check);
                hold_then_close(device, hold, control).await;
                return Err((path, Close::Down(path)));
            }
        };
        if let (Some((id, mut session)), Some(ptype)) = (deferred.take(), ptype) {
            session.path = path;
            if ptype == crate::codec::PacketType::HANDSHAKE_ACK {
                if p.registry.register(id, session).is_some() {
                    tracing::info!(
                        "device connected again with a new auth code the upstream accepted; closing its older connection"
                    );
                }
            } else {
                tracing::info!(answer = %ptype, "the upstream did not accept the handshake with 0x28; the device's live connection stays");
            }
        }
        if path != decision.path
            && let PeerKind::Device(id) = meta.peer
        {
            p.registry.set_path(id, meta.id, path);
        }
        Ok(Connected { path, up, answer })
    }

    /// Relays a connected session until it ends: the taps (metrics, captures), the legacy
    /// path's observer and dark-launch mirror, then the byte relay; or the new path's
    /// ReliableTransport.
    async fn relay(
        &self,
        routed: &Routed,
        mut device: Box<dyn Io>,
        initial: &[u8],
        c: Connected,
    ) -> Close {
        let p = self.proxy;
        let Routed {
            loaded,
            decision,
            meta,
            control,
            ..
        } = routed;
        let decision = *decision;
        let loaded: &Loaded = loaded;
        let cfg: &Config = &loaded.config;
        let Connected { path, up, answer } = c;
        let whole = whole_frames_len(initial, cfg.limits.max_frame);
        let _ = meta.upstream.set((up.local, up.remote));
        match meta.peer {
            PeerKind::Device(id) => {
                tracing::info!(
                    device_id = %id,
                    upstream = %up.remote,
                    path = %path.label(),
                    reason = %decision.reason,
                    fell_back = path != decision.path,
                    "device connected"
                )
            }
            PeerKind::App(user) => {
                tracing::info!(user_id = format_args!("{user:08x}"), upstream = %up.remote, "phone app connected")
            }
            PeerKind::Unknown => {
                tracing::info!(upstream = %up.remote, "unidentified peer connected (relaying anyway)")
            }
        }
        for s in p.sinks.iter() {
            s.on_open(meta);
        }
        let upstream_io = up.io;
        let target = up.target.clone();
        let mut d2c = DirectionTap::new(
            Flow::DeviceToCloud,
            path,
            cfg.limits.max_frame,
            p.metrics.clone(),
            meta.clone(),
            p.sinks.clone(),
        );
        let mut c2d = DirectionTap::new(
            Flow::CloudToDevice,
            path,
            cfg.limits.max_frame,
            p.metrics.clone(),
            meta.clone(),
            p.sinks.clone(),
        );
        // The legacy path is observed with the new path's definitions (a cloud command until
        // the device's ack, a device request until the cloud's answer).
        let observer =
            (path == Path::Legacy && matches!(meta.peer, PeerKind::Device(_))).then(|| {
                let o = crate::proxy::tap::Observer::new(
                    cfg.new_path.transport(),
                    p.metrics.transport.clone(),
                );
                d2c.set_observer(o.clone());
                c2d.set_observer(o.clone());
                o
            });
        // Dark launch: a shadowed device's frames are copied to a mirror, attached from the
        // first frame, or later when a reload turns it on (and detached when one turns it
        // off), while the relay runs on untouched.
        let device_id = match meta.peer {
            PeerKind::Device(id) => Some(id),
            _ => None,
        };
        let slot = (path == Path::Legacy && device_id.is_some()).then(|| {
            let slot = Arc::new(tap::MirrorSlot::empty());
            d2c.set_mirror(slot.clone());
            c2d.set_mirror(slot.clone());
            slot
        });
        // Watch first, then read: a change after this point wakes the loop below.
        let mut want = control.mirror_watch();
        let mut mirror_rx = None;
        if let Some(slot) = &slot
            && *want.borrow_and_update()
        {
            mirror_rx = p.attach_mirror(slot, device_id, None);
        }
        // 4. What was read while identifying went first, unchanged; then the answer (on the
        // new path, its whole frames; a partial one waits for the rest).
        d2c.on_chunk(initial);
        let (answer, answer_tail) = if path == Path::New {
            let n = whole_frames_len(&answer, cfg.limits.max_frame);
            let tail = answer[n..].to_vec();
            let mut answer = answer;
            answer.truncate(n);
            (answer, tail)
        } else {
            (answer, Vec::new())
        };
        if !answer.is_empty() {
            if let Err(e) = async {
                device.write_all(&answer).await?;
                device.flush().await
            }
            .await
            {
                return Close::Relay(relay::CloseReason::Error {
                    side: relay::Side::Device,
                    message: e.to_string(),
                });
            }
            c2d.on_chunk(&answer);
        }
        // 5. Relay: the new path through the ReliableTransport, the legacy one byte for byte.
        if path == Path::New {
            return Close::Transport(
                p.run_new_path(NewPathSession {
                    loaded,
                    decision,
                    device,
                    backend: upstream_io,
                    initial,
                    whole,
                    answer: &answer,
                    answer_tail,
                    target,
                    control,
                    d2c: &mut d2c,
                    c2d: &mut c2d,
                })
                .await,
            );
        }
        let relay = relay::run(
            device,
            upstream_io,
            &mut d2c,
            &mut c2d,
            control,
            cfg.timeouts.idle,
        );
        let reason = match slot {
            None => relay.await,
            Some(slot) => {
                // The mirror is a task of its own: it never holds up the relay. It ends with
                // the session or when a reload detaches it; one that ends by itself while still
                // wanted (its backend gone for long) is attached again after a backoff.
                let mut watching = true;
                let hello = frames_of(&initial[..whole], cfg.limits.max_frame)
                    .into_iter()
                    .next();
                let mut mirror: Option<tokio_util::task::AbortOnDropHandle<()>> = None;
                let mut parity = None;
                let spawn =
                    |rx, par: Option<Arc<std::sync::Mutex<crate::parity::hub::SessionParity>>>| {
                        let px = self.arc.clone();
                        let ctl = control.clone();
                        let target = target.clone();
                        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
                            px.run_mirror(rx, &ctl, par, target).await
                        }))
                    };
                // When the running mirror was attached (its backoff starts over once it ran a
                // while).
                let mut attached_at = tokio::time::Instant::now();
                if let Some((rx, par)) = mirror_rx {
                    mirror = Some(spawn(rx, par.clone()));
                    parity = par;
                }
                let detach = |parity: &mut Option<
                    Arc<std::sync::Mutex<crate::parity::hub::SessionParity>>,
                >| {
                    slot.store(None);
                    if let Some(p) = parity.take() {
                        p.lock().unwrap_or_else(|p| p.into_inner()).finish();
                    }
                };
                tokio::pin!(relay);
                // Requests one side never answers are judged at their timeout, also on a
                // session that has gone quiet.
                let period = cfg.parity.timeout.max(Duration::from_secs(1));
                let mut tick =
                    tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                // Attaches a mirror to the live session (when there is somewhere to mirror to).
                macro_rules! attach {
                    ($msg:literal) => {
                        if let Some((rx, par)) = p.attach_mirror(&slot, device_id, hello.clone()) {
                            tracing::info!($msg);
                            attached_at = tokio::time::Instant::now();
                            mirror = Some(spawn(rx, par.clone()));
                            parity = par;
                        }
                    };
                }
                let mut retry_at: Option<tokio::time::Instant> = None;
                let mut retry_wait = Duration::from_secs(1);
                let far = tokio::time::Instant::now() + Duration::from_secs(86_400);
                let r = loop {
                    // Wanted but not running: attach (at once after a routing change, after the
                    // backoff when it ended by itself).
                    let attach_now = |retry_at: Option<tokio::time::Instant>| {
                        retry_at.is_none_or(|t| t <= tokio::time::Instant::now())
                    };
                    tokio::select! {
                        r = &mut relay => break r,
                        _ = async {
                            match mirror.as_mut() {
                                Some(m) => { let _ = m.await; }
                                None => std::future::pending().await,
                            }
                        }, if mirror.is_some() => {
                            mirror = None;
                            detach(&mut parity);
                            if attached_at.elapsed() >= Duration::from_secs(60) {
                                retry_wait = Duration::from_secs(1);
                            }
                            if control.mirror_wanted() {
                                tracing::info!(retry_in = ?retry_wait, "mirror ended; attaching it again later");
                                retry_at = Some(tokio::time::Instant::now() + retry_wait);
                                retry_wait = (retry_wait * 2).min(Duration::from_secs(60));
                            }
                        }
                        _ = tokio::time::sleep_until(retry_at.unwrap_or(far)), if retry_at.is_some() && mirror.is_none() => {
                            retry_at = None;
                            if control.mirror_wanted() {
                                attach!("mirror attached again");
                            }
                        }
                        _ = tick.tick(), if parity.is_some() => {
                            if let Some(p) = &parity {
                                p.lock().unwrap_or_else(|p| p.into_inner()).tick();
                            }
                        }
                        changed = want.changed(), if watching => {
                            if changed.is_err() {
                                watching = false;
                                continue;
                            }
                            let on = *want.borrow_and_update();
                            if on && mirror.is_none() && attach_now(retry_at) {
                                retry_at = None;
                                retry_wait = Duration::from_secs(1);
                                attach!("mirror attached (routing change)");
                            } else if !on && mirror.is_some() {
                                tracing::info!("mirror detached (routing change)");
                                mirror = None;
                                detach(&mut parity);
                            } else if !on {
                                retry_at = None;
                            }
                        }
                    }
                };
                drop(mirror.take());
                detach(&mut parity);
                r
            }
        };
        if let Some(o) = observer {
            o.lock().unwrap_or_else(|p| p.into_inner()).finish();
        }
        if let relay::CloseReason::Error { .. } = &reason {
            tracing::info!(%reason, "relay ended");
        }
        tracing::debug!(
            frames_up = d2c.frames(),
            frames_down = c2d.frames(),
            problems = d2c.problems() + c2d.problems(),
            "session totals"
        );
        Close::Relay(reason)
    }
}
