//! Static proof about the compiled kernels, no GPU needed (DESIGN.md §8 "Static"):
//! - ptxas: zero spill bytes and zero stack frame for every kernel on every SASS arch;
//! - SASS (cuobjdump): 128-bit global loads (`LDG.E.128`) in the memory-bound kernels (names with
//!   `dequantize` or `gemv`) and tensor-core instructions (`HMMA`) in the GEMM kernels (names with
//!   `gemm`), on every arch.
//!
//! Prints the report as a table (`cargo test -p qadapt-kernels --test static_report -- --nocapture`).
//! Without nvcc the kernels are not compiled and there is nothing to inspect: the test then fails
//! under `QADAPT_REQUIRE_CUDA=1` (CI) and says so otherwise.

use std::collections::BTreeMap;
use std::process::Command;

use qadapt_kernels::{ARCHS, COMPILED, KERNELS, MODULES};

#[derive(Debug, Default, Clone)]
struct Ptxas {
    registers: u32,
    stack: u32,
    spill_stores: u32,
    spill_loads: u32,
}

fn number_before(line: &str, word: &str) -> Option<u32> {
    let i = line.find(word)?;
    line[..i].split_whitespace().last()?.parse().ok()
}

/// (kernel, arch) -> ptxas figures, from the `-v` output.
fn parse_ptxas(report: &str) -> BTreeMap<(String, String), Ptxas> {
    let mut out = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in report.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let mut parts = rest.split('\'');
            let name = parts.next().unwrap_or_default().to_string();
            let arch = parts.nth(1).unwrap_or_default().to_string();
            current = Some((name, arch));
            continue;
        }
        let Some(key) = current.clone() else { continue };
        let e: &mut Ptxas = out.entry(key).or_default();
        if line.contains("bytes stack frame") {
            e.stack = number_before(line, "bytes stack frame").unwrap_or(u32::MAX);
            e.spill_stores = number_before(line, "bytes spill stores").unwrap_or(u32::MAX);
            e.spill_loads = number_before(line, "bytes spill loads").unwrap_or(u32::MAX);
        }
        if line.contains("Used") && line.contains("registers") {
            e.registers = number_before(line, "registers").unwrap_or(0);
        }
    }
    out
}

/// (kernel, arch) -> SASS text, from `cuobjdump -sass`.
fn sass(fatbin: &[u8]) -> BTreeMap<(String, String), String> {
    let Some(tool) = option_env!("QADAPT_CUOBJDUMP") else {
        panic!("cuobjdump was not found at build time; run `just setup`");
    };
    let dir = std::env::temp_dir().join(format!("qadapt-sass-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("module.fatbin");
    std::fs::write(&path, fatbin).unwrap();
    let out = Command::new(tool)
        .arg("-sass")
        .arg(&path)
        .output()
        .expect("run cuobjdump");
    assert!(
        out.status.success(),
        "cuobjdump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut map = BTreeMap::new();
    let mut arch = String::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        let l = line.trim();
        if let Some(a) = l.strip_prefix("arch = ") {
            arch = a.trim().to_string();
        } else if let Some(f) = l.strip_prefix("Function : ") {
            current = Some((f.trim().to_string(), arch.clone()));
        } else if let Some(k) = &current {
            let s: &mut String = map.entry(k.clone()).or_default();
            s.push_str(l);
            s.push('\n');
        }
    }
    map
}

#[test]
fn kernels_do_not_spill_and_use_the_instructions_we_claim() {
    if !COMPILED {
        assert!(
            std::env::var("QADAPT_REQUIRE_CUDA").as_deref() != Ok("1"),
            "QADAPT_REQUIRE_CUDA=1 but the kernels were not compiled"
        );
        eprintln!("kernels not compiled (no nvcc at build time): nothing to inspect");
        return;
    }
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for m in MODULES {
        let ptxas = parse_ptxas(m.ptxas_report);
        let sass = sass(m.fatbin);
        for k in KERNELS.iter().filter(|k| k.module == m.name) {
            for arch in ARCHS {
                let p = ptxas.get(&(k.name.to_string(), arch.to_string()));
                let Some(p) = p else {
                    failures.push(format!("{} {arch}: no ptxas entry", k.name));
                    continue;
                };
                if p.stack != 0 || p.spill_stores != 0 || p.spill_loads != 0 {
                    failures.push(format!(
                        "{} {arch}: stack {} spills {}/{}",
                        k.name, p.stack, p.spill_stores, p.spill_loads
                    ));
                }
                let code = sass
                    .get(&(k.name.to_string(), arch.to_string()))
                    .map(String::as_str)
                    .unwrap_or("");
                if code.is_empty() {
                    failures.push(format!("{} {arch}: no SASS", k.name));
                }
                let ldg128 = code.contains("LDG.E.128");
                let hmma = code.contains("HMMA") || code.contains("HGMMA");
                if (k.name.contains("dequantize") || k.name.contains("gemv")) && !ldg128 {
                    failures.push(format!(
                        "{} {arch}: no 128-bit global load (LDG.E.128)",
                        k.name
                    ));
                }
                if k.name.contains("gemm") && !hmma {
                    failures.push(format!(
                        "{} {arch}: no tensor-core instruction (HMMA)",
                        k.name
                    ));
                }
                rows.push(format!(
                    "| {:<28} | {:<5} | {:>4} | {:>5} | {:>6} | {:<8} | {:<4} |",
                    k.name,
                    arch,
                    p.registers,
                    p.stack,
                    p.spill_stores + p.spill_loads,
                    if ldg128 { "yes" } else { "no" },
                    if hmma { "yes" } else { "no" }
                ));
            }
        }
    }
    println!(
        "| {:<28} | {:<5} | {:>4} | {:>5} | {:>6} | {:<8} | {:<4} |",
        "kernel", "arch", "regs", "stack", "spills", "LDG.128", "HMMA"
    );
    println!(
        "|{:-<30}|{:-<7}|{:-<6}|{:-<7}|{:-<8}|{:-<10}|{:-<6}|",
        "", "", "", "", "", "", ""
    );
    for r in &rows {
        println!("{r}");
    }
    assert!(
        failures.is_empty(),
        "static checks failed:\n{}",
        failures.join("\n")
    );
}
