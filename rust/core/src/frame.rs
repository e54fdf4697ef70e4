//! Sans-I/O WebSocket framing for the server side: bytes in, messages out, and frame encoding.
//! Headers are parsed and written by tungstenite; message assembly, the checks of RFC 6455 and
//! the buffer policy are ours, because an idle socket must hold no read buffer at all.

use std::io::Cursor;

use bytes::{BufMut, Bytes, BytesMut};
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

use crate::config::FRAME_CHARGE;
use crate::deflate::InflateError;

/// A WebSocket message as the application sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// Valid UTF-8, checked by the core.
    Text(Bytes),
    Binary(Bytes),
}

/// Close codes the core sends on its own.
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const NO_STATUS: u16 = 1005;
    pub const ABNORMAL: u16 = 1006;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL_ERROR: u16 = 1011;
}

/// A complete unit received from the peer.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    Message(Payload),
    Ping(Bytes),
    Pong,
    /// `None` when the Close frame carried no status code.
    Close(Option<(u16, String)>),
}

/// Why the connection must be failed, with the close code to send.
#[derive(Debug, PartialEq, Eq)]
pub struct Violation {
    pub code: u16,
    pub reason: &'static str,
}

const fn violation(code: u16, reason: &'static str) -> Violation {
    Violation { code, reason }
}

/// Incremental UTF-8 validation across the pieces of one text message (fragments, and the
/// parts of a frame that arrive in separate reads), so that invalid text is refused in the piece
/// where it appears, not at the end of the message. Holds the up to three bytes of a sequence
/// that a piece cut short.
#[derive(Debug, Default, Clone, Copy)]
struct Utf8Check {
    carry: [u8; 4],
    len: u8,
}

impl Utf8Check {
    /// False as soon as `data` makes the text seen so far invalid.
    fn feed(&mut self, mut data: &[u8]) -> bool {
        if self.len > 0 {
            let width = match self.carry[0] {
                0xE0..=0xEF => 3,
                0xF0..=0xF4 => 4,
                _ => 2,
            };
            while usize::from(self.len) < width && !data.is_empty() {
                self.carry[usize::from(self.len)] = data[0];
                self.len += 1;
                data = &data[1..];
            }
            match std::str::from_utf8(&self.carry[..usize::from(self.len)]) {
                Ok(_) => self.len = 0,
                Err(e) if e.error_len().is_none() => return true,
                Err(_) => return false,
            }
        }
        match std::str::from_utf8(data) {
            Ok(_) => true,
            Err(e) if e.error_len().is_some() => false,
            Err(e) => {
                let rest = &data[e.valid_up_to()..];
                self.carry[..rest.len()].copy_from_slice(rest);
                #[allow(clippy::cast_possible_truncation)] // at most 3 bytes
                let len = rest.len() as u8;
                self.len = len;
                true
            }
        }
    }

    /// The text ends on a whole character.
    fn is_complete(self) -> bool {
        self.len == 0
    }
}

const INVALID_TEXT: Violation = violation(close_code::INVALID_PAYLOAD, "invalid UTF-8 in a text message");

/// Reassembles messages from client frames. Holds memory only while a frame or a fragmented
/// message is incomplete.
#[derive(Debug)]
pub struct MessageDecoder {
    /// Received bytes not yet parsed (an incomplete frame). Empty, with no capacity, when idle.
    pending: BytesMut,
    /// The opcode and data of a fragmented message in progress.
    fragments: Option<(Data, BytesMut)>,
    /// What the fragments so far count against the limit: their bytes, and at least
    /// [`FRAME_CHARGE`] for each frame.
    charged: usize,
    /// Payload bytes of the incomplete text frame in `pending` already checked as UTF-8.
    checked: usize,
    utf8: Utf8Check,
    max_message_size: usize,
    /// Decoding what a server sends (our outgoing sockets): frames must not be masked.
    from_server: bool,
    /// permessage-deflate was negotiated: RSV1 marks a compressed message.
    inflate: bool,
    /// The message being assembled is compressed (inflated once whole).
    compressed: bool,
}

