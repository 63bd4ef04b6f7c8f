//! The routing decision, pure: which path a connection takes, decided once per connection when
//! its first frame (0x23) has named the device.
//!
//! - Modes (seed 003's cutover modes): `legacy_only`, `shadow` (legacy answers, the new path gets
//!   a mirrored copy), `new_primary` (new path answers, legacy on failure), `new_only`.
//! - Which devices: `exclude` (never), then `cohort` (always), then the canary: a sticky bucket
//!   (keyed SipHash-1-3 of the device id, mod 10,000) below `canary_percent × 100`. Raising the
//!   percentage only ever adds devices, and every replica with the same seed decides the same.
//! - Phone-app sessions and unidentified peers always take the legacy path.

use crate::codec::{Body, DeviceId, Frame};
use serde::{Deserialize, Serialize};
use siphasher::sip::SipHasher13;
use std::collections::HashSet;
use std::hash::Hasher;

/// Who is on the device side of a connection, learned from its first frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PeerKind {
    /// A device (0x23 handshake) and its cloud id.
    Device(DeviceId),
    /// A phone app (0x13 login) and its user id.
    App(u32),
    /// The first frame was neither.
    Unknown,
}

impl PeerKind {
    /// Metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Device(_) => "device",
            Self::App(_) => "app",
            Self::Unknown => "unknown",
        }
    }

    /// Identify the peer from its first frame.
    pub fn from_first_frame(f: Option<&Frame>) -> Self {
        match f.map(|f| &f.body) {
            Some(Body::Handshake(h)) => Self::Device(h.device_id),
            Some(Body::Login(l)) => Self::App(l.user_id),
            _ => Self::Unknown,
        }
    }

    /// A short id for logs, file names and labels: device id or user id in hex.
    pub fn id_label(self) -> Option<String> {
        match self {
            Self::Device(d) => Some(d.to_string()),
            Self::App(u) => Some(format!("app-{u:08x}")),
            Self::Unknown => None,
        }
    }
}

/// Buckets of the sticky hash.
pub const BUCKETS: u32 = 10_000;

/// The cutover mode.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Everything on the legacy path (the cloud).
    #[default]
    LegacyOnly,
    /// Selected devices: legacy answers, the new path gets a mirrored copy.
    Shadow,
    /// Selected devices: the new path answers, legacy when the new path cannot be reached.
    NewPrimary,
    /// Selected devices: the new path only.
    NewOnly,
}

impl Mode {
    /// Label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::LegacyOnly => "legacy_only",
            Self::Shadow => "shadow",
            Self::NewPrimary => "new_primary",
            Self::NewOnly => "new_only",
        }
    }
}

/// Which backend answers a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Path {
    /// The real cloud (`upstream`).
    Legacy,
    /// The new path (`new_path`).
    New,
}

impl Path {
    /// Label value (`transport` in metrics).
    pub fn label(self) -> &'static str {
        match self {
            Self::Legacy => "legacy",
            Self::New => "new",
        }
    }
}

/// Why a decision was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "why", rename_all = "snake_case")]
pub enum Reason {
    /// Phone-app session: always the cloud, so users can still add devices.
    App,
    /// The first frame named no device.
    Unidentified,
    /// Listed in `routing.exclude`.
    Excluded,
    /// Listed in `routing.cohort`.
    Cohort,
    /// The device's bucket is below the canary threshold.
    Canary {
        /// Its bucket (0–9999).
        bucket: u32,
        /// The threshold it is below.
        threshold: u32,
    },
    /// The device's bucket is at or above the canary threshold.
    NotCanary {
        /// Its bucket.
        bucket: u32,
        /// The threshold.
        threshold: u32,
    },
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::App => f.write_str("phone app"),
            Self::Unidentified => f.write_str("unidentified peer"),
            Self::Excluded => f.write_str("in routing.exclude"),
            Self::Cohort => f.write_str("in routing.cohort"),
            Self::Canary { bucket, threshold } => write!(f, "bucket {bucket} < {threshold}"),
            Self::NotCanary { bucket, threshold } => write!(f, "bucket {bucket} >= {threshold}"),
        }
    }
}

/// A routing decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// Which backend answers.
    pub path: Path,
    /// Whether the new path also gets a mirrored copy (shadow mode).
    pub mirror: bool,
    /// Whether legacy takes over when the new path cannot be reached (new_primary).
    pub fallback: bool,
    /// The mode in force.
    pub mode: Mode,
    /// Why.
    pub reason: Reason,
}

