//! Postgres date/time template patterns (`to_char`, `to_timestamp`,
//! `to_date`), as the Postgres manual's "Data Type Formatting Functions"
//! describes them: `YYYY-MM-DD HH24:MI:SS`, `FMMonth`, `Dy`, `DDth`,
//! `"quoted text"`, ...
//!
//! A template is tokenised once per call ([`Template::parse`]); formatting
//! and parsing then walk the tokens for every row.

use chrono::{Datelike, NaiveDate, NaiveDateTime, NaiveTime, Timelike};

/// One template field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Hh12,
    Hh24,
    Mi,
    Ss,
    Ms,
    Us,
    Ff(u8),
    Ssss,
    AmUpper,
    AmLower,
    AmDotUpper,
    AmDotLower,
    YComma,
    Yyyy,
    Yyy,
    Yy,
    Y,
    Iyyy,
    Iyy,
    Iy,
    I,
    BcUpper,
    BcLower,
    BcDotUpper,
    BcDotLower,
    MonthUpper,
    MonthCap,
    MonthLower,
    MonUpper,
    MonCap,
    MonLower,
    Mm,
    DayUpper,
    DayCap,
    DayLower,
    DyUpper,
    DyCap,
    DyLower,
    Ddd,
    Iddd,
    Dd,
    D,
    Id,
    W,
    Ww,
    Iw,
    Cc,
    J,
    Q,
    RmUpper,
    RmLower,
    TzUpper,
    TzLower,
    Tzh,
    Tzm,
    Of,
}

/// Template words, longest first within each shared prefix.
const WORDS: &[(&str, Field)] = &[
    ("HH24", Field::Hh24),
    ("HH12", Field::Hh12),
    ("HH", Field::Hh12),
    ("MI", Field::Mi),
    ("SSSSS", Field::Ssss),
    ("SSSS", Field::Ssss),
    ("SS", Field::Ss),
    ("MS", Field::Ms),
    ("US", Field::Us),
    ("FF1", Field::Ff(1)),
    ("FF2", Field::Ff(2)),
    ("FF3", Field::Ff(3)),
    ("FF4", Field::Ff(4)),
    ("FF5", Field::Ff(5)),
    ("FF6", Field::Ff(6)),
    ("A.M.", Field::AmDotUpper),
    ("a.m.", Field::AmDotLower),
    ("P.M.", Field::AmDotUpper),
    ("p.m.", Field::AmDotLower),
    ("AM", Field::AmUpper),
    ("am", Field::AmLower),
    ("PM", Field::AmUpper),
    ("pm", Field::AmLower),
    ("Y,YYY", Field::YComma),
    ("YYYY", Field::Yyyy),
    ("YYY", Field::Yyy),
    ("YY", Field::Yy),
    ("Y", Field::Y),
    ("IYYY", Field::Iyyy),
    ("IYY", Field::Iyy),
    ("IY", Field::Iy),
    ("IDDD", Field::Iddd),
    ("ID", Field::Id),
    ("IW", Field::Iw),
    ("I", Field::I),
    ("B.C.", Field::BcDotUpper),
    ("b.c.", Field::BcDotLower),
    ("A.D.", Field::BcDotUpper),
    ("a.d.", Field::BcDotLower),
    ("BC", Field::BcUpper),
    ("bc", Field::BcLower),
    ("AD", Field::BcUpper),
    ("ad", Field::BcLower),
    ("MONTH", Field::MonthUpper),
    ("Month", Field::MonthCap),
    ("month", Field::MonthLower),
    ("MON", Field::MonUpper),
    ("Mon", Field::MonCap),
    ("mon", Field::MonLower),
    ("MM", Field::Mm),
    ("DAY", Field::DayUpper),
    ("Day", Field::DayCap),
    ("day", Field::DayLower),
    ("DY", Field::DyUpper),
    ("Dy", Field::DyCap),
    ("dy", Field::DyLower),
    ("DDD", Field::Ddd),
    ("DD", Field::Dd),
    ("D", Field::D),
    ("WW", Field::Ww),
    ("W", Field::W),
    ("CC", Field::Cc),
    ("J", Field::J),
    ("Q", Field::Q),
    ("RM", Field::RmUpper),
    ("rm", Field::RmLower),
    ("TZH", Field::Tzh),
    ("TZM", Field::Tzm),
    ("TZ", Field::TzUpper),
    ("tz", Field::TzLower),
    ("OF", Field::Of),
];

