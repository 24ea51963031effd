//! Static proof about the compiled kernels, no GPU needed (BENCHMARKS.md, Goals):
//! - ptxas: zero spill bytes and zero stack frame for every kernel on every SASS arch;
//! - SASS (cuobjdump): no local memory (`LDL`/`STL`) anywhere, 128-bit global loads (`LDG.E.128`)
//!   in the memory-bound kernels (names with `dequantize` or `gemv`) and tensor-core instructions
//!   (`HMMA`) in the GEMM kernels (names with `gemm`), on every arch, and the warpgroup MMA
//!   (`HGMMA`) in the sm_90a GEMM kernels;
//! - per kernel and arch, the instruction mix of its hot loop: of the loops (a backward branch and
//!   its target) that hold `HMMA` but no inner loop with `HMMA`, the one with the most `HMMA`
//!   (among equals the fewest scalar global loads, then the shortest: the vector path, not the
//!   element-load variant for ragged shapes or the short LoRA extension); without `HMMA`, the
//!   longest innermost loop. Counts are static: cold edge code inside the loop counts too. Columns: instructions, `HMMA`, `LDSM` (ldmatrix), other shared loads and stores,
//!   global loads (`LDG`, `LDGSTS` = cp.async), float and integer/other ALU, barriers, and
//!   instructions per `HMMA`: what the main loop spends around each tensor-core instruction.
//!   `HMMA` counts a warp's m16n8k16 products: an `HGMMA.64xNx16` (issued by the 4 warps of a
//!   warpgroup, each owning 16 of its 64 rows) counts as N / 8, so the sm_90a kernels' instructions
//!   per `HMMA` compare with the mma.sync kernels' (issue slots per unit of tensor work).
//!
//! Prints the report as a table (`cargo test -p qadapt-kernels --test static_report -- --nocapture`).
//! Without nvcc the kernels are not compiled and there is nothing to inspect: the test then fails
//! under `QADAPT_REQUIRE_CUDA=1` (CI) and says so otherwise.

use std::collections::BTreeMap;
use std::process::Command;

use qadapt_kernels::{COMPILED, KERNELS, MODULES};

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
/// The instruction mix of one loop body.
#[derive(Debug, Default, Clone, PartialEq)]
struct LoopMix {
    total: u32,
    hmma: u32,
    ldsm: u32,
    lds: u32,
    sts: u32,
    ldg: u32,
    /// Scalar global loads (`LDG` narrower than 128 bits): element-by-element tile loads.
    ldg_scalar: u32,
    fp: u32,
    alu: u32,
    bar: u32,
}

/// `(address, opcode)` of every instruction in cuobjdump's listing of one function, and the
/// branch target of each `BRA`.
fn instructions(code: &str) -> Vec<(u64, String, Option<u64>)> {
    let mut out = Vec::new();
    for line in code.lines() {
        let Some(rest) = line.trim().strip_prefix("/*") else {
            continue;
        };
        let Some((addr, body)) = rest.split_once("*/") else {
            continue;
        };
        let Ok(addr) = u64::from_str_radix(addr.trim(), 16) else {
            continue;
        };
        let body = body.split(';').next().unwrap_or("").trim();
        let mut toks = body.split_whitespace();
        let mut op = toks.next().unwrap_or("");
        if op.starts_with('@') {
            op = toks.next().unwrap_or("");
        }
        if op.is_empty() {
            continue;
        }
        let target = (op == "BRA")
            .then(|| body.rsplit([' ', ',']).next())
            .flatten()
            .and_then(|t| t.strip_prefix("0x"))
            .and_then(|t| u64::from_str_radix(t, 16).ok());
        out.push((addr, op.to_string(), target));
    }
    out
}

