//! What a training run read, recorded in its output directory (`inputs.json`) so that a resume
//! can refuse to continue on different files: every file of the model directory and the data
//! files, each with its size and CRC-32. The CRC detects changed content (a re-downloaded model,
//! an edited data file), not tampering.

use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::Error;

const FILE: &str = "inputs.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct InputFile {
    /// Absolute path, as run.toml records the model and data.
    path: String,
    size: u64,
    crc32: u32,
}

/// The input files of a run.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Inputs {
    files: Vec<InputFile>,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

impl Inputs {
    /// Records the regular files (symlinks followed, as the Hugging Face cache needs) directly
    /// inside the model directory `model` and the files `data`; absent paths (the embedded model
    /// and task, which come with the binary) are skipped.
    pub(crate) fn of(model: Option<&Path>, data: &[Option<&Path>]) -> Result<Inputs, Error> {
        let mut paths = Vec::new();
        if let Some(model) = model {
            let what = || format!("reading --model {}", model.display());
            for e in std::fs::read_dir(model).map_err(io(what()))? {
                let p = e.map_err(io(what()))?.path();
                if std::fs::metadata(&p).is_ok_and(|m| m.is_file()) {
                    paths.push(p);
                }
            }
            paths.sort();
        }
        paths.extend(data.iter().flatten().map(|d| d.to_path_buf()));
        let files = paths
            .iter()
            .map(|p| {
                let (size, crc32) = digest(p)?;
                let path = p.to_string_lossy().into_owned();
                Ok(InputFile { path, size, crc32 })
            })
            .collect::<Result<_, Error>>()?;
        Ok(Inputs { files })
    }

    /// Writes `inputs.json` into the run directory `dir`.
    pub(crate) fn write(&self, dir: &Path) -> Result<(), Error> {
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::Refused(e.to_string()))?;
        std::fs::write(dir.join(FILE), text)
            .map_err(io(format!("writing {}", dir.join(FILE).display())))
    }

    /// Reads the run directory's `inputs.json` (an empty record for a run made before it existed).
    pub(crate) fn read(dir: &Path) -> Result<Inputs, Error> {
        let path = dir.join(FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| Error::Format {
                file: path,
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Inputs::default()),
            Err(e) => Err(io(format!("reading {}", path.display()))(e)),
        }
    }

    /// Fails, naming the first file, if any recorded input is gone or differs now.
    pub(crate) fn check_unchanged(&self) -> Result<(), Error> {
        for f in &self.files {
            let path = Path::new(&f.path);
            let (size, crc32) = digest(path).map_err(|e| {
                Error::Refused(format!("--resume: the run's input {} is gone: {e}", f.path))
            })?;
            if size != f.size {
                return Err(Error::Refused(format!(
                    "--resume: the run's input {} changed since the run started ({} bytes, now \
                     {size}); start a new run",
                    f.path, f.size
                )));
            }
            if crc32 != f.crc32 {
                return Err(Error::Refused(format!(
                    "--resume: the run's input {} changed since the run started (same size, other \
                     content); start a new run",
                    f.path
                )));
            }
        }
        Ok(())
    }
}

/// Size and CRC-32 of a file, read in 1 MiB pieces.
fn digest(path: &Path) -> Result<(u64, u32), Error> {
    let mut f = std::fs::File::open(path).map_err(io(format!("cannot read {}", path.display())))?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .map_err(io(format!("reading {}", path.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, h.finalize()))
}
