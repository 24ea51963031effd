//! The CUDA kernels of `kernels/nf4.cu` and `kernels/optim.cu`, run on the CPU through the
//! emulation shim `kernels/emu/cuda_emu.h` (every CTA's threads as host threads, real barriers and
//! shuffles), compared with the Rust CPU reference bit for bit. This checks the kernels' indexing,
//! tails, packing, reductions and rounding without a GPU; the GPU tests check the same on the
//! device. Needs a C++20 compiler (`c++`); under `QADAPT_REQUIRE_CUDA=1` (CI) its absence fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use half::{bf16, f16};
use qadapt::nf4::{Nf4Tensor, Scales, Statistics, dynamic_map::DQ_MAP};
use qadapt::optim::{AdamW, adamw_cpu, sum_squares_cpu};
use qadapt::{DType, Device, FloatVec};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A line `name: flags` of `kernels/emu/emu.flags`, the one place that spells the emulation
/// builds' flags (also read by the virtual device's build.rs and `vgpu_mutants.sh`).
fn emu_flags(name: &str) -> Vec<String> {
    let text = std::fs::read_to_string(root().join("kernels/emu/emu.flags")).unwrap();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("kernels/emu/emu.flags has no `{name}:` line"));
    line.split_whitespace().map(str::to_owned).collect()
}

/// The host C++ compiler with the flags of every emulation build (`common:` of emu.flags: C++20,
/// no FMA contraction), the emulated CUDA headers of `kernels/emu` before `kernels/include`, and
/// for objects holding kernel code (`kernel`) the memory checker's instrumentation (`memcheck:`),
/// never given to `vgpu_runtime.cpp`.
fn emu_cxx(kernel: bool) -> Command {
    let r = root();
    let mut cmd = Command::new(std::env::var("CXX").unwrap_or_else(|_| "c++".into()));
    cmd.args(emu_flags("common"));
    if kernel {
        cmd.args(emu_flags("memcheck"));
    }
    cmd.arg("-I")
        .arg(r.join("kernels/emu"))
        .arg("-I")
        .arg(r.join("kernels/include"));
    cmd
}

/// Runs a compile or link command; None when no C++ compiler is present (fatal under
/// QADAPT_REQUIRE_CUDA=1), a panic naming `what` when it fails.
fn build(mut cmd: Command, what: &str) -> Option<()> {
    match cmd.output() {
        Ok(o) if o.status.success() => Some(()),
        Ok(o) => panic!(
            "{what} does not build:\n{}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => {
            let required = std::env::var("QADAPT_REQUIRE_CUDA").as_deref() == Ok("1");
            assert!(
                !required,
                "QADAPT_REQUIRE_CUDA=1 but no C++ compiler to emulate kernels: {e}"
            );
            eprintln!("no C++ compiler ({e}): kernel emulation skipped");
            None
        }
    }
}

fn emu_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qadapt-emu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `kernels/emu/vgpu_runtime.cpp`, compiled once per test process without the instrumentation and
/// with `-DQV_NO_KERNEL_ANCHORS` (the runners hold only some kernels).
fn runtime_object() -> Option<&'static Path> {
    static RT: OnceLock<Option<PathBuf>> = OnceLock::new();
    RT.get_or_init(|| {
        let obj = emu_dir().join("vgpu_runtime.o");
        let mut cmd = emu_cxx(false);
        cmd.arg("-DQV_NO_KERNEL_ANCHORS")
            .arg("-c")
            .arg(root().join("kernels/emu/vgpu_runtime.cpp"))
            .arg("-o")
            .arg(&obj);
        build(cmd, "kernels/emu/vgpu_runtime.cpp").map(|()| obj)
    })
    .as_deref()
}

