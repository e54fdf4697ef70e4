//! The WebSocket protocol of one connection, without I/O (after the `websockets` library's
//! sans-I/O `Protocol`): bytes in; messages, frames to send and a deadline out.
//! It owns the phase, the closing handshake, failing the connection, the Close held back behind
//! messages the application has not handled, and the keepalive; the connection task reads,
//! writes and waits.

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::config::Limits;
use crate::frame::{self, close_code, Incoming, MessageDecoder, Payload};
use crate::meter::Unit;

/// How long a started closing handshake (or a final flush, or a held Close) may take before the
/// TCP connection is dropped.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Open,
    /// We sent Close and wait for the peer's.
    CloseSent,
    /// The outcome is known: what is queued is written, then the connection ends.
    Finishing,
}

/// A close the application (or the server) asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseRequest {
    pub code: u16,
    pub reason: String,
    /// The queue overflowed: frames not yet written are discarded, not flushed.
    pub discard_unsent: bool,
}

/// How the connection ended, as its Close event reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub code: u16,
    pub reason: String,
    pub was_clean: bool,
}

/// What to do once the application has handled the messages received before it.
#[derive(Debug)]
enum HeldClose {
    /// Fail the connection with this code (a protocol violation found after valid messages).
    Fail(u16, &'static str),
    /// Answer the peer's Close (with this status).
    Echo(Option<(u16, String)>),
}

/// Where the protocol's output goes, and the little it asks of the socket it runs on. The
/// connection task implements it over the socket's write queue and the application's event
/// queue; the tests below over vectors. A sink rather than lists to collect (as in
/// `websockets`), like the decoder's: nothing is allocated per read, and the send limit is
/// checked at the moment each frame of the core's own is queued.
pub trait Link {
    /// The limits of the socket.
    fn limits(&self) -> &Limits;
    /// Queues a frame for the peer (masked already when we are the client).
    fn send(&mut self, frame: Bytes);
    /// Drops the queued frames that have not started going out.
    fn discard_unsent(&mut self);
    /// What the frames queued for the peer (the application's and ours) hold in memory.
    fn queued_cost(&self) -> usize;
    /// The connection is closing: the application's later frames are dropped.
    fn closing(&mut self);
    /// A message for the application.
    fn message(&mut self, data: Payload);
    /// The peer broke the protocol (reported before the connection is failed).
    fn error(&mut self, reason: &'static str);
    /// Messages given to the application may not be handled yet (their replies may follow).
    fn app_behind(&self) -> bool;
    /// The frame that answers `message` without the application (an auto-response), if any.
    fn auto_response(&mut self, message: &Payload) -> Option<Bytes>;
    /// Counts one unit of the socket's traffic.
    fn count(&mut self, unit: Unit);
}

#[derive(Debug)]
pub struct Protocol {
    decoder: MessageDecoder,
    phase: Phase,
    /// When the current phase must end (close handshake), or a held Close must be carried out
    /// anyway; `None` while open.
    phase_deadline: Option<Instant>,
    /// When the last byte came: the idle timeout and the keepalive count from it.
    last_frame: Instant,
    /// A keepalive Ping went out (at `last_frame` + the interval) and waits for an answer: any
    /// byte. A flag, not a time, keeps the connection task small.
    ping_sent: bool,
    /// Boxed: decided once, at the end, while the task of every idle socket would carry it.
    outcome: Option<Box<Outcome>>,
    /// A Close that waits until the application has handled the messages before it, so that
    /// their replies go out first.
    held: Option<Box<HeldClose>>,
    /// We are the client (an outgoing socket): our frames are masked.
    client: bool,
}

impl Protocol {
    /// The protocol of a connection opened at `now`; `inflate` when permessage-deflate was
    /// negotiated (the server side only).
    #[must_use]
    pub fn new(client: bool, max_message_size: usize, inflate: bool, now: Instant) -> Self {
        let decoder = match (client, inflate) {
            (true, _) => MessageDecoder::for_client(max_message_size),
            (false, false) => MessageDecoder::new(max_message_size),
            (false, true) => MessageDecoder::new(max_message_size).with_inflate(),
        };
        Self {
            decoder,
            phase: Phase::Open,
            phase_deadline: None,
            last_frame: now,
            ping_sent: false,
            outcome: None,
            held: None,
            client,
        }
    }

    #[must_use]
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// A Close waits for the application to catch up ([`Self::release_held`]); nothing more
    /// is read meanwhile.
    #[must_use]
    pub fn is_holding(&self) -> bool {
        self.held.is_some()
    }

