//! `src/ffi.rs` is bindgen's output for `kernels/include/qadapt.h`, committed so that building the
//! crate needs no libclang. This test regenerates it and fails when the committed file is stale;
//! `just bindings` (`QADAPT_BLESS_BINDINGS=1`) writes the fresh output instead.
//!
//! bindgen loads libclang at run time. Without it the test cannot check anything: it fails when
//! `QADAPT_REQUIRE_CUDA=1` (set by `just test` and CI, whose `just setup` installs libclang) and
//! otherwise says on stderr that it checked nothing.

use std::path::PathBuf;

/// The one place the binding options live: the argument structs, enums and constants of the ABI
/// header, no functions (kernels are looked up by name, not linked), with layout tests so a Rust
/// struct that drifts from its C twin fails `cargo test`.
fn generate(header: &str) -> Result<String, String> {
    let bindings = bindgen::Builder::default()
        .header(header)
        .allowlist_type("Qadapt.*")
        .allowlist_var("QADAPT_.*")
        .blocklist_function(".*")
        .rustified_enum("QadaptDtype")
        .derive_default(true)
        .derive_debug(true)
        .derive_copy(true)
        .layout_tests(true)
        .generate()
        .map_err(|e| e.to_string())?;
    Ok(bindings.to_string())
}

#[test]
fn committed_bindings_match_the_header() {
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let header = crate_dir.join("../../kernels/include/qadapt.h");
    let committed_path = crate_dir.join("src/ffi.rs");
    if !clang_present() {
        let msg = "libclang not found: the committed bindings (src/ffi.rs) were not checked against \
                   kernels/include/qadapt.h. Run `just setup` to install it.";
        assert!(
            std::env::var("QADAPT_REQUIRE_CUDA").as_deref() != Ok("1"),
            "QADAPT_REQUIRE_CUDA=1: {msg}"
        );
        eprintln!("NOT CHECKED: {msg}");
        return;
    }
    let fresh = generate(&header.to_string_lossy()).expect("bindgen on qadapt.h");
    if std::env::var("QADAPT_BLESS_BINDINGS").as_deref() == Ok("1") {
        std::fs::write(&committed_path, &fresh).expect("write src/ffi.rs");
        return;
    }
    let committed = std::fs::read_to_string(&committed_path).expect("read src/ffi.rs");
    if committed != fresh {
        let line = committed
            .lines()
            .zip(fresh.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(committed.lines().count().min(fresh.lines().count()));
        panic!(
            "src/ffi.rs is stale: it differs from bindgen's output for kernels/include/qadapt.h \
             from line {} on (committed: {:?}, fresh: {:?}). Run `just bindings` and commit it.",
            line + 1,
            committed.lines().nth(line),
            fresh.lines().nth(line)
        );
    }
}

/// Whether bindgen can load libclang. Its `runtime` feature loads the library on first use and
/// panics when there is none, so the probe runs under `catch_unwind`.
fn clang_present() -> bool {
    std::panic::catch_unwind(bindgen::clang_version).is_ok_and(|v| v.parsed.is_some())
}