/// Template words that are case-insensitive in Postgres when no case
/// variant is listed (`hh24`, `mi`, `yyyy`, `dd`, ...).
fn lookup(rest: &str) -> Option<(usize, Field)> {
    for (word, field) in WORDS {
        if rest.starts_with(word) {
            return Some((word.len(), *field));
        }
    }
    // Numeric fields accept any case (ASCII only, so byte lengths match).
    let upper: String = rest
        .chars()
        .take(5)
        .take_while(char::is_ascii)
        .collect::<String>()
        .to_ascii_uppercase();
    for (word, field) in WORDS {
        let numeric = !matches!(
            field,
            Field::MonthUpper
                | Field::MonthCap
                | Field::MonthLower
                | Field::MonUpper
                | Field::MonCap
                | Field::MonLower
                | Field::DayUpper
                | Field::DayCap
                | Field::DayLower
                | Field::DyUpper
                | Field::DyCap
                | Field::DyLower
                | Field::AmUpper
                | Field::AmLower
                | Field::AmDotUpper
                | Field::AmDotLower
                | Field::BcUpper
                | Field::BcLower
                | Field::BcDotUpper
                | Field::BcDotLower
                | Field::RmUpper
                | Field::RmLower
                | Field::TzUpper
                | Field::TzLower
        );
        if numeric && upper.starts_with(word) {
            return Some((word.len(), *field));
        }
    }
    None
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Field {
        field: Field,
        /// `FM`: no padding.
        fill: bool,
        /// `TH` / `th`: an ordinal suffix.
        ordinal: Option<bool>,
    },
    Literal(String),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    tokens: Vec<Token>,
}

impl Template {
    /// Tokenises a Postgres template. Unknown letters are literal text, as
    /// in Postgres.
    pub fn parse(pattern: &str) -> Template {
        let mut tokens = Vec::new();
        let mut literal = String::new();
        let mut rest = pattern;
        while !rest.is_empty() {
            // Modifiers: FM, FX, TM (prefixes).
            let mut fill = false;
            let mut prefixed = rest;
            loop {
                if let Some(r) = prefixed
                    .strip_prefix("FM")
                    .or_else(|| prefixed.strip_prefix("fm"))
                {
                    fill = true;
                    prefixed = r;
                } else if let Some(r) = prefixed
                    .strip_prefix("FX")
                    .or_else(|| prefixed.strip_prefix("fx"))
                    .or_else(|| prefixed.strip_prefix("TM"))
                    .or_else(|| prefixed.strip_prefix("tm"))
                {
                    prefixed = r;
                } else {
                    break;
                }
            }
            if let Some((len, field)) = lookup(prefixed) {
                if !literal.is_empty() {
                    tokens.push(Token::Literal(std::mem::take(&mut literal)));
                }
                rest = &prefixed[len..];
                let ordinal = if let Some(r) = rest.strip_prefix("TH") {
                    rest = r;
                    Some(true)
                } else if let Some(r) = rest.strip_prefix("th") {
                    rest = r;
                    Some(false)
                } else {
                    None
                };
                tokens.push(Token::Field {
                    field,
                    fill,
                    ordinal,
                });
                continue;
            }
            if prefixed.len() != rest.len() && prefixed.is_empty() {
                break;
            }
            let mut chars = rest.chars();
            let Some(c) = chars.next() else { break };
            match c {
                '"' => {
                    // Quoted literal text; \" inside is a quote.
                    let mut it = chars.as_str().char_indices();
                    let body = chars.as_str();
                    let mut end = body.len();
                    let mut escaped = false;
                    for (i, ch) in it.by_ref() {
                        if escaped {
                            literal.push(ch);
                            escaped = false;
                        } else if ch == '\\' {
                            escaped = true;
                        } else if ch == '"' {
                            end = i + 1;
                            break;
                        } else {
                            literal.push(ch);
                        }
                    }
                    rest = &body[end.min(body.len())..];
                }
                '\\' => {
                    let body = chars.as_str();
                    let mut it = body.chars();
                    match it.next() {
                        Some(n) => {
                            literal.push(n);
                            rest = it.as_str();
                        }
                        None => {
                            literal.push('\\');
                            rest = "";
                        }
                    }
                }
                other => {
                    literal.push(other);
                    rest = chars.as_str();
                }
            }
        }
        if !literal.is_empty() {
            tokens.push(Token::Literal(literal));
        }
        Template { tokens }
    }

