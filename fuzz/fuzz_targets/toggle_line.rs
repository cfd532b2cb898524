//! Fuzz the toggle service's line parser: any bytes a guest or a network client can
//! send. It must never panic, never accept an over-long or non-text line, only ever
//! yield well-formed profile names, and its replies must stay one line.
#![no_main]

// The parser is std + thiserror only; including the file keeps this target from
// building all of usbroute (tokio, clap, the id databases) with coverage instrumentation.
#[path = "../../src/toggle/protocol.rs"]
#[allow(dead_code, missing_docs)]
mod protocol;

use libfuzzer_sys::fuzz_target;
use protocol::{is_profile_name, parse_line, ParseError, Reply, Request, MAX_LINE};

fuzz_target!(|data: &[u8]| {
    match parse_line(data) {
        Ok(Some(Request::Profile(name))) => assert!(is_profile_name(&name)),
        Ok(Some(Request::Auth(secret))) => {
            assert!(!secret.is_empty() && secret.bytes().all(|b| b.is_ascii_graphic()))
        }
        Ok(_) => {}
        Err(ParseError::TooLong) => assert!(data.len() > MAX_LINE),
        Err(e) => {
            let line = Reply::Err(e.to_string()).to_string();
            assert!(!line.contains('\n') && !line.contains('\r'));
        }
    }
    if let Ok(Some(_)) = parse_line(data) {
        assert!(data.len() <= MAX_LINE + 2);
    }
});
