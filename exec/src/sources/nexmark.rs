//! The `nexmark` connector: the Nexmark benchmark's person, auction and bid
//! events, generated where they are read.
//!
//! The events are those of the Nexmark generator as RisingWave's `nexmark`
//! crate (a port of the Beam/Flink generator) produces them, event for event
//! (a unit test checks that against the crate): event `n` is a person, an
//! auction or a bid by its place in a cycle of 50 (1 : 3 : 46), and its fields
//! come from a random generator seeded with `n`, so any range replays
//! exactly. Ids refer to earlier events (a bid's auction and bidder, an
//! auction's seller) with the generator's hot-key skew; `expires`, `extra`
//! padding and prices follow the generator's rules.
//!
//! Event `n`'s `date_time` is the stream's base time plus `n` over the
//! rate (in milliseconds, as Nexmark's timestamps are), and it exists once
//! the clock has passed it. A stream carries one event type
//! (`nexmark.table.type`); its rows are the events of that type in order,
//! dealt round-robin over the partitions. Columns are matched to event fields
//! by name (`date_time` or `dateTime`), so a stream may leave fields out.
//!
//! Generation writes Arrow builders directly: no allocation per row.

use std::sync::OnceLock;

use arrow::array::{Int64Builder, StringBuilder, TimestampMicrosecondBuilder};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::*;

/// The three Nexmark event types, each a stream of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NexmarkTable {
    /// New people (event 0 of every 50).
    Person,
    /// New auctions (events 1–3 of every 50).
    Auction,
    /// Bids (events 4–49 of every 50).
    Bid,
}

const PERSON_PROPORTION: u64 = 1;
const AUCTION_PROPORTION: u64 = 3;
const BID_PROPORTION: u64 = 46;
const PROPORTION_DENOMINATOR: u64 = PERSON_PROPORTION + AUCTION_PROPORTION + BID_PROPORTION;
const FIRST_PERSON_ID: usize = 1000;
const FIRST_AUCTION_ID: usize = 1000;
const FIRST_CATEGORY_ID: usize = 10;
const NUM_CATEGORIES: usize = 5;
const ACTIVE_PEOPLE: usize = 1000;
const IN_FLIGHT_AUCTIONS: usize = 100;
const PERSON_ID_LEAD: usize = 10;
const AUCTION_ID_LEAD: usize = 10;
const HOT_SELLER_RATIO: usize = 4;
const HOT_AUCTION_RATIO: usize = 2;
const HOT_BIDDER_RATIO: usize = 4;
const HOT_CHANNEL_RATIO: usize = 2;
/// The batch of recent ids a hot key is the first of.
const HOT_BATCH: usize = 100;
const AVG_PERSON_BYTES: usize = 200;
const AVG_AUCTION_BYTES: usize = 500;
const AVG_BID_BYTES: usize = 100;
const CHANNELS: usize = 10_000;
/// The most events a sequence has.
const MAX_EVENTS: u64 = 1 << 60;
const US_STATES: [&str; 6] = ["az", "ca", "id", "or", "wa", "wy"];
const US_CITIES: [&str; 10] = [
    "phoenix",
    "los angeles",
    "san francisco",
    "boise",
    "portland",
    "bend",
    "redmond",
    "seattle",
    "kent",
    "cheyenne",
];
const FIRST_NAMES: [&str; 11] = [
    "peter", "paul", "luke", "john", "saul", "vicky", "kate", "julie", "sarah", "deiter", "walter",
];
const LAST_NAMES: [&str; 9] = [
    "shultz", "abrams", "spencer", "white", "bartels", "walton", "smith", "jones", "noris",
];
const HOT_CHANNELS: [&str; 4] = ["Google", "Facebook", "Baidu", "Apple"];

impl NexmarkTable {
    fn parse(s: &str) -> Option<Self> {
        match s.trim().to_lowercase().as_str() {
            "person" => Some(Self::Person),
            "auction" => Some(Self::Auction),
            "bid" => Some(Self::Bid),
            _ => None,
        }
    }

    fn proportion(self) -> u64 {
        match self {
            Self::Person => PERSON_PROPORTION,
            Self::Auction => AUCTION_PROPORTION,
            Self::Bid => BID_PROPORTION,
        }
    }

    /// Where this type's events sit in each cycle of 50.
    fn first_in_cycle(self) -> u64 {
        match self {
            Self::Person => 0,
            Self::Auction => PERSON_PROPORTION,
            Self::Bid => PERSON_PROPORTION + AUCTION_PROPORTION,
        }
    }

