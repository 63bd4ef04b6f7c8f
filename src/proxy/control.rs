//! Per-session control: why a session is being closed from outside, and the registry that keeps
//! one live connection per device id.

use crate::codec::DeviceId;
use crate::route::Decision;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Why a session was closed from outside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Cause {
    /// Not closed from outside.
    None = 0,
    /// The same device connected again.
    Replaced = 1,
    /// The proxy is shutting down.
    Shutdown = 2,
    /// An operator or the routing drain asked the device to reconnect.
    Drained = 3,
}

impl Cause {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Replaced,
            2 => Self::Shutdown,
            3 => Self::Drained,
            _ => Self::None,
        }
    }

    /// Label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Replaced => "replaced",
            Self::Shutdown => "shutdown",
            Self::Drained => "drained",
        }
    }
}

/// Lets the proxy close one session and say why.
#[derive(Debug)]
pub struct SessionControl {
    token: CancellationToken,
    cause: AtomicU8,
    /// Whether the session should run a dark-launch mirror (a reload turns it on and off).
    mirror: tokio::sync::watch::Sender<bool>,
}

impl SessionControl {
    /// A control whose token is a child of `parent` (the proxy's shutdown token).
    pub fn new(parent: &CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            token: parent.child_token(),
            cause: AtomicU8::new(Cause::None as u8),
            mirror: tokio::sync::watch::Sender::new(false),
        })
    }

    /// Asks the session to attach (`true`) or detach its mirror; the connection stays.
    pub fn set_mirror(&self, on: bool) {
        self.mirror
            .send_if_modified(|m| std::mem::replace(m, on) != on);
    }

    /// Like [`SessionControl::set_mirror`], but wakes the session even when nothing changed
    /// (a reload: a mirror that could not attach before, say for want of a backend address,
    /// tries again).
    pub fn refresh_mirror(&self, on: bool) {
        self.mirror.send_replace(on);
    }

    /// Whether the session should mirror now.
    pub fn mirror_wanted(&self) -> bool {
        *self.mirror.borrow()
    }

    /// Follows [`SessionControl::set_mirror`].
    pub fn mirror_watch(&self) -> tokio::sync::watch::Receiver<bool> {
        self.mirror.subscribe()
    }

    /// Closes the session for `cause` (the first cause given wins).
    pub fn close(&self, cause: Cause) {
        let _ = self.cause.compare_exchange(
            Cause::None as u8,
            cause as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        self.token.cancel();
    }

    /// Resolves when the session should close.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Why it was closed; `Shutdown` when the parent token fired.
    pub fn cause(&self) -> Cause {
        match Cause::from_u8(self.cause.load(Ordering::Acquire)) {
            Cause::None if self.token.is_cancelled() => Cause::Shutdown,
            c => c,
        }
    }
}

/// One entry of the device registry.
#[derive(Clone, Debug)]
pub struct LiveSession {
    /// Connection id.
    pub conn: Uuid,
    /// Its control.
    pub control: Arc<SessionControl>,
    /// When it registered.
    pub since: std::time::SystemTime,
    /// The routing decision it was connected with.
    pub decision: Decision,
    /// The device's address.
    pub peer: std::net::SocketAddr,
    /// SHA-256 of the auth code of its 0x23 (a reconnect with the same code replaces at once).
    pub auth: [u8; 32],
    /// The path it is relayed on: the decision's, or legacy after a `new_primary` fallback.
    pub path: crate::route::Path,
    /// The connection's facts and what its frames said (the web console's devices table).
    pub meta: Arc<super::tap::ConnMeta>,
}

impl LiveSession {
    /// Whether the decision `now` (from the policy in force) wants this connection on
    /// another path (what a drain acts on). A device that fell back to legacy under
    /// `new_primary` stays while the policy still says `new_primary` for it: it moves back
    /// when it reconnects, not on every reload.
    pub fn moves_under(&self, now: &crate::route::Decision) -> bool {
        use crate::route::Path;
        if now.path == self.path {
            return false;
        }
        let fell_back = self.path == Path::Legacy && self.decision.path == Path::New;
        !(fell_back && now.path == Path::New && now.fallback && self.decision.fallback)
    }
}

/// Live device sessions by device id: a new connection of a device replaces the old one.
#[derive(Debug, Default)]
pub struct Registry {
    inner: Mutex<HashMap<DeviceId, LiveSession>>,
}

impl Registry {
    /// Registers `conn` for `device`; returns the session it replaced (already told to close).
    pub fn register(&self, device: DeviceId, session: LiveSession) -> Option<LiveSession> {
        let old = {
            let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            m.insert(device, session)
        };
        if let Some(o) = &old {
            o.control.close(Cause::Replaced);
        }
        old
    }

