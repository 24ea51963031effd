//! The `qadapt` binary end to end: its output matches the file bitsandbytes wrote, byte for byte;
//! it reads bitsandbytes' files; bad input gives one error line, a non-zero exit, and no output.

use crate::support::{data, qadapt, s};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::{Command, Output};

use safetensors::{SafeTensors, tensor::TensorView};

/// Writes `tensors` (name, view) of `src` under new names into a safetensors file.
fn write_subset(src: &SafeTensors<'_>, pick: &[(&str, &str)], out: &Path) {
    let views: Vec<(String, TensorView<'_>)> = pick
        .iter()
        .map(|(from, to)| (to.to_string(), src.tensor(from).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, out).unwrap();
}

#[test]
fn quantize_writes_the_bytes_bitsandbytes_writes() {
    let dir = tempfile::tempdir().unwrap();
    let orig_bytes = std::fs::read(data("bnb_linear4bit_dequant.safetensors")).unwrap();
    let orig = SafeTensors::deserialize(&orig_bytes).unwrap();
    let bnb_bytes = std::fs::read(data("bnb_linear4bit.safetensors")).unwrap();
    let bnb = SafeTensors::deserialize(&bnb_bytes).unwrap();

    // fc2: f32 weight, plain absmax, plus its bias copied through. The whole file must be equal.
    let input = dir.path().join("fc2.safetensors");
    let views = vec![
        (
            "fc2.weight".to_string(),
            orig.tensor("fc2.weight.orig").unwrap(),
        ),
        ("fc2.bias".to_string(), bnb.tensor("fc2.bias").unwrap()),
    ];
    safetensors::serialize_to_file(views, None, &input).unwrap();
    let out = dir.path().join("fc2.nf4.safetensors");
    let r = qadapt(&["quantize", s(&input), s(&out)]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let expected_keys = [
        "fc2.bias",
        "fc2.weight",
        "fc2.weight.absmax",
        "fc2.weight.quant_map",
        "fc2.weight.quant_state.bitsandbytes__nf4",
    ];
    let expected = dir.path().join("expected.safetensors");
    write_subset(&bnb, &expected_keys.map(|k| (k, k)), &expected);
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&expected).unwrap(),
        "fc2 file bytes"
    );

    // fc1: bf16 weight (40x97, 3880 values: a partial last block), double quant.
    let input = dir.path().join("fc1.safetensors");
    write_subset(&orig, &[("fc1.weight.orig", "fc1.weight")], &input);
    let out = dir.path().join("fc1.nf4.safetensors");
    let r = qadapt(&[
        "quantize",
        s(&input),
        s(&out),
        "--double-quant",
        "--blocksize",
        "64",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let ours_bytes = std::fs::read(&out).unwrap();
    let ours = SafeTensors::deserialize(&ours_bytes).unwrap();
    let mut names = ours.names();
    names.sort();
    assert_eq!(names.len(), 6);
    for k in names {
        let (a, b) = (ours.tensor(k).unwrap(), bnb.tensor(k).unwrap());
        assert_eq!((a.dtype(), a.shape()), (b.dtype(), b.shape()), "{k}");
        assert_eq!(a.data(), b.data(), "{k}");
    }
}

#[test]
fn dequantize_reads_bitsandbytes_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("deq.safetensors");
    let r = qadapt(&[
        "dequantize",
        s(&data("bnb_linear4bit.safetensors")),
        s(&out),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let ours_bytes = std::fs::read(&out).unwrap();
    let ours = SafeTensors::deserialize(&ours_bytes).unwrap();
    let want_bytes = std::fs::read(data("bnb_linear4bit_dequant.safetensors")).unwrap();
    let want = SafeTensors::deserialize(&want_bytes).unwrap();
    let mut names = ours.names();
    names.sort();
    assert_eq!(names, ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]);
    for k in ["fc1.weight", "fc2.weight"] {
        let (a, b) = (ours.tensor(k).unwrap(), want.tensor(k).unwrap());
        assert_eq!((a.dtype(), a.shape()), (b.dtype(), b.shape()), "{k}");
        assert_eq!(a.data(), b.data(), "{k} values");
    }
    // --dtype changes the element type, not the values' source.
    let out32 = dir.path().join("deq32.safetensors");
    let r = qadapt(&[
        "dequantize",
        s(&data("bnb_linear4bit.safetensors")),
        s(&out32),
        "--dtype",
        "f32",
    ]);
    assert!(r.status.success());
    let b = std::fs::read(&out32).unwrap();
    let t = SafeTensors::deserialize(&b).unwrap();
    assert_eq!(
        t.tensor("fc1.weight").unwrap().dtype(),
        safetensors::Dtype::F32
    );
    assert_eq!(
        t.tensor("fc1.bias").unwrap().dtype(),
        safetensors::Dtype::BF16
    );
}

#[test]
fn roundtrip_through_our_own_files() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("q.safetensors");
    let back = dir.path().join("back.safetensors");
    let orig = data("bnb_linear4bit_dequant.safetensors");
    assert!(
        qadapt(&[
            "quantize",
            s(&orig),
            s(&q),
            "--only",
            r"\.orig$",
            "--blocksize",
            "32"
        ])
        .status
        .success()
    );
    assert!(qadapt(&["dequantize", s(&q), s(&back)]).status.success());
    let b = std::fs::read(&back).unwrap();
    let t = SafeTensors::deserialize(&b).unwrap();
    let o = std::fs::read(&orig).unwrap();
    let o = SafeTensors::deserialize(&o).unwrap();
    // fc2.weight.orig is f32 [33, 40]; NF4 error is at most half the widest level gap (~0.16) x absmax.
    let a: Vec<f32> = bytemuck::pod_collect_to_vec(t.tensor("fc2.weight.orig").unwrap().data());
    let x: Vec<f32> = bytemuck::pod_collect_to_vec(o.tensor("fc2.weight.orig").unwrap().data());
    assert_eq!(t.tensor("fc2.weight.orig").unwrap().shape(), [33, 40]);
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = a
        .iter()
        .zip(&x)
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max);
    assert!(
        worst > 0.0 && worst <= 0.17 * amax,
        "worst {worst} of absmax {amax}"
    );
}

fn assert_clean_failure(r: &Output, needle: &str, out: &Path) {
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one error line, got: {err}"
    );
    assert!(err.starts_with("error: ") && err.contains(needle), "{err}");
    assert!(!out.exists(), "no output file after a failure");
    let dir = out.parent().unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "no partial file left behind");
}

