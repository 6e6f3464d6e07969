//! BGP AS numbers (1..=4294967295), written as a number or in asdot (`1.10`) form.

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A 4-octet AS number (RFC 6793). 0 is reserved and refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AsNumber(pub u32);

/// Why an AS number does not parse.
pub const AS_RANGE: &str =
    "AS number must be between 1 and 4294967295 (or asdot 0.1 to 65535.65535)";

impl AsNumber {
    /// Parse `64512` or asdot `1.10` (= 1*65536 + 10).
    pub fn parse(s: &str) -> Option<AsNumber> {
        let s = s.trim();
        let v: u64 = match s.split_once('.') {
            Some((hi, lo)) => {
                let hi: u64 = hi.parse().ok()?;
                let lo: u64 = lo.parse().ok()?;
                if hi > 65535 || lo > 65535 {
                    return None;
                }
                hi * 65536 + lo
            }
            None => s.parse().ok()?,
        };
        Self::from_u64(v)
    }

    fn from_u64(v: u64) -> Option<AsNumber> {
        if v == 0 || v > u64::from(u32::MAX) {
            None
        } else {
            Some(AsNumber(v as u32))
        }
    }
}

impl fmt::Display for AsNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Serialize for AsNumber {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(self.0)
    }
}

struct AsVisitor;

impl Visitor<'_> for AsVisitor {
    type Value = AsNumber;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(AS_RANGE)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<AsNumber, E> {
        AsNumber::from_u64(v).ok_or_else(|| E::custom(format!("{v}: {AS_RANGE}")))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<AsNumber, E> {
        u64::try_from(v)
            .ok()
            .and_then(AsNumber::from_u64)
            .ok_or_else(|| E::custom(format!("{v}: {AS_RANGE}")))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<AsNumber, E> {
        AsNumber::parse(v).ok_or_else(|| E::custom(format!("'{v}': {AS_RANGE}")))
    }
}

impl<'de> Deserialize<'de> for AsNumber {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<AsNumber, D::Error> {
        d.deserialize_any(AsVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_asdot_forms_parse() {
        assert_eq!(AsNumber::parse("64512"), Some(AsNumber(64512)));
        assert_eq!(AsNumber::parse("1.10"), Some(AsNumber(65546)));
        assert_eq!(AsNumber::parse("4294967295"), Some(AsNumber(u32::MAX)));
        assert_eq!(AsNumber::parse("4294967296"), None);
        assert_eq!(AsNumber::parse("0"), None);
        assert_eq!(AsNumber::parse("65536.1"), None);
    }

    #[test]
    fn json_refuses_out_of_range_with_the_range() {
        let e = serde_json::from_str::<AsNumber>("0")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("AS number must be between 1 and 4294967295"),
            "{e}"
        );
        assert_eq!(
            serde_json::from_str::<AsNumber>("\"1.1\"").unwrap(),
            AsNumber(65537)
        );
        assert_eq!(serde_json::to_string(&AsNumber(65001)).unwrap(), "65001");
    }
}
