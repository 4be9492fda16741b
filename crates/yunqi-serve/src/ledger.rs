//! The ledger: how much of each quota is used (per quota, key and period) and how much of each
//! money line is drawn. It changes only a round at a time: a [`Round`] reads the published
//! ledger plus its own earlier changes, so a writer can decide many applications in order,
//! make their decisions durable, and only then [`Ledger::publish`] the round — or drop it, and
//! the ledger is as before. Every change is also a [`Change`] (a delta) that the decision log
//! keeps, so replaying the log's changes in order rebuilds the same ledger.

use std::collections::HashMap;

/// What is counted: one quota of a service, for one key (a plate), in one period.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct SpendKey {
    /// The quota's position in its service's definition.
    pub quota: u16,
    /// The value it is keyed by (e.g. the plate).
    pub key: Box<str>,
    /// The period number ([`crate::calendar::Period::bucket`]).
    pub bucket: i32,
}

/// One change of a decision, as the decision log keeps it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    /// One unit of a quota used.
    Spend {
        /// What.
        #[serde(flatten)]
        at: SpendKey,
    },
    /// One unit of a quota given back (a held application refused on review).
    Release {
        /// What.
        #[serde(flatten)]
        at: SpendKey,
    },
    /// A money line drawn (positive, in fen) or repaid (negative).
    Draw {
        /// The line (e.g. a citizen's credit line).
        account: Box<str>,
        /// Fen: + drawn, − repaid.
        fen: i64,
    },
}

/// A quota with no room left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Full {
    /// Its position in the spends asked for.
    pub index: usize,
    /// Used so far.
    pub used: u32,
    /// Its limit.
    pub limit: u32,
}

/// A money line without room for a draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Short {
    /// Drawn and not repaid, fen.
    pub outstanding: i64,
    /// The line's limit, fen.
    pub limit: i64,
}

/// The published state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    used: HashMap<SpendKey, u32>,
    outstanding: HashMap<Box<str>, i64>,
}

/// A ledger as a file keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    /// Quota use.
    pub used: Vec<(SpendKey, u32)>,
    /// Money drawn and not repaid.
    pub outstanding: Vec<(String, i64)>,
}

impl Ledger {
    /// Used units of a quota bucket.
    pub fn used(&self, k: &SpendKey) -> u32 {
        self.used.get(k).copied().unwrap_or(0)
    }

    /// Drawn and not repaid on a money line, fen.
    pub fn outstanding(&self, account: &str) -> i64 {
        self.outstanding.get(account).copied().unwrap_or(0)
    }

    /// A round of changes over this ledger.
    pub fn round(&self) -> Round<'_> {
        Round {
            base: self,
            used: HashMap::new(),
            outstanding: HashMap::new(),
        }
    }

    /// Makes a round's changes the ledger's.
    pub fn publish(&mut self, changes: RoundChanges) {
        self.used.extend(changes.used);
        for (k, v) in changes.outstanding {
            if v == 0 {
                self.outstanding.remove(&k);
            } else {
                self.outstanding.insert(k, v);
            }
        }
    }

    /// Applies one logged change (rebuilding the ledger from the decision log).
    pub fn replay(&mut self, change: &Change) {
        match change {
            Change::Spend { at } => *self.used.entry(at.clone()).or_insert(0) += 1,
            Change::Release { at } => {
                if let Some(u) = self.used.get_mut(at) {
                    *u = u.saturating_sub(1);
                }
            }
            Change::Draw { account, fen } => {
                let o = self.outstanding.entry(account.clone()).or_insert(0);
                *o += fen;
                if *o == 0 {
                    self.outstanding.remove(account);
                }
            }
        }
    }

    /// The ledger as a file keeps it (sorted, so equal ledgers give equal files).
    pub fn snapshot(&self) -> Snapshot {
        let mut used: Vec<(SpendKey, u32)> =
            self.used.iter().map(|(k, v)| (k.clone(), *v)).collect();
        used.sort_by(|a, b| {
            (a.0.quota, &a.0.key, a.0.bucket).cmp(&(b.0.quota, &b.0.key, b.0.bucket))
        });
        let mut outstanding: Vec<(String, i64)> = self
            .outstanding
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect();
        outstanding.sort();
        Snapshot { used, outstanding }
    }

    /// A ledger from its snapshot.
    pub fn restore(s: Snapshot) -> Ledger {
        Ledger {
            used: s.used.into_iter().collect(),
            outstanding: s
                .outstanding
                .into_iter()
                .map(|(k, v)| (k.into_boxed_str(), v))
                .collect(),
        }
    }
}