impl MessageDecoder {
    /// A decoder of frames from a client (masked).
    #[must_use]
    pub fn new(max_message_size: usize) -> Self {
        Self {
            pending: BytesMut::new(),
            fragments: None,
            charged: 0,
            checked: 0,
            utf8: Utf8Check::default(),
            max_message_size,
            from_server: false,
            inflate: false,
            compressed: false,
        }
    }

    /// Takes compressed messages (RSV1) too: permessage-deflate was negotiated.
    #[must_use]
    pub fn with_inflate(self) -> Self {
        Self { inflate: true, ..self }
    }

    /// A decoder of frames from a server (unmasked), for outgoing sockets.
    #[must_use]
    pub fn for_client(max_message_size: usize) -> Self {
        Self { from_server: true, ..Self::new(max_message_size) }
    }

    /// Bytes held for incomplete frames and messages (what an idle socket must not hold).
    #[must_use]
    pub fn held_capacity(&self) -> usize {
        self.pending.capacity() + self.fragments.as_ref().map_or(0, |(_, b)| b.capacity())
    }

    /// Feeds received bytes; every complete unit is passed to `sink`, in order.
    ///
    /// # Errors
    /// On a protocol violation; the connection must then be failed with the violation's code.
    pub fn feed(&mut self, data: &[u8], sink: &mut impl FnMut(Incoming)) -> Result<(), Violation> {
        if self.pending.is_empty() {
            let used = self.parse(data, sink)?;
            if used < data.len() {
                self.pending.extend_from_slice(&data[used..]);
            }
        } else {
            self.pending.extend_from_slice(data);
            let buffer = std::mem::take(&mut self.pending);
            let used = self.parse(&buffer, sink)?;
            if used < buffer.len() {
                let mut rest = buffer;
                let _ = rest.split_to(used);
                self.pending = rest;
            }
            // Otherwise the buffer is dropped here: an idle socket keeps no capacity.
        }
        Ok(())
    }

    /// Parses as many whole frames as `data` holds; returns the bytes used.
    fn parse(&mut self, data: &[u8], sink: &mut impl FnMut(Incoming)) -> Result<usize, Violation> {
        let mut used = 0;
        loop {
            let mut cursor = Cursor::new(&data[used..]);
            let (header, length) = match FrameHeader::parse(&mut cursor) {
                Ok(Some(parsed)) => parsed,
                Ok(None) => return Ok(used),
                Err(_) => return Err(violation(close_code::PROTOCOL_ERROR, "reserved opcode")),
            };
            self.check_header(&header, length)?;
            #[allow(clippy::cast_possible_truncation)] // bounded by max_message_size above
            let length = length as usize;
            #[allow(clippy::cast_possible_truncation)]
            let start = used + cursor.position() as usize;
            if data.len() - start < length {
                if self.is_text(&header) && !header.rsv1 && !self.compressed {
                    self.check_partial(&data[start..], header.mask)?;
                }
                return Ok(used);
            }
            let mut payload = BytesMut::with_capacity(length);
            payload.extend_from_slice(&data[start..start + length]);
            if let Some(mask) = header.mask {
                unmask(&mut payload, mask);
            }
            used = start + length;
            self.on_frame(&header, payload, sink)?;
        }
    }

    /// The frame carries text: a text frame, or a continuation of a text message.
    fn is_text(&self, header: &FrameHeader) -> bool {
        match header.opcode {
            OpCode::Data(Data::Text) => true,
            OpCode::Data(Data::Continue) => matches!(self.fragments, Some((Data::Text, _))),
            _ => false,
        }
    }

