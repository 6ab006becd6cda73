//! Size-rotated log files: `name.log`, then `name.log.1` ... `name.log.N`.
//! The supervisor writes container output here without buffering lines, so a
//! crash loses nothing already read from the pipe.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;

pub const DEFAULT_MAX_BYTES: u64 = 10 << 20;
pub const DEFAULT_KEEP: u32 = 3;

pub struct RotatingLog {
    path: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
    keep: u32,
}

impl RotatingLog {
    pub fn open(path: PathBuf, max_bytes: u64, keep: u32) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let size = file.metadata()?.len();
        Ok(RotatingLog {
            path,
            file,
            size,
            max_bytes: max_bytes.max(1),
            keep,
        })
    }

    pub fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            if self.size >= self.max_bytes {
                self.rotate()?;
            }
            let room = (self.max_bytes - self.size) as usize;
            let n = room.min(data.len());
            self.file.write_all(&data[..n])?;
            self.size += n as u64;
            data = &data[n..];
        }
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let name = |i: u32| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{i}"));
            PathBuf::from(p)
        };
        if self.keep == 0 {
            self.file.set_len(0)?;
        } else {
            let _ = fs::remove_file(name(self.keep));
            for i in (1..self.keep).rev() {
                let _ = fs::rename(name(i), name(i + 1));
            }
            fs::rename(&self.path, name(1))?;
            self.file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
        }
        self.size = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_and_keeps_n_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("out.log");
        let mut log = RotatingLog::open(p.clone(), 10, 2).expect("open");
        log.write_all(&[b'a'; 35]).expect("write");
        assert_eq!(fs::read(&p).expect("read").len(), 5);
        assert_eq!(fs::read(dir.path().join("out.log.1")).expect("1").len(), 10);
        assert_eq!(fs::read(dir.path().join("out.log.2")).expect("2").len(), 10);
        assert!(!dir.path().join("out.log.3").exists());
    }
}
