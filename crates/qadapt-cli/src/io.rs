//! File plumbing of the CLI: reading a whole safetensors file with a clear error, and writing
//! outputs so that nothing is destroyed and nothing half-written is left behind.
//!
//! The rules every output follows (issue 12):
//! - a temporary beside the target, created with `O_EXCL` under an unpredictable name
//!   (`.NAME.<12 random alphanumerics>.partial`, `tempfile`), so a planted symlink or file is never followed
//!   or reused; it is synced, then renamed over the target, and removed on any error;
//! - an output that is the same file as an input of the command (another spelling, a symlink, a
//!   hard link: same device and inode) is refused, as is an output that exists and is not a
//!   regular file (a FIFO, a device, a directory), and an existing regular file is only replaced
//!   with `--force`;
//! - a directory is filled as a temporary directory and renamed into place; replacing one
//!   (the training checkpoint) moves the old one aside first, so a crash at any point leaves the
//!   old or the new one, which [`recover_directory`] sorts out on the next start.
//!
//! [`fault_point`] marks each filesystem step of these writes: the crash-consistency test kills
//! the process at each of them (`QADAPT_FAULT_AT`).

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use qadapt::nf4::bnb::OnDiskTensor;
use safetensors::SafeTensors;

/// The `__metadata__` map of a safetensors header.
pub(crate) type Metadata = Option<HashMap<String, String>>;

/// Reads `path` and checks that it is a whole safetensors file (header and every tensor's byte
/// range); returns the bytes and the header's `__metadata__`.
pub(crate) fn read_safetensors(path: &Path) -> Result<(Vec<u8>, Metadata)> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() < 8 {
        bail!(
            "{}: not a safetensors file ({} bytes, shorter than the 8-byte header length)",
            path.display(),
            bytes.len()
        );
    }
    let not_st = |e: safetensors::SafeTensorError| {
        anyhow::anyhow!("{}: not a safetensors file ({e})", path.display())
    };
    let metadata = SafeTensors::read_metadata(&bytes)
        .map_err(not_st)?
        .1
        .metadata()
        .clone();
    SafeTensors::deserialize(&bytes).map_err(not_st)?;
    Ok((bytes, metadata))
}