/// Compiles `kernels/emu/<name>.cpp` (which includes the kernel files it runs) with the memory
/// checker and links it with the runtime; None when no C++ compiler is present.
fn compile(name: &str) -> Option<PathBuf> {
    let rt = runtime_object()?;
    let dir = emu_dir();
    let (obj, exe) = (dir.join(format!("{name}.o")), dir.join(name));
    let mut cmd = emu_cxx(true);
    cmd.arg("-c")
        .arg(root().join(format!("kernels/emu/{name}.cpp")))
        .arg("-o")
        .arg(&obj);
    build(cmd, &format!("the emulation runner {name}"))?;
    // Linked without -fsanitize: the callbacks are the runtime's, libtsan is not wanted.
    let mut link = Command::new(std::env::var("CXX").unwrap_or_else(|_| "c++".into()));
    link.arg("-pthread").arg(&obj).arg(rt).arg("-o").arg(&exe);
    build(link, &format!("the emulation runner {name} (link)"))?;
    Some(exe)
}

/// The NF4 + optimizer runner, compiled once per test process.
fn runner() -> Option<&'static Path> {
    static RUNNER: OnceLock<Option<PathBuf>> = OnceLock::new();
    RUNNER.get_or_init(|| compile("nf4_optim_emu")).as_deref()
}

fn run(mode: &str, input: &[u8]) -> Option<Vec<u8>> {
    let exe = runner()?;
    let dir = exe.parent().unwrap();
    // Tests run on several threads: every call gets its own files.
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let tag = format!("{mode}-{}", CALLS.fetch_add(1, Ordering::Relaxed));
    let (i, o) = (
        dir.join(format!("{tag}.in")),
        dir.join(format!("{tag}.out")),
    );
    std::fs::write(&i, input).unwrap();
    let st = Command::new(exe)
        .arg(mode)
        .arg(&i)
        .arg(&o)
        .status()
        .unwrap();
    assert!(st.success(), "emulated {mode} failed");
    Some(std::fs::read(&o).unwrap())
}