    /// How the connection ended: as decided, or lost (1006) when nothing was decided.
    pub fn take_outcome(&mut self) -> Outcome {
        self.outcome.take().map_or_else(
            || Outcome { code: close_code::ABNORMAL, reason: "connection lost".into(), was_clean: false },
            |outcome| *outcome,
        )
    }

    /// Feeds bytes received at `now`. Any byte is a sign of life: it resets the idle and
    /// keepalive timers.
    pub fn receive_data(&mut self, data: &[u8], now: Instant, link: &mut impl Link) {
        self.last_frame = now;
        self.ping_sent = false;
        if self.held.is_some() {
            return;
        }
        // The decoder is lent out for the call so each unit goes straight to `on_incoming`,
        // without collecting them in a vector per read (an empty decoder allocates nothing).
        let mut decoder = std::mem::replace(&mut self.decoder, MessageDecoder::new(0));
        let result = decoder.feed(data, &mut |unit| self.on_incoming(unit, now, link));
        self.decoder = decoder;
        if let Err(violation) = result {
            if self.phase == Phase::Open && self.held.is_none() {
                link.error(violation.reason);
                if link.app_behind() {
                    self.hold(HeldClose::Fail(violation.code, violation.reason), now);
                } else {
                    self.fail(violation.code, violation.reason, now, link);
                }
            } else if self.phase != Phase::Open {
                self.phase = Phase::Finishing;
            }
        }
    }

    fn on_incoming(&mut self, unit: Incoming, now: Instant, link: &mut impl Link) {
        if self.phase == Phase::Finishing || self.held.is_some() {
            return;
        }
        match unit {
            Incoming::Message(data) => {
                if self.phase == Phase::Open {
                    let answer = link.auto_response(&data);
                    link.count(if answer.is_some() { Unit::AutoResponses } else { Unit::MessagesIn });
                    match answer {
                        // Answered here: a hibernated object stays asleep.
                        Some(answer) => self.send_own(answer, now, link),
                        None => link.message(data),
                    }
                }
            }
            Incoming::Ping(data) => {
                link.count(Unit::ProtocolPings);
                self.send_own(frame::encode_pong(&data), now, link);
            }
            Incoming::Pong => {}
            Incoming::Close(status) => {
                if self.phase == Phase::Open && link.app_behind() {
                    // Replies to the messages before the Close may still come: answer it after.
                    self.hold(HeldClose::Echo(status), now);
                } else {
                    self.echo_close(status, now, link);
                }
            }
        }
    }

    /// Starts the closing handshake the application (or the server) asked for.
    pub fn close(&mut self, request: CloseRequest, now: Instant, link: &mut impl Link) {
        if self.phase != Phase::Open {
            return;
        }
        link.closing();
        if request.discard_unsent {
            // The send queue overflowed: the peer does not read, so waiting for its Close is
            // pointless. The frame in flight is finished, then our Close; the application hears
            // the 1008 whether or not the peer ever reads it.
            link.discard_unsent();
            self.held = None;
            self.fail(request.code, &request.reason, now, link);
            return;
        }
        self.send(frame::encode_close(Some((request.code, &request.reason))), link);
        self.decide(request.code, request.reason, false);
        self.enter(Phase::CloseSent, now);
    }

    /// Carries out the held Close: the application has handled the messages before it (or the
    /// close timeout passed).
    pub fn release_held(&mut self, now: Instant, link: &mut impl Link) {
        let Some(held) = self.held.take() else { return };
        self.phase_deadline = None;
        match *held {
            HeldClose::Fail(code, reason) => self.fail(code, reason, now, link),
            HeldClose::Echo(status) => self.echo_close(status, now, link),
        }
    }

