//! `qadapt compare`: every method on the same model, data and budget, one child `qadapt train`
//! process per method (so each one's peak memory is its own), then one table: method, trainable
//! parameters (count and % of the model), peak memory, step time, tokens/s, final training loss,
//! the held-out metric before and after, and the size of what it saved. Written as
//! `compare.md`, `compare.csv` and `losses.png` (every loss curve) in the output directory, and
//! printed.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::console::read_losses;
use crate::train::{Inputs, Method, Summary};

#[derive(Args, Debug)]
pub(crate) struct CompareArgs {
    /// Methods to run, comma-separated (default: all ten; see `qadapt train --method`).
    #[arg(long, value_delimiter = ',')]
    methods: Option<Vec<Method>>,
    /// Optimizer steps per method (the same budget for all).
    #[arg(long, default_value_t = 300)]
    steps: u64,
    /// Sequences per step.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[command(flatten)]
    inputs: Inputs,
    /// Seed shared by every run.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// New output directory (default runs/compare-<unix time>); one sub-directory per method.
    #[arg(long)]
    output: Option<PathBuf>,
}

fn mib(b: Option<u64>) -> String {
    b.map_or("?".into(), |b| {
        format!("{:.0}", b as f64 / (1 << 20) as f64)
    })
}

fn size(b: u64) -> String {
    if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
    } else {
        format!("{:.0} KiB", b as f64 / 1024.0)
    }
}

fn count(n: usize) -> String {
    if n >= 1_000_000 {
        format!("{:.2}M", n as f64 / 1e6)
    } else if n >= 1000 {
        format!("{:.1}k", n as f64 / 1e3)
    } else {
        n.to_string()
    }
}

const HEADER: [&str; 9] = [
    "method",
    "trainable params",
    "% of model",
    "peak RSS (MiB)",
    "step (ms)",
    "tokens/s",
    "final train loss",
    "held-out",
    "saved",
];

fn row(s: &Summary) -> [String; 9] {
    let metric = if s.completions {
        format!(
            "{:.1}% → {:.1}%",
            100.0 * s.before_accuracy,
            100.0 * s.after_accuracy
        )
    } else {
        format!("loss {:.3} → {:.3}", s.before_loss, s.after_loss)
    };
    [
        s.method.clone(),
        count(s.trainable_params),
        format!(
            "{:.3}",
            100.0 * s.trainable_params as f64 / s.total_params as f64
        ),
        mib(s.peak_rss_bytes),
        format!("{:.0}", 1e3 * s.mean_step_s),
        format!("{:.0}", s.tokens_per_s),
        format!("{:.4}", s.final_train_loss),
        metric,
        size(s.saved_bytes),
    ]
}

pub(crate) fn markdown(rows: &[Summary], metric_name: &str) -> String {
    let mut out = String::new();
    let mut header = HEADER.map(String::from);
    header[7] = format!("held-out {metric_name} (before → after)");
    out += &format!("| {} |\n", header.join(" | "));
    out += &format!("|{}\n", "---|".repeat(header.len()));
    for s in rows {
        out += &format!("| {} |\n", row(s).join(" | "));
    }
    out
}

fn csv(rows: &[Summary]) -> String {
    let mut out = String::from(
        "method,trainable_params,total_params,peak_rss_bytes,mean_step_s,tokens_per_s,\
         final_train_loss,before_loss,after_loss,before_accuracy,after_accuracy,saved_bytes\n",
    );
    for s in rows {
        out += &format!(
            "{},{},{},{},{:.6},{:.1},{:.6},{:.6},{:.6},{:.4},{:.4},{}\n",
            s.method,
            s.trainable_params,
            s.total_params,
            s.peak_rss_bytes.map_or(String::new(), |b| b.to_string()),
            s.mean_step_s,
            s.tokens_per_s,
            s.final_train_loss,
            s.before_loss,
            s.after_loss,
            s.before_accuracy,
            s.after_accuracy,
            s.saved_bytes
        );
    }
    out
}

fn run_one(a: &CompareArgs, m: Method, out: &Path) -> Result<Summary> {
    let exe = std::env::current_exe().context("locating the qadapt binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("train")
        .args(["--method", m.name()])
        .arg("--output")
        .arg(out)
        .args(["--steps", &a.steps.to_string()])
        .args(["--batch", &a.batch.to_string()])
        .args(["--seed", &a.seed.to_string()])
        .arg("--quiet");
    for (flag, v) in [
        ("--model", &a.inputs.model),
        ("--data", &a.inputs.data),
        ("--heldout-data", &a.inputs.heldout_data),
    ] {
        if let Some(p) = v {
            cmd.arg(flag).arg(p);
        }
    }
    let o = cmd.output().context("running qadapt train")?;
    if !o.status.success() {
        bail!(
            "{}: {}",
            m.name(),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    let text = std::fs::read_to_string(out.join("summary.json"))
        .with_context(|| format!("{}: no summary.json", out.display()))?;
    Ok(serde_json::from_str(&text)?)
}

pub(crate) fn run(a: &CompareArgs) -> Result<()> {
    let methods = a.methods.clone().unwrap_or_else(|| Method::ALL.to_vec());
    let out = a.output.clone().unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        PathBuf::from("runs").join(format!("compare-{t}"))
    });
    if out.exists() {
        bail!("{} already exists; choose another --output", out.display());
    }
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    // Off a terminal the per-method lines below are the progress report.
    let quiet = !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut bar = crate::progress::Progress::new(methods.len() as u64, "compare", quiet);
    let mut rows = Vec::new();
    let mut curves = Vec::new();
    for m in &methods {
        bar.set_message(m.name().to_string());
        let dir = out.join(m.name());
        let s = run_one(a, *m, &dir)?;
        eprintln!(
            "{:<14} loss {:.4}, held-out {}, {:.0} tokens/s",
            m.name(),
            s.final_train_loss,
            if s.completions {
                format!("{:.1}%", 100.0 * s.after_accuracy)
            } else {
                format!("loss {:.3}", s.after_loss)
            },
            s.tokens_per_s
        );
        curves.push(crate::plot::Series {
            name: m.name().to_string(),
            points: read_losses(&dir),
        });
        rows.push(s);
        bar.inc();
    }
    bar.finish();
    let metric = if rows.iter().all(|s| s.completions) {
        "exact match"
    } else {
        "loss"
    };
    let md = markdown(&rows, metric);
    std::fs::write(out.join("compare.md"), &md)?;
    std::fs::write(out.join("compare.csv"), csv(&rows))?;
    crate::plot::write_png(
        &out.join("losses.png"),
        &crate::plot::Plot {
            title: &format!("qadapt compare: {} steps each", a.steps),
            x_label: "step",
            y_label: "training loss",
            log_y: true,
        },
        &curves,
    )?;
    println!("{md}");
    eprintln!(
        "wrote {}/compare.md, compare.csv, losses.png",
        out.display()
    );
    Ok(())
}
