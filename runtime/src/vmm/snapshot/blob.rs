//! KVM state structures as bytes in the snapshot.
//!
//! The `kvm_*` structures KVM hands out are plain C structures of integers and byte
//! arrays whose layout is fixed by the KVM ABI, so they are stored as their exact bytes
//! (hex in the JSON state). Decoding checks the length, so a field from a different
//! structure or a damaged file is an error instead of garbage in a vCPU.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::SnapshotError;

/// A KVM ABI structure that may be copied to and from bytes.
///
/// # Safety
///
/// Implement only for `#[repr(C)]` structures made of integers and arrays of integers
/// (unions of such included), for which every bit pattern is a valid value.
pub unsafe trait KvmStruct: Default {
    /// The name used in errors.
    const NAME: &'static str;
}

macro_rules! kvm_struct {
    ($($ty:ident),* $(,)?) => {$(
        // SAFETY: a kvm-bindings ABI structure of integers, arrays and unions of them.
        unsafe impl KvmStruct for kvm_bindings::$ty {
            const NAME: &'static str = stringify!($ty);
        }
    )*};
}

kvm_struct!(
    kvm_regs,
    kvm_sregs,
    kvm_fpu,
    kvm_xsave,
    kvm_xcrs,
    kvm_debugregs,
    kvm_lapic_state,
    kvm_mp_state,
    kvm_vcpu_events,
    kvm_irqchip,
    kvm_pit_state2,
    kvm_clock_data,
);

/// The bytes of one KVM structure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob(pub Vec<u8>);

impl Blob {
    /// The exact bytes of `value`.
    pub fn of<T: KvmStruct>(value: &T) -> Self {
        let len = std::mem::size_of::<T>();
        // SAFETY: `value` is a live `T` of `len` bytes; KvmStruct types have no padding
        // that could be uninitialized in a way that matters for reading as bytes (they
        // come from KVM or `Default`, which zero the whole structure).
        let bytes = unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), len) };
        Self(bytes.to_vec())
    }

    /// The structure these bytes hold; `field` names it in the error.
    pub fn decode<T: KvmStruct>(&self, field: &'static str) -> Result<T, SnapshotError> {
        let len = std::mem::size_of::<T>();
        if self.0.len() != len {
            return Err(SnapshotError::FieldSize {
                field,
                kind: T::NAME,
                found: self.0.len(),
                expected: len,
            });
        }
        let mut value = T::default();
        // SAFETY: `value` is a `T` of `len` bytes, the source has exactly `len` bytes, they
        // do not overlap, and every bit pattern is a valid `T` (KvmStruct contract).
        unsafe {
            std::ptr::copy_nonoverlapping(self.0.as_ptr(), (&mut value as *mut T).cast::<u8>(), len)
        };
        Ok(value)
    }
}

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut hex = String::with_capacity(self.0.len() * 2);
        for b in &self.0 {
            hex.push(char::from(HEX[usize::from(b >> 4)]));
            hex.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        s.serialize_str(&hex)
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let hex = String::deserialize(d)?;
        decode_hex(&hex)
            .map(Blob)
            .ok_or_else(|| serde::de::Error::custom("invalid hex in a KVM state field"))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let bytes = hex.as_bytes();
    if !bytes.len().is_multiple_of(2) {
        return None;
    }
    bytes
        .chunks_exact(2)
        .map(|p| Some((digit(p[0])? << 4) | digit(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use kvm_bindings::{kvm_pit_state2, kvm_regs};

    use super::*;

    #[test]
    fn round_trips_through_json() {
        let regs = kvm_regs {
            rip: 0x1234_5678,
            rax: u64::MAX,
            rflags: 2,
            ..Default::default()
        };
        let json = serde_json::to_string(&Blob::of(&regs)).unwrap();
        let back: Blob = serde_json::from_str(&json).unwrap();
        let decoded: kvm_regs = back.decode("regs").unwrap();
        assert_eq!(decoded.rip, 0x1234_5678);
        assert_eq!(decoded.rax, u64::MAX);
        assert_eq!(decoded.rflags, 2);
    }

    #[test]
    fn wrong_size_and_bad_hex_are_errors() {
        let blob = Blob::of(&kvm_regs::default());
        let err = blob
            .decode::<kvm_pit_state2>("pit")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pit") && err.contains("kvm_pit_state2"),
            "{err}"
        );
        assert!(serde_json::from_str::<Blob>("\"0g\"").is_err());
        assert!(serde_json::from_str::<Blob>("\"abc\"").is_err());
    }
}