fn classify(ops: &[&str]) -> LoopMix {
    let mut m = LoopMix::default();
    for op in ops {
        let base = op.split('.').next().unwrap_or(op);
        m.total += 1;
        match base {
            "HMMA" => m.hmma += 1,
            // HGMMA.64xNx16 of a warpgroup: each of its 4 warps issues it and owns 16 of the 64
            // rows, a share of N / 8 m16n8k16 products.
            "HGMMA" => {
                m.hmma += op
                    .split('.')
                    .nth(1)
                    .and_then(|shape| shape.strip_prefix("64x"))
                    .and_then(|rest| rest.split('x').next())
                    .and_then(|n| n.parse::<u32>().ok())
                    .map_or(1, |n| n / 8)
            }
            "LDSM" => m.ldsm += 1,
            "LDS" => m.lds += 1,
            "STS" => m.sts += 1,
            "LDG" | "LDGSTS" | "LDGDEPBAR" => {
                m.ldg += 1;
                if base == "LDG" && !op.contains(".128") {
                    m.ldg_scalar += 1;
                }
            }
            "BAR" | "DEPBAR" => m.bar += 1,
            b if b.starts_with('F')
                || b.starts_with("HF")
                || b.starts_with("HADD")
                || b.starts_with("HMUL") =>
            {
                m.fp += 1
            }
            _ => m.alu += 1,
        }
    }
    m
}

