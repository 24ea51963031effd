//! File plumbing shared by the adapter formats: `adapter_config.json` reading, the checked read
//! of `adapter_model.safetensors` against the tensors a config implies, and the f32 write.

use std::collections::HashSet;
use std::path::Path;

use qadapt::ops::Real;
use qadapt::{Error, Result};
use safetensors::SafeTensors;
use safetensors::tensor::TensorView;
use serde_json::Value;

use crate::format_err;
use crate::weights::to_f32;

pub(crate) fn io_err(file: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let file = file.to_owned();
    move |source| Error::Io { file, source }
}

/// Parses a JSON file.
pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|e| format_err(path, e))
}

/// A list of strings under `key` (`None` when absent or null; a bare string is refused, as PEFT
/// treats it as a regex).
pub(crate) fn str_list(path: &Path, v: &Value, key: &str) -> Result<Option<Vec<String>>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) => a
            .iter()
            .map(|t| {
                t.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| format_err(path, format!("{key} holds a non-string")))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some),
        Some(Value::String(_)) => Err(format_err(
            path,
            format!("a regex {key} is not supported (give a list of names)"),
        )),
        Some(_) => Err(format_err(path, format!("{key} is not a list"))),
    }
}

/// A non-negative integer under `key`.
pub(crate) fn usize_field(path: &Path, v: &Value, key: &str) -> Result<usize> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .ok_or_else(|| format_err(path, format!("no integer {key:?}")))
}

/// Reads the tensors `specs` (key, shape) from `path`, widened to f32, in order. A missing
/// tensor, a wrong shape, or a tensor whose key contains `marker` but is not in `specs` is a
/// [`Error::Format`] naming the file.
pub(crate) fn read_tensors(
    path: &Path,
    specs: &[(String, Vec<usize>)],
    marker: &str,
) -> Result<Vec<Vec<f32>>> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| format_err(path, e))?;
    let known: HashSet<&str> = specs.iter().map(|(k, _)| k.as_str()).collect();
    let mut names = st.names();
    names.sort();
    if let Some(extra) = names
        .into_iter()
        .find(|k| k.contains(marker) && !known.contains(*k))
    {
        return Err(format_err(
            path,
            format!("tensor {extra} belongs to no module the config selects"),
        ));
    }
    specs
        .iter()
        .map(|(key, shape)| {
            let t = st
                .tensor(key)
                .map_err(|_| format_err(path, format!("missing tensor {key}")))?;
            if t.shape() != shape.as_slice() {
                return Err(format_err(
                    path,
                    format!("tensor {key} has shape {:?}, expected {shape:?}", t.shape()),
                ));
            }
            to_f32(path, key, t.dtype(), t.data())
        })
        .collect()
}

/// Rewrites `dir/adapter_model.safetensors` with every f32 tensor rounded to bf16 (to nearest
/// even), the names and shapes kept; other dtypes stay as they are. The new file replaces the old
/// one in one rename.
pub fn adapter_to_bf16(dir: &Path) -> Result<()> {
    let path = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&path).map_err(io_err(&path))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| format_err(&path, e))?;
    let mut names = st.names();
    names.sort();
    let mut data: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for name in names {
        let t = st.tensor(name).map_err(|e| format_err(&path, e))?;
        let (dtype, raw) = match t.dtype() {
            safetensors::Dtype::F32 => (
                safetensors::Dtype::BF16,
                bytemuck::pod_collect_to_vec::<u8, f32>(t.data())
                    .into_iter()
                    .flat_map(|v| half::bf16::from_f32(v).to_le_bytes())
                    .collect(),
            ),
            other => (other, t.data().to_vec()),
        };
        data.push((name.to_owned(), dtype, t.shape().to_vec(), raw));
    }
    let mut views = Vec::with_capacity(data.len());
    for (name, dtype, shape, raw) in &data {
        let v = TensorView::new(*dtype, shape.clone(), raw).map_err(|e| format_err(&path, e))?;
        views.push((name.clone(), v));
    }
    let tmp = dir.join(".adapter_model.safetensors.tmp");
    safetensors::serialize_to_file(views, None, &tmp).map_err(|e| format_err(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path))
}

/// Writes `adapter_config.json` (pretty, newline-terminated) and `adapter_model.safetensors`
/// (f32) into `dir`, creating it.
pub(crate) fn write_adapter<T: Real>(
    dir: &Path,
    config: &Value,
    named: &[(String, Vec<usize>, &[T])],
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let cfg_path = dir.join("adapter_config.json");
    let text = serde_json::to_string_pretty(config).map_err(|e| format_err(&cfg_path, e))?;
    std::fs::write(&cfg_path, text + "\n").map_err(io_err(&cfg_path))?;
    let bytes: Vec<Vec<u8>> = named
        .iter()
        .map(|(_, _, v)| {
            v.iter()
                .flat_map(|x| (x.to_f64() as f32).to_le_bytes())
                .collect()
        })
        .collect();
    let path = dir.join("adapter_model.safetensors");
    let mut views = Vec::with_capacity(named.len());
    for ((name, shape, _), b) in named.iter().zip(&bytes) {
        let view = TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
            .map_err(|e| format_err(&path, e))?;
        views.push((name.clone(), view));
    }
    safetensors::serialize_to_file(views, None, &path).map_err(|e| format_err(&path, e))
}