impl Decision {
    /// Whether two decisions put a device on different paths (what a drain acts on). Only
    /// the primary path counts: the mirror attaches and detaches in place, and the fallback
    /// flag changes nothing for a connection that is up.
    pub fn moves_from(&self, other: &Decision) -> bool {
        self.path != other.path
    }
}

/// Everything the decision depends on, built from `[routing]`.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Mode.
    pub mode: Mode,
    /// Devices with a bucket below this are in the canary (percent × 100).
    pub threshold: u32,
    /// Always selected.
    pub cohort: HashSet<DeviceId>,
    /// Never selected.
    pub exclude: HashSet<DeviceId>,
    k0: u64,
    k1: u64,
}

/// Parses a device id as written in logs and configs: hex, with or without `0x`.
pub fn parse_device_id(s: &str) -> Option<DeviceId> {
    let t = s.trim();
    let t = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    if t.is_empty() || t.len() > 8 {
        return None;
    }
    u32::from_str_radix(t, 16).ok().map(DeviceId)
}

/// The canary threshold for a percentage (0–100, fractions allowed: 12.34 → 1234 buckets).
pub fn threshold(percent: f64) -> u32 {
    let p = if percent.is_finite() {
        percent.clamp(0.0, 100.0)
    } else {
        0.0
    };
    ((p * 100.0).round() as u32).min(BUCKETS)
}

impl Policy {
    /// A policy. `seed` keys the sticky hash: the same seed gives the same buckets everywhere.
    pub fn new(
        mode: Mode,
        percent: f64,
        seed: &str,
        cohort: impl IntoIterator<Item = DeviceId>,
        exclude: impl IntoIterator<Item = DeviceId>,
    ) -> Self {
        let mut h0 = SipHasher13::new_with_keys(0x6379_6e63, 0x6d69_746d);
        h0.write(seed.as_bytes());
        let mut h1 = SipHasher13::new_with_keys(0x6d69_746d, 0x6379_6e63);
        h1.write(seed.as_bytes());
        Self {
            mode,
            threshold: threshold(percent),
            cohort: cohort.into_iter().collect(),
            exclude: exclude.into_iter().collect(),
            k0: h0.finish(),
            k1: h1.finish(),
        }
    }

    /// The device's sticky bucket, 0–9999.
    pub fn bucket(&self, id: DeviceId) -> u32 {
        let mut h = SipHasher13::new_with_keys(self.k0, self.k1);
        h.write(&id.0.to_be_bytes());
        (h.finish() % u64::from(BUCKETS)) as u32
    }

    /// Whether `id` is selected for the new path (exclude, then cohort, then canary).
    fn select(&self, id: DeviceId) -> (bool, Reason) {
        if self.exclude.contains(&id) {
            return (false, Reason::Excluded);
        }
        if self.cohort.contains(&id) {
            return (true, Reason::Cohort);
        }
        let bucket = self.bucket(id);
        let threshold = self.threshold;
        if bucket < threshold {
            (true, Reason::Canary { bucket, threshold })
        } else {
            (false, Reason::NotCanary { bucket, threshold })
        }
    }

