//! The YAML loader must never panic, whatever the bytes, and every diagnostic must point
//! inside the input.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let lines = meshward_policy::yaml::lines(text).len().max(1) as u32;
    let loaded = meshward_policy::load_sources(vec![(Arc::from("fuzz.yaml"), Arc::from(text))]);
    for d in &loaded.diagnostics {
        assert!(d.line <= lines + 1, "diagnostic line {} beyond input ({} lines): {d:?}", d.line, lines);
    }
    if let Some(set) = &loaded.set {
        let _ = meshward_policy::lint::lint(set, std::time::SystemTime::UNIX_EPOCH);
        let _ = meshward_policy::engine::Engine::compile(set);
    }
});