    /// Checks the part of an incomplete text frame received so far, from where the last check
    /// stopped, so invalid text fails the connection without waiting for the rest of the frame.
    fn check_partial(&mut self, available: &[u8], mask: Option<[u8; 4]>) -> Result<(), Violation> {
        if self.checked == 0 && self.fragments.is_none() {
            self.utf8 = Utf8Check::default();
        }
        let mut chunk = [0u8; 256];
        while self.checked < available.len() {
            let end = available.len().min(self.checked + chunk.len());
            let part = &mut chunk[..end - self.checked];
            part.copy_from_slice(&available[self.checked..end]);
            if let Some(mask) = mask {
                let at = self.checked % 4;
                unmask(part, [mask[at], mask[(at + 1) % 4], mask[(at + 2) % 4], mask[(at + 3) % 4]]);
            }
            self.checked = end;
            if !self.utf8.feed(part) {
                return Err(INVALID_TEXT);
            }
        }
        Ok(())
    }

    fn check_header(&self, header: &FrameHeader, length: u64) -> Result<(), Violation> {
        // RSV1 marks a compressed message (on its first frame) once permessage-deflate is on.
        let compressed_start =
            header.rsv1 && self.inflate && matches!(header.opcode, OpCode::Data(Data::Text | Data::Binary));
        if (header.rsv1 && !compressed_start) || header.rsv2 || header.rsv3 {
            return Err(violation(close_code::PROTOCOL_ERROR, "reserved bits set"));
        }
        if self.from_server && header.mask.is_some() {
            return Err(violation(close_code::PROTOCOL_ERROR, "server frames must not be masked"));
        }
        if !self.from_server && header.mask.is_none() {
            return Err(violation(close_code::PROTOCOL_ERROR, "client frames must be masked"));
        }
        match header.opcode {
            OpCode::Control(_) => {
                if !header.is_final {
                    return Err(violation(close_code::PROTOCOL_ERROR, "fragmented control frame"));
                }
                if length > 125 {
                    return Err(violation(close_code::PROTOCOL_ERROR, "control frame too long"));
                }
            }
            OpCode::Data(data) => {
                // A frame of a fragmented message counts at least FRAME_CHARGE: the work of a
                // message is bounded, not only its bytes (a flood of empty fragments).
                let fragmented = !header.is_final || self.fragments.is_some();
                let cost = if fragmented { length.max(FRAME_CHARGE as u64) } else { length };
                if cost.saturating_add(self.charged as u64) > self.max_message_size as u64 {
                    return Err(violation(close_code::TOO_BIG, "message too big"));
                }
                match (data, &self.fragments) {
                    (Data::Continue, None) => {
                        return Err(violation(close_code::PROTOCOL_ERROR, "continuation of nothing"))
                    }
                    (Data::Text | Data::Binary, Some(_)) => {
                        return Err(violation(
                            close_code::PROTOCOL_ERROR,
                            "new message inside a fragmented one",
                        ))
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    fn on_frame(
        &mut self,
        header: &FrameHeader,
        payload: BytesMut,
        sink: &mut impl FnMut(Incoming),
    ) -> Result<(), Violation> {
        // What `check_partial` already validated of this frame.
        let checked = std::mem::take(&mut self.checked);
        match header.opcode {
            OpCode::Control(Control::Ping) => sink(Incoming::Ping(payload.freeze())),
            OpCode::Control(Control::Pong) => sink(Incoming::Pong),
            OpCode::Control(Control::Close) => sink(Incoming::Close(parse_close(&payload)?)),
            OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                return Err(violation(close_code::PROTOCOL_ERROR, "reserved opcode"))
            }
            OpCode::Data(kind @ (Data::Text | Data::Binary)) if header.rsv1 => {
                if header.is_final {
                    sink(Incoming::Message(self.inflated(kind, &payload)?));
                } else {
                    self.compressed = true;
                    self.charged = payload.len().max(FRAME_CHARGE);
                    self.fragments = Some((kind, payload));
                }
            }
            OpCode::Data(Data::Continue) if self.compressed => {
                let (_, buffer) = self.fragments.as_mut().expect("checked in check_header");
                self.charged += payload.len().max(FRAME_CHARGE);
                buffer.unsplit(payload);
                if header.is_final {
                    let (kind, buffer) = self.fragments.take().expect("present");
                    self.charged = 0;
                    self.compressed = false;
                    sink(Incoming::Message(self.inflated(kind, &buffer)?));
                }
            }
            OpCode::Data(Data::Text) if header.is_final && checked == 0 => {
                // The common case, a whole text message in one frame: validated in one pass.
                if std::str::from_utf8(&payload).is_err() {
                    return Err(INVALID_TEXT);
                }
                sink(Incoming::Message(Payload::Text(payload.freeze())));
            }
            OpCode::Data(kind @ (Data::Text | Data::Binary)) => {
                if kind == Data::Text {
                    if checked == 0 {
                        self.utf8 = Utf8Check::default();
                    }
                    if !self.utf8.feed(&payload[checked..]) || (header.is_final && !self.utf8.is_complete()) {
                        return Err(INVALID_TEXT);
                    }
                }
                if header.is_final {
                    sink(Incoming::Message(to_payload(kind, payload)));
                } else {
                    self.charged = payload.len().max(FRAME_CHARGE);
                    self.fragments = Some((kind, payload));
                }
            }
            OpCode::Data(Data::Continue) => {
                let (kind, buffer) = self.fragments.as_mut().expect("checked in check_header");
                if *kind == Data::Text
                    && (!self.utf8.feed(&payload[checked..]) || (header.is_final && !self.utf8.is_complete()))
                {
                    return Err(INVALID_TEXT);
                }
                self.charged += payload.len().max(FRAME_CHARGE);
                buffer.unsplit(payload);
                if header.is_final {
                    let (kind, buffer) = self.fragments.take().expect("present");
                    self.charged = 0;
                    sink(Incoming::Message(to_payload(kind, buffer)));
                }
            }
        }
        Ok(())
    }
}

impl MessageDecoder {
    /// A whole compressed message, inflated (at most `max_message_size`) and checked.
    fn inflated(&self, kind: Data, compressed: &[u8]) -> Result<Payload, Violation> {
        let data = crate::deflate::inflate(compressed, self.max_message_size).map_err(|e| match e {
            InflateError::TooBig => violation(close_code::TOO_BIG, "message too big once inflated"),
            InflateError::Invalid => violation(close_code::INVALID_PAYLOAD, "invalid compressed data"),
        })?;
        if kind == Data::Text {
            if std::str::from_utf8(&data).is_err() {
                return Err(INVALID_TEXT);
            }
            return Ok(Payload::Text(Bytes::from(data)));
        }
        Ok(Payload::Binary(Bytes::from(data)))
    }
}

/// A whole message; text was validated as it arrived.
fn to_payload(kind: Data, data: BytesMut) -> Payload {
    if kind == Data::Text {
        Payload::Text(data.freeze())
    } else {
        Payload::Binary(data.freeze())
    }
}

fn parse_close(payload: &[u8]) -> Result<Option<(u16, String)>, Violation> {
    match payload {
        [] => Ok(None),
        [_] => Err(violation(close_code::PROTOCOL_ERROR, "close frame of one byte")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !is_valid_close_code(code) {
                return Err(violation(close_code::PROTOCOL_ERROR, "invalid close code"));
            }
            let reason = std::str::from_utf8(reason)
                .map_err(|_| violation(close_code::INVALID_PAYLOAD, "invalid UTF-8 in close reason"))?;
            Ok(Some((code, reason.to_owned())))
        }
    }
}

/// The longest close reason, in UTF-8 bytes: a control frame's payload is at most 125 bytes,
/// two of them the code.
pub const MAX_CLOSE_REASON_BYTES: usize = 123;

/// Why the application may not close with `code` and `reason`, if it may not.
pub fn check_close(code: i64, reason: &str) -> Result<(), String> {
    if !u16::try_from(code).is_ok_and(is_valid_close_code) {
        return Err(format!("close code must be 1000-1003, 1007-1014 or 3000-4999, not {code}"));
    }
    if reason.len() > MAX_CLOSE_REASON_BYTES {
        return Err(format!("close reason is at most {MAX_CLOSE_REASON_BYTES} bytes in UTF-8"));
    }
    Ok(())
}

/// Codes a peer may put in a Close frame (RFC 6455 §7.4).
#[must_use]
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// XORs the client's mask into the payload, eight bytes at a time.
pub fn unmask(buf: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3]]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes(chunk.try_into().expect("8 bytes")) ^ wide;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i % 4];
    }
}