#[test]
fn bad_input_gives_one_clear_error_and_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let good = data("bnb_linear4bit_dequant.safetensors");

    let not_st = dir.path().join("notes.txt");
    std::fs::write(&not_st, "hello, this is not a tensor file at all").unwrap();
    assert_clean_failure(
        &qadapt(&["quantize", s(&not_st), s(&out)]),
        "not a safetensors file",
        &out,
    );

    let truncated = dir.path().join("truncated.safetensors");
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert_clean_failure(
        &qadapt(&["quantize", s(&truncated), s(&out)]),
        "not a safetensors file",
        &out,
    );

    let tiny = dir.path().join("tiny.safetensors");
    std::fs::write(&tiny, [1u8, 2, 3]).unwrap();
    assert_clean_failure(
        &qadapt(&["dequantize", s(&tiny), s(&out)]),
        "not a safetensors file",
        &out,
    );

    assert_clean_failure(
        &qadapt(&["quantize", s(&good), s(&out), "--blocksize", "48"]),
        "power of two",
        &out,
    );
    assert_clean_failure(
        &qadapt(&["quantize", s(&good), s(&out), "--blocksize", "8192"]),
        "power of two",
        &out,
    );
    assert_clean_failure(
        &qadapt(&["quantize", s(&good), s(&good)]),
        "is an input of this command",
        &out,
    );
    assert_clean_failure(
        &qadapt(&["quantize", s(&good), s(&out), "--only", "("]),
        "regular expression",
        &out,
    );
    assert_clean_failure(
        &qadapt(&["quantize", s(&good), s(&out), "--device", "tpu"]),
        "unknown device",
        &out,
    );
    assert_clean_failure(
        &qadapt(&["dequantize", s(&good), s(&out)]),
        "no NF4 tensors",
        &out,
    );

    // A tensor already named like a statistic of the one being quantized.
    let clash = dir.path().join("clash.safetensors");
    let src = std::fs::read(&good).unwrap();
    let src = SafeTensors::deserialize(&src).unwrap();
    write_subset(
        &src,
        &[("fc2.weight", "w"), ("fc2.weight.orig", "w.absmax")],
        &clash,
    );
    assert_clean_failure(
        &qadapt(&["quantize", s(&clash), s(&out)]),
        "would write the tensor w.absmax twice",
        &out,
    );

    // NaN or infinity in a weight: named, not quantized to finite codes.
    let nan = dir.path().join("nan.safetensors");
    let mut w = vec![0.5f32; 64 * 4];
    w[77] = f32::NAN;
    let view = TensorView::new(
        safetensors::Dtype::F32,
        vec![64, 4],
        bytemuck::cast_slice(&w),
    )
    .unwrap();
    safetensors::serialize_to_file([("layer.weight", view)], None, &nan).unwrap();
    assert_clean_failure(
        &qadapt(&["quantize", s(&nan), s(&out)]),
        "tensor layer.weight holds NaN at element 77",
        &out,
    );

    // A quant state without its codes: refused, not silently dropped.
    let no_codes = dir.path().join("no_codes.safetensors");
    let bnb = std::fs::read(data("bnb_linear4bit.safetensors")).unwrap();
    let bnb = SafeTensors::deserialize(&bnb).unwrap();
    let keep: Vec<(&str, &str)> = bnb
        .names()
        .into_iter()
        .filter(|n| *n != "fc2.weight")
        .map(|n| (n, n))
        .collect();
    write_subset(&bnb, &keep, &no_codes);
    assert_clean_failure(
        &qadapt(&["dequantize", s(&no_codes), s(&out)]),
        "fc2.weight has a quant state",
        &out,
    );

    let missing_dir = dir.path().join("nope/out.safetensors");
    let r = qadapt(&["quantize", s(&good), s(&missing_dir)]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("does not exist"));

    // Unknown --dtype is refused by the argument parser, before any work.
    let r = qadapt(&[
        "dequantize",
        s(&data("bnb_linear4bit.safetensors")),
        s(&out),
        "--dtype",
        "f64",
    ]);
    assert!(!r.status.success());
    assert!(!out.exists());
}

