//! Go `flag` package compatibility: tokenizing argv, Go integer literals and the
//! `PrintDefaults` usage layout.
//!
//! clap cannot parse Go command lines directly (it has no single-dash long flags and
//! treats `--bool value` differently), so the tokenizer below turns argv into
//! `(name, value)` pairs with Go's rules and clap only ever sees `--name=value`.
//! Go's rules, from `flag.(*FlagSet).parseOne`:
//! * `-name` and `--name` are the same; `---name` and `-=x` are bad syntax;
//! * `-name=value`, or `-name value` for non-booleans (the next word is taken even
//!   if it starts with a dash);
//! * a boolean takes a value only after `=`; bare `-name` means true;
//! * `-h`/`-help` print usage; parsing stops at `--` or at the first non-flag word.

use clap::builder::ValueParser;
use clap::{Arg, Command};

use super::FlagsError;

/// The command line, tokenized.
pub(super) enum Tokens {
    /// `-h`, `-help`, `--h` or `--help` was seen (before any error).
    Help,
    /// `(flag name, value)` in command-line order; booleans have explicit values.
    Flags(Vec<(String, String)>),
}

/// Splits argv (without the program name) into flags the way Go does, checking each
/// value as it goes so the first bad word is the one reported, as in Go.
pub(super) fn tokenize(cmd: &Command, args: &[String]) -> Result<Tokens, FlagsError> {
    let mut out = Vec::new();
    // The bare boolean just seen, to explain `--ip-masq false`.
    let mut last_bare_bool: Option<String> = None;
    let mut words = args.iter();
    while let Some(word) = words.next() {
        if word == "--" {
            // Go stops here and leaves the rest as positional arguments, which
            // flanneld never reads; refuse them rather than ignore them.
            return match words.next() {
                Some(arg) => Err(FlagsError::Positional { arg: arg.clone() }),
                None => Ok(Tokens::Flags(out)),
            };
        }
        let Some(body) = word.strip_prefix('-').filter(|b| !b.is_empty()) else {
            return Err(match last_bare_bool {
                Some(flag) => FlagsError::BoolValueAfterSpace {
                    flag,
                    arg: word.clone(),
                },
                None => FlagsError::Positional { arg: word.clone() },
            });
        };
        let body = body.strip_prefix('-').unwrap_or(body);
        if body.is_empty() || body.starts_with('-') || body.starts_with('=') {
            return Err(FlagsError::BadSyntax { token: word.clone() });
        }
        let (name, inline) = match body.split_once('=') {
            Some((name, value)) => (name, Some(value.to_owned())),
            None => (body, None),
        };
        // Go answers -h/-help with usage only because no flag has that name.
        if name == "h" || name == "help" {
            return Ok(Tokens::Help);
        }
        let arg = find(cmd, name).ok_or_else(|| FlagsError::Unknown { name: name.to_owned() })?;
        last_bare_bool = None;
        let value = match inline {
            Some(value) => value,
            None if is_bool(arg) => {
                last_bare_bool = Some(name.to_owned());
                "true".to_owned()
            }
            None => words
                .next()
                .cloned()
                .ok_or_else(|| FlagsError::MissingValue { name: name.to_owned() })?,
        };
        check_value(cmd, name, &value).map_err(|reason| FlagsError::InvalidValue {
            name: name.to_owned(),
            value: value.clone(),
            reason,
        })?;
        out.push((name.to_owned(), value));
    }
    Ok(Tokens::Flags(out))
}

/// Runs `value` through the flag's clap value parser; `Err` holds the reason.
pub(super) fn check_value(cmd: &Command, name: &str, value: &str) -> Result<(), String> {
    let argv = ["flanneld".to_owned(), format!("--{name}={value}")];
    cmd.clone().try_get_matches_from(argv).map(drop).map_err(|e| {
        // Our value parsers return their reason as the error source; fall back to
        // clap's own wording for anything else.
        std::error::Error::source(&e)
            .map(ToString::to_string)
            .unwrap_or_else(|| e.kind().to_string())
    })
}

