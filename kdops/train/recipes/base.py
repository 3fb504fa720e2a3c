"""The recipe data model: a :class:`Recipe` is a named set of weighted loss :class:`Term` s.

A term says, declaratively, which named features of the student (and of the teacher) feed
which loss module, with which weight and from when in training. The distiller
(:mod:`kdops.train.distiller`) does the rest: it builds each term's module once the models
are known (:class:`RecipeContext`), aligns spatial sizes, calls the module, weights and logs
the result.

Calling convention of a term's module: features are passed as interleaved (student,
teacher) pairs ``module(s_1, t_1, s_2, t_2, ...)``, or, with ``grouped=True``, as two lists
``module([s_1, s_2, ...], [t_1, t_2, ...])`` (one list when there is no teacher); then the
labels (N, H, W) when ``labels=True``; then the keyword arguments of ``kwargs(student,
teacher)``. A module returns a scalar or a dict of named scalars (logged separately).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn

TEACHER_KINDS = (None, "model", "labels")


@dataclass(frozen=True)
class RecipeContext:
    """What a term needs to build its module: the models' widths and the task."""

    student_channels: dict[str, int]
    teacher_channels: dict[str, int]
    num_classes: int
    ignore_index: int = 255
    backend: str | None = None


@dataclass(frozen=True)
class OwnOptimizer:
    """Parameters of a term's module that are trained by a loss of their own, with an
    optimizer of their own (APD's teacher projection), not by the distillation loss.

    ``params(module)`` selects them; ``loss(module, student_features, teacher_features,
    labels)`` is their loss; ``make(params)`` builds their optimizer. The distiller applies
    the run's poly schedule to its learning rate.
    """

    params: Callable[[nn.Module], Iterable[nn.Parameter]]
    loss: Callable[..., torch.Tensor]
    make: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


@dataclass(frozen=True)
class Term:
    """One weighted loss of a recipe.

    name: the log key ("cwd/logits"); student / teacher: feature keys of the models' output
    dicts (``teacher`` empty for self-distillation); build: makes the loss module from a
    :class:`RecipeContext`; weight: multiplies the module's value; start: fraction of the
    training steps before which the term is off (a warm-up); resize_teacher: bilinearly
    resize each teacher feature to its student partner's H, W when they differ (off for
    losses that resize internally, e.g. attention maps); kwargs: extra keyword arguments
    taken from the models (e.g. classifier weights); own_optimizer: see :class:`OwnOptimizer`.
    """

    name: str
    build: Callable[[RecipeContext], nn.Module]
    student: tuple[str, ...]
    teacher: tuple[str, ...] = ()
    labels: bool = False
    grouped: bool = False
    weight: float = 1.0
    start: float = 0.0
    resize_teacher: bool = True
    kwargs: Callable[[nn.Module, nn.Module | None], dict] | None = None
    own_optimizer: OwnOptimizer | None = None

    def __post_init__(self):
        if not self.student:
            raise ValueError(f"term {self.name!r}: student must name at least one feature")
        if self.teacher and not self.grouped and len(self.teacher) != len(self.student):
            raise ValueError(f"term {self.name!r}: student and teacher must name as many features")
        if not 0.0 <= self.start < 1.0:
            raise ValueError(f"term {self.name!r}: start must be in [0, 1), got {self.start}")
        if self.weight < 0:
            raise ValueError(f"term {self.name!r}: weight must be >= 0, got {self.weight}")

    def active(self, step: int, total_steps: int) -> bool:
        """Whether the term is on at 0-based ``step`` of ``total_steps``."""
        return self.weight > 0 and step >= self.start * total_steps


@dataclass(frozen=True)
class Recipe:
    """A distillation method: its terms and the teacher it needs.

    teacher: ``"model"`` (a segmentation teacher reading the image), ``"labels"`` (LGAD's
    label teacher, reading the label map) or None (self-distillation). defaults: the data
    set, student and learning rate the method is usually run with (the CLI's defaults for it).
    ``a + b`` sums two recipes' terms.
    """

    name: str
    terms: tuple[Term, ...]
    teacher: str | None = "model"
    description: str = ""
    defaults: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.teacher not in TEACHER_KINDS:
            raise ValueError(f"recipe {self.name!r}: teacher must be one of {TEACHER_KINDS}, got {self.teacher!r}")
        names = [t.name for t in self.terms]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"recipe {self.name!r}: terms {duplicates} appear twice")
        for term in self.terms:
            if term.teacher and self.teacher is None:
                raise ValueError(f"recipe {self.name!r}: term {term.name!r} reads a teacher but the recipe has none")

    def __add__(self, other: "Recipe") -> "Recipe":
        if not isinstance(other, Recipe):
            return NotImplemented
        kinds = {self.teacher, other.teacher} - {None}
        if len(kinds) > 1:
            raise ValueError(
                f"cannot combine {self.name!r} (teacher: {self.teacher}) with {other.name!r} "
                f"(teacher: {other.teacher}): they need different teachers"
            )
        return Recipe(
            name=f"{self.name}+{other.name}",
            terms=self.terms + other.terms,
            teacher=kinds.pop() if kinds else None,
            description=f"{self.description} + {other.description}",
            defaults={**other.defaults, **self.defaults},
        )

    def with_weights(self, weights: dict[str, float]) -> "Recipe":
        """A copy with some terms' weights replaced (``{"cwd/logits": 1.0}``)."""
        known = {t.name for t in self.terms}
        unknown = sorted(set(weights) - known)
        if unknown:
            raise ValueError(f"recipe {self.name!r} has no term {unknown[0]!r}; its terms: {sorted(known)}")
        terms = tuple(replace(t, weight=float(weights[t.name])) if t.name in weights else t for t in self.terms)
        return replace(self, terms=terms)
