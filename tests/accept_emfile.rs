//! The accept loop shared by the health and metrics endpoints and the BGP listener, out
//! of descriptors for real: it pauses instead of spinning, and accepts the queued
//! connection once a descriptor is free. One test in its own binary (its own process):
//! it lowers the process's descriptor limit.

use std::time::Duration;

use calico_node::accept::{AcceptBackoff, accept};

/// The descriptor number the kernel would hand out next (the lowest free one).
fn next_fd() -> u64 {
    use std::os::fd::AsRawFd;
    std::fs::File::open("/dev/null").unwrap().as_raw_fd() as u64
}

fn set_soft_nofile(n: u64) {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut r), 0);
        r.rlim_cur = n.min(r.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &r), 0);
    }
}

/// CPU time (user + system) of the calling thread.
fn thread_cpu() -> Duration {
    // SAFETY: getrusage writes only into `u`.
    let u = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut u);
        u
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

#[test]
fn emfile_pauses_the_accept_loop_and_the_queued_connection_is_taken_later() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut original: libc::rlimit = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut original) };
        // No descriptor number left: accept fails with EMFILE while the connection waits
        // in the backlog.
        let client = std::net::TcpStream::connect(addr).unwrap();
        set_soft_nofile(next_fd());
        let mut backoff = AcceptBackoff::default();
        let cpu = thread_cpu();
        let r = tokio::time::timeout(
            Duration::from_millis(1500),
            accept(&listener, &mut backoff, "test"),
        )
        .await;
        let used = thread_cpu() - cpu;
        assert!(r.is_err(), "no descriptor: nothing can be accepted");
        assert!(
            used < Duration::from_millis(200),
            "the accept loop used {used:?} of CPU in 1.5 s of EMFILE"
        );
        set_soft_nofile(original.rlim_cur);
        let (_stream, from) = tokio::time::timeout(
            Duration::from_secs(3),
            accept(&listener, &mut backoff, "test"),
        )
        .await
        .expect("the queued connection is accepted once a descriptor is free");
        assert_eq!(from, client.local_addr().unwrap());
    });
}
