//! The audit spool: events waiting on disk, in order, while the SIEM is unreachable.
//!
//! A directory of numbered segment files (`00000000000000000001.seg`, …), appended in order and
//! read back in order. A record is `length (u32 LE) | CRC-32 (u32 LE) | the event's JSON`; a
//! batch counts as spooled once it is written and fsynced. What has been shipped is remembered
//! in `cursor` (segment and offset; a lost cursor only ships some events twice) and whole
//! shipped segments are deleted. The total size never exceeds `spool_max_bytes`: the oldest
//! segment is dropped, and its unshipped events counted, only when a new batch would not fit.
//! A record cut short or damaged (a crash mid-write, a bad disk) is skipped and counted, and
//! the drain goes on with the next segment. Each run writes into a fresh segment, never after
//! a tail it did not write. One process at a time: the directory is locked (`flock`).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The largest record accepted when reading back (events are bounded far below this).
const MAX_RECORD: u32 = 1 << 20;
/// Framing bytes before each record's payload.
const HEADER: u64 = 8;

/// One segment file.
#[derive(Debug)]
struct Segment {
    seq: u64,
    bytes: u64,
}

/// What an append did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Appended {
    /// Events now on disk.
    pub spooled: u64,
    /// Unshipped events dropped from the oldest segments to make room.
    pub dropped: u64,
}

/// Records read from the head, and where the spool's head moves once they are shipped.
#[derive(Debug)]
pub struct Head {
    /// The events, oldest first.
    pub events: Vec<String>,
    /// Segments wholly read (deleted on [`Spool::ack`]).
    done_segments: usize,
    /// Offset in the first remaining segment after the last record.
    offset: u64,
}

/// The spool directory, locked for this process.
pub struct Spool {
    dir: PathBuf,
    _lock: File,
    max_bytes: u64,
    segment_bytes: u64,
    /// Oldest first; the last one is being written when `writer` is set.
    segments: VecDeque<Segment>,
    writer: Option<File>,
    next_seq: u64,
    /// Read offset in the oldest segment.
    offset: u64,
    total: u64,
    /// Records skipped as damaged since the last call to [`Spool::take_corrupt`].
    corrupt: u64,
}

fn segment_name(seq: u64) -> String {
    format!("{seq:020}.seg")
}