/// The error of a refused output, with the output left exactly as it was.
fn assert_refused(r: &Output, needle: &str) {
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "one error line: {err}");
    assert!(err.contains(needle), "{err}");
}

#[test]
fn outputs_never_destroy_anything() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let good = p("in.safetensors");
    std::fs::copy(data("bnb_linear4bit_dequant.safetensors"), &good).unwrap();
    let original = std::fs::read(&good).unwrap();

    // An existing regular file is replaced only with --force.
    std::fs::write(p("out.st"), "keep me").unwrap();
    assert_refused(
        &qadapt(&["quantize", s(&good), s(&p("out.st"))]),
        "already exists; pass --force",
    );
    assert_eq!(std::fs::read(p("out.st")).unwrap(), b"keep me");
    assert!(
        qadapt(&["quantize", s(&good), s(&p("out.st")), "--force"])
            .status
            .success()
    );
    assert_ne!(std::fs::read(p("out.st")).unwrap(), b"keep me");

    // The input under another name: a hard link, a symlink, another spelling.
    std::fs::hard_link(&good, p("hard.st")).unwrap();
    std::os::unix::fs::symlink(&good, p("sym.st")).unwrap();
    let spelled = dir.path().join(".").join("in.safetensors");
    for alias in [p("hard.st"), p("sym.st"), spelled] {
        assert_refused(
            &qadapt(&["quantize", s(&good), s(&alias), "--force"]),
            "is an input of this command",
        );
    }
    assert_eq!(std::fs::read(&good).unwrap(), original);

    // Not a regular file: a FIFO, a device, a directory.
    assert!(
        Command::new("mkfifo")
            .arg(p("fifo"))
            .status()
            .unwrap()
            .success()
    );
    assert_refused(
        &qadapt(&["quantize", s(&good), s(&p("fifo")), "--force"]),
        "is a FIFO",
    );
    assert!(
        std::fs::symlink_metadata(p("fifo"))
            .unwrap()
            .file_type()
            .is_fifo()
    );
    assert_refused(
        &qadapt(&["quantize", s(&good), "/dev/null", "--force"]),
        "is a device",
    );
    std::fs::create_dir(p("adir")).unwrap();
    assert_refused(
        &qadapt(&["quantize", s(&good), s(&p("adir")), "--force"]),
        "is a directory",
    );

    // A symlink at the output is replaced by the file; its target is not written through.
    std::fs::write(p("victim"), "victim").unwrap();
    std::os::unix::fs::symlink(p("victim"), p("link.st")).unwrap();
    assert!(
        qadapt(&["quantize", s(&good), s(&p("link.st")), "--force"])
            .status
            .success()
    );
    assert_eq!(std::fs::read(p("victim")).unwrap(), b"victim");
    assert!(std::fs::symlink_metadata(p("link.st")).unwrap().is_file());

    // `logits --out` aimed at a file of the model directory it reads.
    let model = p("model");
    std::fs::create_dir(&model).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/default-model");
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), model.join(e.file_name())).unwrap();
    }
    let weights = std::fs::read(model.join("model.safetensors")).unwrap();
    let ids = p("ids.st");
    let v = [1i64, 2, 3];
    let view = TensorView::new(
        safetensors::Dtype::I64,
        vec![1, 3],
        bytemuck::cast_slice(&v),
    )
    .unwrap();
    safetensors::serialize_to_file([("input_ids", view)], None, &ids).unwrap();
    let target = model.join("model.safetensors");
    assert_refused(
        &qadapt(&[
            "logits",
            "--model",
            s(&model),
            "--tokens",
            s(&ids),
            "--out",
            s(&target),
            "--force",
        ]),
        "is an input of this command",
    );
    assert_eq!(std::fs::read(&target).unwrap(), weights);

    // Nothing temporary is left anywhere.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn help_describes_every_option() {
    let r = qadapt(&["quantize", "--help"]);
    let h = String::from_utf8_lossy(&r.stdout);
    for opt in ["--blocksize", "--double-quant", "--device", "--only"] {
        assert!(h.contains(opt), "{opt} missing from quantize --help");
    }
    let r = qadapt(&["dequantize", "--help"]);
    let h = String::from_utf8_lossy(&r.stdout);
    for opt in ["--dtype", "--device"] {
        assert!(h.contains(opt), "{opt} missing from dequantize --help");
    }
}

