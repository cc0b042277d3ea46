//! Path normalization: never panics; what it returns is normalized (a
//! second pass borrows it unchanged), starts with `/`, has no empty, `.` or
//! `..` segment and no encoded separator or `%`.
#![no_main]

use std::borrow::Cow;

use agent_budget_tower::path::normalize;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|path: &str| {
    let Ok(normalized) = normalize(path) else {
        return;
    };
    assert!(normalized.starts_with('/'), "{path:?} -> {normalized:?}");
    assert!(
        matches!(normalize(&normalized), Ok(Cow::Borrowed(p)) if p == normalized),
        "{path:?} -> {normalized:?} is not stable"
    );
    let body = normalized.strip_suffix('/').unwrap_or(&normalized);
    for segment in body.split('/').skip(1) {
        assert!(
            !segment.is_empty() || body.is_empty(),
            "{path:?} -> {normalized:?}"
        );
        assert!(
            segment != "." && segment != "..",
            "{path:?} -> {normalized:?}"
        );
    }
    let upper = normalized.to_ascii_uppercase();
    for banned in ["%2F", "%5C", "%25", "\\"] {
        assert!(!upper.contains(banned), "{path:?} -> {normalized:?}");
    }
});
