//! `elastio nbd attach`: connect a recovery point to a kernel `/dev/nbdX` through the ioctl
//! interface, with this process serving the other end of a socket pair. Kernels without the nbd
//! module get an error that says so and names the route that works without it (nbdfuse + loop).

use std::fs::OpenOptions;
use std::io;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

use super::server::{serve_kernel, Export};

// _IO(0xab, n): the nbd ioctls (linux/nbd.h).
const NBD_SET_SOCK: libc::c_ulong = 0xab00;
const NBD_SET_BLKSIZE: libc::c_ulong = 0xab01;
const NBD_DO_IT: libc::c_ulong = 0xab03;
const NBD_CLEAR_SOCK: libc::c_ulong = 0xab04;
const NBD_SET_SIZE_BLOCKS: libc::c_ulong = 0xab07;
const NBD_DISCONNECT: libc::c_ulong = 0xab08;
const NBD_SET_FLAGS: libc::c_ulong = 0xab0a;

/// Explains what to do on a kernel without nbd devices.
pub fn no_module_help(device: &Path) -> String {
    format!(
        "{} does not exist: this kernel has no nbd module loaded (try `modprobe nbd`). Without it, \
         serve the RP with `elastio nbd serve <rp>` and attach it through FUSE: \
         `nbdfuse DIR/disk nbd://127.0.0.1:10809/<rp> &` then `mount -o loop,ro DIR/disk /mnt`",
        device.display()
    )
}

#[allow(unsafe_code)]
fn ioctl(fd: i32, request: libc::c_ulong, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: nbd ioctls take an integer argument (no pointers) on an fd we own.
    let r = unsafe { libc::ioctl(fd, request, arg) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Attaches `export` to `device` and serves it until `stop()` returns true.
pub fn attach(device: &Path, export: Export, stop: impl Fn() -> bool) -> io::Result<()> {
    if !device.exists() || !Path::new("/sys/module/nbd").exists() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            no_module_help(device),
        ));
    }
    let dev = OpenOptions::new().read(true).write(true).open(device)?;
    let fd = dev.as_raw_fd();
    let size = export.disk.size();
    let block = if size.is_multiple_of(4096) { 4096 } else { 512 };
    let (kernel_end, server_end) = UnixStream::pair()?;
    ioctl(fd, NBD_SET_BLKSIZE, block)?;
    ioctl(fd, NBD_SET_SIZE_BLOCKS, size / block)?;
    ioctl(fd, NBD_SET_FLAGS, export.flags() as libc::c_ulong)?;
    ioctl(fd, NBD_SET_SOCK, kernel_end.as_raw_fd() as libc::c_ulong).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("{}: {e} (is it in use?)", device.display()),
        )
    })?;

    server_end.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let server = rt.spawn(async move {
        let stream = tokio::net::UnixStream::from_std(server_end)?;
        serve_kernel(stream, export).await
    });
    // NBD_DO_IT blocks until the device is disconnected.
    let doit = std::thread::spawn(move || ioctl(fd, NBD_DO_IT, 0));
    while !stop() && !doit.is_finished() {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = ioctl(fd, NBD_DISCONNECT, 0);
    let result = doit
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("NBD_DO_IT thread panicked")));
    let _ = ioctl(fd, NBD_CLEAR_SOCK, 0);
    drop(kernel_end);
    server.abort();
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    drop(dev);
    result
}
