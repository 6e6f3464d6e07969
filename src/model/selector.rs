//! Calico's label selector language (used by `nodeSelector`, `peerSelector`, ...), parsed
//! into an expression and evaluated over a label map.
//!
//! Grammar (Calico's, REFERENCE §2):
//! ```text
//! expr    := and ( "||" and )*
//! and     := unary ( "&&" unary )*
//! unary   := "!" unary | primary
//! primary := "(" expr ")" | "all()" | "has(" key ")"
//!          | key "==" str | key "!=" str
//!          | key "in" set | key "not" "in" set
//!          | key "contains" str | key "starts" "with" str | key "ends" "with" str
//! set     := "{" [ str ( "," str )* ] "}"
//! str     := '...' | "..."
//! key     := [A-Za-z0-9_./-]+
//! ```
//! The empty selector means `all()`. Semantics as Calico: `k != 'v'` and `k not in {..}`
//! are true when the label is absent; `==`, `in` and the string matches are false then.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// A parsed selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    root: Expr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Expr {
    All,
    Has(String),
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Contains(String, String),
    StartsWith(String, String),
    EndsWith(String, String),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
}

/// A selector that does not parse, pointing at the position of the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid selector at position {position}: {message}\n  {input}\n  {caret}")]
pub struct SelectorError {
    /// 0-based character offset of the problem.
    pub position: usize,
    pub message: String,
    pub input: String,
    /// Spaces then `^` under the position.
    pub caret: String,
}

impl Selector {
    /// Parse a selector; `""` is `all()`.
    pub fn parse(input: &str) -> Result<Selector, SelectorError> {
        let mut p = Parser {
            chars: input.chars().collect(),
            pos: 0,
            input,
        };
        p.skip_ws();
        if p.at_end() {
            return Ok(Selector::all());
        }
        let root = p.expr()?;
        p.skip_ws();
        if !p.at_end() {
            return Err(p.error("trailing input after selector"));
        }
        Ok(Selector { root })
    }

    /// The selector that matches everything.
    pub fn all() -> Selector {
        Selector { root: Expr::All }
    }

    /// Whether this is `all()` (or the empty selector).
    pub fn is_all(&self) -> bool {
        self.root == Expr::All
    }

    /// Evaluate over a label map.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.root.eval(labels)
    }

    /// Calico's canonical text of the selector (`Selector.String()` in libcalico-go's
    /// parser): every `&&`/`||` chain in parentheses, values in double quotes (single
    /// when they hold a double quote), `in` sets sorted. Felix's IP set ids hash it.
    pub fn canonical(&self) -> String {
        let mut out = String::new();
        self.root.canonical(&mut out);
        out
    }

    /// The same selector with every label name prefixed (Calico's `PrefixVisitor`, used
    /// for `namespaceSelector` (`pcns.`) and service account selectors (`pcsa.`)).
    pub fn prefixed(&self, prefix: &str) -> Selector {
        Selector {
            root: self.root.prefixed(prefix),
        }
    }
}

impl FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Selector::parse(s)
    }
}

fn canonical_quote(s: &str) -> String {
    if s.contains('"') {
        format!("'{s}'")
    } else {
        format!("\"{s}\"")
    }
}