    /// When [`Self::on_deadline`] must be called next, given the socket's limits. It may be
    /// called earlier (it then does nothing).
    #[must_use]
    pub fn deadline(&self, limits: &Limits) -> Option<Instant> {
        if let Some(at) = self.phase_deadline {
            return Some(at);
        }
        let idle = limits.idle_timeout.map(|idle| self.last_frame + idle);
        let keepalive = limits.ping_interval.and_then(|interval| {
            let ping_at = self.last_frame + interval;
            if self.ping_sent {
                limits.ping_timeout.map(|timeout| ping_at + timeout)
            } else {
                Some(ping_at)
            }
        });
        match (idle, keepalive) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Acts on the deadlines passed by `now`. Returns true when the connection must end now,
    /// without writing what is queued.
    pub fn on_deadline(&mut self, now: Instant, link: &mut impl Link) -> bool {
        if let Some(at) = self.phase_deadline {
            if now < at {
                return false;
            }
            if self.held.is_some() {
                // The application did not catch up in time: close without waiting longer.
                self.release_held(now, link);
                return false;
            }
            if self.phase == Phase::CloseSent {
                self.decide(close_code::ABNORMAL, "closing handshake timed out", false);
            }
            return true;
        }
        let limits = link.limits();
        let (idle, ping_interval, ping_timeout) =
            (limits.idle_timeout, limits.ping_interval, limits.ping_timeout);
        if idle.is_some_and(|idle| now >= self.last_frame + idle) {
            let reason = "idle timeout".into();
            self.close(
                CloseRequest { code: close_code::GOING_AWAY, reason, discard_unsent: false },
                now,
                link,
            );
            return false;
        }
        let Some(interval) = ping_interval else { return false };
        let ping_at = self.last_frame + interval;
        if self.ping_sent {
            if ping_timeout.is_some_and(|timeout| now >= ping_at + timeout) {
                // No byte since the Ping: the peer is gone or stuck. Close 1011; the application
                // hears 1006, as no Close came from the peer.
                link.closing();
                self.send(
                    frame::encode_close(Some((close_code::INTERNAL_ERROR, "keepalive ping timeout"))),
                    link,
                );
                self.decide(close_code::ABNORMAL, "keepalive ping timeout", false);
                self.enter(Phase::Finishing, now);
            }
        } else if self.phase == Phase::Open && now >= ping_at {
            self.ping_sent = true;
            link.count(Unit::ProtocolPings);
            self.send_own(frame::encode_ping(b"sockworker"), now, link);
        }
        false
    }

    /// Holds a Close back (and stops reading) until the application has handled what came
    /// before it, bounded by the close timeout.
    fn hold(&mut self, close: HeldClose, now: Instant) {
        self.held = Some(Box::new(close));
        self.phase_deadline = Some(now + CLOSE_TIMEOUT);
    }

    /// Answers the peer's Close (when we had not sent ours) and finishes.
    fn echo_close(&mut self, status: Option<(u16, String)>, now: Instant, link: &mut impl Link) {
        if self.phase == Phase::Open {
            link.closing();
            let echo = status.as_ref().map(|(code, reason)| (*code, reason.as_str()));
            self.send(frame::encode_close(echo), link);
        }
        let (code, reason) = status.unwrap_or((close_code::NO_STATUS, String::new()));
        self.decide(code, reason, true);
        self.enter(Phase::Finishing, now);
    }

    /// Fails the connection: sends our Close and ends without waiting for the peer's.
    fn fail(&mut self, code: u16, reason: &str, now: Instant, link: &mut impl Link) {
        link.closing();
        self.send(frame::encode_close(Some((code, reason))), link);
        self.decide(code, reason, false);
        self.enter(Phase::Finishing, now);
    }

    /// Sets what the Close event will report (a later decision replaces it).
    fn decide(&mut self, code: u16, reason: impl Into<String>, was_clean: bool) {
        self.outcome = Some(Box::new(Outcome { code, reason: reason.into(), was_clean }));
    }

    fn enter(&mut self, phase: Phase, now: Instant) {
        self.phase = phase;
        self.phase_deadline = Some(now + CLOSE_TIMEOUT);
    }

    /// Queues a frame the core answers on its own (a pong, an auto-response, a keepalive ping)
    /// under the send-queue limit like the application's: a peer that sends pings and never
    /// reads is closed with 1008 instead of growing the queue.
    fn send_own(&mut self, frame: Bytes, now: Instant, link: &mut impl Link) {
        if link.queued_cost() > link.limits().max_buffered_bytes {
            if self.phase == Phase::Open {
                link.closing();
                link.discard_unsent();
                self.fail(close_code::POLICY_VIOLATION, "send buffer limit exceeded", now, link);
            }
            return;
        }
        self.send(frame, link);
    }

    fn send(&self, frame: Bytes, link: &mut impl Link) {
        link.send(if self.client { frame::mask(&frame) } else { frame });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::QUEUED_FRAME_COST;

    /// A link over vectors. `app_behind` is what the test says: the messages given so far are
    /// unhandled until `handled` is set.
    #[derive(Default)]
    struct Recorder {
        limits: Limits,
        sent: Vec<Bytes>,
        messages: Vec<Payload>,
        errors: Vec<&'static str>,
        closing: bool,
        handled: bool,
        discarded: usize,
        pings: usize,
        /// Messages answered by the "object" with the same text, uppercased.
        auto_respond: Option<&'static [u8]>,
    }

    impl Link for Recorder {
        fn limits(&self) -> &Limits {
            &self.limits
        }
        fn send(&mut self, frame: Bytes) {
            self.sent.push(frame);
        }
        fn discard_unsent(&mut self) {
            self.discarded += self.sent.len();
            self.sent.clear();
        }
        fn queued_cost(&self) -> usize {
            self.sent.iter().map(|f| f.len() + QUEUED_FRAME_COST).sum()
        }
        fn closing(&mut self) {
            self.closing = true;
        }
        fn message(&mut self, data: Payload) {
            self.handled = false;
            self.messages.push(data);
        }
        fn error(&mut self, reason: &'static str) {
            self.errors.push(reason);
        }
        fn app_behind(&self) -> bool {
            !self.messages.is_empty() && !self.handled
        }
        fn auto_response(&mut self, message: &Payload) -> Option<Bytes> {
            let request = self.auto_respond?;
            (*message == Payload::Text(Bytes::from_static(request)))
                .then(|| frame::encode_message(true, &request.to_ascii_uppercase()))
        }
        fn count(&mut self, unit: Unit) {
            if unit == Unit::ProtocolPings {
                self.pings += 1;
            }
        }
    }

    /// A frame as a client sends it (masked), with a payload under 126 bytes.
    fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        assert!(payload.len() < 126);
        let mut out = vec![first, 0x80 | u8::try_from(payload.len()).unwrap(), 1, 2, 3, 4];
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ [1, 2, 3, 4][i % 4]));
        out
    }

