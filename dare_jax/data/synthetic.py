"""Synthetic logs in the Taobao `UserBehavior.csv` format.

The real Taobao log (100 M rows) is not available everywhere, so the demo, the at-scale
benchmarks and several tests run on logs written here. The file has no header and five columns,
exactly like the Tianchi original::

    user_id,item_id,category_id,behavior_type,timestamp

Rows are grouped by user (users in a shuffled order, as in the real file), time-ordered within a
user, ``behavior_type`` in ``pv``/``cart``/``fav``/``buy`` with the real shares (about 90 %
``pv``), Unix-second timestamps inside 2017-11-25 .. 2017-12-03 (Beijing time, as the real log)
and sparse raw ids in Taobao's ranges (items and categories up to ~5.2 M, users up to ~1 M).

How a user's ``pv`` sequence is generated (the planted, learnable structure):

* The world: a catalogue of items with power-law (Zipf) popularity, each item in exactly one
  category; category sizes are power-law too, so category popularity is heavy-tailed. Categories
  sit on a hidden ring in random order; the ``n_related`` nearest on the ring are "related"
  (phones -> phone cases), so related categories form overlapping clusters independent of
  popularity.
* Each event either **copies from the user's own past** (probability ``1 - p_fresh``) or **opens
  a fresh category**. A copy picks an earlier event at distance ``d`` (``d = 1`` with
  probability ``p_last``, otherwise a power law P(d) ~ d**-lookback_exponent on ``[2,
  max_lookback]``: strong recency with a long tail) and takes its category; with probability
  ``p_revisit`` it also takes its item (a re-visit), otherwise it draws a new item of that
  category by popularity.
* A fresh category is a related category of the last event's (``p_related``), one of the user's
  ``n_interests`` long-term interests (``p_interest``), or a draw by global popularity (the
  rest). Interests drift: each event replaces one interest with probability ``interest_drift``
  (by a related category or a popularity draw).
* ``cart``/``fav``/``buy`` rows follow a random ``pv`` event of the same user, on the same item
  a quarter of the time (as in the real sample) and otherwise on another item of its category.
* Timestamps: short gaps inside sessions, long gaps between sessions, each user's span squeezed
  into the 9-day window if needed.

Negatives of the protocol are drawn by popularity among items the user never touched, so their
categories rarely appear in the history while the positives' categories usually do: a model that
reads the history with target-aware attention clearly beats one that does not.

Per-user lengths are log-normal (median ``median_events`` rows, ``length_sigma``) so that most
users pass the protocol's 210-event filter (on purpose: the real logs' median is far lower);
``target_rows`` rescales them so that the file has exactly that many rows. The catalogue is
Taobao-sized by default (4.5 M items, 9,439 categories): a file of n users is a sample of users
from one world, like the real head sample, so item-count statistics depend on the file size as
they do for real samples. ``python -m analysis.log_stats`` prints the statistics that compare a
synthetic file with the real sample (README, "Data").

The generation is vectorised over the users of a chunk (a Python loop over the event position,
never over rows or users) and chunked by users, so memory stays bounded; the same seed gives a
byte-identical file.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
from tqdm.auto import tqdm

# 2017-11-25 00:00 and 2017-12-04 00:00 in Beijing time (UTC+8), in Unix seconds.
TAOBAO_START_TIMESTAMP = 1_511_539_200
TAOBAO_END_TIMESTAMP = 1_512_316_800  # exclusive
BEHAVIOR_TYPES = ("pv", "cart", "fav", "buy")

# Real id ranges (max ids of the Tianchi file): raw ids are drawn in [1, max(range, count)].
_TAOBAO_MAX_ITEM_ID = 5_163_070
_TAOBAO_MAX_CATEGORY_ID = 5_162_429
_TAOBAO_MAX_USER_ID = 1_018_011

# Rows simulated at once: bounds memory (a few hundred MB) independently of file size.
# A constant, not an option, because chunk boundaries are part of what the seed determines.
_CHUNK_ROWS = 2_000_000


@dataclasses.dataclass(frozen=True)
class LogStructure:
    """Knobs of the generator (pass any of them to `write_taobao_log` as keywords)."""

    # Per-user length: total rows (all behaviour types), log-normal.
    median_events: float = 330.0
    length_sigma: float = 0.5
    # Catalogue: a Taobao-sized world (the full log has 4.16 M items, 9,439 categories);
    # a file of n users is a sample of users from it, like the real head sample.
    n_items: int = 4_500_000
    n_categories: int = 9_439
    item_zipf: float = 0.4  # item popularity ~ rank**-item_zipf
    category_size_zipf: float = 1.15  # items per category ~ rank**-category_size_zipf
    n_related: int = 16  # neighbours of a category on the hidden ring
    # pv sequence process.
    p_fresh: float = 0.26
    p_last: float = 0.44
    max_lookback: int = 400
    lookback_exponent: float = 1.3  # P(d) ~ d**-lookback_exponent for d in [2, max_lookback]
    p_revisit: float = 0.31
    p_related: float = 0.6
    p_interest: float = 0.25
    n_interests: int = 4
    interest_drift: float = 0.01
    # Decoupling structure (configs/decoupling.py; all off by default). A copied event moves
    # to a related category of the source's with p_copy_related (which past behaviours
    # predict the next one: related categories, recency). Categories get a price tier
    # (n_tiers > 1, balanced inside each domain of domain_size consecutive ring positions;
    # domain_size 0: one domain); each user has one preferred tier per domain, an event off
    # it moves with p_taste to a same-domain related category of that tier, and each event
    # redraws the user's tier of one domain with taste_drift (what makes a target clicked).
    p_copy_related: float = 0.0
    n_tiers: int = 1
    domain_size: int = 0
    p_taste: float = 0.0
    taste_drift: float = 0.0
    # How far the tiers follow the ring, in [0, 1] (with n_tiers > 1): 0 is the assignment
    # above (domain and tier two unrelated partitions); 1 makes each domain's tiers
    # contiguous blocks of the ring (with the same tier counts), so ring neighbours share a
    # tier and one geometry serves attention and representation. In between, a uniformly
    # random round(tier_alignment * size) categories of each domain keep their contiguous
    # tier and the others' tiers are shuffled among themselves (about a + (1 - a) / n_tiers
    # of the categories then sit on their contiguous tier). 0 draws no extra number: it is
    # exactly the world without this field.
    tier_alignment: float = 0.0
    # Behaviour types (pv, cart, fav, buy): shares in the real sample.
    behavior_shares: tuple[float, float, float, float] = (0.898, 0.053, 0.028, 0.021)
    p_nonpv_same_item: float = 0.25
    # Timestamps (seconds).
    session_break: float = 0.1
    session_gap_mean: float = 6 * 3600.0
    click_gap_mean: float = 150.0

    def validate(self) -> None:
        """Raise ValueError naming the first field with an impossible value."""
        probabilities = [
            "p_fresh",
            "p_last",
            "p_revisit",
            "p_related",
            "p_interest",
            "interest_drift",
            "p_nonpv_same_item",
            "session_break",
            "p_copy_related",
            "p_taste",
            "taste_drift",
            "tier_alignment",
        ]
        for name in probabilities:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"structure field {name}={value!r} must be in [0, 1]")
        if self.p_related + self.p_interest > 1.0:
            raise ValueError(
                f"p_related + p_interest = {self.p_related + self.p_interest} must be <= 1"
            )
        positive = [
            "median_events",
            "item_zipf",
            "category_size_zipf",
            "lookback_exponent",
            "session_gap_mean",
            "click_gap_mean",
        ]
        for name in positive:
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"structure field {name}={value!r} must be > 0")
        if self.length_sigma < 0:
            raise ValueError(f"structure field length_sigma={self.length_sigma!r} must be >= 0")
        integers = ("n_related", "n_interests", "max_lookback", "n_items", "n_categories")
        for name in (*integers, "n_tiers"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"structure field {name}={value!r} must be an integer >= 1")
        if not (isinstance(self.domain_size, int) and self.domain_size >= 0):
            raise ValueError(
                f"structure field domain_size={self.domain_size!r} must be an integer >= 0"
            )
        if self.n_items < self.n_categories:
            raise ValueError(f"n_items={self.n_items} must be >= n_categories={self.n_categories}")
        shares = self.behavior_shares
        if len(shares) != 4 or any(s < 0 for s in shares) or not math.isclose(sum(shares), 1.0):
            raise ValueError(
                f"behavior_shares={shares!r} must be 4 non-negative shares (pv, cart, fav, buy) "
                "summing to 1"
            )
        if shares[0] <= 0:
            raise ValueError("behavior_shares: the pv share must be > 0")


@dataclasses.dataclass(frozen=True)
class _World:
    """The catalogue, shared by all users. Items are stored sorted by category.

    item_raw_id, item_category: [n_items]; item_cumulative_weight: [n_items] float64
    category_raw_id, category_first_item, category_last_item: [n_categories]
    category_weight_before, category_weight: [n_categories] float64 (popularity mass)
    category_cumulative_weight: [n_categories] float64
    related: [n_categories, n_related] category indices
    Price tiers (only when n_tiers > 1, else None): category_domain, category_tier
    [n_categories]; tier_neighbours [n_categories, n_tiers, n_related]: the related
    categories of the same domain with each tier (first tier_neighbour_count [n_categories,
    n_tiers] entries valid).
    """

    item_raw_id: np.ndarray
    item_category: np.ndarray
    item_cumulative_weight: np.ndarray
    category_raw_id: np.ndarray
    category_first_item: np.ndarray
    category_last_item: np.ndarray
    category_weight_before: np.ndarray
    category_weight: np.ndarray
    category_cumulative_weight: np.ndarray
    related: np.ndarray
    category_domain: np.ndarray | None = None
    category_tier: np.ndarray | None = None
    tier_neighbours: np.ndarray | None = None
    tier_neighbour_count: np.ndarray | None = None

    def draw_categories(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n category indices drawn by popularity (= a popularity draw of an item's category)."""
        total = self.category_cumulative_weight[-1]
        picks = np.searchsorted(self.category_cumulative_weight, rng.random(n) * total, "right")
        return np.minimum(picks, len(self.category_weight) - 1)

    def draw_items_in(self, rng: np.random.Generator, categories: np.ndarray) -> np.ndarray:
        """One item index per category in `categories` [n], by popularity within the category."""
        targets = (
            self.category_weight_before[categories]
            + rng.random(len(categories)) * self.category_weight[categories]
        )
        picks = np.searchsorted(self.item_cumulative_weight, targets, "right")
        # Float rounding can land one item outside the category's block: clamp into it.
        return np.clip(
            picks, self.category_first_item[categories], self.category_last_item[categories]
        )


