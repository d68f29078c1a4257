//! Snapshots: each shard's entities written to disk with the log position they cover.
//!
//! Layout under `<data-dir>/snapshots/`:
//! ```text
//! <position:020>/MANIFEST          "flux-snapshot 2 <position> <parts>\n"
//! <position:020>/control           b"FLUXCTL1" | u64 position | control state JSON | u32 crc32c
//! <position:020>/part-<k>          b"FLUXSNP1" | u64 position | entity* | u32::MAX | u64 count | u32 crc32c
//! entity = u32 id_len | id | u64 last_updated_ms | u64 revision | u32 packed_len | packed properties
//! packed properties = (u32 name_len | name | u32 value_len | raw value)*
//! ```
//! (Shards keep entities in a denser form, `crate::entity`; parts are converted on write and
//! read, so the on-disk format does not follow the in-memory layout.)
//! Invariants: a snapshot is written into `<position>.tmp/` and renamed into place only after
//! every part and the manifest are fsynced, so a directory without `.tmp` is complete. A
//! snapshot whose manifest or any part fails its checks is skipped with a warning, never
//! trusted. The two newest snapshots are kept, so the log is compacted only up to the older.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::oneshot;

use crate::control::ControlState;
use crate::entity::Entity;
use crate::record::LogPosition;

const PART_MAGIC: &[u8; 8] = b"FLUXSNP1";
const CONTROL_MAGIC: &[u8; 8] = b"FLUXCTL1";
const END_MARKER: u32 = u32::MAX;
/// Snapshots kept on disk; the log is compacted only up to the oldest of them.
pub const SNAPSHOTS_KEPT: usize = 2;

/// Resolves when a snapshot is sealed: its position, or why it failed.
pub type SnapshotDone = oneshot::Receiver<Result<LogPosition, String>>;

/// One snapshot being written by every shard at once.
pub struct SnapshotJob {
    tmp_dir: PathBuf,
    final_dir: PathBuf,
    position: LogPosition,
    parts: usize,
    remaining: AtomicUsize,
    error: Mutex<Option<String>>,
    done: Mutex<Option<oneshot::Sender<Result<LogPosition, String>>>>,
}

impl SnapshotJob {
    /// Prepares `<snapshots>/<position>.tmp/` for `parts` shards and writes the control state
    /// (`control`, as of `position`) into it.
    pub fn create(
        snapshots: &Path,
        position: LogPosition,
        parts: usize,
        control: &ControlState,
    ) -> std::io::Result<(std::sync::Arc<Self>, SnapshotDone)> {
        let final_dir = snapshots.join(format!("{position:020}"));
        let tmp_dir = snapshots.join(format!("{position:020}.tmp"));
        let _ = fs::remove_dir_all(&tmp_dir);
        let written = (|| {
            fs::create_dir_all(&tmp_dir)?;
            let json = serde_json::to_vec(control).map_err(std::io::Error::other)?;
            let mut bytes = Vec::with_capacity(json.len() + 20);
            bytes.extend_from_slice(CONTROL_MAGIC);
            bytes.extend_from_slice(&position.to_le_bytes());
            bytes.extend_from_slice(&json);
            bytes.extend_from_slice(&crc32c::crc32c(&bytes).to_le_bytes());
            let mut file = File::create(tmp_dir.join("control"))?;
            file.write_all(&bytes)?;
            file.sync_all()
        })();
        if let Err(error) = written {
            // A full disk fails every try: none may leave a directory behind.
            let _ = fs::remove_dir_all(&tmp_dir);
            return Err(error);
        }
        let (tx, rx) = oneshot::channel();
        let job = SnapshotJob {
            tmp_dir,
            final_dir,
            position,
            parts,
            remaining: AtomicUsize::new(parts),
            error: Mutex::new(None),
            done: Mutex::new(Some(tx)),
        };
        Ok((std::sync::Arc::new(job), rx))
    }

    pub fn position(&self) -> LogPosition {
        self.position
    }

