//! permessage-deflate (RFC 7692): the offer a client makes in the upgrade, what the gateway
//! answers, and compressing and inflating whole messages.
//!
//! The gateway always answers `server_no_context_takeover` and `client_no_context_takeover`
//! (RFC 7692 §7.1.1: a server may include both whatever the offer says). So every message is
//! compressed and inflated on its own, with no window carried from one message to the next:
//! - the compressed bytes of a message depend only on the message and the window size, so the
//!   fan-out compresses each message once per encoding and every recipient shares the bytes;
//! - no deflate state belongs to a connection: compressing and inflating use one state per
//!   worker thread, reset after each message, so an idle connection costs nothing more.
//!
//! Declined (the client then gets the connection without compression, or its next offer):
//! offers with an unknown, repeated or malformed parameter (RFC 7692 §5.1 says to decline
//! them), and `server_max_window_bits=8`, a window zlib cannot compress with (it raises 8 to 9,
//! and a client holding a 256-byte window could not inflate the result).

use std::cell::RefCell;

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The extension's token in `Sec-WebSocket-Extensions`.
const TOKEN: &str = "permessage-deflate";

/// Appended to a message's compressed bytes before inflating, and taken off after compressing
/// (RFC 7692 §7.2.1–2): the end of an empty stored block, which a sync flush writes.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// What the gateway offers, from `[server]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeflateSettings {
    /// zlib compression level, 0–9.
    pub level: u8,
    /// Messages shorter than this many bytes are sent uncompressed.
    pub min_bytes: usize,
}

/// What one connection agreed to: messages of at least `min_bytes` go out compressed with a
/// window of `window_bits`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deflate {
    /// The LZ77 window the gateway compresses with (`server_max_window_bits`), 9..=15.
    pub window_bits: u8,
    /// zlib compression level, 0–9.
    pub level: u8,
    /// Messages shorter than this are sent uncompressed.
    pub min_bytes: usize,
}

/// An accepted offer: the connection's terms and the `Sec-WebSocket-Extensions` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreed {
    /// The connection's terms.
    pub deflate: Deflate,
    /// The response header's value.
    pub response: String,
}

/// Picks the first `permessage-deflate` offer the gateway can accept from the values of the
/// client's `Sec-WebSocket-Extensions` headers (RFC 6455 §9.1), in the client's order of
/// preference. `None`: no offer, or none acceptable; the connection goes on uncompressed.
pub fn negotiate<'a>(
    headers: impl IntoIterator<Item = &'a str>,
    settings: DeflateSettings,
) -> Option<Agreed> {
    headers
        .into_iter()
        .flat_map(|value| value.split(','))
        .find_map(|offer| accept(offer, settings))
}

/// Accepts one offer (`permessage-deflate; param; param=value`), or declines it.
fn accept(offer: &str, settings: DeflateSettings) -> Option<Agreed> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case(TOKEN) {
        return None;
    }
    let mut seen = Vec::new();
    let mut server_window = None;
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((name, value)) => (name.trim(), Some(value.trim().trim_matches('"'))),
            None => (param, None),
        };
        let name = name.to_ascii_lowercase();
        if seen.contains(&name) {
            return None;
        }
        match (name.as_str(), value) {
            ("server_no_context_takeover" | "client_no_context_takeover", None) => {}
            ("server_max_window_bits", Some(bits)) => server_window = Some(window_bits(bits)?),
            // The client's window does not matter here: every message is inflated on its own
            // with a full window, so the answer leaves it to the client.
            ("client_max_window_bits", None) => {}
            ("client_max_window_bits", Some(bits)) => {
                window_bits(bits)?;
            }
            _ => return None,
        }
        seen.push(name);
    }
    if server_window == Some(8) {
        return None;
    }
    let mut response = format!("{TOKEN}; server_no_context_takeover; client_no_context_takeover");
    if let Some(bits) = server_window {
        response.push_str(&format!("; server_max_window_bits={bits}"));
    }
    Some(Agreed {
        deflate: Deflate {
            window_bits: server_window.unwrap_or(15),
            level: settings.level,
            min_bytes: settings.min_bytes,
        },
        response,
    })
}