    /// Formats a timestamp (UTC, the server's time zone).
    pub fn format(&self, ts: &NaiveDateTime, out: &mut String) {
        for token in &self.tokens {
            match token {
                Token::Literal(text) => out.push_str(text),
                Token::Field {
                    field,
                    fill,
                    ordinal,
                } => format_field(*field, *fill, *ordinal, ts, out),
            }
        }
    }

    /// Parses `text` by the template (Postgres's `to_timestamp` rules,
    /// non-FX mode: separators in the input are matched loosely).
    pub fn parse_datetime(&self, text: &str) -> Result<NaiveDateTime, String> {
        let mut p = Parsed::default();
        let mut input = text;
        for (i, token) in self.tokens.iter().enumerate() {
            match token {
                Token::Literal(lit) => {
                    for lc in lit.chars() {
                        let mut chars = input.chars();
                        match chars.next() {
                            Some(ic) if ic == lc => input = chars.as_str(),
                            Some(ic) if !ic.is_alphanumeric() && !lc.is_alphanumeric() => {
                                input = chars.as_str()
                            }
                            Some(_) if lc == ' ' => {}
                            Some(ic) if lc.is_alphabetic() && ic.is_alphabetic() => {
                                input = chars.as_str()
                            }
                            _ => {}
                        }
                    }
                }
                Token::Field { field, .. } => {
                    // Separators before a field are skipped.
                    input = input.trim_start_matches(|c: char| {
                        c.is_whitespace() || (!c.is_alphanumeric() && c != '-' && c != '+')
                    });
                    let next_is_field = matches!(self.tokens.get(i + 1), Some(Token::Field { .. }));
                    input = parse_field(*field, input, next_is_field, &mut p)?;
                }
            }
        }
        if !input.trim().is_empty() {
            return Err(format!(
                "trailing characters \"{}\" in \"{text}\"",
                input.trim()
            ));
        }
        p.finish()
    }
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];
const ROMAN: [&str; 12] = [
    "I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X", "XI", "XII",
];

fn ordinal_suffix(n: i64) -> &'static str {
    let n = n.abs();
    if (11..=13).contains(&(n % 100)) {
        return "th";
    }
    match n % 10 {
        1 => "st",
        2 => "nd",
        3 => "rd",
        _ => "th",
    }
}