    /// Writes shard `index`'s part; the last part to finish seals the snapshot.
    pub fn write_part<'a>(&self, index: usize, entities: impl Iterator<Item = &'a Entity>) {
        let path = self.tmp_dir.join(format!("part-{index}"));
        if let Err(error) = write_part_file(&path, self.position, entities) {
            let mut slot = self.error.lock().unwrap_or_else(|e| e.into_inner());
            slot.get_or_insert(format!("writing {}: {error}", path.display()));
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let result = match self.error.lock().unwrap_or_else(|e| e.into_inner()).take() {
                Some(error) => Err(error),
                None => self
                    .seal()
                    .map(|()| self.position)
                    .map_err(|e| e.to_string()),
            };
            if result.is_err() {
                let _ = fs::remove_dir_all(&self.tmp_dir);
            }
            if let Some(tx) = self.done.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = tx.send(result);
            }
        }
    }

    fn seal(&self) -> std::io::Result<()> {
        let manifest = format!("flux-snapshot 2 {} {}\n", self.position, self.parts);
        let path = self.tmp_dir.join("MANIFEST");
        let mut file = File::create(&path)?;
        file.write_all(manifest.as_bytes())?;
        file.sync_all()?;
        File::open(&self.tmp_dir)?.sync_all()?;
        let _ = fs::remove_dir_all(&self.final_dir);
        fs::rename(&self.tmp_dir, &self.final_dir)?;
        if let Some(parent) = self.final_dir.parent() {
            File::open(parent)?.sync_all()?;
        }
        Ok(())
    }
}

/// Writes bytes through a buffer while folding them into a CRC32C.
struct ChecksumWriter<W: Write> {
    inner: W,
    crc: u32,
}

impl<W: Write> ChecksumWriter<W> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.crc = crc32c::crc32c_append(self.crc, bytes);
        self.inner.write_all(bytes)
    }
}

fn write_part_file<'a>(
    path: &Path,
    position: LogPosition,
    entities: impl Iterator<Item = &'a Entity>,
) -> std::io::Result<()> {
    let file = File::create(path)?;
    let mut w = ChecksumWriter {
        inner: BufWriter::with_capacity(256 << 10, file),
        crc: 0,
    };
    w.put(PART_MAGIC)?;
    w.put(&position.to_le_bytes())?;
    let mut count = 0u64;
    let mut packed = Vec::with_capacity(256);
    for entity in entities {
        let id = entity.id();
        packed.clear();
        entity.write_snapshot_properties(&mut packed);
        w.put(&(id.len() as u32).to_le_bytes())?;
        w.put(id.as_bytes())?;
        w.put(&entity.last_updated_ms().to_le_bytes())?;
        w.put(&entity.revision.to_le_bytes())?;
        w.put(&(packed.len() as u32).to_le_bytes())?;
        w.put(&packed)?;
        count += 1;
    }
    w.put(&END_MARKER.to_le_bytes())?;
    w.put(&count.to_le_bytes())?;
    let crc = w.crc;
    w.inner.write_all(&crc.to_le_bytes())?;
    let file = w.inner.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()
}

/// Snapshot directories on disk, newest first, as `(position, dir)`. Leftover `.tmp` dirs are
/// removed: they are snapshots a crash interrupted.
pub fn list(snapshots: &Path) -> std::io::Result<Vec<(LogPosition, PathBuf)>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(snapshots)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.ends_with(".tmp") {
            let _ = fs::remove_dir_all(entry.path());
            continue;
        }
        if let Ok(position) = name.parse::<LogPosition>() {
            found.push((position, entry.path()));
        }
    }
    found.sort_by_key(|&(position, _)| std::cmp::Reverse(position));
    Ok(found)
}

/// Deletes all but the newest [`SNAPSHOTS_KEPT`]; returns the oldest position kept, if any.
pub fn prune(snapshots: &Path) -> std::io::Result<Option<LogPosition>> {
    let all = list(snapshots)?;
    for (_, dir) in all.iter().skip(SNAPSHOTS_KEPT) {
        fs::remove_dir_all(dir)?;
    }
    Ok(all
        .get(..SNAPSHOTS_KEPT.min(all.len()))
        .and_then(|kept| kept.last())
        .map(|(p, _)| *p))
}

/// A snapshot that passed every check: its position, control state and part files.
pub struct ValidSnapshot {
    pub position: LogPosition,
    pub control: ControlState,
    parts: Vec<PathBuf>,
}

/// The newest snapshot whose manifest and parts all check out; damaged ones are skipped with
/// a warning.
pub fn newest_valid(snapshots: &Path) -> std::io::Result<Option<ValidSnapshot>> {
    for (position, dir) in list(snapshots)? {
        match validate(position, &dir) {
            Ok(valid) => return Ok(Some(valid)),
            Err(reason) => {
                tracing::warn!(snapshot = %dir.display(), %reason, "skipping damaged snapshot")
            }
        }
    }
    Ok(None)
}

