//! The filesystem seam. The embedded log and the file target do all of their
//! file I/O through [`Fs`], so tests can swap in [`SimFs`]: an in-memory model
//! that injects faults (EIO on fsync, ENOSPC, short writes) and simulates a
//! power cut, at which every write that no fsync covered, and every directory
//! entry that no directory fsync covered, is lost.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// An open file. Reads and writes are positional, so one handle can be shared
/// between the committer and readers.
pub trait FsFile: Send + Sync {
    fn read_at(&self, buf: &mut [u8], pos: u64) -> io::Result<usize>;
    /// Write all of `buf` at `pos`. On error, a prefix may have been written.
    fn write_all_at(&self, buf: &[u8], pos: u64) -> io::Result<()>;
    /// fdatasync.
    fn sync_data(&self) -> io::Result<()>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    /// Which file this is (device and inode): a path that names another now
    /// was renamed or deleted away from this handle.
    fn identity(&self) -> io::Result<u64>;

    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Read exactly `buf.len()` bytes at `pos`, or fail with `UnexpectedEof`.
    fn read_exact_at(&self, mut buf: &mut [u8], mut pos: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, pos)? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n => {
                    buf = &mut buf[n..];
                    pos += n as u64;
                }
            }
        }
        Ok(())
    }
}

/// The directory operations the log needs.
pub trait Fs: Send + Sync + 'static {
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Open an existing file for reading and writing.
    fn open(&self, path: &Path) -> io::Result<Arc<dyn FsFile>>;
    /// Create a file, truncating it if it exists.
    fn create(&self, path: &Path) -> io::Result<Arc<dyn FsFile>>;
    /// The names of the entries in a directory.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// fsync the directory, making its entries (creates, renames, deletes)
    /// durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// The [`FsFile::identity`] of the file `path` names now.
    fn identity(&self, path: &Path) -> io::Result<u64>;
}

/// One number for a device and inode.
fn dev_ino(m: &std::fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    m.dev().rotate_left(32) ^ m.ino()
}

/// The real filesystem.
#[derive(Clone, Copy, Debug, Default)]
pub struct StdFs;

struct StdFile(std::fs::File);

impl FsFile for StdFile {
    fn read_at(&self, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(&self.0, buf, pos)
    }
    fn write_all_at(&self, buf: &[u8], pos: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.0, buf, pos)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn identity(&self) -> io::Result<u64> {
        Ok(dev_ino(&self.0.metadata()?))
    }
}

impl Fs for StdFs {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }
    fn open(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        Ok(Arc::new(StdFile(f)))
    }
    fn create(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(Arc::new(StdFile(f)))
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for e in std::fs::read_dir(dir)? {
            names.push(e?.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        std::fs::File::open(dir)?.sync_all()
    }
    fn identity(&self, path: &Path) -> io::Result<u64> {
        Ok(dev_ino(&std::fs::metadata(path)?))
    }
}

/// An in-memory filesystem that models what survives a power cut.
///
/// Every file has its current bytes (the page cache) and its durable bytes
/// (what `sync_data` last covered). Every directory has its current entries
/// and its durable entries (what `sync_dir` last covered). [`SimFs::power_cut`]
/// returns the filesystem as a machine would find it after losing power.
/// Directories themselves are modelled as always durable.
#[derive(Clone, Default)]
pub struct SimFs {
    state: Arc<Mutex<SimState>>,
}

#[derive(Clone, Default)]
struct SimState {
    next_id: u64,
    files: HashMap<u64, SimFile>,
    names: BTreeMap<PathBuf, u64>,
    durable_names: BTreeMap<PathBuf, u64>,
    dirs: Vec<PathBuf>,
    faults: Faults,
}

impl SimState {
    /// Bytes held by all files, compared against `faults.capacity`.
    fn used(&self) -> u64 {
        self.files.values().map(|f| f.data.len() as u64).sum()
    }
}

#[derive(Clone, Default)]
struct SimFile {
    data: Vec<u8>,
    durable: Vec<u8>,
}

#[derive(Clone, Debug, Default)]
struct Faults {
    /// Fail this many of the next `sync_data` calls with EIO.
    sync_eio: u32,
    /// Fail every `sync_dir` with EIO while set.
    dir_sync_eio: bool,
    /// Total bytes the disk holds; writes past it are short and fail with
    /// ENOSPC.
    capacity: Option<u64>,
}

impl SimFs {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        // A panic while holding the lock is a test bug; keep going so the
        // test reports its own assertion.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The filesystem as found after a power cut now: only fsynced bytes and
    /// directory-fsynced entries remain. Handles opened before it keep
    /// pointing at the old state.
    pub fn power_cut(&self) -> SimFs {
        let old = self.lock();
        let mut files = HashMap::new();
        for id in old.durable_names.values() {
            let durable = old.files[id].durable.clone();
            files.insert(
                *id,
                SimFile {
                    data: durable.clone(),
                    durable,
                },
            );
        }
        let state = SimState {
            next_id: old.next_id,
            files,
            names: old.durable_names.clone(),
            durable_names: old.durable_names.clone(),
            dirs: old.dirs.clone(),
            faults: Faults::default(),
        };
        SimFs {
            state: Arc::new(Mutex::new(state)),
        }
    }

    /// Fail the next `n` file fsyncs with EIO. The bytes they would have
    /// covered stay non-durable, as on Linux after a failed fsync.
    pub fn fail_next_syncs(&self, n: u32) {
        self.lock().faults.sync_eio = n;
    }

    /// Fail directory fsyncs with EIO until called with `false`.
    pub fn fail_dir_syncs(&self, fail: bool) {
        self.lock().faults.dir_sync_eio = fail;
    }

    /// Limit the disk to `bytes` in all; `None` lifts the limit.
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.lock().faults.capacity = bytes;
    }

    /// The current bytes of a file, for tests that damage or inspect it.
    pub fn read_file(&self, path: &Path) -> Option<Vec<u8>> {
        let s = self.lock();
        let id = s.names.get(path)?;
        Some(s.files[id].data.clone())
    }

    /// Replace a file's bytes, durably, as if the disk had changed them.
    pub fn write_file(&self, path: &Path, bytes: Vec<u8>) {
        let mut s = self.lock();
        let id = match s.names.get(path) {
            Some(id) => *id,
            None => {
                let id = s.next_id;
                s.next_id += 1;
                s.names.insert(path.to_path_buf(), id);
                s.durable_names.insert(path.to_path_buf(), id);
                id
            }
        };
        s.files.insert(
            id,
            SimFile {
                data: bytes.clone(),
                durable: bytes,
            },
        );
    }
}

