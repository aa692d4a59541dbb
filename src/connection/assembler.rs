//! Reassembles fragmented WebSocket messages with a cap on their total size.
//!
//! fastwebsockets' own collector has no total limit, so a client could grow one endless
//! fragmented message without bound. This one refuses a message as soon as it would exceed
//! `limits.max_message_bytes`, and checks UTF-8 of text messages as the fragments arrive, so an
//! invalid text message fails on the fragment that breaks it (RFC 6455 §8.1). A compressed
//! message (permessage-deflate) is checked once inflated, by the reader.

use fastwebsockets::OpCode;

/// Why a message was refused; each maps to a close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssembleError {
    /// The message grew past the limit (1009).
    TooLarge,
    /// A text message is not UTF-8 (1007).
    InvalidUtf8,
    /// Fragments out of order (1002).
    Protocol(&'static str),
}

/// A complete message.
#[derive(Debug, PartialEq, Eq)]
pub struct Message {
    /// Text or Binary.
    pub opcode: OpCode,
    /// Whether `payload` is compressed (RSV1 on its first frame).
    pub compressed: bool,
    /// The fragments' payloads, joined.
    pub payload: Vec<u8>,
}

/// The state of one connection's message in progress.
pub struct Assembler {
    max: usize,
    kind: Option<OpCode>,
    compressed: bool,
    buf: Vec<u8>,
    /// Bytes of `buf` already known to be valid UTF-8 (text only).
    checked: usize,
}

impl Assembler {
    /// An assembler refusing messages over `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            kind: None,
            compressed: false,
            buf: Vec::new(),
            checked: 0,
        }
    }

    /// Whether a fragmented message is in progress.
    pub fn in_progress(&self) -> bool {
        self.kind.is_some()
    }

    /// Takes one data frame (Text, Binary or Continuation); `compressed` is its RSV1 bit, which
    /// only a message's first frame carries. Returns the message when `fin` completes it.
    ///
    /// # Errors
    /// [`AssembleError`] when the frame cannot be taken; the connection must then be closed.
    pub fn push(
        &mut self,
        fin: bool,
        opcode: OpCode,
        compressed: bool,
        payload: &[u8],
    ) -> Result<Option<Message>, AssembleError> {
        match (opcode, self.kind) {
            (OpCode::Text | OpCode::Binary, Some(_)) => {
                return Err(AssembleError::Protocol(
                    "new message before the previous one ended",
                ))
            }
            (OpCode::Continuation, None) => {
                return Err(AssembleError::Protocol(
                    "continuation frame without a message",
                ))
            }
            (OpCode::Text | OpCode::Binary, None) => {
                self.kind = Some(opcode);
                self.compressed = compressed;
                self.buf.clear();
                self.checked = 0;
            }
            _ => {}
        }
        if self.buf.len() + payload.len() > self.max {
            self.reset();
            return Err(AssembleError::TooLarge);
        }
        self.buf.extend_from_slice(payload);
        if self.kind == Some(OpCode::Text) && !self.compressed {
            self.check_utf8(fin)?;
        }
        if !fin {
            return Ok(None);
        }
        let opcode = self.kind.take().expect("set above");
        self.checked = 0;
        Ok(Some(Message {
            opcode,
            compressed: self.compressed,
            payload: std::mem::take(&mut self.buf),
        }))
    }

    fn check_utf8(&mut self, fin: bool) -> Result<(), AssembleError> {
        match std::str::from_utf8(&self.buf[self.checked..]) {
            Ok(_) => self.checked = self.buf.len(),
            // A sequence cut at the end of this fragment may complete in the next one.
            Err(e) if e.error_len().is_none() && !fin => self.checked += e.valid_up_to(),
            Err(_) => {
                self.reset();
                return Err(AssembleError::InvalidUtf8);
            }
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.kind = None;
        self.buf = Vec::new();
        self.checked = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_fragments() {
        let mut a = Assembler::new(100);
        assert_eq!(a.push(false, OpCode::Text, false, b"he").unwrap(), None);
        assert_eq!(
            a.push(false, OpCode::Continuation, false, b"l").unwrap(),
            None
        );
        assert_eq!(
            a.push(true, OpCode::Continuation, false, b"lo").unwrap(),
            Some(Message {
                opcode: OpCode::Text,
                compressed: false,
                payload: b"hello".to_vec()
            })
        );
        assert!(!a.in_progress());
    }

    #[test]
    fn refuses_growth_past_the_limit() {
        let mut a = Assembler::new(10);
        assert_eq!(a.push(false, OpCode::Binary, false, &[0; 6]).unwrap(), None);
        assert_eq!(
            a.push(false, OpCode::Continuation, false, &[0; 6]),
            Err(AssembleError::TooLarge)
        );
    }

    #[test]
    fn utf8_split_across_fragments_is_fine_and_broken_utf8_fails_early() {
        let mut a = Assembler::new(100);
        let e_acute = "é".as_bytes();
        assert_eq!(
            a.push(false, OpCode::Text, false, &e_acute[..1]).unwrap(),
            None
        );
        assert_eq!(
            a.push(true, OpCode::Continuation, false, &e_acute[1..])
                .unwrap(),
            Some(Message {
                opcode: OpCode::Text,
                compressed: false,
                payload: e_acute.to_vec()
            })
        );
        let mut a = Assembler::new(100);
        assert_eq!(
            a.push(false, OpCode::Text, false, &[0xff]),
            Err(AssembleError::InvalidUtf8)
        );
        let mut a = Assembler::new(100);
        assert_eq!(
            a.push(true, OpCode::Text, false, &e_acute[..1]),
            Err(AssembleError::InvalidUtf8)
        );
    }

    #[test]
    fn compressed_text_is_not_checked_as_utf8_until_inflated() {
        let mut a = Assembler::new(100);
        assert_eq!(a.push(false, OpCode::Text, true, &[0xff]).unwrap(), None);
        let m = a.push(true, OpCode::Continuation, false, &[0xfe]).unwrap();
        assert_eq!(
            m,
            Some(Message {
                opcode: OpCode::Text,
                compressed: true,
                payload: vec![0xff, 0xfe]
            })
        );
    }

    #[test]
    fn out_of_order_fragments_are_protocol_errors() {
        let mut a = Assembler::new(100);
        assert!(matches!(
            a.push(true, OpCode::Continuation, false, b"x"),
            Err(AssembleError::Protocol(_))
        ));
        a.push(false, OpCode::Text, false, b"x").unwrap();
        assert!(matches!(
            a.push(true, OpCode::Binary, false, b"x"),
            Err(AssembleError::Protocol(_))
        ));
    }
}