struct Out<'a>(&'a [u8]);
impl Out<'_> {
    fn take(&mut self, n: usize) -> Vec<u8> {
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a.to_vec()
    }
    fn f32s(&mut self, n: usize) -> Vec<u32> {
        self.take(4 * n)
            .chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
    fn u16s(&mut self, n: usize) -> Vec<u16> {
        self.take(2 * n)
            .chunks(2)
            .map(|c| u16::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(u64::from(seed));
    (0..n)
        .map(|i| {
            let u: f32 = rng.random_range(-1.0..1.0);
            match i {
                0..=63 if seed.is_multiple_of(2) => 0.0,
                _ if i % 501 == 7 => 40.0,
                _ => u,
            }
        })
        .collect()
}

/// Runs quantize (+ double quant) and the three dequantize kernels under emulation on `x` and
/// compares every output with the CPU reference; false when emulation is unavailable.
fn check_nf4(x: &FloatVec, bs: usize, what: &str) -> bool {
    let n = x.len();
    let d: u32 = match x.dtype() {
        DType::F32 => 0,
        DType::BF16 => 1,
        DType::F16 => 2,
    };
    for stats in [Statistics::Plain, Statistics::DoubleQuant] {
        let dq = stats == Statistics::DoubleQuant;
        let mut input = Vec::new();
        input.extend(d.to_le_bytes());
        input.extend((bs as u32).to_le_bytes());
        input.extend(u32::from(dq).to_le_bytes());
        input.extend((n as u64).to_le_bytes());
        input.extend(x.as_bytes());
        input.extend(DQ_MAP.iter().flat_map(|v| v.to_le_bytes()));
        let Some(out) = run("nf4", &input) else {
            return false;
        };
        let mut o = Out(&out);
        let what = format!("{what} n={n} bs={bs} {} {stats:?}", x.dtype());
        let cpu = Nf4Tensor::quantize(&Device::Cpu, x, &[n], bs, stats).unwrap();
        let nb = n.div_ceil(bs);
        assert_eq!(o.take(n.div_ceil(2)), cpu.packed, "packed, {what}");
        let absmax = o.f32s(nb);
        let offset = o.f32s(1)[0];
        let codes = o.take(nb);
        let nested = o.f32s(nb.div_ceil(256));
        match &cpu.scales {
            Scales::Absmax(a) => assert_eq!(absmax, bits(a), "absmax, {what}"),
            Scales::Double(dqs) => {
                assert_eq!(offset, dqs.offset.to_bits(), "offset, {what}");
                assert_eq!(codes, dqs.codes, "codes, {what}");
                assert_eq!(nested, bits(&dqs.nested_absmax), "nested absmax, {what}");
            }
        }
        let f = cpu.dequantize(&Device::Cpu, DType::F32).unwrap();
        assert_eq!(o.f32s(n), bits(&f.to_f32_vec()), "dequantize f32, {what}");
        let FloatVec::BF16(b) = cpu.dequantize(&Device::Cpu, DType::BF16).unwrap() else {
            unreachable!()
        };
        assert_eq!(
            o.u16s(n),
            b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "dequantize bf16, {what}"
        );
        let FloatVec::F16(h) = cpu.dequantize(&Device::Cpu, DType::F16).unwrap() else {
            unreachable!()
        };
        assert_eq!(
            o.u16s(n),
            h.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "dequantize f16, {what}"
        );
        assert!(o.0.is_empty());
    }
    true
}

#[test]
fn emulated_nf4_kernels_match_the_cpu_reference_bit_for_bit() {
    let cases = [
        (1usize, 32usize),
        (31, 64),
        (999, 64),
        (4097, 4096),
        (19_203, 64),
        (70_001, 32),
        (2_000, 1024),
    ];
    for (k, &(n, bs)) in cases.iter().enumerate() {
        let raw = values(n, k as u32);
        for x in [
            FloatVec::F32(raw.clone()),
            FloatVec::BF16(raw.iter().map(|v| bf16::from_f32(*v)).collect()),
            FloatVec::F16(raw.iter().map(|v| f16::from_f32(*v)).collect()),
        ] {
            if !check_nf4(&x, bs, "generated") {
                return;
            }
        }
    }
}

/// The bitsandbytes golden inputs: exact ties, values a hair from the midpoints (where rounding a
/// 16-bit partial block first changes the code), zero blocks, outliers.
#[test]
fn emulated_nf4_kernels_on_the_golden_inputs() {
    let bytes = std::fs::read(root().join("tests/data/nf4_golden.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let meta = safetensors::SafeTensors::read_metadata(&bytes)
        .unwrap()
        .1
        .metadata()
        .clone()
        .unwrap();
    let cases: Vec<String> = serde_json::from_str(&meta["cases"]).unwrap();
    for case in &cases {
        let m: serde_json::Value = serde_json::from_str(&meta[case.as_str()]).unwrap();
        let bs = m["blocksize"].as_u64().unwrap() as usize;
        let dtype = DType::parse(m["dtype"].as_str().unwrap()).unwrap();
        let x = FloatVec::from_bytes(dtype, st.tensor(&format!("{case}.input")).unwrap().data())
            .unwrap();
        if !check_nf4(&x, bs, case) {
            return;
        }
    }
}

#[test]
fn emulated_adamw_matches_the_cpu_reference_bit_for_bit() {
    let h = AdamW {
        lr: 3e-3,
        weight_decay: 0.05,
        ..AdamW::default()
    };
    for n in [1usize, 255, 3_001] {
        let mut input = Vec::new();
        input.extend((n as u64).to_le_bytes());
        input.extend(3u32.to_le_bytes());
        for v in [h.lr, h.weight_decay, h.beta1, h.beta2, h.eps] {
            input.extend(v.to_le_bytes());
        }
        let mut p = values(n, 1);
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        let mut p16 = vec![bf16::ZERO; n];
        let mut steps = Vec::new();
        for t in 1..=3u64 {
            let s = h.step(t, h.lr, 0.75).unwrap();
            let g = values(n, 10 + t as u32);
            for v in [s.step_size, s.bc2_sqrt, s.grad_scale] {
                input.extend(v.to_le_bytes());
            }
            input.extend(g.iter().flat_map(|v| v.to_le_bytes()));
            steps.push((s, g));
        }
        input.extend(p.iter().flat_map(|v| v.to_le_bytes()));
        for (s, g) in &steps {
            adamw_cpu(&mut p, Some(&mut p16), g, &mut m, &mut v, s).unwrap();
        }
        let Some(out) = run("adamw", &input) else {
            return;
        };
        let mut o = Out(&out);
        assert_eq!(o.f32s(n), bits(&p), "param, n={n}");
        assert_eq!(o.f32s(n), bits(&m), "m, n={n}");
        assert_eq!(o.f32s(n), bits(&v), "v, n={n}");
        assert_eq!(
            o.u16s(n),
            p16.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            "bf16 copy, n={n}"
        );
        let partial: f64 = o
            .f32s(3)
            .iter()
            .map(|b| f64::from(f32::from_bits(*b)))
            .sum();
        let want = sum_squares_cpu(&p);
        assert!(
            (partial - want).abs() <= 1e-5 * want.max(1e-30),
            "sum of squares {partial} vs {want}"
        );
    }
}

/// The model-op kernels (kernels/rmsnorm.cu ... attention.cu) under emulation against the float64
/// reference inside model_emu.cpp.
#[test]
fn emulated_model_op_kernels_match_a_float64_reference() {
    let Some(exe) = compile("model_emu") else {
        return;
    };
    let out = Command::new(&exe).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "model_emu reported mismatches:\n{text}"
    );
    for op in [
        "rmsnorm",
        "swiglu",
        "mask_mix",
        "rope",
        "embedding",
        "ce",
        "attention",
    ] {
        assert!(
            text.contains(&format!("{op} done, fails 0")),
            "{op} missing or failing:\n{text}"
        );
    }
}

/// The emulator behind the virtual device (`kernels/emu/vgpu_runtime.cpp`) runs its selftest:
/// shuffles, `ldmatrix` and `mma.sync` fragment layouts against scalar references, `cp.async`
/// poison before the wait, exposed shared-memory races, deadlock, fault and trap reports, and the
/// LoRA tensor-core kernels at awkward shapes against a float64 reference. Then
/// `vgpu_mutants.sh` plants nine defects in copies of the LoRA kernels (a loosened
/// `cp.async.wait_group`, two removed `__syncthreads`, a swapped B-fragment pair, the NF4 decode
/// writing the tile being read, swapped NF4 nibbles, wrong A-fragment rows, a one-element read
/// past a row's end in the K tail, 16-byte loads of rows that are not 16-byte aligned) and the
/// selftest must fail on each, the last two through the memory checker's reports: the emulation
/// has teeth on the shipped kernels.
#[test]
fn the_emulator_selftest_passes_and_catches_planted_defects() {
    let r = root();
    let Some(rt) = runtime_object() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("qadapt-vgpu-selftest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let mut objects = vec![rt.to_path_buf()];
    let mut kernel_files: Vec<PathBuf> = std::fs::read_dir(r.join("kernels"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    kernel_files.sort();
    let sources = kernel_files
        .into_iter()
        .map(|p| (p, true))
        .chain(std::iter::once((
            r.join("kernels/emu/vgpu_selftest.cpp"),
            false,
        )));
    for (src, cuda) in sources {
        let obj = dir.join(src.file_name().unwrap()).with_extension("o");
        // Every object here holds kernel code: instrumented for the memory checker.
        let mut cmd = emu_cxx(true);
        if cuda {
            cmd.args(["-x", "c++"]);
        }
        cmd.arg("-c").arg(&src).arg("-o").arg(&obj);
        build(cmd, &format!("{} (as emulated C++)", src.display()))
            .expect("the compiler ran for the runtime object");
        objects.push(obj);
    }
    let exe = dir.join("vgpu_selftest");
    let st = Command::new(&cxx)
        .arg("-pthread")
        .args(&objects)
        .arg("-o")
        .arg(&exe)
        .status()
        .unwrap();
    assert!(st.success(), "the selftest does not link");
    let out = Command::new(&exe).arg("2").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "emulator selftest failed:\n{text}");
    assert!(text.contains(", 0 failed"), "{text}");

    let out = Command::new("sh")
        .arg(r.join("kernels/emu/vgpu_mutants.sh"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "a planted defect went unnoticed:\n{text}"
    );
    assert_eq!(text.matches(": caught").count(), 9, "{text}");
    std::fs::remove_dir_all(&dir).ok();
}
