"""One run seed, derived per purpose: ``--seed_everything N`` alone makes a run "seed N".

A run draws randomness for several purposes: the global RNGs (weight init, dropout; Lightning's
``seed_everything``), the rollout sampling (``model.init_args.sampling.seed``) and the training data stream
(``data.init_args.seed``). A purpose whose seed is left unset (``null``) gets :func:`derive_seed` of the run
seed, so two run seeds differ everywhere and one run seed reproduces exactly; a seed set explicitly in a
config or on the command line is kept. The CLI writes every effective seed of the run into
``<run>/seeds.json`` (and the filled-in config into ``<run>/config.yaml``).

Seeds that define the model's construction rather than a run's randomness (e.g. ``TinyLM``'s ``seed``, which
also builds the run-time tokenizer that checkpoints must share) are recorded but never derived.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

#: purpose -> dotted config key (below the subcommand) of the seed derived from ``seed_everything`` when unset.
DERIVED = {"rollout": "model.init_args.sampling.seed", "data": "data.init_args.seed"}
SEEDS_FILE = "seeds.json"


def derive_seed(seed: int, purpose: str) -> int:
    """A seed for ``purpose`` that depends on the run seed only (stable across machines and versions).

    Args:
        seed: the run seed (``seed_everything``).
        purpose: what the seed is for, e.g. "rollout" or "data".

    Returns:
        An int in ``[0, 2**31)``.
    """
    digest = hashlib.sha256(f"qoq:{int(seed)}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def fill_seeds(cfg: Any) -> dict[str, Any]:
    """Derive every unset purpose seed of a parsed run config from its ``seed_everything``, in place.

    Args:
        cfg: the subcommand's config (a jsonargparse ``Namespace``), after Lightning resolved
            ``seed_everything`` to an int (or False: nothing is derived).

    Returns:
        Every seed of the config by dotted path (``seed_everything`` first), as the run will use them.
    """
    run_seed = cfg.get("seed_everything")
    if isinstance(run_seed, int) and not isinstance(run_seed, bool):
        for purpose, key in DERIVED.items():
            if key in cfg and cfg[key] is None:
                cfg[key] = derive_seed(run_seed, purpose)
    found = {"seed_everything": run_seed}
    for section in ("model", "data"):
        found.update(_seeds_below(cfg.get(section), section))
    return found


def write_seeds(seeds: dict[str, Any], run_dir: str | Path) -> Path:
    """Write ``seeds.json`` (the effective seeds of a run) into its folder."""
    path = Path(run_dir) / SEEDS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(seeds, indent=1) + "\n")
    return path


def _seeds_below(node: Any, prefix: str) -> dict[str, Any]:
    if node is None or not hasattr(node, "items"):
        return {}
    return {  # a jsonargparse Namespace iterates its leaves by dotted key
        f"{prefix}.{key}": value
        for key, value in node.items()
        if key.rsplit(".", 1)[-1] == "seed" and (value is None or isinstance(value, int))
    }


__all__ = ["DERIVED", "SEEDS_FILE", "derive_seed", "fill_seeds", "write_seeds"]