/// The hot loop of a function (see the module comment); `None` without a loop.
fn hot_loop(code: &str) -> Option<LoopMix> {
    let ins = instructions(code);
    let loops: Vec<(u64, u64)> = ins
        .iter()
        .filter_map(|(a, _, t)| t.filter(|t| t <= a).map(|t| (t, *a)))
        .collect();
    let mix = |(s, e): (u64, u64)| {
        let ops: Vec<&str> = ins
            .iter()
            .filter(|(a, _, _)| s <= *a && *a <= e)
            .map(|(_, o, _)| o.as_str())
            .collect();
        classify(&ops)
    };
    let mixes: Vec<((u64, u64), LoopMix)> = loops.iter().map(|&l| (l, mix(l))).collect();
    let inside =
        |(s, e): (u64, u64), (s2, e2): (u64, u64)| (s2, e2) != (s, e) && s <= s2 && e2 <= e;
    // With HMMA: the loops holding HMMA that hold no inner loop with HMMA (a main loop may hold
    // element-load loops for ragged edges; a loop around it is not the hot one). The most HMMA;
    // among loops with as many, the fewest scalar global loads, then the shortest: a main loop is
    // compiled twice, its vector path and an element-load path for ragged shapes, and the short
    // LoRA extension loops load element by element too.
    let with_hmma = mixes
        .iter()
        .filter(|(l, m)| m.hmma > 0 && !mixes.iter().any(|(l2, m2)| m2.hmma > 0 && inside(*l, *l2)))
        .max_by_key(|(_, m)| (m.hmma, -i64::from(m.ldg_scalar), -i64::from(m.total)));
    if let Some((_, m)) = with_hmma {
        return Some(m.clone());
    }
    // Without HMMA: the longest innermost loop.
    mixes
        .iter()
        .filter(|(l, _)| !loops.iter().any(|l2| inside(*l, *l2)))
        .max_by_key(|(_, m)| m.total)
        .map(|(_, m)| m.clone())
}

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
            for arch in m.archs() {
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
                if code.contains("LDL") || code.contains("STL") {
                    failures.push(format!("{} {arch}: local memory (LDL/STL) in SASS", k.name));
                }
                let mix = hot_loop(code).unwrap_or_default();
                let per_hmma = if mix.hmma == 0 {
                    "-".to_owned()
                } else {
                    format!("{:.1}", f64::from(mix.total) / f64::from(mix.hmma))
                };
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
                // The sm_90a kernels exist for the warpgroup MMA: mma.sync there would be a
                // regression to the sm_80 path.
                if *arch == "sm_90a" && k.name.contains("gemm") && !code.contains("HGMMA") {
                    failures.push(format!("{} {arch}: no warpgroup MMA (HGMMA)", k.name));
                }
                rows.push(format!(
                    "| {:<28} | {:<5} | {:>4} | {:>5} | {:>6} | {:<8} | {:<4} | {:>5} | {:>4} | {:>4} | {:>4} | {:>4} | {:>4} | {:>4} | {:>4} | {:>3} | {:>9} |",
                    k.name,
                    arch,
                    p.registers,
                    p.stack,
                    p.spill_stores + p.spill_loads,
                    if ldg128 { "yes" } else { "no" },
                    if hmma { "yes" } else { "no" },
                    mix.total,
                    mix.hmma,
                    mix.ldsm,
                    mix.lds,
                    mix.sts,
                    mix.ldg,
                    mix.fp,
                    mix.alu,
                    mix.bar,
                    per_hmma,
                ));
            }
        }
    }
    println!(
        "| {:<28} | {:<5} | {:>4} | {:>5} | {:>6} | {:<8} | {:<4} | {:>5} | {:>4} | {:>4} | {:>4} | {:>4} | {:>4} | {:>4} | {:>4} | {:>3} | {:>9} |",
        "kernel",
        "arch",
        "regs",
        "stack",
        "spills",
        "LDG.128",
        "HMMA",
        "loop",
        "HMMA",
        "LDSM",
        "LDS",
        "STS",
        "LDG",
        "FP",
        "ALU",
        "BAR",
        "per HMMA"
    );
    println!(
        "|{:-<30}|{:-<7}|{:-<6}|{:-<7}|{:-<8}|{:-<10}|{:-<6}|{:-<7}|{:-<6}|{:-<6}|{:-<6}|{:-<6}|{:-<6}|{:-<6}|{:-<6}|{:-<5}|{:-<11}|",
        "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", ""
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

#[test]
fn hot_loop_finds_the_innermost_loop_with_the_most_hmma() {
    // An outer loop (0x10..0xe0) around three inner ones: 0x20..0x40 with one HMMA, 0x50..0x80
    // with two in 4 instructions, 0x90..0xd0 with two in 5 (the "element-load variant"). The
    // second is the hot loop. Predicated and forward branches count as what they are.
    let code = "\
        /*0010*/ MOV R1, R2 ;\n\
        /*0020*/ HMMA.16816.F32.BF16 R4, R8, R12, R4 ;\n\
        /*0030*/ LDS R5, [R6] ;\n\
        /*0040*/ @P0 BRA 0x20 ;\n\
        /*0050*/ HMMA.16816.F32.BF16 R4, R8, R12, R4 ;\n\
        /*0060*/ @!P1 BRA 0x70 ;\n\
        /*0070*/ HMMA.16816.F32.BF16 R4, R8, R12, R4 ;\n\
        /*0080*/ @P2 BRA P3, 0x50 ;\n\
        /*0090*/ HMMA.16816.F32.BF16 R4, R8, R12, R4 ;\n\
        /*00a0*/ LDG.E R5, [R6.64] ;\n\
        /*00b0*/ HMMA.16816.F32.BF16 R4, R8, R12, R4 ;\n\
        /*00c0*/ FMUL R5, R5, R5 ;\n\
        /*00d0*/ @P2 BRA 0x90 ;\n\
        /*00e0*/ BRA 0x10 ;\n\
        /*00f0*/ EXIT ;\n";
    let m = hot_loop(code).unwrap();
    assert_eq!((m.total, m.hmma, m.alu, m.lds, m.ldg), (4, 2, 2, 0, 0));
    assert_eq!(hot_loop("/*0000*/ EXIT ;\n"), None);
    // Without HMMA the longest innermost loop.
    let m = hot_loop("/*0000*/ LDS R1, [R2] ;\n/*0010*/ @P0 BRA 0x0 ;\n/*0020*/ FADD R1, R1, R1 ;\n/*0030*/ STS [R2], R1 ;\n/*0040*/ @P1 BRA 0x20 ;\n").unwrap();
    assert_eq!((m.total, m.fp, m.sts, m.lds), (3, 1, 1, 0));
}