impl Expr {
    /// The operands of a chain of one operator (the parser nests them to the left).
    fn chain<'a>(&'a self, out: &mut Vec<&'a Expr>, and: bool) {
        match (self, and) {
            (Expr::And(a, b), true) | (Expr::Or(a, b), false) => {
                a.chain(out, and);
                b.chain(out, and);
            }
            _ => out.push(self),
        }
    }

    fn canonical(&self, out: &mut String) {
        let set = |s: &[String]| {
            let mut v: Vec<&String> = s.iter().collect();
            v.sort();
            v.dedup();
            v.iter()
                .map(|x| canonical_quote(x))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            Expr::All => out.push_str("all()"),
            Expr::Has(k) => out.push_str(&format!("has({k})")),
            Expr::Eq(k, v) => out.push_str(&format!("{k} == {}", canonical_quote(v))),
            Expr::Ne(k, v) => out.push_str(&format!("{k} != {}", canonical_quote(v))),
            Expr::In(k, s) => out.push_str(&format!("{k} in {{{}}}", set(s))),
            Expr::NotIn(k, s) => out.push_str(&format!("{k} not in {{{}}}", set(s))),
            Expr::Contains(k, v) => out.push_str(&format!("{k} contains {}", canonical_quote(v))),
            Expr::StartsWith(k, v) => {
                out.push_str(&format!("{k} starts with {}", canonical_quote(v)))
            }
            Expr::EndsWith(k, v) => out.push_str(&format!("{k} ends with {}", canonical_quote(v))),
            Expr::Not(e) => {
                out.push('!');
                e.canonical(out);
            }
            Expr::And(..) | Expr::Or(..) => {
                let and = matches!(self, Expr::And(..));
                let mut ops = Vec::new();
                self.chain(&mut ops, and);
                out.push('(');
                for (i, e) in ops.iter().enumerate() {
                    if i > 0 {
                        out.push_str(if and { " && " } else { " || " });
                    }
                    e.canonical(out);
                }
                out.push(')');
            }
        }
    }

    fn prefixed(&self, p: &str) -> Expr {
        let k = |k: &String| format!("{p}{k}");
        match self {
            Expr::All => Expr::All,
            Expr::Has(x) => Expr::Has(k(x)),
            Expr::Eq(x, v) => Expr::Eq(k(x), v.clone()),
            Expr::Ne(x, v) => Expr::Ne(k(x), v.clone()),
            Expr::In(x, v) => Expr::In(k(x), v.clone()),
            Expr::NotIn(x, v) => Expr::NotIn(k(x), v.clone()),
            Expr::Contains(x, v) => Expr::Contains(k(x), v.clone()),
            Expr::StartsWith(x, v) => Expr::StartsWith(k(x), v.clone()),
            Expr::EndsWith(x, v) => Expr::EndsWith(k(x), v.clone()),
            Expr::Not(e) => Expr::Not(Box::new(e.prefixed(p))),
            Expr::And(a, b) => Expr::And(Box::new(a.prefixed(p)), Box::new(b.prefixed(p))),
            Expr::Or(a, b) => Expr::Or(Box::new(a.prefixed(p)), Box::new(b.prefixed(p))),
        }
    }

    fn eval(&self, l: &BTreeMap<String, String>) -> bool {
        let get = |k: &str| l.get(k).map(String::as_str);
        match self {
            Expr::All => true,
            Expr::Has(k) => l.contains_key(k),
            Expr::Eq(k, v) => get(k) == Some(v.as_str()),
            Expr::Ne(k, v) => get(k) != Some(v.as_str()),
            Expr::In(k, set) => get(k).is_some_and(|x| set.iter().any(|s| s == x)),
            Expr::NotIn(k, set) => !get(k).is_some_and(|x| set.iter().any(|s| s == x)),
            Expr::Contains(k, v) => get(k).is_some_and(|x| x.contains(v.as_str())),
            Expr::StartsWith(k, v) => get(k).is_some_and(|x| x.starts_with(v.as_str())),
            Expr::EndsWith(k, v) => get(k).is_some_and(|x| x.ends_with(v.as_str())),
            Expr::Not(e) => !e.eval(l),
            Expr::And(a, b) => a.eval(l) && b.eval(l),
            Expr::Or(a, b) => a.eval(l) || b.eval(l),
        }
    }

    /// Binding strength, for printing parentheses only where needed.
    fn precedence(&self) -> u8 {
        match self {
            Expr::Or(..) => 1,
            Expr::And(..) => 2,
            _ => 3,
        }
    }
}

fn quote(s: &str) -> String {
    if s.contains('\'') {
        format!("\"{s}\"")
    } else {
        format!("'{s}'")
    }
}

