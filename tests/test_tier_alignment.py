"""LogStructure.tier_alignment (issue 22): 0 leaves the logs byte-identical, 1 makes each
domain's tiers contiguous blocks of the ring, values in between keep a share of each
domain on its block and shuffle the rest. The oracle walks the ring in plain Python from
`related` (its first two columns are the neighbours at +1 and -1), not from the
generator's arrays of positions."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest

from dare_jax.data import synthetic
from dare_jax.data.synthetic import LogStructure, write_taobao_log

# A small world with the decoupling knobs (4 domains of 30 categories, 3 tiers).
TIERED = {
    "n_items": 8_000,
    "n_categories": 120,
    "category_size_zipf": 0.5,
    "n_tiers": 3,
    "domain_size": 30,
}
KNOBS = {"p_revisit": 0.1, "p_copy_related": 0.7, "p_taste": 0.9, "taste_drift": 0.01}
# sha256 of write_taobao_log(path, 40, seed=6, **structure), written by the generator before
# tier_alignment existed (commit 74d33a2, numpy 2 / pyarrow of requirements.txt).
RECORDED = {
    "default": (
        {"n_items": 20_000, "n_categories": 300},
        "950b8f01c55dc4332c7353e328740c11f4c6833242df090ba6a984ca3e130d79",
    ),
    "tiered": (
        {**TIERED, **KNOBS},
        "d9d3c07751530e71ded5963600ddc9af70ad0ef916d957b36979cd332d7e3653",
    ),
}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _world(seed: int, **structure) -> synthetic._World:
    return synthetic.world_of(seed, LogStructure(**structure))


def _domains_along_ring(world: synthetic._World) -> list[list[int]]:
    """Each domain's categories in ring order, from the first of its block (plain Python)."""
    nxt = [int(r) for r in world.related[:, 0]]
    prv = [int(r) for r in world.related[:, 1]]
    domain = [int(d) for d in world.category_domain]
    out = []
    for start in range(len(nxt)):
        if domain[prv[start]] == domain[start]:
            continue  # not the first category of its block
        walk = [start]
        while domain[nxt[walk[-1]]] == domain[start] and nxt[walk[-1]] != start:
            walk.append(nxt[walk[-1]])
        out.append(walk)
    return out


def _blocks(size: int, n_tiers: int) -> list[int]:
    """The contiguous tiers of a domain of `size`: tier t repeated as often as the balanced
    assignment (rank mod n_tiers) gives it."""
    counts = Counter(rank % n_tiers for rank in range(size))
    return [t for t in range(n_tiers) for _ in range(counts[t])]


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_default_alignment_writes_the_recorded_bytes(tmp_path, name):
    structure, recorded = RECORDED[name]
    plain, explicit = tmp_path / "plain.csv", tmp_path / "explicit.csv"
    write_taobao_log(plain, 40, seed=6, **structure)
    write_taobao_log(explicit, 40, seed=6, tier_alignment=0.0, **structure)
    assert _digest(plain) == recorded
    assert _digest(explicit) == recorded


def test_full_alignment_makes_contiguous_blocks_along_the_ring():
    world = _world(3, **TIERED, tier_alignment=1.0)
    domains = _domains_along_ring(world)
    assert sorted(len(d) for d in domains) == [30] * 4
    for members in domains:
        assert [int(world.category_tier[c]) for c in members] == _blocks(30, 3)
    # A domain size that the tiers do not divide (5 domains: 4 of 25, one of 20; 3 tiers).
    uneven = {**TIERED, "n_categories": 120, "domain_size": 25}
    world = _world(3, **uneven, tier_alignment=1.0)
    for members in _domains_along_ring(world):
        assert [int(world.category_tier[c]) for c in members] == _blocks(len(members), 3)


@pytest.mark.parametrize("alignment", [0.2, 0.5, 0.8])
def test_partial_alignment_keeps_a_share_and_the_tier_counts(alignment):
    unaligned = _world(4, **TIERED)
    world = _world(4, **TIERED, tier_alignment=alignment)
    for members in _domains_along_ring(world):
        tiers = [int(world.category_tier[c]) for c in members]
        blocks = _blocks(len(members), 3)
        # Balanced as before: the same count of each tier in each domain.
        assert Counter(tiers) == Counter(int(unaligned.category_tier[c]) for c in members)
        on_block = sum(t == b for t, b in zip(tiers, blocks))
        assert on_block >= round(alignment * len(members))
    # Neither of the ends.
    assert (world.category_tier != unaligned.category_tier).any()
    full = _world(4, **TIERED, tier_alignment=1.0)
    assert (world.category_tier != full.category_tier).any()


def test_share_on_the_block_grows_as_expected_over_worlds():
    """The expected share of categories on their contiguous tier is a + (1 - a) / n_tiers
    (kept ones, plus shuffled ones that land on their block by chance): 10 worlds x 120."""
    for alignment in (0.0, 0.5, 1.0):
        on_block = total = 0
        for seed in range(10):
            world = _world(seed, **TIERED, tier_alignment=alignment)
            for members in _domains_along_ring(world):
                blocks = _blocks(len(members), 3)
                on_block += sum(int(world.category_tier[c]) == b for c, b in zip(members, blocks))
                total += len(members)
        expected = alignment + (1 - alignment) / 3
        assert abs(on_block / total - expected) < 0.05, (alignment, on_block / total)


def test_alignment_changes_only_the_tiers(tmp_path):
    """The world's other arrays stay the same; the log changes (the taste moves follow the
    tiers)."""
    a, b = _world(5, **TIERED), _world(5, **TIERED, tier_alignment=0.7)
    for field in ("item_raw_id", "item_category", "category_raw_id", "related", "category_domain"):
        assert (getattr(a, field) == getattr(b, field)).all(), field
    plain, aligned = tmp_path / "plain.csv", tmp_path / "aligned.csv"
    write_taobao_log(plain, 40, seed=5, **TIERED, **KNOBS)
    write_taobao_log(aligned, 40, seed=5, tier_alignment=0.7, **TIERED, **KNOBS)
    assert _digest(plain) != _digest(aligned)


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_out_of_range_alignment_is_named(tmp_path, value):
    with pytest.raises(ValueError, match=r"tier_alignment=.* must be in \[0, 1\]"):
        write_taobao_log(tmp_path / "x.csv", 5, tier_alignment=value, **TIERED)
    assert not (tmp_path / "x.csv").exists()
