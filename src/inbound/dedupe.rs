//! Where the gateway remembers which entry a client frame id produced, so that a resend within
//! `inbound.dedupe_window_seconds` is acked with the original entry instead of stored twice.
//!
//! The layout is time-sliced hashes, one set per inbound stream: bucket
//! `{<prefix>:in:<stream>}:dedupe:<slice>` holds, for every id first stored during that slice,
//! field `<scope length>:<scope>:<frame id>` → entry id. A slice is half the window
//! (`slice = floor(Redis time in ms / (window / 2))`, Redis's clock, so every replica agrees);
//! a lookup reads the current bucket and the two before it, so an id is recognised for at least
//! the window and at most 1.5× it. Once no lookup reads a bucket (from the slice three after its
//! own), the next batch `UNLINK`s it, so a big hash is freed off Redis's main thread; it expires
//! one slice later (an absolute `PEXPIREAT` that every write repeats), when no batch came. The
//! expiry must come after the `UNLINK`: Redis deletes an expired key inline, even for `UNLINK`. One hash field per id instead of one key with its own expiry halves what Redis
//! spends per entry (`bench/inbound_redis.sh`).
//!
//! Both scripts that store ids (the appender's `APPEND_BATCH`, the keeper's `APPEND_AGAIN`) take
//! the layout from [`dedupe_lua!`]; nothing else reads or writes the buckets.

/// A client frame id to store once per window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DedupeId {
    /// The stream's bucket key prefix, `{<stream key>}:dedupe:` ([`crate::backplane::Keys::dedupe_buckets`]).
    pub buckets: String,
    /// The hash field: `<scope length>:<scope>:<frame id>`, the length making a scope holding
    /// `:` unambiguous.
    pub field: String,
    /// `inbound.dedupe_window_seconds` (more than 0).
    pub window_seconds: u64,
}

impl DedupeId {
    /// The id `frame_id` of `scope` (`u:<user>` or `c:<connection>`) in the stream whose buckets
    /// start with `buckets`.
    pub fn new(buckets: String, scope: &str, frame_id: &str, window_seconds: u64) -> Self {
        Self {
            buckets,
            field: format!("{}:{scope}:{frame_id}", scope.len()),
            window_seconds,
        }
    }

    /// The window in milliseconds, as the scripts take it.
    pub fn window_ms(&self) -> u64 {
        self.window_seconds.saturating_mul(1000)
    }
}

/// Lua shared by the scripts that store ids: `dedupe_buckets(prefix, window_ms)` returns the
/// three buckets a lookup reads (current first) and the absolute expiry (unix ms) of the current
/// one, and `UNLINK`s the bucket before them (freed in the background; its expiry is the
/// fallback when no batch comes). A macro so that `concat!` can put it in front of each script at compile time.
macro_rules! dedupe_lua {
    () => {
        r#"
local function dedupe_buckets(prefix, window_ms)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local slice = math.max(1, math.floor(window_ms / 2))
  local k = math.floor(now / slice)
  local buckets = {}
  for b = 0, 2 do
    buckets[b + 1] = prefix .. string.format('%d', k - b)
  end
  -- The bucket no lookup reads any more, freed off Redis's main thread now rather than by its
  -- expiry (which frees a big hash inline: 0.4 s for a million ids without lazyfree-lazy-expire).
  redis.call('UNLINK', prefix .. string.format('%d', k - 3))
  return buckets, string.format('%d', (k + 4) * slice)
end
"#
    };
}
pub(crate) use dedupe_lua;
