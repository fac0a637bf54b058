"""A capacity plan for a solaris fleet from the fleet's numbers: how many daemons, Redis masters,
speculator shards and sidecar cores it takes. docs/capacity.md explains each line.

    python docs/capacity_plan.py --requests-per-second 100000 --candidates 500 --ttl-seconds 3600

Every per-unit figure defaults to what was measured on the machine named in docs/capacity.md,
with the command that measures it; measure yours (a GPU daemon above all) and pass them.
"""

import argparse
import math
from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class Fleet:
    requests_per_second: float
    candidates: int
    ttl_seconds: float
    hit_rate: float
    new_pair_share: float
    precision: float
    l1_share: float
    daemon_pairs_per_second: float
    redis_bytes_per_pair: float
    redis_memory_per_master: float
    redis_keys_per_second_per_master: float
    stream_bytes_per_read: float
    stream_entries_per_second_per_master: float
    speculator_rows_per_second: float
    sidecar_calls_per_second_per_core: float
    headroom: float


@dataclass(frozen=True)
class Line:
    name: str
    value: float
    unit: str
    why: str


def plan(fleet: Fleet) -> list[Line]:
    """The plan, one line per figure; counts of machines rounded up with `headroom` spare."""
    scored = fleet.requests_per_second * fleet.candidates
    computed = scored * fleet.hit_rate * fleet.new_pair_share / fleet.precision
    live = computed * fleet.ttl_seconds
    memory = live * fleet.redis_bytes_per_pair
    keys_read = scored * (1 - fleet.l1_share)
    by_memory = memory / fleet.redis_memory_per_master
    by_reads = (keys_read + computed) / fleet.redis_keys_per_second_per_master
    by_stream = fleet.requests_per_second / fleet.stream_entries_per_second_per_master
    masters = _count(max(by_memory, by_reads + by_stream), fleet.headroom)
    return [
        Line("pairs scored", scored, "pairs/s", "requests/s x candidates"),
        Line("pairs computed", computed, "pairs/s", "scored x hit rate x new share / precision"),
        Line(
            "daemons",
            _count(computed / fleet.daemon_pairs_per_second, fleet.headroom),
            "",
            "computed / pairs per daemon",
        ),
        Line("pairs live in Redis", live, "pairs", "computed x TTL"),
        Line("Redis memory", memory / GIB, "GiB", "live pairs x bytes per pair"),
        Line(
            "Redis keys read+written",
            keys_read + computed,
            "keys/s",
            "scored x (1 - L1 share) + computed",
        ),
        Line(
            "request stream",
            fleet.requests_per_second * fleet.stream_bytes_per_read / 2**20,
            "MiB/s",
            "requests/s x bytes per entry",
        ),
        Line(
            "Redis masters",
            masters,
            "(+1 replica each)",
            f"most of memory {by_memory:.1f}, keys {by_reads:.1f} + stream {by_stream:.1f}",
        ),
        Line(
            "speculator shards",
            _count(scored / fleet.speculator_rows_per_second, fleet.headroom),
            "",
            "scored / candidate rows one speculator learns per second",
        ),
        Line(
            "sidecar cores",
            _count(
                fleet.requests_per_second / fleet.sidecar_calls_per_second_per_core, fleet.headroom
            ),
            "",
            "requests/s / BatchGets one core serves per second",
        ),
    ]


def _count(needed: float, headroom: float) -> float:
    return float(max(1, math.ceil(needed * (1 + headroom))))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    default = Fleet(
        requests_per_second=100_000,
        candidates=500,
        ttl_seconds=3600,
        hit_rate=0.9,
        new_pair_share=0.2,
        precision=0.5,
        l1_share=0.5,
        daemon_pairs_per_second=11_800,
        redis_bytes_per_pair=465,
        redis_memory_per_master=24 * GIB,
        redis_keys_per_second_per_master=750_000,
        stream_bytes_per_read=1_400,
        stream_entries_per_second_per_master=100_000,
        speculator_rows_per_second=75_000,
        sidecar_calls_per_second_per_core=700,
        headroom=0.3,
    )
    helps = {
        "hit_rate": "share of scored pairs to serve as HIT",
        "new_pair_share": "share of scored pairs not scored within the TTL before (each needs "
        "computing once per TTL): measure it on your log with solaris replay",
        "precision": "share of computed pairs read before they expire (solaris replay prints it)",
        "l1_share": "share of scored pairs the sidecar's L1 answers without Redis",
        "headroom": "spare capacity added to every count",
    }
    for name, value in vars(default).items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=float, default=value, help=helps.get(name, " "))
    return parser


def main() -> None:
    args = _parser().parse_args()
    fleet = Fleet(**{**vars(args), "candidates": int(args.candidates)})
    for line in plan(fleet):
        value = f"{line.value:,.0f}" if line.value >= 10 else f"{line.value:,.2f}"
        print(f"{line.name:<26}{value:>16} {line.unit:<18} {line.why}")


if __name__ == "__main__":
    main()
