"""``pacs-numba cache``: inspect or empty the caches."""

from __future__ import annotations

import argparse
import logging

from ..resources.units import human_size
from ..store.registration import clear_registered
from ..store.statscache import StatsCache
from ..store.volumes import VolumeStore
from .common import EXIT_OK, HelpFormatter

log = logging.getLogger(__name__)


def _add_cache(sub, plain_common: argparse.ArgumentParser) -> None:  # noqa: ANN001
    p = sub.add_parser(
        "cache",
        parents=[plain_common],
        help="inspect or empty the volume cache",
        description="The volume cache holds each input decompressed to float32 once.  'info' "
        "prints its folder, entry count and size; 'clear' removes every entry.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("action", choices=["info", "clear"], help="info: show; clear: empty")
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
