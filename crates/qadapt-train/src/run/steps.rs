//! The steps of a run ([`super::FineTune::fit`]): everything before the first step
//! (`Run::prepare`), the loop of optimizer steps with its checkpoints, evaluations, surgical
//! schedule and stop flag (`Run::train`), and the end (`Run::finish`).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use qadapt::optim::{AdamW, CosineSchedule};

use super::checkpoint::{self, Checkpoint};
use super::inputs::Inputs;
use super::method::{self, State};
use super::{
    AdapterDtype, Config, Error, FineTune, Finished, LogRow, Method, Observer, Outcome, Start,
    Summary, absolute, data, dir_size, fs, observer, peak_rss, save,
};
use crate::backend::{BaseFormat, Checkpointing, LoraModel, MomentPlacement};
use crate::cuda::CudaBackend;
use crate::dataset::{self, Sequence};
use crate::fit::{Heldout, Sampler, heldout, heldout_scored, pack, pack_rows};
use crate::memory_plan::{self, PlanMethod, PlanOptions};
use crate::surgical::{AutoSchedule, ManualSchedule};
use crate::{
    Adapter, LayerGroup, Llama, LlamaConfig, LlamaDir, LoraAdapter, Proj, Selection, Trainable,
    Trainer,
};

/// The plan options of a CUDA step of `batch` sequences of up to `longest` tokens.
fn plan_options(
    be: &CudaBackend,
    c: &Config,
    a: &LoraAdapter<f32>,
    placement: MomentPlacement,
    batch: usize,
    longest: usize,
) -> PlanOptions {
    let method = if c.method == Method::Qlora {
        PlanMethod::Qlora
    } else {
        PlanMethod::Lora
    };
    PlanOptions {
        targets: Proj::ALL
            .into_iter()
            .filter(|p| a.pairs.first().is_some_and(|l| l[p.index()].is_some()))
            .collect(),
        dropout: a.config.dropout > 0.0,
        placement,
        props: be.device().props(),
        checkpointing: c.checkpointing,
        packed: c.pack,
        ..PlanOptions::new(method, batch, longest, a.config.r)
    }
}

/// `--batch auto`: the largest micro-batch whose planned peak fits the device's free memory, at
/// most the number of training sequences; refuses when not even one sequence fits.
fn auto_batch(
    be: &CudaBackend,
    c: &Config,
    config: &LlamaConfig,
    a: &LoraAdapter<f32>,
    placement: MomentPlacement,
    longest: usize,
    examples: usize,
) -> Result<usize, Error> {
    let o = plan_options(be, c, a, placement, 1, longest);
    let (free, _) = be.device().memory_info()?;
    match memory_plan::largest_batch(config, &o, free as u64)? {
        Some(b) => Ok(b.min(examples.max(1))),
        // One sequence does not fit: the refusal below says by how much.
        None => Ok(1),
    }
}

/// Refuses, before the model goes to the device, a CUDA run whose planned peak
/// ([`crate::memory_plan`]: a micro-batch of `--batch` sequences as long as the longest training
/// sequence, since a batch is padded to its longest) exceeds the device's free memory.
fn check_device_memory(
    be: &CudaBackend,
    c: &Config,
    config: &LlamaConfig,
    a: &LoraAdapter<f32>,
    placement: MomentPlacement,
    longest: usize,
) -> Result<(), Error> {
    let o = plan_options(be, c, a, placement, c.batch, longest);
    let method = o.method;
    let p = memory_plan::plan(config, &o)?;
    let (free, total) = be.device().memory_info()?;
    if p.peak() > free as u64 {
        let size = |b: u64| {
            if b >= 1_000_000_000 {
                format!("{:.3} GB", b as f64 / 1e9)
            } else {
                format!("{:.1} MB", b as f64 / 1e6)
            }
        };
        let ckpt = if c.checkpointing == Checkpointing::None {
            ", use --checkpointing layers"
        } else {
            ""
        };
        let qlora = if method == PlanMethod::Lora {
            ", or use --method qlora"
        } else {
            ""
        };
        return Err(Error::Config(format!(
            "--device {}: a step of --batch {} sequences of up to {longest} tokens needs about {} \
             of device memory at its peak (weights {}, adapter and optimizer {}, activations {}, \
             logits {}, workspace {}), but the device has {} free of {}: lower --batch or \
             --max-len{ckpt}{qlora} (`qadapt plan-memory` shows the plan)",
            c.device,
            c.batch,
            size(p.peak()),
            size(p.weights),
            size(p.adapter + p.optimizer),
            size(p.activations()),
            size(p.logits_loss()),
            size(p.workspace()),
            size(free as u64),
            size(total as u64),
        )));
    }
    Ok(())
}