    fn close_payload(code: u16, reason: &str) -> Vec<u8> {
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(reason.as_bytes());
        payload
    }

    /// The status of a Close frame we sent (unmasked, payload under 126 bytes).
    fn close_code_of(frame: &[u8]) -> u16 {
        assert_eq!(frame[0], 0x88, "a Close frame: {frame:?}");
        u16::from_be_bytes([frame[2], frame[3]])
    }

    fn server(now: Instant) -> Protocol {
        Protocol::new(false, 1 << 20, false, now)
    }

    /// A server-side protocol opened now, and its link.
    fn opened(limits: Limits) -> (Instant, Protocol, Recorder) {
        let now = Instant::now();
        (now, server(now), Recorder { limits, ..Recorder::default() })
    }

    fn text(data: &'static [u8]) -> Payload {
        Payload::Text(Bytes::from_static(data))
    }

    #[test]
    fn server_initiated_close_is_completed_by_the_peers_close() {
        let (now, mut protocol, mut link) = opened(Limits::default());
        let request = CloseRequest { code: 1000, reason: "bye".into(), discard_unsent: false };
        protocol.close(request, now, &mut link);
        assert_eq!(link.sent, [frame::encode_close(Some((1000, "bye")))]);
        assert!(link.closing);
        assert_eq!(protocol.phase(), Phase::CloseSent);
        assert_eq!(protocol.deadline(&link.limits), Some(now + CLOSE_TIMEOUT));

        // Messages that cross our Close are not delivered; the peer's Close is not echoed.
        protocol.receive_data(&masked(0x81, b"late"), now, &mut link);
        protocol.receive_data(&masked(0x88, &close_payload(1000, "ok")), now, &mut link);
        assert!(link.messages.is_empty());
        assert_eq!(link.sent.len(), 1, "no second Close");
        assert_eq!(protocol.phase(), Phase::Finishing, "what is queued is written, then EOF");
        // Nothing after the Close counts.
        protocol.receive_data(&masked(0x89, b"p"), now, &mut link);
        assert_eq!(link.sent.len(), 1);
        let outcome = Outcome { code: 1000, reason: "ok".into(), was_clean: true };
        assert_eq!(protocol.take_outcome(), outcome);
    }

    #[test]
    fn peer_initiated_close_is_echoed_with_its_code() {
        let (now, mut protocol, mut link) = opened(Limits::default());
        protocol.receive_data(&masked(0x88, &close_payload(4001, "x")), now, &mut link);
        assert_eq!(&link.sent[0][..], [0x88, 3, 0x0F, 0xA1, b'x']);
        assert!(link.closing);
        assert_eq!(protocol.phase(), Phase::Finishing);
        let outcome = Outcome { code: 4001, reason: "x".into(), was_clean: true };
        assert_eq!(protocol.take_outcome(), outcome);
    }