fn encode(opcode: OpCode, parts: &[&[u8]]) -> Bytes {
    let length: usize = parts.iter().map(|p| p.len()).sum();
    let header = FrameHeader { opcode, ..FrameHeader::default() };
    let mut out = BytesMut::with_capacity(header.len(length as u64) + length);
    header.format(length as u64, &mut (&mut out).writer()).expect("writing to memory");
    for part in parts {
        out.extend_from_slice(part);
    }
    out.freeze()
}

/// The masked (client-to-server) form of one frame this module encoded.
#[must_use]
pub fn mask(frame: &[u8]) -> Bytes {
    use std::hash::{BuildHasher, Hasher};
    let mut cursor = Cursor::new(frame);
    let Ok(Some((mut header, length))) = FrameHeader::parse(&mut cursor) else {
        unreachable!("mask() is given frames encoded here");
    };
    // A fresh random key per frame (RandomState is seeded from the OS, then stepped).
    let random = std::collections::hash_map::RandomState::new().build_hasher().finish();
    let key = (random as u32).to_ne_bytes();
    header.mask = Some(key);
    #[allow(clippy::cast_possible_truncation)]
    let start = cursor.position() as usize;
    let mut out = BytesMut::with_capacity(header.len(length) + frame.len() - start);
    header.format(length, &mut (&mut out).writer()).expect("writing to memory");
    let body = out.len();
    out.extend_from_slice(&frame[start..]);
    unmask(&mut out[body..], key);
    out.freeze()
}

