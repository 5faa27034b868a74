//! NBD access to recovery points: [`proto`] is the wire format (pure, byte-tested), [`server`] the
//! tokio server that serves one export per disk RP through the shared [`scalez::reader::DiskReader`].

pub mod attach;
pub mod client;
pub mod proto;
pub mod server;

pub use server::{Disk, Export, Listen, Server, ServerOptions, Tls};
