//! The workspace README shows this crate's README example; only the
//! latter is compiled (the root README's doc tests belong to the core
//! crate, which does not depend on axum), so the two must stay identical.

fn example(readme: &str, fence: &str) -> String {
    let start = readme
        .find(fence)
        .unwrap_or_else(|| panic!("no {fence:?} block"))
        + fence.len();
    let end = start + readme[start..].find("\n```").expect("the block ends");
    readme[start..end].trim().to_owned()
}

#[test]
fn the_workspace_readme_shows_the_tested_axum_example() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let ours = std::fs::read_to_string(format!("{dir}/README.md")).unwrap();
    let root = std::fs::read_to_string(format!("{dir}/../README.md")).unwrap();
    assert_eq!(
        example(&root, "```rs\n"),
        example(&ours, "```rust,no_run\n")
    );
}