def _sparse_ids(rng: np.random.Generator, n: int, max_id: int) -> np.ndarray:
    """n distinct ids in [1, max_id] in random order [n] int64 (sparse, like Taobao's raw ids)."""
    # Evenly spread random ids (sorted gaps), then a random assignment: one permutation of n
    # instead of rng.choice over the whole id range.
    slots = np.arange(n, dtype=np.int64) * max_id // n
    width = max(1, max_id // n)
    ids = 1 + slots + rng.integers(0, width, n)
    return ids[rng.permutation(n)]


def _build_world(rng: np.random.Generator, n_items: int, n_categories: int, s: LogStructure):
    # Category sizes: every category gets one item, the rest go by a power law over a
    # random ranking of the categories. Items are laid out category after category.
    size_rank = rng.permutation(n_categories) + 1.0
    size_weight = size_rank**-s.category_size_zipf
    counts = 1 + rng.multinomial(n_items - n_categories, size_weight / size_weight.sum())
    item_category = np.repeat(np.arange(n_categories, dtype=np.int32), counts)
    # Item popularity: Zipf over a random ranking, independent of the category.
    item_weight = (rng.permutation(n_items) + 1.0) ** -s.item_zipf
    item_cumulative_weight = np.cumsum(item_weight)
    category_last_item = np.cumsum(counts) - 1
    category_first_item = category_last_item - counts + 1
    category_weight = np.add.reduceat(item_weight, category_first_item)
    category_weight_before = item_cumulative_weight[category_last_item] - category_weight
    # Related categories: neighbours on a hidden ring (random order of the categories), so
    # related categories form overlapping clusters unrelated to popularity.
    ring = rng.permutation(n_categories)
    position = np.empty(n_categories, dtype=np.int64)
    position[ring] = np.arange(n_categories)
    half = (s.n_related + 1) // 2
    steps = np.array([k for k in range(1, half + 1) for k in (k, -k)][: s.n_related])
    related = ring[(position[:, None] + steps[None, :]) % n_categories].astype(np.int32)
    item_raw_id = _sparse_ids(rng, n_items, max(_TAOBAO_MAX_ITEM_ID, n_items))
    category_raw_id = _sparse_ids(rng, n_categories, max(_TAOBAO_MAX_CATEGORY_ID, n_categories))
    # Drawn after everything else, and only when asked for: the default world stays the same.
    tiers = _price_tiers(rng, position, related, s) if s.n_tiers > 1 else {}
    return _World(
        item_raw_id=item_raw_id,
        item_category=item_category,
        item_cumulative_weight=item_cumulative_weight,
        category_raw_id=category_raw_id,
        category_first_item=category_first_item,
        category_last_item=category_last_item,
        category_weight_before=category_weight_before,
        category_weight=category_weight,
        category_cumulative_weight=np.cumsum(category_weight),
        related=related,
        **tiers,
    )


def _price_tiers(
    rng: np.random.Generator, position: np.ndarray, related: np.ndarray, s: LogStructure
) -> dict[str, np.ndarray]:
    """Domains (blocks of domain_size consecutive ring positions), a price tier per category
    (balanced inside each domain, in random order) and the tier_neighbours table of `_World`."""
    n_categories = len(position)
    domain = position // (s.domain_size or n_categories)
    # Rank inside the domain in a random order; rank mod n_tiers balances the tiers.
    order = np.lexsort((rng.random(n_categories), domain))
    first_of_domain = np.searchsorted(domain[order], domain[order], "left")
    tier = np.empty(n_categories, dtype=np.int32)
    tier[order] = (np.arange(n_categories) - first_of_domain) % s.n_tiers
    if s.tier_alignment > 0:
        tier = _aligned_tiers(order, domain, position, s)
    neighbours = np.empty((n_categories, s.n_tiers, related.shape[1]), dtype=np.int32)
    counts = np.empty((n_categories, s.n_tiers), dtype=np.int32)
    same_domain = domain[related] == domain[:, None]
    for t in range(s.n_tiers):
        usable = same_domain & (tier[related] == t)
        # Stable sort puts the usable neighbours first, nearest on the ring first.
        first = np.argsort(~usable, axis=1, kind="stable")
        neighbours[:, t] = np.take_along_axis(related, first, axis=1)
        counts[:, t] = usable.sum(axis=1)
    return {
        "category_domain": domain.astype(np.int32),
        "category_tier": tier,
        "tier_neighbours": neighbours,
        "tier_neighbour_count": counts,
    }


def _aligned_tiers(
    order: np.ndarray, domain: np.ndarray, position: np.ndarray, s: LogStructure
) -> np.ndarray:
    """Tiers [n_categories] int32 at `s.tier_alignment` (see `LogStructure`).

    order: the categories domain by domain, each domain's in the random order of the
    unaligned assignment; domain, position: [n_categories] domain and ring position.
    """
    tier = np.empty(len(order), dtype=np.int32)
    n = s.n_tiers
    for d in np.unique(domain):
        members = order[domain[order] == d]  # this domain's categories, in random order
        size = len(members)
        ranks = np.arange(size)
        # The unaligned assignment gives the k-th of the random order the tier k mod n:
        # the contiguous blocks have those counts, in tier order along the ring.
        counts = np.bincount(ranks % n, minlength=n)
        blocks = np.repeat(np.arange(n, dtype=np.int32), counts)
        along_ring = np.argsort(position[members], kind="stable")
        contiguous = np.empty(size, dtype=np.int32)
        contiguous[along_ring] = blocks  # contiguous[i]: members[i]'s block tier
        kept = int(math.floor(s.tier_alignment * size + 0.5))
        shuffled = size - kept  # the first `shuffled` of the random order
        tier[members[shuffled:]] = contiguous[shuffled:]
        # The shuffled ones' tiers, dealt in the order k mod n would deal them (by
        # occurrence, then tier), to the shuffled categories in their random order: with
        # every category shuffled this is exactly the unaligned assignment.
        labels = np.sort(contiguous[:shuffled])
        occurrence = ranks[:shuffled] - np.searchsorted(labels, labels, "left")
        tier[members[:shuffled]] = labels[np.lexsort((labels, occurrence))]
    return tier


@functools.lru_cache(maxsize=1)
def _cached_world(
    seed: int,
    n_items: int,
    n_categories: int,
    item_zipf: float,
    category_size_zipf: float,
    n_related: int,
    n_tiers: int = 1,
    domain_size: int = 0,
    tier_alignment: float = 0.0,
) -> _World:
    """The world of a seed (cached: building a 4.5 M-item catalogue takes about a second)."""
    world_seed = np.random.SeedSequence(seed).spawn(4)[1]
    structure = LogStructure(
        n_items=n_items,
        n_categories=n_categories,
        item_zipf=item_zipf,
        category_size_zipf=category_size_zipf,
        n_related=n_related,
        n_tiers=n_tiers,
        domain_size=domain_size,
        tier_alignment=tier_alignment,
    )
    return _build_world(np.random.default_rng(world_seed), n_items, n_categories, structure)


def world_of(seed: int, structure: LogStructure) -> _World:
    """The (cached) world of catalogue, categories and their relations that `structure`
    describes: the fields of it that shape the world, not the users' behaviour."""
    s = structure
    return _cached_world(
        seed,
        s.n_items,
        s.n_categories,
        s.item_zipf,
        s.category_size_zipf,
        s.n_related,
        s.n_tiers,
        s.domain_size,
        s.tier_alignment,
    )


def _user_lengths(
    rng: np.random.Generator, n_users: int, target_rows: int | None, s: LogStructure
) -> np.ndarray:
    """Rows per user [n_users] int64; sums to exactly target_rows when given."""
    raw = rng.lognormal(math.log(s.median_events), s.length_sigma, n_users)
    if target_rows is None:
        return np.maximum(1, np.rint(raw)).astype(np.int64)
    # Everyone gets one row, the remainder is shared in proportion to the log-normal draw
    # (largest fractional parts take the rounding leftovers), so the total is exact.
    share = raw / raw.sum() * (target_rows - n_users)
    lengths = np.floor(share).astype(np.int64)
    leftover = int(target_rows - n_users - lengths.sum())
    if leftover:
        lengths[np.argsort(lengths - share, kind="stable")[:leftover]] += 1
    return lengths + 1


def _simulate_pv(
    rng: np.random.Generator, world: _World, n_pv: np.ndarray, s: LogStructure
) -> tuple[np.ndarray, np.ndarray]:
    """Item and category indices of the pv events of a chunk of users.

    n_pv: [m] events per user (>= 1). Returns two flat [sum(n_pv)] arrays, user after
    user, each user's events in time order. Vectorised over users: the loop runs over the
    event position t, and at step t works on the users whose sequence is longer than t.
    """
    m = len(n_pv)
    offsets = np.concatenate([[0], np.cumsum(n_pv)[:-1]])
    order = np.argsort(-n_pv, kind="stable")  # longest first: active users are a prefix
    sorted_lengths = n_pv[order]
    sorted_offsets = offsets[order]
    max_len = int(sorted_lengths[0])
    n_active = np.searchsorted(-sorted_lengths, -np.arange(max_len), "left")
    total = int(n_pv.sum())
    items = np.empty(total, dtype=np.int32)
    categories = np.empty(total, dtype=np.int32)
    interests = world.draw_categories(rng, m * s.n_interests).reshape(m, s.n_interests)
    n_related = world.related.shape[1]
    tastes = None  # [m, domains]: each user's preferred price tier per domain
    if world.category_tier is not None:
        n_domains = int(world.category_domain.max()) + 1
        tastes = rng.integers(0, s.n_tiers, (m, n_domains), dtype=np.int32)
    # Inverse CDF of the truncated power law P(d) ~ d**-gamma on [2, max_lookback + 1).
    gamma = s.lookback_exponent
    upper = float(max(s.max_lookback, 2) + 1)
    if math.isclose(gamma, 1.0):

        def lookback(u: np.ndarray) -> np.ndarray:
            return 2.0 * np.exp(u * math.log(upper / 2.0))
    else:
        tail = 1.0 - (2.0 / upper) ** (gamma - 1.0)

        def lookback(u: np.ndarray) -> np.ndarray:
            return 2.0 * (1.0 - u * tail) ** (-1.0 / (gamma - 1.0))

    for t in range(max_len):
        a = int(n_active[t])
        pos = sorted_offsets[:a] + t
        if t == 0:
            fresh = np.ones(a, dtype=bool)
            new_category = np.empty(a, dtype=np.int32)
            revisit_item = np.full(a, -1, dtype=np.int32)
        else:
            fresh = rng.random(a) < s.p_fresh
            # Distance to the copied event: 1 with p_last, else a power law on [2, lookback].
            distance = np.floor(lookback(rng.random(a))).astype(np.int64)
            distance[rng.random(a) < s.p_last] = 1
            source = pos - np.minimum(distance, t)
            new_category = categories[source]
            revisit_item = np.where(rng.random(a) < s.p_revisit, items[source], -1)
            if s.p_copy_related > 0:  # (no draw otherwise: default logs stay the same)
                moved = np.flatnonzero(rng.random(a) < s.p_copy_related)
                step = rng.integers(0, n_related, len(moved))
                new_category[moved] = world.related[new_category[moved], step]
                revisit_item[moved] = -1
        fresh_idx = np.flatnonzero(fresh)
        if len(fresh_idx):
            kind = rng.random(len(fresh_idx))
            chosen = world.draw_categories(rng, len(fresh_idx)).astype(np.int32)
            if t > 0:
                related = kind < s.p_related
                previous = categories[pos[fresh_idx[related]] - 1]
                chosen[related] = world.related[previous, rng.integers(0, n_related, len(previous))]
            interest = (kind >= s.p_related) & (kind < s.p_related + s.p_interest)
            users = fresh_idx[interest]
            chosen[interest] = interests[users, rng.integers(0, s.n_interests, len(users))]
            new_category[fresh_idx] = chosen
            revisit_item[fresh_idx] = -1
        if tastes is not None:
            _follow_taste(rng, world, new_category, revisit_item, tastes[:a], s)
        need_item = revisit_item < 0
        revisit_item[need_item] = world.draw_items_in(rng, new_category[need_item])
        items[pos] = revisit_item
        categories[pos] = new_category
        # Interest drift.
        drifting = np.flatnonzero(rng.random(a) < s.interest_drift)
        if len(drifting):
            slot = rng.integers(0, s.n_interests, len(drifting))
            old = interests[drifting, slot]
            replacement = world.draw_categories(rng, len(drifting))
            to_related = rng.random(len(drifting)) < 0.5
            replacement[to_related] = world.related[
                old[to_related], rng.integers(0, n_related, int(to_related.sum()))
            ]
            interests[drifting, slot] = replacement
        if tastes is not None and s.taste_drift > 0:
            drifting = np.flatnonzero(rng.random(a) < s.taste_drift)
            domain = rng.integers(0, tastes.shape[1], len(drifting))
            tastes[drifting, domain] = rng.integers(0, s.n_tiers, len(drifting))
    return items, categories


def _follow_taste(
    rng: np.random.Generator,
    world: _World,
    category: np.ndarray,
    revisit_item: np.ndarray,
    tastes: np.ndarray,
    s: LogStructure,
) -> None:
    """In place: with p_taste, an event whose category [a] is off its user's preferred tier
    in that domain (tastes [a, domains]) moves to a related category of the same domain with
    that tier (uniformly among them; it stays if there is none) and so draws a new item."""
    wanted = tastes[np.arange(len(category)), world.category_domain[category]]
    count = world.tier_neighbour_count[category, wanted]
    move = (world.category_tier[category] != wanted) & (count > 0)
    move &= rng.random(len(category)) < s.p_taste
    pick = np.floor(rng.random(len(category)) * count).astype(np.int64)
    index = np.flatnonzero(move)
    category[index] = world.tier_neighbours[category[index], wanted[index], pick[index]]
    revisit_item[index] = -1


def _chunk_rows(
    rng: np.random.Generator, world: _World, user_ids: np.ndarray, rows: np.ndarray, s: LogStructure
) -> tuple[pa.Table, np.ndarray]:
    """All rows of a chunk of users as an Arrow table in file order, and their item indices.

    user_ids, rows: [m] raw id and row count of each user of the chunk.
    """
    nonpv_share = 1.0 - s.behavior_shares[0]
    n_nonpv = np.minimum(rng.binomial(rows, nonpv_share), rows - 1)
    n_pv = rows - n_nonpv
    pv_items, pv_categories = _simulate_pv(rng, world, n_pv, s)
    # Non-pv rows follow a random pv event of their user.
    pv_offsets = np.concatenate([[0], np.cumsum(n_pv)[:-1]])
    user_of_nonpv = np.repeat(np.arange(len(rows)), n_nonpv)
    source = pv_offsets[user_of_nonpv] + np.floor(
        rng.random(len(user_of_nonpv)) * n_pv[user_of_nonpv]
    ).astype(np.int64)
    nonpv_categories = pv_categories[source]
    nonpv_items = np.where(
        rng.random(len(source)) < s.p_nonpv_same_item,
        pv_items[source],
        world.draw_items_in(rng, nonpv_categories),
    )
    other = np.asarray(s.behavior_shares[1:]) / nonpv_share if nonpv_share > 0 else None
    nonpv_types = 1 + rng.choice(3, len(source), p=other) if len(source) else np.zeros(0, int)
    # Merge: a non-pv row goes right after its source pv row.
    key = np.concatenate([2 * np.arange(len(pv_items)), 2 * source + 1])
    merge = np.argsort(key, kind="stable")
    items = np.concatenate([pv_items, nonpv_items])[merge]
    behavior = np.concatenate([np.zeros(len(pv_items), np.int8), nonpv_types.astype(np.int8)])[
        merge
    ]
    # Timestamps: gaps (short inside a session, long between), squeezed into the window.
    total = int(rows.sum())
    offsets = np.concatenate([[0], np.cumsum(rows)[:-1]])
    session = rng.random(total) < s.session_break
    gaps = rng.exponential(1.0, total) * np.where(session, s.session_gap_mean, s.click_gap_mean)
    gaps[behavior > 0] *= 0.3  # cart/fav/buy come right after the view they follow
    gaps[offsets] = 0.0
    elapsed = np.cumsum(gaps)
    elapsed -= np.repeat(elapsed[offsets], rows)
    window = TAOBAO_END_TIMESTAMP - TAOBAO_START_TIMESTAMP - 1
    span = elapsed[offsets + rows - 1]
    scale = np.minimum(1.0, window / np.maximum(span, 1.0))
    start = np.floor(rng.random(len(rows)) * (window - span * scale + 1))
    timestamps = TAOBAO_START_TIMESTAMP + np.floor(
        np.repeat(start, rows) + elapsed * np.repeat(scale, rows)
    ).astype(np.int64)
    timestamps = np.minimum(timestamps, TAOBAO_END_TIMESTAMP - 1)
    behavior_column = pa.DictionaryArray.from_arrays(
        pa.array(behavior, pa.int8()), pa.array(BEHAVIOR_TYPES)
    ).cast(pa.string())
    return pa.table(
        {
            "user_id": pa.array(np.repeat(user_ids, rows)),
            "item_id": pa.array(world.item_raw_id[items]),
            "category_id": pa.array(world.category_raw_id[world.item_category[items]]),
            "behavior_type": behavior_column,
            "timestamp": pa.array(timestamps),
        }
    ), items


def _chunks(rows: np.ndarray) -> Iterator[tuple[int, int]]:
    """(first_user, end_user) ranges of about _CHUNK_ROWS rows each (at least one user)."""
    cumulative = np.cumsum(rows)
    first = 0
    while first < len(rows):
        done = cumulative[first - 1] if first else 0
        end = int(np.searchsorted(cumulative, done + _CHUNK_ROWS, "right"))
        end = max(end, first + 1)
        yield first, end
        first = end


def write_taobao_log(
    path: str | os.PathLike,
    n_users: int,
    seed: int = 0,
    target_rows: int | None = None,
    progress: bool | None = None,
    **structure,
) -> dict:
    """Write a synthetic Taobao `UserBehavior.csv` (no header) to `path`, atomically.

    Args:
      path: output file; its folder must exist. Written to a temporary file in the same
        folder and moved into place, so a reader never sees a partial file.
      n_users: number of users (>= 1).
      seed: everything derives from it: same arguments -> byte-identical file.
      target_rows: if given, the file has exactly this many rows (>= n_users).
      progress: tqdm progress bar; default: on for files over 2 M rows.
      **structure: overrides of `LogStructure` fields (e.g. ``median_events=500``).

    Returns:
      dict with ``path``, ``rows``, ``pv_rows``, ``users``, ``items`` and ``categories``
      (distinct ids written).
    """
    if isinstance(n_users, bool) or not isinstance(n_users, int | np.integer) or n_users < 1:
        raise ValueError(f"n_users={n_users!r} must be an integer >= 1")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed={seed!r} must be an integer >= 0")
    seed = int(seed)
    if target_rows is not None:
        if isinstance(target_rows, bool) or not isinstance(target_rows, int | np.integer):
            raise ValueError(f"target_rows={target_rows!r} must be an integer or None")
        if target_rows < n_users:
            raise ValueError(
                f"target_rows={target_rows} is smaller than n_users={n_users}: "
                "every user needs at least one row"
            )
    unknown = set(structure) - {f.name for f in dataclasses.fields(LogStructure)}
    if unknown:
        raise TypeError(f"unknown structure option(s): {', '.join(sorted(unknown))}")
    s = LogStructure(**structure)
    s.validate()
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {path.parent}")

    lengths_seed, _, user_seed, chunks_seed = np.random.SeedSequence(seed).spawn(4)
    rows = _user_lengths(np.random.default_rng(lengths_seed), n_users, target_rows, s)
    total_rows = int(rows.sum())
    world = world_of(seed, s)
    user_ids = 1 + np.random.default_rng(user_seed).choice(
        max(_TAOBAO_MAX_USER_ID, n_users), n_users, replace=False
    )
    chunk_ranges = list(_chunks(rows))
    chunk_seeds = chunks_seed.spawn(len(chunk_ranges))
    if progress is None:
        progress = total_rows > _CHUNK_ROWS
    item_seen = np.zeros(s.n_items, dtype=bool)
    pv_rows = 0
    options = pa_csv.WriteOptions(include_header=False, quoting_style="none")
    schema = pa.schema(
        [
            ("user_id", pa.int64()),
            ("item_id", pa.int64()),
            ("category_id", pa.int64()),
            ("behavior_type", pa.string()),
            ("timestamp", pa.int64()),
        ]
    )
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with (
            os.fdopen(descriptor, "wb") as sink,
            pa_csv.CSVWriter(sink, schema, write_options=options) as writer,
            tqdm(
                total=total_rows,
                unit="row",
                unit_scale=True,
                disable=not progress,
                desc=f"writing {path.name}",
            ) as bar,
        ):
            for (first, end), chunk_seed in zip(chunk_ranges, chunk_seeds):
                table, items = _chunk_rows(
                    np.random.default_rng(chunk_seed),
                    world,
                    user_ids[first:end],
                    rows[first:end],
                    s,
                )
                item_seen[items] = True
                pv_rows += int(np.count_nonzero(table["behavior_type"].to_numpy() == "pv"))
                writer.write_table(table)
                bar.update(table.num_rows)
        # mkstemp creates the file 0600; give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    categories_seen = np.unique(world.item_category[item_seen])
    return {
        "path": str(path),
        "rows": total_rows,
        "pv_rows": pv_rows,
        "users": n_users,
        "items": int(item_seen.sum()),
        "categories": len(categories_seen),
    }
