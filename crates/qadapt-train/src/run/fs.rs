//! Crash-safe writes of a run directory: nothing is destroyed and nothing half-written is left
//! behind (issue 12). The CLI's other commands write their outputs through these too.
//!
//! - A file is written to a temporary beside it, created with `O_EXCL` under an unpredictable
//!   name (`.NAME.<12 random alphanumerics>.partial`, `tempfile`), so a planted symlink or file
//!   is never followed or reused; it is synced, then renamed over the target, and removed on any
//!   error ([`write_file`]).
//! - A directory is filled as a temporary directory and renamed into place ([`new_directory`]);
//!   replacing one (the checkpoint) moves the old one aside first ([`replace_directory`]), so a
//!   crash at any point leaves the old or the new one, which [`recover_directory`] sorts out on
//!   the next start.
//!
//! [`fault_point`] marks each filesystem step of these writes: the crash-consistency test kills
//! the process at each of them (`QADAPT_FAULT_AT`). The count is per process, so every writer of
//! a process must go through this module for the points to be numbered alike from run to run.
//!
//! Each function is generic over the caller's error type `E`: the `fill` closures return the
//! caller's errors, and this module's own failures convert into it from [`super::Error`].

use std::fs;
use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use qadapt::nf4::bnb::OnDiskTensor;

use super::Error;

/// The `__metadata__` map of a safetensors header.
pub type Metadata = Option<std::collections::HashMap<String, String>>;

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.to_string();
    move |source| Error::Io { what, source }
}

fn refused(reason: String) -> Error {
    Error::Refused(reason)
}

