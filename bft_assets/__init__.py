"""bft: instruction back-and-forth translation as Dagster software-defined assets.

``bft_assets.BackAndForthTranslation`` is the component a Dagster project declares in YAML
(``dg scaffold defs bft_assets.BackAndForthTranslation NAME``); this package is its dg
registry module.
"""

from bft_assets.component import BackAndForthTranslation, BackAndForthTranslationScaffolder

__all__ = ["BackAndForthTranslation", "BackAndForthTranslationScaffolder"]