/// Writes `n` zero-padded to `width` digits (`fill`: unpadded), straight
/// into `out` (no string per value: `to_char` runs once per row).
fn push_number(out: &mut String, n: i64, width: usize, fill: bool) {
    if n < 0 {
        out.push('-');
    }
    let mut v = n.unsigned_abs();
    // Digits from the right, into a buffer wide enough for any u64.
    let mut digits = [b'0'; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if !fill {
        at = at.min(digits.len().saturating_sub(width));
    }
    // ASCII digits: always valid UTF-8.
    out.push_str(std::str::from_utf8(&digits[at..]).unwrap_or_default());
}

fn cased(word: &str, upper: bool, lower: bool) -> String {
    if upper {
        word.to_uppercase()
    } else if lower {
        word.to_lowercase()
    } else {
        word.to_string()
    }
}

fn push_word(out: &mut String, word: String, pad: usize, fill: bool) {
    use std::fmt::Write;
    if fill {
        out.push_str(&word);
    } else {
        let _ = write!(out, "{word:<pad$}");
    }
}

fn format_field(
    field: Field,
    fill: bool,
    ordinal: Option<bool>,
    ts: &NaiveDateTime,
    out: &mut String,
) {
    let year = ts.year() as i64;
    let iso = ts.iso_week();
    let number = |n: i64, width: usize, out: &mut String| {
        push_number(out, n, width, fill);
        if let Some(upper) = ordinal {
            let s = ordinal_suffix(n);
            if upper {
                out.extend(s.chars().map(|c| c.to_ascii_uppercase()));
            } else {
                out.push_str(s);
            }
        }
    };
    match field {
        Field::Hh12 => {
            let h = ts.hour() % 12;
            number(if h == 0 { 12 } else { h } as i64, 2, out)
        }
        Field::Hh24 => number(ts.hour() as i64, 2, out),
        Field::Mi => number(ts.minute() as i64, 2, out),
        Field::Ss => number(ts.second() as i64, 2, out),
        Field::Ms => number((ts.nanosecond() / 1_000_000) as i64, 3, out),
        Field::Us => number((ts.nanosecond() / 1_000) as i64, 6, out),
        Field::Ff(d) => {
            let us = (ts.nanosecond() / 1_000) as i64;
            let n = us / 10_i64.pow(6 - d as u32);
            number(n, d as usize, out)
        }
        Field::Ssss => number(ts.num_seconds_from_midnight() as i64, 0, out),
        Field::AmUpper | Field::AmLower | Field::AmDotUpper | Field::AmDotLower => {
            let pm = ts.hour() >= 12;
            out.push_str(match (field, pm) {
                (Field::AmUpper, false) => "AM",
                (Field::AmUpper, true) => "PM",
                (Field::AmLower, false) => "am",
                (Field::AmLower, true) => "pm",
                (Field::AmDotUpper, false) => "A.M.",
                (Field::AmDotUpper, true) => "P.M.",
                (Field::AmDotLower, false) => "a.m.",
                _ => "p.m.",
            })
        }
        Field::YComma => {
            let y = year.abs();
            use std::fmt::Write;
            let _ = write!(out, "{},{:03}", y / 1000, y % 1000);
        }
        Field::Yyyy => number(year, 4, out),
        Field::Yyy => number(year % 1000, 3, out),
        Field::Yy => number(year % 100, 2, out),
        Field::Y => number(year % 10, 1, out),
        Field::Iyyy => number(iso.year() as i64, 4, out),
        Field::Iyy => number(iso.year() as i64 % 1000, 3, out),
        Field::Iy => number(iso.year() as i64 % 100, 2, out),
        Field::I => number(iso.year() as i64 % 10, 1, out),
        Field::BcUpper | Field::BcLower | Field::BcDotUpper | Field::BcDotLower => {
            let bc = year <= 0;
            out.push_str(match (field, bc) {
                (Field::BcUpper, false) => "AD",
                (Field::BcUpper, true) => "BC",
                (Field::BcLower, false) => "ad",
                (Field::BcLower, true) => "bc",
                (Field::BcDotUpper, false) => "A.D.",
                (Field::BcDotUpper, true) => "B.C.",
                (Field::BcDotLower, false) => "a.d.",
                _ => "b.c.",
            })
        }
        Field::MonthUpper | Field::MonthCap | Field::MonthLower => {
            let name = MONTHS[ts.month0() as usize];
            let word = cased(name, field == Field::MonthUpper, field == Field::MonthLower);
            push_word(out, word, 9, fill)
        }
        Field::MonUpper | Field::MonCap | Field::MonLower => {
            let name = &MONTHS[ts.month0() as usize][..3];
            out.push_str(&cased(
                name,
                field == Field::MonUpper,
                field == Field::MonLower,
            ))
        }
        Field::Mm => number(ts.month() as i64, 2, out),
        Field::DayUpper | Field::DayCap | Field::DayLower => {
            let name = DAYS[ts.weekday().num_days_from_sunday() as usize];
            let word = cased(name, field == Field::DayUpper, field == Field::DayLower);
            push_word(out, word, 9, fill)
        }
        Field::DyUpper | Field::DyCap | Field::DyLower => {
            let name = &DAYS[ts.weekday().num_days_from_sunday() as usize][..3];
            out.push_str(&cased(
                name,
                field == Field::DyUpper,
                field == Field::DyLower,
            ))
        }
        Field::Ddd => number(ts.ordinal() as i64, 3, out),
        Field::Iddd => {
            let day = (iso.week() as i64 - 1) * 7 + ts.weekday().number_from_monday() as i64;
            number(day, 3, out)
        }
        Field::Dd => number(ts.day() as i64, 2, out),
        Field::D => number(ts.weekday().number_from_sunday() as i64, 1, out),
        Field::Id => number(ts.weekday().number_from_monday() as i64, 1, out),
        Field::W => number((ts.day() as i64 - 1) / 7 + 1, 1, out),
        Field::Ww => number((ts.ordinal() as i64 - 1) / 7 + 1, 2, out),
        Field::Iw => number(iso.week() as i64, 2, out),
        Field::Cc => {
            let cc = if year > 0 {
                (year - 1) / 100 + 1
            } else {
                -((-year) / 100 + 1)
            };
            number(cc, 2, out)
        }
        Field::J => {
            // Julian day: days since 4714-11-24 BC (proleptic Gregorian).
            let jd = ts.date().num_days_from_ce() as i64 + 1_721_425;
            number(jd, 0, out)
        }
        Field::Q => number((ts.month0() / 3 + 1) as i64, 1, out),
        Field::RmUpper | Field::RmLower => {
            let r = ROMAN[ts.month0() as usize];
            let word = if field == Field::RmLower {
                r.to_lowercase()
            } else {
                r.to_string()
            };
            push_word(out, word, 4, fill)
        }
        // Timestamps are formatted in UTC (the server's time zone).
        Field::TzUpper => out.push_str("UTC"),
        Field::TzLower => out.push_str("utc"),
        Field::Tzh => out.push_str("+00"),
        Field::Tzm => out.push_str("00"),
        Field::Of => out.push_str("+00"),
    }
}

#[derive(Default)]
struct Parsed {
    year: Option<i64>,
    month: Option<u32>,
    day: Option<u32>,
    doy: Option<u32>,
    hour: Option<u32>,
    pm: Option<bool>,
    hour12: bool,
    minute: Option<u32>,
    second: Option<u32>,
    micros: Option<u32>,
    bc: bool,
    julian: Option<i64>,
    seconds_of_day: Option<u32>,
}

impl Parsed {
    fn finish(self) -> Result<NaiveDateTime, String> {
        let date = if let Some(j) = self.julian {
            i32::try_from(j.saturating_sub(1_721_425))
                .ok()
                .and_then(NaiveDate::from_num_days_from_ce_opt)
                .ok_or_else(|| format!("Julian day {j} is out of range"))?
        } else {
            let mut year = self.year.unwrap_or(1);
            if self.bc {
                year = 1i64.saturating_sub(year);
            }
            let year = i32::try_from(year).map_err(|_| format!("year {year} is out of range"))?;
            match (self.doy, self.month, self.day) {
                (Some(doy), None, None) => NaiveDate::from_yo_opt(year, doy)
                    .ok_or_else(|| format!("day of year {doy} is out of range"))?,
                (_, m, d) => {
                    let (m, d) = (m.unwrap_or(1), d.unwrap_or(1));
                    NaiveDate::from_ymd_opt(year, m, d).ok_or_else(|| {
                        format!("date/time field value out of range: {year}-{m}-{d}")
                    })?
                }
            }
        };
        let mut hour = self.hour.unwrap_or(0);
        if self.hour12 || self.pm.is_some() {
            if !(1..=12).contains(&hour) && self.hour.is_some() {
                return Err(format!("hour \"{hour}\" is invalid for the 12-hour clock"));
            }
            hour %= 12;
            if self.pm == Some(true) {
                hour += 12;
            }
        }
        let (mut minute, mut second) = (self.minute.unwrap_or(0), self.second.unwrap_or(0));
        if let Some(s) = self.seconds_of_day {
            hour = s / 3600;
            minute = s / 60 % 60;
            second = s % 60;
        }
        let time = NaiveTime::from_hms_micro_opt(hour, minute, second, self.micros.unwrap_or(0))
            .ok_or_else(|| {
                format!("date/time field value out of range: {hour}:{minute}:{second}")
            })?;
        Ok(NaiveDateTime::new(date, time))
    }
}

/// Reads a number of at most `max` digits (all digits when the next token
/// is not a field right after this one); returns it and the rest.
fn take_number(input: &str, max: usize, greedy: bool) -> Result<(i64, &str), String> {
    let (sign, body) = match input.strip_prefix('-') {
        Some(r) => (-1, r),
        None => (1, input.strip_prefix('+').unwrap_or(input)),
    };
    let limit = if greedy { usize::MAX } else { max };
    let digits = body
        .char_indices()
        .take_while(|(i, c)| c.is_ascii_digit() && *i < limit)
        .count();
    if digits == 0 {
        let shown: String = input.chars().take(10).collect();
        return Err(format!("invalid value \"{shown}\": a number is expected"));
    }
    let n: i64 = body[..digits]
        .parse()
        .map_err(|_| format!("value \"{}\" is out of range", &body[..digits]))?;
    Ok((sign * n, &body[digits..]))
}

fn take_word<'a>(
    input: &'a str,
    words: &[&str],
    len: Option<usize>,
) -> Result<(usize, &'a str), String> {
    for (i, w) in words.iter().enumerate() {
        let w = match len {
            Some(n) => &w[..n],
            None => w,
        };
        if input.len() >= w.len()
            && input.is_char_boundary(w.len())
            && input[..w.len()].eq_ignore_ascii_case(w)
        {
            return Ok((i, &input[w.len()..]));
        }
    }
    let shown: String = input.chars().take(10).collect();
    Err(format!("invalid value \"{shown}\" for a name field"))
}