    /// The event number of this type's `k`-th event.
    fn event_number(self, k: u64) -> u64 {
        let per = self.proportion();
        (k / per)
            .saturating_mul(PROPORTION_DENOMINATOR)
            .saturating_add(self.first_in_cycle() + k % per)
    }

    /// How many of the first `events` events are of this type.
    fn count(self, events: u64) -> u64 {
        let full = events / PROPORTION_DENOMINATOR * self.proportion();
        let rest = (events % PROPORTION_DENOMINATOR).saturating_sub(self.first_in_cycle());
        full + rest.min(self.proportion())
    }

    /// The event fields, in the generator's order, and their names.
    fn fields(self) -> &'static [Field] {
        use Field::*;
        match self {
            Self::Person => &[
                Id,
                Name,
                EmailAddress,
                CreditCard,
                City,
                State,
                DateTime,
                Extra,
            ],
            Self::Auction => &[
                Id,
                ItemName,
                Description,
                InitialBid,
                Reserve,
                DateTime,
                Expires,
                Seller,
                Category,
                Extra,
            ],
            Self::Bid => &[Auction, Bidder, Price, Channel, Url, DateTime, Extra],
        }
    }
}

/// An event field a column can be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Id,
    Name,
    EmailAddress,
    CreditCard,
    City,
    State,
    DateTime,
    Extra,
    ItemName,
    Description,
    InitialBid,
    Reserve,
    Expires,
    Seller,
    Category,
    Auction,
    Bidder,
    Price,
    Channel,
    Url,
}

