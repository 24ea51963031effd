//! The checkpoint of a run directory: `checkpoint/state.json` ([`State`]) and
//! `checkpoint/tensors.safetensors`, replaced atomically as a whole ([`super::fs`]).
//!
//! The tensors file holds, as flat f32 tensors: `param.<i>` the trainable tensors in
//! [`crate::Trainable::params_mut`] order (manual surgery: every base tensor), `m.<i>` and
//! `v.<i>` the AdamW moments of trainable tensor i (absent before the first step), and the
//! method's extras by name (manual surgery `best.<i>`: the best group's trained tensors;
//! Auto-RGN `rgn_scales`). Resuming restores all of it, and the sampler from `epoch`/`cursor`,
//! so a resumed CPU run reaches the weights of an uninterrupted one bit for bit.

use std::collections::HashMap;
use std::path::Path;

use qadapt::nf4::bnb::OnDiskTensor;
use serde::{Deserialize, Serialize};

use super::Error;
use super::fs::{replace_directory, write_safetensors};

/// The checkpoint's `state.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    /// Optimizer steps done.
    pub step: u64,
    /// The sampler's epoch.
    pub epoch: u64,
    /// The sampler's position in the epoch.
    pub cursor: usize,
    /// Training time so far.
    pub elapsed_s: f64,
    /// Tokens processed so far.
    pub tokens: u64,
    /// The trainer's own step count (manual surgery restarts it for each layer group).
    pub trainer_steps: u64,
    /// Manual surgery's schedule ([`crate::surgical::ManualSchedule::state_json`]): `phase`,
    /// the groups finished, and `best`, `[index, validation loss, last training loss]` of the
    /// best group so far (checkpoints written before the training loss was kept hold two
    /// entries; both read). Null for every other method.
    #[serde(default)]
    pub extra: serde_json::Value,
}

/// A loaded checkpoint.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// `state.json`.
    pub state: State,
    /// The trainable tensors.
    pub params: Vec<Vec<f32>>,
    /// The AdamW moments (m, v) per trainable tensor.
    pub moments: Vec<(Vec<f32>, Vec<f32>)>,
    /// Every tensor by name (for the method's extras).
    pub all: HashMap<String, Vec<f32>>,
}

/// Writes `<out>/checkpoint` (replacing the previous one atomically).
pub fn save(
    out: &Path,
    st: &State,
    values: &[&[f32]],
    moments: &[(Vec<f32>, Vec<f32>)],
    extra: &[(String, &[f32])],
) -> Result<(), Error> {
    let f32s = |name: String, v: &[f32]| OnDiskTensor {
        name,
        dtype: safetensors::Dtype::F32,
        shape: vec![v.len()],
        data: bytemuck::cast_slice(v).to_vec(),
    };
    let mut tensors = Vec::new();
    for (i, v) in values.iter().enumerate() {
        tensors.push(f32s(format!("param.{i}"), v));
    }
    for (i, (m, v)) in moments.iter().enumerate() {
        tensors.push(f32s(format!("m.{i}"), m));
        tensors.push(f32s(format!("v.{i}"), v));
    }
    for (name, v) in extra {
        tensors.push(f32s(name.clone(), v));
    }
    replace_directory(&out.join("checkpoint"), |tmp| {
        write_safetensors(&tmp.join("tensors.safetensors"), &tensors, None)?;
        let json = serde_json::to_string_pretty(st).map_err(|e| Error::Refused(e.to_string()))?;
        std::fs::write(tmp.join("state.json"), json).map_err(|source| Error::Io {
            what: format!("writing {}", tmp.join("state.json").display()),
            source,
        })
    })
}

/// The state of `<out>/checkpoint`, if it has one.
pub fn load_state(out: &Path) -> Result<State, Error> {
    let path = out.join("checkpoint").join("state.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|_| Error::Refused(format!("{}: no checkpoint to resume from", out.display())))?;
    serde_json::from_str(&text).map_err(|e| Error::Format {
        file: path,
        reason: e.to_string(),
    })
}

/// Reads `<out>/checkpoint`.
pub fn load(out: &Path) -> Result<Checkpoint, Error> {
    let state = load_state(out)?;
    let path = out.join("checkpoint").join("tensors.safetensors");
    let bytes = std::fs::read(&path).map_err(|source| Error::Io {
        what: format!("cannot read {}", path.display()),
        source,
    })?;
    let file = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::Format {
        file: path.clone(),
        reason: format!("not a safetensors file ({e})"),
    })?;
    let get = |name: String| -> Option<Vec<f32>> {
        file.tensor(&name)
            .ok()
            .map(|t| bytemuck::pod_collect_to_vec(t.data()))
    };
    let params: Vec<Vec<f32>> = (0..).map_while(|i| get(format!("param.{i}"))).collect();
    let moments = (0..)
        .map_while(|i| Some((get(format!("m.{i}"))?, get(format!("v.{i}"))?)))
        .collect();
    let all = file
        .names()
        .into_iter()
        .filter_map(|n| Some((n.to_string(), get(n.to_string())?)))
        .collect();
    Ok(Checkpoint {
        state,
        params,
        moments,
        all,
    })
}