    /// Records the path `conn` of `device` is actually relayed on (after a fallback).
    pub fn set_path(&self, device: DeviceId, conn: Uuid, path: crate::route::Path) {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = m.get_mut(&device).filter(|s| s.conn == conn) {
            s.path = path;
        }
    }

    /// Removes `device` if it is still registered to `conn`.
    pub fn unregister(&self, device: DeviceId, conn: Uuid) {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if m.get(&device).is_some_and(|s| s.conn == conn) {
            m.remove(&device);
        }
    }

    /// Number of live device sessions.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no device is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A snapshot of the live sessions.
    pub fn snapshot(&self) -> Vec<(DeviceId, LiveSession)> {
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        m.iter().map(|(k, v)| (*k, v.clone())).collect()
    }

    /// The session of `device`, if connected.
    pub fn get(&self, device: DeviceId) -> Option<LiveSession> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&device)
            .cloned()
    }

    /// Whether `device` is connected.
    pub fn contains(&self, device: DeviceId) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_meta(id: Uuid) -> Arc<crate::proxy::tap::ConnMeta> {
        Arc::new(crate::proxy::tap::ConnMeta {
            id,
            device_addr: "127.0.0.1:1".parse().unwrap(),
            proxy_device_addr: "127.0.0.1:2".parse().unwrap(),
            peer: crate::route::PeerKind::Device(DeviceId(1)),
            started: std::time::SystemTime::now(),
            upstream: std::sync::OnceLock::new(),
            live: Default::default(),
        })
    }

    #[test]
    fn a_fallen_back_device_moves_only_when_the_policy_really_changes() {
        use crate::route::{Mode, Path, Policy};
        let root = CancellationToken::new();
        let id = DeviceId(7);
        let decide =
            |mode| Policy::new(mode, 100.0, "s", [], []).decide(crate::route::PeerKind::Device(id));
        let primary = decide(Mode::NewPrimary);
        let s = LiveSession {
            conn: Uuid::now_v7(),
            control: SessionControl::new(&root),
            since: std::time::SystemTime::now(),
            decision: primary,
            peer: "127.0.0.1:1".parse().unwrap(),
            auth: [0; 32],
            path: Path::Legacy, // fell back
            meta: test_meta(Uuid::now_v7()),
        };
        // Still new_primary: it stays on the cloud until it reconnects.
        assert!(!s.moves_under(&primary));
        // Legacy everywhere: it is already there.
        assert!(!s.moves_under(&decide(Mode::LegacyOnly)));
        assert!(!s.moves_under(&decide(Mode::Shadow)));
        // new_only does not allow the cloud: it moves.
        assert!(s.moves_under(&decide(Mode::NewOnly)));
        // A device really on the new path moves when the policy sends it to legacy.
        let on_new = LiveSession {
            path: Path::New,
            ..s.clone()
        };
        assert!(on_new.moves_under(&decide(Mode::LegacyOnly)));
        assert!(!on_new.moves_under(&decide(Mode::NewOnly)));
    }

    #[test]
    fn replace_closes_old_and_unregister_is_owner_only() {
        let root = CancellationToken::new();
        let r = Registry::default();
        let (a, b) = (SessionControl::new(&root), SessionControl::new(&root));
        let (ca, cb) = (Uuid::now_v7(), Uuid::now_v7());
        let policy = crate::route::Policy::new(crate::route::Mode::LegacyOnly, 0.0, "s", [], []);
        let decision = policy.decide(crate::route::PeerKind::Device(DeviceId(1)));
        let s = |conn, control| LiveSession {
            conn,
            control,
            since: std::time::SystemTime::now(),
            decision,
            peer: "127.0.0.1:1".parse().unwrap(),
            auth: [0; 32],
            path: decision.path,
            meta: test_meta(conn),
        };
        assert!(r.register(DeviceId(1), s(ca, a.clone())).is_none());
        let old = r.register(DeviceId(1), s(cb, b.clone())).unwrap();
        assert_eq!(old.conn, ca);
        assert!(a.token().is_cancelled());
        assert_eq!(a.cause(), Cause::Replaced);
        assert!(!b.token().is_cancelled());
        r.unregister(DeviceId(1), ca);
        assert!(r.contains(DeviceId(1)));
        r.unregister(DeviceId(1), cb);
        assert!(r.is_empty());
        root.cancel();
        assert_eq!(b.cause(), Cause::Shutdown);
    }
}