impl Field {
    fn name(self) -> &'static str {
        match self {
            Field::Id => "id",
            Field::Name => "name",
            Field::EmailAddress => "email_address",
            Field::CreditCard => "credit_card",
            Field::City => "city",
            Field::State => "state",
            Field::DateTime => "date_time",
            Field::Extra => "extra",
            Field::ItemName => "item_name",
            Field::Description => "description",
            Field::InitialBid => "initial_bid",
            Field::Reserve => "reserve",
            Field::Expires => "expires",
            Field::Seller => "seller",
            Field::Category => "category",
            Field::Auction => "auction",
            Field::Bidder => "bidder",
            Field::Price => "price",
            Field::Channel => "channel",
            Field::Url => "url",
        }
    }

    fn kind(self) -> FieldKind {
        match self {
            Field::DateTime | Field::Expires => FieldKind::Time,
            Field::Name
            | Field::EmailAddress
            | Field::CreditCard
            | Field::City
            | Field::State
            | Field::Extra
            | Field::ItemName
            | Field::Description
            | Field::Channel
            | Field::Url => FieldKind::Text,
            _ => FieldKind::Int,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FieldKind {
    Int,
    Text,
    Time,
}

/// Column names compare without case or underscores: `date_time`,
/// `dateTime` and `DATETIME` are one field (Flink's DDL is camel case).
fn normalized(name: &str) -> String {
    name.chars()
        .filter(|c| *c != '_')
        .flat_map(char::to_lowercase)
        .collect()
}

/// A `connector = 'nexmark'` stream.
#[derive(Debug, Clone)]
pub struct NexmarkSource {
    /// The event type this stream carries.
    pub table: NexmarkTable,
    schema: SchemaRef,
    /// For each field of the event type, the stream column it fills.
    columns: Vec<Option<usize>>,
    /// Events per second over all three types.
    pub events_per_second: f64,
    /// The number of events (all types) after which the sequence ends.
    pub max_events: Option<u64>,
    partitions: u32,
    /// Event 0's time (Unix ms).
    pub base_ms: i64,
}

/// The 10,000 channels and their URLs, and the four hot URLs: the
/// generator's tables, built once.
struct Channels {
    all: Vec<(String, String)>,
    hot_urls: Vec<String>,
}

fn channels() -> &'static Channels {
    static CHANNELS_TABLE: OnceLock<Channels> = OnceLock::new();
    CHANNELS_TABLE.get_or_init(|| Channels {
        all: (0..CHANNELS)
            .map(|i| {
                let mut url = base_url(i as u64);
                let mut rng = SmallRng::seed_from_u64(i as u64);
                if rng.gen_range(0..10) > 0 {
                    url.push_str("&channel_id=");
                    url.push_str(&((i as i32).reverse_bits() as i64).abs().to_string());
                }
                (format!("channel-{i}"), url)
            })
            .collect(),
        hot_urls: (0..HOT_CHANNELS.len() as u64).map(base_url).collect(),
    })
}

fn base_url(seed: u64) -> String {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut part = || {
        let len = rng.gen_range(3..5usize);
        (0..len)
            .map(|_| {
                if rng.gen_range(0..13) == 0 {
                    '_'
                } else {
                    rng.gen_range(b'a'..=b'z') as char
                }
            })
            .collect::<String>()
    };
    let (a, b, c) = (part(), part(), part());
    format!("https://www.nexmark.com/{a}/{b}/{c}/item.htm?query=1")
}

fn push_letters(rng: &mut SmallRng, len: usize, out: &mut String) {
    for _ in 0..len {
        out.push(rng.gen_range(b'a'..=b'z') as char);
    }
}

/// The generator's `extra` padding: random letters bringing the event to
/// about its average size.
fn push_extra(rng: &mut SmallRng, current: usize, average: usize, out: &mut String) {
    if current > average {
        return;
    }
    let want = average - current;
    let delta = (want + 2) / 5;
    let len = want - delta
        + if delta == 0 {
            0
        } else {
            rng.gen_range(0..2 * delta)
        };
    push_letters(rng, len, out);
}

fn price(rng: &mut SmallRng) -> usize {
    (10.0_f32.powf(rng.gen::<f32>() * 6.0) * 100.0).round() as usize
}

/// The last person id (from 0) at event `n`.
fn last_person(n: usize) -> usize {
    let d = PROPORTION_DENOMINATOR as usize;
    n / d * PERSON_PROPORTION as usize + (n % d).min(PERSON_PROPORTION as usize - 1)
}

/// A recent person id (from 0).
fn next_person(n: usize, rng: &mut SmallRng) -> usize {
    let people = last_person(n) + 1;
    let active = people.min(ACTIVE_PEOPLE);
    people - active + rng.gen_range(0..active + PERSON_ID_LEAD)
}

/// The last auction id (from 0) at event `n` (never event 0: `n` is an
/// auction or a bid).
fn last_auction(n: usize) -> usize {
    let d = PROPORTION_DENOMINATOR as usize;
    let (p, a) = (PERSON_PROPORTION as usize, AUCTION_PROPORTION as usize);
    let mut epoch = n / d;
    let mut offset = n % d;
    if offset < p {
        epoch = epoch.saturating_sub(1);
        offset = a - 1;
    } else if p + a <= offset {
        offset = a - 1;
    } else {
        offset -= p;
    }
    epoch * a + offset
}

/// A recent auction id (from 0).
fn next_auction(n: usize, rng: &mut SmallRng) -> usize {
    let max = last_auction(n);
    let min = max.saturating_sub(IN_FLIGHT_AUCTIONS);
    min + rng.gen_range(0..max - min + 1 + AUCTION_ID_LEAD)
}

/// One column being built.
enum Builder {
    Int(Int64Builder),
    Text(StringBuilder),
    Time(TimestampMicrosecondBuilder),
    /// A field the stream does not have, or no one reads: generated (the
    /// random draws must happen) and dropped.
    Skip,
}

impl Builder {
    /// Not built: the stream lacks the field, or no one reads it. (Only
    /// an event's last draws, `extra`, may be skipped on that account.)
    fn skipped(&self) -> bool {
        matches!(self, Builder::Skip)
    }

    fn int(&mut self, v: usize) {
        if let Builder::Int(b) = self {
            b.append_value(v as i64);
        }
    }

    fn text(&mut self, v: &str) {
        if let Builder::Text(b) = self {
            b.append_value(v);
        }
    }

    fn time_ms(&mut self, ms: i64) {
        if let Builder::Time(b) = self {
            b.append_value(ms.saturating_mul(1000));
        }
    }
}

impl NexmarkSource {
    /// Validates the options and columns of a nexmark stream.
    pub fn new(def: &StreamDef) -> Result<Self> {
        let bad = |option: &str, message: String| ExecError::InvalidOption {
            option: option.into(),
            message,
        };
        for key in def.options.keys() {
            if !matches!(
                key.as_str(),
                "connector"
                    | "partitions"
                    | "nexmark.table.type"
                    | "events_per_second"
                    | "nexmark.event.num"
                    | "base_time"
            ) {
                return Err(bad(
                    key,
                    "unknown nexmark option (nexmark.table.type, events_per_second, \
                     nexmark.event.num, base_time, partitions)"
                        .into(),
                ));
            }
        }
        let table = def
            .options
            .get("nexmark.table.type")
            .ok_or_else(|| {
                bad(
                    "nexmark.table.type",
                    "a nexmark stream needs nexmark.table.type = 'person', 'auction' or 'bid'"
                        .into(),
                )
            })
            .and_then(|t| {
                NexmarkTable::parse(t).ok_or_else(|| {
                    bad(
                        "nexmark.table.type",
                        format!("'{t}' is not person, auction or bid"),
                    )
                })
            })?;
        let events_per_second = match def.options.get("events_per_second") {
            Some(v) => v
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|r| *r > 0.0 && *r <= 1e12)
                .ok_or_else(|| {
                    bad(
                        "events_per_second",
                        format!("'{v}' is not a positive number"),
                    )
                })?,
            None => 10_000.0,
        };
        let max_events = opt_i64(def, "nexmark.event.num")?
            .map(|n| {
                u64::try_from(n).map_err(|_| bad("nexmark.event.num", format!("{n} is negative")))
            })
            .transpose()?;
        let base_ms = match def.options.get("base_time") {
            Some(t) => {
                let nanos =
                    arrow::compute::kernels::cast_utils::string_to_timestamp_nanos(t.trim())
                        .map_err(|_| {
                            bad(
                                "base_time",
                                format!("'{t}' is not a timestamp (write '2024-01-01 00:00:00')"),
                            )
                        })?;
                nanos.div_euclid(1_000_000)
            }
            None => def.created_at_ms,
        };
        let fields = table.fields();
        let mut columns = vec![None; fields.len()];
        for (i, c) in def.columns.iter().enumerate() {
            let Some(f) = fields
                .iter()
                .position(|f| normalized(f.name()) == normalized(&c.name))
            else {
                let names: Vec<&str> = fields.iter().map(|f| f.name()).collect();
                return Err(ExecError::InvalidOption {
                    option: "nexmark.table.type".into(),
                    message: format!(
                        "column {} is not a field of a nexmark {:?} ({})",
                        c.name,
                        table,
                        names.join(", ")
                    ),
                });
            };
            if columns[f].is_some() {
                return Err(ExecError::invalid(format!(
                    "two columns are the nexmark field {}",
                    fields[f].name()
                )));
            }
            let fits = match fields[f].kind() {
                FieldKind::Int => matches!(c.data_type, DataType::Int64),
                FieldKind::Text => matches!(c.data_type, DataType::Utf8),
                FieldKind::Time => {
                    matches!(c.data_type, DataType::Timestamp(TimeUnit::Microsecond, _))
                }
            };
            if !fits {
                let want = match fields[f].kind() {
                    FieldKind::Int => "BIGINT",
                    FieldKind::Text => "VARCHAR",
                    FieldKind::Time => "TIMESTAMP",
                };
                return Err(ExecError::invalid(format!(
                    "type mismatch: the nexmark field {} is {want}, not {}",
                    fields[f].name(),
                    c.sql_type
                )));
            }
            columns[f] = Some(i);
        }
        Ok(Self {
            table,
            schema: def.source_schema(),
            columns,
            events_per_second,
            max_events,
            partitions: def.partitions.max(1),
            base_ms,
        })
    }

    /// How many events (all types) exist at `now_us`.
    pub fn events_at(&self, now_us: i64) -> u64 {
        let elapsed_us = now_us
            .saturating_sub(self.base_ms.saturating_mul(1000))
            .max(0);
        // At most 2^60 events: any rate over any span stays far from
        // overflowing the arithmetic on event numbers.
        let n = ((elapsed_us as f64 / 1e6 * self.events_per_second) as u64).min(MAX_EVENTS);
        self.max_events.map_or(n, |m| n.min(m))
    }

    /// Event `n`'s time (Unix ms).
    pub fn event_time_ms(&self, n: u64) -> i64 {
        self.base_ms + (n as f64 * 1000.0 / self.events_per_second).round() as i64
    }

    fn person(&self, n: usize, b: &mut [Builder], s: &mut String) {
        let rng = &mut SmallRng::seed_from_u64(n as u64);
        let time = self.event_time_ms(n as u64);
        b[0].int(last_person(n) + FIRST_PERSON_ID);
        s.clear();
        s.push_str(FIRST_NAMES.choose(rng).copied().unwrap_or_default());
        s.push(' ');
        s.push_str(LAST_NAMES.choose(rng).copied().unwrap_or_default());
        let mut size = 8 + s.len();
        b[1].text(s);
        s.clear();
        push_letters(rng, 7, s);
        s.push('@');
        push_letters(rng, 5, s);
        s.push_str(".com");
        size += s.len();
        b[2].text(s);
        s.clear();
        for i in 0..4 {
            if i > 0 {
                s.push(' ');
            }
            let d: i32 = rng.gen_range(0..10000);
            push_padded(s, d);
        }
        size += s.len();
        b[3].text(s);
        let city = US_CITIES.choose(rng).copied().unwrap_or_default();
        let state = US_STATES.choose(rng).copied().unwrap_or_default();
        size += city.len() + state.len();
        b[4].text(city);
        b[5].text(state);
        b[6].time_ms(time);
        if !b[7].skipped() {
            s.clear();
            push_extra(rng, size, AVG_PERSON_BYTES, s);
            b[7].text(s);
        }
    }

    fn auction(&self, n: usize, b: &mut [Builder], s: &mut String) {
        let rng = &mut SmallRng::seed_from_u64(n as u64);
        let time = self.event_time_ms(n as u64);
        b[0].int(last_auction(n) + FIRST_AUCTION_ID);
        s.clear();
        push_letters(rng, 20, s);
        b[1].text(s);
        s.clear();
        push_letters(rng, 100, s);
        b[2].text(s);
        let initial = price(rng);
        let reserve = initial + price(rng);
        b[3].int(initial);
        b[4].int(reserve);
        b[5].time_ms(time);
        // An auction lasts up to twice the time in which the generator
        // opens as many auctions as are in flight.
        let ahead = IN_FLIGHT_AUCTIONS as u64 * PROPORTION_DENOMINATOR / AUCTION_PROPORTION;
        let horizon = (self.event_time_ms(n as u64 + ahead) - time).max(0) as u64;
        let length = 1 + rng.gen_range(0..(horizon * 2).max(1));
        b[6].time_ms(time.saturating_add(length as i64));
        let seller = if rng.gen_range(0..HOT_SELLER_RATIO) > 0 {
            last_person(n) / HOT_BATCH * HOT_BATCH
        } else {
            next_person(n, rng)
        };
        b[7].int(seller + FIRST_PERSON_ID);
        b[8].int(FIRST_CATEGORY_ID + rng.gen_range(0..NUM_CATEGORIES));
        if !b[9].skipped() {
            s.clear();
            push_extra(rng, 8 + 20 + 100 + 8 * 5, AVG_AUCTION_BYTES, s);
            b[9].text(s);
        }
    }

    fn bid(&self, n: usize, b: &mut [Builder], s: &mut String) {
        let rng = &mut SmallRng::seed_from_u64(n as u64);
        let auction = if 0 < rng.gen_range(0..HOT_AUCTION_RATIO) {
            last_auction(n) / HOT_BATCH * HOT_BATCH
        } else {
            next_auction(n, rng)
        };
        let bidder = if 0 < rng.gen_range(0..HOT_BIDDER_RATIO) {
            last_person(n) / HOT_BATCH * HOT_BATCH + 1
        } else {
            next_person(n, rng)
        };
        b[0].int(auction + FIRST_AUCTION_ID);
        b[1].int(bidder + FIRST_PERSON_ID);
        b[2].int(price(rng));
        let table = channels();
        if rng.gen_range(0..HOT_CHANNEL_RATIO) > 0 {
            let i = rng.gen_range(0..HOT_CHANNELS.len());
            b[3].text(HOT_CHANNELS[i]);
            b[4].text(&table.hot_urls[i]);
        } else {
            let (channel, url) = table.all.choose(rng).map_or(("", ""), |(c, u)| (c, u));
            b[3].text(channel);
            b[4].text(url);
        }
        b[5].time_ms(self.event_time_ms(n as u64));
        if !b[6].skipped() {
            s.clear();
            push_extra(rng, 32, AVG_BID_BYTES, s);
            b[6].text(s);
        }
    }
}