struct SimHandle {
    fs: SimFs,
    id: u64,
}

fn enoent(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, path.display().to_string())
}

impl FsFile for SimHandle {
    fn read_at(&self, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        let s = self.fs.lock();
        let data = &s
            .files
            .get(&self.id)
            .ok_or_else(|| enoent(Path::new("?")))?
            .data;
        let start = (pos as usize).min(data.len());
        let n = buf.len().min(data.len() - start);
        buf[..n].copy_from_slice(&data[start..start + n]);
        Ok(n)
    }

    fn write_all_at(&self, buf: &[u8], pos: u64) -> io::Result<()> {
        let mut s = self.fs.lock();
        let old_len = s.files[&self.id].data.len() as u64;
        let end = pos + buf.len() as u64;
        let growth = end.saturating_sub(old_len);
        let room = match s.faults.capacity {
            Some(cap) => cap.saturating_sub(s.used()),
            None => u64::MAX,
        };
        // A write that needs more room than is left is short: it writes what
        // fits, then fails with ENOSPC.
        let (n, full) = if growth > room {
            ((old_len + room).saturating_sub(pos) as usize, true)
        } else {
            (buf.len(), false)
        };
        let file = s.files.get_mut(&self.id).unwrap();
        if file.data.len() < pos as usize + n {
            file.data.resize(pos as usize + n, 0);
        }
        file.data[pos as usize..pos as usize + n].copy_from_slice(&buf[..n]);
        if full {
            return Err(io::Error::from_raw_os_error(28)); // ENOSPC
        }
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut s = self.fs.lock();
        if s.faults.sync_eio > 0 {
            s.faults.sync_eio -= 1;
            return Err(io::Error::from_raw_os_error(5)); // EIO
        }
        let file = s.files.get_mut(&self.id).unwrap();
        file.durable = file.data.clone();
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.fs.lock();
        let file = s.files.get_mut(&self.id).unwrap();
        file.data.resize(len as usize, 0);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.fs.lock().files[&self.id].data.len() as u64)
    }

    fn identity(&self) -> io::Result<u64> {
        Ok(self.id)
    }
}

impl Fs for SimFs {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut s = self.lock();
        if !s.dirs.iter().any(|d| d == path) {
            s.dirs.push(path.to_path_buf());
        }
        Ok(())
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
        let id = *self.lock().names.get(path).ok_or_else(|| enoent(path))?;
        Ok(Arc::new(SimHandle {
            fs: self.clone(),
            id,
        }))
    }

    fn create(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
        let mut s = self.lock();
        let id = match s.names.get(path) {
            Some(&id) => {
                s.files.get_mut(&id).unwrap().data.clear();
                id
            }
            None => {
                let id = s.next_id;
                s.next_id += 1;
                s.files.insert(id, SimFile::default());
                s.names.insert(path.to_path_buf(), id);
                id
            }
        };
        drop(s);
        Ok(Arc::new(SimHandle {
            fs: self.clone(),
            id,
        }))
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let s = self.lock();
        if !s.dirs.iter().any(|d| d == dir) {
            return Err(enoent(dir));
        }
        Ok(s.names
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut s = self.lock();
        // Like an unlinked file on Linux, open handles can still read it, and
        // until a directory fsync a power cut brings the name back.
        s.names.remove(path).ok_or_else(|| enoent(path))?;
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = self.lock();
        let id = s.names.remove(from).ok_or_else(|| enoent(from))?;
        s.names.insert(to.to_path_buf(), id);
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.lock();
        if s.faults.dir_sync_eio {
            return Err(io::Error::from_raw_os_error(5));
        }
        let in_dir = |p: &PathBuf| p.parent() == Some(dir);
        s.durable_names.retain(|p, _| !in_dir(p));
        let current: Vec<_> = s
            .names
            .iter()
            .filter(|(p, _)| in_dir(p))
            .map(|(p, id)| (p.clone(), *id))
            .collect();
        s.durable_names.extend(current);
        Ok(())
    }

    fn identity(&self, path: &Path) -> io::Result<u64> {
        self.lock()
            .names
            .get(path)
            .copied()
            .ok_or_else(|| enoent(path))
    }
}