/// CRC-32 (IEEE 802.3), table-driven.
fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut c = !0u32;
    for &b in data {
        c = TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// One record read at an offset.
enum Read1 {
    /// A good record and the offset after it.
    Record(String, u64),
    /// Nothing more in this file.
    End,
    /// A damaged or cut-short record: the rest of the file cannot be trusted.
    Damaged,
}

fn read_record(file: &mut File, offset: u64, len: u64) -> Read1 {
    if offset >= len {
        return Read1::End;
    }
    if len - offset < HEADER || file.seek(SeekFrom::Start(offset)).is_err() {
        return Read1::Damaged;
    }
    let mut header = [0u8; 8];
    if file.read_exact(&mut header).is_err() {
        return Read1::Damaged;
    }
    let size = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if size > MAX_RECORD || u64::from(size) > len - offset - HEADER {
        return Read1::Damaged;
    }
    let mut payload = vec![0u8; size as usize];
    if file.read_exact(&mut payload).is_err() || crc32(&payload) != crc {
        return Read1::Damaged;
    }
    match String::from_utf8(payload) {
        Ok(s) => Read1::Record(s, offset + HEADER + u64::from(size)),
        Err(_) => Read1::Damaged,
    }
}

impl Spool {
    /// Opens (creating) and locks `dir`, finds the segments a previous run left, and where it
    /// stopped shipping.
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<Spool> {
        use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(dir.join("lock"))?;
        lock_exclusive(&lock, dir)?;
        let mut found: Vec<Segment> = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(seq) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".seg"))
                .filter(|n| n.len() == 20 && n.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            // A file that vanished since the listing is no segment.
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if meta.is_file() {
                found.push(Segment {
                    seq,
                    bytes: meta.len(),
                });
            }
        }
        found.sort_by_key(|s| s.seq);
        let next_seq = found.last().map_or(1, |s| s.seq.saturating_add(1));
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            _lock: lock,
            max_bytes,
            // Segments small enough that dropping the oldest frees a fraction of the bound,
            // large enough that a busy spool is not thousands of files.
            segment_bytes: (max_bytes / 8).clamp(4096, 64 << 20),
            total: found.iter().map(|s| s.bytes).sum(),
            segments: found.into(),
            writer: None,
            next_seq,
            offset: 0,
            corrupt: 0,
        };
        spool.restore_cursor();
        Ok(spool)
    }

    /// Resumes after the last shipped record a previous run noted. Segments before the
    /// cursor's were shipped (their deletion was cut short); a cursor that is not on a record
    /// boundary is ignored: shipping some events twice beats losing any.
    fn restore_cursor(&mut self) {
        let Ok(text) = std::fs::read_to_string(self.dir.join("cursor")) else {
            return;
        };
        let mut parts = text.split_whitespace();
        let (Some(Ok(seq)), Some(Ok(offset))) = (
            parts.next().map(str::parse::<u64>),
            parts.next().map(str::parse::<u64>),
        ) else {
            return;
        };
        if !self.segments.iter().any(|s| s.seq == seq) {
            return;
        }
        while self.segments.front().is_some_and(|s| s.seq < seq) {
            self.remove_front();
        }
        let Some(front) = self.segments.front() else {
            return;
        };
        let Ok(mut file) = File::open(self.dir.join(segment_name(front.seq))) else {
            return;
        };
        let mut at = 0;
        while at < offset {
            match read_record(&mut file, at, front.bytes) {
                Read1::Record(_, next) => at = next,
                _ => break,
            }
        }
        if at == offset {
            self.offset = offset;
        }
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        match self.segments.len() {
            0 => true,
            1 => self.segments[0].bytes <= self.offset,
            _ => false,
        }
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.total
    }

    /// Damaged records skipped since the last call.
    pub fn take_corrupt(&mut self) -> u64 {
        std::mem::take(&mut self.corrupt)
    }

    /// Appends `events` in order and fsyncs; when they would not fit under the bound, the
    /// oldest segments go first (their unshipped events counted in `dropped`).
    pub fn append(&mut self, events: &[String]) -> std::io::Result<Appended> {
        let mut out = Appended::default();
        let mut pending: Vec<u8> = Vec::new();
        for event in events {
            let size = HEADER + event.len() as u64;
            if event.len() as u64 > u64::from(MAX_RECORD) || size > self.max_bytes {
                out.dropped += 1;
                continue;
            }
            while self.total + pending.len() as u64 + size > self.max_bytes
                && !self.segments.is_empty()
            {
                self.flush(&mut pending)?;
                if self.writer.is_some() && self.segments.len() == 1 {
                    // The oldest is the one being written: close it so it can go.
                    self.close_writer()?;
                }
                out.dropped += self.drop_front();
            }
            let full = self
                .segments
                .back()
                .is_some_and(|s| s.bytes + pending.len() as u64 >= self.segment_bytes);
            if self.writer.is_none() || full {
                self.flush(&mut pending)?;
                self.close_writer()?;
                self.open_writer()?;
            }
            pending.extend_from_slice(&(event.len() as u32).to_le_bytes());
            pending.extend_from_slice(&crc32(event.as_bytes()).to_le_bytes());
            pending.extend_from_slice(event.as_bytes());
            out.spooled += 1;
        }
        self.flush(&mut pending)?;
        if let Some(w) = &self.writer {
            w.sync_data()?;
        }
        Ok(out)
    }

    fn flush(&mut self, pending: &mut Vec<u8>) -> std::io::Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let (Some(w), Some(seg)) = (self.writer.as_mut(), self.segments.back_mut()) else {
            return Err(std::io::Error::other("no spool segment open"));
        };
        let result = w.write_all(pending);
        // Count what may have reached the file even on error, so the bound stays honest.
        let written = w.metadata().map(|m| m.len()).unwrap_or(seg.bytes);
        self.total = self.total - seg.bytes + written;
        seg.bytes = written;
        pending.clear();
        result
    }

    fn open_writer(&mut self) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let seq = self.next_seq;
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .mode(0o600)
            .open(self.dir.join(segment_name(seq)))?;
        // The new name must survive a crash too.
        File::open(&self.dir)?.sync_all()?;
        self.next_seq += 1;
        self.segments.push_back(Segment { seq, bytes: 0 });
        self.writer = Some(file);
        Ok(())
    }

    fn close_writer(&mut self) -> std::io::Result<()> {
        if let Some(w) = self.writer.take() {
            w.sync_data()?;
        }
        Ok(())
    }

    /// Drops the oldest segment; returns how many of its events were never shipped.
    fn drop_front(&mut self) -> u64 {
        let Some(front) = self.segments.front() else {
            return 0;
        };
        let mut unshipped = 0;
        if let Ok(mut file) = File::open(self.dir.join(segment_name(front.seq))) {
            let mut at = self.offset;
            loop {
                match read_record(&mut file, at, front.bytes) {
                    Read1::Record(_, next) => {
                        unshipped += 1;
                        at = next;
                    }
                    Read1::End => break,
                    Read1::Damaged => {
                        unshipped += 1;
                        break;
                    }
                }
            }
        }
        self.remove_front();
        unshipped
    }

    fn remove_front(&mut self) {
        if let Some(front) = self.segments.pop_front() {
            let _ = std::fs::remove_file(self.dir.join(segment_name(front.seq)));
            self.total -= front.bytes;
            self.offset = 0;
            if self.segments.is_empty() {
                self.writer = None;
            }
        }
    }

    /// Up to `max` events from the head, oldest first, without consuming them. A damaged
    /// record at the head is skipped (counted) with the rest of its segment.
    pub fn peek(&mut self, max: usize) -> std::io::Result<Head> {
        let mut head = Head {
            events: Vec::new(),
            done_segments: 0,
            offset: self.offset,
        };
        let mut index = 0;
        while head.events.len() < max && index < self.segments.len() {
            let seg = &self.segments[index];
            let (seq, bytes) = (seg.seq, seg.bytes);
            let writing = self.writer.is_some() && index + 1 == self.segments.len();
            let mut file = File::open(self.dir.join(segment_name(seq)))?;
            let mut at = head.offset;
            let mut damaged = false;
            while head.events.len() < max {
                match read_record(&mut file, at, bytes) {
                    Read1::Record(event, next) => {
                        head.events.push(event);
                        at = next;
                    }
                    Read1::End => break,
                    Read1::Damaged => {
                        damaged = true;
                        break;
                    }
                }
            }
            head.offset = at;
            if damaged {
                if !head.events.is_empty() {
                    // Ship what came before; the damage is dealt with at the head next time.
                    return Ok(head);
                }
                // Nothing read yet: the segments before this one are finished, and this one
                // is given up from its damage on.
                for _ in 0..head.done_segments {
                    self.remove_front();
                }
                self.corrupt += 1;
                if writing {
                    self.close_writer()?;
                }
                self.remove_front();
                index = 0;
                head.done_segments = 0;
                head.offset = 0;
                continue;
            }
            if at < bytes || writing {
                break;
            }
            // This segment is wholly read and finished: go on into the next.
            index += 1;
            head.done_segments = index;
            head.offset = 0;
        }
        Ok(head)
    }

    /// Consumes what `head` held (after the SIEM took it): deletes finished segments and
    /// notes the position for the next run.
    pub fn ack(&mut self, head: &Head) {
        for _ in 0..head.done_segments {
            self.remove_front();
        }
        self.offset = head.offset;
        if let Some(front) = self.segments.front()
            && self.segments.len() == 1
            && self.offset >= front.bytes
        {
            // All shipped, the segment being written included: it goes, so the spool's size
            // says what waits, and the next append starts a new one.
            let _ = self.close_writer();
            self.remove_front();
        }
        let cursor = match self.segments.front() {
            Some(front) => format!("{} {}\n", front.seq, self.offset),
            None => String::new(),
        };
        // Written aside and renamed so a crash leaves the old cursor or the new, never half.
        let tmp = self.dir.join("cursor.tmp");
        if std::fs::write(&tmp, cursor).is_ok() {
            let _ = std::fs::rename(&tmp, self.dir.join("cursor"));
        }
    }
}