/// `{:04}` of a number below 10,000, without formatting machinery.
fn push_padded(s: &mut String, d: i32) {
    let d = d.clamp(0, 9999);
    for div in [1000, 100, 10, 1] {
        s.push((b'0' + (d / div % 10) as u8) as char);
    }
}

impl Generator for NexmarkSource {
    fn starts_now(&self) -> bool {
        false
    }

    fn end(&self, p: u32) -> Option<u64> {
        self.max_events.map(|_| self.available(p, i64::MAX))
    }

    fn available(&self, p: u32, now_us: i64) -> u64 {
        let total = self.table.count(self.events_at(now_us));
        let n = self.partitions as u64;
        total / n + u64::from(total % n > p as u64)
    }

    fn generate(&self, p: u32, from: u64, to: u64) -> Result<RecordBatch> {
        self.generate_columns(p, from, to, &[])
    }

    /// Columns not read (`read[c]` false) and nullable come out NULL: their
    /// values are not built, and `extra` (the last random draws of an
    /// event, and the costliest) is not even drawn. The other columns are
    /// the same whatever is read.
    fn generate_columns(&self, p: u32, from: u64, to: u64, read: &[bool]) -> Result<RecordBatch> {
        let rows = to.saturating_sub(from) as usize;
        let fields = self.table.fields();
        let unread =
            |c: usize| read.get(c).is_some_and(|r| !*r) && self.schema.field(c).is_nullable();
        let mut builders: Vec<Builder> = fields
            .iter()
            .zip(&self.columns)
            .map(|(f, c)| match (c, f.kind()) {
                (None, _) => Builder::Skip,
                (Some(c), _) if unread(*c) => Builder::Skip,
                (Some(_), FieldKind::Int) => Builder::Int(Int64Builder::with_capacity(rows)),
                (Some(_), FieldKind::Text) => {
                    Builder::Text(StringBuilder::with_capacity(rows, rows * 16))
                }
                (Some(_), FieldKind::Time) => {
                    Builder::Time(TimestampMicrosecondBuilder::with_capacity(rows))
                }
            })
            .collect();
        let mut scratch = String::with_capacity(256);
        let step = self.partitions as u64;
        for i in from..to {
            let k = i.saturating_mul(step).saturating_add(p as u64);
            let n = usize::try_from(self.table.event_number(k))
                .map_err(|_| ExecError::invalid("nexmark event number out of range"))?;
            match self.table {
                NexmarkTable::Person => self.person(n, &mut builders, &mut scratch),
                NexmarkTable::Auction => self.auction(n, &mut builders, &mut scratch),
                NexmarkTable::Bid => self.bid(n, &mut builders, &mut scratch),
            }
        }
        let mut columns: Vec<Option<ArrayRef>> = (0..self.schema.fields().len())
            .map(|c| {
                unread(c)
                    .then(|| arrow::array::new_null_array(self.schema.field(c).data_type(), rows))
            })
            .collect();
        for (b, c) in builders.into_iter().zip(&self.columns) {
            let Some(c) = *c else { continue };
            let array: ArrayRef = match b {
                Builder::Int(mut b) => Arc::new(b.finish()),
                Builder::Text(mut b) => Arc::new(b.finish()),
                Builder::Time(mut b) => {
                    let tz = match self.schema.field(c).data_type() {
                        DataType::Timestamp(_, tz) => tz.clone(),
                        _ => None,
                    };
                    Arc::new(b.finish().with_timezone_opt(tz))
                }
                Builder::Skip => continue,
            };
            if let Some(slot) = columns.get_mut(c) {
                *slot = Some(array);
            }
        }
        let columns = columns
            .into_iter()
            .map(|c| c.ok_or_else(|| ExecError::invalid("a nexmark column was not generated")))
            .collect::<Result<Vec<_>>>()?;
        Ok(RecordBatch::try_new(Arc::clone(&self.schema), columns)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Int64Type, TimestampMicrosecondType};
    use drizzle_planner::ColumnDef;
    use std::collections::BTreeMap;

    fn col(name: &str, data_type: DataType, sql: &str) -> ColumnDef {
        ColumnDef {
            name: name.into(),
            data_type,
            sql_type: sql.into(),
            nullable: true,
        }
    }

    fn stream(table: &str, partitions: u32, opts: &[(&str, &str)]) -> StreamDef {
        let ts = DataType::Timestamp(TimeUnit::Microsecond, None);
        let text = |n: &str| col(n, DataType::Utf8, "VARCHAR");
        let int = |n: &str| col(n, DataType::Int64, "BIGINT");
        let time = |n: &str| col(n, ts.clone(), "TIMESTAMP");
        let columns = match table {
            "person" => vec![
                int("id"),
                text("name"),
                text("email_address"),
                text("credit_card"),
                text("city"),
                text("state"),
                time("date_time"),
                text("extra"),
            ],
            "auction" => vec![
                int("id"),
                text("item_name"),
                text("description"),
                int("initial_bid"),
                int("reserve"),
                time("date_time"),
                time("expires"),
                int("seller"),
                int("category"),
                text("extra"),
            ],
            _ => vec![
                int("auction"),
                int("bidder"),
                int("price"),
                text("channel"),
                text("url"),
                time("dateTime"),
                text("extra"),
            ],
        };
        let mut options: BTreeMap<String, String> = [
            ("connector", "nexmark"),
            ("nexmark.table.type", table),
            ("events_per_second", "1000"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in opts {
            options.insert(k.to_string(), v.to_string());
        }
        StreamDef {
            name: table.into(),
            columns,
            watermark: None,
            options,
            partitions,
            created_at_ms: 1_700_000_000_000,
            proctime: None,
        }
    }

    fn reference() -> ::nexmark::EventGenerator {
        ::nexmark::EventGenerator::new(::nexmark::config::NexmarkConfig {
            base_time: 1_700_000_000_000,
            first_rate: 1000,
            next_rate: 1000,
            ..Default::default()
        })
    }

    fn text(b: &RecordBatch, c: usize, i: usize) -> String {
        b.column(c).as_string::<i32>().value(i).to_string()
    }

    fn int(b: &RecordBatch, c: usize, i: usize) -> u64 {
        b.column(c).as_primitive::<Int64Type>().value(i) as u64
    }

    fn ms(b: &RecordBatch, c: usize, i: usize) -> u64 {
        (b.column(c)
            .as_primitive::<TimestampMicrosecondType>()
            .value(i)
            / 1000) as u64
    }

    /// Every field of the first 5,000 events equals the reference
    /// generator's (RisingWave's `nexmark` crate).
    #[test]
    fn events_are_the_reference_generators() {
        let events: Vec<::nexmark::event::Event> = reference().take(5_000).collect();
        let person = NexmarkSource::new(&stream("person", 1, &[])).unwrap();
        let auction = NexmarkSource::new(&stream("auction", 1, &[])).unwrap();
        let bid = NexmarkSource::new(&stream("bid", 1, &[])).unwrap();
        let persons = person.generate(0, 0, 100).unwrap();
        let auctions = auction.generate(0, 0, 300).unwrap();
        let bids = bid.generate(0, 0, 4600).unwrap();
        let (mut np, mut na, mut nb) = (0, 0, 0);
        for e in &events {
            match e {
                ::nexmark::event::Event::Person(p) => {
                    let b = &persons;
                    let i = np;
                    np += 1;
                    assert_eq!(int(b, 0, i), p.id as u64);
                    assert_eq!(text(b, 1, i), p.name);
                    assert_eq!(text(b, 2, i), p.email_address);
                    assert_eq!(text(b, 3, i), p.credit_card);
                    assert_eq!(text(b, 4, i), p.city);
                    assert_eq!(text(b, 5, i), p.state);
                    assert_eq!(ms(b, 6, i), p.date_time);
                    assert_eq!(text(b, 7, i), p.extra);
                }
                ::nexmark::event::Event::Auction(a) => {
                    let b = &auctions;
                    let i = na;
                    na += 1;
                    assert_eq!(int(b, 0, i), a.id as u64);
                    assert_eq!(text(b, 1, i), a.item_name);
                    assert_eq!(text(b, 2, i), a.description);
                    assert_eq!(int(b, 3, i), a.initial_bid as u64);
                    assert_eq!(int(b, 4, i), a.reserve as u64);
                    assert_eq!(ms(b, 5, i), a.date_time);
                    assert_eq!(ms(b, 6, i), a.expires);
                    assert_eq!(int(b, 7, i), a.seller as u64);
                    assert_eq!(int(b, 8, i), a.category as u64);
                    assert_eq!(text(b, 9, i), a.extra);
                }
                ::nexmark::event::Event::Bid(x) => {
                    let b = &bids;
                    let i = nb;
                    nb += 1;
                    assert_eq!(int(b, 0, i), x.auction as u64);
                    assert_eq!(int(b, 1, i), x.bidder as u64);
                    assert_eq!(int(b, 2, i), x.price as u64);
                    assert_eq!(text(b, 3, i), x.channel);
                    assert_eq!(text(b, 4, i), x.url);
                    assert_eq!(ms(b, 5, i), x.date_time);
                    assert_eq!(text(b, 6, i), x.extra);
                }
            }
        }
        assert_eq!((np, na, nb), (100, 300, 4600));
    }

    #[test]
    fn partitions_deal_the_sequence_and_counts_follow_the_rate() {
        let one = NexmarkSource::new(&stream("bid", 1, &[])).unwrap();
        let three = NexmarkSource::new(&stream("bid", 3, &[])).unwrap();
        let all = one.generate(0, 0, 300).unwrap();
        for p in 0..3u32 {
            let part = three.generate(p, 0, 100).unwrap();
            for i in 0..100 {
                assert_eq!(int(&part, 2, i), int(&all, 2, i * 3 + p as usize));
                assert_eq!(text(&part, 6, i), text(&all, 6, i * 3 + p as usize));
            }
        }
        // 1,000 events/s: after 1.01 s, events 0..1010 exist: 21 people
        // (0, 50, ..., 1000), 3 * 21 auctions, 46 * 20 + 6 bids.
        let at = 1_700_000_000_000 * 1000 + 1_010_000;
        let count = |t: &str, p| {
            NexmarkSource::new(&stream(t, 1, &[]))
                .unwrap()
                .available(p, at)
        };
        assert_eq!(count("person", 0), 21);
        assert_eq!(count("auction", 0), 63);
        assert_eq!(count("bid", 0), 926);
        let split: u64 = (0..3).map(|p| three.available(p, at)).sum();
        assert_eq!(split, 926);
        // Absurd rates and spans stay in range.
        let fast = NexmarkSource::new(&stream(
            "bid",
            1,
            &[
                ("events_per_second", "1000000000000"),
                ("base_time", "1970-01-01 00:00:00"),
            ],
        ))
        .unwrap();
        let end = fast.available(0, i64::MAX);
        assert!(end > 0);
        assert_eq!(fast.generate(0, end - 2, end).unwrap().num_rows(), 2);
        // A bound on the events stops the sequence.
        let bounded =
            NexmarkSource::new(&stream("bid", 1, &[("nexmark.event.num", "100")])).unwrap();
        assert_eq!(bounded.available(0, i64::MAX), 92);
        // Event n's time is base + n / rate.
        assert_eq!(ms(&all, 5, 0), 1_700_000_000_004);
    }

    /// Columns no one reads come out NULL; the others are the same
    /// values (skipping `extra`'s draws changes nothing else).
    #[test]
    fn unread_columns_are_null_and_the_rest_unchanged() {
        for (table, unread) in [
            ("person", [1usize, 7]),
            ("auction", [2, 9]),
            ("bid", [3, 6]),
        ] {
            let source = NexmarkSource::new(&stream(table, 1, &[])).unwrap();
            let full = source.generate(0, 10, 60).unwrap();
            let read: Vec<bool> = (0..full.num_columns())
                .map(|c| !unread.contains(&c))
                .collect();
            let part = source.generate_columns(0, 10, 60, &read).unwrap();
            assert_eq!(part.schema(), full.schema());
            for c in 0..full.num_columns() {
                if unread.contains(&c) {
                    assert_eq!(part.column(c).null_count(), 50, "{table}.{c} unread");
                } else {
                    assert_eq!(
                        part.column(c).as_ref(),
                        full.column(c).as_ref(),
                        "{table}.{c}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_stream_may_leave_fields_out_in_any_order() {
        let mut def = stream("bid", 1, &[]);
        def.columns = vec![
            col("price", DataType::Int64, "BIGINT"),
            col(
                "date_time",
                DataType::Timestamp(TimeUnit::Microsecond, None),
                "TIMESTAMP",
            ),
        ];
        let narrow = NexmarkSource::new(&def)
            .unwrap()
            .generate(0, 5, 50)
            .unwrap();
        let full = NexmarkSource::new(&stream("bid", 1, &[]))
            .unwrap()
            .generate(0, 5, 50)
            .unwrap();
        assert_eq!(narrow.num_columns(), 2);
        assert_eq!(narrow.column(0).as_ref(), full.column(2).as_ref());
        assert_eq!(narrow.column(1).len(), 45);
    }

    #[test]
    fn bad_options_and_columns_are_refused() {
        let mut wrong_type = stream("bid", 1, &[]);
        wrong_type.columns[0] = col("auction", DataType::Utf8, "VARCHAR");
        let mut unknown = stream("bid", 1, &[]);
        unknown.columns[0] = col("seller", DataType::Int64, "BIGINT");
        for def in [
            stream("bid", 1, &[("nexmark.table.type", "order")]),
            stream("bid", 1, &[("events_per_second", "0")]),
            stream("bid", 1, &[("nexmark.event.num", "-3")]),
            stream("bid", 1, &[("base_time", "yesterday")]),
            stream("bid", 1, &[("rows_per_second", "5")]),
            wrong_type,
            unknown,
        ] {
            assert!(NexmarkSource::new(&def).is_err(), "{:?}", def.options);
        }
        let based =
            NexmarkSource::new(&stream("bid", 1, &[("base_time", "2024-01-01 00:00:00")])).unwrap();
        assert_eq!(based.base_ms, 1_704_067_200_000);
    }
}
