//! Floats as Calico's Go code writes them: `order` fields in stored JSON (encoding/json) and
//! in calicoctl's ORDER column (a Go template's `%v`). Tiers and policies share them.

use serde::Serializer;

/// A float field as Go's encoding/json writes a float64: integral values without a
/// fraction (`"order":1000000`, not serde's `1000000.0`), so the stored bytes are Calico's.
pub fn json<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => s.serialize_i64(*f as i64),
        Some(f) => s.serialize_f64(*f),
        None => s.serialize_none(),
    }
}

/// A float as Go's `fmt` prints it with `%v` (calicoctl's `{{.Spec.Order}}`): shortest
/// digits, in exponent form (`1e+06`, `1.5e-05`) when the decimal exponent is below -4 or
/// at least 6, as strconv's shortest `'g'` does.
pub fn fmt_v(f: f64) -> String {
    if f == 0.0 || !f.is_finite() {
        return if f.is_nan() {
            "NaN".into()
        } else if f.is_infinite() {
            if f > 0.0 { "+Inf" } else { "-Inf" }.into()
        } else {
            "0".into()
        };
    }
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..6).contains(&exp) {
        return f.to_string();
    }
    let sign = if exp < 0 { '-' } else { '+' };
    format!("{mantissa}e{sign}{:02}", exp.abs())
}
