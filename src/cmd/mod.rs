//! The command-line tools behind `cync-mitm <command>`: each takes parsed options, readers and
//! writers, so it runs the same from `main` and from tests.

pub mod canary;
pub mod capture;
pub mod decode;
pub mod drain;
pub mod replay;
pub mod slo;
pub mod upstream;