fn validate(position: LogPosition, dir: &Path) -> Result<ValidSnapshot, String> {
    let manifest =
        fs::read_to_string(dir.join("MANIFEST")).map_err(|e| format!("MANIFEST: {e}"))?;
    let fields: Vec<&str> = manifest.trim_end().split(' ').collect();
    let parts = match fields.as_slice() {
        ["flux-snapshot", "2", p, n] if p.parse() == Ok(position) => n
            .parse::<usize>()
            .map_err(|_| "MANIFEST: bad part count".to_string())?,
        _ => return Err("MANIFEST: unrecognised contents".into()),
    };
    let mut paths = Vec::with_capacity(parts);
    for k in 0..parts {
        let path = dir.join(format!("part-{k}"));
        let bytes = fs::read(&path).map_err(|e| format!("part-{k}: {e}"))?;
        check_part(&bytes, position).map_err(|e| format!("part-{k}: {e}"))?;
        paths.push(path);
    }
    let control =
        read_control(&dir.join("control"), position).map_err(|e| format!("control: {e}"))?;
    Ok(ValidSnapshot {
        position,
        control,
        parts: paths,
    })
}

fn read_control(path: &Path, position: LogPosition) -> Result<ControlState, String> {
    let bytes = fs::read(path).map_err(|e| e.to_string())?;
    if bytes.len() < 20 || &bytes[..8] != CONTROL_MAGIC {
        return Err("bad header".into());
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
        return Err("checksum mismatch".into());
    }
    if u64::from_le_bytes(body[8..16].try_into().expect("8 bytes")) != position {
        return Err("position does not match manifest".into());
    }
    serde_json::from_slice(&body[16..]).map_err(|e| format!("unreadable: {e}"))
}

fn check_part(bytes: &[u8], position: LogPosition) -> Result<(), String> {
    if bytes.len() < PART_MAGIC.len() + 8 + 4 + 8 + 4 || &bytes[..8] != PART_MAGIC {
        return Err("bad header".into());
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
        return Err("checksum mismatch".into());
    }
    if u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")) != position {
        return Err("position does not match manifest".into());
    }
    Ok(())
}

impl ValidSnapshot {
    /// Decodes every entity, in part order, into `visit`.
    pub fn read(&self, mut visit: impl FnMut(Entity)) -> Result<(), String> {
        for path in &self.parts {
            let mut bytes = Vec::new();
            File::open(path)
                .and_then(|mut f| f.read_to_end(&mut bytes))
                .map_err(|e| format!("{}: {e}", path.display()))?;
            check_part(&bytes, self.position)?;
            decode_entities(&bytes[16..bytes.len() - 4], &mut visit)
                .ok_or_else(|| format!("{}: malformed entity", path.display()))?;
        }
        Ok(())
    }
}

fn decode_entities(mut buf: &[u8], visit: &mut impl FnMut(Entity)) -> Option<()> {
    fn take<'a>(buf: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, tail) = (buf.get(..n)?, buf.get(n..)?);
        *buf = tail;
        Some(head)
    }
    fn u32_(buf: &mut &[u8]) -> Option<u32> {
        Some(u32::from_le_bytes(take(buf, 4)?.try_into().ok()?))
    }
    fn u64_(buf: &mut &[u8]) -> Option<u64> {
        Some(u64::from_le_bytes(take(buf, 8)?.try_into().ok()?))
    }
    loop {
        let len = u32_(&mut buf)?;
        if len == END_MARKER {
            return (buf.len() == 8).then_some(());
        }
        let id = std::str::from_utf8(take(&mut buf, len as usize)?).ok()?;
        let last_updated_ms = u64_(&mut buf)?;
        let revision = u64_(&mut buf)?;
        let packed_len = u32_(&mut buf)? as usize;
        let packed = take(&mut buf, packed_len)?;
        visit(Entity::from_snapshot(
            id,
            packed,
            last_updated_ms,
            revision,
        )?);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_snapshot_reads_back_and_damage_is_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut e = Entity::new("a/1", 10, 3);
        e.merge_properties([("t", "1.50")].into_iter());
        for position in [5, 9] {
            let control = ControlState::default();
            let (job, mut rx) =
                SnapshotJob::create(dir.path(), position, 2, &control).expect("create");
            job.write_part(0, [&e].into_iter());
            job.write_part(1, std::iter::empty());
            assert_eq!(rx.try_recv().expect("done"), Ok(position));
        }
        let newest = newest_valid(dir.path()).expect("list").expect("some");
        assert_eq!(newest.position, 9);
        let mut seen = Vec::new();
        newest.read(|entity| seen.push(entity)).expect("read");
        assert_eq!(seen, vec![e.clone()]);

        // Flip one byte of the newest snapshot: the older one is used instead.
        let part = dir.path().join(format!("{:020}/part-0", 9));
        let mut bytes = fs::read(&part).expect("read");
        bytes[20] ^= 1;
        fs::write(&part, bytes).expect("write");
        assert_eq!(
            newest_valid(dir.path())
                .expect("list")
                .expect("some")
                .position,
            5
        );
    }
}
