//! Simulators of the cloud and of a device fleet, speaking the real protocol over real TLS, so the
//! proxy can be run and tested on one machine with no real devices. Used by the integration
//! tests, the benchmarks, the demo and `cync-mitm sim`.

pub mod cloud;
pub mod devices;
pub mod stats;

use crate::codec::DeviceId;

/// Deterministic 64-bit mixing (splitmix64), for ids and codes derived from a seed.
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The identity of simulated device `index` under `seed`: cloud id, 16-character auth code and
/// mesh id. Distinct indices give distinct ids for any seed.
pub fn device_identity(seed: u64, index: u32) -> (DeviceId, String, u16) {
    // The id keeps the index in its low bits so ids never collide within a fleet.
    let salt = (splitmix64(seed) as u32) & 0x7ff0_0000;
    let id = DeviceId(0x1000_0000 ^ salt ^ index);
    let code = splitmix64(seed ^ (u64::from(index) << 32) ^ 0xc0de);
    let auth = format!("{code:016x}");
    let mesh = (index % 250) as u16 + 1;
    (id, auth, mesh)
}

/// A record of one connection's bytes, from one side's point of view.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Transcript {
    /// The device the connection belonged to, once known.
    pub device: Option<DeviceId>,
    /// Bytes this side sent.
    pub sent: Vec<u8>,
    /// Bytes this side received.
    pub received: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_deterministic_and_distinct() {
        let a: Vec<_> = (0..1000).map(|i| device_identity(7, i)).collect();
        let b: Vec<_> = (0..1000).map(|i| device_identity(7, i)).collect();
        assert_eq!(a, b);
        let ids: std::collections::HashSet<_> = a.iter().map(|x| x.0).collect();
        assert_eq!(ids.len(), 1000);
        assert!(a.iter().all(|x| x.1.len() == 16));
        assert_ne!(device_identity(8, 0).1, a[0].1);
    }
}