    #[test]
    fn close_without_status_is_echoed_empty_and_reported_1005() {
        let (now, mut protocol, mut link) = opened(Limits::default());
        protocol.receive_data(&masked(0x88, b""), now, &mut link);
        assert_eq!(&link.sent[0][..], [0x88, 0]);
        assert_eq!(protocol.take_outcome().code, close_code::NO_STATUS);
    }

    #[test]
    fn close_with_a_bad_code_fails_with_1002() {
        for code in [999, 1005, 1016, 5000] {
            let (now, mut protocol, mut link) = opened(Limits::default());
            protocol.receive_data(&masked(0x88, &close_payload(code, "")), now, &mut link);
            assert_eq!(link.sent.len(), 1);
            assert_eq!(close_code_of(&link.sent[0]), close_code::PROTOCOL_ERROR, "for {code}");
            assert_eq!(link.errors.len(), 1);
            let outcome = protocol.take_outcome();
            assert_eq!((outcome.code, outcome.was_clean), (close_code::PROTOCOL_ERROR, false));
        }
    }

    #[test]
    fn a_violation_after_valid_messages_waits_for_them_to_be_handled() {
        let (now, mut protocol, mut link) = opened(Limits::default());
        let mut bytes = masked(0x81, b"a");
        bytes.extend(masked(0x82, b"b"));
        bytes.extend([0x81, 0x01, b'c']); // unmasked: a violation
        protocol.receive_data(&bytes, now, &mut link);
        assert_eq!(link.messages, [text(b"a"), Payload::Binary(Bytes::from_static(b"b"))]);
        assert_eq!(link.errors.len(), 1, "the error is reported at once");
        assert!(link.sent.is_empty(), "the failing Close waits");
        assert!(protocol.is_holding());
        assert!(!link.closing, "replies to the messages may still be sent");
        assert_eq!(protocol.deadline(&link.limits), Some(now + CLOSE_TIMEOUT));
        // Whatever comes meanwhile is not read.
        protocol.receive_data(&masked(0x89, b"p"), now, &mut link);
        assert!(link.sent.is_empty());

        link.handled = true;
        link.send(frame::encode_message(true, b"reply"));
        protocol.release_held(now, &mut link);
        assert_eq!(link.sent.len(), 2);
        assert_eq!(close_code_of(&link.sent[1]), close_code::PROTOCOL_ERROR, "after the reply");
        assert_eq!(protocol.phase(), Phase::Finishing);
    }

    #[test]
    fn a_held_close_is_carried_out_at_its_deadline() {
        let (now, mut protocol, mut link) = opened(Limits::default());
        let mut bytes = masked(0x81, b"a");
        bytes.extend(masked(0x88, &close_payload(1000, "")));
        protocol.receive_data(&bytes, now, &mut link);
        assert!(protocol.is_holding() && link.sent.is_empty());
        assert!(!protocol.on_deadline(now + CLOSE_TIMEOUT, &mut link), "not the end yet: echo first");
        assert_eq!(link.sent, [frame::encode_close(Some((1000, "")))]);
        assert_eq!(protocol.phase(), Phase::Finishing);
    }

    #[test]
    fn ping_is_answered_with_a_pong() {
        let (now, mut protocol, mut link) = opened(Limits::default());
        protocol.receive_data(&masked(0x89, b"p"), now, &mut link);
        assert_eq!(&link.sent[0][..], [0x8A, 1, b'p']);
        assert_eq!(link.pings, 1);
        assert_eq!(protocol.phase(), Phase::Open);
    }

    #[test]
    fn the_client_masks_its_frames() {
        let now = Instant::now();
        let (mut protocol, mut link) = (Protocol::new(true, 1 << 20, false, now), Recorder::default());
        protocol.receive_data(&[0x89, 1, b'p'], now, &mut link);
        assert_eq!(link.sent[0][..2], [0x8A, 0x81], "a masked pong");
    }

    #[test]
    fn own_frames_past_the_send_limit_fail_with_1008() {
        let (now, mut protocol, mut link) = opened(Limits { max_buffered_bytes: 100, ..Limits::default() });
        let pings: Vec<u8> = (0..3).flat_map(|_| masked(0x89, b"p")).collect();
        protocol.receive_data(&pings, now, &mut link);
        assert_eq!(link.discarded, 2, "the pongs never read are dropped");
        assert_eq!(link.sent.len(), 1);
        assert_eq!(close_code_of(&link.sent[0]), close_code::POLICY_VIOLATION);
    }

