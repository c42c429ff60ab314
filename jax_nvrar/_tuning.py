"""The kernel variant ``backend="auto"`` runs on one node, from a measured table.

``benchmarks/tune.py`` measures every variant ``psum`` may pick (Lamport and
LL lines, one- and two-shot: the flag variants share workspace regions with
LL lines and never run under "auto") per message size and PEs per node, and
writes the table: ``tuning.json`` beside this file, or the file named by
``$JAX_NVRAR_TUNING``. Without a table, the rule of ``FALLBACK`` applies.

The table keeps every candidate setting's measured time per (PEs per node,
message size). A setting is a variant name, run with the kernel's block
count rule, or ``VARIANT/B`` for B thread blocks (``tune.py --blocks``).
Rule: take the entries of the same node size (else of the nearest one, in
powers of two); for each setting, its time at the message size
interpolated linearly in log(size)-log(time) between the two nearest
measured sizes around it (beyond the measured range: the nearest size's
time); the fastest wins. tune.py checks the rule on sizes it held out of
the table.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

from jax_nvrar import _config

SCHEMA = "jax_nvrar.tuning/1"
#: The variants "auto" may choose between.
CANDIDATES = ("oneshot_lamport", "twoshot_lamport", "oneshot_ll", "twoshot_ll")
SHIPPED = Path(__file__).with_name("tuning.json")
#: Most thread blocks of one launch (csrc/allreduce.cu kMaxBlocks).
MAX_BLOCKS = 128


def split(setting: str) -> tuple[str, int]:
    """``"VARIANT"`` or ``"VARIANT/B"`` as (variant, blocks); blocks 0 means
    the kernel's rule. ValueError naming the setting when malformed."""
    variant, _, blocks = setting.partition("/")
    if blocks and not (blocks.isdigit() and 1 <= int(blocks) <= MAX_BLOCKS):
        raise ValueError(f"setting {setting!r}: the block count after '/' "
                         f"must be an integer from 1 to {MAX_BLOCKS}")
    return variant, int(blocks or 0)


def is_candidate(setting: str) -> bool:
    """Whether a table setting (VARIANT or VARIANT/BLOCKS) names a candidate variant."""
    try:
        return split(setting)[0] in CANDIDATES
    except ValueError:
        return False


def fallback(nbytes: int) -> str:
    """Without a table: Lamport one-shot up to 512 KB, two-shot above."""
    return "oneshot_lamport" if nbytes <= (512 << 10) else "twoshot_lamport"


def check_table(table: dict, where: str) -> list[dict]:
    """The entries of a table, or ValueError naming what is wrong."""
    if table.get("schema") != SCHEMA:
        raise ValueError(f"{where}: not a jax_nvrar tuning table "
                         f"(schema {table.get('schema')!r}, want {SCHEMA!r})")
    entries = table.get("entries")
    if not entries:
        raise ValueError(f"{where}: the table has no entries")
    for entry in entries:
        times = entry.get("times_us")
        if not times or not all(is_candidate(s) for s in times):
            raise ValueError(f"{where}: entry {entry} needs times_us of variants "
                             f"among {CANDIDATES}, each optionally with "
                             f"'/BLOCKS' (1 to {MAX_BLOCKS})")
        if not all(isinstance(t, (int, float)) and t > 0 for t in times.values()):
            raise ValueError(f"{where}: entry {entry} has a time that is not positive")
        if not (isinstance(entry.get("node_size"), int) and entry["node_size"] > 0
                and isinstance(entry.get("size"), int) and entry["size"] > 0):
            raise ValueError(f"{where}: entry {entry} needs positive integer "
                             "node_size and size")
    return entries


@functools.lru_cache(maxsize=8)
def _load(path: str) -> tuple:
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"JAX_NVRAR_TUNING={path!r}: {error}") from None
    return rows(check_table(table, path))


def rows(entries) -> tuple:
    """Table entries as hashable (node_size, size, ((variant, us), ...))."""
    return tuple((e["node_size"], e["size"], tuple(sorted(e["times_us"].items())))
                 for e in entries)


def table_entries() -> tuple:
    """(node_size, size, ((variant, us), ...)) rows of the table in use; ()
    for none."""
    path = _config.get("JAX_NVRAR_TUNING")
    if path:
        return _load(path)
    return _load(str(SHIPPED)) if SHIPPED.exists() else ()


def _interpolate(points: list, x: float) -> float:
    """log-log linear through sorted (size, us) points; flat beyond them."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            w = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return math.exp((1 - w) * math.log(y0) + w * math.log(y1))
    return points[-1][1]


def pick(entries, nbytes: int, node_size: int) -> str | None:
    """The setting the rule picks from ``entries`` ((node_size, size,
    ((variant, us), ...)) rows) for a message of ``nbytes`` bytes on
    ``node_size`` PEs per node; None without entries."""
    if not entries:
        return None
    nearest_g = min({g for g, _, _ in entries},
                    key=lambda g: (abs(math.log2(g) - math.log2(node_size)), g))
    curves = {}
    for g, size, times in sorted(entries):
        if g == nearest_g:
            for variant, us in times:
                curves.setdefault(variant, []).append((size, us))
    x = max(nbytes, 1)
    return min(sorted(curves), key=lambda v: _interpolate(curves[v], x))


def variant_for(nbytes: int, node_size: int) -> tuple[str, int]:
    """(variant, blocks) backend="auto" runs on one node; blocks 0: the
    kernel's rule."""
    return split(pick(table_entries(), nbytes, node_size) or fallback(nbytes))