/// The binary is built for x86-64-v3 (`.cargo/config.toml`). On a CPU without those extensions it
/// must stop with one line naming what is missing (`src/cpu_check.c`, run before `main`), never
/// die of SIGILL; on a CPU with them it runs. Both CPUs are emulated by qemu's user-mode
/// `qemu-x86_64` (`just setup` installs it): Nehalem (SSE4.2, no AVX) and Haswell (v3).
#[cfg(target_arch = "x86_64")]
#[test]
fn an_older_cpu_gets_one_clear_line_not_sigill() {
    let exe = env!("CARGO_BIN_EXE_qadapt");
    let run = |cpu: &str| {
        Command::new("qemu-x86_64")
            .args(["-cpu", cpu, exe, "--help"])
            .output()
    };
    let old = match run("Nehalem") {
        Ok(o) => o,
        Err(e) => {
            let msg = format!("qemu-x86_64 could not run ({e}); the CPU check was not exercised");
            assert!(
                std::env::var("QADAPT_REQUIRE_CUDA").as_deref() != Ok("1"),
                "QADAPT_REQUIRE_CUDA=1 (just test) needs qemu-user from `just setup`: {msg}"
            );
            eprintln!("NOT CHECKED: {msg}");
            return;
        }
    };
    let err = String::from_utf8_lossy(&old.stderr);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("qemu-x86_64:"))
        .collect();
    assert_eq!(old.status.code(), Some(2), "stderr: {err}");
    assert_eq!(lines.len(), 1, "one line: {err}");
    if cfg!(target_feature = "avx2") {
        assert!(lines[0].starts_with("error: this qadapt binary was built for x86-64-v3"));
        assert!(
            lines[0].contains("avx2") && lines[0].contains("fma"),
            "{}",
            lines[0]
        );
        assert!(lines[0].contains("target-cpu=native"), "{}", lines[0]);
    }
    assert!(old.stdout.is_empty());

    let new = run("Haswell").expect("qemu-x86_64 ran once already");
    assert!(
        new.status.success(),
        "{}",
        String::from_utf8_lossy(&new.stderr)
    );
    assert!(String::from_utf8_lossy(&new.stdout).contains("Usage: qadapt <COMMAND>"));
}