    /// Decides the path of a connection whose first frame identified `peer`.
    pub fn decide(&self, peer: PeerKind) -> Decision {
        let legacy = |reason| Decision {
            path: Path::Legacy,
            mirror: false,
            fallback: false,
            mode: self.mode,
            reason,
        };
        let id = match peer {
            PeerKind::App(_) => return legacy(Reason::App),
            PeerKind::Unknown => return legacy(Reason::Unidentified),
            PeerKind::Device(id) => id,
        };
        let (selected, reason) = self.select(id);
        if !selected {
            return legacy(reason);
        }
        let (path, mirror, fallback) = match self.mode {
            Mode::LegacyOnly => (Path::Legacy, false, false),
            Mode::Shadow => (Path::Legacy, true, false),
            Mode::NewPrimary => (Path::New, false, true),
            Mode::NewOnly => (Path::New, false, false),
        };
        Decision {
            path,
            mirror,
            fallback,
            mode: self.mode,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn dev(id: u32) -> PeerKind {
        PeerKind::Device(DeviceId(id))
    }

    #[test]
    fn apps_and_unknown_peers_stay_legacy() {
        let p = Policy::new(Mode::NewOnly, 100.0, "s", [DeviceId(1)], []);
        assert_eq!(p.decide(PeerKind::App(1)).path, Path::Legacy);
        assert_eq!(p.decide(PeerKind::App(1)).reason, Reason::App);
        assert_eq!(p.decide(PeerKind::Unknown).path, Path::Legacy);
        assert_eq!(p.decide(dev(1)).path, Path::New);
    }

    #[test]
    fn modes() {
        for (mode, path, mirror, fallback) in [
            (Mode::LegacyOnly, Path::Legacy, false, false),
            (Mode::Shadow, Path::Legacy, true, false),
            (Mode::NewPrimary, Path::New, false, true),
            (Mode::NewOnly, Path::New, false, false),
        ] {
            let d = Policy::new(mode, 100.0, "s", [], []).decide(dev(7));
            assert_eq!(
                (d.path, d.mirror, d.fallback),
                (path, mirror, fallback),
                "{mode:?}"
            );
            let d = Policy::new(mode, 0.0, "s", [], []).decide(dev(7));
            assert_eq!((d.path, d.mirror, d.fallback), (Path::Legacy, false, false));
        }
    }

    #[test]
    fn exclude_beats_cohort_beats_canary() {
        let p = Policy::new(
            Mode::NewOnly,
            0.0,
            "s",
            [DeviceId(1), DeviceId(2)],
            [DeviceId(2)],
        );
        assert_eq!(p.decide(dev(1)).reason, Reason::Cohort);
        assert_eq!(p.decide(dev(2)).reason, Reason::Excluded);
        assert_eq!(p.decide(dev(2)).path, Path::Legacy);
        let p = Policy::new(Mode::NewOnly, 100.0, "s", [], [DeviceId(3)]);
        assert_eq!(p.decide(dev(3)).path, Path::Legacy);
    }

    #[test]
    fn device_ids_parse_as_hex() {
        assert_eq!(parse_device_id("37962469"), Some(DeviceId(0x3796_2469)));
        assert_eq!(parse_device_id("0x38e8cf46"), Some(DeviceId(0x38e8_cf46)));
        assert_eq!(parse_device_id("123456789"), None);
        assert_eq!(parse_device_id("xyz"), None);
        assert_eq!(threshold(12.345), 1235);
        assert_eq!(threshold(150.0), BUCKETS);
        assert_eq!(threshold(f64::NAN), 0);
    }

    #[test]
    fn share_is_within_one_point_over_ten_thousand_ids() {
        for seed in ["a", "cync-mitm", "replica-seed"] {
            for pct in [1.0, 10.0, 25.0, 33.3, 50.0, 75.0, 90.0, 99.0] {
                let p = Policy::new(Mode::NewOnly, pct, seed, [], []);
                let n = (0..10_000u32)
                    .map(|i| 0x1000_0000u32.wrapping_add(i.wrapping_mul(2_654_435_761)))
                    .filter(|&id| p.decide(dev(id)).path == Path::New)
                    .count();
                let share = n as f64 / 100.0;
                assert!((share - pct).abs() <= 1.0, "seed {seed} {pct}%: {share}%");
            }
        }
    }

    #[test]
    fn replicas_agree() {
        let a = Policy::new(Mode::NewOnly, 40.0, "shared", [], []);
        let b = Policy::new(Mode::NewOnly, 40.0, "shared", [], []);
        let c = Policy::new(Mode::NewOnly, 40.0, "other", [], []);
        let diff = (0..1000u32)
            .filter(|&i| a.bucket(DeviceId(i)) != c.bucket(DeviceId(i)))
            .count();
        assert!((0..1000u32).all(|i| a.decide(dev(i)) == b.decide(dev(i))));
        assert!(diff > 900, "seeds should reshuffle buckets");
    }

    proptest! {
        #[test]
        fn raising_the_percentage_only_adds_devices(
            ids in proptest::collection::vec(any::<u32>(), 1..200),
            a in 0.0f64..=100.0,
            b in 0.0f64..=100.0,
            seed in "[a-z]{0,12}",
        ) {
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            let plo = Policy::new(Mode::NewOnly, lo, &seed, [], []);
            let phi = Policy::new(Mode::NewOnly, hi, &seed, [], []);
            for id in ids {
                if plo.decide(dev(id)).path == Path::New {
                    prop_assert_eq!(phi.decide(dev(id)).path, Path::New);
                }
            }
        }

        #[test]
        fn cohort_and_exclude_precedence(id in any::<u32>(), pct in 0.0f64..=100.0, in_cohort: bool, in_exclude: bool) {
            let d = DeviceId(id);
            let cohort = in_cohort.then_some(d);
            let exclude = in_exclude.then_some(d);
            let p = Policy::new(Mode::NewOnly, pct, "s", cohort, exclude);
            let got = p.decide(dev(id));
            if in_exclude {
                prop_assert_eq!(got.path, Path::Legacy);
                prop_assert_eq!(got.reason, Reason::Excluded);
            } else if in_cohort {
                prop_assert_eq!(got.path, Path::New);
                prop_assert_eq!(got.reason, Reason::Cohort);
            }
        }
    }
}