/// Surgical fine-tuning's state beyond the trainer's.
enum Surgery {
    /// Not a surgical method.
    Off,
    /// Manual: the schedule and the validation sequences held back from the training data.
    Manual(ManualSchedule, Vec<Sequence>),
    /// Automatic (Auto-RGN).
    Auto(AutoSchedule),
}

impl Surgery {
    /// What a checkpoint stores of the base: every tensor under manual surgery (the finished
    /// groups were restored, the current one is training), else the selection.
    fn checkpointed(&self, sel: Selection) -> Selection {
        match self {
            Surgery::Manual(..) => Selection::Full,
            _ => sel,
        }
    }

    /// Steps under one learning-rate schedule: a group's for manual surgery, else the run's.
    fn phase_steps(&self, total: u64) -> u64 {
        match self {
            Surgery::Manual(m, _) => m.steps_per_group(),
            _ => total,
        }
    }

    fn state_json(&self) -> serde_json::Value {
        match self {
            Surgery::Manual(m, _) => m.state_json(),
            _ => serde_json::Value::Null,
        }
    }

    fn tensors(&self) -> Vec<(String, &[f32])> {
        match self {
            Surgery::Manual(m, _) => m.tensors(),
            Surgery::Auto(a) => a
                .rgn
                .scales()
                .into_iter()
                .map(|v| ("rgn_scales".to_string(), v))
                .collect(),
            Surgery::Off => Vec::new(),
        }
    }
}

/// Where a run's model lives and steps.
enum Engine {
    /// The f32 model on the CPU (every method).
    Cpu(Box<Llama<f32>>),
    /// LoRA and QLoRA on a CUDA device, streamed there from the checkpoint: no copy of the
    /// model on the host.
    Cuda(Box<LoraModel<CudaBackend>>),
}

/// The CPU model of a run that has one: every method but LoRA and QLoRA on CUDA, so the error
/// only names a method the device refuses earlier.
fn cpu(model: &Option<Llama<f32>>) -> Result<&Llama<f32>, Error> {
    model.as_ref().ok_or_else(|| {
        Error::Config("this method runs on --device cpu (it needs the model on the host)".into())
    })
}

/// A run with its model, data and state loaded, ready to step.
pub(super) struct Run {
    c: Config,
    out: PathBuf,
    model_dir: PathBuf,
    config: LlamaConfig,
    engine: Engine,
    data: data::Data,
    state: State,
    surgery: Surgery,
    trainer: Trainer,
    sampler: Sampler,
    ck: checkpoint::State,
    sched: CosineSchedule,
    total_steps: u64,
    total_params: usize,
    before: crate::fit::Heldout,
    stop: Arc<AtomicBool>,
    pad: u32,
    /// Tokens per packed row (`--pack`).
    row_len: usize,
}

fn new_trainer(c: &Config) -> Trainer {
    let mut t = Trainer::new(
        AdamW {
            lr: c.lr(),
            weight_decay: c.weight_decay,
            ..AdamW::default()
        },
        c.max_grad_norm,
    );
    if c.method.is_lora() && c.lora_dropout > 0.0 {
        t.dropout_seed = Some(c.seed);
    }
    t
}

