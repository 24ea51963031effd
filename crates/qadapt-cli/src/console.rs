//! The observer of `qadapt train` and `qadapt compare`'s runs on the command line: messages and
//! a progress bar on stderr, `log.jsonl` (one [`LogRow::to_json`] per line, cut back to the
//! checkpoint's step on resume), `loss.png`, and `--interrupt-after`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use qadapt_train::fit::Heldout;
use qadapt_train::run::{Finished, LogRow, Method, Observer, ObserverError, Start};

use crate::io::write_file;

/// Losses per step from `log.jsonl` (for the plots).
pub(crate) fn read_losses(out: &Path) -> Vec<(f64, f64)> {
    /// The two fields of a step row of `log.jsonl` ([`qadapt_train::run::LogRow::Step`]) the
    /// plot needs; eval and group rows have no `loss` and are skipped.
    #[derive(serde::Deserialize)]
    struct StepLoss {
        step: f64,
        loss: f64,
    }
    std::fs::read_to_string(out.join("log.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<StepLoss>(l).ok())
        .map(|r| (r.step, r.loss))
        .collect()
}

pub(crate) fn metric_line(h: &Heldout, completions: bool) -> String {
    if completions {
        format!(
            "exact match {:.1}% ({}/{}), held-out loss {:.4}",
            100.0 * h.accuracy(),
            h.exact,
            h.total,
            h.loss
        )
    } else {
        format!(
            "held-out loss {:.4}, perplexity {:.2}",
            h.loss,
            h.perplexity()
        )
    }
}

/// The command line's observer: messages and the progress bar on stderr, `log.jsonl`, the loss
/// plot, and `--interrupt-after` (it raises the stop flag once that many steps are done).
pub(crate) struct Console {
    quiet: bool,
    interrupt_after: Option<u64>,
    stop: Arc<AtomicBool>,
    bar: Option<crate::progress::Progress>,
    log: Option<std::fs::File>,
    out: PathBuf,
    method: Method,
}

impl Console {
    /// An observer for the run writing into `out`; `stop` is the run's stop flag.
    pub(crate) fn new(
        quiet: bool,
        interrupt_after: Option<u64>,
        stop: Arc<AtomicBool>,
        out: PathBuf,
        method: Method,
    ) -> Console {
        Console {
            quiet,
            interrupt_after,
            stop,
            bar: None,
            log: None,
            out,
            method,
        }
    }

    /// Leaves the progress bar where it stopped (an error or an interruption).
    pub(crate) fn abandon(&self) {
        if let Some(bar) = &self.bar {
            bar.abandon();
        }
    }

    pub(crate) fn say(&self, msg: String) {
        if !self.quiet {
            eprintln!("{msg}");
        }
    }

    fn steps_done(&self, step: u64) {
        if self.interrupt_after.is_some_and(|n| step >= n) {
            self.stop.store(true, Ordering::SeqCst);
        }
    }

    /// Opens `log.jsonl` for appending; a resumed run replays from its checkpoint, so the rows
    /// after `keep_until` are dropped first.
    fn open_log(out: &Path, keep_until: Option<u64>) -> Result<std::fs::File> {
        let path = out.join("log.jsonl");
        if let Some(step) = keep_until {
            /// The field every [`LogRow`] has: the step it was written after.
            #[derive(serde::Deserialize)]
            struct RowStep {
                step: u64,
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let kept: String = text
                .lines()
                .filter(|l| serde_json::from_str::<RowStep>(l).is_ok_and(|r| r.step <= step))
                .map(|l| format!("{l}\n"))
                .collect();
            write_file(&path, |f| Ok(f.write_all(kept.as_bytes())?))?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))
    }
}

impl Observer for Console {
    fn started(&mut self, s: &Start) -> Result<(), ObserverError> {
        self.out = s.output.clone();
        self.method = s.method;
        self.say(format!(
            "{}: {} on {} ({} training / {} held-out examples), {} trainable parameters ({:.3}% \
             of {})",
            s.output.display(),
            s.method.name(),
            s.model
                .as_ref()
                .map_or("the embedded model".to_string(), |m| m
                    .display()
                    .to_string()),
            s.train_examples,
            s.heldout_examples,
            s.trainable_params,
            100.0 * s.trainable_params as f64 / s.total_params as f64,
            s.total_params
        ));
        if let Some(d) = &s.device {
            self.say(format!("training on {d}"));
        }
        self.say(format!("before: {}", metric_line(&s.before, s.completions)));
        if let Some((groups, per, val)) = &s.surgical {
            self.say(format!(
                "surgical: {} layer groups ({}), {per} steps each, validation on {val} training \
                 examples held back",
                groups.len(),
                groups
                    .iter()
                    .map(|g| g.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            ));
        }
        if let Some(step) = s.resumed_at.filter(|&n| n > 0) {
            self.say(format!("resuming at step {step} of {}", s.total_steps));
        }
        self.log = Some(Console::open_log(&s.output, s.resumed_at)?);
        let mut bar = crate::progress::Progress::new(s.total_steps, s.method.name(), self.quiet);
        let done = s.resumed_at.unwrap_or(0);
        bar.set_position(done);
        self.bar = Some(bar);
        self.steps_done(done);
        Ok(())
    }

    fn warning(&mut self, message: &str) {
        eprintln!("warning: {message}");
    }

    fn log(&mut self, row: &LogRow) -> Result<(), ObserverError> {
        if let Some(f) = &mut self.log {
            writeln!(f, "{}", row.to_json())?;
        }
        if let LogRow::Step {
            step,
            loss,
            tokens_per_s,
            device_peak_bytes,
            ..
        } = row
        {
            if let Some(bar) = &mut self.bar {
                let memory = device_peak_bytes.map_or(String::new(), |b| {
                    format!(", device peak {:.2} GB", b as f64 / 1e9)
                });
                bar.set_message(format!("loss {loss:.4} {tokens_per_s:.0} tok/s{memory}"));
                bar.inc();
            }
            self.steps_done(*step);
        }
        Ok(())
    }

    fn finished(&mut self, end: &Finished) -> Result<(), ObserverError> {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
        let name = self.method.name();
        crate::plot::write_png(
            &self.out.join("loss.png"),
            &crate::plot::Plot {
                title: &format!("qadapt train --method {name}"),
                x_label: "step",
                y_label: "training loss",
                log_y: true,
            },
            &[crate::plot::Series {
                name: name.to_string(),
                points: read_losses(&self.out),
            }],
        )?;
        if let Some((group, v)) = end.kept {
            self.say(format!(
                "surgical: kept {group} ({} parameters, validation loss {v:.4})",
                end.summary.trainable_params
            ));
        }
        Ok(())
    }
}