/// A crash-test hook: with `QADAPT_FAULT_AT=N` in the environment, the N-th call of the process
/// (counting from 1) kills it on the spot, as a SIGKILL or a power cut would at that point (no
/// destructor runs, nothing is flushed). `what` names the step for the message on stderr.
pub fn fault_point(what: &str) {
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

/// What a non-regular file is, for the error that refuses to replace it.
pub fn kind_of(t: fs::FileType) -> &'static str {
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

/// The directory `p` lives in (`.` for a bare name).
pub fn parent_dir(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The name part of a path, for the temporaries beside it.
fn file_name(p: &Path) -> Result<String, Error> {
    Ok(p.file_name()
        .ok_or_else(|| refused(format!("the output path {} has no file name", p.display())))?
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
pub fn write_file<E: From<Error>>(
    target: &Path,
    fill: impl FnOnce(&mut fs::File) -> Result<(), E>,
) -> Result<(), E> {
    let dir = parent_dir(target);
    if !dir.is_dir() {
        return Err(refused(format!(
            "the output directory {} does not exist",
            dir.display()
        ))
        .into());
    }
    let prefix = format!(".{}.", file_name(target)?);
    let mut tmp = temp_builder(&prefix, false)
        .tempfile_in(&dir)
        .map_err(io(format!(
            "cannot create a temporary file in {}",
            dir.display()
        )))?;
    fault_point("file: temporary created");
    fill(tmp.as_file_mut())?;
    tmp.as_file()
        .sync_all()
        .map_err(io(format!("syncing {}", target.display())))?;
    fault_point("file: temporary written");
    if let Ok(m) = fs::metadata(target)
        && !m.is_file()
    {
        return Err(refused(format!(
            "the output {} is {}; refusing to replace it",
            target.display(),
            kind_of(m.file_type())
        ))
        .into());
    }
    tmp.persist(target)
        .map_err(|e| e.error)
        .map_err(io(format!("renaming into {}", target.display())))?;
    fault_point("file: renamed into place");
    Ok(())
}

/// The bytes of a safetensors file holding `tensors`.
pub fn serialize(tensors: &[OnDiskTensor], metadata: Metadata) -> Result<Vec<u8>, Error> {
    safetensors::serialize(tensors.iter().map(|t| (t.name.as_str(), t)), metadata)
        .map_err(|e| refused(format!("serializing the output: {e}")))
}

/// Serializes `tensors` into the new file `path` (inside a directory being filled, so no
/// temporary of its own) and syncs it to disk.
pub fn write_safetensors(
    path: &Path,
    tensors: &[OnDiskTensor],
    metadata: Metadata,
) -> Result<(), Error> {
    let bytes = serialize(tensors, metadata)?;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io(format!("cannot create {}", path.display())))?;
    f.write_all(&bytes)
        .map_err(io(format!("writing {}", path.display())))?;
    f.sync_all()
        .map_err(io(format!("syncing {}", path.display())))
}

/// Creates the directory `output` atomically: `fill` writes into a temporary directory beside it
/// (`.NAME.<random>.partial`), which is synced and renamed to `output` only when `fill` succeeds,
/// and removed otherwise. An existing `output` is refused, never overwritten.
pub fn new_directory<T, E: From<Error>>(
    output: &Path,
    fill: impl FnOnce(&Path) -> Result<T, E>,
) -> Result<T, E> {
    if fs::symlink_metadata(output).is_ok() {
        return Err(refused(format!(
            "{} already exists; choose another output directory or remove it",
            output.display()
        ))
        .into());
    }
    let (tmp, value) = filled_directory(output, fill)?;
    fs::rename(&tmp, output).map_err(io(format!(
        "renaming {} to {}",
        tmp.display(),
        output.display()
    )))?;
    fault_point("directory: renamed into place");
    Ok(value)
}

/// A temporary directory beside `output`, filled by `fill` and synced; removed on error.
fn filled_directory<T, E: From<Error>>(
    output: &Path,
    fill: impl FnOnce(&Path) -> Result<T, E>,
) -> Result<(PathBuf, T), E> {
    let parent = parent_dir(output);
    if !parent.is_dir() {
        return Err(refused(format!(
            "the output directory's parent {} does not exist",
            parent.display()
        ))
        .into());
    }
    let prefix = format!(".{}.", file_name(output)?);
    let tmp = temp_builder(&prefix, true)
        .tempdir_in(&parent)
        .map_err(io(format!(
            "cannot create a directory in {}",
            parent.display()
        )))?;
    fault_point("directory: temporary created");
    let value = fill(tmp.path())?;
    for entry in fs::read_dir(tmp.path()).map_err(io(tmp.path().display()))? {
        let path = entry.map_err(io(tmp.path().display()))?.path();
        if path.is_file() {
            fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io(format!("syncing {}", path.display())))?;
        }
    }
    fault_point("directory: temporary filled");
    Ok((tmp.keep(), value))
}

/// Replaces the directory `output` (created if absent) atomically: `fill` writes a new one
/// beside it; then the old one is moved aside to `<output>.old`, the new one renamed into place,
/// and the old one removed. A crash leaves `output` either old or new; [`recover_directory`]
/// undoes the rest.
pub fn replace_directory<E: From<Error>>(
    output: &Path,
    fill: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), E> {
    recover_directory(output)?;
    let old = sibling(output, "old")?;
    let (next, ()) = filled_directory(output, fill)?;
    if output.exists() {
        fs::rename(output, &old).map_err(io(format!("moving {} aside", output.display())))?;
        fault_point("replace: old moved aside");
    }
    fs::rename(&next, output).map_err(io(format!("renaming into {}", output.display())))?;
    fault_point("replace: new renamed into place");
    remove_dir_all_checked(&old)?;
    fault_point("replace: old removed");
    Ok(())
}

/// `<output>.<suffix>` beside `output`.
fn sibling(output: &Path, suffix: &str) -> Result<PathBuf, Error> {
    Ok(parent_dir(output).join(format!("{}.{suffix}", file_name(output)?)))
}

fn remove_dir_all_checked(p: &Path) -> Result<(), Error> {
    match fs::remove_dir_all(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(io(format!("removing {}", p.display()))(e))
        }
        _ => Ok(()),
    }
}

/// Puts `output` back in order after [`replace_directory`] or [`new_directory`] were cut off
/// anywhere: cut between the two renames (no `output`, a complete `<output>.old`), the old one is
/// moved back; cut while removing the old one (both exist), the rest of it is removed; and the
/// temporaries of `output` left by killed writers (`.NAME.*.partial`) are removed.
pub fn recover_directory(output: &Path) -> Result<(), Error> {
    let old = sibling(output, "old")?;
    if old.is_dir() {
        if output.exists() {
            remove_dir_all_checked(&old)?;
        } else {
            fs::rename(&old, output).map_err(io(format!("restoring {}", output.display())))?;
        }
    }
    remove_temporaries(output)
}

/// Removes the temporaries (`.NAME.<random>.partial`, files or directories) that killed writers
/// of `output` left beside it. Only for outputs that one process owns (a run directory's).
pub fn remove_temporaries(output: &Path) -> Result<(), Error> {
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
            removed.map_err(io(format!("removing the leftover {}", p.display())))?;
        }
    }
    Ok(())
}