impl Run {
    /// Everything before the first step: the device, the run directory's recovery (resume) or
    /// creation (new run, once every input was read and checked, so a refused run leaves
    /// nothing), the model, the data, the method, the start's evaluation and the checkpoint.
    pub(super) fn prepare(ft: FineTune, obs: &mut dyn Observer) -> Result<Run, Error> {
        let FineTune {
            config: mut c,
            output: out,
            resuming,
            default_model,
            default_task,
            stop,
        } = ft;
        // CUDA trains LoRA and QLoRA only; the settings are checked before the device is
        // opened, so a refused method says so on any machine.
        let gpu_backend = if c.device != "cpu" {
            if !c.method.is_lora() {
                return Err(Error::Config(format!(
                    "--device {} trains --method lora and --method qlora only; --method {} runs \
                     on --device cpu",
                    c.device,
                    c.method.name()
                )));
            }
            match qadapt::Device::parse(&c.device)? {
                qadapt::Device::Cuda(dev) => Some(CudaBackend::new(dev)?),
                qadapt::Device::Cpu => None,
            }
        } else {
            None
        };
        if resuming {
            fs::recover_directory(&out.join("checkpoint"))?;
            for name in ["adapter", "model", "log.jsonl", "loss.png", "summary.json"] {
                fs::remove_temporaries(&out.join(name))?;
            }
            Inputs::read(&out)?.check_unchanged()?;
        } else {
            if std::fs::symlink_metadata(&out).is_ok() {
                return Err(Error::Refused(format!(
                    "{} already exists; choose another --output, or --resume {} to continue it",
                    out.display(),
                    out.display()
                )));
            }
            absolute("--model", &mut c.model)?;
            absolute("--data", &mut c.data)?;
            absolute("--heldout-data", &mut c.heldout_data)?;
            if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|source| Error::Io {
                    what: format!("creating {}", parent.display()),
                    source,
                })?;
            }
        }
        let new_run = if resuming {
            None
        } else {
            Some(Inputs::of(
                c.model.as_deref(),
                &[c.data.as_deref(), c.heldout_data.as_deref()],
            )?)
        };
        let model_dir = c.model.clone().or(default_model).ok_or_else(|| {
            Error::Config("no model: set `model` (or give the run a default model)".into())
        })?;
        // A CUDA run streams the weights from the checkpoint to the device
        // (`LoraModel::from_checkpoint`, quantized there for QLoRA) once its settings are known:
        // here it reads only the config and the tokenizer, and no f32 copy of the model ever
        // exists on the host. A CPU run loads the f32 model.
        let (config, tokenizer, mut cpu_model) = if gpu_backend.is_some() {
            let (config, tokenizer) = LlamaDir::open_config(&model_dir)?;
            (config, tokenizer, None)
        } else {
            let LlamaDir {
                config,
                weights,
                nf4,
                tokenizer,
                ..
            } = LlamaDir::open(&model_dir)?;
            let mut model = Llama::new(config.clone(), weights)?;
            // QLoRA: the CPU model runs on the dequantized codes (a bitsandbytes checkpoint's
            // own where it stores them).
            if c.method == Method::Qlora {
                crate::nf4::quantize_projections(&mut model.weights, &config, &nf4)?;
            }
            (config, tokenizer, Some(model))
        };
        let tok = tokenizer.as_ref().ok_or_else(|| {
            Error::Config(format!(
                "{}: no tokenizer.json (fine-tuning needs the model's tokenizer)",
                model_dir.display()
            ))
        })?;
        let ctx = config.max_position_embeddings;
        let virt = method::virtual_tokens(&c);
        let max_len = c.max_len.map_or(ctx, |m| m.min(ctx));
        if max_len <= virt.saturating_add(1) {
            return Err(Error::Config(format!(
                "the context ({max_len} tokens) leaves no room after {virt} virtual tokens"
            )));
        }
        // Every sequence fits in this many tokens: a packed row's length.
        let row_len = max_len - virt;
        let framing = data::framing(&model_dir, tok);
        let mut data = data::load(
            &c,
            default_task.as_deref(),
            tok,
            framing,
            max_len - virt,
            obs,
        )?;
        method::check_sizes(&c, &config, &data.train, cpu_model.is_some())?;
        let pad = 0;
        let mut state = method::build(&c, &config, cpu_model.as_ref(), tok)?;
        // Surgical fine-tuning changes the trainable group as it goes; its count is the model's.
        let total_params = Selection::Full.num_params(&config);
        let trainable_params = state.num_params(&config);
        // The held-out metric of the base model: here on the CPU (before a resumed run's
        // values are restored), on the device once the model is there.
        let mut before = match &cpu_model {
            Some(m) => Some(heldout(m, None, &data.heldout, 32, pad)?),
            None => None,
        };
        let mut trainer = new_trainer(&c);
        let surgery = match c.method {
            Method::Surgical => {
                let model = cpu(&cpu_model)?;
                let groups = LayerGroup::partition(&config, c.group_size.max(1))?;
                let per = c.steps / groups.len() as u64;
                if per == 0 {
                    return Err(Error::Config(format!(
                        "--steps {} is fewer than the {} layer groups surgical fine-tuning tries",
                        c.steps,
                        groups.len()
                    )));
                }
                let n_val = (data.train.len() / 10).clamp(1, 200);
                if data.train.len() < n_val + 1 {
                    return Err(Error::Data(
                        "surgical fine-tuning needs at least 2 training examples".into(),
                    ));
                }
                let (t, v) = dataset::split_heldout(&data.train, n_val, c.seed ^ 0x5A5A);
                data.train = t;
                let m = ManualSchedule::new(model, groups, per)?;
                state = State::Base(m.selection());
                Surgery::Manual(m, v)
            }
            Method::SurgicalAuto => {
                let per_epoch = (data.train.len() as u64).div_ceil((c.batch * c.grad_accum) as u64);
                Surgery::Auto(AutoSchedule::new(c.rgn_batches, per_epoch))
            }
            _ => Surgery::Off,
        };
        let total_steps = match &surgery {
            Surgery::Manual(m, _) => m.total_steps(),
            _ => c.steps,
        };
        // Manual surgery restarts the schedule with each group's fresh trainer.
        let phase = surgery.phase_steps(total_steps);
        let sched = CosineSchedule {
            base_lr: c.lr(),
            min_lr: c.lr() * c.min_lr_ratio,
            warmup_steps: c.warmup.min(phase / 5),
            total_steps: phase,
        };
        let mut sampler = Sampler::new(data.train.len(), c.seed)?;
        let mut ck = checkpoint::State::default();
        let mut surgery = surgery;
        if resuming && out.join("checkpoint").exists() {
            let Checkpoint {
                state: st,
                params,
                moments,
                all,
            } = checkpoint::load(&out)?;
            match &mut surgery {
                Surgery::Manual(m, _) => {
                    m.restore(&st.extra, &all)?;
                    state = State::Base(m.selection());
                }
                Surgery::Auto(a) => a.rgn.set_scales(all.get("rgn_scales").cloned()),
                Surgery::Off => {}
            }
            restore_values(&mut state, &surgery, cpu_model.as_mut(), &params)?;
            trainer.restore(st.trainer_steps, moments);
            sampler.seek(st.epoch, st.cursor)?;
            ck = st;
        }
        // CUDA: the model goes to the device with the adapter (a resumed run's), the step count
        // and the moments (none for a new run); it evaluates the held-out set there too. The
        // adapter is downloaded from the device before each checkpoint and the final save.
        let mut notes: Vec<String> = Vec::new();
        let engine = match (gpu_backend, state.adapter(), cpu_model) {
            (Some(be), Some(Adapter::Lora(a)), _) => {
                let qlora = c.method == Method::Qlora;
                let (base, placement) = if qlora {
                    (BaseFormat::QuantizeNf4, MomentPlacement::Paged)
                } else {
                    (BaseFormat::Dense, MomentPlacement::Device)
                };
                // The plan's sequence length: the longest a training or held-out batch pads to
                // (a packed row's length when packing).
                let longest = data
                    .train
                    .iter()
                    .chain(&data.heldout)
                    .map(|s| s.ids.len())
                    .max()
                    .unwrap_or(1);
                let longest = if c.pack { row_len } else { longest };
                if c.checkpointing_auto {
                    let b = if c.batch_auto { 1 } else { c.batch };
                    c.checkpointing = Checkpointing::None;
                    let o = plan_options(&be, &c, a, placement, b, longest);
                    let (free, _) = be.device().memory_info()?;
                    if memory_plan::plan(&config, &o)?.peak() > free as u64 {
                        c.checkpointing = Checkpointing::Layers;
                    }
                    c.checkpointing_auto = false;
                    notes.push(format!(
                        "--checkpointing auto: {}",
                        match c.checkpointing {
                            Checkpointing::None => "none (the step fits without it)",
                            Checkpointing::Layers => "layers (the step does not fit without it)",
                        }
                    ));
                }
                if c.batch_auto {
                    let n = data.train.len();
                    c.batch = auto_batch(&be, &c, &config, a, placement, longest, n)?;
                    // run.toml and a resume keep the number chosen here.
                    c.batch_auto = false;
                    notes.push(format!(
                        "--batch auto: {} sequence{} per micro-batch (the largest the memory \
                         plan fits in the device's free memory)",
                        c.batch,
                        if c.batch == 1 { "" } else { "s" }
                    ));
                }
                if c.pack {
                    notes.push(format!(
                        "--pack: rows of {row_len} tokens, each holding whole sequences"
                    ));
                }
                check_device_memory(&be, &c, &config, a, placement, longest)?;
                let mut g = LoraModel::from_checkpoint(be, &model_dir, base, a, placement)?;
                if before.is_none() {
                    before = Some(heldout_scored(&data.heldout, c.batch, pad, |b| {
                        g.scores(b, false)
                    })?);
                }
                g.restore(trainer.steps(), trainer.moments())?;
                if let Some(seed) = trainer.dropout_seed {
                    g.set_dropout_seed(seed);
                }
                g.set_checkpointing(c.checkpointing);
                Engine::Cuda(Box::new(g))
            }
            (Some(_), _, _) => {
                return Err(Error::Config("--device cuda needs a LoRA adapter".into()));
            }
            (None, _, Some(m)) => Engine::Cpu(Box::new(m)),
            (None, _, None) => unreachable!("a CPU run loads its model above"),
        };
        let before = before.expect("evaluated on the CPU or on the device above");
        let device = match &engine {
            Engine::Cuda(g) => Some(format!(
                "{} (bf16 compute, {} base, f32 LoRA masters){}",
                g.backend().device().describe(),
                if c.method == Method::Qlora {
                    "NF4"
                } else {
                    "bf16"
                },
                notes.iter().map(|n| format!("; {n}")).collect::<String>()
            )),
            Engine::Cpu(_) => None,
        };
        if let Some(inputs) = new_run {
            fs::remove_temporaries(&out)?;
            let toml = c.to_toml()?;
            fs::new_directory(&out, |tmp| {
                std::fs::write(tmp.join("run.toml"), &toml).map_err(|source| Error::Io {
                    what: format!("writing {}", tmp.join("run.toml").display()),
                    source,
                })?;
                inputs.write(tmp)
            })?;
        }
        obs.started(&Start {
            output: out.clone(),
            method: c.method,
            model: c.model.clone(),
            train_examples: data.train.len(),
            heldout_examples: data.heldout.len(),
            trainable_params,
            total_params,
            device,
            before,
            completions: data.completions,
            surgical: match &surgery {
                Surgery::Manual(m, v) => Some((m.groups().to_vec(), m.steps_per_group(), v.len())),
                _ => None,
            },
            resumed_at: resuming.then_some(ck.step),
            total_steps,
        })
        .map_err(observer)?;
        Ok(Run {
            c,
            out,
            model_dir,
            config,
            engine,
            data,
            state,
            surgery,
            trainer,
            sampler,
            ck,
            sched,
            total_steps,
            total_params,
            before,
            stop,
            pad,
            row_len,
        })
    }

    /// Copies the adapter trained on the device (its f32 masters) into the state, where the CPU
    /// evaluation, the checkpoint and the PEFT writer read it.
    fn download_adapter(&mut self) -> Result<(), Error> {
        if let (Engine::Cuda(g), State::Adapter(a)) = (&self.engine, &mut self.state) {
            *a = Adapter::Lora(g.adapter()?);
        }
        Ok(())
    }

    /// Writes the checkpoint of the current state: the step count and AdamW moments are the
    /// device's on CUDA (in the CPU trainer's layout, so either path can resume it), the
    /// trainer's otherwise.
    fn checkpoint(&mut self) -> Result<(), Error> {
        let device_moments;
        let moments = match &self.engine {
            Engine::Cuda(g) => {
                self.ck.trainer_steps = g.steps();
                device_moments = g.moments()?;
                &device_moments[..]
            }
            Engine::Cpu(_) => {
                self.ck.trainer_steps = self.trainer.steps();
                self.trainer.moments()
            }
        };
        self.ck.extra = self.surgery.state_json();
        let base;
        let values: Vec<&[f32]> = match (&self.state, &self.engine) {
            (State::Adapter(a), _) => a
                .named(&self.config)
                .into_iter()
                .map(|(_, _, v)| v)
                .collect(),
            (State::Base(sel), Engine::Cpu(m)) => {
                base = Trainable::Base(self.surgery.checkpointed(*sel));
                base.values(m)?
            }
            (State::Base(_), Engine::Cuda(_)) => {
                unreachable!("the device trains adapters only")
            }
        };
        checkpoint::save(
            &self.out,
            &self.ck,
            &values,
            moments,
            &self.surgery.tensors(),
        )
    }

    /// Auto-RGN: fresh scales at the start of each epoch (and of a resumed run without them),
    /// from `rgn_batches` batches of a sampler seeded by the epoch.
    fn refresh_rgn(&mut self) -> Result<(), Error> {
        let (Surgery::Auto(a), Engine::Cpu(model)) = (&mut self.surgery, &self.engine) else {
            return Ok(());
        };
        if !a.due(self.ck.step) {
            return Ok(());
        }
        let epoch = a.epoch(self.ck.step);
        let train = &self.data.train;
        let mut draw = Sampler::new(train.len(), self.c.seed ^ 0xA1 ^ epoch.wrapping_mul(0x9E37))?;
        let batches = (0..a.rgn.batches)
            .map(|_| {
                let idx = draw.take(self.c.batch);
                let refs: Vec<&Sequence> = idx.iter().map(|&i| &train[i]).collect();
                pack(&refs, self.pad)
            })
            .collect::<qadapt::Result<Vec<_>>>()?;
        a.rgn
            .refresh(model, &Trainable::Base(Selection::Full), &batches)?;
        Ok(())
    }

    /// Manual surgery at the end of a group's steps: its validation loss decides whether it is
    /// kept, the schedule moves on, and a fresh trainer starts the next group.
    fn end_group(&mut self, loss: f32, obs: &mut dyn Observer) -> Result<(), Error> {
        let (Surgery::Manual(m, val), Engine::Cpu(model)) = (&mut self.surgery, &mut self.engine)
        else {
            return Ok(());
        };
        if !self.ck.step.is_multiple_of(m.steps_per_group()) {
            return Ok(());
        }
        let v = heldout(model, None, val, 32, self.pad)?.loss;
        let end = m.end_group(model, v, loss)?;
        self.state = State::Base(m.selection());
        self.trainer = new_trainer(&self.c);
        obs.log(&LogRow::Group {
            step: self.ck.step,
            group: end.group,
            params: end.params,
            val_loss: end.val_loss,
        })
        .map_err(observer)
    }

    pub(super) fn train(mut self, obs: &mut dyn Observer) -> Result<Outcome, Error> {
        let t_run = Instant::now();
        let elapsed0 = self.ck.elapsed_s;
        let mut last_loss = f64::NAN;
        let mut step_times = Vec::new();
        while self.ck.step < self.total_steps {
            if self.stop.load(Ordering::SeqCst) {
                self.download_adapter()?;
                self.checkpoint()?;
                return Ok(Outcome::Interrupted {
                    step: self.ck.step,
                    total_steps: self.total_steps,
                    output: self.out,
                });
            }
            let t0 = Instant::now();
            self.refresh_rgn()?;
            let mut what = self.state.trainable();
            let mut bad = None;
            let mut seen = 0usize;
            for _ in 0..self.c.grad_accum {
                let train = &self.data.train;
                let b = if self.c.pack {
                    let rows = self.sampler.take_packed(
                        |i| train[i].ids.len(),
                        self.c.batch,
                        self.row_len,
                    )?;
                    let rows: Vec<Vec<&Sequence>> = rows
                        .iter()
                        .map(|r| r.iter().map(|&i| &train[i]).collect())
                        .collect();
                    seen += rows.iter().flatten().map(|s| s.ids.len()).sum::<usize>();
                    pack_rows(&rows, self.pad)?
                } else {
                    let idx = self.sampler.take(self.c.batch);
                    let refs: Vec<&Sequence> = idx.iter().map(|&i| &train[i]).collect();
                    seen += refs.iter().map(|r| r.ids.len()).sum::<usize>();
                    pack(&refs, self.pad)?
                };
                let l = match &mut self.engine {
                    Engine::Cuda(g) => g.accumulate(&b)?,
                    Engine::Cpu(m) => self.trainer.accumulate(m, &what, &b)?,
                };
                if !l.is_finite() {
                    bad = Some(l);
                }
            }
            if let Some(loss) = bad {
                let last_good = checkpoint::load_state(&self.out)
                    .ok()
                    .map(|s| (self.out.join("checkpoint"), s.step));
                return Err(Error::Diverged {
                    loss,
                    step: self.ck.step + 1,
                    last_good,
                });
            }
            let scales = match &self.surgery {
                Surgery::Auto(a) => a.rgn.scales(),
                _ => None,
            };
            let (st, lr) = match &mut self.engine {
                Engine::Cuda(g) => {
                    let lr = self.sched.lr(g.steps() + 1);
                    let opt = self.trainer.opt;
                    (g.apply(&opt, self.trainer.max_grad_norm, lr)?, lr)
                }
                Engine::Cpu(m) => {
                    let lr = self.sched.lr(self.trainer.steps() + 1);
                    (self.trainer.apply(m, &mut what, lr, scales)?, lr)
                }
            };
            self.ck.step += 1;
            self.ck.tokens += seen as u64;
            (self.ck.epoch, self.ck.cursor) = self.sampler.position();
            let dt = t0.elapsed().as_secs_f64();
            step_times.push(dt);
            self.ck.elapsed_s = elapsed0 + t_run.elapsed().as_secs_f64();
            last_loss = f64::from(st.loss);
            // The step's device high-water mark, then a fresh mark for the next step.
            let device_peak_bytes = match &self.engine {
                Engine::Cuda(g) => {
                    let dev = g.backend().device();
                    let peak = dev.memory_peak()?;
                    dev.reset_memory_peak()?;
                    peak
                }
                Engine::Cpu(_) => None,
            };
            obs.log(&LogRow::Step {
                step: self.ck.step,
                loss: st.loss,
                lr,
                grad_norm: st.grad_norm,
                tokens: seen,
                target_tokens: st.tokens,
                tokens_per_s: seen as f64 / dt,
                elapsed_s: self.ck.elapsed_s,
                device_peak_bytes,
            })
            .map_err(observer)?;
            self.end_group(st.loss, obs)?;
            self.ck.trainer_steps = match &self.engine {
                Engine::Cuda(g) => g.steps(),
                Engine::Cpu(_) => self.trainer.steps(),
            };
            let step = self.ck.step;
            let evaluate = self.c.eval_every.is_some_and(|n| step.is_multiple_of(n))
                && step < self.total_steps;
            let save = step.is_multiple_of(self.c.checkpoint_every) || step == self.total_steps;
            if save {
                self.download_adapter()?;
            }
            if evaluate {
                self.evaluate(obs, step)?;
            }
            if save {
                self.checkpoint()?;
            }
        }
        self.finish(obs, last_loss, &step_times)
    }

    /// The held-out metric of the current weights (on the device for a CUDA run, a micro-batch
    /// at a time), logged as the eval row of `step`.
    fn evaluate(&self, obs: &mut dyn Observer, step: u64) -> Result<Heldout, Error> {
        let h = match &self.engine {
            Engine::Cpu(m) => heldout(m, self.state.adapter(), &self.data.heldout, 32, self.pad)?,
            Engine::Cuda(g) => heldout_scored(&self.data.heldout, self.c.batch, self.pad, |b| {
                g.scores(b, true)
            })?,
        };
        obs.log(&LogRow::Eval {
            step,
            eval_loss: h.loss,
            eval_accuracy: h.accuracy(),
        })
        .map_err(observer)?;
        Ok(h)
    }

    /// The end: the held-out metric after, the adapter or model saved, the summary.
    fn finish(
        mut self,
        obs: &mut dyn Observer,
        mut last_loss: f64,
        step_times: &[f64],
    ) -> Result<Outcome, Error> {
        self.download_adapter()?;
        let after = self.evaluate(obs, self.ck.step)?;
        let saved = match &self.state {
            State::Adapter(ad) => {
                let p = self.out.join("adapter");
                let bf16 = self.c.adapter_dtype == AdapterDtype::Bf16;
                fs::replace_directory(&p, |tmp| {
                    ad.save(tmp, &self.config)?;
                    if bf16 {
                        crate::peft::adapter_to_bf16(tmp)?;
                    }
                    Ok::<(), Error>(())
                })?;
                p
            }
            State::Base(_) => {
                let Engine::Cpu(model) = &self.engine else {
                    unreachable!("the device trains adapters only")
                };
                let p = self.out.join("model");
                fs::replace_directory(&p, |tmp| {
                    save::write_model_files(tmp, model, qadapt::DType::F32, Some(&self.model_dir))
                })?;
                p
            }
        };
        let mean_step = if step_times.is_empty() {
            0.0
        } else {
            step_times.iter().sum::<f64>() / step_times.len() as f64
        };
        // Manual surgery ends with its kept group as the state, and reports that group's last
        // training loss, not the last group's.
        let trainable_params = self.state.num_params(&self.config);
        let kept = match &self.surgery {
            Surgery::Manual(m, _) => m.best().map(|(b, v, t)| {
                if t.is_finite() {
                    last_loss = f64::from(t);
                }
                (m.groups()[b], v)
            }),
            _ => None,
        };
        let summary = Summary {
            method: self.c.method.name().to_string(),
            trainable_params,
            total_params: self.total_params,
            peak_rss_bytes: peak_rss(),
            steps: self.ck.step,
            mean_step_s: mean_step,
            tokens_per_s: self.ck.tokens as f64 / self.ck.elapsed_s.max(1e-9),
            final_train_loss: last_loss,
            completions: self.data.completions,
            before_loss: self.before.loss,
            before_accuracy: self.before.accuracy(),
            after_loss: after.loss,
            after_accuracy: after.accuracy(),
            saved_bytes: dir_size(&saved),
            saved: saved.to_string_lossy().into_owned(),
        };
        let end = Finished {
            summary,
            after,
            elapsed_s: self.ck.elapsed_s,
            saved,
            kept,
        };
        obs.finished(&end).map_err(observer)?;
        let json = serde_json::to_string_pretty(&end.summary)
            .map_err(|e| Error::Refused(e.to_string()))?;
        fs::write_file(&self.out.join("summary.json"), |f| {
            use std::io::Write;
            f.write_all(json.as_bytes()).map_err(|source| Error::Io {
                what: "writing summary.json".into(),
                source,
            })
        })?;
        Ok(Outcome::Finished(Box::new(end)))
    }
}

/// Puts checkpointed tensors back into the adapter or the base.
fn restore_values(
    state: &mut State,
    surgery: &Surgery,
    model: Option<&mut Llama<f32>>,
    params: &[Vec<f32>],
) -> Result<(), Error> {
    let mut base;
    let slots = match (state, model) {
        (State::Adapter(a), _) => a.tensors_mut(),
        (State::Base(sel), Some(m)) => {
            base = Trainable::Base(surgery.checkpointed(*sel));
            base.params_mut(m)?
        }
        (State::Base(_), None) => {
            return Err(Error::Config(
                "a base-model checkpoint resumes on --device cpu".into(),
            ));
        }
    };
    if slots.len() != params.len() || slots.iter().zip(params).any(|(s, p)| s.len() != p.len()) {
        return Err(Error::Refused(
            "the checkpoint's tensors do not match this run's method and model".into(),
        ));
    }
    for (s, p) in slots.into_iter().zip(params) {
        s.copy_from_slice(p);
    }
    Ok(())
}