/// One unmasked (server-to-client) frame holding a whole message.
#[must_use]
pub fn encode_message(text: bool, data: &[u8]) -> Bytes {
    encode(OpCode::Data(if text { Data::Text } else { Data::Binary }), &[data])
}

/// One frame holding a whole message compressed with permessage-deflate (RSV1 set).
#[must_use]
pub fn encode_compressed(text: bool, data: &[u8]) -> Bytes {
    let compressed = crate::deflate::compress(data);
    let header = FrameHeader {
        opcode: OpCode::Data(if text { Data::Text } else { Data::Binary }),
        rsv1: true,
        ..FrameHeader::default()
    };
    let length = compressed.len() as u64;
    let mut out = BytesMut::with_capacity(header.len(length) + compressed.len());
    header.format(length, &mut (&mut out).writer()).expect("writing to memory");
    out.extend_from_slice(&compressed);
    out.freeze()
}

#[must_use]
pub fn encode_pong(data: &[u8]) -> Bytes {
    encode(OpCode::Control(Control::Pong), &[data])
}

#[must_use]
pub fn encode_ping(data: &[u8]) -> Bytes {
    encode(OpCode::Control(Control::Ping), &[data])
}

/// A Close frame; `None` sends one without a status code.
#[must_use]
pub fn encode_close(status: Option<(u16, &str)>) -> Bytes {
    match status {
        None => encode(OpCode::Control(Control::Close), &[]),
        Some((code, reason)) => {
            encode(OpCode::Control(Control::Close), &[&code.to_be_bytes(), reason.as_bytes()])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame, as a browser would send it.
    fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = vec![first];
        match payload.len() {
            n @ 0..=125 => out.push(0x80 | n as u8),
            n @ 126..=65535 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        let mut body = payload.to_vec();
        unmask(&mut body, mask);
        out.extend_from_slice(&body);
        out
    }

    fn decode_all(decoder: &mut MessageDecoder, data: &[u8]) -> Result<Vec<Incoming>, Violation> {
        let mut out = Vec::new();
        decoder.feed(data, &mut |m| out.push(m))?;
        Ok(out)
    }

    #[test]
    fn masked_frames_decode_as_a_server_would() {
        let framed = mask(&encode_message(true, b"hello"));
        assert_ne!(&framed[2..], b"hello");
        let got = decode_all(&mut MessageDecoder::new(100), &framed).unwrap();
        assert!(matches!(&got[0], Incoming::Message(Payload::Text(t)) if &t[..] == b"hello"));
        // And a client refuses a masked frame from a server, and reads an unmasked one.
        assert_eq!(decode_all(&mut MessageDecoder::for_client(100), &framed).unwrap_err().code, 1002);
        let plain = decode_all(&mut MessageDecoder::for_client(100), &encode_message(true, b"hi")).unwrap();
        assert!(matches!(&plain[0], Incoming::Message(Payload::Text(t)) if &t[..] == b"hi"));
    }

    #[test]
    fn messages_at_every_length_boundary_byte_by_byte() {
        for len in [0usize, 125, 126, 65535, 65536] {
            let payload = vec![b'a'; len];
            let frame = client_frame(0x81, &payload);
            let mut decoder = MessageDecoder::new(1 << 20);
            let mut got = Vec::new();
            for chunk in frame.chunks(7) {
                decoder.feed(chunk, &mut |m| got.push(m)).unwrap();
            }
            assert_eq!(got, vec![Incoming::Message(Payload::Text(Bytes::from(payload)))]);
            assert_eq!(decoder.held_capacity(), 0, "idle decoder holds no buffer (len {len})");
        }
    }

    #[test]
    fn fragments_with_interleaved_ping_arrive_whole() {
        let mut data = client_frame(0x01, b"hel");
        data.extend(client_frame(0x89, b"p"));
        data.extend(client_frame(0x80, b"lo"));
        let mut decoder = MessageDecoder::new(100);
        assert_eq!(
            decode_all(&mut decoder, &data).unwrap(),
            vec![
                Incoming::Ping(Bytes::from_static(b"p")),
                Incoming::Message(Payload::Text(Bytes::from_static(b"hello")))
            ]
        );
    }

    #[test]
    fn violations_have_their_codes() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (vec![0x81, 0x01, b'a'], 1002),                  // unmasked
            (client_frame(0xC1, b"a"), 1002),                // rsv1
            (client_frame(0x83, b"a"), 1002),                // reserved data opcode
            (client_frame(0x8B, b""), 1002),                 // reserved control opcode
            (client_frame(0x09, b""), 1002),                 // fragmented ping
            (client_frame(0x80, b"a"), 1002),                // continuation of nothing
            (client_frame(0x81, &[0xff, 0xfe]), 1007),       // bad UTF-8
            (client_frame(0x82, &[0; 101]), 1009),           // too big
            (client_frame(0x88, &[0x03]), 1002),             // close of one byte
            (client_frame(0x88, &[0x03, 0xed]), 1002),       // close code 1005
            (client_frame(0x88, &[0x03, 0xe8, 0xff]), 1007), // close reason not UTF-8
        ];
        for (data, code) in cases {
            let err = decode_all(&mut MessageDecoder::new(100), &data).unwrap_err();
            assert_eq!(err.code, code, "{data:02x?}: {}", err.reason);
        }
        let mut frag = client_frame(0x01, &[0; 60]);
        frag.extend(client_frame(0x80, &[0; 60]));
        assert_eq!(decode_all(&mut MessageDecoder::new(100), &frag).unwrap_err().code, 1009);
    }

    #[test]
    fn invalid_text_fails_in_the_fragment_where_it_appears() {
        // "κόσμε" then a lone continuation byte in the second fragment, and a third never sent.
        let mut decoder = MessageDecoder::new(1000);
        let first = client_frame(0x01, "κόσμε".as_bytes());
        assert!(decode_all(&mut decoder, &first).unwrap().is_empty());
        let second = client_frame(0x00, &[0xce, 0xbc, 0x80, 0x80]);
        assert_eq!(decode_all(&mut decoder, &second).unwrap_err().code, 1007);
        // A character cut across fragments is fine; one left unfinished at the end is not.
        let mut decoder = MessageDecoder::new(1000);
        let mut data = client_frame(0x01, &[b'a', 0xe2, 0x82]);
        data.extend(client_frame(0x80, &[0xac]));
        let got = decode_all(&mut decoder, &data).unwrap();
        assert_eq!(got, vec![Incoming::Message(Payload::Text(Bytes::from("a€")))]);
        let mut decoder = MessageDecoder::new(1000);
        let mut data = client_frame(0x01, b"a");
        data.extend(client_frame(0x80, &[0xe2, 0x82]));
        assert_eq!(decode_all(&mut decoder, &data).unwrap_err().code, 1007);
    }

    #[test]
    fn invalid_text_fails_before_the_rest_of_its_frame_arrives() {
        let mut payload = "hello".as_bytes().to_vec();
        payload.extend([0xf4, 0x90, 0x80, 0x80]); // past U+10FFFF
        payload.extend(vec![b'x'; 500]);
        let frame = client_frame(0x81, &payload);
        let mut decoder = MessageDecoder::new(1000);
        // The header and the valid part: nothing yet; then the bad bytes: refused at once.
        let header = frame.len() - payload.len();
        assert!(decode_all(&mut decoder, &frame[..header + 5]).unwrap().is_empty());
        assert_eq!(decode_all(&mut decoder, &frame[header + 5..header + 9]).unwrap_err().code, 1007);
        // Valid text cut anywhere decodes whole, also where a partial check ran before.
        let text = "añ€😀".repeat(40);
        let frame = client_frame(0x81, text.as_bytes());
        for cut in 1..frame.len() {
            let mut decoder = MessageDecoder::new(1000);
            let mut got = decode_all(&mut decoder, &frame[..cut]).unwrap();
            got.extend(decode_all(&mut decoder, &frame[cut..]).unwrap());
            assert_eq!(got, vec![Incoming::Message(Payload::Text(Bytes::from(text.clone())))], "cut {cut}");
        }
    }

    #[test]
    fn a_flood_of_empty_fragments_is_bounded_like_a_large_message() {
        let mut decoder = MessageDecoder::new(1000);
        let mut data = client_frame(0x02, b"");
        for _ in 0..=(1000 / FRAME_CHARGE) {
            data.extend(client_frame(0x00, b""));
        }
        assert_eq!(decode_all(&mut decoder, &data).unwrap_err().code, 1009);
        // A message at the limit is fine, in one frame or in fragments of 16 bytes or more.
        let frame = client_frame(0x82, &[7; 1000]);
        assert_eq!(decode_all(&mut MessageDecoder::new(1000), &frame).unwrap().len(), 1);
        let mut data = client_frame(0x02, &[7; 500]);
        data.extend(client_frame(0x00, &[7; 484]));
        data.extend(client_frame(0x80, &[7; 16]));
        assert_eq!(decode_all(&mut MessageDecoder::new(1000), &data).unwrap().len(), 1);
    }

    #[test]
    fn close_codes() {
        for ok in [1000, 1001, 1003, 1007, 1011, 1014, 3000, 4999] {
            assert!(is_valid_close_code(ok), "{ok}");
        }
        for bad in [0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 5000] {
            assert!(!is_valid_close_code(bad), "{bad}");
        }
    }

    #[test]
    fn encodes_server_frames() {
        assert_eq!(&encode_message(true, b"hi")[..], &[0x81, 2, b'h', b'i']);
        assert_eq!(encode_message(false, &[0; 126])[..4], [0x82, 126, 0, 126]);
        assert_eq!(&encode_close(Some((1000, "x")))[..], &[0x88, 3, 0x03, 0xe8, b'x']);
        assert_eq!(&encode_close(None)[..], &[0x88, 0]);
    }
}
