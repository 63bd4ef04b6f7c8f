//! The ReliableTransport of the new path: ack matching, retries with backoff, deduplication
//! and bounded queues, as a sans-IO [`core::Core`] (time passed in, unit-tested
//! deterministically) for a thin I/O driver to run per device session.

pub mod core;
pub mod driver;
pub mod metrics;

pub use self::core::{Core, Event, Output, Overflow, Queue, Role, Settings};
