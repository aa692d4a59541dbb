//! Random values that tell processes and histories apart: replica ids, connection id seeds,
//! history epochs, acknowledgement tokens. Below every other module: it imports nothing from the
//! crate.

use std::hash::{BuildHasher, Hasher};

/// A random number from the standard library's per-process hash seed, the time and the pid:
/// enough to tell processes apart without a random-number dependency.
pub fn random_u32() -> u32 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.write_u32(std::process::id());
    h.finish() as u32
}
