//! A stream RP as a [`FileSystem`] of one file, so a scan judges its bytes like a file's (a
//! `pg_dump` turned ciphertext, a planted string in a Kafka topic's records). The file's content
//! key is its chunk list's, so an unchanged stream is not read again.

use std::io;
use std::sync::Arc;
use std::time::SystemTime;

use mount::filesystem::{Attr, Entry, FileData, FileSystem, Kind};
use scalez::stream_map::StreamReader;

const ROOT: u64 = 1;
const FILE: u64 = 2;

pub struct StreamFs {
    reader: Arc<StreamReader>,
    name: Vec<u8>,
    time: SystemTime,
}

impl StreamFs {
    /// `name`: what the file is called in findings (the asset's name, `/` made `_`).
    pub fn new(reader: StreamReader, name: &str, time: SystemTime) -> Self {
        let mut name: String = name
            .chars()
            .map(|c| if c == '/' || c.is_control() { '_' } else { c })
            .collect();
        if name.is_empty() || name == "." || name == ".." {
            name = "stream".into();
        }
        StreamFs {
            reader: Arc::new(reader),
            name: name.into_bytes(),
            time,
        }
    }
}

impl FileSystem for StreamFs {
    fn type_name(&self) -> &'static str {
        "stream"
    }

    fn root(&self) -> u64 {
        ROOT
    }

    fn attr(&self, ino: u64) -> io::Result<Attr> {
        let (kind, size, perm) = match ino {
            ROOT => (Kind::Dir, 0, 0o555),
            FILE => (Kind::File, self.reader.size(), 0o444),
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no inode {ino}"),
                ))
            }
        };
        Ok(Attr {
            kind,
            perm,
            size,
            blocks: size.div_ceil(512),
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            atime: self.time,
            mtime: self.time,
            ctime: self.time,
            crtime: self.time,
        })
    }

    fn read_dir(&self, ino: u64) -> io::Result<Vec<Entry>> {
        if ino != ROOT {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                "not a directory",
            ));
        }
        Ok(vec![Entry {
            name: self.name.clone(),
            ino: FILE,
            kind: Some(Kind::File),
        }])
    }

    fn read_link(&self, _ino: u64) -> io::Result<Vec<u8>> {
        Err(io::Error::new(io::ErrorKind::InvalidInput, "not a symlink"))
    }

    fn open(self: Arc<Self>, ino: u64) -> io::Result<Arc<dyn FileData>> {
        if ino != FILE {
            return Err(io::Error::new(
                io::ErrorKind::IsADirectory,
                "not a regular file",
            ));
        }
        Ok(Arc::new(StreamData(self.reader.clone())))
    }
}

struct StreamData(Arc<StreamReader>);

impl FileData for StreamData {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn read_append(&self, offset: u64, len: usize, out: &mut Vec<u8>) -> io::Result<()> {
        self.0
            .read_append(offset, len, out)
            .map(|_| ())
            .map_err(io::Error::other)
    }

    fn disk_ranges(&self, _offset: u64, _len: u64) -> Vec<(u64, u64)> {
        Vec::new()
    }

    fn content_key(&self) -> Option<Vec<u8>> {
        Some(self.0.content_key())
    }
}