/// A window size parameter's value: 8 to 15, in decimal with no leading zero (RFC 7692 §7.1.2).
fn window_bits(value: &str) -> Option<u8> {
    if value.starts_with('0') || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok().filter(|bits| (8..=15).contains(bits))
}

thread_local! {
    /// Compressors of this worker thread, one per (window, level) in use; reset after each
    /// message. Usually one.
    static COMPRESSORS: RefCell<Vec<(u8, u8, Compress)>> = const { RefCell::new(Vec::new()) };
    /// The inflater of this worker thread (a full window inflates any client's messages).
    static INFLATER: RefCell<Option<Decompress>> = const { RefCell::new(None) };
}

impl Deflate {
    /// Whether a message of `len` bytes is sent compressed (when compressing makes it smaller).
    pub fn wants(&self, len: usize) -> bool {
        len >= self.min_bytes
    }

    /// `payload` compressed as one message (the tail taken off); `None` only if zlib failed
    /// (the message then goes out as it is). A message that does not shrink is still sent
    /// compressed (a few bytes more): what the client gets depends only on its size, and some
    /// clients (the Autobahn runner) mishandle a plain message on a compressed connection.
    pub fn compress(&self, payload: &[u8]) -> Option<Bytes> {
        COMPRESSORS.with(|cell| {
            let mut pool = cell.borrow_mut();
            let at = match pool
                .iter()
                .position(|(w, l, _)| (*w, *l) == (self.window_bits, self.level))
            {
                Some(at) => at,
                None => {
                    let level = Compression::new(u32::from(self.level));
                    let c = Compress::new_with_window_bits(level, false, self.window_bits);
                    pool.push((self.window_bits, self.level, c));
                    pool.len() - 1
                }
            };
            let c = &mut pool[at].2;
            let out = compress_with(c, payload);
            c.reset();
            out.map(Bytes::from)
        })
    }
}

/// One message through `c` with a sync flush; `None` if zlib fails (it does not on memory it
/// was given; the message then goes out uncompressed).
fn compress_with(c: &mut Compress, payload: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(payload.len() / 2 + 64);
    let mut input = payload;
    loop {
        if out.len() == out.capacity() {
            out.reserve(out.capacity());
        }
        let before = c.total_in();
        c.compress_vec(input, &mut out, FlushCompress::Sync).ok()?;
        input = &input[(c.total_in() - before) as usize..];
        // The flush is complete once all input is taken and zlib left output space unused.
        if input.is_empty() && out.len() < out.capacity() {
            break;
        }
    }
    if !out.ends_with(&TAIL) {
        return None;
    }
    out.truncate(out.len() - TAIL.len());
    Some(out)
}

/// Why a compressed message could not be inflated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    /// It inflates past the limit (close 1009).
    #[error("message inflates past limits.max_message_bytes")]
    TooLarge,
    /// It is not deflate data (close 1007).
    #[error("compressed message is not valid deflate data")]
    Invalid,
}

/// Inflates one compressed message (RFC 7692 §7.2.2), refusing it as soon as its output would
/// exceed `max` bytes: a small frame cannot make the gateway allocate past the limit.
///
/// # Errors
/// [`InflateError`]; the connection is then failed.
pub fn inflate(compressed: &[u8], max: usize) -> Result<Vec<u8>, InflateError> {
    INFLATER.with(|cell| {
        let mut cell = cell.borrow_mut();
        let d = cell.get_or_insert_with(|| Decompress::new(false));
        let result = inflate_with(d, compressed, max);
        d.reset(false);
        result
    })
}