/// Changes decided against a ledger and not yet published.
pub struct Round<'a> {
    base: &'a Ledger,
    used: HashMap<SpendKey, u32>,
    outstanding: HashMap<Box<str>, i64>,
}

/// What a round changed: the new values of what it touched.
#[derive(Debug, Default)]
pub struct RoundChanges {
    used: HashMap<SpendKey, u32>,
    outstanding: HashMap<Box<str>, i64>,
}

impl Round<'_> {
    /// Used units of a quota bucket, counting this round.
    pub fn used(&self, k: &SpendKey) -> u32 {
        self.used
            .get(k)
            .copied()
            .unwrap_or_else(|| self.base.used(k))
    }

    /// Drawn and not repaid, counting this round.
    pub fn outstanding(&self, account: &str) -> i64 {
        self.outstanding
            .get(account)
            .copied()
            .unwrap_or_else(|| self.base.outstanding(account))
    }

    /// Uses one unit of every quota in `spends` (each with its limit) if all have room;
    /// otherwise changes nothing and says which is full. Returns the changes to log.
    pub fn try_spend(&mut self, spends: &[(SpendKey, u32)]) -> Result<Vec<Change>, Full> {
        for (index, (k, limit)) in spends.iter().enumerate() {
            let used = self.used(k);
            if used >= *limit {
                return Err(Full {
                    index,
                    used,
                    limit: *limit,
                });
            }
        }
        let mut changes = Vec::with_capacity(spends.len());
        for (k, _) in spends {
            let used = self.used(k) + 1;
            self.used.insert(k.clone(), used);
            changes.push(Change::Spend { at: k.clone() });
        }
        Ok(changes)
    }

    /// Gives back one unit of each quota bucket in `keys` (a held application refused).
    pub fn release(&mut self, keys: &[SpendKey]) -> Vec<Change> {
        keys.iter()
            .map(|k| {
                let used = self.used(k).saturating_sub(1);
                self.used.insert(k.clone(), used);
                Change::Release { at: k.clone() }
            })
            .collect()
    }

    /// Draws `fen` (> 0) on a line of `limit_fen` if it stays within it.
    pub fn try_draw(&mut self, account: &str, fen: i64, limit_fen: i64) -> Result<Change, Short> {
        let outstanding = self.outstanding(account);
        if fen <= 0 || outstanding.saturating_add(fen) > limit_fen {
            return Err(Short {
                outstanding,
                limit: limit_fen,
            });
        }
        self.outstanding.insert(account.into(), outstanding + fen);
        Ok(Change::Draw {
            account: account.into(),
            fen,
        })
    }

    /// Repays up to `fen` (> 0) of a line; returns the change (what was repaid, never more than
    /// is outstanding), or `None` when nothing is.
    pub fn repay(&mut self, account: &str, fen: i64) -> Option<Change> {
        let outstanding = self.outstanding(account);
        let paid = fen.min(outstanding);
        if paid <= 0 {
            return None;
        }
        self.outstanding.insert(account.into(), outstanding - paid);
        Some(Change::Draw {
            account: account.into(),
            fen: -paid,
        })
    }

    /// The round's changes, to publish once its decisions are durable.
    pub fn finish(self) -> RoundChanges {
        RoundChanges {
            used: self.used,
            outstanding: self.outstanding,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(quota: u16, key: &str, bucket: i32) -> SpendKey {
        SpendKey {
            quota,
            key: key.into(),
            bucket,
        }
    }

    #[test]
    fn spends_all_or_nothing_within_limits() {
        let mut l = Ledger::default();
        let mut r = l.round();
        // yearly 12, monthly 3: the fourth in a month is refused by the monthly quota and
        // spends nothing of the yearly one.
        for _ in 0..3 {
            r.try_spend(&[(k(0, "浙B1", 2026), 12), (k(1, "浙B1", 24322), 3)])
                .unwrap();
        }
        let full = r
            .try_spend(&[(k(0, "浙B1", 2026), 12), (k(1, "浙B1", 24322), 3)])
            .unwrap_err();
        assert_eq!(
            full,
            Full {
                index: 1,
                used: 3,
                limit: 3
            }
        );
        assert_eq!(r.used(&k(0, "浙B1", 2026)), 3);
        assert_eq!(l.used(&k(0, "浙B1", 2026)), 0, "nothing published yet");
        let changes = r.finish();
        l.publish(changes);
        assert_eq!(l.used(&k(0, "浙B1", 2026)), 3);
        // A dropped round leaves the ledger as it was.
        {
            let mut r = l.round();
            r.try_spend(&[(k(0, "浙B1", 2026), 12)]).unwrap();
        }
        assert_eq!(l.used(&k(0, "浙B1", 2026)), 3);
    }

    #[test]
    fn money_lines_never_go_over() {
        let mut l = Ledger::default();
        let mut r = l.round();
        r.try_draw("p1", 60_000, 100_000).unwrap();
        assert_eq!(
            r.try_draw("p1", 50_000, 100_000).unwrap_err(),
            Short {
                outstanding: 60_000,
                limit: 100_000
            }
        );
        assert!(r.try_draw("p1", 0, 100_000).is_err());
        assert_eq!(
            r.repay("p1", 80_000),
            Some(Change::Draw {
                account: "p1".into(),
                fen: -60_000
            })
        );
        assert_eq!(r.repay("p1", 1), None);
        r.try_draw("p1", 100_000, 100_000).unwrap();
        l.publish(r.finish());
        assert_eq!(l.outstanding("p1"), 100_000);
    }

    /// Rounds published (or dropped) at random equal a sequential model, and the logged
    /// changes of the published rounds replay to the same ledger.
    #[test]
    fn rounds_match_a_sequential_model_and_replay() {
        let mut x: u64 = 0x5eed;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut l = Ledger::default();
        let mut model: HashMap<SpendKey, u32> = HashMap::new();
        let mut log: Vec<Change> = Vec::new();
        // Grants held (as pending applications hold theirs); some are refused and released.
        let mut held: Vec<Vec<SpendKey>> = Vec::new();
        for _ in 0..300 {
            let mut r = l.round();
            let mut m = model.clone();
            let mut h = held.clone();
            let mut round_log = Vec::new();
            for _ in 0..(next() % 20) {
                if next() % 5 == 0 && !h.is_empty() {
                    let keys = h.swap_remove((next() as usize) % h.len());
                    for s in &keys {
                        *m.get_mut(s).unwrap() -= 1;
                    }
                    round_log.extend(r.release(&keys));
                    continue;
                }
                let plate = format!("p{}", next() % 5);
                let spends = [
                    (k(0, &plate, 2026), 12),
                    (k(1, &plate, (next() % 3) as i32), 3),
                ];
                let room = spends
                    .iter()
                    .all(|(s, lim)| m.get(s).copied().unwrap_or(0) < *lim);
                match r.try_spend(&spends) {
                    Ok(c) => {
                        assert!(room);
                        for (s, _) in &spends {
                            *m.entry(s.clone()).or_insert(0) += 1;
                        }
                        h.push(spends.iter().map(|(s, _)| s.clone()).collect());
                        round_log.extend(c);
                    }
                    Err(_) => assert!(!room),
                }
            }
            if next() % 4 == 0 {
                continue; // the round's append failed: dropped
            }
            l.publish(r.finish());
            model = m;
            held = h;
            log.extend(round_log);
        }
        for (s, used) in &model {
            assert_eq!(l.used(s), *used);
            assert!(*used <= if s.quota == 0 { 12 } else { 3 });
        }
        let mut replayed = Ledger::default();
        log.iter().for_each(|c| replayed.replay(c));
        assert_eq!(replayed.snapshot(), l.snapshot());
        let json = serde_json::to_string(&l.snapshot()).unwrap();
        let back: Snapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(Ledger::restore(back), l);
    }
}
