//! The HTTP/1 hygiene scanner over arbitrary bytes, split at arbitrary points: never
//! panics; how the bytes are split across reads never changes the verdict (the same
//! refusal or none); what passes to the parser is a prefix of the input — all of it when
//! nothing is refused — and with a split never less than fed whole.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshward_proxy::fuzzing::hygiene_pieces;

fuzz_target!(|data: &[u8]| {
    // The first byte seeds the cut points; the rest is the connection's bytes.
    let Some((&seed, input)) = data.split_first() else {
        return;
    };
    let (whole, verdict) = hygiene_pieces(&[input]);
    assert!(input.starts_with(&whole));
    if verdict.is_none() {
        assert_eq!(whole, input);
    }
    // Cuts every `step` bytes (1 = byte by byte), and one cut at every point for short inputs.
    let step = usize::from(seed % 16) + 1;
    let pieces: Vec<&[u8]> = input.chunks(step).collect();
    let (passed, split_verdict) = hygiene_pieces(&pieces);
    assert_eq!(split_verdict, verdict, "split every {step} bytes");
    assert!(input.starts_with(&passed));
    assert!(passed.len() >= whole.len());
    if input.len() <= 256 {
        for cut in 1..input.len() {
            let (a, b) = input.split_at(cut);
            let (passed, split_verdict) = hygiene_pieces(&[a, b]);
            assert_eq!(split_verdict, verdict, "cut at {cut}");
            assert!(input.starts_with(&passed));
        }
    }
});