fn inflate_with(
    d: &mut Decompress,
    compressed: &[u8],
    max: usize,
) -> Result<Vec<u8>, InflateError> {
    let mut out = Vec::with_capacity(compressed.len().saturating_mul(3).clamp(64, max.max(64)));
    for mut input in [compressed, &TAIL[..]] {
        loop {
            if out.len() == out.capacity() {
                if out.len() > max {
                    return Err(InflateError::TooLarge);
                }
                let room = (max + 1 - out.len()).min(out.capacity().max(64));
                out.reserve_exact(room);
            }
            let (before_in, before_out) = (d.total_in(), out.len());
            let status = d
                .decompress_vec(input, &mut out, FlushDecompress::Sync)
                .map_err(|_| InflateError::Invalid)?;
            input = &input[(d.total_in() - before_in) as usize..];
            if out.len() > max {
                return Err(InflateError::TooLarge);
            }
            match status {
                // A block with BFINAL set ends the data; nothing after it matters.
                Status::StreamEnd => return Ok(out),
                _ if input.is_empty() && out.len() < out.capacity() => break,
                // Room to write and input left, yet nothing moved: not deflate data.
                _ if out.len() < out.capacity()
                    && out.len() == before_out
                    && d.total_in() == before_in =>
                {
                    return Err(InflateError::Invalid)
                }
                _ => {}
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: DeflateSettings = DeflateSettings {
        level: 1,
        min_bytes: 0,
    };

    fn answer(offers: &[&str]) -> Option<String> {
        negotiate(offers.iter().copied(), SETTINGS).map(|a| a.response)
    }

    #[test]
    fn offers_are_answered_with_no_context_takeover_both_ways() {
        let both = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
        assert_eq!(answer(&["permessage-deflate"]).as_deref(), Some(both));
        // Chromium's offer.
        assert_eq!(
            answer(&["permessage-deflate; client_max_window_bits"]).as_deref(),
            Some(both)
        );
        assert_eq!(
            answer(&["permessage-deflate; server_max_window_bits=10"]),
            Some(format!("{both}; server_max_window_bits=10"))
        );
        let agreed = negotiate(
            ["permessage-deflate; server_max_window_bits=\"9\""],
            SETTINGS,
        );
        assert_eq!(agreed.unwrap().deflate.window_bits, 9);
        assert_eq!(answer(&["x-webkit-deflate-frame"]), None);
        assert_eq!(answer(&[]), None);
    }

    #[test]
    fn offers_the_gateway_cannot_honour_are_declined_and_the_next_one_taken() {
        for bad in [
            "permessage-deflate; server_max_window_bits=8",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; mystery",
        ] {
            assert_eq!(answer(&[bad]), None, "{bad}");
            let two = format!("{bad}, permessage-deflate; client_max_window_bits=12");
            assert!(answer(&[&two]).is_some(), "{bad} then a good offer");
        }
    }

    #[test]
    fn a_message_survives_compressing_and_inflating_at_every_window() {
        let text = br#"{"type":"message","channel":"room:1","data":{"x":1,"y":2}}"#.repeat(40);
        for bits in 9..=15 {
            let d = Deflate {
                window_bits: bits,
                level: 6,
                min_bytes: 0,
            };
            let compressed = d.compress(&text).expect("JSON compresses");
            assert!(compressed.len() < text.len() / 5, "window {bits}");
            assert_eq!(inflate(&compressed, 1 << 20).unwrap(), text);
            // The same bytes every time: the state is reset between messages.
            assert_eq!(d.compress(&text).unwrap(), compressed);
        }
    }

    #[test]
    fn incompressible_messages_are_compressed_all_the_same() {
        let d = Deflate {
            window_bits: 15,
            level: 1,
            min_bytes: 0,
        };
        let out = d.compress(b"ab").unwrap();
        assert_eq!(inflate(&out, 10).unwrap(), b"ab");
        assert_eq!(inflate(&d.compress(b"").unwrap(), 10).unwrap(), b"");
    }

    #[test]
    fn inflating_stops_at_the_limit_and_refuses_garbage() {
        let zeros = vec![0u8; 1 << 20];
        let d = Deflate {
            window_bits: 15,
            level: 9,
            min_bytes: 0,
        };
        let bomb = d.compress(&zeros).unwrap();
        assert!(bomb.len() < 2000, "1 MiB of zeros is {} bytes", bomb.len());
        assert_eq!(inflate(&bomb, 1000), Err(InflateError::TooLarge));
        assert_eq!(inflate(&bomb, 1 << 20).unwrap().len(), 1 << 20);
        assert_eq!(
            inflate(&[0xff, 0xff, 0xff], 1000),
            Err(InflateError::Invalid)
        );
        // The inflater is usable after a failure.
        let small = d.compress(&[b'a'; 100]).unwrap();
        assert_eq!(inflate(&small, 1000).unwrap(), vec![b'a'; 100]);
    }
}
