"""Distillation recipes: one small declarative object per method, composable with ``+``.

>>> from kdops.train.recipes import get_recipe
>>> get_recipe("cwd+kd").terms  # the terms of both, summed by the distiller

:func:`get_recipe` takes a name or a ``+``-joined list of names (``"cwd+kd"``) and raises
:class:`UnknownRecipeError` (a ``ValueError``) naming the valid choices otherwise.
:func:`register_recipe` adds a user recipe.
"""
from __future__ import annotations

from kdops.train.recipes.base import OwnOptimizer, Recipe, RecipeContext, Term
from kdops.train.recipes.methods import BUILTIN

__all__ = [
    "OwnOptimizer",
    "Recipe",
    "RecipeContext",
    "Term",
    "UnknownRecipeError",
    "get_recipe",
    "recipe_names",
    "register_recipe",
]

_REGISTRY: dict[str, Recipe] = {}


class UnknownRecipeError(ValueError):
    """A recipe name that is not registered."""


def register_recipe(recipe: Recipe, *, overwrite: bool = False) -> Recipe:
    """Add ``recipe`` under ``recipe.name`` (a single name: no "+")."""
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a Recipe, got {type(recipe).__name__}")
    if "+" in recipe.name or not recipe.name:
        raise ValueError(f"a registered recipe needs a plain name, got {recipe.name!r}")
    if recipe.name in _REGISTRY and not overwrite:
        raise ValueError(f"recipe {recipe.name!r} is already registered (pass overwrite=True)")
    _REGISTRY[recipe.name] = recipe
    return recipe


def recipe_names() -> list[str]:
    """The registered recipe names, sorted."""
    return sorted(_REGISTRY)


def get_recipe(spec: str) -> Recipe:
    """The recipe named ``spec``, or the sum of the ``+``-joined names in it (``"cwd+kd"``)."""
    if not isinstance(spec, str):
        raise TypeError(f"recipe must be a string, got {type(spec).__name__}")
    names = [part.strip().lower() for part in spec.split("+")]
    if not all(names):
        raise UnknownRecipeError(f"recipe {spec!r} has an empty name; write names joined by '+', e.g. cwd+kd")
    recipe = None
    for name in names:
        if name not in _REGISTRY:
            raise UnknownRecipeError(
                f"unknown recipe {name!r}; choose from {', '.join(recipe_names())} "
                f"(combine with '+', e.g. cwd+kd)"
            )
        recipe = _REGISTRY[name] if recipe is None else recipe + _REGISTRY[name]
    return recipe


for _factory in BUILTIN:
    register_recipe(_factory())