fn set_text(set: &[String]) -> String {
    set.iter().map(|s| quote(s)).collect::<Vec<_>>().join(", ")
}

fn write_child(f: &mut fmt::Formatter<'_>, e: &Expr, min: u8) -> fmt::Result {
    if e.precedence() < min {
        write!(f, "({e})")
    } else {
        write!(f, "{e}")
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::All => f.write_str("all()"),
            Expr::Has(k) => write!(f, "has({k})"),
            Expr::Eq(k, v) => write!(f, "{k} == {}", quote(v)),
            Expr::Ne(k, v) => write!(f, "{k} != {}", quote(v)),
            Expr::In(k, s) => write!(f, "{k} in {{{}}}", set_text(s)),
            Expr::NotIn(k, s) => write!(f, "{k} not in {{{}}}", set_text(s)),
            Expr::Contains(k, v) => write!(f, "{k} contains {}", quote(v)),
            Expr::StartsWith(k, v) => write!(f, "{k} starts with {}", quote(v)),
            Expr::EndsWith(k, v) => write!(f, "{k} ends with {}", quote(v)),
            Expr::Not(e) => {
                f.write_str("!")?;
                write_child(f, e, 3)
            }
            Expr::And(a, b) => {
                write_child(f, a, 2)?;
                f.write_str(" && ")?;
                write_child(f, b, 3)
            }
            Expr::Or(a, b) => {
                write_child(f, a, 1)?;
                f.write_str(" || ")?;
                write_child(f, b, 2)
            }
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.root.fmt(f)
    }
}

struct Parser<'a> {
    chars: Vec<char>,
    pos: usize,
    input: &'a str,
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-')
}