#[test]
fn plan_memory_prints_the_breakdown_whether_it_fits_and_the_largest_batch() {
    let r = qadapt(&[
        "plan-memory",
        "--random-shape",
        "llama3-8b",
        "--method",
        "qlora",
        "--batch",
        "2",
        "--seq",
        "1024",
        "--rank",
        "16",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let out = String::from_utf8(r.stdout).unwrap();
    for want in [
        "memory plan: llama3-8b, qlora (NF4 base), rank 16 on q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj, batch 2 x 1024 tokens",
        "  weights ",
        "  adapter ",
        "  optimizer ",
        "  activations ",
        "  logits/loss ",
        "  workspace ",
        "  peak ",
        "fits in 141 GB",
        "largest batch of 1024 tokens that fits: ",
        "activation checkpointing: none",
    ] {
        assert!(out.contains(want), "{want:?} missing from:\n{out}");
    }
    // The lines add up to the peak (each printed to the MB).
    let value = |label: &str| -> f64 {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("  {label} ")))
            .unwrap();
        line[14..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let parts: f64 = [
        "weights",
        "adapter",
        "optimizer",
        "activations",
        "logits/loss",
        "workspace",
    ]
    .iter()
    .map(|l| value(l))
    .sum();
    assert!((parts - value("peak")).abs() < 0.004, "{out}");

    // bf16 Llama 3 70B needs about 141 GB of weights alone; the plan says it cannot fit.
    let r = qadapt(&[
        "plan-memory",
        "--random-shape",
        "llama3-70b",
        "--method",
        "lora",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let out = String::from_utf8(r.stdout).unwrap();
    assert!(out.contains("does not fit in 141 GB"), "{out}");
    assert!(out.contains("no batch of 512 tokens fits"), "{out}");

    // QLoRA of Llama 3 70B at 2048 tokens fits one H200 with layer checkpointing, at a batch
    // several times the one without.
    let largest = |ckpt: &str| -> usize {
        let r = qadapt(&[
            "plan-memory",
            "--random-shape",
            "llama3-70b",
            "--method",
            "qlora",
            "--seq",
            "2048",
            "--checkpointing",
            ckpt,
        ]);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let out = String::from_utf8(r.stdout).unwrap();
        assert!(out.contains("fits in 141 GB"), "{out}");
        assert!(
            out.contains(&format!("activation checkpointing: {ckpt}")),
            "{out}"
        );
        out.lines()
            .find_map(|l| l.strip_prefix("largest batch of 2048 tokens that fits: "))
            .unwrap()
            .parse()
            .unwrap()
    };
    let (none, layers) = (largest("none"), largest("layers"));
    assert!(
        none >= 1 && layers >= 4 * none,
        "none {none}, layers {layers}"
    );

    // A model directory's config.json, with a device size and a subset of targets.
    let r = qadapt(&[
        "plan-memory",
        "--model",
        s(&data("tiny_llama")),
        "--method",
        "lora",
        "--seq",
        "64",
        "--targets",
        "q_proj,v_proj",
        "--device-memory",
        "0.001",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let out = String::from_utf8(r.stdout).unwrap();
    assert!(
        out.contains("rank 8 on q_proj,v_proj, batch 1 x 64 tokens"),
        "{out}"
    );
    assert!(out.contains("fits in 0.001 GB"), "{out}");

    for bad in [
        &["plan-memory", "--random-shape", "gpt2"][..],
        &[
            "plan-memory",
            "--random-shape",
            "llama3-8b",
            "--seq",
            "9000",
        ][..],
        &["plan-memory"][..],
    ] {
        let r = qadapt(bad);
        assert!(!r.status.success(), "{bad:?}");
        assert!(
            String::from_utf8_lossy(&r.stderr).contains("error"),
            "{bad:?}"
        );
    }
}
