"""``pacs-numba cache``: inspect or empty the caches."""

from __future__ import annotations

import argparse
import logging

from ..errors import InputError
from ..resources.units import human_size, parse_size
from ..store.registration import clear_registered
from ..store.statscache import StatsCache
from ..store.volumes import VolumeStore, cache_max_bytes
from .common import EXIT_OK, HelpFormatter

log = logging.getLogger(__name__)


def _add_cache(sub, plain_common: argparse.ArgumentParser) -> None:  # noqa: ANN001
    p = sub.add_parser(
        "cache",
        parents=[plain_common],
        help="inspect, prune or empty the volume cache",
        description="The volume cache holds each input decompressed to float32 once (runs "
        "with --volume-cache memory write none there; the statistics cache, cellstats/, is "
        "kept in either mode).  'info' "
        "prints its folder, entry count and the size of every folder in it; 'prune' removes "
        "the entries whose source file is gone and, with --cache-max-size (or "
        "PACS_NUMBA_CACHE_MAX), the least recently used ones over that size, never one a "
        "process of this node has mapped; 'clear' removes every entry.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("action", choices=["info", "prune", "clear"],
                   help="info: show; prune: drop stale and least recently used; clear: empty")
    p.add_argument("--cache-max-size", metavar="SIZE", default=None,
                   help="prune: keep the volume entries within SIZE (e.g. 200G); default "
                   "PACS_NUMBA_CACHE_MAX, which runs also apply after each new entry")
    p.set_defaults(run=_cache)


def _cache(args: argparse.Namespace) -> int:

    store = VolumeStore(args.cache_dir)
    if args.action == "clear":

        n = store.clear()
        n_reg = clear_registered(store)
        stats_dir = store.directory / "cellstats"
        n_stats = StatsCache(stats_dir).clear() if stats_dir.is_dir() else 0
        print(f"removed {n} cache entries from {store.directory}"
              + (f", {n_reg} registration entries" if n_reg else "")
              + (f" and {n_stats} statistics entries" if n_stats else ""))
    elif args.action == "prune":
        if args.cache_max_size is not None:
            try:
                limit = parse_size(args.cache_max_size)
            except ValueError as exc:
                raise InputError(f"--cache-max-size {args.cache_max_size!r} is not a size "
                                 f"such as 200G: {exc}") from exc
        else:
            limit = cache_max_bytes()
        res = store.prune(limit)
        print(f"removed {res['gone']} entries whose source is gone and {res['evicted']} least "
              f"recently used from {store.directory} ({human_size(res['freed_bytes'])} freed; "
              f"{res['in_use']} in use kept; {human_size(res['bytes'])} left)")
    else:

        info = store.info()
        for k, v in info.items():
            if k == "total_bytes":
                print(f"size: {human_size(v)} ({v} bytes)")
            else:
                print(f"{k}: {v}")
    return EXIT_OK


def add_parsers(sub, run_common: argparse.ArgumentParser,  # noqa: ANN001 - argparse's subparsers
                plain_common: argparse.ArgumentParser) -> None:
    """Add this family's subcommands to ``sub``; each one's ``run`` is set as a default."""
    _add_cache(sub, plain_common)