fn parse_field<'a>(
    field: Field,
    input: &'a str,
    next_is_field: bool,
    p: &mut Parsed,
) -> Result<&'a str, String> {
    let greedy = !next_is_field;
    let num = |max: usize| take_number(input, max, greedy);
    let small = |n: i64| u32::try_from(n).map_err(|_| format!("value {n} is out of range"));
    Ok(match field {
        Field::Hh12 | Field::Hh24 => {
            let (n, r) = num(2)?;
            p.hour = Some(small(n)?);
            p.hour12 |= field == Field::Hh12;
            r
        }
        Field::Mi => {
            let (n, r) = num(2)?;
            p.minute = Some(small(n)?);
            r
        }
        Field::Ss => {
            let (n, r) = num(2)?;
            p.second = Some(small(n)?);
            r
        }
        Field::Ms => {
            let (n, r) = take_number(input, 3, false)?;
            p.micros = Some(small(n)? * 1000);
            r
        }
        Field::Us | Field::Ff(_) => {
            let digits = input
                .chars()
                .take_while(char::is_ascii_digit)
                .count()
                .min(6);
            let (n, r) = take_number(input, 6, false)?;
            p.micros = Some(small(n)? * 10u32.pow(6 - digits as u32));
            r
        }
        Field::Ssss => {
            let (n, r) = num(5)?;
            p.seconds_of_day = Some(small(n)?);
            r
        }
        Field::AmUpper | Field::AmLower | Field::AmDotUpper | Field::AmDotLower => {
            let (i, r) = take_word(input, &["AM", "PM", "A.M.", "P.M."], None)?;
            p.pm = Some(i % 2 == 1);
            r
        }
        Field::YComma => {
            let (thousands, r) = take_number(input, 3, false)?;
            let r = r.strip_prefix(',').unwrap_or(r);
            let (rest, r) = take_number(r, 3, false)?;
            p.year = Some(thousands.saturating_mul(1000).saturating_add(rest));
            r
        }
        Field::Yyyy | Field::Iyyy => {
            let (n, r) = num(4)?;
            p.year = Some(n);
            r
        }
        Field::Yyy | Field::Iyy => {
            let (n, r) = num(3)?;
            // Postgres: 3-digit years are adjusted to near 2020.
            p.year = Some(if n < 100 {
                n + 2000
            } else if n < 1000 {
                n + 1000
            } else {
                n
            });
            r
        }
        Field::Yy | Field::Iy => {
            let (n, r) = num(2)?;
            p.year = Some(if n < 70 {
                n + 2000
            } else if n < 100 {
                n + 1900
            } else {
                n
            });
            r
        }
        Field::Y | Field::I => {
            let (n, r) = num(1)?;
            p.year = Some(n.saturating_add(2000));
            r
        }
        Field::BcUpper | Field::BcLower | Field::BcDotUpper | Field::BcDotLower => {
            let (i, r) = take_word(input, &["AD", "BC", "A.D.", "B.C."], None)?;
            p.bc = i % 2 == 1;
            r
        }
        Field::MonthUpper | Field::MonthCap | Field::MonthLower => {
            let (i, r) = take_word(input, &MONTHS, None)?;
            p.month = Some(i as u32 + 1);
            r
        }
        Field::MonUpper | Field::MonCap | Field::MonLower => {
            let (i, r) = take_word(input, &MONTHS, Some(3))?;
            p.month = Some(i as u32 + 1);
            r
        }
        Field::Mm => {
            let (n, r) = num(2)?;
            p.month = Some(small(n)?);
            r
        }
        Field::DayUpper | Field::DayCap | Field::DayLower => take_word(input, &DAYS, None)?.1,
        Field::DyUpper | Field::DyCap | Field::DyLower => take_word(input, &DAYS, Some(3))?.1,
        Field::Ddd | Field::Iddd => {
            let (n, r) = num(3)?;
            p.doy = Some(small(n)?);
            r
        }
        Field::Dd => {
            let (n, r) = num(2)?;
            p.day = Some(small(n)?);
            r
        }
        Field::D | Field::Id | Field::W | Field::Q => num(1)?.1,
        Field::Ww | Field::Iw | Field::Cc => num(2)?.1,
        Field::J => {
            let (n, r) = take_number(input, 8, true)?;
            p.julian = Some(n);
            r
        }
        Field::RmUpper | Field::RmLower => {
            // Longest numerals first.
            let order = [7, 8, 2, 3, 6, 10, 11, 1, 4, 5, 9, 0];
            let mut found = None;
            for i in order {
                let w = ROMAN[i];
                if input.len() >= w.len()
                    && input.is_char_boundary(w.len())
                    && input[..w.len()].eq_ignore_ascii_case(w)
                {
                    found = Some((i, &input[w.len()..]));
                    break;
                }
            }
            let (i, r) = found.ok_or_else(|| "invalid Roman numeral month".to_string())?;
            p.month = Some(i as u32 + 1);
            r
        }
        Field::TzUpper | Field::TzLower | Field::Of | Field::Tzh | Field::Tzm => {
            return Err("time zone fields are not supported in input templates".into())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_zero_padded_to_their_width_without_truncation() {
        let put = |n: i64, width: usize, fill: bool| {
            let mut s = String::new();
            push_number(&mut s, n, width, fill);
            s
        };
        assert_eq!(put(5, 4, false), "0005");
        assert_eq!(put(-5, 4, false), "-0005");
        assert_eq!(put(12345, 2, false), "12345");
        assert_eq!(put(0, 0, false), "0");
        assert_eq!(put(7, 3, true), "7");
        assert_eq!(put(i64::MIN, 2, false), i64::MIN.to_string());
    }

    fn ts(s: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f").unwrap()
    }

    fn fmt(t: &str, pattern: &str) -> String {
        let mut out = String::new();
        Template::parse(pattern).format(&ts(t), &mut out);
        out
    }

    /// Examples from the Postgres manual (Table 9.31 and the to_char
    /// examples), at UTC.
    #[test]
    fn to_char_follows_the_postgres_manual() {
        let t = "2002-04-20 17:31:12.66";
        assert_eq!(fmt(t, "HH12:MI:SS"), "05:31:12");
        assert_eq!(fmt(t, "Day, DD  HH12:MI:SS"), "Saturday , 20  05:31:12");
        assert_eq!(fmt(t, "FMDay, FMDD  HH12:MI:SS"), "Saturday, 20  05:31:12");
        assert_eq!(fmt(t, "YYYY-MM-DD"), "2002-04-20");
        assert_eq!(
            fmt(t, "YYYY-MM-DD HH24:MI:SS.MS"),
            "2002-04-20 17:31:12.660"
        );
        assert_eq!(fmt(t, "Month"), "April    ");
        assert_eq!(fmt(t, "FMMonth"), "April");
        assert_eq!(fmt(t, "MON mon Mon"), "APR apr Apr");
        assert_eq!(fmt(t, "DDth"), "20th");
        assert_eq!(fmt("2002-04-01 00:00:00", "DDTH"), "01ST");
        assert_eq!(fmt("2002-04-22 00:00:00", "FMDDth"), "22nd");
        assert_eq!(fmt("2002-04-13 00:00:00", "FMDDth"), "13th");
        assert_eq!(fmt(t, "\"Year\" YYYY"), "Year 2002");
        assert_eq!(fmt(t, "Q"), "2");
        assert_eq!(fmt(t, "RM"), "IV  ");
        assert_eq!(fmt(t, "D ID"), "7 6");
        assert_eq!(fmt(t, "DDD IW WW"), "110 16 16");
        assert_eq!(fmt(t, "CC"), "21");
        assert_eq!(fmt(t, "J"), "2452385");
        assert_eq!(fmt(t, "am PM A.M."), "pm PM P.M.");
        assert_eq!(fmt(t, "Y,YYY YYY YY Y"), "2,002 002 02 2");
        assert_eq!(fmt(t, "SSSS"), "63072");
        assert_eq!(fmt(t, "US"), "660000");
        assert_eq!(fmt(t, "yyyy-mm-dd hh24:mi"), "2002-04-20 17:31");
        assert_eq!(fmt(t, "Dy dy DY"), "Sat sat SAT");
        assert_eq!(fmt("2024-01-01 00:00:00", "HH12 AM"), "12 AM");
    }

    /// No template or input can panic (multi-byte text next to fields).
    #[test]
    fn odd_text_never_panics() {
        let t = ts("2002-04-20 17:31:12");
        for pattern in [
            "Sſ", "ſS", "ıDDD", "KY", "é", "\\", "\"", "FM", "TH", "Y,", "FF9", "J", "Y",
            "YYYY BC", "Y,YYY", "SSSS", "US",
        ] {
            let mut out = String::new();
            Template::parse(pattern).format(&t, &mut out);
            for input in [
                "é",
                "ı",
                "2002ſ",
                "IVé",
                "",
                "-",
                "99999999999999999999",
                "-9223372036854775807",
                "9223372036854775807 BC",
            ] {
                let _ = Template::parse(pattern).parse_datetime(input);
            }
        }
        for input in ["Ié", "é", "XIIé", "ⅩⅡ"] {
            let _ = Template::parse("RM").parse_datetime(input);
        }
    }

    #[test]
    fn to_timestamp_follows_the_postgres_manual() {
        let parse = |s: &str, p: &str| Template::parse(p).parse_datetime(s);
        assert_eq!(
            parse("05 Dec 2000", "DD Mon YYYY").unwrap(),
            ts("2000-12-05 00:00:00")
        );
        assert_eq!(
            parse("2000-12-05 13:04:05.123", "YYYY-MM-DD HH24:MI:SS.MS").unwrap(),
            ts("2000-12-05 13:04:05.123")
        );
        assert_eq!(
            parse("2000    JUN", "YYYY MON").unwrap(),
            ts("2000-06-01 00:00:00")
        );
        assert_eq!(
            parse("20000-1116", "YYYY-MMDD").unwrap(),
            NaiveDate::from_ymd_opt(20000, 11, 16)
                .unwrap()
                .and_hms_opt(0, 0, 0)
                .unwrap()
        );
        assert_eq!(
            parse("2011-12-18 11:38 PM", "YYYY-MM-DD HH12:MI PM").unwrap(),
            ts("2011-12-18 23:38:00")
        );
        assert_eq!(
            parse("2024-1-5", "YYYY-MM-DD").unwrap(),
            ts("2024-01-05 00:00:00")
        );
        assert_eq!(
            parse("20240105", "YYYYMMDD").unwrap(),
            ts("2024-01-05 00:00:00")
        );
        assert!(parse("2024-13-01", "YYYY-MM-DD").is_err());
        assert!(parse("hello", "YYYY").is_err());
        assert!(parse("2024-01-01 junk", "YYYY-MM-DD").is_err());
    }
}
