//! Randomness from the host for a guest: the seed a booting kernel gets in its
//! `setup_data`, and the entropy a restored guest's agent mixes in.

/// `len` bytes from the host's generator: getrandom(2), not /dev/urandom, because a jailed
/// vmm has no /dev/urandom (and its filters allow getrandom, not open).
pub fn host_random(len: usize) -> std::io::Result<Vec<u8>> {
    let mut bytes = vec![0u8; len];
    let mut filled = 0;
    while filled < bytes.len() {
        let rest = &mut bytes[filled..];
        // SAFETY: the buffer pointer and length describe `rest`, owned and writable here;
        // flags 0 blocks only until the generator is seeded (long done on a running host).
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match n {
            n if n > 0 => filled += n as usize,
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_every_byte_and_differs_between_calls() {
        let (a, b) = (host_random(64).unwrap(), host_random(64).unwrap());
        assert_eq!(a.len(), 64);
        assert_ne!(
            a, b,
            "two draws of 64 bytes from the host's generator were equal"
        );
    }
}
