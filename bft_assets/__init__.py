"""bft: instruction back-and-forth translation as Dagster software-defined assets.

``bft_assets.BackAndForthTranslation`` is the component a Dagster project declares in YAML
(``dg scaffold defs bft_assets.BackAndForthTranslation NAME``); this package is its dg
registry module. The component is imported when first asked for, so that importing one of
the method's modules (``bft_assets.prompts``) does not build the whole graph's machinery.
"""

from typing import Any

__all__ = ["BackAndForthTranslation", "BackAndForthTranslationScaffolder"]


def __getattr__(name: str) -> Any:
    if name == "BackAndForthTranslation":
        from bft_assets.component import BackAndForthTranslation

        return BackAndForthTranslation
    if name == "BackAndForthTranslationScaffolder":
        from bft_assets.scaffolder import BackAndForthTranslationScaffolder

        return BackAndForthTranslationScaffolder
    raise AttributeError(f"module 'bft_assets' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