/// A crash-test hook: with `QADAPT_FAULT_AT=N` in the environment, the N-th call of the process
/// (counting from 1) kills it on the spot, as a SIGKILL or a power cut would at that point (no
/// destructor runs, nothing is flushed). `what` names the step for the message on stderr.
pub(crate) fn fault_point(what: &str) {
    static REACHED: AtomicU64 = AtomicU64::new(0);
    static AT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    let at = *AT.get_or_init(|| {
        std::env::var("QADAPT_FAULT_AT")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    let Some(at) = at else { return };
    if REACHED.fetch_add(1, Ordering::Relaxed) + 1 == at {
        eprintln!("QADAPT_FAULT_AT={at}: killed at '{what}'");
        std::process::abort();
    }
}

/// Whether `a` and `b` name the same file (same device and inode; symlinks followed).
fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// What a non-regular file is, for the error that refuses to replace it.
fn kind_of(t: fs::FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Checks, before any work is done, that writing the file `output` destroys nothing: it is not
/// one of `inputs` (nor a file directly inside an input directory), it is not something other
/// than a regular file, and if it exists `force` allows replacing it.
pub(crate) fn check_output_file(output: &Path, inputs: &[&Path], force: bool) -> Result<()> {
    let dir = parent_dir(output);
    if !dir.is_dir() {
        bail!("the output directory {} does not exist", dir.display());
    }
    for input in inputs {
        let clash = if input.is_dir() {
            fs::read_dir(input)
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| same_file(&e.path(), output))
        } else {
            same_file(input, output)
        };
        if clash {
            bail!(
                "the output {} is an input of this command ({}); choose another path",
                output.display(),
                input.display()
            );
        }
    }
    match fs::metadata(output) {
        Err(_) => Ok(()),
        Ok(m) if !m.is_file() => bail!(
            "the output {} is {}; refusing to replace it",
            output.display(),
            kind_of(m.file_type())
        ),
        Ok(_) if !force => bail!(
            "the output {} already exists; pass --force to replace it",
            output.display()
        ),
        Ok(_) => Ok(()),
    }
}

/// An output file that was checked before any work was done and is written atomically at the
/// end.
pub(crate) struct Output {
    target: PathBuf,
}

impl Output {
    /// See [`check_output_file`].
    pub(crate) fn new(output: &Path, inputs: &[&Path], force: bool) -> Result<Output> {
        check_output_file(output, inputs, force)?;
        Ok(Output {
            target: output.to_path_buf(),
        })
    }

    /// Serializes `tensors` into the target (see [`write_file`]).
    pub(crate) fn write(&self, tensors: &[OnDiskTensor], metadata: Metadata) -> Result<()> {
        let bytes = serialize(tensors, metadata)?;
        write_file(&self.target, |f| Ok(f.write_all(&bytes)?))
    }
}

fn parent_dir(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The name part of a path, for the temporaries beside it.
fn file_name(p: &Path) -> Result<String> {
    Ok(p.file_name()
        .with_context(|| format!("the output path {} has no file name", p.display()))?
        .to_string_lossy()
        .into_owned())
}

/// `tempfile`'s builder for the temporaries beside `target`: `.NAME.<12 random>.partial`, with
/// the permissions `File::create` and `create_dir` give (0666 and 0777 less the umask), not
/// tempfile's private 0600/0700, since they become the outputs.
fn temp_builder(name: &str, dir: bool) -> tempfile::Builder<'_, 'static> {
    use std::os::unix::fs::PermissionsExt;
    let mut b = tempfile::Builder::new();
    b.prefix(name)
        .suffix(".partial")
        .rand_bytes(12)
        .permissions(fs::Permissions::from_mode(if dir { 0o777 } else { 0o666 }));
    b
}

/// Writes the file `target` atomically: `fill` writes a fresh temporary beside it (created with
/// `O_EXCL` under a random name), which is synced and renamed over `target`; on any error it is
/// removed and `target` is left as it was. A target that became something other than a regular
/// file since it was checked is not replaced.
pub(crate) fn write_file(
    target: &Path,
    fill: impl FnOnce(&mut fs::File) -> Result<()>,
) -> Result<()> {
    let dir = parent_dir(target);
    if !dir.is_dir() {
        bail!("the output directory {} does not exist", dir.display());
    }
    let prefix = format!(".{}.", file_name(target)?);
    let mut tmp = temp_builder(&prefix, false)
        .tempfile_in(&dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    fault_point("file: temporary created");
    fill(tmp.as_file_mut()).with_context(|| format!("writing {}", target.display()))?;
    tmp.as_file()
        .sync_all()
        .with_context(|| format!("syncing {}", target.display()))?;
    fault_point("file: temporary written");
    if let Ok(m) = fs::metadata(target)
        && !m.is_file()
    {
        bail!(
            "the output {} is {}; refusing to replace it",
            target.display(),
            kind_of(m.file_type())
        );
    }
    tmp.persist(target)
        .map_err(|e| e.error)
        .with_context(|| format!("renaming into {}", target.display()))?;
    fault_point("file: renamed into place");
    Ok(())
}

fn serialize(tensors: &[OnDiskTensor], metadata: Metadata) -> Result<Vec<u8>> {
    safetensors::serialize(tensors.iter().map(|t| (t.name.as_str(), t)), metadata)
        .context("serializing the output")
}

/// Serializes `tensors` into the new file `path` (inside a directory being filled, so no
/// temporary of its own) and syncs it to disk.
pub(crate) fn write_safetensors(
    path: &Path,
    tensors: &[OnDiskTensor],
    metadata: Metadata,
) -> Result<()> {
    let bytes = serialize(tensors, metadata)?;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(&bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    f.sync_all()
        .with_context(|| format!("syncing {}", path.display()))
}

/// Creates the directory `output` atomically: `fill` writes into a temporary directory beside it
/// (`.NAME.<random>.partial`), which is synced and renamed to `output` only when `fill` succeeds,
/// and removed otherwise. An existing `output` is refused, never overwritten.
pub(crate) fn new_directory<T>(output: &Path, fill: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    if fs::symlink_metadata(output).is_ok() {
        bail!(
            "{} already exists; choose another output directory or remove it",
            output.display()
        );
    }
    let (tmp, value) = filled_directory(output, fill)?;
    fs::rename(&tmp, output)
        .with_context(|| format!("renaming {} to {}", tmp.display(), output.display()))?;
    fault_point("directory: renamed into place");
    Ok(value)
}

/// A temporary directory beside `output`, filled by `fill` and synced; removed on error.
fn filled_directory<T>(
    output: &Path,
    fill: impl FnOnce(&Path) -> Result<T>,
) -> Result<(PathBuf, T)> {
    let parent = parent_dir(output);
    if !parent.is_dir() {
        bail!(
            "the output directory's parent {} does not exist",
            parent.display()
        );
    }
    let prefix = format!(".{}.", file_name(output)?);
    let tmp = temp_builder(&prefix, true)
        .tempdir_in(&parent)
        .with_context(|| format!("cannot create a directory in {}", parent.display()))?;
    fault_point("directory: temporary created");
    let value = fill(tmp.path())?;
    for entry in fs::read_dir(tmp.path())? {
        let path = entry?.path();
        if path.is_file() {
            fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("syncing {}", path.display()))?;
        }
    }
    fault_point("directory: temporary filled");
    Ok((tmp.keep(), value))
}

/// Replaces the directory `output` (created if absent) atomically: `fill` writes a new one
/// beside it; then the old one is moved aside to `<output>.old`, the new one renamed into place,
/// and the old one removed. A crash leaves `output` either old or new; [`recover_directory`]
/// undoes the rest.
pub(crate) fn replace_directory(
    output: &Path,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    recover_directory(output)?;
    let old = sibling(output, "old")?;
    let (next, ()) = filled_directory(output, fill)?;
    if output.exists() {
        fs::rename(output, &old).with_context(|| format!("moving {} aside", output.display()))?;
        fault_point("replace: old moved aside");
    }
    fs::rename(&next, output).with_context(|| format!("renaming into {}", output.display()))?;
    fault_point("replace: new renamed into place");
    remove_dir_all_checked(&old)?;
    fault_point("replace: old removed");
    Ok(())
}

/// `<output>.<suffix>` beside `output`.
fn sibling(output: &Path, suffix: &str) -> Result<PathBuf> {
    Ok(parent_dir(output).join(format!("{}.{suffix}", file_name(output)?)))
}

fn remove_dir_all_checked(p: &Path) -> Result<()> {
    match fs::remove_dir_all(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", p.display()))
        }
        _ => Ok(()),
    }
}

/// Puts `output` back in order after [`replace_directory`] or [`new_directory`] were cut off
/// anywhere: cut between the two renames (no `output`, a complete `<output>.old`), the old one is
/// moved back; cut while removing the old one (both exist), the rest of it is removed; and the
/// temporaries of `output` left by killed writers (`.NAME.*.partial`) are removed.
pub(crate) fn recover_directory(output: &Path) -> Result<()> {
    let old = sibling(output, "old")?;
    if old.is_dir() {
        if output.exists() {
            remove_dir_all_checked(&old)?;
        } else {
            fs::rename(&old, output).with_context(|| format!("restoring {}", output.display()))?;
        }
    }
    remove_temporaries(output)
}

/// Removes the temporaries (`.NAME.<random>.partial`, files or directories) that killed writers
/// of `output` left beside it. Only for outputs that one process owns (a run directory's).
pub(crate) fn remove_temporaries(output: &Path) -> Result<()> {
    let prefix = format!(".{}.", file_name(output)?);
    let Ok(entries) = fs::read_dir(parent_dir(output)) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(rest) = name.strip_prefix(&prefix)
            && let Some(random) = rest.strip_suffix(".partial")
            && random.len() == 12
            && random.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            let p = entry.path();
            let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
            removed.with_context(|| format!("removing the leftover {}", p.display()))?;
        }
    }
    Ok(())
}

/// Copies the files of `from` into `to`, except those `skip` names (tokenizer, generation config
/// and the like travel with a converted model). Symlinks are followed (the Hugging Face cache
/// keeps a snapshot's files as links into its blobs), so the copy is self-contained.
pub(crate) fn copy_other_files(from: &Path, to: &Path, skip: impl Fn(&str) -> bool) -> Result<()> {
    for entry in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let file = entry.file_name().to_string_lossy().into_owned();
        if !skip(&file) && fs::metadata(entry.path())?.is_file() {
            fs::copy(entry.path(), to.join(&file)).with_context(|| format!("copying {file}"))?;
        }
    }
    Ok(())
}
