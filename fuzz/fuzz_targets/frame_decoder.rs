//! The frame decoder with message assembly, the UTF-8 checks and (with permessage-deflate)
//! inflation, fed the same bytes whole and cut into pieces: both must give the same messages and the same verdict (the incremental
//! checks of partial frames and fragments must agree with the whole-message ones), text must be
//! valid UTF-8, and an idle decoder must hold no buffer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sockworker_core::frame::{Incoming, MessageDecoder};
use sockworker_core::Payload;

fn decode(from_server: bool, inflate: bool, pieces: &[&[u8]]) -> (Vec<Incoming>, Option<u16>, usize) {
    let max = 4096;
    let mut decoder = match (from_server, inflate) {
        (true, _) => MessageDecoder::for_client(max),
        (false, false) => MessageDecoder::new(max),
        // permessage-deflate negotiated: RSV1 messages are inflated (bounded by `max`).
        (false, true) => MessageDecoder::new(max).with_inflate(),
    };
    let mut got = Vec::new();
    for piece in pieces {
        if let Err(violation) = decoder.feed(piece, &mut |unit| got.push(unit)) {
            return (got, Some(violation.code), 0);
        }
    }
    (got, None, decoder.held_capacity())
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, data)) = data.split_first() else { return };
    let from_server = control & 1 == 1;
    let inflate = control & 2 == 2;
    // Cut into pieces of 1 to 16 bytes, sized by the control byte's high bits.
    let step = usize::from(control >> 4) + 1;
    let pieces: Vec<&[u8]> = data.chunks(step).collect();
    let (whole, whole_error, whole_held) = decode(from_server, inflate, &[data]);
    let (cut, cut_error, cut_held) = decode(from_server, inflate, &pieces);
    for unit in whole.iter().chain(&cut) {
        if let Incoming::Message(Payload::Text(text)) = unit {
            assert!(std::str::from_utf8(text).is_ok(), "a text message that is not UTF-8");
        }
    }
    // A violation may be found earlier when cut (invalid text in a partial frame): the verdict
    // is the same, and what came before it too.
    assert_eq!(whole_error, cut_error, "whole and cut disagree");
    if whole_error.is_none() {
        assert_eq!(whole, cut);
        assert_eq!(whole_held == 0, cut_held == 0);
    } else {
        assert!(cut.len() <= whole.len() && whole[..cut.len()] == cut[..]);
    }
});