fn find<'a>(cmd: &'a Command, name: &str) -> Option<&'a Arg> {
    cmd.get_arguments().find(|a| a.get_long() == Some(name))
}

/// Booleans are the flags whose value parser yields a `bool`.
fn is_bool(arg: &Arg) -> bool {
    arg.get_value_parser().type_id() == ValueParser::bool().type_id()
}

/// Go's `strconv.ParseInt(s, 0, 64)`, which `flag.IntVar` uses: an optional sign,
/// then `0x`, `0o`, `0b` or a leading `0` (octal) prefix, and `_` between digits.
/// So `-healthz-port=010` is 8, as it is for upstream.
pub(super) fn parse_go_int(s: &str) -> Result<i64, String> {
    let parse_error = || format!("parse error ({s:?} is not an integer)");
    let (sign, body) = match s.as_bytes().first() {
        Some(b'-') => ("-", &s[1..]),
        Some(b'+') => ("", &s[1..]),
        _ => ("", s),
    };
    let prefixed = |p: &str| {
        let lower = body.get(..2)?.to_ascii_lowercase();
        (lower == p).then(|| &body[2..])
    };
    let (radix, digits, has_prefix) = if let Some(d) = prefixed("0x") {
        (16, d, true)
    } else if let Some(d) = prefixed("0b") {
        (2, d, true)
    } else if let Some(d) = prefixed("0o") {
        (8, d, true)
    } else if body.len() > 1 && body.starts_with('0') {
        (8, &body[1..], true)
    } else {
        (10, body, false)
    };
    // Underscores only between digits, or right after a base prefix (Go syntax).
    let underscores_ok = !digits.ends_with('_')
        && !digits.contains("__")
        && (has_prefix || !digits.starts_with('_'))
        && digits.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    let clean: String = digits.chars().filter(|&c| c != '_').collect();
    if clean.is_empty() || !underscores_ok {
        return Err(parse_error());
    }
    i64::from_str_radix(&format!("{sign}{clean}"), radix).map_err(|e| match e.kind() {
        std::num::IntErrorKind::PosOverflow | std::num::IntErrorKind::NegOverflow => "value out of range".to_owned(),
        _ => parse_error(),
    })
}

/// Usage text: the header upstream prints, then Go's `PrintDefaults` layout (sorted by
/// name; `  -name type`, then the help indented by four spaces and a tab, then
/// `(default ...)` unless the default is the type's zero value).
///
/// Upstream prints this to stderr; on `-h` we print it to stdout like every other
/// tool, which is what `flanneld -h | less` expects.
pub(super) fn usage(cmd: &Command) -> String {
    let mut args: Vec<&Arg> = cmd.get_arguments().filter(|a| a.get_long().is_some()).collect();
    args.sort_by_key(|a| a.get_long());
    let mut out = String::from("Usage: flanneld [OPTION]...\n");
    for arg in args {
        let name = arg.get_long().unwrap_or_default();
        let type_name = if is_bool(arg) {
            ""
        } else {
            arg.get_value_names()
                .and_then(|v| v.first())
                .map_or("value", |v| v.as_str())
        };
        let mut line = format!("  -{name}");
        if !type_name.is_empty() {
            line.push(' ');
            line.push_str(type_name);
        }
        // Go keeps a one-letter untyped flag on the same line.
        line.push_str(if line.len() <= 4 { "\t" } else { "\n    \t" });
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        line.push_str(&help.replace('\n', "\n    \t"));
        let default = arg.get_default_values().first().and_then(|d| d.to_str()).unwrap_or("");
        let zero = match type_name {
            "" => default == "false",
            "int" => default == "0",
            _ => default.is_empty() || (type_name == "value" && default == "0"),
        };
        if !zero {
            if type_name == "string" {
                line.push_str(&format!(" (default {default:?})"));
            } else {
                line.push_str(&format!(" (default {default})"));
            }
        }
        out.push_str(&line);
        out.push('\n');
    }
    out.push_str(
        "\nEvery flag except -version can also be set as FLANNELD_<NAME> (upper case, '-' and '.' as '_').\n\
         The command line wins over the environment, and empty values are ignored.\n",
    );
    out
}
