"""rollout-assets: watch a staged feature rollout with Dagster and roll it back when it hurts."""

import warnings

# Single-run backfills (beta) and partitioned asset checks (preview) are used on purpose; their
# warnings would otherwise drown every CLI run and test in noise.
warnings.filterwarnings("ignore", message=r".*is currently in (beta|preview).*")
warnings.filterwarnings("ignore", message=r".*Specifying a partitions_def on an AssetCheckSpec.*")

__version__ = "0.1.0"