impl Parser<'_> {
    fn error_at(&self, position: usize, message: &str) -> SelectorError {
        SelectorError {
            position,
            message: message.to_string(),
            input: self.input.to_string(),
            caret: format!("{}^", " ".repeat(position)),
        }
    }

    fn error(&self, message: &str) -> SelectorError {
        let message = if self.at_end() && message != "trailing input after selector" {
            "unexpected end of selector".to_string()
        } else {
            message.to_string()
        };
        self.error_at(self.pos, &message)
    }

    fn at_end(&self) -> bool {
        self.pos >= self.chars.len()
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    /// Consume `s` (after whitespace) if it is next.
    fn eat(&mut self, s: &str) -> bool {
        self.skip_ws();
        let n = s.chars().count();
        if self.chars.len() >= self.pos + n
            && self.chars[self.pos..self.pos + n]
                .iter()
                .copied()
                .eq(s.chars())
        {
            self.pos += n;
            true
        } else {
            false
        }
    }

    /// Consume a word (keyword) only when it is not the prefix of a longer key.
    fn eat_word(&mut self, w: &str) -> bool {
        let save = self.pos;
        if self.eat(w) && !self.peek().is_some_and(is_key_char) {
            return true;
        }
        self.pos = save;
        false
    }

    fn expect(&mut self, s: &str, message: &str) -> Result<(), SelectorError> {
        if self.eat(s) {
            Ok(())
        } else {
            self.skip_ws();
            Err(self.error(message))
        }
    }

    fn expr(&mut self) -> Result<Expr, SelectorError> {
        let mut left = self.and()?;
        while self.eat("||") {
            let right = self.and()?;
            left = Expr::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, SelectorError> {
        let mut left = self.unary()?;
        while self.eat("&&") {
            let right = self.unary()?;
            left = Expr::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Expr, SelectorError> {
        self.skip_ws();
        // `!=` never starts a term, so a leading `!` is always negation.
        if self.eat("!") {
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Expr, SelectorError> {
        self.skip_ws();
        if self.eat("(") {
            let e = self.expr()?;
            self.expect(")", "expected ')'")?;
            return Ok(e);
        }
        let save = self.pos;
        if self.eat_word("all") {
            if self.eat("(") {
                self.expect(")", "expected ')' after 'all('")?;
                return Ok(Expr::All);
            }
            self.pos = save;
        }
        if self.eat_word("has") {
            if self.eat("(") {
                self.skip_ws();
                let k = self.key()?;
                self.expect(")", "expected ')' after the label name")?;
                return Ok(Expr::Has(k));
            }
            self.pos = save;
        }
        let key = self.key()?;
        self.comparison(key)
    }

    fn comparison(&mut self, key: String) -> Result<Expr, SelectorError> {
        if self.eat("==") {
            return Ok(Expr::Eq(
                key,
                self.string("expected a quoted string after '=='")?,
            ));
        }
        if self.eat("!=") {
            return Ok(Expr::Ne(
                key,
                self.string("expected a quoted string after '!='")?,
            ));
        }
        if self.eat_word("in") {
            return Ok(Expr::In(key, self.set()?));
        }
        if self.eat_word("not") {
            if !self.eat_word("in") {
                self.skip_ws();
                return Err(self.error("expected 'in' after 'not'"));
            }
            return Ok(Expr::NotIn(key, self.set()?));
        }
        if self.eat_word("contains") {
            return Ok(Expr::Contains(
                key,
                self.string("expected a quoted string after 'contains'")?,
            ));
        }
        for (first, make) in [
            ("starts", Expr::StartsWith as fn(String, String) -> Expr),
            ("ends", Expr::EndsWith),
        ] {
            if self.eat_word(first) {
                if !self.eat_word("with") {
                    self.skip_ws();
                    return Err(self.error(&format!("expected 'with' after '{first}'")));
                }
                let v = self.string(&format!("expected a quoted string after '{first} with'"))?;
                return Ok(make(key, v));
            }
        }
        self.skip_ws();
        Err(self
            .error("expected an operator (==, !=, in, not in, contains, starts with, ends with)"))
    }

    fn key(&mut self) -> Result<String, SelectorError> {
        self.skip_ws();
        let start = self.pos;
        while self.peek().is_some_and(is_key_char) {
            self.pos += 1;
        }
        if self.pos == start {
            return Err(match self.peek() {
                Some(c) => self.error(&format!("unexpected character '{c}'")),
                None => self.error("unexpected end of selector"),
            });
        }
        Ok(self.chars[start..self.pos].iter().collect())
    }

    fn string(&mut self, message: &str) -> Result<String, SelectorError> {
        self.skip_ws();
        let quote = match self.peek() {
            Some(q @ ('\'' | '"')) => q,
            _ => return Err(self.error(message)),
        };
        let start = self.pos;
        self.pos += 1;
        let body_start = self.pos;
        while let Some(c) = self.peek() {
            if c == quote {
                let s = self.chars[body_start..self.pos].iter().collect();
                self.pos += 1;
                return Ok(s);
            }
            self.pos += 1;
        }
        Err(self.error_at(start, "unterminated string literal"))
    }

    fn set(&mut self) -> Result<Vec<String>, SelectorError> {
        self.expect("{", "expected '{' to start a set")?;
        let mut out = Vec::new();
        if self.eat("}") {
            return Ok(out);
        }
        loop {
            out.push(self.string("expected a quoted string in the set")?);
            if self.eat("}") {
                return Ok(out);
            }
            if !self.eat(",") {
                self.skip_ws();
                return Err(self.error("expected '}' or ','"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn m(sel: &str, pairs: &[(&str, &str)]) -> bool {
        Selector::parse(sel).unwrap().matches(&labels(pairs))
    }

    #[test]
    fn all_and_empty_match_everything() {
        assert!(m("all()", &[]));
        assert!(m("", &[("a", "b")]));
        assert!(m("  all( )  ", &[]));
        assert!(Selector::parse("").unwrap().is_all());
        assert!(!Selector::parse("has(a)").unwrap().is_all());
    }

    #[test]
    fn has_and_not_has() {
        assert!(m("has(routeReflector)", &[("routeReflector", "")]));
        assert!(!m("has(routeReflector)", &[]));
        assert!(m("!has(routeReflector)", &[]));
        assert!(!m("! has(routeReflector)", &[("routeReflector", "x")]));
    }

    #[test]
    fn equality_with_either_quote() {
        assert!(m("zone == 'a'", &[("zone", "a")]));
        assert!(m("zone==\"a\"", &[("zone", "a")]));
        assert!(!m("zone == 'a'", &[("zone", "b")]));
        assert!(!m("zone == 'a'", &[]));
    }

    #[test]
    fn not_equal_matches_when_label_absent() {
        assert!(m("zone != 'a'", &[]));
        assert!(m("zone != 'a'", &[("zone", "b")]));
        assert!(!m("zone != 'a'", &[("zone", "a")]));
    }

    #[test]
    fn set_membership() {
        assert!(m("zone in {'a','b'}", &[("zone", "b")]));
        assert!(!m("zone in {'a', 'b'}", &[("zone", "c")]));
        assert!(!m("zone in {'a'}", &[]));
        assert!(!m("zone in {}", &[("zone", "a")]));
        assert!(m("zone not in {'a','b'}", &[("zone", "c")]));
        assert!(m("zone not in {'a'}", &[]));
        assert!(!m("zone not in { 'a' }", &[("zone", "a")]));
    }

    #[test]
    fn string_matches() {
        assert!(m("name contains 'mid'", &[("name", "amidst")]));
        assert!(m("name starts with 'rack-'", &[("name", "rack-1")]));
        assert!(m("name ends with '-1'", &[("name", "rack-1")]));
        assert!(!m("name ends with '-1'", &[]));
    }

    #[test]
    fn and_binds_tighter_than_or() {
        // a || (b && c)
        assert!(m("has(a) || has(b) && has(c)", &[("a", "")]));
        assert!(!m("has(a) || has(b) && has(c)", &[("b", "")]));
        assert!(m("(has(a) || has(b)) && has(c)", &[("b", ""), ("c", "")]));
        assert!(!m("(has(a) || has(b)) && has(c)", &[("a", "")]));
    }

    #[test]
    fn negation_binds_tightest_and_nests() {
        assert!(m("!has(a) && has(b)", &[("b", "")]));
        assert!(!m("!(has(a) || has(b))", &[("b", "")]));
        assert!(m("!!has(a)", &[("a", "")]));
        assert!(m("((zone == 'a'))", &[("zone", "a")]));
    }

    #[test]
    fn keys_with_dots_slashes_and_dashes() {
        assert!(m(
            "kubernetes.io/hostname == 'node-1'",
            &[("kubernetes.io/hostname", "node-1")]
        ));
        assert!(m(
            "projectcalico.org/namespace in {'ns1'}",
            &[("projectcalico.org/namespace", "ns1")]
        ));
        assert!(m("has(my_label-1)", &[("my_label-1", "")]));
    }

    #[test]
    fn keywords_are_not_confused_with_keys() {
        assert!(m("hasfoo == 'x'", &[("hasfoo", "x")]));
        assert!(m("all == 'x'", &[("all", "x")]));
        assert!(m("index in {'x'}", &[("index", "x")]));
        assert!(m("notes not in {'x'}", &[]));
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "all()",
            "has(a)",
            "!has(a)",
            "a == 'x'",
            "a != \"it's\"",
            "a in {'x', 'y'}",
            "a not in {}",
            "has(a) && b == 'x' || c != 'y'",
            "has(a) && (b == 'x' || c != 'y')",
            "!(has(a) || has(b)) && has(c)",
            "a contains 'x' && b starts with 'y' && c ends with 'z'",
            "!(a == 'x')",
            "(has(a) || has(b)) || has(c)",
        ] {
            let p = Selector::parse(s).unwrap();
            let again = Selector::parse(&p.to_string()).unwrap();
            assert_eq!(p, again, "{s} -> {p}");
        }
        assert_eq!(
            Selector::parse("has(a)&&(b=='x'||c!='y')")
                .unwrap()
                .to_string(),
            "has(a) && (b == 'x' || c != 'y')"
        );
        assert_eq!(
            Selector::parse("a in {\"x\",'y'}").unwrap().to_string(),
            "a in {'x', 'y'}"
        );
    }

    fn err(s: &str) -> SelectorError {
        Selector::parse(s).unwrap_err()
    }

    #[test]
    fn error_points_at_unterminated_string() {
        let e = err("zone == 'a");
        assert_eq!(
            (e.position, e.message.as_str()),
            (8, "unterminated string literal")
        );
        assert_eq!(e.caret, "        ^");
        assert_eq!(
            e.to_string(),
            "invalid selector at position 8: unterminated string literal\n  zone == 'a\n          ^"
        );
    }

    #[test]
    fn errors_name_what_was_expected() {
        let e = err("zone == a");
        assert_eq!(
            (e.position, e.message.as_str()),
            (8, "expected a quoted string after '=='")
        );
        let e = err("has(a");
        assert_eq!(
            (e.position, e.message.as_str()),
            (5, "unexpected end of selector")
        );
        let e = err("(has(a) || has(b)");
        assert_eq!(
            (e.position, e.message.as_str()),
            (17, "unexpected end of selector")
        );
        let e = err("a in {'x' 'y'}");
        assert_eq!(
            (e.position, e.message.as_str()),
            (10, "expected '}' or ','")
        );
        let e = err("has(a) #");
        assert_eq!(
            (e.position, e.message.as_str()),
            (7, "trailing input after selector")
        );
        let e = err("# == 'x'");
        assert_eq!(
            (e.position, e.message.as_str()),
            (0, "unexpected character '#'")
        );
        let e = err("a ~ 'x'");
        assert_eq!(e.position, 2);
        assert!(e.message.starts_with("expected an operator"));
        let e = err("a not 'x'");
        assert_eq!(
            (e.position, e.message.as_str()),
            (6, "expected 'in' after 'not'")
        );
        let e = err("has(a) &&");
        assert_eq!(
            (e.position, e.message.as_str()),
            (9, "unexpected end of selector")
        );
    }

    mod props {
        use proptest::prelude::*;

        use super::super::*;

        fn key() -> impl Strategy<Value = String> {
            "[a-z][a-z0-9_./-]{0,8}"
        }

        fn value() -> impl Strategy<Value = String> {
            "[a-zA-Z0-9 _.-]{0,6}"
        }

        fn expr() -> impl Strategy<Value = Expr> {
            let leaf = prop_oneof![
                Just(Expr::All),
                key().prop_map(Expr::Has),
                (key(), value()).prop_map(|(k, v)| Expr::Eq(k, v)),
                (key(), value()).prop_map(|(k, v)| Expr::Ne(k, v)),
                (key(), prop::collection::vec(value(), 0..3)).prop_map(|(k, v)| Expr::In(k, v)),
                (key(), prop::collection::vec(value(), 0..3)).prop_map(|(k, v)| Expr::NotIn(k, v)),
                (key(), value()).prop_map(|(k, v)| Expr::Contains(k, v)),
            ];
            leaf.prop_recursive(4, 24, 2, |inner| {
                prop_oneof![
                    inner.clone().prop_map(|e| Expr::Not(Box::new(e))),
                    (inner.clone(), inner.clone())
                        .prop_map(|(a, b)| Expr::And(Box::new(a), Box::new(b))),
                    (inner.clone(), inner).prop_map(|(a, b)| Expr::Or(Box::new(a), Box::new(b))),
                ]
            })
        }

        proptest! {
            #[test]
            fn display_parses_back_to_the_same_selector(e in expr()) {
                let s = Selector { root: e };
                let text = s.to_string();
                prop_assert_eq!(Selector::parse(&text).unwrap(), s, "{}", text);
            }

            #[test]
            fn any_input_parses_or_points_inside_it(input in ".{0,40}") {
                if let Err(e) = Selector::parse(&input) {
                    prop_assert!(e.position <= input.chars().count());
                }
            }
        }
    }
}