    #[test]
    fn auto_responses_answer_without_the_application() {
        let (now, mut protocol, mut link) = opened(Limits::default());
        link.auto_respond = Some(b"ping");
        protocol.receive_data(&masked(0x81, b"ping"), now, &mut link);
        protocol.receive_data(&masked(0x81, b"other"), now, &mut link);
        assert_eq!(link.sent, [frame::encode_message(true, b"PING")]);
        assert_eq!(link.messages, [text(b"other")]);
    }

    #[test]
    fn close_handshake_times_out_as_1006() {
        let (now, mut protocol, mut link) = opened(Limits::default());
        let request = CloseRequest { code: 1000, reason: String::new(), discard_unsent: false };
        protocol.close(request, now, &mut link);
        let at = protocol.deadline(&link.limits).unwrap();
        assert_eq!(at, now + CLOSE_TIMEOUT);
        assert!(!protocol.on_deadline(at - Duration::from_millis(1), &mut link), "early: nothing");
        assert!(protocol.on_deadline(at, &mut link), "the connection is dropped");
        let outcome = protocol.take_outcome();
        assert_eq!((outcome.code, outcome.reason.as_str()), (1006, "closing handshake timed out"));
    }

    #[test]
    fn keepalive_pings_then_fails_without_an_answer() {
        let (interval, timeout) = (Duration::from_secs(10), Duration::from_secs(5));
        let limits =
            Limits { ping_interval: Some(interval), ping_timeout: Some(timeout), ..Limits::default() };
        let (now, mut protocol, mut link) = opened(limits);
        assert_eq!(protocol.deadline(&link.limits), Some(now + interval));
        assert!(!protocol.on_deadline(now + interval, &mut link));
        assert_eq!(link.sent, [frame::encode_ping(b"sockworker")]);
        assert_eq!(protocol.deadline(&link.limits), Some(now + interval + timeout));

        // Any byte answers it and moves the next Ping.
        let later = now + interval + Duration::from_secs(1);
        protocol.receive_data(&masked(0x8A, b""), later, &mut link);
        assert_eq!(protocol.deadline(&link.limits), Some(later + interval));

        assert!(!protocol.on_deadline(later + interval, &mut link));
        assert!(!protocol.on_deadline(later + interval + timeout, &mut link));
        assert_eq!(close_code_of(&link.sent[2]), close_code::INTERNAL_ERROR);
        assert_eq!(protocol.phase(), Phase::Finishing);
        assert_eq!(protocol.take_outcome().code, close_code::ABNORMAL, "no Close came from the peer");
    }

    #[test]
    fn idle_timeout_closes_with_1001() {
        let (now, mut protocol, mut link) =
            opened(Limits { idle_timeout: Some(Duration::from_secs(30)), ..Limits::default() });
        assert!(!protocol.on_deadline(now + Duration::from_secs(30), &mut link));
        assert_eq!(close_code_of(&link.sent[0]), close_code::GOING_AWAY);
        assert_eq!(protocol.phase(), Phase::CloseSent);
    }

    #[test]
    fn invalid_utf8_in_a_fragment_fails_with_1007_at_once() {
        let (now, mut protocol, mut link) = opened(Limits::default());
        // "κ" whole, then the start of a three-byte sequence that the next fragment breaks.
        protocol.receive_data(&masked(0x01, &[0xCE, 0xBA, 0xE1]), now, &mut link);
        assert!(link.sent.is_empty());
        protocol.receive_data(&masked(0x00, &[0xFF]), now, &mut link);
        assert!(link.messages.is_empty());
        assert_eq!(close_code_of(&link.sent[0]), close_code::INVALID_PAYLOAD, "before the last fragment");
        assert_eq!(protocol.take_outcome().code, close_code::INVALID_PAYLOAD);
    }

    #[test]
    fn overflow_close_discards_what_is_unsent() {
        let (now, mut protocol, mut link) = opened(Limits::default());
        link.send(frame::encode_message(true, b"never read"));
        let reason = "send buffer limit exceeded".into();
        protocol.close(CloseRequest { code: 1008, reason, discard_unsent: true }, now, &mut link);
        assert_eq!(link.discarded, 1);
        assert_eq!(close_code_of(&link.sent[0]), close_code::POLICY_VIOLATION);
        assert_eq!(protocol.phase(), Phase::Finishing, "the peer's Close is not awaited");
    }
}