/// Takes the spool's lock, or says which process has it.
#[allow(unsafe_code)]
fn lock_exclusive(file: &File, dir: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: flock(2) on a descriptor this function's caller owns and keeps open.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.kind() == std::io::ErrorKind::WouldBlock {
        return Err(std::io::Error::other(format!(
            "the spool directory {} is in use by another process (each gateway needs its own \
             audit.spool_dir)",
            dir.display()
        )));
    }
    Err(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(range: std::ops::Range<usize>) -> Vec<String> {
        range.map(|i| format!("{{\"n\":{i}}}")).collect()
    }

    fn drain(spool: &mut Spool) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let head = spool.peek(7).unwrap();
            if head.events.is_empty() {
                return out;
            }
            out.extend(head.events.iter().cloned());
            spool.ack(&head);
        }
    }

    #[test]
    fn crc_matches_the_ieee_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn events_come_back_in_order_across_segments_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 64 * 1024).unwrap();
        assert!(spool.is_empty());
        for chunk in 0..50 {
            let a = spool.append(&events(chunk * 20..chunk * 20 + 20)).unwrap();
            assert_eq!(
                a,
                Appended {
                    spooled: 20,
                    dropped: 0
                }
            );
        }
        assert!(spool.segments.len() > 2, "several segments");
        let head = spool.peek(5).unwrap();
        assert_eq!(head.events, events(0..5));
        spool.ack(&head);
        drop(spool);
        // A new run finds them, resumes after the cursor, and writes a fresh segment.
        let mut spool = Spool::open(dir.path(), 64 * 1024).unwrap();
        spool.append(&events(1000..1010)).unwrap();
        assert_eq!(drain(&mut spool), events(5..1010));
        assert!(spool.is_empty());
        assert_eq!(spool.bytes(), 0);
    }

    #[test]
    fn the_bound_drops_the_oldest_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let max = 16 * 1024;
        let mut spool = Spool::open(dir.path(), max).unwrap();
        let mut dropped = 0;
        for chunk in 0..200 {
            let a = spool.append(&events(chunk * 10..chunk * 10 + 10)).unwrap();
            dropped += a.dropped;
            assert!(spool.bytes() <= max, "{} > {max}", spool.bytes());
            let on_disk: u64 = std::fs::read_dir(dir.path())
                .unwrap()
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
                .map(|e| e.metadata().unwrap().len())
                .sum();
            assert_eq!(on_disk, spool.bytes());
        }
        assert!(dropped > 0);
        let left = drain(&mut spool);
        // Nothing but the oldest went, every drop was counted, and the newest are all there.
        assert_eq!(left.len() as u64 + dropped, 2000);
        assert_eq!(left, events(dropped as usize..2000));
    }

    #[test]
    fn a_torn_tail_is_skipped_and_counted_and_the_drain_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        spool.append(&events(0..3)).unwrap();
        drop(spool);
        // A crash mid-write: half a record at the end of the first segment.
        let first = dir.path().join(segment_name(1));
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&first)
            .unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2]).unwrap();
        drop(f);
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        spool.append(&events(3..6)).unwrap();
        assert_eq!(drain(&mut spool), events(0..6));
        assert_eq!(spool.take_corrupt(), 1);
    }

    #[test]
    fn a_damaged_record_costs_its_segment_not_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        spool.append(&events(0..3)).unwrap();
        drop(spool);
        let first = dir.path().join(segment_name(1));
        let mut bytes = std::fs::read(&first).unwrap();
        let last = bytes.len() - 2;
        bytes[last] ^= 0xff;
        std::fs::write(&first, bytes).unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        spool.append(&events(3..5)).unwrap();
        assert_eq!(drain(&mut spool), [events(0..2), events(3..5)].concat());
        assert_eq!(spool.take_corrupt(), 1);
    }

    #[test]
    fn hostile_files_in_the_directory_are_ignored_and_a_bad_cursor_costs_duplicates_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        spool.append(&events(0..4)).unwrap();
        drop(spool);
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        std::fs::write(dir.path().join("1.seg"), "garbage").unwrap();
        std::fs::write(dir.path().join("cursor"), "1 3\n").unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(drain(&mut spool), events(0..4));
        drop(spool);
        std::fs::write(dir.path().join("cursor"), "99999999999999999999999 x").unwrap();
        Spool::open(dir.path(), 1 << 20).unwrap();
    }

    #[test]
    fn one_process_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let _held = Spool::open(dir.path(), 1 << 20).unwrap();
        let err = Spool::open(dir.path(), 1 << 20).err().unwrap();
        assert!(
            err.to_string().contains("in use by another process"),
            "{err}"
        );
    }
}
